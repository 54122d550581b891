"""`df5t export` end to end: the artifact follows the contract and reproduces the published network."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

pytest.importorskip("torch", reason="the [export] extra (PyTorch) is not installed")
onnx = pytest.importorskip("onnx", reason="the [export] extra (onnx) is not installed")
import onnxruntime as ort  # noqa: E402

from df5t_deploy.artifact import KEY_ARCH, KEY_FORMAT, KEY_SCHEDULE, KEY_SOURCE_SHA256  # noqa: E402
from df5t_deploy.cli import main  # noqa: E402
from df5t_deploy.files import sha256_of  # noqa: E402


def export(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(main, ["export", *args])
    return result.exit_code, result.output


@pytest.fixture(scope="module")
def tiny_ckpt(fixtures_dir):
    return fixtures_dir / "df5t_reference_tiny.pt"


@pytest.fixture(scope="module")
def fp32_artifact(tmp_path_factory, tiny_ckpt):
    out = tmp_path_factory.mktemp("export") / "tiny.onnx"
    code, output = export(str(tiny_ckpt), "-o", str(out), "--tile", "64")
    assert code == 0, output
    return out, output


def test_artifact_reproduces_published_eps(fp32_artifact, fixtures_dir):
    path, output = fp32_artifact
    assert "relative error" in output and "assuming T=1000" in output
    io = np.load(fixtures_dir / "df5t_reference_tiny_io.npz")
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (eps,) = session.run(["eps"], {"x": io["x"], "t": io["t"]})
    expected = io["eps"][:, :3]
    assert eps.shape == expected.shape
    assert np.linalg.norm(eps - expected) / np.linalg.norm(expected) < 1e-5
    # batch is dynamic: one sample alone gives the same answer
    (one,) = session.run(["eps"], {"x": io["x"][1:], "t": io["t"][1:]})
    np.testing.assert_allclose(one, eps[1:], rtol=0, atol=1e-5)


def test_artifact_follows_the_contract(fp32_artifact, tiny_ckpt):
    path, _ = fp32_artifact
    model = onnx.load(str(path))
    onnx.checker.check_model(model, full_check=True)
    assert max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) >= 17
    assert [i.name for i in model.graph.input] == ["x", "t"]
    assert [o.name for o in model.graph.output] == ["eps"]
    dims = [d.dim_value or d.dim_param for d in model.graph.input[0].type.tensor_type.shape.dim]
    assert isinstance(dims[0], str) and dims[1:] == [3, 64, 64]
    out_dims = [d.dim_value or d.dim_param for d in model.graph.output[0].type.tensor_type.shape.dim]
    assert out_dims[1:] == [3, 64, 64]
    assert model.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert not [n for n in model.graph.node if n.op_type in ("Shape", "Size")]
    meta = {p.key: p.value for p in model.metadata_props}
    assert meta[KEY_FORMAT] == "1"
    assert json.loads(meta[KEY_SCHEDULE]) == {
        "beta_schedule": "linear", "beta_start": 1e-4, "beta_end": 0.02, "num_diffusion_timesteps": 1000
    }
    assert json.loads(meta[KEY_ARCH])["num_channels"] == 8
    assert meta[KEY_SOURCE_SHA256] == sha256_of(tiny_ckpt)


def test_fp16_artifact_types_and_error(tmp_path, tiny_ckpt, fixtures_dir):
    out = tmp_path / "tiny16.onnx"
    code, output = export(str(tiny_ckpt), "-o", str(out), "--tile", "64", "--fp16", "--diffusion-steps", "1000")
    assert code == 0, output
    assert "fp16 twin at tile 64" in output and "assuming" not in output
    model = onnx.load(str(out))
    types = {v.name: v.type.tensor_type.elem_type for v in [*model.graph.input, *model.graph.output]}
    assert types == {"x": onnx.TensorProto.FLOAT16, "t": onnx.TensorProto.FLOAT, "eps": onnx.TensorProto.FLOAT16}
    io = np.load(fixtures_dir / "df5t_reference_tiny_io.npz")
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    (eps,) = session.run(["eps"], {"x": io["x"].astype(np.float16), "t": io["t"]})
    expected = io["eps"][:, :3]
    assert np.linalg.norm(eps.astype(np.float32) - expected) / np.linalg.norm(expected) < 1e-2


@pytest.mark.parametrize("tile", ["48", "100"])
def test_bad_tile_fails_and_leaves_nothing(tmp_path, tiny_ckpt, tile):
    out = tmp_path / "bad.onnx"
    code, output = export(str(tiny_ckpt), "-o", str(out), "--tile", tile)
    assert code != 0 and "multiple of 64" in output
    assert list(tmp_path.iterdir()) == []


def test_output_over_input_is_refused(tmp_path, tiny_ckpt):
    copy = tmp_path / "ckpt.pt"
    copy.write_bytes(tiny_ckpt.read_bytes())
    code, output = export(str(copy), "-o", str(copy))
    assert code == 2 and "is the checkpoint" in output
    assert copy.read_bytes() == tiny_ckpt.read_bytes()


def test_bad_checkpoint_fails_cleanly(tmp_path):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    code, output = export(str(bad), "-o", str(tmp_path / "m.onnx"))
    assert code != 0 and "not a readable PyTorch checkpoint" in output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.pt"]

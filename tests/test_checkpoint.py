"""Checkpoint loading: the usual wrappings work, everything else fails with a useful message."""

from __future__ import annotations

import os
import pickle

import pytest

torch = pytest.importorskip("torch", reason="the [export] extra (PyTorch) is not installed")

from df5t_deploy.export.checkpoint import CheckpointError, load_checkpoint  # noqa: E402
from df5t_deploy.export.network import DF5TNetwork, NetworkConfig  # noqa: E402


@pytest.fixture(scope="module")
def published_state(fixtures_dir):
    return torch.load(fixtures_dir / "df5t_reference_tiny.pt", weights_only=True)


def _save(tmp_path, obj, name="ckpt.pt"):
    path = tmp_path / name
    torch.save(obj, path)
    return path


def test_plain_published_state_dict(fixtures_dir):
    loaded = load_checkpoint(fixtures_dir / "df5t_reference_tiny.pt")
    assert loaded.config == NetworkConfig(8, 1, 1, learn_sigma=True)
    assert loaded.preset is None
    assert len(loaded.sha256) == 64
    assert not loaded.network.training


@pytest.mark.parametrize(
    "wrap, source",
    [
        (lambda sd: {"state_dict": sd, "epoch": 3}, "state_dict"),
        (lambda sd: {"model": sd, "ema": sd, "optimizer": {"lr": 1.0}}, "ema"),
        (lambda sd: {"checkpoint": 1, "model": {"module." + k: v for k, v in sd.items()}}, "model"),
        (lambda sd: {"module.module." + k: v for k, v in sd.items()}, "top level"),
        (lambda sd: {k.removeprefix("restormer."): v for k, v in sd.items()}, "top level"),
    ],
    ids=["state_dict", "ema-preferred", "dataparallel-nested", "double-module", "bare-core"],
)
def test_common_wrappings(tmp_path, published_state, wrap, source):
    loaded = load_checkpoint(_save(tmp_path, wrap(published_state)))
    assert loaded.source == source
    for key, value in published_state.items():
        assert torch.equal(loaded.network.state_dict()[key], value)


def test_any_width_and_depth_is_inferred(tmp_path):
    config = NetworkConfig(12, 2, 3, learn_sigma=False)
    loaded = load_checkpoint(_save(tmp_path, DF5TNetwork(config).state_dict()))
    assert loaded.config == config


def test_truncated_file(tmp_path, fixtures_dir):
    data = (fixtures_dir / "df5t_reference_tiny.pt").read_bytes()
    path = tmp_path / "truncated.pt"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupted"):
        load_checkpoint(path)


def test_foreign_state_dict_names_the_missing_key(tmp_path):
    foreign = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU()).state_dict()
    with pytest.raises(CheckpointError, match="not a DF5T checkpoint.*patch_embed.proj.weight"):
        load_checkpoint(_save(tmp_path, foreign))


def test_wrong_shapes_and_missing_keys_are_listed(tmp_path, published_state):
    broken = dict(published_state)
    broken["restormer.latent.blocks.0.attn.qkv.weight"] = torch.zeros(5, 64, 1, 1)
    del broken["restormer.refinement.blocks.0.ffn.dwconv.weight"]
    broken["restormer.extra.weight"] = torch.zeros(1)
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(_save(tmp_path, broken))
    message = str(info.value)
    assert "missing (1): restormer.refinement.blocks.0.ffn.dwconv.weight" in message
    assert "unexpected (1): restormer.extra.weight" in message
    assert "restormer.latent.blocks.0.attn.qkv.weight: (5, 64, 1, 1) in file, (192, 64, 1, 1) expected" in message
    assert "Nearest preset: df5t-512" in message


class _Exploit:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_pickle_that_runs_code_is_refused_unexecuted(tmp_path, published_state):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    with open(path, "wb") as f:  # a raw pickle: refused before any object is built
        pickle.dump({"state_dict": published_state, "hook": _Exploit(marker)}, f)
    with pytest.raises(CheckpointError):
        load_checkpoint(path)
    assert not marker.exists()
    torch.save({"state_dict": published_state, "hook": _Exploit(marker)}, path)
    with pytest.raises(CheckpointError, match="could execute code"):
        load_checkpoint(path)
    assert not marker.exists()


def test_no_state_dict_anywhere(tmp_path):
    with pytest.raises(CheckpointError, match="no state dict found"):
        load_checkpoint(_save(tmp_path, {"epoch": 3, "notes": "hello"}))

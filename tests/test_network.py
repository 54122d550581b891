"""The network against the published implementation's outputs and state-dict layout."""

from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="the [export] extra (PyTorch) is not installed")

from df5t_deploy.export.network import DF5TNetwork, NetworkConfig, to_mixed_precision  # noqa: E402
from df5t_deploy.export.presets import PRESETS  # noqa: E402


def relative_error(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.fixture(scope="module")
def reference(fixtures_dir):
    io = np.load(fixtures_dir / "df5t_reference_tiny_io.npz")
    stored = json.loads(str(io["config"]))
    config = NetworkConfig(
        stored["model_channels"], stored["num_res_blocks"], stored["num_heads"], stored["learn_sigma"]
    )
    return io, config


def _tiny_network(fixtures_dir, config) -> DF5TNetwork:
    net = DF5TNetwork(config).eval()
    state = torch.load(fixtures_dir / "df5t_reference_tiny.pt", weights_only=True)
    net.load_state_dict(state, strict=True)
    return net


def test_reproduces_published_network_output(fixtures_dir, reference):
    io, config = reference
    net = _tiny_network(fixtures_dir, config)
    with torch.no_grad():
        eps = net(torch.from_numpy(io["x"]), torch.from_numpy(io["t"])).numpy()
    assert eps.shape == io["eps"].shape == (2, 6, 64, 64)
    assert relative_error(eps, io["eps"]) < 1e-5


def test_mixed_precision_stays_close_to_fp32(fixtures_dir, reference):
    io, config = reference
    net = to_mixed_precision(_tiny_network(fixtures_dir, config))
    assert net.restormer.time_embedding.time_embed[0].weight.dtype == torch.float32
    assert net.restormer.patch_embed.proj.weight.dtype == torch.float16
    with torch.no_grad():
        eps = net(torch.from_numpy(io["x"]).half(), torch.from_numpy(io["t"])).float().numpy()
    assert relative_error(eps, io["eps"]) < 1e-2


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_preset_state_dict_matches_published_manifest(fixtures_dir, name):
    manifest = json.loads((fixtures_dir / f"df5t_manifest_{name.split('-')[1]}.json").read_text())
    preset = PRESETS[name]
    with torch.device("meta"):  # shapes only: df5t-256 has 369M parameters
        net = DF5TNetwork(preset.network)
    ours = {k: list(v.shape) for k, v in net.state_dict().items()}
    assert list(ours) == list(manifest["state_dict"])
    assert ours == manifest["state_dict"]
    assert sum(p.numel() for p in net.parameters()) == manifest["num_parameters"] == preset.num_parameters
    assert preset.schedule.to_dict() == manifest["diffusion"]
    assert preset.training_size == manifest["model"]["image_size"]
    assert preset.network.num_channels == manifest["model"]["num_channels"]


def test_eps_network_traces_as_one_graph_for_torch_compile(fixtures_dir, reference):
    """TorchBackend(compile_network=True) compiles with fullgraph=True: the eps network must
    trace without graph breaks (checked with the eager backend, which skips code generation)."""
    from df5t_deploy.export.onnx_export import eps_only

    io, config = reference
    net = eps_only(_tiny_network(fixtures_dir, config))
    x, t = torch.from_numpy(io["x"]), torch.from_numpy(io["t"])
    with torch.inference_mode():
        expected = net(x, t)
        compiled = torch.compile(net, fullgraph=True, backend="eager")(x, t)
    torch.testing.assert_close(compiled, expected)

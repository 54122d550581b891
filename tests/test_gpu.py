"""Whole restorations on a GPU against the CPU reference path. Skips, with the reason, where
there is no CUDA GPU; run everything GPU with `pytest -m gpu` (see README)."""

from __future__ import annotations

import numpy as np
import pytest
from click.testing import CliRunner

from df5t_deploy.api import Restorer
from df5t_deploy.cli import main

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def gpu():
    torch = pytest.importorskip("torch", reason="the GPU tests need PyTorch with CUDA")
    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU on this machine")
    return torch


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, fixtures_dir):
    """The published tiny network: its checkpoint (GPU) and its exported artifact (CPU)."""
    out = tmp_path_factory.mktemp("tiny") / "tiny.onnx"
    checkpoint = fixtures_dir / "df5t_reference_tiny.pt"
    result = CliRunner().invoke(main, ["export", str(checkpoint), "-o", str(out), "--tile", "64"])
    assert result.exit_code == 0, result.output
    return checkpoint, out


def _psnr(a: np.ndarray, b: np.ndarray, data_range: float) -> float:
    return float(10 * np.log10(data_range**2 / np.mean((a.astype(np.float64) - b) ** 2)))


@pytest.mark.parametrize("task, options", [("denoise", {}), ("sr", {"scale": 2}), ("deblur", {"blur_sigma": 1.5})])
def test_gpu_fp32_restoration_matches_the_cpu_path(gpu, tiny, mussel_tile3, task, options):
    from df5t_deploy.backends.torch_backend import TorchBackend

    checkpoint, artifact = tiny
    image = mussel_tile3[:160, :200].astype(np.float32)
    settings = dict(sigma0=0.1, steps=20, seed=11, **options)
    cpu = Restorer(artifact, task, **settings).restore_full(image)
    backend = TorchBackend(checkpoint, device="cuda", tile=64, diffusion_steps=1000, precision="fp32")
    on_gpu = Restorer(checkpoint, task, backend=backend, **settings).restore_full(image)
    data_range = cpu.intensity.high - cpu.intensity.low
    psnr = _psnr(on_gpu.image, cpu.image, data_range)
    print(f"{task}: GPU fp32 vs CPU PSNR {psnr:.1f} dB")
    assert psnr > 50

    fp16 = TorchBackend(checkpoint, device="cuda", tile=64, diffusion_steps=1000, precision="fp16")
    half = Restorer(checkpoint, task, backend=fp16, **settings).restore(image)
    print(f"{task}: GPU fp16 vs fp32 PSNR {_psnr(half, on_gpu.image, data_range):.1f} dB (reported, not asserted)")


def test_gpu_stack_and_super_tiles_with_walks_in_flight_match_the_cpu_path(gpu, tiny, mussel_tile3):
    """Several groups and super-tiles, so the next walk is queued while the last one is still
    on the GPU (pinned downloads on the copy stream, captures without a device sync)."""
    from df5t_deploy.backends.torch_backend import TorchBackend

    checkpoint, artifact = tiny
    stack = np.stack([mussel_tile3[i * 300 : i * 300 + 300, :280] for i in range(3)]).astype(np.float32)
    settings = {"sigma0": 0.1, "steps": 10, "seed": 5, "batch": 4, "max_region": 256}
    cpu = Restorer(artifact, **settings).restore_full(stack)
    backend = TorchBackend(checkpoint, device="cuda", tile=64, diffusion_steps=1000, precision="fp32")
    on_gpu = Restorer(checkpoint, backend=backend, **settings).restore_full(stack)
    psnr = _psnr(on_gpu.image, cpu.image, cpu.intensity.high - cpu.intensity.low)
    print(f"stack with super-tiles: GPU fp32 vs CPU PSNR {psnr:.1f} dB")
    assert psnr > 50


def test_bundled_model_on_pytorch_cuda_matches_the_cpu_path(gpu, mussel_tile3):
    """The bundled ONNX model on the GPU through the checkpoint it was exported from."""
    from df5t_deploy.backends.torch_backend import TorchBackend
    from df5t_deploy.models import default_model_path

    image = mussel_tile3[:128, :192]
    settings = {"sigma0": 0.1, "steps": 20, "seed": 2}
    cpu = Restorer(**settings).restore_full(image)
    backend = TorchBackend(default_model_path(), device="cuda", precision="fp32")
    on_gpu = Restorer(backend=backend, **settings).restore_full(image)
    assert on_gpu.provenance["backend"] == "torch-cuda"
    psnr = _psnr(on_gpu.image, cpu.image, 255.0)
    print(f"bundled model: GPU fp32 vs CPU PSNR {psnr:.1f} dB")
    assert psnr > 50


def test_frames_walked_together_on_the_device_loop_each_match_their_restore(gpu, mussel_tile3):
    """Queued 64 x 64 frames (a tile each of the bundled model) walk as one group on the GPU,
    each with its own seed in the walk table, and each matches its restoration alone."""
    from test_submit import _held_first

    from df5t_deploy.backends.torch_backend import TorchBackend
    from df5t_deploy.models import default_model_path

    frames = [mussel_tile3[64 * i : 64 * i + 64, 200:264] for i in range(5)]  # inside the travelling crop
    options = [{}, {"seed": 11}, {"seed": 2**40}, {}, {"seed": 5}]
    backend = TorchBackend(default_model_path(), device="cuda", precision="fp32")
    tiles_per_call = []
    network = backend.device_network

    def logged(tiles, eps_tiles, t):
        tiles_per_call.append(len(tiles))
        network(tiles, eps_tiles, t)

    backend.device_network = logged
    with Restorer(backend=backend, sigma0=0.1, steps=10, seed=3, batch=4, max_pending=8) as restorer:
        results = [future.result(timeout=300) for future in _held_first(restorer, frames, options)]
        assert 4 in tiles_per_call, f"frames 1-4 did not walk together: tiles per network call {tiles_per_call}"
        for index, (frame, option, result) in enumerate(zip(frames, options, results, strict=True)):
            alone = restorer.restore_full(frame, **option)
            psnr = _psnr(result.image, alone.image, 255.0)
            print(f"frame {index}: walked together vs alone PSNR {psnr:.1f} dB, "
                  f"max |diff| {np.abs(result.image.astype(float) - alone.image).max()}")
            assert psnr > 50
            assert result.provenance == alone.provenance
    assert len({result.image.tobytes() for result in results}) == len(frames)

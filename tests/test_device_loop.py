"""The on-device DDRM loop, run on the CPU through the kernels' emulation: it must give the
host loop's result (same noise, same blending, same step)."""

from __future__ import annotations

import numpy as np
import pytest
from kernel_emulation import EmulatedDevice, build_library

from df5t_deploy.artifact import Schedule
from df5t_deploy.device_check import trusted_verdict
from df5t_deploy.device_loop import DeviceSampler
from df5t_deploy.operators import BlockMean, GaussianBlur, Identity, Inpainting
from df5t_deploy.noise import NoiseKey
from df5t_deploy.progress import ProgressTracker
from df5t_deploy.walks import restore_group
from df5t_deploy.sampler import SamplerSettings
from df5t_deploy.tiling import BlendedDenoiser

TILE = 32


@pytest.fixture(scope="module", params=["emulated", pytest.param("gpu", marks=pytest.mark.gpu)])
def device(request, tmp_path_factory):
    """The loop on the CPU emulation of the kernels and, where there is one, on the GPU."""
    if request.param == "emulated":
        return EmulatedDevice(build_library(tmp_path_factory.mktemp("emulation")))
    torch = pytest.importorskip("torch", reason="the GPU device loop runs on PyTorch tensors")
    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU on this machine")
    from df5t_deploy.cuda.torch_device import TorchCudaDevice

    return TorchCudaDevice(torch.cuda.current_device())


def tile_network(x: np.ndarray, t: np.ndarray) -> np.ndarray:
    """A tile-wide, timestep-dependent test network (numpy)."""
    gain = (1.0 + t / 1000.0).astype(np.float32)[:, None, None, None]
    return gain * (x - x.mean(axis=(2, 3), keepdims=True)) * 0.5


def device_network(tiles, eps_tiles, t) -> None:
    """tile_network on device buffers (numpy arrays or CUDA tensors), written into eps_tiles."""
    if isinstance(tiles, np.ndarray):
        eps_tiles[...] = tile_network(tiles.astype(np.float32), t)
        return
    x = tiles.float()
    gain = 0.5 * (1.0 + t / 1000.0)[:, None, None, None]
    eps_tiles.copy_((gain * (x - x.mean(dim=(2, 3), keepdim=True))).to(eps_tiles.dtype))


@pytest.mark.parametrize("task", ["denoise", "inpaint", "sr", "deblur"])
def test_device_loop_equals_host_loop(device, task):
    """Two walks on one sampler (the second replays the first one's captured step) with
    different measurements and noise keys: a 64-bit seed, other planes, a region offset and
    another orientation."""
    rng = np.random.default_rng(0)
    groups, samples = 2, 2
    if task == "sr":
        op, measured = BlockMean((48, 40), (2, 2)), (24, 20)
    elif task == "inpaint":
        op, measured = Inpainting(rng.random((48, 40)) < 0.2), (48, 40)
    elif task == "deblur":
        op, measured = GaussianBlur((48, 40), (1.3, 0.9)), (48, 40)
    else:
        op, measured = Identity((48, 40)), (48, 40)
    settings = SamplerSettings(sigma0=0.1, steps=6)
    schedule = Schedule(1000)
    denoiser = BlendedDenoiser(tile_network, TILE, 4, batch=3)
    sampler = DeviceSampler(device, op, schedule, settings, denoiser.grid(*op.shape), states=groups * samples,
                            samples=samples)
    keys = [NoiseKey(21, 0, range(7, 7 + groups)), NoiseKey(2**33 + 5, 2, range(40, 40 + groups), y0=16, x0=24),
            NoiseKey([2**40 + 9, 4], 0, [0] * groups)]  # frames walked together: their own seeds, plane 0
    for key in keys:
        y = rng.uniform(-0.8, 0.8, (groups, *measured)).astype(np.float32)
        host = restore_group(y, op, schedule, settings, denoiser, key, samples, ProgressTracker(None, 0, 0, 0))
        if isinstance(device, EmulatedDevice):
            device.launches.clear()
        steps_seen = []
        ours = sampler.start(y, device_network, key).result(steps_seen.append).reshape(groups, samples, *op.shape)
        np.testing.assert_allclose(ours, host, atol=2e-5)
        if isinstance(device, EmulatedDevice):
            assert device.launches.count("df5t_gather_tiles_f32") == len(sampler.ddrm.timesteps)  # one per step
        assert [plan.index for plan in steps_seen] == list(range(len(sampler.ddrm.timesteps)))


def test_a_step_is_captured_once_per_sampler(tmp_path):
    captures = []

    class CountingDevice(EmulatedDevice):
        def capture(self, step):
            captures.append(step)
            return step

    device = CountingDevice(build_library(tmp_path))
    denoiser = BlendedDenoiser(tile_network, TILE, 4, batch=3)
    op = Identity((40, 40))
    sampler = DeviceSampler(device, op, Schedule(1000), SamplerSettings(sigma0=0.1, steps=4), denoiser.grid(40, 40),
                            states=1, samples=1)
    y = np.zeros((1, 40, 40), np.float32)
    for plane in range(3):
        sampler.start(y, device_network, NoiseKey(0, 0, [plane])).result()
    assert len(captures) == 1


class EmulatedDeviceBackend:
    """An onnxruntime backend that also offers a device loop, on the kernels' CPU emulation."""

    name = "emulated-device"

    def __init__(self, model, device):
        from df5t_deploy.backends.onnxruntime_backend import OnnxRuntimeBackend

        self.inner = OnnxRuntimeBackend(model)
        self.info, self.preferred_batch, self.device_api = self.inner.info, 2, device

    def __call__(self, x, t):
        return self.inner(x, t)

    def device_network(self, tiles, eps_tiles, t):
        eps_tiles[...] = self.inner(tiles, t)

    def close(self):
        self.inner.close()


@pytest.mark.parametrize("task, options, fused", [
    ("denoise", {}, "df5t_ddrm_step_pointwise"),
    ("sr", {"scale": 2}, "df5t_ddrm_step_block"),
    ("deblur", {"blur_sigma": 1.2}, "df5t_ddrm_split"),
])
def test_restorer_runs_the_device_loop_like_the_host_loop(tmp_path, mussel_tile3, task, options, fused):
    from onnx_models import tile_mean_model

    from df5t_deploy.api import Restorer

    device = EmulatedDevice(build_library(tmp_path))
    model = tile_mean_model(tmp_path / "mean.onnx", TILE)
    image = np.stack([mussel_tile3[:40, :52], mussel_tile3[100:140, :52]]).astype(np.float32)  # buffers reused
    settings = dict(sigma0=0.1, steps=5, seed=3, samples=2, batch=2, **options)
    host = Restorer(model, task, **settings).restore_full(image)
    ours = Restorer(model, task, backend=EmulatedDeviceBackend(model, device), **settings).restore_full(image)
    scale = host.intensity.high - host.intensity.low
    assert np.abs(ours.image - host.image).max() / scale < 1e-5
    assert np.abs(ours.std - host.std).max() / scale < 1e-5
    assert fused in device.launches


class LoggingDevice(EmulatedDevice):
    """Logs when walks are queued (their result's download starts) and collected."""

    def __init__(self, library):
        super().__init__(library)
        self.log: list[str] = []

    def download_async(self, buffer):
        if buffer.ndim != 3:  # not a walk's result [states, H, W]: the first step's eps check
            return super().download_async(buffer)
        walk = sum(entry.startswith("queued") for entry in self.log)
        self.log.append(f"queued {walk}")
        finished = super().download_async(buffer)
        log = self.log

        class Logged:
            def result(self):
                log.append(f"collected {walk}")
                return finished.result()

        return Logged()


def test_the_next_group_is_queued_before_the_host_waits_for_this_one(tmp_path):
    from onnx_models import tile_mean_model

    from df5t_deploy.api import Restorer

    device = LoggingDevice(build_library(tmp_path))
    assert trusted_verdict(device).passed  # the self-check's own walks, before the log starts
    device.log.clear()
    model = tile_mean_model(tmp_path / "mean.onnx", TILE)
    stack = np.random.default_rng(1).integers(0, 255, (3, 40, 40), dtype=np.uint8)
    settings = dict(sigma0=0.1, steps=3, batch=2)  # four tiles a plane: one plane a group
    ours = Restorer(model, backend=EmulatedDeviceBackend(model, device), **settings).restore(stack)
    assert device.log == ["queued 0", "queued 1", "collected 0", "queued 2", "collected 1", "collected 2"]
    host = Restorer(model, **settings).restore(stack)
    assert np.abs(ours.astype(int) - host).max() <= 1

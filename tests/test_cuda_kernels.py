"""The CUDA kernels: they compile with NVRTC for every supported GPU, and their logic, run on
the CPU through the grid-emulation header, matches the numpy twins."""

from __future__ import annotations

import ctypes

import numpy as np
import pytest
from extras import require
from kernel_emulation import EmulatedKernels, build_library

from df5t_deploy import cuda
from df5t_deploy.artifact import Schedule
from df5t_deploy.device_loop import covering_tiles, step_table, walk_table
from df5t_deploy.noise import gaussian_field
from df5t_deploy.operators import BlockMean, GaussianBlur, Identity, Inpainting
from df5t_deploy.noise import NoiseKey
from df5t_deploy.sampler import DDRM, SamplerSettings, state_to_image
from df5t_deploy.tiling import TileGrid, axis_window, blend_tiles, gather_tiles


@pytest.mark.parametrize("arch", cuda.ARCHITECTURES)
def test_kernels_compile_with_nvrtc(arch, tmp_path, monkeypatch):
    require("cuda.bindings.nvrtc", "test")
    monkeypatch.setenv("DF5T_CACHE", str(tmp_path))
    cubin = cuda.compile_cubin(arch)
    assert cubin[:4] == b"\x7fELF" and len(cubin) > 10_000
    for name in cuda.KERNELS:
        assert name.encode() in cubin, f"{name} missing from the {arch} cubin"
    assert list(tmp_path.glob(f"kernels/*-{arch}.cubin"))  # cached for the next run


def test_kernels_build_for_any_architecture_nvrtc_supports_and_refuse_others(tmp_path, monkeypatch):
    require("cuda.bindings.nvrtc", "test")
    monkeypatch.setenv("DF5T_CACHE", str(tmp_path))
    supported = cuda.nvrtc_architectures()
    beyond = [arch for arch in supported if arch not in cuda.ARCHITECTURES]
    if beyond:  # a GPU of such an architecture gets kernels built for it
        assert cuda.compile_cubin(beyond[0])[:4] == b"\x7fELF"
    with pytest.raises(cuda.KernelBuildError, match="cannot build for sm_999.*upgrade nvidia-cuda-nvrtc"):
        cuda.compile_cubin("sm_999")


#: Per-thread stack a kernel may use: the double-precision sin/cos of Box-Muller take 40 bytes
#: (their argument-reduction slow path); per-thread arrays (the old block step had 2.6 KB) fail.
MAX_STACK_BYTES = 64


@pytest.mark.parametrize("arch", cuda.ARCHITECTURES)
def test_kernels_neither_spill_nor_keep_large_stack_frames(arch):
    require("cuda.bindings.nvrtc", "test")
    resources = cuda.kernel_resources(arch)
    assert sorted(resources) == sorted(cuda.KERNELS), "ptxas reported other kernels than KERNELS lists"
    for name, used in resources.items():
        assert used.spill_store_bytes == 0 and used.spill_load_bytes == 0, f"{name} spills on {arch}: {used}"
        assert used.stack_bytes <= MAX_STACK_BYTES, f"{name} has a {used.stack_bytes}-byte stack frame on {arch}"


def test_build_errors_carry_the_nvrtc_log(monkeypatch):
    require("cuda.bindings.nvrtc", "test")
    monkeypatch.setattr(cuda, "kernel_source", lambda: "extern \"C\" __global__ void broken( { }")
    with pytest.raises(cuda.KernelBuildError, match="compilation for sm_90 failed"):
        cuda._build(cuda.kernel_source().encode(), "sm_90")


# ------------------------------------------------------------------ emulation on the CPU


class GpuKernels:
    """The NVRTC-built kernels on the GPU: arrays go to the device, run, and come back."""

    def __init__(self):
        import torch

        from df5t_deploy.cuda.launch import CudaKernels

        self.torch = torch
        self.kernels = CudaKernels(torch.cuda.current_device())

    def __call__(self, name: str, *args) -> None:
        torch = self.torch
        on_device = {i: torch.from_numpy(np.ascontiguousarray(a)).cuda() for i, a in enumerate(args)
                     if isinstance(a, np.ndarray)}
        converted = [ctypes.c_void_p(on_device[i].data_ptr()) if i in on_device else a for i, a in enumerate(args)]
        stream = torch.cuda.current_stream().cuda_stream
        self.kernels.launch(name, converted, stream)
        self.kernels.synchronize(stream)
        for i, tensor in on_device.items():
            args[i][...] = tensor.cpu().numpy()


def _emulated(tmp_path_factory):
    return EmulatedKernels(build_library(tmp_path_factory.mktemp("emulation")))


def _gpu():
    torch = pytest.importorskip("torch", reason="the GPU kernel tests drive the GPU through PyTorch")
    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU on this machine")
    pytest.importorskip("cuda.bindings.driver", reason="cuda-python is not installed")
    return GpuKernels()


@pytest.fixture(scope="module", params=["emulated", pytest.param("gpu", marks=pytest.mark.gpu)])
def run(request, tmp_path_factory):
    """Each kernel test runs on the CPU emulation and, where there is one, on the GPU."""
    return _emulated(tmp_path_factory) if request.param == "emulated" else _gpu()


U32, U64, INT = ctypes.c_uint32, ctypes.c_uint64, ctypes.c_int


def poisoned(shape, dtype=np.float32):
    return np.full(shape, np.nan if np.dtype(dtype).kind == "f" else 0xAB, dtype=dtype)


def _step_args(ddrm: DDRM, plan_index: int):
    """The plan, and the device step table with a cursor pointing at the plan."""
    plan = list(ddrm.timesteps)[plan_index]
    return plan, (step_table(ddrm), np.array([plan.index], np.uint32))


def _states(batch, shape, rng):
    x = rng.standard_normal((batch, 3, *shape)).astype(np.float32)
    eps = rng.standard_normal((batch, 3, *shape)).astype(np.float32)
    return x, eps


def _reference_step(ddrm, plan, x, eps, y, key: NoiseKey, samples):
    """DDRM.step with the counter-based noise the kernels draw."""
    assert len(key.entries()) == len(x) // samples
    word_noise = np.stack([
        gaussian_field(seed, step=plan.index, draw=s, orientation=key.orientation, plane=plane,
                       y0=key.y0, x0=key.x0, height=x.shape[-2], width=x.shape[-1])
        for seed, plane in key.entries() for s in range(samples)])
    ybar = np.repeat(ddrm.spectral_measurement(y), samples, axis=0)
    return ddrm.step(plan, x, eps, ybar, word_noise)


@pytest.mark.parametrize("task", ["denoise", "inpaint"])
@pytest.mark.parametrize("plan_index", [3, 9])  # a step in the middle, and the last one
def test_pointwise_step_matches_numpy(run, task, plan_index):
    rng = np.random.default_rng(1)
    shape, groups, samples, seed = (20, 28), 2, 2, 2**40 + 77
    op = Identity(shape) if task == "denoise" else Inpainting(rng.random(shape) < 0.3)
    ddrm = DDRM(op, Schedule(1000), SamplerSettings(sigma0=0.1, steps=10))
    plan, step = _step_args(ddrm, plan_index)
    x, eps = _states(groups * samples, shape, rng)
    y = rng.uniform(-1, 1, (groups, *shape)).astype(np.float32)
    ybar = np.ascontiguousarray(ddrm.spectral_measurement(y), dtype=np.float32)
    s = np.ascontiguousarray(ddrm.s, dtype=np.float32)
    out = poisoned(x.shape)
    key = NoiseKey(seed, 1, range(5, 5 + groups), y0=12, x0=300)
    if task == "inpaint":  # frames walked together: each plane its own seed, the same plane id
        key = NoiseKey([seed, 2**33 + 1], 1, [0, 0], y0=12, x0=300)
    run("df5t_ddrm_step_pointwise", x, eps, ybar, s, U64(0), out, U32(groups * samples), U32(samples),
        U32(shape[0]), U32(shape[1]), walk_table(key), *step)
    expected = _reference_step(ddrm, plan, x, eps, y, key, samples)
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=2e-5 * np.abs(expected).max())


@pytest.mark.parametrize("block", [(2, 2), (4, 4), (8, 8), (3, 3), (4, 1), (16, 1)])  # any block size
def test_block_step_matches_numpy(run, block):
    rng = np.random.default_rng(2)
    shape, groups, samples, seed = (48, 24), 2, 1, 5
    op = BlockMean(shape, block)
    ddrm = DDRM(op, Schedule(1000), SamplerSettings(sigma0=0.05, steps=10))
    plan, step = _step_args(ddrm, 5)
    x, eps = _states(groups * samples, shape, rng)
    y = rng.uniform(-1, 1, (groups, *op.measurement_shape)).astype(np.float32)
    out = poisoned(x.shape)
    key = NoiseKey(seed, 2, range(groups), y0=48, x0=8)
    run("df5t_ddrm_step_block", x, eps, np.ascontiguousarray(y), out, U32(groups * samples), U32(samples),
        U32(shape[0]), U32(shape[1]), U32(block[0]), U32(block[1]), walk_table(key), *step)
    expected = _reference_step(ddrm, plan, x, eps, y, key, samples)
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=2e-5 * np.abs(expected).max())


def test_split_update_merge_match_numpy_for_the_blur(run):
    """The blur's kernels, with the DCTs done by numpy between them (as cuFFT would)."""
    rng = np.random.default_rng(3)
    shape, samples, seed = (16, 20), 1, 9
    op = GaussianBlur(shape, (1.2, 1.2))
    ddrm = DDRM(op, Schedule(1000), SamplerSettings(sigma0=0.05, steps=10))
    plan, step = _step_args(ddrm, 4)
    x, eps = _states(1, shape, rng)
    y = rng.uniform(-1, 1, (1, *shape)).astype(np.float32)
    n = shape[0] * shape[1]
    g0, ge, gz = (poisoned((1, *shape)) for _ in range(3))
    diffs = poisoned((1, 2, *shape))
    key = NoiseKey(seed, 0, [3], y0=7, x0=0)
    run("df5t_ddrm_split", x, eps, g0, ge, gz, diffs, U32(1), U32(samples), U32(shape[0]), U32(shape[1]),
        walk_table(key), *step)
    v0, ve, vz = (np.ascontiguousarray(op.vt(a), dtype=np.float32) for a in (g0, ge, gz))
    ybar = np.ascontiguousarray(ddrm.spectral_measurement(y), dtype=np.float32)
    run("df5t_ddrm_update", v0, ve, vz, ybar, np.ascontiguousarray(ddrm.s), U32(1), U32(samples),
                         U64(n), *step)
    grey = np.ascontiguousarray(op.v(v0), dtype=np.float32)
    out = poisoned(x.shape)
    run("df5t_ddrm_merge", grey, diffs, out, U32(1), U64(n), *step)
    expected = _reference_step(ddrm, plan, x, eps, y, key, samples)
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=2e-5 * np.abs(expected).max())


@pytest.mark.parametrize("fp16", [False, True])
def test_gather_and_blend_match_numpy(run, fp16):
    rng = np.random.default_rng(4)
    planes, height, width, tile = 2, 40, 23, 32  # width < tile: reflect padding
    grid = TileGrid(height, width, tile, 8)
    (pt, pb), (pl, pr) = grid.padding
    region = rng.standard_normal((planes, 3, height, width)).astype(np.float32)
    padded = np.pad(region, ((0, 0), (0, 0), (pt, pb), (pl, pr)), mode="reflect")
    jobs = [(p, y, x) for p in range(planes) for (y, x) in grid.positions]
    tp, ty, tx = (np.array([j[i] for j in jobs], dtype=np.int32) for i in range(3))
    kind = "f16" if fp16 else "f32"
    tiles = poisoned((len(jobs), 3, tile, tile), np.uint16 if fp16 else np.float32)
    run(f"df5t_gather_tiles_{kind}", region, tiles, tp, ty, tx, U32(len(jobs)),
                                              U32(height), U32(width), INT(pt), INT(pl), U32(tile))
    expected_tiles = gather_tiles(padded, jobs, tile)
    got = tiles.view(np.float16).astype(np.float32) if fp16 else tiles
    np.testing.assert_allclose(got, expected_tiles, rtol=1e-3 if fp16 else 0, atol=1e-3 if fp16 else 0)

    eps = poisoned((planes, 3, height, width))
    covering = [covering_tiles(starts, n, tile) for starts, n in ((grid.ys, grid.padded[0]), (grid.xs, grid.padded[1]))]
    run(f"df5t_blend_tiles_{kind}", tiles, np.array(grid.ys, np.int32), np.array(grid.xs, np.int32),
        *(np.array([axis_window(s, starts, tile) for s in starts], np.float32) for starts in (grid.ys, grid.xs)),
        *covering[0], *covering[1], U32(len(grid.ys)), U32(len(grid.xs)), eps,
        U32(planes), U32(height), U32(width), INT(pt), INT(pl), U32(tile))
    np.testing.assert_allclose(eps, blend_tiles(got, jobs, grid, planes), rtol=1e-5, atol=1e-6)


def test_covering_tiles_lists_every_tile_over_each_position():
    starts, size = [0, 20, 40, 58], 32
    first, count = covering_tiles(starts, 90, size)
    for position in range(90):
        expected = [i for i, s in enumerate(starts) if s <= position < s + size]
        assert list(range(first[position], first[position] + count[position])) == expected


def test_state_to_grey_matches_numpy(run):
    state = np.random.default_rng(5).uniform(-1.3, 1.3, (2, 3, 7, 9)).astype(np.float32)  # some clipped
    out = poisoned((2, 7, 9))
    run("df5t_state_to_grey", state, out, U32(2), U64(63))
    np.testing.assert_allclose(out, state_to_image(state), rtol=1e-6, atol=1e-7)


def test_doctor_reports_kernels_per_architecture():
    require("cuda.bindings.nvrtc", "test")
    import json

    from click.testing import CliRunner

    from df5t_deploy.cli import main

    result = CliRunner().invoke(main, ["doctor", "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["kernels"] == {arch: "ok" for arch in cuda.ARCHITECTURES}


def test_cursor_and_timestep_table(run):
    cursor = np.array([3], np.uint32)
    t = poisoned((5,))
    run("df5t_fill_timesteps", t, np.arange(10, dtype=np.float32) * 100, cursor, U32(5))
    np.testing.assert_array_equal(t, 300.0)
    run("df5t_advance", cursor)
    assert cursor[0] == 4


def test_an_nvrtc_library_that_cannot_be_loaded_is_reported_not_raised(monkeypatch):
    """cuda-bindings imports, but libnvrtc is not found (as in an environment that lacks it)."""

    class Unloadable:
        nvrtcResult = None

        def __getattr__(self, name):
            def call(*args):
                raise RuntimeError("Failure finding libnvrtc.so")

            return call

    monkeypatch.setattr(cuda, "_nvrtc", Unloadable)
    cuda.kernel_status.cache_clear()
    try:
        status = cuda.kernel_status()
    finally:
        cuda.kernel_status.cache_clear()
    assert set(status) == set(cuda.ARCHITECTURES)
    assert all(state.startswith("NVRTC cannot be loaded") for state in status.values())


def test_one_status_check_serves_driver_runtime_and_nvrtc_calls():
    require("cuda.bindings.nvrtc", "test")
    from cuda.bindings import driver, nvrtc, runtime

    from df5t_deploy.cuda.status import checked

    assert checked((nvrtc.nvrtcResult.NVRTC_SUCCESS, 5), "version", RuntimeError) == 5
    assert checked((driver.CUresult.CUDA_SUCCESS, 1, 2), "two values", RuntimeError) == (1, 2)
    assert checked(runtime.cudaError_t.cudaSuccess, "no value", RuntimeError) is None
    for failure in (driver.CUresult.CUDA_ERROR_INVALID_VALUE, runtime.cudaError_t.cudaErrorMemoryAllocation,
                    nvrtc.nvrtcResult.NVRTC_ERROR_COMPILATION):
        with pytest.raises(KeyError, match=f"call failed: {failure.name}"):
            checked((failure, 0), "call", KeyError)

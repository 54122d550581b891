"""TensorRT engines: cache keys, sidecars, profiles and backend choice, without TensorRT; the
TensorRT paths themselves run where TensorRT and a GPU exist."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
from click.testing import CliRunner
from df5t_deploy.engines.build import choose_profile
from df5t_deploy.engines.cache import BatchProfile, EngineCache, EngineCacheError, EngineKey, validate_sidecar
from onnx_models import tile_mean_model

from df5t_deploy.backends import BackendUnavailable, candidates, open_backend
from df5t_deploy.cli import main

KEY = EngineKey("a" * 64, "10.7.0", "NVIDIA H100 80GB HBM3", "9.0", "fp16", 512, BatchProfile(1, 8, 16))


@pytest.mark.parametrize("field, value", [
    ("artifact_sha256", "b" * 64), ("tensorrt_version", "10.8.0"), ("gpu_name", "NVIDIA L40S"),
    ("compute_capability", "8.9"), ("precision", "fp32"), ("tile", 256), ("profile", BatchProfile(1, 4, 16)),
])
def test_every_key_field_changes_the_digest(field, value):
    assert dataclasses.replace(KEY, **{field: value}).digest != KEY.digest
    assert dataclasses.replace(KEY).digest == KEY.digest


def test_cache_round_trip_and_layout(tmp_path):
    cache = EngineCache(tmp_path)
    assert cache.lookup(KEY) is None
    plan = cache.store(KEY, b"PLAN", {"df5t.format": "1"}, {"seconds": 1.0})
    assert plan == tmp_path / f"{KEY.digest}.plan" and plan.read_bytes() == b"PLAN"
    sidecar = json.loads((tmp_path / f"{KEY.digest}.json").read_text())
    assert sidecar["key"]["gpu_name"] == KEY.gpu_name and sidecar["artifact_metadata"] == {"df5t.format": "1"}
    assert cache.lookup(KEY) == plan


def test_a_plan_for_another_gpu_is_never_loaded(tmp_path):
    cache = EngineCache(tmp_path)
    plan = cache.store(KEY, b"PLAN", {}, {})
    other = dataclasses.replace(KEY, gpu_name="NVIDIA A100-SXM4-80GB", compute_capability="8.0")
    # the same file names with a sidecar from another GPU, as if copied between machines
    sidecar = tmp_path / f"{KEY.digest}.json"
    document = json.loads(sidecar.read_text())
    document["key"]["gpu_name"] = other.gpu_name
    sidecar.write_text(json.dumps(document))
    assert cache.lookup(KEY) is None
    with pytest.raises(EngineCacheError, match="built for gpu_name='NVIDIA A100-SXM4-80GB'"):
        validate_sidecar(document, KEY)
    assert plan.exists()  # left for the rebuild to replace, never loaded


@pytest.mark.parametrize("damage", ["missing", "garbage", "old-format"])
def test_damaged_sidecars_mean_rebuild(tmp_path, damage):
    cache = EngineCache(tmp_path)
    cache.store(KEY, b"PLAN", {}, {})
    sidecar = tmp_path / f"{KEY.digest}.json"
    if damage == "missing":
        sidecar.unlink()
    elif damage == "garbage":
        sidecar.write_text("{not json")
    else:
        sidecar.write_text(json.dumps({"format": 0, "key": KEY.to_dict()}))
    assert cache.lookup(KEY) is None


def test_profiles():
    assert choose_profile() == BatchProfile(1, 16, 16)
    assert choose_profile(32, 8) == BatchProfile(1, 8, 32)
    with pytest.raises(EngineCacheError, match="1 <= min <= opt <= max"):
        choose_profile(8, 16)
    with pytest.raises(EngineCacheError):
        choose_profile(0)


def test_backend_order():
    assert candidates("auto", "auto") == ("tensorrt", "onnxruntime-cuda", "torch-cuda", "onnxruntime-cpu")
    assert candidates("auto", "cuda") == ("tensorrt", "onnxruntime-cuda", "torch-cuda")  # a GPU asked for: no CPU
    assert candidates("auto", "cuda:1") == candidates("auto", "cuda")
    assert candidates("auto", "cpu") == ("onnxruntime-cpu",)
    assert candidates("tensorrt", "cuda") == ("tensorrt",)
    assert candidates("onnxruntime", "auto") == ("onnxruntime-cuda", "onnxruntime-cpu")
    with pytest.raises(ValueError, match="--backend tensorrt runs on a GPU"):
        candidates("tensorrt", "cpu")
    with pytest.raises(ValueError, match="unknown device"):
        candidates("auto", "tpu")


def test_auto_falls_back_and_says_why(tmp_path):
    tried, messages = [], []

    def opener(kind, model, device, threads):
        tried.append(kind)
        if kind != "onnxruntime-cpu":
            raise BackendUnavailable(f"{kind} is not here")
        return type("Fake", (), {"name": kind})()

    backend = open_backend("auto", tmp_path / "m.onnx", "auto", report=messages.append, opener=opener)
    assert backend.name == "onnxruntime-cpu"
    assert tried == ["tensorrt", "onnxruntime-cuda", "torch-cuda", "onnxruntime-cpu"]
    assert "device auto: no GPU backend can run here" in messages[0]
    assert "tensorrt: tensorrt is not here" in messages[0] and "torch-cuda" in messages[0]


def test_device_auto_opens_gpu_kinds_on_the_first_gpu_and_the_cpu_kind_on_the_cpu(tmp_path):
    devices = {}

    def opener(kind, model, device, threads):
        devices[kind] = device
        raise BackendUnavailable("not here")

    with pytest.raises(BackendUnavailable, match="no backend can run here"):
        open_backend("auto", tmp_path / "m.onnx", "auto", opener=opener)
    assert devices == {"tensorrt": "cuda", "onnxruntime-cuda": "cuda", "torch-cuda": "cuda", "onnxruntime-cpu": "cpu"}


def test_an_explicit_gpu_never_falls_back_to_the_cpu(tmp_path):
    tried = []

    def opener(kind, model, device, threads):
        tried.append(kind)
        raise BackendUnavailable("no GPU")

    with pytest.raises(BackendUnavailable, match="--device cuda:1: no backend can run on it here.*--device auto"):
        open_backend("auto", tmp_path / "m.onnx", "cuda:1", opener=opener)
    assert "onnxruntime-cpu" not in tried


def test_explicit_backend_that_cannot_run_is_an_error(tmp_path):
    def opener(kind, model, device, threads):
        raise BackendUnavailable("no GPU")

    with pytest.raises(BackendUnavailable, match="no backend can run on it here: tensorrt: no GPU"):
        open_backend("tensorrt", tmp_path / "m.onnx", "cuda", opener=opener)


def test_build_without_tensorrt_says_what_is_missing(tmp_path):
    try:
        import tensorrt  # noqa: F401

        pytest.skip("TensorRT is installed here; the real build test covers this machine")
    except ImportError:
        pass
    model = tile_mean_model(tmp_path / "m.onnx", 64)
    result = CliRunner().invoke(main, ["build", str(model), "-o", str(tmp_path / "cache")])
    assert result.exit_code != 0 and "TensorRT is not installed" in result.output
    assert not (tmp_path / "cache").exists()


def _tensorrt_and_gpu():
    trt = pytest.importorskip("tensorrt", reason="TensorRT is not installed on this machine")
    cudart = pytest.importorskip("cuda.bindings.runtime", reason="cuda-python is not installed")
    err, count = cudart.cudaGetDeviceCount()
    if err != cudart.cudaError_t.cudaSuccess or count == 0:
        pytest.skip("no CUDA GPU on this machine")
    return trt


@pytest.mark.gpu
def test_tensorrt_engine_matches_onnxruntime(tmp_path):
    _tensorrt_and_gpu()
    from df5t_deploy.backends.tensorrt_backend import TensorRTBackend

    from df5t_deploy.backends.onnxruntime_backend import OnnxRuntimeBackend

    model = tile_mean_model(tmp_path / "m.onnx", 64)
    trt_backend = TensorRTBackend(model, cache=EngineCache(tmp_path / "cache"), max_batch=4)
    x = np.random.default_rng(0).standard_normal((3, 3, 64, 64), dtype=np.float32)
    t = np.array([1.0, 500.0, 999.0], np.float32)
    np.testing.assert_allclose(trt_backend(x, t), OnnxRuntimeBackend(model)(x, t), atol=1e-3)
    again = TensorRTBackend(model, cache=EngineCache(tmp_path / "cache"), max_batch=4)  # a cache hit
    assert len(list((tmp_path / "cache").glob("*.plan"))) == 1
    np.testing.assert_array_equal(again(x, t), trt_backend(x, t))


@pytest.mark.gpu
def test_a_fake_plan_is_rebuilt_not_trusted(tmp_path):
    """A plan file whose sidecar matches but whose bytes are not an engine fails clearly."""
    trt = _tensorrt_and_gpu()
    from df5t_deploy.engines.build import artifact_facts, engine_key, gpu_identity
    from df5t_deploy.backends.tensorrt_backend import TensorRTBackend, TensorRTError

    model = tile_mean_model(tmp_path / "m.onnx", 64)
    cache = EngineCache(tmp_path / "cache")
    key = engine_key(artifact_facts(model), choose_profile(4), trt.__version__, gpu_identity(0))
    cache.store(key, b"not a plan", {}, {})
    with pytest.raises(TensorRTError, match="could not deserialise"):
        TensorRTBackend(model, cache=cache, max_batch=4)


class FakeContext:
    """Records what the runtime asks of a TensorRT execution context."""

    def __init__(self):
        self.shapes, self.addresses, self.memory, self.enqueued = {}, {}, None, []

    def set_device_memory(self, pointer, size):
        self.memory = (pointer, size)

    def set_input_shape(self, name, shape):
        self.shapes[name] = tuple(shape)
        return True

    def set_tensor_address(self, name, pointer):
        self.addresses[name] = pointer
        return True

    def execute_async_v3(self, stream):
        self.enqueued.append(stream)
        return True


def aligned_zeros(torch, shape, dtype):
    """A zeroed tensor at a 256-byte aligned address, as CUDA allocations are (the CPU's need not be)."""
    count = int(np.prod(shape))
    size = torch.tensor([], dtype=dtype).element_size()
    raw = torch.zeros(count * size + 256, dtype=torch.uint8)
    offset = -raw.data_ptr() % 256
    return raw[offset : offset + count * size].view(dtype).view(shape)


def test_chunk_contexts_bind_once_and_share_the_scratch():
    torch = pytest.importorskip("torch", reason="the [export] extra (PyTorch) is not installed")
    from df5t_deploy.backends.tensorrt_backend import ChunkContexts

    # tiles of 3 x 16 x 16 fp16 (1,536 bytes: every chunk's slice aligned to 256 bytes), while
    # the timesteps of chunks 2 and 3 start 16 and 32 bytes into t: those get buffers of their own
    tiles = aligned_zeros(torch, (11, 3, 16, 16), torch.float16)
    eps = aligned_zeros(torch, (11, 3, 16, 16), torch.float16)
    t = aligned_zeros(torch, (11,), torch.float32)
    t[:] = torch.arange(11)
    scratch = torch.zeros(1000, dtype=torch.uint8)
    chunks = ChunkContexts(FakeContext, scratch, tiles, eps, t, max_batch=4)
    assert [c.shapes["x"] for c in chunks.contexts] == [(4, 3, 16, 16), (4, 3, 16, 16), (3, 3, 16, 16)]
    assert [c.shapes["t"] for c in chunks.contexts] == [(4,), (4,), (3,)]
    assert [c.addresses["x"] for c in chunks.contexts] == [tiles[i].data_ptr() for i in (0, 4, 8)]
    assert [c.addresses["eps"] for c in chunks.contexts] == [eps[i].data_ptr() for i in (0, 4, 8)]
    assert chunks.contexts[0].addresses["t"] == t.data_ptr()
    own = {buffer.data_ptr() for copies in chunks._copies_in for buffer, _ in copies}
    assert [c.addresses["t"] in own for c in chunks.contexts] == [False, True, True]
    for c in chunks.contexts:  # the caller's slices bound in place are aligned (own buffers are on a GPU)
        assert all(address % 256 == 0 for address in c.addresses.values() if address not in own), c.addresses
    assert {c.memory for c in chunks.contexts} == {(scratch.data_ptr(), 1000)}
    before = [(dict(c.shapes), dict(c.addresses)) for c in chunks.contexts]
    chunks.enqueue(7)
    chunks.enqueue(7)
    assert [c.enqueued for c in chunks.contexts] == [[7, 7]] * 3
    assert [(c.shapes, c.addresses) for c in chunks.contexts] == before  # nothing changes between enqueues
    own_t = chunks._copies_in[2][0][0]  # the third chunk's own timesteps hold t[8:11] when it runs
    assert own_t.data_ptr() == chunks.contexts[2].addresses["t"] and own_t.tolist() == [8.0, 9.0, 10.0]


def test_unaligned_outputs_are_copied_back_after_their_chunk_runs():
    torch = pytest.importorskip("torch", reason="the [export] extra (PyTorch) is not installed")
    from df5t_deploy.backends.tensorrt_backend import ChunkContexts

    tiles = aligned_zeros(torch, (6, 3, 2, 2), torch.float32)  # 48 bytes a tile: the second chunk starts unaligned
    eps = aligned_zeros(torch, (6, 3, 2, 2), torch.float32)
    t = aligned_zeros(torch, (6,), torch.float32)
    chunks = ChunkContexts(FakeContext, torch.zeros(8, dtype=torch.uint8), tiles, eps, t, max_batch=4)
    assert chunks._copies_out[0] == []  # the first chunk's eps is bound in place
    own_eps = chunks._copies_out[1][0][1]
    own_eps.fill_(5.0)  # as if the engine had written it
    chunks.enqueue(0)
    assert torch.equal(eps[4:], torch.full((2, 3, 2, 2), 5.0)) and torch.equal(eps[:4], torch.zeros(4, 3, 2, 2))


def test_a_rejected_chunk_shape_is_a_clear_error():
    torch = pytest.importorskip("torch", reason="the [export] extra (PyTorch) is not installed")
    from df5t_deploy.backends.tensorrt_backend import ChunkContexts, TensorRTError

    class Refusing(FakeContext):
        def set_input_shape(self, name, shape):
            return False

    tiles = torch.zeros(5, 3, 8, 8)
    with pytest.raises(TensorRTError, match="rejected a batch of 4 tiles"):
        ChunkContexts(Refusing, torch.zeros(8, dtype=torch.uint8), tiles, tiles, torch.zeros(5), max_batch=4)


@pytest.mark.gpu
def test_tensorrt_device_loop_matches_the_host_loop(tmp_path):
    """The whole on-device loop with the engine inside its CUDA graph (more tiles than the
    profile's maximum batch, so several chunk contexts) against onnxruntime on the CPU."""
    _tensorrt_and_gpu()
    pytest.importorskip("torch", reason="the device loop's buffers are PyTorch tensors")
    from df5t_deploy.backends.tensorrt_backend import TensorRTBackend

    from df5t_deploy.api import Restorer

    model = tile_mean_model(tmp_path / "m.onnx", 64)
    image = np.random.default_rng(2).integers(0, 255, (2, 150, 130), dtype=np.uint8)
    settings = {"sigma0": 0.1, "steps": 5, "seed": 4, "batch": 3}
    backend = TensorRTBackend(model, cache=EngineCache(tmp_path / "cache"), max_batch=4)
    ours = Restorer(model, backend=backend, **settings).restore_full(image)
    host = Restorer(model, **settings).restore_full(image)
    assert np.abs(ours.image.astype(int) - host.image).max() <= 3  # the engine runs in fp16


def test_an_artifact_runs_on_pytorch_through_the_checkpoint_it_came_from(tmp_path):
    """The torch backend takes an ONNX artifact only with the very .pt it was exported from
    beside it (the bundled model has one), judged by the sha256 the export recorded."""
    import shutil

    from df5t_deploy.backends.torch_backend import source_checkpoint
    from df5t_deploy.models import default_model_path

    bundled = default_model_path()
    checkpoint, info = source_checkpoint(bundled)
    assert checkpoint == bundled.with_suffix(".pt") and info.tile == 64

    alone = tmp_path / "model.onnx"
    shutil.copy(bundled, alone)
    with pytest.raises(BackendUnavailable, match="no model.pt beside it"):
        source_checkpoint(alone)
    (tmp_path / "model.pt").write_bytes(b"some other checkpoint")
    with pytest.raises(BackendUnavailable, match="not the checkpoint model.onnx was exported from"):
        source_checkpoint(alone)


def test_doctor_explains_every_backend_of_the_auto_order():
    result = CliRunner().invoke(main, ["doctor", "--json"])
    assert result.exit_code == 0, result.output
    facts = json.loads(result.output)
    assert tuple(facts["backends"]) == candidates("auto", "auto")
    assert facts["backends"]["onnxruntime-cpu"] == "ok"
    for name, state in facts["backends"].items():
        assert state.startswith("ok") or "install" in state or "no CUDA GPU" in state or "no NVIDIA GPU" in state, name
    try:
        import torch

        has_cuda = torch.cuda.is_available()
    except ImportError:
        has_cuda = False
    if not has_cuda:
        assert not facts["backends"]["torch-cuda"].startswith("ok")
        assert facts["device_loop"] != "ok"


def test_a_gpu_backend_without_the_loops_software_falls_back_to_the_host_loop(monkeypatch):
    import df5t_deploy.cuda.torch_device as torch_device

    from df5t_deploy.backends.base import open_device_loop

    def missing(index):
        raise ImportError("No module named 'cuda'", name="cuda")

    monkeypatch.setattr(torch_device, "TorchCudaDevice", missing)
    with pytest.warns(UserWarning, match="on-device loop cannot start.*host copies"):
        assert open_device_loop(0) is None


@pytest.mark.parametrize("failure", ["nvrtc", "driver"])
def test_kernels_that_cannot_be_built_or_loaded_fall_back_to_the_host_loop(monkeypatch, failure):
    """A GPU newer than the NVRTC, or a driver that refuses the cubin: a warning and the host
    loop, never a crash."""
    import df5t_deploy.cuda.torch_device as torch_device
    from df5t_deploy.backends.base import open_device_loop
    from df5t_deploy.cuda import KernelBuildError
    from df5t_deploy.cuda.launch import CudaError

    def refuse(index):
        if failure == "nvrtc":
            raise KernelBuildError("this NVRTC (12.8) cannot build for sm_130")
        raise CudaError("cuModuleLoadData failed: CUDA_ERROR_UNSUPPORTED_PTX_VERSION")

    monkeypatch.setattr(torch_device, "TorchCudaDevice", refuse)
    with pytest.warns(UserWarning, match="on-device loop cannot start.*(sm_130|UNSUPPORTED).*host copies"):
        assert open_device_loop(0) is None


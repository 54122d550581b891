"""Building TensorRT engines from DF5T artifacts (TensorRT 10 Python API).

An fp16 artifact (float16 x/eps, float32 t and timestep embedding) is parsed into a strongly
typed network, so TensorRT keeps exactly the precisions the export chose; an fp32 artifact is
built with the FP16 builder flag, letting TensorRT pick per layer. One optimisation profile
covers batch min..max at the artifact's static tile. A persistent timing cache makes
rebuilds (new profile, new driver) fast.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from ..artifact import ArtifactInfo, read_artifact
from ..cuda.status import checked
from ..files import atomic_path, sha256_of
from .cache import BatchProfile, EngineCache, EngineKey

DEFAULT_MAX_BATCH = 16
DEFAULT_WORKSPACE_BYTES = 8 * 2**30
DEFAULT_OPTIMIZATION_LEVEL = 3


class EngineBuildError(RuntimeError):
    """TensorRT could not build an engine; the message carries its errors."""


@dataclass(frozen=True)
class ArtifactFacts:
    """What the engine key needs from the artifact, read without TensorRT."""

    path: Path
    sha256: str
    info: ArtifactInfo  # tile, precision, schedule
    metadata: dict


def artifact_facts(path: str | Path) -> ArtifactFacts:
    info, metadata = read_artifact(path)
    return ArtifactFacts(Path(path), sha256_of(path), info, metadata)


def choose_profile(max_batch: int | None = None, opt_batch: int | None = None) -> BatchProfile:
    """min 1; max as asked (default 16); opt as asked, else max (the runtime batch)."""
    maximum = DEFAULT_MAX_BATCH if max_batch is None else max_batch
    return BatchProfile(1, maximum if opt_batch is None else opt_batch, maximum)


def _trt():
    try:
        import tensorrt as trt
    except ImportError as err:
        raise EngineBuildError(
            "TensorRT is not installed (pip install tensorrt on a machine with an NVIDIA driver)"
        ) from err
    return trt


def gpu_identity(device: int = 0) -> tuple[str, str]:
    """(name, compute capability "major.minor") of a CUDA device, via cuda-python."""
    from cuda.bindings import runtime as cudart

    props = checked(cudart.cudaGetDeviceProperties(device), f"cudaGetDeviceProperties({device})", EngineBuildError)
    name = props.name.decode(errors="replace").rstrip("\x00") if isinstance(props.name, bytes) else str(props.name)
    return name, f"{props.major}.{props.minor}"


def engine_key(facts: ArtifactFacts, profile: BatchProfile, tensorrt_version: str, gpu: tuple[str, str]) -> EngineKey:
    return EngineKey(facts.sha256, tensorrt_version, gpu[0], gpu[1], "fp16", facts.info.tile, profile)


def build_engine(
    onnx_path: str | Path,
    cache: EngineCache,
    profile: BatchProfile,
    *,
    device: int = 0,
    workspace_bytes: int = DEFAULT_WORKSPACE_BYTES,
    optimization_level: int = DEFAULT_OPTIMIZATION_LEVEL,
    rebuild: bool = False,
    log=print,
) -> Path:
    """The cached plan for this artifact, GPU and TensorRT, built first if needed."""
    trt = _trt()
    facts = artifact_facts(onnx_path)
    key = engine_key(facts, profile, trt.__version__, gpu_identity(device))
    cached = None if rebuild else cache.lookup(key)
    if cached is not None:
        log(f"engine cache hit: {cached}")
        return cached
    started = time.perf_counter()
    plan = _build_plan(trt, facts, profile, workspace_bytes, optimization_level, cache.root / "timing.cache", log)
    build = {"seconds": round(time.perf_counter() - started, 1), "workspace_bytes": workspace_bytes,
             "optimization_level": optimization_level, "strongly_typed": facts.info.precision == "fp16"}
    path = cache.store(key, plan, facts.metadata, build)
    log(f"built {path} in {build['seconds']} s")
    return path


def _build_plan(trt, facts: ArtifactFacts, profile: BatchProfile, workspace: int, level: int, timing_path: Path, log) -> bytes:
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    strongly_typed = facts.info.precision == "fp16"
    flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED) if strongly_typed else 0
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(facts.path)):
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        raise EngineBuildError(f"{facts.path}: the ONNX parser failed:\n  " + "\n  ".join(errors))
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace)
    config.builder_optimization_level = level
    if not strongly_typed:
        config.set_flag(trt.BuilderFlag.FP16)
    timing = config.create_timing_cache(timing_path.read_bytes() if timing_path.is_file() else b"")
    if timing is None or not config.set_timing_cache(timing, ignore_mismatch=False):
        raise EngineBuildError(f"cannot use the timing cache {timing_path}; delete it to start afresh")
    trt_profile = builder.create_optimization_profile()
    tile = facts.info.tile
    trt_profile.set_shape("x", (profile.min, 3, tile, tile), (profile.opt, 3, tile, tile), (profile.max, 3, tile, tile))
    trt_profile.set_shape("t", (profile.min,), (profile.opt,), (profile.max,))
    if config.add_optimization_profile(trt_profile) < 0:
        raise EngineBuildError(f"TensorRT rejected the batch profile {profile}")
    log(f"building a {'strongly typed fp16' if strongly_typed else 'fp32+FP16-flag'} engine, batch "
        f"{profile.min}/{profile.opt}/{profile.max}, tile {tile} ...")
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise EngineBuildError("TensorRT failed to build the engine (see its messages above)")
    timing_path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(timing_path) as tmp:
        tmp.write_bytes(bytes(config.get_timing_cache().serialize()))
    return bytes(plan)


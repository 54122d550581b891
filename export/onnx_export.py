"""Export a DF5T network to a verified, self-describing ONNX artifact (DESIGN.md contract)."""

from __future__ import annotations

import copy
import logging
import shutil
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import torch

from ..artifact import Schedule, metadata_for
from ..files import atomic_path
from .checkpoint import LoadedCheckpoint
from .network import DF5TNetwork, Downsample, to_mixed_precision

OPSET = 18
#: Protobuf cannot hold a model over 2 GiB; above this the weights go to a side file.
EXTERNAL_DATA_THRESHOLD = 1_800_000_000
FP32_TOLERANCE = 1e-5
#: An fp16 artifact further than this from the fp32 network is broken, not merely rounded.
FP16_TOLERANCE = 2e-2
FP16_TWIN_TILE = 64
VERIFY_TIMESTEP_FRACTIONS = (0.0, 0.5, 1.0)

Log = Callable[[str], None]


class ExportError(RuntimeError):
    """The export could not produce an artifact that meets the contract."""


@dataclass(frozen=True)
class ExportReport:
    path: Path
    tile: int
    precision: str
    relative_error: float  # fp32: ORT vs PyTorch at the artifact's tile; fp16: twin vs fp32
    seconds: float


def eps_only(network: DF5TNetwork) -> DF5TNetwork:
    """A copy for inference: the final convolution keeps only the three noise channels, and
    the stride-1 transposed convolutions of the downsamplers become plain convolutions."""
    pruned = copy.deepcopy(network)
    conv = pruned.restormer.output
    if conv.out_channels != 3:
        trimmed = torch.nn.Conv2d(conv.in_channels, 3, conv.kernel_size, padding=conv.padding, bias=False)
        trimmed.weight.data.copy_(conv.weight.data[:3])
        pruned.restormer.output = trimmed
    for module in pruned.modules():
        if isinstance(module, Downsample):
            module.transpose_conv = _as_convolution(module.transpose_conv)
    return pruned.eval()


def _as_convolution(transposed: torch.nn.ConvTranspose2d) -> torch.nn.Conv2d:
    """The same map as a Conv2d: swap in/out channels and flip the kernel.

    Valid for stride 1 without groups, dilation or output padding (the published
    downsamplers); onnxruntime's CPU kernels for Conv are several times faster.
    """
    k, p = transposed.kernel_size[0], transposed.padding[0]
    assert transposed.stride == (1, 1) and transposed.groups == 1 and transposed.dilation == (1, 1)
    conv = torch.nn.Conv2d(transposed.in_channels, transposed.out_channels, k, padding=k - 1 - p,
                           bias=transposed.bias is not None)
    conv.weight.data.copy_(transposed.weight.data.transpose(0, 1).flip(-2, -1))
    if transposed.bias is not None:
        conv.bias.data.copy_(transposed.bias.data)
    return conv


def export_checkpoint(
    loaded: LoadedCheckpoint,
    output: str | Path,
    *,
    tile: int,
    schedule: Schedule,
    fp16: bool = False,
    log: Log = print,
) -> ExportReport:
    """Write the artifact for ``loaded`` to ``output`` after verifying it; nothing on failure."""
    _check_tile(tile)
    started = time.perf_counter()
    network = eps_only(loaded.network)
    arch = {**loaded.config.to_dict(), "preset": loaded.preset.name if loaded.preset else None}
    metadata = metadata_for(schedule, arch, loaded.sha256)
    precision = "fp16" if fp16 else "fp32"
    with tempfile.TemporaryDirectory(prefix="df5t-export-") as scratch:
        log(f"tracing the {precision} network at tile {tile} ...")
        model = _to_onnx(_for_precision(network, fp16), tile, fp16, metadata)
        staged = Path(scratch) / Path(output).name
        _save(model, staged)
        log(f"  graph: {len(model.graph.node)} nodes, opset {OPSET} ({_elapsed(started)})")
        if fp16:
            error = _verify_fp16(network, metadata, schedule, Path(scratch), log)
        else:
            error = _verify_fp32(network, staged, tile, schedule, log)
        _publish(staged, Path(output))
    report = ExportReport(Path(output), tile, precision, error, time.perf_counter() - started)
    log(f"wrote {output} ({precision}, tile {tile}) in {report.seconds:.1f} s")
    return report


def _check_tile(tile: int) -> None:
    # Three 2x downsamplings, then the 8x8 pool at the deepest level: 64 | tile keeps every
    # level a multiple of the pool grid, where the export is exact and free of shape arithmetic.
    if tile < 64 or tile % 64:
        raise ExportError(f"tile {tile} is not a positive multiple of 64; use e.g. 256 or 512")


def _for_precision(network: DF5TNetwork, fp16: bool) -> DF5TNetwork:
    return to_mixed_precision(copy.deepcopy(network)) if fp16 else network


def _to_onnx(network: DF5TNetwork, tile: int, fp16: bool, metadata: dict) -> onnx.ModelProto:
    dtype = torch.float16 if fp16 else torch.float32
    example = (torch.zeros(2, 3, tile, tile, dtype=dtype), torch.zeros(2, dtype=torch.float32))
    batch = torch.export.Dim("batch", min=1, max=4096)
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)  # silence optional-op notices
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # the exporter's deprecation chatter, not ours
        program = torch.onnx.export(
            network, example, dynamo=True, opset_version=OPSET, optimize=True, verbose=False,
            input_names=["x", "t"], output_names=["eps"],
            dynamic_shapes={"x": {0: batch}, "t": {0: batch}},
        )
    model = program.model_proto
    _check_graph(model)
    for key, value in metadata.items():
        model.metadata_props.add(key=key, value=value)
    return model


def _check_graph(model: onnx.ModelProto) -> None:
    shape_ops = [n.name for n in model.graph.node if n.op_type in ("Shape", "Size")]
    if shape_ops:
        raise ExportError(f"exported graph still computes shapes at run time: {shape_ops[:5]}")
    if model.graph.output[0].name != "eps" or [i.name for i in model.graph.input] != ["x", "t"]:
        raise ExportError("exported graph does not have inputs (x, t) and output eps")


def _save(model: onnx.ModelProto, path: Path) -> None:
    external = model.ByteSize() > EXTERNAL_DATA_THRESHOLD
    onnx.save_model(
        model, path, save_as_external_data=external, all_tensors_to_one_file=True,
        location=path.name + ".data",
    )
    onnx.checker.check_model(str(path), full_check=True)


def _publish(staged: Path, final: Path) -> None:
    """Move the checked artifact (and its weights file, if any) into place atomically."""
    data = staged.with_name(staged.name + ".data")
    if data.exists():
        with atomic_path(final.with_name(final.name + ".data")) as tmp:
            shutil.move(data, tmp)
    with atomic_path(final) as tmp:
        shutil.move(staged, tmp)


def _verify_fp32(network: DF5TNetwork, path: Path, tile: int, schedule: Schedule, log: Log) -> float:
    x, t = _verification_inputs(tile, schedule)
    with torch.no_grad():
        expected = network(torch.from_numpy(x), torch.from_numpy(t)).numpy()
    actual = _run_onnxruntime(path, x, t)
    error = relative_error(actual, expected)
    log(f"  verified with onnxruntime (CPU) at t={t.tolist()}: relative error {error:.2e}")
    if not error < FP32_TOLERANCE:
        raise ExportError(f"onnxruntime differs from PyTorch by {error:.2e} > {FP32_TOLERANCE:g}")
    return error


def _verify_fp16(
    network: DF5TNetwork, metadata: dict, schedule: Schedule, scratch: Path, log: Log
) -> float:
    """Compare an fp16 twin at tile 64 against the fp32 network (see FP16_TWIN_TILE)."""
    twin = scratch / "fp16-twin.onnx"
    _save(_to_onnx(_for_precision(network, True), FP16_TWIN_TILE, True, metadata), twin)
    x, t = _verification_inputs(FP16_TWIN_TILE, schedule)
    with torch.no_grad():
        expected = network(torch.from_numpy(x), torch.from_numpy(t)).numpy()
    actual = _run_onnxruntime(twin, x.astype(np.float16), t).astype(np.float32)
    error = relative_error(actual, expected)
    log(
        f"  fp16 twin at tile {FP16_TWIN_TILE} (onnxruntime CPU) vs the fp32 network at "
        f"t={t.tolist()}: relative error {error:.2e}"
    )
    if not error < FP16_TOLERANCE:
        raise ExportError(f"fp16 artifact differs from fp32 by {error:.2e} > {FP16_TOLERANCE:g}")
    return error


def _verification_inputs(tile: int, schedule: Schedule) -> tuple[np.ndarray, np.ndarray]:
    """Fresh random states at timesteps spread over the schedule."""
    rng = np.random.default_rng()
    last = schedule.num_diffusion_timesteps - 1
    t = np.array([round(f * last) for f in VERIFY_TIMESTEP_FRACTIONS], dtype=np.float32)
    x = rng.standard_normal((len(t), 3, tile, tile), dtype=np.float32)
    return x, t


def _run_onnxruntime(path: Path, x: np.ndarray, t: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(["eps"], {"x": x, "t": t})[0]


def relative_error(actual: np.ndarray, expected: np.ndarray) -> float:
    return float(np.linalg.norm(actual - expected) / np.linalg.norm(expected))


def _elapsed(started: float) -> str:
    return f"{time.perf_counter() - started:.1f} s"

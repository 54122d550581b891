"""PyTorch on CUDA: runs a DF5T checkpoint (.pt) in fp16 (or fp32), channels-last, on a GPU.

For machines with PyTorch and a GPU but neither TensorRT nor onnxruntime-gpu (such as the
project's GPU test machine). The network is the export's (eps head only), stored in fp16
with the precision-critical parts in fp32 exactly as the fp16 artifact.

"fp32" means IEEE fp32: PyTorch lets cuDNN use TF32 for convolutions by default, which
would make an fp32 result differ from the CPU's by far more than rounding; our backend
turns TF32 off around its calls unless ``allow_tf32=True`` asks for it.

``compile_network=True`` compiles it with ``torch.compile`` (Inductor's default mode, which
adds no CUDA graphs of its own: the device loop captures whole steps itself). Compilation
takes minutes on first use and happens in the loop's first, direct step, outside any
capture; whether it pays off depends on the GPU, which is why the GPU benchmark has a row
for it.
"""

from __future__ import annotations

import functools
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from ..artifact import ArtifactInfo
from ..version import install_extra
from .base import BackendUnavailable, ClosingBackend, open_device_loop

CUDA_BATCH = 8


class TorchBackend(ClosingBackend):
    name = "torch-cuda"

    def __init__(self, checkpoint: str | Path, device: str = "cuda", tile: int | None = None,
                 diffusion_steps: int | None = None, precision: str = "fp16", compile_network: bool = False,
                 allow_tf32: bool = False):
        try:
            import torch
        except ImportError:
            raise BackendUnavailable(f"the torch backend needs PyTorch: {install_extra('export')}") from None
        if not torch.cuda.is_available():
            raise BackendUnavailable("PyTorch sees no CUDA GPU")
        artifact = None
        if Path(checkpoint).suffix.lower() == ".onnx":  # run the checkpoint it came from, its way
            checkpoint, artifact = source_checkpoint(checkpoint)
        from ..export.checkpoint import load_checkpoint
        from ..export.network import to_mixed_precision
        from ..export.onnx_export import eps_only
        from ..export.presets import DEFAULT_TILE, resolve_schedule

        loaded = load_checkpoint(checkpoint)
        if artifact is not None:
            schedule, tile = artifact.schedule, tile or artifact.tile
        else:
            schedule = resolve_schedule(loaded.preset, diffusion_steps, lambda message: None)
            tile = tile or (loaded.preset.training_size if loaded.preset else DEFAULT_TILE)
        self._torch = torch
        self.device = torch.device(device)
        if precision not in ("fp16", "fp32"):
            raise ValueError(f"precision must be fp16 or fp32, got {precision!r}")
        network = eps_only(loaded.network)
        network = to_mixed_precision(network) if precision == "fp16" else network
        self.network = network.to(self.device).to(memory_format=torch.channels_last).eval()
        if compile_network:
            self.network = torch.compile(self.network, fullgraph=True)
        self._x_dtype = np.float16 if precision == "fp16" else np.float32
        arch = {**loaded.config.to_dict(), "preset": loaded.preset.name if loaded.preset else None}
        self.info = ArtifactInfo(tile, precision, schedule, arch, loaded.sha256)
        self.preferred_batch = CUDA_BATCH
        self.allow_tf32 = allow_tf32

    @contextmanager
    def _running(self):
        """Inference mode on this backend's GPU, with TF32 as asked. The TF32 switches are
        process-wide; they are restored after the call (captured graphs keep the kernels
        chosen while capturing)."""
        torch = self._torch
        matmul, cudnn = torch.backends.cuda.matmul, torch.backends.cudnn
        saved = matmul.allow_tf32, cudnn.allow_tf32
        matmul.allow_tf32 = cudnn.allow_tf32 = self.allow_tf32
        try:
            with torch.cuda.device(self.device), torch.inference_mode():
                yield
        finally:
            matmul.allow_tf32, cudnn.allow_tf32 = saved

    @functools.cached_property
    def device_api(self):
        """The device loop's buffers and kernels on this backend's GPU (None: host loop)."""
        return open_device_loop(self.device.index or 0)

    def device_network(self, tiles, eps_tiles, t) -> None:
        """eps for device tiles (timesteps ``t``, a device tensor), in chunks of the batch,
        written into eps_tiles: no host copy, and capturable in a CUDA graph."""
        torch = self._torch
        batch = self.preferred_batch
        with self._running():
            for start in range(0, len(tiles), batch):
                chunk = tiles[start : start + batch].contiguous(memory_format=torch.channels_last)
                eps_tiles[start : start + len(chunk)] = self.network(chunk, t[start : start + len(chunk)]).to(eps_tiles.dtype)

    def close(self) -> None:
        """Drop the network; its GPU memory returns to PyTorch's caching allocator."""
        self.network = None

    def __call__(self, x: np.ndarray, t: np.ndarray) -> np.ndarray:
        torch = self._torch
        with self._running():
            xs = torch.from_numpy(np.ascontiguousarray(x, dtype=self._x_dtype)).to(self.device, non_blocking=True)
            ts = torch.from_numpy(np.ascontiguousarray(t, dtype=np.float32)).to(self.device, non_blocking=True)
            eps = self.network(xs.contiguous(memory_format=torch.channels_last), ts)
            return eps.float().cpu().numpy()


def source_checkpoint(artifact: str | Path) -> tuple[Path, ArtifactInfo]:
    """The checkpoint an ONNX artifact was exported from, and the artifact's description: the
    ``.pt`` of the same name beside it, accepted only if its sha256 is the one the export
    recorded (so the bundled model, for one, runs on PyTorch too)."""
    from ..artifact import read_artifact
    from ..files import sha256_of

    artifact = Path(artifact)
    info = read_artifact(artifact)[0]
    checkpoint = artifact.with_suffix(".pt")
    if not checkpoint.is_file():
        raise BackendUnavailable(
            f"the torch backend runs PyTorch checkpoints; {artifact.name} has no {checkpoint.name} beside it "
            "(pass the .pt it was exported from as --model)"
        )
    if not info.source_sha256 or sha256_of(checkpoint) != info.source_sha256:
        raise BackendUnavailable(f"{checkpoint} is not the checkpoint {artifact.name} was exported from (sha256 differs)")
    return checkpoint, info


def open_kind(kind: str, model: Path, device: str, threads: int | None) -> TorchBackend:
    return TorchBackend(model, device=device)


def diagnose(kind: str, gpus: list[str]) -> str:
    try:
        import torch
    except ImportError:
        return f"PyTorch is not installed (a CUDA build for GPUs): {install_extra('export')}"
    if not torch.cuda.is_available():
        return f"PyTorch {torch.__version__} sees no CUDA GPU (a CPU-only build, or no GPU/driver)"
    return "ok (runs .pt checkpoints, or an artifact with its .pt beside it)"

"""PyTorch on CUDA: runs a DF5T checkpoint (.pt) in fp16, channels-last, on a GPU.

For machines with PyTorch and a GPU but neither TensorRT nor onnxruntime-gpu (such as the
project's GPU test machine). The network is the export's (eps head only), stored in fp16
with the precision-critical parts in fp32 exactly as the fp16 artifact.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..artifact import ArtifactInfo
from .base import BackendUnavailable

CUDA_BATCH = 8


class TorchBackend:
    name = "torch-cuda"

    def __init__(self, checkpoint: str | Path, device: str = "cuda", tile: int | None = None,
                 diffusion_steps: int | None = None):
        try:
            import torch
        except ImportError:
            raise BackendUnavailable("the torch backend needs PyTorch: pip install 'df5t-deploy[export]'") from None
        if not torch.cuda.is_available():
            raise BackendUnavailable("PyTorch sees no CUDA GPU")
        if Path(checkpoint).suffix.lower() == ".onnx":
            raise BackendUnavailable("the torch backend runs PyTorch checkpoints (.pt), not ONNX artifacts")
        from ..export.checkpoint import load_checkpoint
        from ..export.network import to_mixed_precision
        from ..export.onnx_export import eps_only
        from ..export.presets import DEFAULT_TILE, resolve_schedule

        loaded = load_checkpoint(checkpoint)
        schedule = resolve_schedule(loaded.preset, diffusion_steps, lambda message: None)
        tile = tile or (loaded.preset.training_size if loaded.preset else DEFAULT_TILE)
        self._torch = torch
        self.device = torch.device(device)
        network = to_mixed_precision(eps_only(loaded.network)).to(self.device)
        self.network = network.to(memory_format=torch.channels_last).eval()
        arch = {**loaded.config.to_dict(), "preset": loaded.preset.name if loaded.preset else None}
        self.info = ArtifactInfo(tile, "fp16", schedule, arch, loaded.sha256)
        self.preferred_batch = CUDA_BATCH

    def __call__(self, x: np.ndarray, t: np.ndarray) -> np.ndarray:
        torch = self._torch
        with torch.inference_mode():
            xs = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float16)).to(self.device, non_blocking=True)
            ts = torch.from_numpy(np.ascontiguousarray(t, dtype=np.float32)).to(self.device, non_blocking=True)
            eps = self.network(xs.contiguous(memory_format=torch.channels_last), ts)
            return eps.float().cpu().numpy()

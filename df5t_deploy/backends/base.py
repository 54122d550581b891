"""What every backend provides: eps for a batch of tiles, and the artifact's description."""

from __future__ import annotations

from typing import Protocol

import numpy as np

from ..artifact import ArtifactInfo


class BackendUnavailable(RuntimeError):
    """The requested backend cannot run here; the message says what is missing."""


class Backend(Protocol):
    name: str  # e.g. "onnxruntime-cpu"
    info: ArtifactInfo
    preferred_batch: int  # tiles per call, chosen by measurement for this backend

    def __call__(self, x: np.ndarray, t: np.ndarray) -> np.ndarray:
        """eps [B,3,T,T] float32 for x [B,3,T,T] float32 and raw timesteps t [B] float32."""
        ...

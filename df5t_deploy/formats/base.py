"""What every format provides: a plane-by-plane source and an atomic plane-by-plane sink."""

from __future__ import annotations

import math
import os
import shutil
import tempfile
from abc import ABC, abstractmethod
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from ..files import temporary_sibling
from ..work import TaskStore, plane_task


class ImageFormatError(ValueError):
    """The file cannot be read or written as an EM image; the message says why."""


@dataclass(frozen=True)
class ImageMeta:
    axes: str  # "YX" or "ZYX"
    voxel_size_nm: tuple[float, float, float | None] | None = None  # (x, y, z); unknown z: None
    hyperstack: bool = False  # an ImageJ hyperstack: a TIFF output is one too (Fiji reads its z spacing)

    def __post_init__(self):
        if self.voxel_size_nm is None:
            return
        x, y, z = self.voxel_size_nm
        if not all(_positive_finite(v) for v in (x, y, *(() if z is None else (z,)))):
            raise ImageFormatError(f"voxel size {self.voxel_size_nm} nm (x, y, z) is not positive finite numbers; "
                                   "fix the file's metadata (for isotropic restoration, --z-factor K sets k)")

    def scaled(self, xy: float = 1.0, z: float = 1.0) -> "ImageMeta":
        """The voxel size after resampling by these factors (sr: xy = 1/R; isotropic: z = 1/k)."""
        if self.voxel_size_nm is None:
            return self
        x, y, zz = self.voxel_size_nm
        return replace(self, voxel_size_nm=(x * xy, y * xy, None if zz is None else zz * z))

    def with_axes(self, ndim: int) -> "ImageMeta":
        return replace(self, axes="ZYX" if ndim == 3 else "YX")


def _positive_finite(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0


def check_grey(path: Path, shape: tuple[int, ...], axes: str) -> None:
    if len(shape) not in (2, 3) or min(shape) < 1:
        raise ImageFormatError(
            f"{path}: array of shape {shape} (axes {axes}); expected a grey YX image or a ZYX "
            "stack (split channels or time points first)"
        )


#: The largest plane df5t-deploy reads (2^31 pixels, 46,000 px square): a header declaring
#: more is refused before anything is allocated (crafted or damaged files).
MAX_PLANE_PIXELS = 2**31


def check_plane_size(path: Path, shape: tuple[int, ...]) -> None:
    height, width = shape[-2:]
    if height * width > MAX_PLANE_PIXELS:
        raise ImageFormatError(f"{path}: declares {height} x {width} planes ({height * width / 1e9:.1f} GPix), more "
                               f"than df5t-deploy reads ({MAX_PLANE_PIXELS / 1e9:.1f} GPix per plane); split the image "
                               "into tiles, or the file's header is damaged")


class Source(ABC):
    """A grey YX image or ZYX stack, read one plane (or one slab of rows) at a time."""

    path: Path
    shape: tuple[int, ...]
    dtype: np.dtype
    meta: ImageMeta
    provenance: dict | None = None  # what df5t-deploy recorded when it wrote this file, if it did

    @property
    def planes(self) -> int:
        return self.shape[0] if len(self.shape) == 3 else 1

    @abstractmethod
    def plane(self, z: int) -> np.ndarray:
        """Plane z as a YX array (z = 0 for a 2D image)."""

    def rows(self, y0: int, y1: int) -> np.ndarray:
        """Rows y0..y1 of every plane, [Z, y1 - y0, X]: one pass over the planes."""
        return np.stack([self.plane(z)[y0:y1] for z in range(self.planes)])

    def read(self) -> np.ndarray:
        """The whole image or stack (small data only)."""
        if len(self.shape) == 2:
            return self.plane(0)
        return np.stack([self.plane(z) for z in range(self.planes)])

    def close(self) -> None:  # noqa: B027  (most sources hold nothing to release)
        """Release the file; a no-op for sources that hold nothing open."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class Sink(ABC):
    """Receives planes; the file appears under its name only when all are written.

    Use as a context manager: leaving it by an exception (Ctrl-C included) removes every
    partial file (a resumable sink keeps its partial folder, hidden, for ``--resume``).
    """

    #: Whether planes may arrive in any order (each written where its index says).
    any_order = False
    #: A resumable sink's done-markers: which planes an interrupted run already wrote.
    tasks: TaskStore | None = None

    def __init__(self, path: Path, shape: tuple[int, ...], dtype: np.dtype, meta: ImageMeta, provenance: dict | None):
        self.path, self.shape, self.dtype = Path(path), tuple(shape), np.dtype(dtype)
        self.meta, self.provenance = meta.with_axes(len(shape)), provenance
        self.written = 0

    @property
    def planes(self) -> int:
        return self.shape[0] if len(self.shape) == 3 else 1

    def write_plane(self, plane: np.ndarray, z: int | None = None) -> None:
        """Write plane ``z``: the next one by default, any one if the sink takes ``any_order``."""
        z = self.written if z is None else z
        expected = self.shape[-2:]
        if plane.shape != expected:
            raise ValueError(f"plane of shape {plane.shape} written to a sink of planes {expected}")
        if self.written >= self.planes:
            raise ValueError(f"{self.path}: all {self.planes} planes are already written")
        if not 0 <= z < self.planes or (z != self.written and not self.any_order):
            raise ValueError(f"{self.path}: plane {z} cannot be written now (the next is {self.written} "
                             f"of {self.planes}, in order)")
        self._write(z, np.asarray(plane, dtype=self.dtype))
        self.written += 1

    def missing_planes(self) -> list[int]:
        """The planes not yet written, in order (by this sink, or by the interrupted run a
        resumable sink continues)."""
        if self.tasks is None:
            return list(range(self.written, self.planes))
        return [z for z in range(self.planes) if not self.tasks.is_done(plane_task(z))]

    @abstractmethod
    def _write(self, z: int, plane: np.ndarray) -> None: ...

    @abstractmethod
    def _commit(self) -> None:
        """Everything is written: make the output appear under its final name."""

    @abstractmethod
    def _abort(self) -> None:
        """Remove every partial file."""

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None and self.written != self.planes:
            self._abort()
            raise ValueError(f"{self.path}: only {self.written} of {self.planes} planes were written")
        if exc_type is not None:
            self._abort()
            return
        try:
            self._commit()
        except BaseException:  # a failed final rename (full or read-only disk) leaves nothing partial
            self._abort()
            raise


class TempFileSink(Sink):
    """A sink that writes one file beside the target and renames it at the end."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.tmp = temporary_sibling(self.path)

    def _commit(self) -> None:
        """The new file takes the target's name; a file there that is not one of ours (one
        that appeared during the run, after the outputs were checked) is never replaced."""
        from ..output_safety import is_previous_output

        self._close()
        if self.path.exists() and not is_previous_output(self.path):
            raise ImageFormatError(f"{self.path} appeared during the run and is not an output of df5t-deploy; "
                                   "it was left as it is and the restoration was not written")
        os.replace(self.tmp, self.path)

    def _abort(self) -> None:
        try:
            self._close()
        finally:
            self.tmp.unlink(missing_ok=True)

    def _close(self) -> None:
        pass


class TempDirSink(Sink):
    """A sink that writes a folder (zarr) beside the target and renames it at the end.

    ``partial``: continue in this earlier, interrupted folder instead of a new one.
    """

    def __init__(self, *args, partial: Path | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = partial or Path(tempfile.mkdtemp(prefix=f".{self.path.name}.partial-", dir=self.path.parent))

    def _commit(self) -> None:
        """The new folder takes the target's name; a previous output of ours there is first
        set aside (whole, under a hidden name) and removed only once the new one is in place,
        so a crash in between loses neither. Anything else there is never removed."""
        from ..output_safety import is_previous_output

        if not self.path.exists():
            self.tmp.rename(self.path)
            return
        if not self.path.is_dir() or not is_previous_output(self.path):
            raise ImageFormatError(f"{self.path} appeared during the run and is not an output of df5t-deploy; "
                                   "it was left as it is")
        aside = Path(tempfile.mkdtemp(prefix=f".{self.path.name}.replaced-", dir=self.path.parent))
        os.replace(self.path, aside / "previous")
        self.tmp.rename(self.path)
        shutil.rmtree(aside)

    def _abort(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)

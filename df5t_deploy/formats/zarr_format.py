"""zarr and OME-Zarr (NGFF 0.4 single-scale) with one chunk per plane.

The output is built in a hidden folder beside the target and renamed when complete. With
``resume=True`` an interrupted output is continued: planes already written (recorded in the
folder's attributes) are skipped by the caller.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np

from .base import (
    ImageFormatError,
    ImageMeta,
    Source,
    TempDirSink,
    check_grey,
    check_plane_size,
)

SUFFIXES = (".zarr",)
PROGRESS_ATTR = "df5t_planes_written"


def _array(group_or_array):
    import zarr

    if isinstance(group_or_array, zarr.Array):
        return group_or_array, {}
    arrays = dict(group_or_array.arrays())
    if "0" not in arrays:
        raise ImageFormatError("zarr group without array '0' (not OME-Zarr)")
    return arrays["0"], dict(group_or_array.attrs)


class ZarrSource(Source):
    def __init__(self, path: Path):
        import zarr

        self.path = path
        try:
            self._array, attrs = _array(zarr.open(str(path), mode="r"))
        except (ValueError, KeyError, OSError, FileNotFoundError) as err:
            raise ImageFormatError(f"{path}: not a readable zarr store ({err})") from None
        self.shape, self.dtype = tuple(self._array.shape), np.dtype(self._array.dtype)
        check_grey(path, self.shape, "?" * len(self.shape))
        check_plane_size(path, self.shape)
        self._check_chunks()
        self.meta = ImageMeta("ZYX" if len(self.shape) == 3 else "YX", _ome_voxel_size(attrs, len(self.shape)))
        self.provenance = attrs.get("df5t") if isinstance(attrs.get("df5t"), dict) else None

    def _check_chunks(self) -> None:
        """zarr reads a missing chunk as its fill value: refuse rather than restore it as data."""
        present, total = self._array.nchunks_initialized, self._array.nchunks
        if present < total:
            raise ImageFormatError(
                f"{self.path}: {total - present} of {total} chunks are missing (never written, or elided because "
                f"they held only the fill value {self._array.fill_value!r}); complete the store, or rewrite it "
                "with write_empty_chunks=True if those regions really are that value")

    def plane(self, z: int) -> np.ndarray:
        try:
            return np.asarray(self._array[...] if len(self.shape) == 2 else self._array[z])
        except (RuntimeError, ValueError, OSError) as err:  # a damaged chunk: the codec's own error
            raise ImageFormatError(f"{self.path}: plane {z} cannot be read, a chunk is damaged ({err})") from None


def _ome_voxel_size(attrs: dict, ndim: int):
    try:
        transform = attrs["multiscales"][0]["datasets"][0]["coordinateTransformations"][0]["scale"]
    except (KeyError, IndexError, TypeError):
        return None
    scale = [float(v) for v in transform[-ndim:]]
    return (scale[-1], scale[-2], scale[0] if ndim == 3 else None)


def partial_store(path: Path) -> Path | None:
    """The interrupted output a resumed run continues (the latest, by name)."""
    candidates = sorted(Path(path).parent.glob(f".{Path(path).name}.partial-*"))
    return candidates[-1] if candidates else None


class ZarrSink(TempDirSink):
    def __init__(self, path, shape, dtype, meta, provenance, resume: bool = False):
        import zarr

        partial = partial_store(path) if resume else None
        super().__init__(path, shape, dtype, meta, provenance, partial=partial)
        if partial is not None:
            self._group = zarr.open_group(str(self.tmp), mode="r+")
            self._array = self._group["0"]
            if tuple(self._array.shape) != self.shape or np.dtype(self._array.dtype) != self.dtype:
                raise ImageFormatError(f"{partial}: cannot resume, it holds {self._array.shape} {self._array.dtype}")
            self.written = int(self._group.attrs.get(PROGRESS_ATTR, 0))
            return
        self._group = zarr.open_group(str(self.tmp), mode="w")
        chunks = (1, *self.shape[1:]) if len(self.shape) == 3 else self.shape
        # every chunk written, even one of fill values, so that readers can tell data from absence
        self._array = self._group.create_array("0", shape=self.shape, dtype=self.dtype, chunks=chunks,
                                               config={"write_empty_chunks": True})
        self._group.attrs.update(self._ome_attrs())
        self._group.attrs[PROGRESS_ATTR] = 0

    def _ome_attrs(self) -> dict:
        axes = [{"name": a.lower(), "type": "space", "unit": "nanometer"} for a in self.meta.axes]
        voxel = self.meta.voxel_size_nm or (1.0, 1.0, 1.0)
        scale = [voxel[1], voxel[0]] if len(self.shape) == 2 else [voxel[2] or 1.0, voxel[1], voxel[0]]
        attrs = {"multiscales": [{"version": "0.4", "axes": axes, "datasets": [
            {"path": "0", "coordinateTransformations": [{"type": "scale", "scale": scale}]}]}]}
        if self.provenance:
            attrs["df5t"] = self.provenance
        return attrs

    def _write(self, plane: np.ndarray) -> None:
        if len(self.shape) == 2:
            self._array[...] = plane
        else:
            self._array[self.written] = plane
        self._group.attrs[PROGRESS_ATTR] = self.written + 1

    def _abort(self) -> None:
        """Keep the partial store for ``--resume`` (hidden, named as partial), and say so."""
        warnings.warn(f"the unfinished output is kept as {self.tmp} for --resume; `df5t clean {self.path} --yes` "
                      "removes it", stacklevel=2)

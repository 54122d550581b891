"""MRC (cryo-EM and tomography) with mrcfile, memory-mapped both ways.

MRC has no unsigned 8-bit mode: uint8 data is stored widened as mode 6 (uint16) with a
label saying so, and narrowed back when read, so uint8 round-trips. Voxel sizes are in
ångström in the header, nanometres here. Our provenance is JSON in an extended header of
type ``DF5T``.
"""

from __future__ import annotations

import json
import mmap
from pathlib import Path

import numpy as np

from .base import (
    ImageFormatError,
    ImageMeta,
    Source,
    TempFileSink,
    check_grey,
    check_plane_size,
)

SUFFIXES = (".mrc", ".mrcs", ".rec", ".st", ".map")
UINT8_LABEL = "df5t: uint8 data widened to uint16"
PROVENANCE_EXTTYP = b"DF5T"
_MODES = {np.dtype(np.int8): 0, np.dtype(np.int16): 1, np.dtype(np.float32): 2, np.dtype(np.uint16): 6,
          np.dtype(np.uint8): 6}


class MrcSource(Source):
    def __init__(self, path: Path):
        import mrcfile

        self.path = path
        try:
            self._mrc = mrcfile.mmap(path, mode="r", permissive=False)
        except (ValueError, OSError, EOFError) as err:
            raise ImageFormatError(f"{path}: not a valid MRC file ({err})") from None
        data = self._mrc.data
        if data is None:
            self.close()
            raise ImageFormatError(f"{path}: MRC file holds no data")
        labels = [label.decode(errors="replace").strip() for label in self._mrc.header.label[: int(self._mrc.header.nlabl)]]
        self._narrow = data.dtype == np.uint16 and UINT8_LABEL in labels
        self.dtype = np.dtype(np.uint8) if self._narrow else data.dtype
        self.shape = tuple(data.shape)
        check_grey(path, self.shape, "ZYX"[-data.ndim :] if data.ndim <= 3 else "?" * data.ndim)
        check_plane_size(path, self.shape)
        self.meta = ImageMeta("ZYX" if data.ndim == 3 else "YX", _voxel_size(self._mrc.voxel_size, data.ndim))
        self.provenance = _provenance(self._mrc)

    def plane(self, z: int) -> np.ndarray:
        data = self._mrc.data
        plane = np.array(data if data.ndim == 2 else data[z])
        _release(data)
        return plane.astype(np.uint8) if self._narrow else plane

    def close(self) -> None:
        self._mrc.close()


class MrcSink(TempFileSink):
    def __init__(self, path, shape, dtype, meta, provenance):
        if np.dtype(dtype) not in _MODES:
            raise ImageFormatError(f"{path}: MRC cannot hold {np.dtype(dtype)} data; use uint8, uint16, int16 or float32")
        import mrcfile

        super().__init__(path, shape, dtype, meta, provenance)
        record = np.frombuffer(json.dumps(provenance).encode(), dtype="V1") if provenance else None
        self._mrc = mrcfile.new_mmap(self.tmp, shape=self.shape, mrc_mode=_MODES[self.dtype], overwrite=True,
                                     extended_header=record, exttyp=PROVENANCE_EXTTYP if provenance else None)
        if self.dtype == np.uint8:
            self._mrc.add_label(UINT8_LABEL)
        if provenance:
            self._mrc.add_label(f"df5t-deploy restore: {provenance.get('task', '')} seed {provenance.get('seed', '')}"[:80])
        voxel = self.meta.voxel_size_nm
        if voxel is not None:
            self._mrc.voxel_size = tuple(10.0 * (v if v is not None else 0.0) for v in voxel)
        self._stats = _RunningStats()

    def _write(self, z: int, plane: np.ndarray) -> None:
        data = self._mrc.data
        if data.ndim == 2:
            data[...] = plane
        else:
            data[z] = plane
        self._stats.add(plane)
        data.flush()  # on disk, then out of this process's memory
        _release(data)

    def _close(self) -> None:
        if self._stats.count:  # the header's statistics, gathered plane by plane (not by re-reading it all)
            header = self._mrc.header
            header.dmin, header.dmax, header.dmean, header.rms = self._stats.header_values()
        self._mrc.close()


class _RunningStats:
    """Minimum, maximum, mean and rms deviation of the planes written, as MRC's header wants."""

    def __init__(self):
        self.count, self.total, self.squares = 0, 0.0, 0.0
        self.low, self.high = np.inf, -np.inf

    def add(self, plane: np.ndarray) -> None:
        values = plane.astype(np.float64)
        self.count += values.size
        self.total += float(values.sum())
        self.squares += float(np.square(values).sum())
        self.low, self.high = min(self.low, float(values.min())), max(self.high, float(values.max()))

    def header_values(self) -> tuple[float, float, float, float]:
        mean = self.total / self.count
        return self.low, self.high, mean, float(np.sqrt(max(self.squares / self.count - mean * mean, 0.0)))


def _release(data: np.memmap) -> None:
    """Unmap the pages of a memory-mapped volume that this process has touched: they stay in
    the page cache (and on disk), but no longer count as this process's memory, which would
    otherwise grow with every plane read or written."""
    mapping = getattr(data, "_mmap", None)
    if mapping is not None and hasattr(mmap, "MADV_DONTNEED"):
        mapping.madvise(mmap.MADV_DONTNEED)


def _provenance(mrc) -> dict | None:
    """Ours: JSON in an extended header of type DF5T (other readers skip unknown types)."""
    if bytes(mrc.header.exttyp) != PROVENANCE_EXTTYP or mrc.extended_header is None:
        return None
    try:
        value = json.loads(mrc.extended_header.tobytes().decode())
    except (ValueError, UnicodeDecodeError):
        return None
    return value if isinstance(value, dict) else None


def _voxel_size(size, ndim: int) -> tuple[float, float, float | None] | None:
    """nm from the header's Angstrom; 0 means "not set" in MRC (anything else invalid is
    refused by ImageMeta)."""
    x, y, z = (float(v) / 10 for v in (size.x, size.y, size.z))
    if x == 0 and y == 0:
        return None
    return x, y, z if ndim == 3 and z != 0 else None

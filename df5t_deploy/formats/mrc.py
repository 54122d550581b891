"""MRC (cryo-EM and tomography) with mrcfile, memory-mapped both ways.

MRC has no unsigned 8-bit mode: uint8 data is stored widened as mode 6 (uint16) with a
label saying so, and narrowed back when read, so uint8 round-trips. Voxel sizes are in
ångström in the header, nanometres here (a 2-D image's z spacing is its x spacing: MRC2014
wants every cell length positive).

Our provenance is compact JSON in the header's text labels (``df5t:`` and 75 characters
each): MRC2014 registers no extended-header type for it, and ``mrcfile.validate`` refuses an
unregistered one. The ten labels hold the run identity, the model's sha256 and the main
settings, not all of the provenance a TIFF or zarr output carries. Outputs of earlier versions (an extended header of
type ``DF5T``) are still read.
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
UINT8_LABEL = "df5t uint8 data widened to uint16"
#: Read only: where earlier versions kept the provenance (an extended header of this type).
PROVENANCE_EXTTYP = b"DF5T"
PROVENANCE_LABEL = "df5t:"
_LABELS, _LABEL_CHARS = 10, 80
#: The provenance kept in the labels, most needed first, as many as fit.
LABELLED_PROVENANCE = ("software", "run_identity", "model_sha256", "task", "seed", "sigma0", "noise_model", "steps", "samples",
                       "walk", "eta", "final_step", "scale", "blur_sigma", "z_factor", "mask_of", "degraded")
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
        self._narrow = data.dtype == np.uint16 and any(label in (UINT8_LABEL, _OLD_UINT8_LABEL)
                                                      for label in labels)
        self.dtype = np.dtype(np.uint8) if self._narrow else data.dtype
        self.shape = tuple(data.shape)
        check_grey(path, self.shape, "ZYX"[-data.ndim :] if data.ndim <= 3 else "?" * data.ndim)
        check_plane_size(path, self.shape)
        self.meta = ImageMeta("ZYX" if data.ndim == 3 else "YX", _voxel_size(self._mrc.voxel_size, data.ndim))
        self.provenance = _provenance(self._mrc, labels)

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
        self._mrc = mrcfile.new_mmap(self.tmp, shape=self.shape, mrc_mode=_MODES[self.dtype], overwrite=True)
        labels = [UINT8_LABEL] if self.dtype == np.uint8 else []
        self._mrc.header.nlabl = 0  # mrcfile's "Created by" label: our provenance needs the room
        self._mrc.header.label[:] = b""
        for label in labels + _provenance_labels(provenance or {}, _LABELS - len(labels)):
            self._mrc.add_label(label)
        voxel = self.meta.voxel_size_nm
        if voxel is not None:
            x, y, z = voxel
            self._mrc.voxel_size = tuple(10.0 * v for v in (x, y, z if z is not None else x))
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


_OLD_UINT8_LABEL = "df5t: uint8 data widened to uint16"


def _provenance_labels(provenance: dict, labels: int) -> list[str]:
    """As much of ``provenance`` (in LABELLED_PROVENANCE's order) as fits ``labels`` labels."""
    payload = _LABEL_CHARS - len(PROVENANCE_LABEL)
    kept: dict = {}
    for key in LABELLED_PROVENANCE:
        if key not in provenance:
            continue
        text = json.dumps(kept | {key: provenance[key]}, separators=(",", ":"))
        if len(text) <= labels * payload and text.isascii():
            kept[key] = provenance[key]
    if not kept:
        return []
    text = json.dumps(kept, separators=(",", ":"))
    return [PROVENANCE_LABEL + text[i : i + payload] for i in range(0, len(text), payload)]


def _provenance(mrc, labels: list[str]) -> dict | None:
    """Ours: JSON in the labels marked ``df5t:`` (``labels``: the header's, decoded), or, from
    earlier versions, in an extended header of type DF5T."""
    text = "".join(label[len(PROVENANCE_LABEL):] for label in labels
                   if label.startswith(PROVENANCE_LABEL) and label != _OLD_UINT8_LABEL)
    if not text and bytes(mrc.header.exttyp) == PROVENANCE_EXTTYP and mrc.extended_header is not None:
        text = mrc.extended_header.tobytes().decode(errors="replace")
    try:
        value = json.loads(text) if text else None
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def _voxel_size(size, ndim: int) -> tuple[float, float, float | None] | None:
    """nm from the header's Angstrom; 0 means "not set" in MRC (anything else invalid is
    refused by ImageMeta)."""
    x, y, z = (float(v) / 10 for v in (size.x, size.y, size.z))
    if x == 0 and y == 0:
        return None
    return x, y, z if ndim == 3 and z != 0 else None

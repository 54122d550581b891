"""TIFF, BigTIFF and OME-TIFF with tifffile: read a page at a time, write pages as they come.

Voxel size is read from (in order) tifffile's JSON description (``voxel_size_nm_xyz``), OME
PhysicalSize{X,Y,Z}, ImageJ's spacing and resolution, or the resolution tags; it is written
to the JSON description (or OME metadata) and the resolution tags. The writer runs in a
thread fed with planes, so compression overlaps the restoration of the next plane.
"""

from __future__ import annotations

import json
import queue
import threading
from pathlib import Path

import numpy as np
import tifffile

from .base import (
    ImageFormatError,
    ImageMeta,
    Source,
    TempFileSink,
    check_grey,
    check_plane_size,
)

SUFFIXES = (".tif", ".tiff")
OME_SUFFIXES = (".ome.tif", ".ome.tiff")
PROVENANCE_TAG = 65000  # private tag holding the provenance JSON in OME-TIFF and ImageJ outputs
_NM_PER_UNIT = {"nm": 1.0, "µm": 1e3, "um": 1e3, "micron": 1e3, "mm": 1e6, "cm": 1e7, "Å": 0.1, "A": 0.1}
_NM_PER_CM = 1e7
_IMAGEJ_DTYPES = (np.dtype(np.uint8), np.dtype(np.uint16), np.dtype(np.float32))
_BIGTIFF_BYTES = 2**32 - 2**25  # classic TIFF offsets are 32-bit


def is_ome(path: Path) -> bool:
    return path.name.lower().endswith(OME_SUFFIXES)


class TiffSource(Source):
    """One image series of a TIFF file: the only one, or the one ``series`` names (a file
    with several is refused without a choice: dropping the others silently loses data)."""

    def __init__(self, path: Path, series: int | None = None):
        self.path = path
        self._tif: tifffile.TiffFile | None = None
        try:
            self._tif = tifffile.TiffFile(path)
            series = self._chosen_series(series)
            axes, shape = series.axes, tuple(series.shape)
            self._pages = series.pages
            self.dtype = np.dtype(series.dtype)
        except ImageFormatError:
            self.close()
            raise
        except Exception as err:  # tifffile parses untrusted bytes: any failure there is a damaged file
            self.close()
            raise ImageFormatError(f"{path}: not a readable TIFF, possibly truncated or damaged "
                                   f"({type(err).__name__}: {err})") from None
        if "S" in axes or "C" in axes:
            self.close()
            raise ImageFormatError(f"{path}: colour or multi-channel image (axes {axes}); convert to grey first")
        check_grey(path, shape, axes)
        check_plane_size(path, shape)
        self.shape = shape
        try:
            present = sum(page is not None for page in self._pages)  # tifffile pads missing pages with None
        except Exception as err:  # as above: a damaged page table
            self.close()
            raise ImageFormatError(f"{path}: not a readable TIFF, possibly truncated or damaged "
                                   f"({type(err).__name__}: {err})") from None
        if present < len(self._pages) or (self._tif.is_ome and present < self.planes):
            self.close()
            raise ImageFormatError(f"{path}: its metadata promises {self.planes} planes but the file holds "
                                   f"{present}; the file is incomplete or its metadata wrong")
        self._whole = None if len(self._pages) == self.planes else series  # not one page per plane
        try:
            voxel = _voxel_size(self._tif)
        except (TypeError, ValueError, KeyError) as err:
            raise ImageFormatError(f"{path}: its voxel size metadata is not numbers ({err}); fix the file's "
                                   "metadata") from None
        self.meta = ImageMeta("ZYX" if len(shape) == 3 else "YX", voxel, hyperstack=self._tif.is_imagej)
        self.provenance = _provenance(self._tif)

    def _chosen_series(self, index: int | None):
        all_series = self._tif.series
        if index is None and len(all_series) > 1:
            listing = "; ".join(f"{i}: {s.axes} {tuple(s.shape)}" for i, s in enumerate(all_series))
            raise ImageFormatError(f"{self.path}: holds {len(all_series)} image series ({listing}); choose one "
                                   "with --series N")
        index = index or 0
        if not 0 <= index < len(all_series):
            raise ImageFormatError(f"{self.path}: --series {index} does not exist; it holds series 0 to "
                                   f"{len(all_series) - 1}")
        return all_series[index]

    def plane(self, z: int) -> np.ndarray:
        try:
            if self._whole is not None:
                data = self._whole.asarray()
                return data if data.ndim == 2 else data[z]
            return self._pages[z].asarray()
        except Exception as err:  # tifffile decoding untrusted bytes: a damaged plane
            raise ImageFormatError(f"{self.path}: plane {z} cannot be read, the file may be truncated or damaged "
                                   f"({type(err).__name__}: {err})") from None

    def close(self) -> None:
        if self._tif is not None:
            self._tif.close()


def _provenance(tif: tifffile.TiffFile) -> dict | None:
    """Ours: in the JSON description (``df5t``), or in the private tag of an OME-TIFF."""
    shaped = tif.shaped_metadata[0] if tif.shaped_metadata else {}
    if isinstance(shaped.get("df5t"), dict):
        return shaped["df5t"]
    tag = tif.pages.first.tags.get(PROVENANCE_TAG)
    try:
        return json.loads(tag.value) if tag is not None else None
    except ValueError:
        return None


def _voxel_size(tif: tifffile.TiffFile) -> tuple[float, float, float | None] | None:
    shaped = tif.shaped_metadata[0] if tif.shaped_metadata else {}
    if "voxel_size_nm_xyz" in shaped:
        x, y, z = shaped["voxel_size_nm_xyz"]
        return float(x), float(y), None if z is None else float(z)
    if tif.is_ome:
        return _ome_voxel_size(tif.ome_metadata)
    page = tif.pages.first
    xres, yres, unit = (page.tags.get(name) for name in ("XResolution", "YResolution", "ResolutionUnit"))
    if xres is None or yres is None or xres.value[0] == 0 or yres.value[0] == 0:
        return None
    ij = tif.imagej_metadata or {}
    nm = _NM_PER_UNIT.get(ij.get("unit", ""), None) if ij else (_NM_PER_CM if unit and unit.value == 3 else None)
    if nm is None:
        return None
    x, y = nm * xres.value[1] / xres.value[0], nm * yres.value[1] / yres.value[0]
    z = float(ij["spacing"]) * nm if "spacing" in ij else None
    return x, y, z


def _ome_voxel_size(xml: str) -> tuple[float, float, float | None] | None:
    pixels = tifffile.xml2dict(xml).get("OME", {}).get("Image", {})
    pixels = (pixels[0] if isinstance(pixels, list) else pixels).get("Pixels", {})

    def size(axis: str) -> float | None:
        value = pixels.get(f"PhysicalSize{axis}")
        if value is None:
            return None
        return float(value) * _NM_PER_UNIT.get(pixels.get(f"PhysicalSize{axis}Unit", "µm"), 1e3)

    x, y = size("X"), size("Y")
    return None if x is None or y is None else (x, y, size("Z"))


class TiffSink(TempFileSink):
    """Writes planes through a background thread running tifffile.imwrite on an iterator."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._queue: queue.Queue = queue.Queue(maxsize=2)  # bounded: memory stays a few planes
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="df5t-tiff-writer", daemon=True)
        self._thread.start()

    def _planes(self):
        for _ in range(self.planes):
            plane = self._queue.get()
            if plane is None:  # aborted
                raise _Aborted
            yield plane

    def _run(self) -> None:
        try:
            imagej = self._as_hyperstack()
            tifffile.imwrite(self.tmp, data=self._planes(), shape=self.shape, dtype=self.dtype,
                             bigtiff=_nbytes(self.shape, self.dtype) > _BIGTIFF_BYTES,
                             compression=None if imagej else "zlib", photometric="minisblack",
                             **(self._hyperstack_kwargs() if imagej else self._metadata_kwargs()))
        except _Aborted:
            pass
        except BaseException as err:  # reported to the producer on its next call
            self._error = err

    def _as_hyperstack(self) -> bool:
        """An ImageJ hyperstack's restoration is one too, where ImageJ can hold it: a plain
        .tif of uint8, uint16 or float32 under 4 GB (ImageJ reads no BigTIFF, and no
        compression in hyperstacks)."""
        return (self.meta.hyperstack and not is_ome(self.path) and self.dtype in _IMAGEJ_DTYPES
                and _nbytes(self.shape, self.dtype) <= _BIGTIFF_BYTES)

    def _hyperstack_kwargs(self) -> dict:
        """ImageJ's own metadata (its description holds no JSON): the provenance goes into
        the private tag, as in an OME-TIFF."""
        metadata: dict = {"axes": self.meta.axes}
        kwargs: dict = {"imagej": True, "metadata": metadata}
        voxel = self.meta.voxel_size_nm
        if voxel is not None:
            metadata["unit"] = "nm"
            if voxel[2] is not None:
                metadata["spacing"] = voxel[2]
            kwargs["resolution"] = (1.0 / voxel[0], 1.0 / voxel[1])
        if self.provenance:
            kwargs["extratags"] = [(PROVENANCE_TAG, "s", 0, json.dumps(self.provenance), True)]
        return kwargs

    def _metadata_kwargs(self) -> dict:
        kwargs: dict = {}
        voxel = self.meta.voxel_size_nm
        if is_ome(self.path):
            metadata: dict = {"axes": self.meta.axes}
            if voxel is not None:
                metadata.update(PhysicalSizeX=voxel[0], PhysicalSizeXUnit="nm", PhysicalSizeY=voxel[1], PhysicalSizeYUnit="nm")
                if voxel[2] is not None:
                    metadata.update(PhysicalSizeZ=voxel[2], PhysicalSizeZUnit="nm")
            kwargs.update(ome=True, metadata=metadata)
            if self.provenance:
                kwargs["extratags"] = [(PROVENANCE_TAG, "s", 0, json.dumps(self.provenance), True)]
        else:
            description: dict = {"axes": self.meta.axes}
            if voxel is not None:
                description["voxel_size_nm_xyz"] = list(voxel)
            if self.provenance:
                description["df5t"] = self.provenance
            kwargs["metadata"] = description
        if voxel is not None:
            kwargs.update(resolution=(_NM_PER_CM / voxel[0], _NM_PER_CM / voxel[1]), resolutionunit="CENTIMETER")
        return kwargs

    def _write(self, z: int, plane: np.ndarray) -> None:
        self._put(plane)
        self._raise_writer_error()

    def _close(self) -> None:
        if self.written < self.planes:
            self._put(None)  # tells the writer to stop
        self._thread.join()
        self._raise_writer_error()

    def _put(self, item) -> None:
        """Hand an item to the writer, unless it has stopped (then its error tells why)."""
        while self._thread.is_alive():
            try:
                self._queue.put(item, timeout=0.1)
                return
            except queue.Full:
                continue

    def _raise_writer_error(self) -> None:
        if self._error is not None:
            raise ImageFormatError(f"{self.path}: writing failed: {self._error}") from self._error


class _Aborted(Exception):
    pass


def _nbytes(shape: tuple[int, ...], dtype: np.dtype) -> int:
    return int(np.prod(shape)) * np.dtype(dtype).itemsize

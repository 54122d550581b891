"""Reading and writing EM images: TIFF (2D and ZYX stacks, BigTIFF) and PNG.

Voxel size travels from input to output (TIFF resolution tags and the JSON description's
``voxel_size_nm_xyz``); outputs record the restoration's provenance and are written
atomically, so a failed or interrupted write leaves nothing behind.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import tifffile

from .files import atomic_path

TIFF_SUFFIXES = (".tif", ".tiff")
PNG_SUFFIXES = (".png",)
SUPPORTED = TIFF_SUFFIXES + PNG_SUFFIXES
_NM_PER_CM = 1e7
_BIGTIFF_BYTES = 2**32 - 2**25  # classic TIFF offsets are 32-bit


class ImageFormatError(ValueError):
    """The file cannot be read or written as an EM image; the message says why."""


@dataclass(frozen=True)
class ImageMeta:
    axes: str  # "YX" or "ZYX"
    voxel_size_nm: tuple[float, float, float | None] | None = None  # (x, y, z); z unknown: None

    def scaled(self, xy: float = 1.0, z: float = 1.0) -> "ImageMeta":
        """The voxel size after resampling by these factors (sr: xy = 1/R; isotropic: z = 1/k)."""
        if self.voxel_size_nm is None:
            return self
        x, y, zz = self.voxel_size_nm
        return replace(self, voxel_size_nm=(x * xy, y * xy, None if zz is None else zz * z))


def _suffix(path: Path) -> str:
    suffix = path.suffix.lower()
    if suffix not in SUPPORTED:
        raise ImageFormatError(
            f"{path}: unsupported file type {suffix or '(none)'}; supported: {', '.join(SUPPORTED)}"
        )
    return suffix


def read_image(path: str | Path) -> tuple[np.ndarray, ImageMeta]:
    """A grey YX image or ZYX stack and its metadata."""
    path = Path(path)
    if not path.is_file():
        raise ImageFormatError(f"{path}: no such file")
    reader = _read_png if _suffix(path) in PNG_SUFFIXES else _read_tiff
    array, meta = reader(path)
    if array.ndim not in (2, 3):
        raise ImageFormatError(
            f"{path}: array of shape {array.shape} (axes {meta.axes}); expected a grey YX image "
            "or a ZYX stack (split channels or time points first)"
        )
    return array, meta


def _read_tiff(path: Path) -> tuple[np.ndarray, ImageMeta]:
    try:
        with tifffile.TiffFile(path) as tif:
            series = tif.series[0]
            array = series.asarray()
            axes = series.axes
            voxel = _tiff_voxel_size(tif)
    except (tifffile.TiffFileError, ValueError, OSError, EOFError) as err:
        raise ImageFormatError(f"{path}: not a readable TIFF, possibly truncated ({err})") from None
    if "S" in axes or "C" in axes:
        raise ImageFormatError(f"{path}: colour or multi-channel image (axes {axes}); convert to grey first")
    axes = {2: "YX", 3: "ZYX"}.get(array.ndim, axes)
    return array, ImageMeta(axes, voxel)


def _tiff_voxel_size(tif: tifffile.TiffFile) -> tuple[float, float, float | None] | None:
    shaped = tif.shaped_metadata[0] if tif.shaped_metadata else {}
    if "voxel_size_nm_xyz" in shaped:
        x, y, z = shaped["voxel_size_nm_xyz"]
        return float(x), float(y), None if z is None else float(z)
    page = tif.pages[0]
    xres, yres, unit = (page.tags.get(name) for name in ("XResolution", "YResolution", "ResolutionUnit"))
    if xres is None or yres is None or unit is None or unit.value != 3:  # 3 = centimetre
        return None
    x = _NM_PER_CM * xres.value[1] / xres.value[0]
    y = _NM_PER_CM * yres.value[1] / yres.value[0]
    return (x, y, None)


def _read_png(path: Path) -> tuple[np.ndarray, ImageMeta]:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            im.load()
            if im.mode not in ("L", "I;16", "I;16B", "I"):
                raise ImageFormatError(f"{path}: PNG mode {im.mode}; a grey (L or 16-bit) PNG is expected")
            array = np.asarray(im)
    except (UnidentifiedImageError, OSError, SyntaxError) as err:
        raise ImageFormatError(f"{path}: not a readable PNG, possibly truncated ({err})") from None
    if array.dtype.kind == "i":
        array = array.astype(np.uint16)
    return array, ImageMeta("YX")


def write_image(path: str | Path, array: np.ndarray, meta: ImageMeta, provenance: dict | None = None) -> None:
    """Write atomically: the file appears complete, or not at all."""
    path = Path(path)
    suffix = _suffix(path)
    with atomic_path(path) as tmp:
        if suffix in PNG_SUFFIXES:
            _write_png(tmp, array, provenance)
        else:
            _write_tiff(tmp, array, meta, provenance)


def _write_tiff(path: Path, array: np.ndarray, meta: ImageMeta, provenance: dict | None) -> None:
    description: dict = {"axes": meta.axes}
    kwargs: dict = {}
    if meta.voxel_size_nm is not None:
        x, y, z = meta.voxel_size_nm
        description["voxel_size_nm_xyz"] = [x, y, z]
        kwargs.update(resolution=(_NM_PER_CM / x, _NM_PER_CM / y), resolutionunit="CENTIMETER")
    if provenance:
        description["df5t"] = provenance
    tifffile.imwrite(
        path, array, metadata=description, bigtiff=array.nbytes > _BIGTIFF_BYTES,
        compression="zlib", **kwargs,
    )


def _write_png(path: Path, array: np.ndarray, provenance: dict | None) -> None:
    from PIL import Image, PngImagePlugin

    if array.ndim != 2 or array.dtype not in (np.uint8, np.uint16):
        raise ImageFormatError(
            f"PNG holds 2D uint8 or uint16 images, not {array.dtype} {array.shape}; write a TIFF instead"
        )
    info = PngImagePlugin.PngInfo()
    if provenance:
        info.add_text("df5t", json.dumps(provenance))
    Image.fromarray(array).save(path, format="PNG", pnginfo=info)


def check_writable(path: str | Path, dtype: np.dtype, ndim: int) -> None:
    """Fail before hours of compute if the output cannot hold the result."""
    path = Path(path)
    if _suffix(path) in PNG_SUFFIXES and (ndim != 2 or np.dtype(dtype) not in (np.uint8, np.uint16)):
        raise ImageFormatError(
            f"{path}: PNG holds 2D uint8 or uint16 images, the result is {np.dtype(dtype)} with "
            f"{ndim} axes; write a .tif instead"
        )
    if not path.parent.exists():
        raise ImageFormatError(f"{path}: folder {path.parent} does not exist")

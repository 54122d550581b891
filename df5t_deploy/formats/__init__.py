"""EM image formats: TIFF/BigTIFF/OME-TIFF, PNG, MRC, zarr/OME-Zarr.

``open_source`` reads plane by plane, ``create_sink`` writes plane by plane and atomically;
``read_image`` and ``write_image`` are the whole-array shortcuts.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from . import mrc, png, tiff, zarr_format
from .base import ImageFormatError, ImageMeta, Sink, Source
from .zarr_format import ZarrLayout

_FORMATS = (
    (tiff.SUFFIXES, tiff.TiffSource, tiff.TiffSink),
    (png.SUFFIXES, png.PngSource, png.PngSink),
    (mrc.SUFFIXES, mrc.MrcSource, mrc.MrcSink),
    (zarr_format.SUFFIXES, zarr_format.ZarrSource, zarr_format.ZarrSink),
)
SUPPORTED = tuple(s for suffixes, _, _ in _FORMATS for s in suffixes)
#: What an output may be written as (folder runs' --format).
OUTPUT_FORMATS = ("tif", "ome.tif", "png", "mrc", "zarr")


def _format_of(path: Path):
    suffix = path.suffix.lower()
    for suffixes, source, sink in _FORMATS:
        if suffix in suffixes:
            return source, sink
    raise ImageFormatError(f"{path}: unsupported file type {suffix or '(none)'}; supported: {', '.join(SUPPORTED)}")


def open_source(path: str | Path, series: int | None = None) -> Source:
    """The image or stack at ``path``; ``series``: which image of a multi-series TIFF."""
    path = Path(path)
    source, _ = _format_of(path)
    if not path.exists():
        raise ImageFormatError(f"{path}: no such file")
    if series is not None and source is not tiff.TiffSource:
        raise ImageFormatError(f"{path}: --series chooses among the images of a TIFF file; this is not one")
    try:
        return source(path, series) if source is tiff.TiffSource else source(path)
    except ImageFormatError as err:
        if str(path) in str(err):
            raise
        raise ImageFormatError(f"{path}: {err}") from None


def create_sink(path: str | Path, shape, dtype, meta: ImageMeta, provenance: dict | None = None,
                resume: bool = False, layout: ZarrLayout | None = None) -> Sink:
    """``layout``: chunks and pyramid levels of a zarr output (others take none)."""
    path = Path(path)
    _, sink = _format_of(path)
    check_layout_applies(path, layout, resume)  # a zarr sink checks its layout against the shape itself
    if sink is not zarr_format.ZarrSink:
        return sink(path, shape, dtype, meta, provenance)
    return sink(path, shape, dtype, meta, provenance, resume=resume, layout=layout)


def check_layout_applies(path: str | Path, layout: ZarrLayout | None, resume: bool = False) -> None:
    """Refuse --resume, --chunks and --pyramid for an output that is not zarr (the shape
    of the result is not needed for that: this runs before anything is loaded)."""
    path = Path(path)
    if _format_of(path)[1] is zarr_format.ZarrSink:
        return
    if resume:
        raise ImageFormatError(f"{path}: --resume works for zarr outputs only")
    if layout is not None and layout != ZarrLayout():
        raise ImageFormatError(f"{path}: --chunks and --pyramid lay out zarr outputs only; write a .zarr")


def check_writable(path: str | Path, dtype, shape: tuple[int, ...], layout: ZarrLayout | None = None,
                   resume: bool = False) -> None:
    """Fail before hours of compute, and before anything is created, if the output cannot
    hold the result or take the layout asked for."""
    path = Path(path)
    _, sink = _format_of(path)
    if sink is png.PngSink:
        png.check_png(path, dtype, len(shape))
    check_layout_applies(path, layout, resume)
    if sink is zarr_format.ZarrSink:
        (layout or ZarrLayout()).check(tuple(shape))
    if not path.parent.exists():
        raise ImageFormatError(f"{path}: folder {path.parent} does not exist")


def read_provenance(path: str | Path) -> dict | None:
    """What df5t-deploy recorded in a file it wrote (every format), or None."""
    with open_source(path) as source:
        return source.provenance


def read_image(path: str | Path, series: int | None = None) -> tuple[np.ndarray, ImageMeta]:
    with open_source(path, series) as source:
        return source.read(), source.meta


def write_image(path: str | Path, array: np.ndarray, meta: ImageMeta, provenance: dict | None = None) -> None:
    with create_sink(path, array.shape, array.dtype, meta, provenance) as sink:
        for plane in array if array.ndim == 3 else [array]:
            sink.write_plane(plane)


__all__ = ["ImageFormatError", "ImageMeta", "OUTPUT_FORMATS", "Sink", "Source", "SUPPORTED", "ZarrLayout", "check_layout_applies", "check_writable",
           "create_sink", "open_source", "read_image", "read_provenance", "write_image"]

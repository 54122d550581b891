"""PNG (2D grey, 8 or 16 bit) with Pillow; provenance in a text chunk."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from .base import ImageFormatError, ImageMeta, Source, TempFileSink, check_plane_size

SUFFIXES = (".png",)
DTYPES = (np.uint8, np.uint16)


class PngSource(Source):
    def __init__(self, path: Path):
        from PIL import Image, UnidentifiedImageError

        self.path = path
        try:
            with Image.open(path) as im:
                check_plane_size(path, im.size[::-1])  # from the header, before decoding
                im.load()
                if im.mode not in ("L", "I;16", "I;16B", "I"):
                    raise ImageFormatError(f"{path}: PNG mode {im.mode}; a grey (8 or 16 bit) PNG is expected")
                array = np.asarray(im)
                recorded = im.text.get("df5t") if hasattr(im, "text") else None
        except Image.DecompressionBombError as err:  # raised from the header, before decoding
            raise ImageFormatError(f"{path}: declares an image too large to read safely ({err})") from None
        except (UnidentifiedImageError, OSError, SyntaxError) as err:
            raise ImageFormatError(f"{path}: not a readable PNG, possibly truncated ({err})") from None
        self._array = array.astype(np.uint16) if array.dtype.kind == "i" else array
        self.shape, self.dtype, self.meta = self._array.shape, self._array.dtype, ImageMeta("YX")
        self.provenance = _json_or_none(recorded)

    def plane(self, z: int) -> np.ndarray:
        return self._array


def _json_or_none(text: str | None) -> dict | None:
    try:
        value = json.loads(text) if text else None
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


class PngSink(TempFileSink):
    def __init__(self, path, shape, dtype, meta, provenance):
        check_png(path, dtype, len(shape))
        super().__init__(path, shape, dtype, meta, provenance)
        self._plane = None

    def _write(self, z: int, plane: np.ndarray) -> None:
        self._plane = plane

    def _close(self) -> None:
        if self._plane is None:
            return
        from PIL import Image, PngImagePlugin

        info = PngImagePlugin.PngInfo()
        if self.provenance:
            info.add_text("df5t", json.dumps(self.provenance))
        Image.fromarray(self._plane).save(self.tmp, format="PNG", pnginfo=info)


def check_png(path: Path, dtype, ndim: int) -> None:
    if ndim != 2 or np.dtype(dtype) not in DTYPES:
        raise ImageFormatError(
            f"{path}: PNG holds 2D uint8 or uint16 images, not {np.dtype(dtype)} with {ndim} axes; "
            "write a .tif instead"
        )

"""Super-tiles: planes too large to hold the sampler's state are restored region by region.

A region is restored with per-step blending of its tiles like any plane; neighbouring
regions overlap by a margin of a few tiles and are blended with the same smooth windows at
the end. Their noise uses global coordinates, so the overlap evolves alike in both. Regions
are laid out on the measurement grid and scaled by the task's factor (sr), so they always
hold whole blocks.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .tiling import axis_window, tile_starts

#: Default largest region side in restoration-grid pixels: about 0.2 GB of sampler state.
DEFAULT_MAX_REGION = 4096
MARGIN_TILES = 2


@dataclass(frozen=True)
class Region:
    y: int  # measurement-grid position and size
    x: int
    height: int
    width: int
    wy: np.ndarray  # restoration-grid blending weights along y and x
    wx: np.ndarray

    def measurement(self, planes: np.ndarray) -> np.ndarray:
        return planes[..., self.y : self.y + self.height, self.x : self.x + self.width]


def _axis(length: int, size: int, margin: int) -> list[int]:
    return [0] if length <= size else tile_starts(length, size, margin)


def layout(measurement_shape: tuple[int, int], factor: int, tile: int, max_region: int) -> list[Region]:
    """Regions covering a plane whose measurement grid is ``measurement_shape``."""
    if max_region < 4 * tile:
        raise ValueError(f"--max-region {max_region} must be at least 4 tiles ({4 * tile} px)")
    size = max_region // factor
    margin = -(-MARGIN_TILES * tile // factor)  # in measurement pixels, rounded up
    h, w = measurement_shape
    ys, xs = _axis(h, size, margin), _axis(w, size, margin)
    rh, rw = min(h, size), min(w, size)
    regions = []
    for y in ys:
        for x in xs:
            wy = np.repeat(axis_window(y, ys, rh), factor) if len(ys) > 1 else np.ones(rh * factor)
            wx = np.repeat(axis_window(x, xs, rw), factor) if len(xs) > 1 else np.ones(rw * factor)
            regions.append(Region(y, x, rh, rw, wy, wx))
    return regions

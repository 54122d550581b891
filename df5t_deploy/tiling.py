"""Seam-free tiling: the network runs on overlapping tiles at every sampler step and the
predictions are blended with smooth windows before the step, so a region evolves as one image.

A region smaller than a tile is reflect-padded to it; tiles from all planes of a batch of
regions go through the backend together, ``batch`` at a time.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

Network = Callable[[np.ndarray, np.ndarray], np.ndarray]  # (x [B,3,T,T], t [B]) -> eps


def tile_starts(length: int, tile: int, overlap: int) -> list[int]:
    """Evenly spread starts covering [0, length) with overlaps of at least ``overlap``."""
    if length <= tile:
        return [0]
    stride = tile - overlap
    count = math.ceil((length - tile) / stride) + 1
    return [round(i * (length - tile) / (count - 1)) for i in range(count)]


def _rising(width: int) -> np.ndarray:
    """Raised-cosine ramp from exactly 0 to exactly 1 over ``width`` pixels.

    A tile's outermost pixel gets weight 0, so convolution padding at the tile edge never
    reaches the blend; a neighbour's falling ramp over the same pixels sums with it to 1.
    """
    if width == 1:
        return np.array([0.5])
    return 0.5 - 0.5 * np.cos(np.pi * np.arange(width) / (width - 1))


@dataclass(frozen=True)
class TileGrid:
    """Where the tiles of one region lie, and their blending windows."""

    height: int
    width: int
    tile: int
    overlap: int
    ys: list[int] = field(init=False)
    xs: list[int] = field(init=False)

    def __post_init__(self):
        if not 0 <= self.overlap < self.tile:
            raise ValueError(f"overlap must be in [0, tile={self.tile}), got {self.overlap}")
        object.__setattr__(self, "ys", tile_starts(self.padded[0], self.tile, self.overlap))
        object.__setattr__(self, "xs", tile_starts(self.padded[1], self.tile, self.overlap))

    @property
    def padded(self) -> tuple[int, int]:
        return max(self.height, self.tile), max(self.width, self.tile)

    @property
    def padding(self) -> tuple[tuple[int, int], tuple[int, int]]:
        """Reflect padding (before, after) per axis that brings a small region up to a tile."""
        dy, dx = self.padded[0] - self.height, self.padded[1] - self.width
        return (dy // 2, dy - dy // 2), (dx // 2, dx - dx // 2)

    @property
    def positions(self) -> list[tuple[int, int]]:
        return [(y, x) for y in self.ys for x in self.xs]

    def window(self, y: int, x: int) -> np.ndarray:
        """Blending weights of the tile at (y, x): ramps only where a neighbour overlaps."""
        wy = self._axis_window(y, self.ys)
        wx = self._axis_window(x, self.xs)
        return np.outer(wy, wx).astype(np.float32)

    def _axis_window(self, start: int, starts: list[int]) -> np.ndarray:
        """1 inside; ramps over the overlaps with the previous and next tile, if any."""
        i = starts.index(start)
        before = min(starts[i - 1] + self.tile - start, self.tile // 2) if i > 0 else 0
        after = min(start + self.tile - starts[i + 1], self.tile // 2) if i + 1 < len(starts) else 0
        w = np.ones(self.tile)
        if before > 0:
            w[:before] = _rising(before)
        if after > 0:
            w[self.tile - after :] *= _rising(after)[::-1]
        return w


class BlendedDenoiser:
    """eps for whole regions [P, 3, H, W] from a tile network, blended at every call."""

    def __init__(self, network: Network, tile: int, overlap: int, batch: int):
        if batch < 1:
            raise ValueError(f"batch must be >= 1, got {batch}")
        self.network = network
        self.tile = tile
        self.overlap = overlap
        self.batch = batch
        self.tiles_run = 0

    def grid(self, height: int, width: int) -> TileGrid:
        return TileGrid(height, width, self.tile, self.overlap)

    def tiles_per_call(self, planes: int, height: int, width: int) -> int:
        return planes * len(self.grid(height, width).positions)

    def __call__(self, x: np.ndarray, t: int) -> np.ndarray:
        planes, _, height, width = x.shape
        grid = self.grid(height, width)
        (pt, pb), (pl, pr) = grid.padding
        padded = np.pad(x, ((0, 0), (0, 0), (pt, pb), (pl, pr)), mode="reflect") if pt + pb + pl + pr else x
        jobs = [(p, y, xx) for p in range(planes) for (y, xx) in grid.positions]
        windows = {pos: grid.window(*pos) for pos in grid.positions}
        acc = np.zeros((planes, 3, *grid.padded), dtype=np.float32)
        weight = np.zeros(grid.padded, dtype=np.float32)
        for (y, xx), w in windows.items():
            weight[y : y + self.tile, xx : xx + self.tile] += w
        for chunk_start in range(0, len(jobs), self.batch):
            chunk = jobs[chunk_start : chunk_start + self.batch]
            tiles = np.stack([padded[p, :, y : y + self.tile, xx : xx + self.tile] for p, y, xx in chunk])
            eps = self.network(tiles, np.full(len(chunk), t, dtype=np.float32))
            for (p, y, xx), e in zip(chunk, eps):
                acc[p, :, y : y + self.tile, xx : xx + self.tile] += e * windows[y, xx]
            self.tiles_run += len(chunk)
        acc /= weight
        return acc[:, :, pt : pt + height, pl : pl + width]

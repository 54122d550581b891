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

    def axis_windows(self, y: int, x: int) -> tuple[np.ndarray, np.ndarray]:
        """The separable blending weights of the tile at (y, x): rows, columns."""
        return axis_window(y, self.ys, self.tile), axis_window(x, self.xs, self.tile)

    def window(self, y: int, x: int) -> np.ndarray:
        """Blending weights of the tile at (y, x): ramps only where a neighbour overlaps."""
        return np.outer(*self.axis_windows(y, x)).astype(np.float32)

    def tile_slices(self, y: int, x: int) -> tuple[slice, slice]:
        """The rows and columns of the padded region that the tile at (y, x) covers."""
        return slice(y, y + self.tile), slice(x, x + self.tile)

    def crop(self, padded: np.ndarray) -> np.ndarray:
        """[..., H, W] of the region from [..., Hp, Wp] of its padded grid."""
        (pt, _), (pl, _) = self.padding
        return padded[..., pt : pt + self.height, pl : pl + self.width]



def axis_window(start: int, starts: list[int], size: int) -> np.ndarray:
    """Weights along one axis of the piece at ``start`` (pieces of ``size`` at ``starts``):
    1 inside, ramps over the overlaps with the previous and next piece, if any."""
    i = starts.index(start)
    before = min(starts[i - 1] + size - start, size // 2) if i > 0 else 0
    after = min(start + size - starts[i + 1], size // 2) if i + 1 < len(starts) else 0
    w = np.ones(size)
    if before > 0:
        w[:before] = _rising(before)
    if after > 0:
        w[size - after :] *= _rising(after)[::-1]
    return w


Job = tuple[int, int, int]  # (plane, top, left) of a tile in the padded region


def gather_tiles(padded: np.ndarray, jobs: list[Job], tile: int) -> np.ndarray:
    """Tiles [J, 3, T, T] cut from reflect-padded regions [P, 3, Hp, Wp]."""
    return np.stack([padded[p, :, y : y + tile, x : x + tile] for p, y, x in jobs])


class WindowedSum:
    """Overlapping pieces blended by their windows: the sum of piece x window over the sum of
    the windows. The one blend: tiles at every sampler step (``BlendedDenoiser``), super-tile
    regions at the end (the Restorer), and the numpy twin of the blend kernel."""

    def __init__(self, shape: tuple[int, ...]):
        self.total = np.zeros(shape, np.float32)  # [..., H, W]
        self.weight = np.zeros(shape[-2:], np.float32)  # [H, W]

    def cover(self, rows: slice, cols: slice, window: np.ndarray) -> None:
        """A piece's window over [rows, cols] (once per position, whatever the leading axes)."""
        self.weight[rows, cols] += window

    def add(self, rows: slice, cols: slice, values: np.ndarray, window: np.ndarray, lead: tuple = ()) -> None:
        """values [..., rows, cols] weighted by ``window``, into the leading index ``lead``
        (e.g. one plane's channels: ``lead=(plane,)``)."""
        self.total[(*lead, ..., rows, cols)] += values * window

    def mean(self) -> np.ndarray:
        return self.total / self.weight


def blend_tiles(eps: np.ndarray, jobs: list[Job], grid: TileGrid, planes: int) -> np.ndarray:
    """eps [P, 3, H, W] from tiles' eps [J, 3, T, T] at ``jobs``: their windowed mean over the
    padded region, cropped. Twin of the df5t_blend_tiles kernels."""
    blend = WindowedSum((planes, 3, *grid.padded))
    for y, x in grid.positions:
        blend.cover(*grid.tile_slices(y, x), grid.window(y, x))
    for (p, y, x), e in zip(jobs, eps, strict=True):
        blend.add(*grid.tile_slices(y, x), e, grid.window(y, x), lead=(p,))
    return grid.crop(blend.mean())


class NetworkOutputError(RuntimeError):
    """The network returned NaN or Inf: a damaged model, or not a DF5T noise predictor."""


def check_network_output(eps: np.ndarray, t: int) -> None:
    """Refuse non-finite eps (it would turn into an all-black or all-white result, silently)."""
    if not np.isfinite(eps).all():
        raise NetworkOutputError(f"the network returned NaN or Inf at timestep {int(t)}: the model file is damaged "
                                 "or is not a DF5T noise predictor")


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

    def __call__(self, x: np.ndarray, t: int, on_tiles: Callable[[int], None] | None = None) -> np.ndarray:
        """``on_tiles(n)``: told after each network call of its ``n`` tiles (live progress
        within a step, which on a large image takes minutes)."""
        planes, _, height, width = x.shape
        grid = self.grid(height, width)
        (pt, pb), (pl, pr) = grid.padding
        padded = np.pad(x, ((0, 0), (0, 0), (pt, pb), (pl, pr)), mode="reflect") if pt + pb + pl + pr else x
        jobs = [(p, y, xx) for p in range(planes) for (y, xx) in grid.positions]
        windows = {position: grid.window(*position) for position in grid.positions}
        blend = WindowedSum((planes, 3, *grid.padded))
        for (y, xx), window in windows.items():
            blend.cover(*grid.tile_slices(y, xx), window)
        for start in range(0, len(jobs), self.batch):  # as blend_tiles, a chunk of tiles at a time
            chunk = jobs[start : start + self.batch]
            eps = self._call(gather_tiles(padded, chunk, self.tile), t)
            for (p, y, xx), e in zip(chunk, eps, strict=True):
                blend.add(*grid.tile_slices(y, xx), e, windows[y, xx], lead=(p,))
            self.tiles_run += len(chunk)
            if on_tiles is not None:
                on_tiles(len(chunk))
        return grid.crop(blend.mean())

    def _call(self, tiles: np.ndarray, t: int) -> np.ndarray:
        """eps for up to ``batch`` tiles, from a network call of exactly ``batch`` tiles (the
        last chunk padded with zeros). A backend's kernels change with the batch shape, and
        with them the rounding, but not with what the other tiles hold; so a tile's eps does
        not depend on which tiles share its call: how planes or frames are grouped changes no
        bit of a result."""
        count = len(tiles)
        if count < self.batch:
            tiles = np.concatenate([tiles, np.zeros((self.batch - count, *tiles.shape[1:]), tiles.dtype)])
        eps = self.network(tiles, np.full(self.batch, t, dtype=np.float32))[:count]
        check_network_output(eps, t)
        return eps

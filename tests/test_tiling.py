"""Seam-free tiling: windows, coverage, and a positive control for seams."""

from __future__ import annotations

import numpy as np
import pytest
import tifffile
from onnx_models import local_conv_model, tile_mean_model

from df5t_deploy.api import Restorer
from df5t_deploy.artifact import Schedule
from df5t_deploy.backends.onnxruntime_backend import OnnxRuntimeBackend
from df5t_deploy.noise import gaussian_field
from df5t_deploy.operators import Identity
from df5t_deploy.sampler import DDRM, SamplerSettings, run_ddrm, state_to_image
from df5t_deploy.tiling import TileGrid, tile_starts


@pytest.mark.parametrize("length, tile, overlap", [(64, 64, 8), (200, 64, 8), (129, 32, 4), (1000, 256, 32)])
def test_tile_starts_cover_with_enough_overlap(length, tile, overlap):
    starts = tile_starts(length, tile, overlap)
    assert starts[0] == 0 and starts[-1] + tile == length
    assert all(b - a <= tile - overlap for a, b in zip(starts, starts[1:]))


def test_windows_are_positive_everywhere_and_zero_at_shared_edges():
    grid = TileGrid(150, 170, 64, 8)
    total = np.zeros(grid.padded)
    for y, x in grid.positions:
        w = grid.window(y, x)
        total[y : y + 64, x : x + 64] += w
        if y > 0:
            assert np.all(w[0] == 0)
        if x + 64 < 170:
            assert np.all(w[:, -1] == 0)
    assert total.min() > 0.99  # a partition of unity where overlaps are exact, never a hole


@pytest.fixture(scope="module")
def em_image(em_dir):
    return tifffile.imread(em_dir / "micrograph_vemstitch-mussel_tile1_2_2_1768x2048.tif")[300:500, 500:700]


def _lines(starts: list[int], size: int, length: int) -> list[int]:
    return [line for line in sorted({*starts[1:], *(s + size for s in starts[:-1])}) if 0 < line < length]


def seam_ratio(image: np.ndarray, starts: list[int], tile: int, col_starts: list[int] | None = None) -> float:
    """Mean |gradient| across tile-boundary lines over the mean |gradient| elsewhere."""
    col_starts = starts if col_starts is None else col_starts
    gy = np.abs(np.diff(image.astype(np.float64), axis=0))  # gy[i] is across the line at row i+1
    gx = np.abs(np.diff(image.astype(np.float64), axis=1))
    on_y = np.zeros(gy.shape[0], bool)
    on_y[[line - 1 for line in _lines(starts, tile, image.shape[0])]] = True
    on_x = np.zeros(gx.shape[1], bool)
    on_x[[line - 1 for line in _lines(col_starts, tile, image.shape[1])]] = True
    boundary = np.concatenate([gy[on_y].ravel(), gx[:, on_x].ravel()])
    elsewhere = np.concatenate([gy[~on_y].ravel(), gx[:, ~on_x].ravel()])
    return boundary.mean() / elsewhere.mean()


def _stitched_at_end(model, image, tile, sigma0, steps, seed):
    """The published way, test-only: each tile restored alone, tiles averaged at the end."""
    backend = OnnxRuntimeBackend(model)
    from df5t_deploy.intensity import intensity_map_for

    intensity = intensity_map_for(image)
    y = intensity.to_model(image)
    starts = tile_starts(image.shape[0], tile, tile // 8)
    out = np.zeros(image.shape)
    count = np.zeros(image.shape)
    for top in starts:
        for left in starts:
            ddrm = DDRM(Identity((tile, tile)), Schedule(1000), SamplerSettings(sigma0=sigma0, steps=steps))

            def noise(step, top=top, left=left):
                return gaussian_field(seed, step=step, y0=top, x0=left, height=tile, width=tile)[None]

            def eps(x, t):
                return backend(x, np.full(len(x), t, np.float32))

            crop = y[None, top : top + tile, left : left + tile]
            out[top : top + tile, left : left + tile] += state_to_image(run_ddrm(ddrm, crop, eps, noise))[0]
            count[top : top + tile, left : left + tile] += 1
    return intensity.from_unit(out / count), starts


def test_no_seams_with_per_step_blending_and_a_positive_control(tmp_path, em_image):
    """A noisy measurement (sigma0 = 1) lets the tile-dependent model shape the result; the
    mean of 4 samples keeps sampler noise from drowning the metric."""
    model = tile_mean_model(tmp_path / "mean.onnx", 64, gain=1.0)
    image = em_image.astype(np.float32)
    blended = Restorer(model, sigma0=1.0, steps=10, samples=4).restore(image)
    runs = [_stitched_at_end(model, image, 64, 1.0, 10, seed) for seed in range(4)]
    stitched, starts = np.mean([r[0] for r in runs], axis=0), runs[0][1]
    assert seam_ratio(blended, starts, 64) <= 1.05
    assert seam_ratio(stitched, starts, 64) > 1.05  # the metric does see seams


def test_local_model_gives_the_same_result_for_any_tile(tmp_path, em_image):
    image = em_image.astype(np.float32)
    results = []
    for tile in (64, 128):
        model = local_conv_model(tmp_path / f"conv{tile}.onnx", tile)
        results.append(Restorer(model, sigma0=0.2, steps=10, seed=5).restore_full(image))
    scale = results[0].intensity.high - results[0].intensity.low
    # measured: 3.4e-5 of the range (float32 rounding of blends over other tile layouts);
    # a seam or a misplaced tile shows as 1e-2 and more
    assert np.abs(results[0].image - results[1].image).max() / scale < 1e-4


def test_image_smaller_than_a_tile(tmp_path, em_image):
    model = tile_mean_model(tmp_path / "mean.onnx", 64)
    out = Restorer(model, sigma0=0.2, steps=5).restore(em_image[:20, :45])
    assert out.shape == (20, 45) and out.dtype == np.uint8


def test_super_tiles_of_a_large_plane_leave_no_seams(tmp_path, em_dir):
    """Planes over --max-region go by super-tiles blended over a 2-tile margin."""
    from df5t_deploy.regions import layout

    image = tifffile.imread(em_dir / "micrograph_vemstitch-mussel_tile1_2_2_1768x2048.tif")[300:560, 500:800]
    image = image.astype(np.float32)
    model = tile_mean_model(tmp_path / "mean32.onnx", 32, gain=1.0)
    regions = layout(image.shape, 1, 32, 128)
    assert len(regions) == 16
    whole = Restorer(model, sigma0=1.0, steps=10, samples=4).restore(image)
    split = Restorer(model, sigma0=1.0, steps=10, samples=4, max_region=128).restore(image)
    ys, xs = sorted({r.y for r in regions}), sorted({r.x for r in regions})
    assert seam_ratio(split, ys, 128, xs) <= 1.05
    assert np.abs(split - whole).mean() < 0.02 * np.ptp(image)  # regions change the result only slightly


def test_super_tiles_hold_whole_blocks_for_super_resolution(tmp_path, em_image):
    model = tile_mean_model(tmp_path / "mean32.onnx", 32)
    out = Restorer(model, "sr", scale=3, sigma0=0.5, steps=3, max_region=128).restore(em_image[:70, :95])
    assert out.shape == (210, 285)

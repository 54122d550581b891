"""3D isotropic restoration (REFERENCE.md section 5): an anisotropic stack whose z spacing is
k times its xy spacing is the isotropic volume box-averaged over k planes and subsampled, so
acquired plane i is the mean of isotropic planes [i*k, (i+1)*k).

DDRM restores every XZ plane (streaming over y) and every YZ plane (streaming over x) with
the along-z block operator; the two orientations are averaged. Both passes accumulate into a
float32 memory map on disk, so memory holds one slab of the input, never the volume.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from .formats.base import Source
from .intensity import IntensityMap, check_finite
from .noise import ORIENTATION_XZ, ORIENTATION_YZ, NoiseKey
from .operators import BlockMean
from .progress import ProgressTracker
from .sampler import SamplerSettings
from .tasks import MAX_Z_FACTOR, MIN_Z_FACTOR, TaskError
from .walks import labelled, overlapped, tiles_per_plane

if TYPE_CHECKING:
    from .api import Emit, Restorer

#: Bytes of input held per slab (rows for XZ planes, columns for YZ planes).
SLAB_BYTES = 64 * 2**20


def z_factor_of(source: Source, given: int | None) -> int:
    """k from --z-factor, else from the voxel size when z/x is an integer."""
    if len(source.shape) != 3:
        raise TaskError(f"--task isotropic restores ZYX volumes; {source.path} is a 2D image")
    if given is not None:
        return given
    voxel = source.meta.voxel_size_nm
    if voxel is None or voxel[2] is None:
        raise TaskError(f"{source.path} states no z spacing; pass --z-factor K (z spacing / xy spacing)")
    ratio = voxel[2] / voxel[0]
    k = round(ratio)
    if not MIN_Z_FACTOR <= k <= MAX_Z_FACTOR or abs(ratio - k) > 1e-3 * ratio:
        raise TaskError(
            f"{source.path}: voxel size {voxel[0]:g} x {voxel[1]:g} x {voxel[2]:g} nm gives z/x = {ratio:.4g}, "
            f"not an integer from {MIN_Z_FACTOR} to {MAX_Z_FACTOR}; resample the stack or pass --z-factor K"
        )
    return k


def restore_isotropic(
    restorer: "Restorer",
    source: Source,
    intensity: IntensityMap,
    settings: SamplerSettings,
    emit: "Emit",
    progress,
) -> None:
    k = z_factor_of(source, restorer.options.z_factor)
    z, ny, nx = source.shape
    samples = restorer.samples
    cost_xz = tiles_per_plane(restorer.denoiser, (z * k, nx), samples, restorer.steps, restorer.schedule)
    cost_yz = tiles_per_plane(restorer.denoiser, (z * k, ny), samples, restorer.steps, restorer.schedule)
    tracker = ProgressTracker(progress, ny * cost_xz + nx * cost_yz, ny + nx, 2 * z * k * ny * nx)
    tracker.report()
    with tempfile.TemporaryDirectory(prefix="df5t-isotropic-") as scratch:
        fused = np.lib.format.open_memmap(Path(scratch) / "fused.npy", mode="w+", dtype=np.float32,
                                          shape=(samples, z * k, ny, nx))
        pass_ = _OrientationPass(restorer, intensity, settings, k, tracker)
        for y0, y1 in _slabs(ny, z * nx * source.dtype.itemsize):
            rows = source.rows(y0, y1)  # [Z, rows, X]
            for first, unit in pass_.run(np.moveaxis(rows, 1, 0), ORIENTATION_XZ, y0):
                fused[:, :, first : first + len(unit), :] = 0.5 * np.moveaxis(unit, 0, 2)
        for x0, x1 in _slabs(nx, z * ny * source.dtype.itemsize):
            cols = np.stack([source.plane(i)[:, x0:x1] for i in range(z)])  # [Z, Y, cols]
            for first, unit in pass_.run(np.moveaxis(cols, 2, 0), ORIENTATION_YZ, x0):
                fused[:, :, :, first : first + len(unit)] += 0.5 * np.moveaxis(unit, 0, 3)
        for plane in range(z * k):
            emit(plane, np.asarray(fused[:, plane]))
        del fused


def _slabs(length: int, bytes_per_line: int):
    step = max(1, SLAB_BYTES // max(1, bytes_per_line))
    return [(i, min(length, i + step)) for i in range(0, length, step)]


class _OrientationPass:
    """DDRM on a slab of XZ or YZ planes, grouped to fill the backend's batch."""

    def __init__(self, restorer: "Restorer", intensity: IntensityMap, settings: SamplerSettings, k: int,
                 tracker: ProgressTracker):
        self.restorer, self.intensity, self.settings, self.k, self.tracker = restorer, intensity, settings, k, tracker

    def run(self, planes: np.ndarray, orientation: int, offset: int):
        """planes [N, Z, L] (acquired) -> yields (first index, samples [G, S, Z*k, L])."""
        check_finite(planes, None)
        grid = (planes.shape[1] * self.k, planes.shape[2])
        op = BlockMean(grid, (self.k, 1))
        group = self.restorer.group_size(grid)
        r = self.restorer

        def started():
            for start in range(0, len(planes), group):
                block = planes[start : start + group]
                key = NoiseKey(r.seed, orientation, range(offset + start, offset + start + len(block)))
                collect = r.walker.start(self.intensity.to_model(block), op, self.settings, key, self.tracker)
                yield labelled(offset + start, collect)

        for first, unit in overlapped(started()):
            self.tracker.planes_finished(len(unit), len(unit) * grid[0] * grid[1])
            yield first, unit

"""3D isotropic restoration (REFERENCE.md section 5): an anisotropic stack whose z spacing is
k times its xy spacing is the isotropic volume box-averaged over k planes and subsampled, so
acquired plane i is the mean of isotropic planes [i*k, (i+1)*k).

DDRM restores every XZ plane (streaming over y) and every YZ plane (streaming over x) with
the along-z block operator; the two orientations are averaged. Each pass keeps its samples in
a float32 memory map on disk (in the run's task store), so memory holds one slab of the
input, never the volume, and a resumed run redoes only the slabs that had not finished.
"""

from __future__ import annotations

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
from .work import TaskStore, slab_task, slabs

if TYPE_CHECKING:
    from .api import Emit, Restorer


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
    planes: range | None = None,
    store: TaskStore | None = None,
) -> None:
    """Emit output planes ``planes`` (all by default) of the isotropic volume. The passes keep
    their samples in ``store`` (a temporary one by default), a slab at a time; slabs a
    resumed store marks done are not restored again."""
    if store is None:
        with TaskStore.temporary() as temporary:
            return restore_isotropic(restorer, source, intensity, settings, emit, progress, planes, temporary)
    k = z_factor_of(source, restorer.options.z_factor)
    z, ny, nx = source.shape
    samples = restorer.samples
    planes = range(z * k) if planes is None else planes
    cost_xz = tiles_per_plane(restorer.denoiser, (z * k, nx), samples, restorer.steps, restorer.schedule)
    cost_yz = tiles_per_plane(restorer.denoiser, (z * k, ny), samples, restorer.steps, restorer.schedule)
    tracker = ProgressTracker(progress, ny * cost_xz + nx * cost_yz, ny + nx, 2 * z * k * ny * nx)
    tracker.report()
    shape = (samples, z * k, ny, nx)
    xz, yz = store.scratch(("xz", "yz"), shape, "the isotropic passes")
    pass_ = _OrientationPass(restorer, intensity, settings, k, tracker)
    for y0, y1 in slabs(ny, z * nx):
        if _skipped(store, slab_task("xz", y0, y1), tracker, (y1 - y0) * cost_xz, y1 - y0, z * k * nx):
            continue
        rows = source.rows(y0, y1)  # [Z, rows, X]
        for first, unit in pass_.run(np.moveaxis(rows, 1, 0), ORIENTATION_XZ, y0):
            xz[:, :, first : first + len(unit), :] = np.moveaxis(unit, 0, 2)
        store.mark_done(slab_task("xz", y0, y1))
    for x0, x1 in slabs(nx, z * ny):
        if _skipped(store, slab_task("yz", x0, x1), tracker, (x1 - x0) * cost_yz, x1 - x0, z * k * ny):
            continue
        cols = np.stack([source.plane(i)[:, x0:x1] for i in range(z)])  # [Z, Y, cols]
        for first, unit in pass_.run(np.moveaxis(cols, 2, 0), ORIENTATION_YZ, x0):
            yz[:, :, :, first : first + len(unit)] = np.moveaxis(unit, 0, 3)
        store.mark_done(slab_task("yz", x0, x1))
    for plane in planes:
        emit(plane, 0.5 * xz[:, plane] + 0.5 * yz[:, plane])
    del xz, yz


def _skipped(store: TaskStore, task: str, tracker: ProgressTracker, tiles: int, planes: int, pixels: int) -> bool:
    """Whether ``task`` was finished by an earlier run (and counted so in the progress)."""
    if not store.is_done(task):
        return False
    tracker.already_done(tiles)
    tracker.planes_finished(planes, planes * pixels)
    return True


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

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

#: Output pixels per block of averaged planes (and per z-chunk of the scratch arrays): 64 MiB of float32.
PLANE_BLOCK_PIXELS = 16 * 2**20

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
    run = IsotropicRun(restorer, source, intensity, settings, store, progress)
    run.prepare_scratch()
    for orientation, start, stop in run.slab_tasks():
        if store.is_done(slab_task(orientation, start, stop)):
            run.count_as_done(orientation, start, stop)
        else:
            run.restore_slab(orientation, start, stop)
    planes = range(run.shape[1]) if planes is None else planes
    for z0, z1 in run.plane_blocks():
        wanted = [z for z in range(z0, z1) if z in planes]
        if wanted:
            block = run.averaged(z0, z1)
            for z in wanted:
                emit(z, block[:, z - z0])


class IsotropicRun:
    """The tasks of one isotropic restoration: XZ slabs, YZ slabs (each writes its samples
    into the store's scratch arrays, whose chunks are whole slabs and blocks of output
    planes, so tasks on other processes never write the same chunk), then blocks of output
    planes averaged from the two passes."""

    def __init__(self, restorer: "Restorer", source: Source, intensity: IntensityMap, settings: SamplerSettings,
                 store: TaskStore, progress=None):
        self.restorer, self.source, self.intensity, self.settings, self.store = (restorer, source, intensity,
                                                                                 settings, store)
        self.k = z_factor_of(source, restorer.options.z_factor)
        z, ny, nx = source.shape
        self.shape = (restorer.samples, z * self.k, ny, nx)  # the scratch arrays: samples of the result
        self.xz_slabs, self.yz_slabs = slabs(ny, z * nx), slabs(nx, z * ny)
        self.block = max(1, PLANE_BLOCK_PIXELS // (ny * nx))
        self.cost = {orientation: tiles_per_plane(restorer.denoiser, (z * self.k, length), restorer.samples,
                                                  restorer.walk_timesteps((z * self.k, length), settings))
                     for orientation, length in (("xz", nx), ("yz", ny))}
        self.tracker = ProgressTracker(progress, ny * self.cost["xz"] + nx * self.cost["yz"], ny + nx,
                                       2 * z * self.k * ny * nx)
        self.tracker.report()

    def slab_tasks(self) -> list[tuple[str, int, int]]:
        return [("xz", *slab) for slab in self.xz_slabs] + [("yz", *slab) for slab in self.yz_slabs]

    def plane_blocks(self) -> list[tuple[int, int]]:
        planes = self.shape[1]
        return [(z, min(planes, z + self.block)) for z in range(0, planes, self.block)]

    def prepare_scratch(self) -> None:
        """Create the scratch arrays (checking the disk can hold them) unless they exist."""
        s, planes, ny, nx = self.shape
        slab_rows, slab_cols = self.xz_slabs[0][1], self.yz_slabs[0][1]
        self.store.scratch({"xz": (s, self.block, slab_rows, nx), "yz": (s, self.block, ny, slab_cols)}, self.shape,
                           "the isotropic passes")

    def restore_slab(self, orientation: str, start: int, stop: int) -> None:
        """Restore the XZ planes of rows start..stop (or YZ planes of those columns) into the
        scratch, and mark the slab done."""
        s, planes, ny, nx = self.shape
        if orientation == "xz":
            lines = np.moveaxis(self.source.rows(start, stop), 1, 0)  # [rows, Z, X]
            result = np.empty((s, planes, stop - start, nx), np.float32)
            for first, unit in self._run(lines, ORIENTATION_XZ, start):
                result[:, :, first - start : first - start + len(unit), :] = np.moveaxis(unit, 0, 2)
            self.store.open_scratch("xz")[:, :, start:stop, :] = result  # whole chunks, written once
        else:
            cols = np.stack([self.source.plane(i)[:, start:stop] for i in range(self.source.shape[0])])
            result = np.empty((s, planes, ny, stop - start), np.float32)
            for first, unit in self._run(np.moveaxis(cols, 2, 0), ORIENTATION_YZ, start):
                result[:, :, :, first - start : first - start + len(unit)] = np.moveaxis(unit, 0, 3)
            self.store.open_scratch("yz")[:, :, :, start:stop] = result
        self.store.mark_done(slab_task(orientation, start, stop))

    def count_as_done(self, orientation: str, start: int, stop: int) -> None:
        """A slab an earlier run finished counts as done in the progress."""
        lines = stop - start
        other = self.shape[3] if orientation == "xz" else self.shape[2]
        self.tracker.already_done(lines * self.cost[orientation])
        self.tracker.planes_finished(lines, lines * self.shape[1] * other)

    def averaged(self, z0: int, z1: int) -> np.ndarray:
        """Samples [S, z1 - z0, Y, X] of output planes z0..z1: the mean of the two passes."""
        xz, yz = self.store.open_scratch("xz"), self.store.open_scratch("yz")
        return 0.5 * xz[:, z0:z1] + 0.5 * yz[:, z0:z1]

    def _run(self, planes: np.ndarray, orientation: int, offset: int):
        """planes [N, Z, L] (acquired) -> yields (first index, samples [G, S, Z*k, L]),
        grouped to fill the backend's batch."""
        check_finite(planes, None)
        r = self.restorer
        grid = (planes.shape[1] * self.k, planes.shape[2])
        op = BlockMean(grid, (self.k, 1))
        group = r.group_size(grid)

        def started():
            for start in range(0, len(planes), group):
                block = planes[start : start + group]
                key = NoiseKey(r.seed, orientation, range(offset + start, offset + start + len(block)))
                collect = r.walker.start(self.intensity.to_model(block), op, self.settings, key, self.tracker)
                yield labelled(offset + start, collect)

        for first, unit in overlapped(started()):
            self.tracker.planes_finished(len(unit), len(unit) * grid[0] * grid[1])
            yield first, unit

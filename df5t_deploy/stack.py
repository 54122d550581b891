"""Restoring the planes of an image or stack with a 2D task: planes in groups, each plane in
super-tile regions when it is larger than ``max_region``, blended at the end. With a task
store (``work``), each region's samples are kept there as they finish, so a resumed run
restores only the regions it lacks. The isotropic task has its own module (``volume``)."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np

from .formats.base import Source
from .intensity import IntensityMap, check_finite
from .noise import ORIENTATION_XY, NoiseKey
from .progress import ProgressCallback, ProgressTracker
from .regions import Region, layout
from .sampler import SamplerSettings
from .streaming import prefetch
from .tasks import TaskError, missing_pixels
from .tiling import WindowedSum
from .walks import labelled, overlapped, tiles_per_plane
from .work import TaskStore, region_task

if TYPE_CHECKING:
    from .api import Emit, Restorer


def restore_planes(restorer: "Restorer", source: Source, intensity: IntensityMap, settings: SamplerSettings,
                   emit: "Emit", progress: ProgressCallback | None, planes: range, store: TaskStore | None) -> None:
    """Restore ``planes`` of ``source`` with a 2D task, emitting samples [S, H, W] per plane in
    order; groups of planes share network calls, and the next group is read and started
    before the host waits for this one. ``store``: where finished regions are kept and found."""
    r = restorer
    grid = r.options.grid_shape(source.shape[-2:])
    regions = layout(source.shape[-2:], r.options.factor, r.backend.info.tile, r.max_region)
    f = r.options.factor
    cost = sum(tiles_per_plane(r.denoiser, (region.height * f, region.width * f), r.samples, r.steps, r.schedule)
               for region in regions)
    tracker = ProgressTracker(progress, cost * len(planes), len(planes), len(planes) * grid[0] * grid[1])
    tracker.report()
    group = r.group_size((regions[0].height * f, regions[0].width * f))

    def started():
        for first, block in prefetch(source, planes, group):
            missing = None
            where = f"plane {first}: " if source.planes > 1 else ""  # a stack's problems name their plane
            if r.options.task == "inpaint":
                try:
                    missing = missing_pixels(r.options, block[0])
                except TaskError as err:
                    raise TaskError(f"{where}{err}") from None
                check_finite(block[:1], missing, first if where else None)
                block = np.where(missing, 0, block)
            else:
                check_finite(block, None, first if where else None)
            y = intensity.to_model(block)
            collect = _start_regions(r, y, missing, regions, range(first, first + len(block)), settings, tracker,
                                     store)
            yield labelled(first, collect)

    for first, unit in overlapped(started()):
        for offset, samples in enumerate(unit):
            emit(first + offset, samples)
        tracker.planes_finished(len(unit), len(unit) * grid[0] * grid[1])


def _start_regions(r: "Restorer", y, missing, regions: list[Region], plane_ids: range, settings: SamplerSettings,
                   tracker: ProgressTracker, store: TaskStore | None) -> Callable[[], np.ndarray]:
    """Begin restoring planes y [G, h, w]; the collector returns samples [G, S, H, W]. A
    plane over max_region is restored one super-tile after another when collected (or found
    in ``store``), and the super-tiles blended (the one WindowedSum)."""
    f = r.options.factor

    def start(region):
        shape = (region.height * f, region.width * f)
        op = r.options.operator(shape, None if missing is None else region.measurement(missing))
        key = NoiseKey(r.seed, ORIENTATION_XY, plane_ids, region.y * f, region.x * f)
        return r.walker.start(region.measurement(y), op, settings, key, tracker)

    if len(regions) == 1:
        return start(regions[0])

    def started():
        for index, region in enumerate(regions):
            tasks = [region_task(z, index) for z in plane_ids]
            if store is None:
                yield start(region)
            elif all(store.is_done(task) for task in tasks):
                tracker.already_done(len(plane_ids) * tiles_per_plane(
                    r.denoiser, (region.height * f, region.width * f), r.samples, r.steps, r.schedule))
                yield lambda tasks=tasks: np.stack([store.load(task) for task in tasks])
            else:
                yield _kept(start(region), store, tasks)

    def blended() -> np.ndarray:
        blend = WindowedSum((len(y), r.samples, y.shape[-2] * f, y.shape[-1] * f))
        for region, unit in zip(regions, overlapped(started()), strict=True):
            window = np.outer(region.wy, region.wx).astype(np.float32)
            rows = slice(region.y * f, (region.y + region.height) * f)
            cols = slice(region.x * f, (region.x + region.width) * f)
            blend.add(rows, cols, unit, window)
            blend.cover(rows, cols, window)
        return blend.mean()

    return blended


def _kept(collect: Callable[[], np.ndarray], store: TaskStore, tasks: list[str]) -> Callable[[], np.ndarray]:
    """A collector that also keeps each plane's samples in ``store`` under its task."""

    def collect_and_keep() -> np.ndarray:
        unit = collect()
        for task, samples in zip(tasks, unit, strict=True):
            store.save(task, samples)
        return unit

    return collect_and_keep

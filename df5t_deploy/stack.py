"""Restoring the planes of an image or stack with a 2D task: planes in groups, each plane in
super-tile regions when it is larger than ``max_region``, blended at the end. With a task
store (``work``), each region's samples are kept there as they finish, so a resumed run
restores only the regions it lacks. The isotropic task has its own module (``volume``)."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING

import numpy as np

from .formats.base import Source
from .intensity import IntensityMap, check_finite
from .noise import ORIENTATION_XY, NoiseKey
from .progress import ProgressCallback, ProgressTracker
from .regions import Region, layout
from .sampler import SamplerSettings
from .streaming import ArraySource, prefetch
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
    regions = plane_regions(r, source)
    f = r.options.factor
    cost = sum(_region_tiles(r, region, settings) for region in regions)
    tracker = ProgressTracker(progress, cost * len(planes), len(planes), len(planes) * grid[0] * grid[1])
    tracker.report()
    group = r.group_size((regions[0].height * f, regions[0].width * f))

    def started():
        for first, block in prefetch(source, planes, group):
            y, missing = _measurement(r, intensity, block, first if source.planes > 1 else None)
            collect = _start_regions(r, y, missing, regions, range(first, first + len(block)), settings, tracker,
                                     store)
            yield labelled(first, collect)

    for first, unit in overlapped(started()):
        for offset, samples in enumerate(unit):
            emit(first + offset, samples)
        tracker.planes_finished(len(unit), len(unit) * grid[0] * grid[1])


def restore_frames(r: "Restorer", frames: list[np.ndarray], intensities: list[IntensityMap], seeds: list[int],
                   settings: SamplerSettings, progress: ProgressCallback | None) -> np.ndarray:
    """Samples [G, S, H, W] of 2D frames of one shape, each in one region, walked together as
    the planes of one group (``Restorer.submit``): each keeps its intensity map, and its seed
    and plane id 0, so its samples are those ``restore_planes`` gives it alone."""
    source = ArraySource(frames[0])
    (region,) = plane_regions(r, source)
    grid = r.options.grid_shape(source.shape)
    per_frame = tiles_per_plane(r.denoiser, grid, r.samples, r.walk_timesteps(grid, settings))
    tracker = ProgressTracker(progress, per_frame * len(frames), len(frames), len(frames) * grid[0] * grid[1])
    tracker.report()
    y = np.concatenate([_measurement(r, intensity, frame[None], None)[0]
                        for frame, intensity in zip(frames, intensities, strict=True)])
    unit = _start_region(r, y, None, region, [0] * len(frames), settings, tracker, seeds=seeds)()
    tracker.planes_finished(len(frames), len(frames) * grid[0] * grid[1])
    return unit


def _region_tiles(r: "Restorer", region: Region, settings: SamplerSettings) -> int:
    """Network tiles one plane of a region costs (progress totals)."""
    grid = (region.height * r.options.factor, region.width * r.options.factor)
    return tiles_per_plane(r.denoiser, grid, r.samples, r.walk_timesteps(grid, settings))


def plane_regions(r: "Restorer", source: Source) -> list[Region]:
    """The super-tiles of a plane of ``source`` (one, unless it is larger than max_region)."""
    return layout(source.shape[-2:], r.options.factor, r.backend.info.tile, r.max_region)


def restore_region(r: "Restorer", source: Source, intensity: IntensityMap, settings: SamplerSettings, z: int,
                   index: int, store: TaskStore) -> None:
    """Task ``region-Z-R``: restore super-tile ``index`` of plane ``z`` and keep its samples."""
    regions = plane_regions(r, source)
    y, missing = _measurement(r, intensity, source.plane(z)[None], z if source.planes > 1 else None)
    tracker = ProgressTracker(None, 0, 1, 0)
    unit = _start_region(r, y, missing, regions[index], range(z, z + 1), settings, tracker)()
    store.save(region_task(z, index), unit[0])


def blend_stored_regions(r: "Restorer", source: Source, z: int, store: TaskStore) -> np.ndarray:
    """Samples [S, H, W] of plane ``z`` blended from its regions' kept samples."""
    regions = plane_regions(r, source)
    units = (store.load(region_task(z, index))[None] for index in range(len(regions)))
    return _blend(r, regions, units, source.shape[-2:])[0]


def _measurement(r: "Restorer", intensity: IntensityMap, block: np.ndarray, plane: int | None):
    """Planes [G, h, w] as the sampler measures them (model scale), and inpainting's missing
    pixels (None for other tasks); bad input is refused, naming ``plane`` of a stack."""
    missing = None
    where = f"plane {plane}: " if plane is not None else ""
    if r.options.task == "inpaint":
        try:
            missing = missing_pixels(r.options, block[0])
        except TaskError as err:
            raise TaskError(f"{where}{err}") from None
        check_finite(block[:1], missing, plane)
        block = np.where(missing, 0, block)
    else:
        check_finite(block, None, plane)
    return intensity.to_model(block), missing


def _start_region(r: "Restorer", y, missing, region: Region, plane_ids: Sequence[int], settings: SamplerSettings,
                  tracker: ProgressTracker, seeds: Sequence[int] | None = None) -> Callable[[], np.ndarray]:
    """Begin restoring ``region`` of planes y [G, h, w]; ``seeds``: each plane's own (frames
    walked together), else the Restorer's for all."""
    f = r.options.factor
    shape = (region.height * f, region.width * f)
    op = r.options.operator(shape, None if missing is None else region.measurement(missing))
    key = NoiseKey(r.seed if seeds is None else seeds, ORIENTATION_XY, plane_ids, region.y * f, region.x * f)
    return r.walker.start(region.measurement(y), op, settings, key, tracker)


def _start_regions(r: "Restorer", y, missing, regions: list[Region], plane_ids: range, settings: SamplerSettings,
                   tracker: ProgressTracker, store: TaskStore | None) -> Callable[[], np.ndarray]:
    """Begin restoring planes y [G, h, w]; the collector returns samples [G, S, H, W]. A
    plane over max_region is restored one super-tile after another when collected (or found
    in ``store``), and the super-tiles blended (the one WindowedSum)."""

    def start(region):
        return _start_region(r, y, missing, region, plane_ids, settings, tracker)

    if len(regions) == 1:
        return start(regions[0])

    def started():
        for index, region in enumerate(regions):
            tasks = [region_task(z, index) for z in plane_ids]
            if store is None:
                yield start(region)
            elif all(store.is_done(task) for task in tasks):
                tracker.already_done(len(plane_ids) * _region_tiles(r, region, settings))
                yield lambda tasks=tasks: np.stack([store.load(task) for task in tasks])
            else:
                yield _kept(start(region), store, tasks)

    return lambda: _blend(r, regions, (unit for unit in overlapped(started())), y.shape[-2:])


def _blend(r: "Restorer", regions: list[Region], units: Iterator[np.ndarray], measurement_shape) -> np.ndarray:
    """Samples [G, S, H, W] of whole planes from their regions' samples (in layout order),
    blended with the regions' smooth windows (the one WindowedSum)."""
    f = r.options.factor
    blend = None
    for region, unit in zip(regions, units, strict=True):
        if blend is None:
            blend = WindowedSum((len(unit), r.samples, measurement_shape[0] * f, measurement_shape[1] * f))
        window = np.outer(region.wy, region.wx).astype(np.float32)
        rows = slice(region.y * f, (region.y + region.height) * f)
        cols = slice(region.x * f, (region.x + region.width) * f)
        blend.add(rows, cols, unit, window)
        blend.cover(rows, cols, window)
    return blend.mean()


def _kept(collect: Callable[[], np.ndarray], store: TaskStore, tasks: list[str]) -> Callable[[], np.ndarray]:
    """A collector that also keeps each plane's samples in ``store`` under its task."""

    def collect_and_keep() -> np.ndarray:
        unit = collect()
        for task, samples in zip(tasks, unit, strict=True):
            store.save(task, samples)
        return unit

    return collect_and_keep

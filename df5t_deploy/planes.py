"""Restoring groups of planes: DDRM on several planes and samples at once, with progress.

Every plane of a group shares one operator; planes and samples go along the leading axis of
the sampler state, so their tiles fill the same backend calls. Each (plane, sample) draws
its own counter-based noise, so grouping never changes a result.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import TypeVar

import numpy as np

from .artifact import Schedule
from .noise import NoiseKey, group_noise
from .operators import SpatialOperator
from .sampler import DDRM, SamplerSettings, StepPlan, Timesteps, run_ddrm, state_to_image
from .tiling import BlendedDenoiser

T = TypeVar("T")


class RestorationCancelled(RuntimeError):
    """The progress callback asked to stop; nothing was returned or written."""


@dataclass(frozen=True)
class Progress:
    tiles_done: int
    tiles_total: int
    planes_done: int
    planes_total: int
    step: int  # sampler steps finished in the current group of planes
    steps: int
    pixels_done: int  # output pixels finished so far
    pixels_total: int


ProgressCallback = Callable[[Progress], "bool | None"]  # return False to cancel


class ProgressTracker:
    """Counts tiles over a whole job and lets the callback cancel it."""

    def __init__(self, callback: ProgressCallback | None, tiles_total: int, planes_total: int, pixels_total: int):
        self.callback, self.tiles_total, self.planes_total = callback, tiles_total, planes_total
        self.pixels_total = pixels_total
        self.tiles_done = self.planes_done = self.pixels_done = 0

    def report(self, step: int = 0, steps: int = 0) -> None:
        if self.callback is None:
            return
        event = Progress(self.tiles_done, self.tiles_total, self.planes_done, self.planes_total, step, steps,
                         self.pixels_done, self.pixels_total)
        if self.callback(event) is False:
            raise RestorationCancelled("restoration cancelled by the progress callback")

    def step_reporter(self, tiles_per_step: int, steps: int) -> Callable[[StepPlan], None]:
        """The on_step callback of a sampler loop that runs ``tiles_per_step`` tiles a step."""

        def on_step(plan: StepPlan) -> None:
            self.tiles_done += tiles_per_step
            self.report(plan.index + 1, steps)

        return on_step

    def planes_finished(self, count: int, pixels: int) -> None:
        self.planes_done += count
        self.pixels_done += pixels
        self.report()


def restore_group(
    y: np.ndarray,
    op: SpatialOperator,
    schedule: Schedule,
    settings: SamplerSettings,
    denoiser: BlendedDenoiser,
    key: NoiseKey,
    samples: int,
    tracker: ProgressTracker,
) -> np.ndarray:
    """Samples [G, samples, H, W] on the [0, 1] scale for measurements y [G, h, w] (model scale)."""
    groups = len(y)
    height, width = op.shape
    ddrm = DDRM(op, schedule, settings)
    y_all = np.repeat(y, samples, axis=0)
    on_step = tracker.step_reporter(denoiser.tiles_per_call(groups * samples, height, width), len(ddrm.timesteps))
    state = run_ddrm(ddrm, y_all, denoiser, lambda step: group_noise(key, samples, op.shape, step), on_step)
    return state_to_image(state).reshape(groups, samples, height, width)


def tiles_per_plane(
    denoiser: BlendedDenoiser, shape: tuple[int, int], samples: int, steps: int, schedule: Schedule
) -> int:
    """Network tiles one plane costs (for progress totals)."""
    return denoiser.tiles_per_call(samples, *shape) * len(Timesteps(schedule, steps))


def overlapped(started: Iterable[Callable[[], T]]) -> Iterator[T]:
    """The results of jobs in order, each collected only once the next job was started.

    ``started`` yields a job's collector as soon as the job is queued (a device walk runs
    on its own), so the host reads and queues job k+1 before it waits for job k and the
    device never idles between them; at most two jobs are in flight.
    """
    pending = None
    for collect in started:
        if pending is not None:
            yield pending()
        pending = collect
    if pending is not None:
        yield pending()


def labelled(label, collect: Callable[[], T]) -> Callable[[], tuple]:
    """A collector that returns (label, result) for ``overlapped``."""
    return lambda: (label, collect())

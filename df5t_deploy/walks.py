"""Walking groups of planes through DDRM on the host: several planes and samples at once, and
the overlap of one group's walk with the preparation of the next (``group_walker`` chooses
between this host loop and the device loop).

Every plane of a group shares one operator; planes and samples go along the leading axis of
the sampler state, so their tiles fill the same backend calls. Each (plane, sample) draws
its own counter-based noise, so grouping never changes a result.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import TypeVar

import numpy as np

from .artifact import Schedule
from .noise import NoiseKey, group_noise
from .operators import SpatialOperator
from .progress import ProgressTracker
from .sampler import (
    DDRM,
    NoiseSource,
    SamplerSettings,
    Timesteps,
    run_ddrm,
    state_to_image,
)
from .tiling import BlendedDenoiser

T = TypeVar("T")


def restore_group(
    y: np.ndarray,
    op: SpatialOperator,
    schedule: Schedule,
    settings: SamplerSettings,
    denoiser: BlendedDenoiser,
    key: NoiseKey,
    samples: int,
    tracker: ProgressTracker,
    noise: NoiseSource | None = None,
) -> np.ndarray:
    """Samples [G, samples, H, W] on the [0, 1] scale for measurements y [G, h, w] (model scale).
    ``noise``: the normals of each step (default: the group's counter-based noise, ``key``)."""
    groups = len(y)
    height, width = op.shape
    ddrm = DDRM(op, schedule, settings)
    y_all = np.repeat(y, samples, axis=0)
    on_step = tracker.step_reporter(denoiser.tiles_per_call(groups * samples, height, width), len(ddrm.timesteps))
    noise = noise or (lambda step: group_noise(key, samples, op.shape, step))
    state = run_ddrm(ddrm, y_all, lambda x, t: denoiser(x, t, on_tiles=tracker.tiles_ran), noise, on_step)
    return state_to_image(state).reshape(groups, samples, height, width)


def tiles_per_plane(denoiser: BlendedDenoiser, shape: tuple[int, int], samples: int, timesteps: Timesteps) -> int:
    """Network tiles one plane costs (for progress totals)."""
    return denoiser.tiles_per_call(samples, *shape) * len(timesteps)


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

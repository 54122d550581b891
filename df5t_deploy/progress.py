"""Progress of a restoration: tiles, planes and pixels done, reported to a callback that may
cancel (the CLI's bar, napari's, a service's)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from .sampler import StepPlan


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
        self.step = self.steps = 0  # of the walk in progress

    def report(self, step: int = 0, steps: int = 0) -> None:
        if self.callback is None:
            return
        event = Progress(self.tiles_done, self.tiles_total, self.planes_done, self.planes_total, step, steps,
                         self.pixels_done, self.pixels_total)
        if self.callback(event) is False:
            raise RestorationCancelled("restoration cancelled by the progress callback")

    def step_reporter(self, tiles_per_step: int, steps: int) -> Callable[[StepPlan], None]:
        """The on_step callback of a sampler loop that runs ``tiles_per_step`` tiles a step.
        It sets the count the step ends at, so a loop that also reports its tiles as they
        run (``tiles_ran``) is counted once."""
        before = self.tiles_done
        self.step = 0

        def on_step(plan: StepPlan) -> None:
            self.tiles_done = before + (plan.index + 1) * tiles_per_step
            self.step = plan.index + 1
            self.report(self.step, steps)

        self.steps = steps
        return on_step

    def tiles_ran(self, count: int) -> None:
        """``count`` more tiles went through the network within the current step."""
        self.tiles_done += count
        self.report(self.step, self.steps)

    def already_done(self, tiles: int) -> None:
        """Work a resumed run found finished counts as done."""
        self.tiles_done += tiles
        self.report()

    def planes_finished(self, count: int, pixels: int) -> None:
        self.planes_done += count
        self.pixels_done += pixels
        self.report()


def shared_progress(callbacks: list[ProgressCallback | None]) -> ProgressCallback | None:
    """One callback for equal jobs run as one (frames walked together): each job's callback
    sees its own share (every count divided by the number of jobs), and any may cancel."""
    if all(callback is None for callback in callbacks):
        return None
    jobs = len(callbacks)

    def report(e: Progress) -> bool:
        share = Progress(e.tiles_done // jobs, e.tiles_total // jobs, e.planes_done // jobs, e.planes_total // jobs,
                         e.step, e.steps, e.pixels_done // jobs, e.pixels_total // jobs)
        answers = [callback(share) for callback in callbacks if callback is not None]
        return all(answer is not False for answer in answers)

    return report

"""File to file: read planes, restore, write planes, with bounded memory and atomic outputs.

With several restorers (one per GPU), the planes of a stack are shared out in runs of
consecutive planes: each worker reads its runs from its own handle on the input, and the
results are written in plane order as they arrive. Every plane draws the noise of its place
in the stack, so the result is the same whatever the number of workers.
"""

from __future__ import annotations

import contextlib
import queue
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .api import Emit, NoiseLevel, Restorer
from .formats import ZarrLayout, check_writable, create_sink, open_source
from .formats.base import Sink, Source
from .formats.zarr_format import partial_store
from .intensity import IntensityMap, mean_and_std
from .output_safety import OutputLock, check_outputs, recorded_provenance
from .progress import Progress, ProgressCallback
from .run_identity import RunIdentity
from .streaming import RoiSource
from .work import TaskStore

#: Runs of planes in flight per worker, so memory stays bounded when one worker lags.
RUNS_IN_FLIGHT_PER_WORKER = 2


@dataclass(frozen=True)
class FileResult:
    input_shape: tuple[int, ...]
    output_shape: tuple[int, ...]
    dtype: np.dtype
    sigma0: float
    provenance: dict
    estimated_noise_std: float | None = None  # sigma0 "auto": the estimate, in input units


def restore_file(
    restorer: Restorer | Sequence[Restorer],
    input_path: str | Path,
    output_path: str | Path,
    *,
    uncertainty_path: str | Path | None = None,
    resume: bool = False,
    progress: ProgressCallback | None = None,
    reads: Mapping[str, str | Path | None] | None = None,
    break_lock: bool = False,
    series: int | None = None,
    roi: str | None = None,
    layout: ZarrLayout | None = None,
    runner=None,
) -> FileResult:
    """Restore ``input_path`` into ``output_path`` (and the sample std into ``uncertainty_path``).

    Before any work, outputs that could harm the input, the model, the other ``reads``
    (label -> path, e.g. a mask file) or each other are refused (``output_safety``), and the
    output is locked against a second process. Outputs appear only when complete; on any
    error or Ctrl-C they are removed (a zarr output is kept hidden for ``resume``, which
    continues only the same run: the same run identity). ``series``: which image of a
    multi-series TIFF input; ``roi``: the box of the input to restore ("z0:z1,y0:y1,x0:x1",
    recorded with its origin); ``layout``: chunks and pyramid levels of a zarr output;
    ``runner``: runs the tasks elsewhere (``cluster.DaskRunner``) into a zarr output.
    """
    restorers = [restorer] if isinstance(restorer, Restorer) else list(restorer)
    first = restorers[0]
    if (resume or runner is not None) and uncertainty_path is not None:
        raise ValueError("--uncertainty cannot be written with --resume or --cluster (its std output is not "
                         "resumable)")
    check_outputs({"output": output_path, "--uncertainty": uncertainty_path},
                  {"input": input_path, "model": first.model_path, **(reads or {})})
    with open_input(input_path, series, roi) as source:
        out_shape = first.output_shape(source)
        check_writable(output_path, source.dtype, out_shape, layout, resume)
        if uncertainty_path is not None:
            if first.samples < 2:
                raise ValueError("--uncertainty needs --samples 2 or more (it is the std over samples)")
            check_writable(uncertainty_path, np.float32, out_shape)
        plan = _plan(first, source, input_path, series)
        intensity, noise, provenance, identity = plan.intensity, plan.noise, plan.provenance, plan.identity
        settings = first.sampler_settings(noise)
        provenance["devices"] = len(restorers)
        meta = _output_meta(first, source)
        with contextlib.ExitStack() as stack:
            stack.enter_context(OutputLock(output_path, identity.to_dict(), break_lock))
            if resume:
                _check_same_run(Path(output_path), identity)
            sink = stack.enter_context(create_sink(output_path, out_shape, source.dtype, meta, provenance, resume=resume,
                                                   layout=layout))
            std_sink = None
            if uncertainty_path is not None:
                std_meta = {**provenance, "quantity": f"per-pixel std over {first.samples} samples, input units"}
                std_sink = stack.enter_context(create_sink(uncertainty_path, out_shape, np.float32, meta, std_meta))

            def emit(z: int, unit: np.ndarray) -> None:
                mean, std = mean_and_std(unit, intensity)
                sink.write_plane(mean, z)
                if std_sink is not None:
                    std_sink.write_plane(std, z)

            if runner is not None:
                runner.restore(first, source, sink, input_path, series, roi, intensity, settings)
            else:
                _restore_here(restorers, source, sink, emit, input_path, series, roi, intensity, settings, progress)
    return FileResult(source.shape, out_shape, source.dtype, noise.sigma0, provenance, noise.estimated_noise_std)


@dataclass(frozen=True)
class _Plan:
    """What a run of a restorer on an input will be, decided before any compute."""

    intensity: IntensityMap
    noise: NoiseLevel
    provenance: dict
    identity: RunIdentity


def open_input(input_path: str | Path, series: int | None = None, roi: str | None = None) -> Source:
    """The input as a run reads it: one series of a TIFF, a box of it with ``roi``."""
    source = open_source(input_path, series)
    if roi is None:
        return source
    try:
        return RoiSource(source, roi)
    except ValueError:
        source.close()
        raise


def _plan(restorer: Restorer, source: Source, input_path: str | Path, series: int | None) -> _Plan:
    intensity = restorer.intensity_for(source)
    noise = restorer.noise_level(source, intensity)
    provenance = restorer.provenance(source, intensity, noise) | ({"series": series} if series is not None else {})
    if isinstance(source, RoiSource):
        provenance["roi"] = {"origin": list(source.origin), "shape": list(source.shape)}
    identity = RunIdentity.of(input_path, restorer.model_sha256, provenance)
    provenance["run_identity"] = identity.to_dict()
    return _Plan(intensity, noise, provenance, identity)


def run_identity_of(restorer: Restorer, input_path: str | Path, series: int | None = None,
                    roi: str | None = None) -> RunIdentity:
    """The identity ``restore_file`` would record for this input, without restoring it (an
    estimate of the noise, for sigma0 auto, is all the work it does)."""
    with open_input(input_path, series, roi) as source:
        restorer.output_shape(source)  # refuses what restore_file would refuse
        return _plan(restorer, source, input_path, series).identity


def _restore_here(restorers: list[Restorer], source: Source, sink: Sink, emit: Emit, input_path, series, roi,
                  intensity: IntensityMap, settings, progress: ProgressCallback | None) -> None:
    """The planes the sink lacks, restored in this process (on each of ``restorers``)."""
    first = restorers[0]
    for planes in _runs_to_do(sink):
        if len(restorers) == 1 or first.options.task == "isotropic" or len(planes) < 2:
            first.restore_source(source, emit, intensity, progress, planes=planes, settings=settings,
                                 store=sink.tasks)
        else:
            _restore_in_parallel(restorers, Path(input_path), series, roi, source.shape[-2:], planes, emit,
                                 intensity, settings, progress, sink.tasks)


def _runs_to_do(sink: Sink) -> list[range]:
    """The output planes still to write, as runs of consecutive planes (all of them, unless a
    resumed sink has some already)."""
    runs: list[range] = []
    for z in sink.missing_planes():
        if runs and runs[-1].stop == z:
            runs[-1] = range(runs[-1].start, z + 1)
        else:
            runs.append(range(z, z + 1))
    return runs


def _check_same_run(output: Path, identity: RunIdentity) -> None:
    """``--resume`` continues an interrupted output of this very run, nothing else."""
    partial = partial_store(output)
    if partial is None:
        return  # nothing to continue: a fresh start
    recorded = recorded_provenance(partial) or {}
    differences = identity.differences(RunIdentity.from_dict(recorded.get("run_identity") or {}))
    if differences:
        raise ValueError(f"--resume: {partial} was written by another run ({', '.join(differences)} differ); "
                         f"run without --resume to start afresh, or `df5t clean {output} --yes` to remove it")


def _restore_in_parallel(restorers, input_path: Path, series: int | None, roi: str | None, plane_shape: tuple[int, int],
                         planes: range, emit: Emit, intensity, settings, progress: ProgressCallback | None,
                         store: TaskStore | None) -> None:
    run = max(1, min(r.group_size(r.options.grid_shape(plane_shape)) for r in restorers))
    runs = [planes[i : i + run] for i in range(0, len(planes), run)]
    todo: queue.Queue = queue.Queue()
    for item in runs:
        todo.put(item)
    done: dict[int, np.ndarray] = {}
    ready = threading.Condition()
    slots = threading.Semaphore(RUNS_IN_FLIGHT_PER_WORKER * len(restorers))
    failure: list[BaseException] = []
    combined = _CombinedProgress(progress, len(planes))

    def work(restorer: Restorer, worker: int) -> None:
        try:
            with open_input(input_path, series, roi) as source:
                while not failure:
                    try:
                        item = todo.get_nowait()
                    except queue.Empty:
                        return
                    while not slots.acquire(timeout=0.1):
                        if failure:
                            return

                    def collect(z: int, unit: np.ndarray) -> None:
                        with ready:
                            done[z] = unit
                            ready.notify_all()

                    restorer.restore_source(source, collect, intensity, combined.for_worker(worker),
                                            planes=item, settings=settings, store=store)
        except BaseException as err:  # handed to the writing thread
            with ready:
                failure.append(err)
                ready.notify_all()

    threads = [threading.Thread(target=work, args=(r, i), name=f"df5t-device-{i}", daemon=True)
               for i, r in enumerate(restorers)]
    for thread in threads:
        thread.start()
    for z in planes:
        with ready:
            ready.wait_for(lambda z=z: z in done or failure)
            if failure:
                raise failure[0]
            unit = done.pop(z)
        emit(z, unit)
        if z + 1 == planes.stop or (z + 1 - planes.start) % run == 0:
            slots.release()
    for thread in threads:
        thread.join()


class _CombinedProgress:
    """One progress stream from several workers: tiles and planes summed over workers."""

    def __init__(self, callback: ProgressCallback | None, planes_total: int):
        self.callback, self.planes_total = callback, planes_total
        self.lock = threading.Lock()
        self.latest: dict[int, Progress] = {}
        self.finished = [0, 0, 0]  # tiles, planes, pixels of runs already done

    def for_worker(self, worker: int) -> ProgressCallback | None:
        """The callback for ``worker``'s next run; its previous run counts as finished."""
        if self.callback is None:
            return None
        with self.lock:
            previous = self.latest.pop(worker, None)
            if previous is not None:
                self.finished = [self.finished[0] + previous.tiles_done, self.finished[1] + previous.planes_done,
                                 self.finished[2] + previous.pixels_done]

        def report(event: Progress):
            with self.lock:
                self.latest[worker] = event
                tiles = self.finished[0] + sum(e.tiles_done for e in self.latest.values())
                scale = self.planes_total / max(1, event.planes_total)
                combined = Progress(tiles, round(event.tiles_total * scale),
                                    self.finished[1] + sum(e.planes_done for e in self.latest.values()),
                                    self.planes_total, event.step, event.steps,
                                    self.finished[2] + sum(e.pixels_done for e in self.latest.values()),
                                    round(event.pixels_total * scale))
            return self.callback(combined)

        return report


def _output_meta(restorer: Restorer, source):
    if restorer.options.task == "isotropic":
        return source.meta.scaled(z=1.0 / restorer.z_factor_for(source))
    return source.meta.scaled(xy=1.0 / restorer.options.factor)

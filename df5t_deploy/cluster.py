"""Whole runs on a Dask cluster (the ``[cluster]`` extra: ``distributed``; ``dask-cuda`` for one
worker per GPU; ``dask-jobqueue`` for SLURM, LSF and PBS).

The tasks of a restoration (``work``) run on the workers: output planes; super-tile regions
of planes larger than ``--max-region``, then one blend per plane once its regions are done;
the slabs of the isotropic XZ and YZ passes, then blocks of output planes averaged from them.
Each worker holds one ``Restorer`` (a worker plugin, which refuses a worker whose package
version differs from the client's) and reads its input and writes its output itself: no
pixel passes through the scheduler or the client. The client computes the intensity map and
sigma0 once and sends them with every task, and noise is keyed by global pixel, so the
result equals the single-process one bit for bit, whatever the number of workers and the
order of the tasks. Done-markers make the run resumable like any zarr output.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from distributed import Client, LocalCluster, WorkerPlugin, as_completed, get_worker
from distributed.security import Security

from .api import AUTO_DEVICE, Restorer
from .formats.base import Sink
from .formats.zarr_format import partial_tasks, write_plane_into
from .intensity import IntensityMap, mean_and_std
from .pipeline import open_input
from .sampler import SamplerSettings
from .stack import blend_stored_regions, plane_regions, restore_region
from .version import __version__
from .volume import IsotropicRun
from .work import TaskStore, plane_task, region_task, slab_task

#: Test hooks: each attempt of a task is a line in FOLDER/NAME, and the worker that first runs
#: the task named by KILL_TASK_ENV is killed (SIGKILL), as a node that fails mid-task.
ATTEMPTS_ENV, KILL_TASK_ENV = "DF5T_TEST_ATTEMPTS", "DF5T_TEST_KILL_TASK"
PLUGIN_NAME = "df5t-restorer"


class ClusterError(ValueError):
    """The cluster cannot run this restoration as configured; the message says why."""


@dataclass(frozen=True)
class WorkerRestorer:
    """How each worker builds its Restorer: the client's model and settings."""

    model: str
    settings: dict
    mask: np.ndarray | str | None = None
    backend: str = "auto"
    device: str = AUTO_DEVICE
    threads: int | None = None
    version: str = __version__

    @classmethod
    def like(cls, restorer: Restorer, device: str, threads: int | None, backend: str) -> WorkerRestorer:
        return cls(str(restorer.model_path), restorer.settings.to_dict(), restorer.options.mask, backend, device,
                   threads)


class RestorerPlugin(WorkerPlugin):
    """A Dask worker plugin holding the worker's Restorer, loaded once per worker."""

    name = PLUGIN_NAME

    def __init__(self, spec: WorkerRestorer):
        self.spec, self.restorer = spec, None

    def setup(self, worker=None) -> None:
        if self.spec.version != __version__:
            raise ClusterError(f"this worker has df5t-deploy {__version__}, the client {self.spec.version}; "
                               "install the same version on every node")
        settings = dict(self.spec.settings)
        task = settings.pop("task")
        settings["blur_sigma"] = tuple(settings["blur_sigma"]) if settings["blur_sigma"] else None
        self.restorer = Restorer(self.spec.model, task, mask=self.spec.mask, backend=self.spec.backend,
                                 device=self.spec.device, threads=self.spec.threads, **settings)

    def teardown(self, worker=None) -> None:
        if self.restorer is not None:
            self.restorer.close()


@dataclass(frozen=True)
class ClusterRun:
    """What every task of one run needs to find and restore its part."""

    input_path: str
    series: int | None
    roi: str | None
    partial: str  # the unfinished zarr output, which holds the task store
    intensity: IntensityMap
    settings: SamplerSettings

    @property
    def store(self) -> TaskStore:
        return partial_tasks(Path(self.partial))


def run_task(run: ClusterRun, task: tuple, *after) -> str:
    """Run one task on this worker (``after``: the futures it waits for, unused)."""
    restorer: Restorer = get_worker().plugins[PLUGIN_NAME].restorer
    name = task_name(task)
    _test_hooks(name)
    with open_input(run.input_path, run.series, run.roi) as source:
        kind = task[0]
        if kind == "plane":
            z = task[1]

            def emit(index: int, unit: np.ndarray) -> None:
                write_plane_into(Path(run.partial), index, mean_and_std(unit, run.intensity)[0])

            restorer.restore_source(source, emit, run.intensity, planes=range(z, z + 1), settings=run.settings)
        elif kind == "region":
            restore_region(restorer, source, run.intensity, run.settings, task[1], task[2], run.store)
        elif kind == "blend":
            write_plane_into(Path(run.partial), task[1],
                             mean_and_std(blend_stored_regions(restorer, source, task[1], run.store), run.intensity)[0])
        else:
            isotropic = IsotropicRun(restorer, source, run.intensity, run.settings, run.store)
            if kind == "slab":
                isotropic.restore_slab(*task[1:])
            else:  # "average": a block of output planes
                z0, z1 = task[1:]
                block = isotropic.averaged(z0, z1)
                for z in range(z0, z1):
                    write_plane_into(Path(run.partial), z, mean_and_std(block[:, z - z0], run.intensity)[0])
    return name


def task_name(task: tuple) -> str:
    kind = task[0]
    if kind == "plane":
        return plane_task(task[1])
    if kind == "region":
        return region_task(task[1], task[2])
    if kind == "slab":
        return slab_task(*task[1:])
    return f"{kind}-{'-'.join(f'{n:06d}' for n in task[1:])}"


def _test_hooks(name: str) -> None:
    folder = os.environ.get(ATTEMPTS_ENV)
    if folder is None:
        return
    with open(Path(folder) / name, "a") as log:
        log.write(f"{os.getpid()}\n")
    if os.environ.get(KILL_TASK_ENV) == name and len((Path(folder) / name).read_text().splitlines()) == 1:
        os.kill(os.getpid(), signal.SIGKILL)


@dataclass
class TaskGraph:
    """The tasks still to run, each with the tasks it waits for."""

    tasks: list[tuple] = field(default_factory=list)
    waits_for: dict[tuple, list[tuple]] = field(default_factory=dict)

    def add(self, task: tuple, after: list[tuple] | None = None) -> None:
        self.tasks.append(task)
        self.waits_for[task] = after or []


def plan_tasks(restorer: Restorer, source, sink: Sink, run: ClusterRun) -> TaskGraph:
    """The tasks not yet done, by the layout of ``work`` (shape, task and --max-region only)."""
    graph, store = TaskGraph(), sink.tasks
    missing = sink.missing_planes()
    if restorer.options.task == "isotropic":
        isotropic = IsotropicRun(restorer, source, run.intensity, run.settings, store)
        isotropic.prepare_scratch()
        slabs = [("slab", *slab) for slab in isotropic.slab_tasks() if not store.is_done(slab_task(*slab))]
        for slab in slabs:
            graph.add(slab)
        for z0, z1 in isotropic.plane_blocks():
            if any(z in missing for z in range(z0, z1)):
                graph.add(("average", z0, z1), slabs)
        return graph
    regions = plane_regions(restorer, source)
    for z in missing:
        if len(regions) == 1:
            graph.add(("plane", z))
            continue
        todo = [("region", z, i) for i in range(len(regions)) if not store.is_done(region_task(z, i))]
        for region in todo:
            graph.add(region)
        graph.add(("blend", z), todo)
    return graph


class DaskRunner:
    """Runs the tasks of a restoration on a Dask cluster, for ``pipeline.restore_file``."""

    def __init__(self, client, spec: WorkerRestorer, report: Callable[[str], None] = print, quiet: bool = False):
        self.client, self.report, self.quiet = client, report, quiet
        client.register_plugin(RestorerPlugin(spec), name=PLUGIN_NAME)

    def restore(self, restorer: Restorer, source, sink: Sink, input_path, series, roi, intensity: IntensityMap,
                settings: SamplerSettings) -> None:
        from tqdm import tqdm

        if sink.tasks is None or len(sink.shape) == 3 and getattr(sink, "layout", None) and \
                sink.layout.chunks_for(sink.shape)[0] != 1:
            raise ClusterError("--cluster writes a zarr output with one plane a chunk along z")
        run = ClusterRun(str(input_path), series, roi, str(sink.tmp), intensity, settings)
        graph = plan_tasks(restorer, source, sink, run)
        futures: dict[tuple, object] = {}
        for task in graph.tasks:
            after = [futures[t] for t in graph.waits_for[task]]
            futures[task] = self.client.submit(run_task, run, task, *after, key=f"df5t-{task_name(task)}-{id(run)}",
                                               pure=False, retries=0)
        with tqdm(total=len(futures), unit="task", desc="tasks", disable=self.quiet) as bar:
            for future in as_completed(list(futures.values())):
                future.result()  # a task's error ends the run, its message first
                bar.update(1)
        sink.recount()


def connect(spec: str, config: dict | None = None):
    """A Dask client for ``--cluster``: ``local[:N]`` (N processes of one thread each),
    ``cuda`` (one worker per visible GPU, dask-cuda), ``jobqueue`` (the cluster described in
    the config's ``jobqueue`` section), or a scheduler's ``tls://`` or ``tcp://`` address
    (with the config's ``security`` section for TLS). Returns (client, cluster or None)."""
    config = config or {}
    security = Security(**config["security"]) if "security" in config else None
    dashboard = config.get("dashboard_address", "127.0.0.1:0")  # never on every interface unless configured
    if spec == "local" or spec.startswith("local:"):
        count = int(spec.partition(":")[2] or os.cpu_count() or 1)
        cluster = LocalCluster(n_workers=count, threads_per_worker=1, processes=True, dashboard_address=dashboard)
    elif spec == "cuda":
        try:
            from dask_cuda import LocalCUDACluster
        except ImportError:
            raise ClusterError("--cluster cuda needs dask-cuda: pip install dask-cuda") from None
        cluster = LocalCUDACluster(dashboard_address=dashboard)
    elif spec == "jobqueue":
        cluster = jobqueue_cluster(config)
    elif spec.startswith(("tcp://", "tls://")):
        if spec.startswith("tls://") and security is None:
            raise ClusterError("a tls:// scheduler needs certificates: a 'security' section in --cluster-config")
        return Client(spec, security=security), None
    else:
        raise ClusterError(f"--cluster {spec!r}: give local[:N], cuda, jobqueue, tcp://HOST:PORT or tls://HOST:PORT")
    return Client(cluster, security=security), cluster


def jobqueue_cluster(config: dict):
    """The dask-jobqueue cluster of the config's ``jobqueue`` section: ``kind`` (slurm, lsf or
    pbs), ``jobs`` to start, and the cluster class's own settings (cores, memory, queue, ...)."""
    section = dict(config.get("jobqueue") or {})
    kind, jobs = section.pop("kind", None), section.pop("jobs", 1)
    try:
        import dask_jobqueue
    except ImportError:
        raise ClusterError("--cluster jobqueue needs dask-jobqueue: pip install dask-jobqueue") from None
    classes = {"slurm": dask_jobqueue.SLURMCluster, "lsf": dask_jobqueue.LSFCluster, "pbs": dask_jobqueue.PBSCluster}
    if kind not in classes:
        raise ClusterError(f"--cluster-config: jobqueue kind must be one of {', '.join(classes)}, got {kind!r}")
    cluster = classes[kind](**section)
    cluster.scale(jobs=jobs)
    return cluster

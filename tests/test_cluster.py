"""Whole runs on a local Dask cluster: the same result as the single process bit for bit (a
stack, a plane larger than --max-region, isotropic), a worker killed mid-task, a client that
dies and a --resume that finishes its job."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from extras import require

from df5t_deploy import Restorer
from df5t_deploy.formats import ImageMeta, read_image, write_image
from df5t_deploy.pipeline import restore_file

require("distributed", "cluster")
from df5t_deploy.cluster import ATTEMPTS_ENV, KILL_TASK_ENV, DaskRunner, WorkerRestorer, connect  # noqa: E402

OPTIONS = {"sigma0": 0.1, "steps": 2, "seed": 8}


@pytest.fixture(scope="module")
def cluster():
    client, local = connect("local:2")
    yield client
    client.close()
    local.close()


def _inputs(tmp_path, mussel_tile3) -> dict:
    cases = {
        "stack": (np.stack([mussel_tile3[50 * i : 50 * i + 48, :64] for i in range(5)]), {}),
        "large plane": (mussel_tile3[:160, :160], {"max_region": 128}),
        "isotropic": (np.stack([mussel_tile3[30 * i : 30 * i + 48, :48] for i in range(6)]),
                      {"task": "isotropic", "z_factor": 2}),
    }
    for name, (array, _) in cases.items():
        write_image(tmp_path / f"{name}.tif", array, ImageMeta("ZYX" if array.ndim == 3 else "YX"))
    return {name: options for name, (_, options) in cases.items()}


def _on_cluster(client, model, source, output, **options):
    restorer = Restorer(model, **OPTIONS, **options)
    runner = DaskRunner(client, WorkerRestorer.like(restorer, "cpu", 1, "auto"), quiet=True)
    return restore_file(restorer, source, output, runner=runner, resume=True)


@pytest.mark.parametrize("case", ["stack", "large plane", "isotropic"])
def test_the_cluster_gives_the_single_process_result_bit_for_bit(cluster, model, mussel_tile3, tmp_path, case,
                                                                 monkeypatch):
    monkeypatch.setattr("df5t_deploy.work.SLAB_PIXELS", 6 * 48 * 16)  # several slabs a pass (client side)
    options = _inputs(tmp_path, mussel_tile3)[case]
    source = tmp_path / f"{case}.tif"
    _on_cluster(cluster, model, source, tmp_path / "cluster.zarr", **options)
    restore_file(Restorer(model, **OPTIONS, **options), source, tmp_path / "local.tif")
    np.testing.assert_array_equal(read_image(tmp_path / "cluster.zarr")[0], read_image(tmp_path / "local.tif")[0])
    assert not list(tmp_path.glob(".*")), "the run left its partial output or lock behind"


def test_a_worker_killed_mid_task_is_replaced_and_the_result_is_the_same(model, mussel_tile3, tmp_path, monkeypatch):
    attempts = tmp_path / "attempts"
    attempts.mkdir()
    monkeypatch.setenv(ATTEMPTS_ENV, str(attempts))
    monkeypatch.setenv(KILL_TASK_ENV, "plane-000002")  # the workers inherit these
    _inputs(tmp_path, mussel_tile3)
    client, local = connect("local:2")
    try:
        _on_cluster(client, model, tmp_path / "stack.tif", tmp_path / "cluster.zarr")
    finally:
        client.close()
        local.close()
    assert len((attempts / "plane-000002").read_text().splitlines()) == 2  # killed once, run again
    assert len((attempts / "plane-000003").read_text().splitlines()) == 1
    restore_file(Restorer(model, **OPTIONS), tmp_path / "stack.tif", tmp_path / "local.tif")
    np.testing.assert_array_equal(read_image(tmp_path / "cluster.zarr")[0], read_image(tmp_path / "local.tif")[0])


def _cli(*args) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", "from df5t_deploy.cli import entry; entry()", "restore",
                             *map(str, args)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    status = subprocess.run(["ps", "-o", "stat=", "-p", str(pid)], capture_output=True, text=True).stdout.strip()
    return bool(status) and not status.startswith("Z")


def test_a_killed_client_leaves_no_worker_and_resume_finishes_its_job(model, mussel_tile3, tmp_path, monkeypatch):
    attempts = tmp_path / "attempts"
    attempts.mkdir()
    monkeypatch.setenv(ATTEMPTS_ENV, str(attempts))
    volume = np.stack([mussel_tile3[20 * i : 20 * i + 48, :64] for i in range(40)])
    write_image(tmp_path / "long.tif", volume, ImageMeta("ZYX"))
    args = ["long.tif", "-o", "out.zarr", "--model", model, "--sigma0", "0.1", "--steps", "30", "--seed", "8",
            "--cluster", "local:2", "--quiet"]
    monkeypatch.chdir(tmp_path)
    client = _cli(*args)
    deadline = time.monotonic() + 120
    while len(list(attempts.iterdir())) < 6 and time.monotonic() < deadline and client.poll() is None:
        time.sleep(0.05)
    assert client.poll() is None, client.stdout.read()
    os.kill(client.pid, signal.SIGKILL)  # the client alone: its local workers must not live on
    client.wait()
    workers = {int(pid) for log in attempts.iterdir() for pid in log.read_text().split()}
    deadline = time.monotonic() + 30
    while any(_alive(pid) for pid in workers) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not any(_alive(pid) for pid in workers), "a worker outlived its killed client"
    (partial,) = tmp_path.glob(".out.zarr.partial-*")
    done_before = {m.name for m in (partial / ".df5t-tasks" / "done").iterdir()}
    assert 0 < len(done_before) < 40
    for log in attempts.iterdir():
        log.unlink()

    resumed = _cli(*args, "--resume")
    output, _ = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, output
    rerun = {log.name for log in attempts.iterdir()}
    assert rerun and not rerun & done_before, "tasks done before the client died were run again"
    restore_file(Restorer(model, sigma0=0.1, steps=30, seed=8), tmp_path / "long.tif", tmp_path / "local.tif")
    np.testing.assert_array_equal(read_image(tmp_path / "out.zarr")[0], read_image(tmp_path / "local.tif")[0])


def test_a_slurm_cluster_from_the_config_writes_the_job_script_asked_for():
    from df5t_deploy.cluster import jobqueue_cluster

    config = {"jobqueue": {"kind": "slurm", "jobs": 0, "cores": 8, "processes": 1, "memory": "64GB",
                           "queue": "gpu", "walltime": "04:00:00", "job_extra_directives": ["--gres=gpu:1"],
                           "scheduler_options": {"dashboard_address": "127.0.0.1:0"}}}
    cluster = jobqueue_cluster(config)
    try:
        script = cluster.job_script()
    finally:
        cluster.close()
    for line in ("#SBATCH -p gpu", "#SBATCH --cpus-per-task=8", "#SBATCH --mem=60G", "#SBATCH -t 04:00:00",
                 "#SBATCH --gres=gpu:1"):
        assert line in script, script
    assert "distributed.cli.dask_worker" in script and "--nthreads 8" in script


def test_cluster_options_that_cannot_work_are_refused(model, tmp_path, mussel_tile3, capsys):
    from df5t_deploy.cli import run

    write_image(tmp_path / "in.tif", mussel_tile3[:64, :64], ImageMeta("YX"))
    (tmp_path / "bad.yaml").write_text("jobqueue: {kind: torque}\n")
    base = ["restore", str(tmp_path / "in.tif"), "-o", str(tmp_path / "out.zarr"), "--model", str(model),
            "--sigma0", "0.1"]
    for args, reason in ((["--cluster", "tls://10.0.0.1:8786"], "needs certificates"),
                         (["--cluster", "jobqueue", "--cluster-config", tmp_path / "bad.yaml"], "slurm, lsf, pbs"),
                         (["--cluster", "somewhere"], "give local[:N], cuda"),
                         (["--cluster-config", tmp_path / "bad.yaml"], "applies with --cluster")):
        assert run([*base, *map(str, args)]) == 2
        assert reason in capsys.readouterr().err
    assert not (tmp_path / "out.zarr").exists()

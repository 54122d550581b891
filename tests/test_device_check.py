"""A device is checked before it is trusted: on the CPU emulation the check passes, and a
planted off-by-one makes it fall back to the host loop with a warning, or fail with strict_gpu."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner
from kernel_emulation import EmulatedDevice, build_library
from test_device_loop import EmulatedDeviceBackend

from df5t_deploy import device_check
from df5t_deploy.api import Restorer
from df5t_deploy.cli import main
from df5t_deploy.device_check import DeviceCheckError


@pytest.fixture(autouse=True)
def own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("DF5T_CACHE", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    return build_library(tmp_path_factory.mktemp("good"))


@pytest.fixture(scope="module")
def off_by_one(tmp_path_factory):
    return build_library(tmp_path_factory.mktemp("bad"), defines=("DF5T_EMU_SKEW=1",))


def test_the_emulated_device_passes_every_walk(good):
    verdict = device_check.self_check(EmulatedDevice(good))
    assert verdict.passed, verdict.summary
    walks = json.loads(verdict.details.read_text())["walks"]
    assert set(walks) == set(device_check._walks()) and all(w["passed"] for w in walks.values())


def test_an_off_by_one_kernel_fails_the_check_and_says_where(off_by_one):
    verdict = device_check.self_check(EmulatedDevice(off_by_one))
    assert not verdict.passed and "denoise" in verdict.summary and verdict.details.is_file()


def test_a_device_that_fails_runs_the_host_loop_with_one_warning(off_by_one, model, mussel_tile3):
    image = mussel_tile3[:40, :52].astype(np.float32)
    settings = dict(sigma0=0.1, steps=3, seed=2)
    host = Restorer(model, **settings).restore_full(image)
    device = EmulatedDevice(off_by_one)
    restorer = Restorer(model, backend=EmulatedDeviceBackend(model, device), **settings)
    with pytest.warns(UserWarning, match="failed its self-check.*details in .*host loop") as caught:
        result = restorer.restore_full(image)
        launched_by_the_check = len(device.launches)
        restorer.restore_full(image)  # the verdict is kept: no second warning
    assert len([w for w in caught if "self-check" in str(w.message)]) == 1
    np.testing.assert_array_equal(result.image, host.image)
    assert launched_by_the_check > 0 and len(device.launches) == launched_by_the_check  # restorations: host loop


def test_strict_gpu_makes_a_failed_check_an_error(off_by_one, model, mussel_tile3):
    restorer = Restorer(model, sigma0=0.1, steps=3, strict_gpu=True,
                        backend=EmulatedDeviceBackend(model, EmulatedDevice(off_by_one)))
    with pytest.raises(DeviceCheckError, match="failed its self-check"):
        restorer.restore(mussel_tile3[:40, :52])


def test_a_passing_verdict_is_cached_per_device_package_and_kernels(good, model, mussel_tile3, monkeypatch):
    runs = []
    real = device_check.self_check
    monkeypatch.setattr(device_check, "self_check", lambda device: runs.append(1) or real(device))
    for _ in range(2):
        restorer = Restorer(model, sigma0=0.1, steps=3, backend=EmulatedDeviceBackend(model, EmulatedDevice(good)))
        restorer.restore(mussel_tile3[:40, :52])
    assert len(runs) == 1  # the second Restorer read the cached verdict
    monkeypatch.setattr(device_check, "__version__", "99.0")  # a new package version checks again
    Restorer(model, sigma0=0.1, steps=3, backend=EmulatedDeviceBackend(model, EmulatedDevice(good))).restore(
        mussel_tile3[:40, :52])
    assert len(runs) == 2


def test_doctor_selftest_reports_per_gpu_or_that_there_is_none():
    result = CliRunner().invoke(main, ["doctor", "--json", "--selftest"])
    assert result.exit_code == 0, result.output
    verdicts = json.loads(result.output)["selftest"]
    try:
        import torch

        gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    except ImportError:
        gpus = 0
    assert len(verdicts) == gpus

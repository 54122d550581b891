"""The one-command GPU verification, on a machine without a GPU: it says so (exit 3,
``status: no-gpu``) after the test collection, and fails on what it cannot do."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from df5t_deploy import gpu_verify

REPO = Path(__file__).resolve().parents[1]


def _has_cuda() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


def test_without_a_gpu_it_exits_3_with_a_no_gpu_report(tmp_path):
    if _has_cuda():
        pytest.skip("this machine has a CUDA GPU: the no-GPU path cannot be shown here")
    started = time.monotonic()
    result = subprocess.run([sys.executable, "-m", "df5t_deploy.gpu_verify", "--report", str(tmp_path), "--no-install"],
                            cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == gpu_verify.EXIT_NO_GPU, result.stdout[-2000:] + result.stderr[-2000:]
    assert time.monotonic() - started < 120
    report = (tmp_path / "report.md").read_text()
    assert report.splitlines()[0] == "status: no-gpu"
    assert "- test collection: ok" in report and "cuda_gpu: False" in report


def test_a_test_collection_error_is_a_failure(tmp_path, monkeypatch):
    def fake_stream(command, cwd, log, env=None):
        log.write_text("ERROR collecting tests/test_gpu.py\n")
        return 2

    monkeypatch.setattr(gpu_verify, "stream", fake_stream)
    monkeypatch.setattr(gpu_verify, "machine_facts", lambda: {"cuda_gpu": False})
    report = gpu_verify.Report(tmp_path)
    assert gpu_verify.verify(REPO, report, gpu_verify.PARTS, install=False) == gpu_verify.EXIT_FAIL
    assert ("test collection", "failed (exit 2); see collect.log") in report.stages


def test_a_missing_dependency_without_a_wheelhouse_fails_the_install_and_says_why(tmp_path, monkeypatch):
    monkeypatch.setattr(gpu_verify, "RUNTIME_MODULES", {"df5t_no_such_module": "df5t-no-such-dist"})
    repo = tmp_path / "repo"
    repo.mkdir()
    report = gpu_verify.Report(tmp_path / "report")
    assert not gpu_verify.install_package(repo, report)
    assert "missing df5t-no-such-dist" in report.stages[-1][1] and "make gpu-wheelhouse" in report.stages[-1][1]


def test_junit_outcomes_name_every_test_and_its_outcome(tmp_path):
    junit = tmp_path / "junit.xml"
    junit.write_text(
        '<testsuites><testsuite name="pytest">'
        '<testcase classname="tests.test_gpu" name="test_a"/>'
        '<testcase classname="tests.test_gpu" name="test_b"><failure message="PSNR 31.0 &lt; 50">trace</failure></testcase>'
        '<testcase classname="tests.test_engines" name="test_c"><skipped message="TensorRT is not installed"/></testcase>'
        '<testcase classname="tests.test_x" name="test_d"><error message="fixture failed"/></testcase>'
        "</testsuite></testsuites>")
    assert gpu_verify.junit_outcomes(junit) == [
        ("tests.test_gpu::test_a", "passed", ""),
        ("tests.test_gpu::test_b", "failed", "PSNR 31.0 < 50"),
        ("tests.test_engines::test_c", "skipped", "TensorRT is not installed"),
        ("tests.test_x::test_d", "error", "fixture failed"),
    ]


def test_a_sanitizer_the_machine_refuses_is_not_run_rather_than_failed(tmp_path, monkeypatch):
    def refused(command, cwd, log, env=None):
        assert env["PYTORCH_NO_CUDA_MEMORY_CACHING"] == "1"
        log.write_text("========= Error: Unable to attach to the target process (the container forbids it)\n")
        return 1

    def found_errors(command, cwd, log, env=None):
        log.write_text("========= Invalid __global__ read of size 4\n========= ERROR SUMMARY: 1 error\n")
        return 99

    monkeypatch.setattr(gpu_verify.shutil, "which", lambda name: "/usr/bin/" + name)
    report = gpu_verify.Report(tmp_path)
    monkeypatch.setattr(gpu_verify, "stream", refused)
    assert gpu_verify.run_sanitizer(REPO, report, "memcheck")
    assert report.stages[-1][1].startswith("not run: the machine refused it")
    monkeypatch.setattr(gpu_verify, "stream", found_errors)
    assert not gpu_verify.run_sanitizer(REPO, report, "initcheck")
    assert report.stages[-1][1].startswith("failed (exit 99)")


def test_the_benchmark_reports_ratios_and_missed_targets_from_whatever_rows_finished():
    sys.path.insert(0, str(REPO / "benchmarks"))
    import gpu_throughput

    def row(name, size, seconds):
        return {"row": name, "size": size, "tile": 256, "seconds": seconds, "tile_steps_per_s": 1.0, "mpix_per_s": 1.0,
                "gpu_memory_gb": 1.0, "network_share": 0.5, "tflops": 1.0, "tflops_vs_peak": 0.1}

    report = {"tile": 256, "overlap": 32, "steps": 20, "ratio_size": 1024, "size": 4096, "matrix_peak_tflops_fp16": 700,
              "machine": {"gpu": "test"}, "rows": [row("reference-style", 1024, 12.0), row("PyTorch fp16 loop on the GPU", 1024, 5.0),
                                                    row("ours", 1024, 4.0), row("operator kernels alone", 1024, 0.1)]}
    ratios = gpu_throughput.ratios(report)
    assert ratios["vs_reference"] == 3.0 and ratios["vs_torch_loop"] == 1.25 and ratios["kernel_share"] == 0.025
    assert ratios["full_image_seconds"] is None  # the 4096 row never finished
    table = gpu_throughput._table(report)
    assert "3.0 (meets target >= 3.0)" in table and "1.25 (MISSES target >= 1.3)" in table
    assert "in not measured s" in table

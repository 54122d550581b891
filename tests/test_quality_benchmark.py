"""The quality benchmark: its smoke run works end to end, its held-out splits never overlap,
and the README's quality table is the one the results file gives."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
import paired_rows  # noqa: E402
import quality  # noqa: E402


def test_the_readme_table_is_generated_from_the_results_file():
    results = json.loads((REPO / "benchmarks" / "results" / "quality.json").read_text())
    readme = (REPO / "README.md").read_text()
    assert quality.readme_block(results) in readme


def test_validation_and_test_parts_never_overlap(em_dir):
    for dataset in quality.datasets(em_dir):
        volume = np.zeros(dataset.volume.shape, bool)
        volume[dataset.validation] = True
        assert volume.any() and not volume[dataset.test].any(), dataset.name


def test_the_paired_difference_is_taken_on_the_same_crops():
    case = {"scores": {"bicubic": [[30.0, 0.9], [20.0, 0.8], [25.0, 0.7]],
                       "Lanczos": [[29.0, 0.9], [21.0, 0.8], [26.0, 0.7]],
                       "DDRM 20 steps x 4": [[31.0, 0.9], [19.0, 0.8], [25.5, 0.7]],
                       "DDRM 50 steps x 4": [[29.5, 0.9], [22.0, 0.8], [26.0, 0.7]]}}
    summary = quality.summary(case)
    assert summary["best_classical"] == "Lanczos"  # 25.33 against 25.0 dB
    first = summary["methods"]["DDRM 20 steps x 4"]["vs_best"]
    assert first["mean"] == pytest.approx((2.0 - 2.0 - 0.5) / 3) and first["won"] == 1
    assert summary["methods"]["DDRM 50 steps x 4"]["vs_best"]["mean"] == pytest.approx(0.5)
    assert summary["methods"]["DDRM 50 steps x 4"]["vs_best"]["won"] == 2


def test_smoke_run(tmp_path, em_dir):
    readme_before = (REPO / "README.md").read_text()
    result = subprocess.run([sys.executable, str(REPO / "benchmarks" / "quality.py"), "--smoke", "--data", str(em_dir),
                             "--out", str(tmp_path)], capture_output=True, text=True, timeout=1200)
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads((tmp_path / "quality.json").read_text())
    assert len(results["cases"]) == 16
    for case in results["cases"]:
        lengths = {len(scores) for label, scores in case["scores"].items()}
        assert lengths == {2}, case["task"]
    assert (REPO / "README.md").read_text() == readme_before  # --smoke never rewrites the README


def test_a_partial_run_keeps_to_its_tasks_and_rows_and_never_replaces_the_full_results(tmp_path, em_dir, monkeypatch):
    full = {path.name: path.read_bytes() for path in (REPO / "benchmarks" / "results").glob("quality.*")}
    readme_before = (REPO / "README.md").read_text()
    monkeypatch.setattr(quality, "PARTIAL_RESULTS", tmp_path)
    quality.main(["--smoke", "--task", "inpaint", "--rows", "2x1", "--rows", "2x1:weighted", "--data", str(em_dir)])
    results = json.loads((tmp_path / "quality.json").read_text())
    assert [case["task"] for case in results["cases"]] == ["inpaint"] * 3
    for case in results["cases"]:
        assert case["ddrm_rows"] == [[2, 1], [2, 1, "weighted"]]
        published, weighted = (case["scores"][f"DDRM 2 steps x 1{suffix}"] for suffix in ("", ", weighted final step"))
        assert published != weighted  # the same walks, finished two ways
    assert "--task inpaint --rows 2x1 --rows 2x1:weighted" in results["header"]
    table = paired_rows.table(tmp_path, (2, 1), (2, 1, "weighted")).splitlines()
    assert len(table) == 2 + 3 and all(line.startswith("| inpaint |") for line in table[2:])
    with pytest.raises(SystemExit, match="not these"):  # the full run's crops are other crops
        paired_rows.table(tmp_path, (2, 1), (2, 1, "weighted"), baseline_from=REPO / "benchmarks" / "results")
    with pytest.raises(SystemExit, match="has no row DDRM 3 steps x 1"):
        paired_rows.table(tmp_path, (2, 1), (3, 1))
    with pytest.raises(SystemExit, match="quality.json not found"):
        paired_rows.table(tmp_path / "elsewhere", (2, 1), (2, 1, "weighted"))
    assert {path.name: path.read_bytes() for path in (REPO / "benchmarks" / "results").glob("quality.*")} == full
    assert (REPO / "README.md").read_text() == readme_before


@pytest.mark.parametrize("text", ["20", "0x4", "20x", "x4", "20*4"])
def test_a_row_that_is_not_steps_x_samples_is_refused(text):
    with pytest.raises(SystemExit):
        quality.main(["--rows", text])


@pytest.mark.parametrize("row, named", [
    (quality.FULL_WALK_ROW, quality.FULL_WALK_ROW), ((50, 4), (50, 4)), ((20, 4, "network"), (20, 4)),
    ((2, 4, "weighted", "matched"), (2, 4, "weighted", "matched")), ((2, 4, "network", "matched"), (2, 4, "network", "matched")),
    ((20, 4, "weighted", "full"), (20, 4, "weighted")), ((20, 4, "network", "full"), (20, 4))])
def test_a_row_reads_back_from_its_text_and_names_only_departures_from_the_published_sampler(row, named):
    assert quality.ddrm_row(quality.row_text(row)) == named
    full = quality._full_row(row)
    assert ("final step" in quality.ddrm_label(*row)) == (full[2] != "network")
    assert ("matched walk" in quality.ddrm_label(*row)) == (full[3] == "matched")


def test_denoising_runs_the_restorers_defaults_and_the_other_tasks_20_x_4():
    from df5t_deploy.settings import DEFAULT_WALK, TASK_SAMPLES, TASK_STEPS

    for task in quality.tasks():
        (row,) = quality.default_rows(task)
        if task.restorer_task == "denoise":
            assert quality._full_row(row)[:2] == (TASK_STEPS["denoise"], TASK_SAMPLES["denoise"])
            assert quality._full_row(row)[3] == DEFAULT_WALK
        else:
            assert row == (20, 4, "weighted")


def test_the_eta_study_restores_each_validation_crop_at_the_eta_it_names(em_dir, monkeypatch):
    import eta_on_validation

    monkeypatch.setattr(quality, "VALIDATION_CROPS", 1)
    monkeypatch.setattr(quality, "default_rows", lambda task: ((2, 1, "weighted"),))
    denoise = next(task for task in quality.tasks() if task.name == "denoise")
    dataset = next(d for d in quality.datasets(em_dir) if d.name in denoise.datasets)
    deterministic, stochastic = (eta_on_validation.validation_psnr(denoise, dataset, None, eta) for eta in (0.0, 1.0))
    assert len(deterministic) == len(stochastic) == 1
    assert deterministic != stochastic  # the eta reached the Restorer

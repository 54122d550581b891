"""README promises, each checked so that a plausible wrong implementation fails
(``tests/mutations.py`` applies such wrong implementations and expects this suite to fail)."""

from __future__ import annotations

import hashlib
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tifffile
from click.testing import CliRunner
from extras import require
from test_sampler import DenseDDRM, N, _measure, dense_operator

from df5t_deploy.api import Restorer
from df5t_deploy.artifact import Schedule
from df5t_deploy.cli import main
from df5t_deploy.formats import read_provenance
from df5t_deploy.intensity import intensity_map_for_source
from df5t_deploy.noise import NoiseKey, philox4x32
from df5t_deploy.operators import BlockMean, Identity, Inpainting
from df5t_deploy.progress import ProgressTracker
from df5t_deploy.sampler import DDRM, SamplerSettings, run_ddrm, weigh_in_measurement
from df5t_deploy.settings import (
    PUBLISHED_ETA,
    PUBLISHED_SAMPLES,
    PUBLISHED_STEPS,
    TASK_ETA,
    TASK_SAMPLES,
    TASK_STEPS,
    RestoreSettings,
)
from df5t_deploy.streaming import ArraySource
from df5t_deploy.tasks import TASKS
from df5t_deploy.walks import restore_group

TILE = 32
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def crop(mussel_tile3) -> np.ndarray:
    return mussel_tile3[400:448, 600:640]


def cli(*args):
    result = CliRunner().invoke(main, [str(a) for a in args])
    return result.exit_code, result.output


# ------------------------------------------------------------------ the measurement matters


def _whole_loop(op, y, noises, steps=6, sigma0=0.05):
    """Our DDRM and the dense-SVD reference, whole walks with the same eps network and noise."""
    schedule = Schedule(1000)
    ddrm = DDRM(op, schedule, SamplerSettings(sigma0=sigma0, steps=steps))
    dense = DenseDDRM(dense_operator(op), sigma0, 0.85, 1.0, 1e-9)

    def eps_fn(x, t):  # a network that depends on its input and on t
        return (0.3 + t / 4000.0) * x

    ours = run_ddrm(ddrm, y.astype(np.float32), lambda x, t: eps_fn(x, t).astype(np.float32),
                    lambda step: noises[step])
    y_dense = y[~op.missing] if isinstance(op, Inpainting) else y.ravel()
    ybar = dense.ybar(y_dense)
    walk = ddrm.timesteps
    x = dense.init(ybar, noises[len(walk)].ravel().astype(np.float64), walk.init_sigma, walk.alphas_bar[walk.start],
                   walk.published)
    for plan in ddrm.timesteps:
        x = dense.step(x, eps_fn(x, plan.t), ybar, noises[plan.index].ravel().astype(np.float64),
                       plan.alpha_bar, plan.alpha_bar_next)
    return ours.ravel(), x


@pytest.mark.parametrize("what_changes", ["the measurement", "the mask", "the operator"])
def test_whole_walks_follow_the_measurement_like_the_dense_svd_reference(what_changes):
    """Two walks that differ only in ``what_changes``: each equals the dense-SVD reference, and
    the two expected results differ, so a sampler that ignored it would fail."""
    rng = np.random.default_rng(3)
    truth, other_truth = (np.repeat(rng.uniform(-1, 1, (1, N, N)), 3, axis=0) for _ in range(2))
    ops = {"the measurement": (Identity((N, N)), Identity((N, N))),
           "the mask": (Inpainting(rng.random((N, N)) < 0.3), Inpainting(rng.random((N, N)) < 0.3)),
           "the operator": (BlockMean((N, N), (2, 2)), BlockMean((N, N), (4, 4)))}[what_changes]
    truths = (truth, other_truth) if what_changes == "the measurement" else (truth, truth)
    noises = [rng.standard_normal((3, N, N)).astype(np.float32) for _ in range(8)]
    measurement_noise = np.random.default_rng(4)
    expected = []
    for op, x in zip(ops, truths, strict=True):
        ours, reference = _whole_loop(op, _measure(op, x, measurement_noise, 0.05), noises)
        np.testing.assert_allclose(ours, reference, atol=1e-4)  # measured: under 1e-5 (float32 vs float64)
        expected.append(reference)
    assert np.abs(expected[0] - expected[1]).mean() > 0.05


# ------------------------------------------------------------------ uncertainty, sha256, isotropic


def test_uncertainty_is_the_std_over_the_individual_samples(model, crop, tmp_path):
    restorer = Restorer(model, sigma0=0.1, steps=4, seed=2, samples=3)
    image = crop.astype(np.float32)
    source = ArraySource(image)
    intensity = intensity_map_for_source(source)
    samples = {}
    restorer.restore_source(source, lambda z, unit: samples.setdefault(z, unit.copy()), intensity)
    individual = samples[0] * np.float32(intensity.high - intensity.low) + np.float32(intensity.low)  # input units
    assert len(individual) == 3 and np.abs(individual[0] - individual[1]).max() > 0
    expected = np.std(individual.astype(np.float64), axis=0)
    result = restorer.restore_full(image)
    np.testing.assert_allclose(result.std, expected, rtol=1e-4, atol=1e-3)  # measured: float32 rounding
    tifffile.imwrite(tmp_path / "in.tif", image)
    code, output = cli("restore", tmp_path / "in.tif", "-o", tmp_path / "out.tif", "--model", model, "--sigma0",
                       "0.1", "--steps", "4", "--seed", "2", "--samples", "3", "--uncertainty", tmp_path / "std.tif",
                       "--quiet")
    assert code == 0, output
    np.testing.assert_allclose(tifffile.imread(tmp_path / "std.tif"), expected, rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("suffix", [".tif", ".ome.tif", ".mrc", ".zarr", ".png"])
def test_the_recorded_provenance_reads_back_from_every_format(model, crop, tmp_path, suffix):
    tifffile.imwrite(tmp_path / "in.tif", crop)
    out = tmp_path / f"out{suffix}"
    code, output = cli("restore", tmp_path / "in.tif", "-o", out, "--model", model, "--sigma0", "0.1", "--steps",
                       "2", "--seed", "4", "--quiet")
    assert code == 0, output
    provenance = read_provenance(out)
    assert provenance["model_sha256"] == hashlib.sha256(model.read_bytes()).hexdigest()
    assert provenance["run_identity"]["input_sha256"] == hashlib.sha256((tmp_path / "in.tif").read_bytes()).hexdigest()
    assert provenance["seed"] == 4 and provenance["steps"] == 2 and provenance["task"] == "denoise"


def test_isotropic_is_the_mean_of_its_xz_and_yz_passes_computed_independently(model, mussel_tile3):
    k, seed = 2, 6
    volume = np.stack([mussel_tile3[300 + 40 * i : 324 + 40 * i, 500:520] for i in range(4)]).astype(np.float32)
    restorer = Restorer(model, "isotropic", sigma0=0.1, steps=3, seed=seed, z_factor=k, final_step="weighted")
    result = restorer.restore_full(volume)
    intensity = result.intensity
    settings = SamplerSettings(sigma0=0.1, steps=3, eta=restorer.eta)  # the task's default eta
    z, ny, nx = volume.shape
    tracker = ProgressTracker(None, 1, 1, 1)

    def one_pass(planes, orientation):  # planes [N, Z, L]: each restored alone, noise keyed by its index
        op = BlockMean((z * k, planes.shape[2]), (k, 1))

        def restored(i, plane):  # the walk, then its final step
            y = intensity.to_model(plane[None])
            walked = restore_group(y, op, restorer.schedule, settings, restorer.denoiser,
                                   NoiseKey(seed, orientation, [i]), 1, tracker)
            return weigh_in_measurement(walked, y, op, settings.sigma0)[0, 0]

        return np.stack([restored(i, plane) for i, plane in enumerate(planes)])

    xz = one_pass(np.moveaxis(volume, 1, 0), 1)  # [Y, Z*k, X]
    yz = one_pass(np.moveaxis(volume, 2, 0), 2)  # [X, Z*k, Y]
    fused = 0.5 * np.moveaxis(xz, 0, 1) + 0.5 * np.moveaxis(yz, 0, 2)  # [Z*k, Y, X]
    np.testing.assert_allclose(result.image, intensity.from_unit(fused), rtol=1e-5, atol=1e-3)
    assert np.abs(np.moveaxis(xz, 0, 1) - fused).mean() > 1e-3  # the two passes differ: dropping one shows


# ------------------------------------------------------------------ reproducibility


def _restore_in_a_fresh_process(model, source, out, *extra):
    result = subprocess.run([sys.executable, "-m", "df5t_deploy.cli", "restore", str(source), "-o", str(out),
                             "--model", str(model), "--sigma0", "0.1", "--steps", "3", "--seed", "9", "--quiet",
                             *extra], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    return tifffile.imread(out)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [np.float32, np.uint16])
def test_reruns_are_bit_identical_in_another_process(model, crop, tmp_path, dtype):
    tifffile.imwrite(tmp_path / "in.tif", (crop.astype(np.float32) * 3.7).astype(dtype))
    first = _restore_in_a_fresh_process(model, tmp_path / "in.tif", tmp_path / "a.tif")
    again = _restore_in_a_fresh_process(model, tmp_path / "in.tif", tmp_path / "b.tif")
    in_process = Restorer(model, sigma0=0.1, steps=3, seed=9).restore(tifffile.imread(tmp_path / "in.tif"))
    assert first.dtype == dtype and first.tobytes() == again.tobytes() == in_process.tobytes()


#: Philox4x32-10 known-answer vectors of Random123 (kat_vectors: counter, key -> output).
PHILOX_KAT = [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 4, (0xFFFFFFFF, 0xFFFFFFFF), (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
]


@pytest.mark.parametrize("counter, key, expected", PHILOX_KAT)
def test_philox_matches_the_random123_known_answers(counter, key, expected):
    assert tuple(int(v) for v in philox4x32(np.array(counter, np.uint32), key)) == expected


def test_philox_matches_randomgen_at_random_counters_and_keys():
    randomgen = require("randomgen", "test")
    rng = np.random.default_rng(1)
    for _ in range(20):
        counter = rng.integers(0, 2**32, 4, dtype=np.uint64).astype(np.uint32)
        key = tuple(int(v) for v in rng.integers(0, 2**32, 2, dtype=np.uint64))
        # randomgen increments its counter before each block: start it one below ours
        start = ((int(counter[0]) | int(counter[1]) << 32 | int(counter[2]) << 64 | int(counter[3]) << 96) - 1) % 2**128
        generator = randomgen.Philox(counter=np.array([start & (2**64 - 1), start >> 64], np.uint64),
                                     key=np.array([key[0] | key[1] << 32], np.uint64), number=4, width=32)
        theirs = [int(v) for v in generator.random_raw(4)]
        assert theirs == [int(v) for v in philox4x32(counter, key)]


@pytest.mark.parametrize("batch", [3, 8])  # 3: the last chunk of 20 tiles is partial
def test_batch_size_changes_nothing_on_the_cpu_bit_for_bit(model, mussel_tile3, batch):
    image = mussel_tile3[:100, :130].astype(np.float32)  # 20 tiles of 32 with overlap 4
    one = Restorer(model, sigma0=0.1, steps=4, seed=1, batch=1).restore_full(image)
    other = Restorer(model, sigma0=0.1, steps=4, seed=1, batch=batch).restore_full(image)
    assert one.image.tobytes() == other.image.tobytes()


# ------------------------------------------------------------------ defaults as documented


def test_cli_defaults_are_the_published_run_and_the_design(shared_dir, model):
    reference = (shared_dir / "REFERENCE.md").read_text()
    published = re.search(r"Published run: `--timesteps (\d+) --sigma_0 [\d.]+`, eta = ([\d.]+).*?etaB = ([\d.]+)",
                          reference, re.S)
    assert published, "REFERENCE.md no longer states the published run"
    defaults = {p.name: p.default for p in main.commands["restore"].params}
    assert PUBLISHED_STEPS == int(published.group(1)) and defaults["eta_b"] == float(published.group(3))
    # steps, samples and eta: the published ones for every task but those we depart for on purpose
    # (settings.TASK_STEPS, TASK_SAMPLES, TASK_ETA; README)
    assert defaults["eta"] is defaults["steps"] is defaults["samples"] is None
    assert PUBLISHED_ETA == float(published.group(2)) and PUBLISHED_SAMPLES == 1
    for task in TASKS:
        settings = RestoreSettings(task=task, sigma0=0.1)
        assert settings.eta == TASK_ETA.get(task, PUBLISHED_ETA), task
        assert settings.steps == TASK_STEPS.get(task, PUBLISHED_STEPS), task
        assert settings.samples == TASK_SAMPLES.get(task, PUBLISHED_SAMPLES), task
    assert set(TASK_STEPS) == set(TASK_SAMPLES) == {"denoise"}  # the matched walk's task (README)
    assert "default tile/8" in (shared_dir / "DESIGN.md").read_text() and defaults["overlap"] is None
    assert Restorer(model, sigma0=0.1).overlap == TILE // 8
    restorer = Restorer(model, "sr", sigma0=0.1)
    assert (restorer.steps, restorer.eta, restorer.eta_b) == (PUBLISHED_STEPS, TASK_ETA.get("sr", PUBLISHED_ETA),
                                                              defaults["eta_b"])


# ------------------------------------------------------------------ export checks itself


def test_export_refuses_an_artifact_whose_error_exceeds_its_bound(fixtures_dir, tmp_path, monkeypatch):
    pytest.importorskip("torch", reason="export needs the [export] extra")
    from df5t_deploy.export import onnx_export

    real_run = onnx_export._run_onnxruntime

    def perturbed(path, x, t):  # as if the artifact computed something slightly different
        out = real_run(path, x, t)
        return out + 1e-3 * np.abs(out).max()

    monkeypatch.setattr(onnx_export, "_run_onnxruntime", perturbed)
    out = tmp_path / "tiny.onnx"
    code, output = cli("export", fixtures_dir / "df5t_reference_tiny.pt", "-o", out, "--tile", "64")
    assert code == 1 and "onnxruntime differs from PyTorch" in output, output
    assert not out.exists() and not list(tmp_path.iterdir())


def test_the_whole_64_bit_seed_keys_the_noise(model, crop):
    """Seeds that share their low 32 bits are different seeds."""
    low = Restorer(model, sigma0=0.1, steps=3, seed=5).restore(crop)
    high = Restorer(model, sigma0=0.1, steps=3, seed=5 + 2**32).restore(crop)
    assert np.abs(low.astype(int) - high.astype(int)).mean() > 0.5


def test_settings_are_declared_once_and_reach_the_cli_the_api_and_the_provenance(model, crop, tmp_path):
    from dataclasses import fields

    from df5t_deploy.settings import RestoreSettings

    options = {p.name: p for p in main.commands["restore"].params}
    restorer = Restorer(model, sigma0=0.1, steps=2)
    result = restorer.restore_full(crop)
    for field in fields(RestoreSettings):
        assert options[field.name].default == field.default, f"--{field.name} default differs from RestoreSettings"
        assert field.name in result.provenance, f"{field.name} missing from the provenance"
    with pytest.raises(TypeError, match="unknown settings \\['step'\\]"):
        Restorer(model, sigma0=0.1, step=3)

"""The runtime end to end: plumbing, determinism, statistics of the sampler, and bad input."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
import tifffile
from click.testing import CliRunner
from onnx_models import exact_denoiser, gaussian_prior_denoiser, tile_mean_model

from df5t_deploy.api import Restorer
from df5t_deploy.cli import main
from df5t_deploy.files import atomic_path
from df5t_deploy.formats import read_image, read_provenance
from df5t_deploy.settings import PUBLISHED_ETA, TASK_ETA

TILE = 32


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    d = tmp_path_factory.mktemp("models")
    return {
        "exact": exact_denoiser(d / "exact.onnx", TILE, x0=0.3),
        "prior": gaussian_prior_denoiser(d / "prior.onnx", TILE, prior_std=0.3),
        "mean": tile_mean_model(d / "mean.onnx", TILE, gain=0.5),
        "no-metadata": tile_mean_model(d / "plain.onnx", TILE, metadata=False),
    }


@pytest.fixture(scope="module")
def em_crop(em_dir):
    """A real, non-square EM crop that is not a whole number of tiles."""
    return tifffile.imread(em_dir / "micrograph_vemstitch-mussel_tile3_2_2_1768x2048.tif")[400:448, 600:640]


def cli(*args):
    result = CliRunner().invoke(main, [str(a) for a in args])
    return result.exit_code, result.output


TASKS = {
    "denoise": {},
    "sr": {"scale": 2},
    "deblur": {"blur_sigma": 1.5},
    "inpaint": {"mask": "given"},
}


def _task_kwargs(task, shape):
    kwargs = dict(TASKS[task])
    if task == "inpaint":
        mask = np.zeros(shape, bool)
        mask[10:30, 5:25] = True
        kwargs["mask"] = mask
    return kwargs


@pytest.mark.parametrize("task", list(TASKS))
def test_exact_denoiser_gives_back_its_x0(models, em_crop, task):
    """The published final step keeps the network's last x0 (the weighted one: test_final_step.py)."""
    restorer = Restorer(models["exact"], task, sigma0=0.1, steps=20, seed=3, overlap=8, final_step="network",
                        **_task_kwargs(task, em_crop.shape))
    out = restorer.restore(em_crop)
    expected = round((0.3 + 1) / 2 * 255)  # x0 = 0.3 on the [-1,1] scale, uint8 map v/255
    assert out.dtype == np.uint8
    assert out.shape == tuple(s * restorer.options.factor for s in em_crop.shape)
    np.testing.assert_array_equal(out, expected)


def test_eta_defaults_per_task_and_the_provenance_records_the_one_used(models, em_crop, tmp_path):
    denoised = Restorer(models["mean"], sigma0=0.1, steps=4, seed=2)
    assert denoised.settings.eta == TASK_ETA["denoise"] != PUBLISHED_ETA
    published = Restorer(models["mean"], sigma0=0.1, steps=4, seed=2, eta=PUBLISHED_ETA)
    assert np.abs(denoised.restore(em_crop).astype(int) - published.restore(em_crop).astype(int)).max() > 0
    for task in TASKS:
        assert Restorer(models["mean"], task=task, sigma0=0.1, **_task_kwargs(task, em_crop.shape)).settings.eta \
            == TASK_ETA.get(task, PUBLISHED_ETA), task
    tifffile.imwrite(tmp_path / "in.tif", em_crop)
    code, output = cli("restore", tmp_path / "in.tif", "-o", tmp_path / "out.tif", "--model", models["mean"],
                       "--sigma0", "0.1", "--steps", "2", "--quiet")
    assert code == 0, output
    assert read_provenance(tmp_path / "out.tif")["eta"] == TASK_ETA["denoise"]


def test_same_seed_same_result_other_seed_differs(models, em_crop):
    first = Restorer(models["mean"], sigma0=0.1, steps=10, seed=7).restore(em_crop)
    again = Restorer(models["mean"], sigma0=0.1, steps=10, seed=7).restore(em_crop)
    other = Restorer(models["mean"], sigma0=0.1, steps=10, seed=8).restore(em_crop)
    np.testing.assert_array_equal(first, again)
    assert np.abs(first.astype(int) - other.astype(int)).mean() > 0.5


def _zero_noise_reference(model, task, image, sigma0, steps, mask_file=None, **kwargs):
    """The sampler's walk with a noise source that draws zeros, on the Restorer's own parts
    (operator, tiles and blend, intensity map)."""
    from df5t_deploy.api import NoiseLevel
    from df5t_deploy.intensity import intensity_map_for
    from df5t_deploy.noise import ORIENTATION_XY, NoiseKey
    from df5t_deploy.progress import ProgressTracker
    from df5t_deploy.tasks import missing_pixels
    from df5t_deploy.walks import restore_group

    mask = read_image(mask_file)[0] if mask_file else None
    restorer = Restorer(model, task, sigma0=sigma0, steps=steps, overlap=4, mask=mask, final_step="network",
                        eta=PUBLISHED_ETA, **kwargs)
    intensity = intensity_map_for(image)
    missing = missing_pixels(restorer.options, image) if task == "inpaint" else None
    y = intensity.to_model(image if missing is None else np.where(missing, 0, image))[None]
    op = restorer.options.operator(restorer.options.grid_shape(image.shape), missing)
    shape = (1, 3, *op.shape)
    samples = restore_group(y, op, restorer.schedule, restorer.sampler_settings(NoiseLevel(sigma0)), restorer.denoiser,
                            NoiseKey(0, ORIENTATION_XY, [0]), 1, ProgressTracker(None, 1, 1, 1),
                            noise=lambda step: np.zeros(shape, np.float32))
    return intensity.from_unit(samples[0].mean(axis=0))


@pytest.mark.parametrize("task, extra", [("denoise", []), ("sr", ["--scale", "2"]), ("inpaint", ["--mask", "MASK"])])
def test_mean_of_seeded_runs_matches_the_noise_free_sampler(tmp_path, models, em_crop, task, extra):
    """With a model linear in x the sampler is linear in its noise: the mean over seeds is the
    noise-free run, within sampling error (and a wrong sigma0 is detected). The walk alone: the
    weighted final step, which estimates its weights from each image, is not linear. At the
    published eta: at eta 1 (sr's and inpaint's default) the noise-free walk ends on the
    network's x0 wherever sigma0 outweighs the schedule, so a wrong sigma0 barely moves it."""
    image = em_crop.astype(np.float32)
    if task == "sr":
        image = image.reshape(24, 2, 20, 2).mean(axis=(1, 3))
    source = tmp_path / "in.tif"
    tifffile.imwrite(source, image)
    mask_file = None
    if task == "inpaint":
        mask_file = tmp_path / "mask.tif"
        mask = np.zeros(image.shape, np.uint8)
        mask[12:36, 8:30] = 1
        tifffile.imwrite(mask_file, mask)
        extra = ["--mask", mask_file]
    runs = []
    for seed in range(32):
        out = tmp_path / f"out{seed}.tif"
        code, output = cli("restore", source, "-o", out, "--model", models["prior"], "--task", task,
                           "--sigma0", "0.2", "--steps", "10", "--overlap", "4", "--seed", seed, "--final-step", "network",
                           "--eta", PUBLISHED_ETA, "--quiet", *extra)
        assert code == 0, output
        runs.append(tifffile.imread(out))
    runs = np.stack(runs).astype(np.float64)
    kwargs = {"scale": 2} if task == "sr" else {}
    reference = _zero_noise_reference(models["prior"], task, image, 0.2, 10, mask_file, **kwargs)
    wrong = _zero_noise_reference(models["prior"], task, image, 0.6, 10, mask_file, **kwargs)

    def mean_abs_z(ref):
        standard_error = runs.std(axis=0, ddof=1) / np.sqrt(len(runs)) + 1e-6 * np.ptp(image)
        return np.abs((runs.mean(axis=0) - ref) / standard_error).mean()

    assert runs.std(axis=0).mean() > 1e-3 * np.ptp(image), "the seeds must actually change the result"
    assert mean_abs_z(reference) < 1.2  # ~0.8 expected for a t-distribution
    assert mean_abs_z(wrong) > 1.8


# ---------------------------------------------------------------- bad input


@pytest.fixture
def workdir(tmp_path, em_crop):
    tifffile.imwrite(tmp_path / "in.tif", em_crop)
    return tmp_path


def _assert_fails_cleanly(workdir, args, message):
    before = sorted(p.name for p in workdir.iterdir())
    code, output = cli(*args)
    assert code != 0, output
    assert message in output, output
    assert sorted(p.name for p in workdir.iterdir()) == before  # nothing written, no partial file


@pytest.mark.parametrize("extra, message", [
    (["--task", "denoise", "--scale", "2", "--sigma0", "0.1"], "--scale applies only to --task sr"),
    (["--task", "sr", "--blur-sigma", "1", "--sigma0", "0.1"], "--blur-sigma applies only to --task deblur"),
    (["--task", "deblur", "--sigma0", "0.1"], "needs --blur-sigma"),
    (["--task", "sr", "--scale", "9", "--sigma0", "0.1"], "--scale must be an integer from 2 to 8"),
    (["--sigma0", "0"], "sigma0 must be a finite number in [1e-06, 10]"),
    (["--sigma0", "-0.5"], "sigma0 must be a finite number in [1e-06, 10]"),
    (["--task", "sr"], "no noise level: give one, --sigma0 (on the [-1,1] scale, or --sigma0 auto"),
    (["--sigma0", "0.1", "--noise-std", "3"], "two noise levels: give one, --sigma0"),
])
def test_bad_options(workdir, models, extra, message):
    args = ["restore", workdir / "in.tif", "-o", workdir / "out.tif", "--model", models["mean"], *extra]
    _assert_fails_cleanly(workdir, args, message)


def test_mask_of_wrong_shape(workdir, models):
    tifffile.imwrite(workdir / "mask.tif", np.ones((10, 10), np.uint8))
    args = ["restore", workdir / "in.tif", "-o", workdir / "out.tif", "--model", models["mean"],
            "--task", "inpaint", "--mask", workdir / "mask.tif", "--sigma0", "0.1"]
    _assert_fails_cleanly(workdir, args, "mask shape (10, 10) does not match the image (48, 40)")


def _with(value):
    def make(crop):
        image = crop.astype(np.float32)
        image[5, 5:9] = value
        return image
    return make


@pytest.mark.parametrize("make, message", [
    (_with(np.nan), "4 NaN or Inf pixels"),
    (_with(np.inf), "4 NaN or Inf pixels"),
    (lambda crop: crop.astype(np.int32), "unsupported pixel type int32"),
    (lambda crop: np.ones((2, 5, 16, 16), np.uint8), "expected a grey YX image or a ZYX stack"),
])
def test_bad_images(workdir, models, em_crop, make, message):
    array = make(em_crop)
    tifffile.imwrite(workdir / "bad.tif", array)
    args = ["restore", workdir / "bad.tif", "-o", workdir / "out.tif", "--model", models["mean"], "--sigma0", "0.1"]
    _assert_fails_cleanly(workdir, args, message)


def test_model_without_df5t_metadata(workdir, models):
    args = ["restore", workdir / "in.tif", "-o", workdir / "out.tif", "--model", models["no-metadata"], "--sigma0", "0.1"]
    _assert_fails_cleanly(workdir, args, "not a DF5T artifact")


def test_output_equal_to_input_is_refused(workdir, models, em_crop):
    args = ["restore", workdir / "in.tif", "-o", workdir / "in.tif", "--model", models["mean"], "--sigma0", "0.1"]
    _assert_fails_cleanly(workdir, args, "is the input")
    np.testing.assert_array_equal(tifffile.imread(workdir / "in.tif"), em_crop)


def test_restore_cli_writes_metadata(workdir, models):
    code, output = cli("restore", workdir / "in.tif", "-o", workdir / "out.tif", "--model", models["mean"],
                       "--sigma0", "0.1", "--steps", "5", "--seed", "4", "--quiet")
    assert code == 0, output
    assert "wrote" in output
    with tifffile.TiffFile(workdir / "out.tif") as tif:
        meta = tif.shaped_metadata[0]["df5t"]
    assert meta["seed"] == 4 and meta["steps"] == 5 and meta["task"] == "denoise"
    assert meta["intensity_map"]["rule"] == "uint8 full range"
    assert meta["model_sha256"] == hashlib.sha256(models["mean"].read_bytes()).hexdigest()


def test_atomic_path_leaves_nothing_on_interrupt(tmp_path):
    target = tmp_path / "out.tif"
    with pytest.raises(KeyboardInterrupt):
        with atomic_path(target) as tmp:
            tmp.write_bytes(b"half")
            raise KeyboardInterrupt
    assert list(tmp_path.iterdir()) == []


def test_sigma0_auto_estimates_a_known_noise_level(workdir, models, em_dir):
    import scipy.ndimage

    clean = scipy.ndimage.gaussian_filter(
        tifffile.imread(em_dir / "micrograph_vemstitch-mussel_tile3_2_2_1768x2048.tif")[:256, :256].astype(float), 3)
    noisy = clean + 10.0 * np.random.default_rng(0).standard_normal(clean.shape)
    tifffile.imwrite(workdir / "noisy.tif", noisy.astype(np.float32))
    code, output = cli("restore", workdir / "noisy.tif", "-o", workdir / "out.tif", "--model", models["mean"],
                       "--sigma0", "auto", "--steps", "2", "--quiet")
    assert code == 0, output
    with tifffile.TiffFile(workdir / "out.tif") as tif:
        meta = tif.shaped_metadata[0]["df5t"]
    assert meta["sigma0_rule"].startswith("auto")
    assert meta["noise_std"] == pytest.approx(10.0, rel=0.1)
    scale = meta["intensity_map"]["high"] - meta["intensity_map"]["low"]
    assert meta["sigma0"] == pytest.approx(2 * meta["noise_std"] / scale)
    assert "sigma0 auto: estimated noise std" in output


def test_sigma0_must_be_a_number_or_auto(workdir, models):
    code, output = cli("restore", workdir / "in.tif", "-o", workdir / "o.tif", "--model", models["mean"], "--sigma0", "lots")
    assert code != 0 and "neither a number nor 'auto'" in output


def test_fp16_artifact_restores_like_fp32(tmp_path, fixtures_dir, em_crop):
    pytest.importorskip("torch", reason="exporting the fixture needs the [export] extra")
    paths = {}
    for precision, flags in (("fp32", []), ("fp16", ["--fp16"])):
        paths[precision] = tmp_path / f"tiny-{precision}.onnx"
        code, output = cli("export", fixtures_dir / "df5t_reference_tiny.pt", "-o", paths[precision], "--tile", "64",
                           *flags)
        assert code == 0, output
    image = em_crop.astype(np.float32)
    runs = {p: Restorer(path, sigma0=0.1, steps=10, seed=1).restore_full(image) for p, path in paths.items()}
    assert runs["fp16"].provenance["model_info"]["precision"] == "fp16"
    scale = runs["fp32"].intensity.high - runs["fp32"].intensity.low
    assert np.abs(runs["fp16"].image - runs["fp32"].image).mean() / scale < 0.01


def test_gpu_memory_cap_needs_a_gpu_device(workdir, models):
    code, output = cli("restore", workdir / "in.tif", "-o", workdir / "o.tif", "--model", models["mean"],
                       "--sigma0", "0.1", "--gpu-memory", "4")
    assert code != 0 and "--gpu-memory applies to --device cuda" in output


def test_a_restorer_closes_its_backend_at_the_end_of_a_with_block(models, em_crop):
    with Restorer(models["mean"], sigma0=0.1, steps=2) as restorer:
        restorer.restore(em_crop)
    with pytest.raises(RuntimeError, match="this backend was closed"):
        restorer.restore(em_crop)
    restorer.close()  # closing twice is harmless


def test_one_registry_feeds_the_cli_choices_and_doctor():
    import json

    from click.testing import CliRunner

    from df5t_deploy.backends import AUTO_ORDER, BACKENDS, REGISTRY

    option = next(p for p in main.commands["restore"].params if p.name == "backend")
    assert tuple(option.type.choices) == BACKENDS == ("auto", *dict.fromkeys(k.option for k in REGISTRY))
    facts = json.loads(CliRunner().invoke(main, ["doctor", "--json"]).output)
    assert tuple(facts["backends"]) == AUTO_ORDER == tuple(k.name for k in REGISTRY)

"""--noise-model poisson-gaussian: the generalised Anscombe transform, its exact unbiased
inverse, the fitted detector parameters, the refusals, and restorations through it."""

from __future__ import annotations

import numpy as np
import pytest
import tifffile
from click.testing import CliRunner
from onnx_models import exact_denoiser

from df5t_deploy.api import Restorer
from df5t_deploy.cli import main
from df5t_deploy.degrade import degrade
from df5t_deploy.intensity import StabilizedMap, stabilized_map_for_source
from df5t_deploy.poisson_gaussian import NoiseModelError, PoissonGaussian, fit_poisson_gaussian
from df5t_deploy.settings import RestoreSettings
from df5t_deploy.streaming import ArraySource
from df5t_deploy.tasks import TaskError, TaskOptions

TILE = 32


def _noisy(noise: PoissonGaussian, signal: np.ndarray, seed: int) -> np.ndarray:
    return degrade(signal.astype(np.float32), TaskOptions("denoise"), seed=seed, poisson_gaussian=noise).image


def _smooth_signal(shape=(384, 384), low=20.0, high=230.0) -> np.ndarray:
    """A signal whose 2 x 2 details are nearly zero, so the details hold the noise alone."""
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    wave = 0.5 + 0.5 * np.sin(xx / 37.0) * np.cos(yy / 53.0)
    return low + (high - low) * wave


@pytest.mark.parametrize("counts", [5.0, 20.0, 300.0])
def test_the_transform_makes_the_noise_unit(counts):
    noise = PoissonGaussian(gain=3.0, read_noise=4.0, offset=10.0)
    rng = np.random.default_rng(0)
    z = 3.0 * rng.poisson(counts, 400_000) + 10.0 + 4.0 * rng.standard_normal(400_000)
    assert np.std(noise.anscombe(z)) == pytest.approx(1.0, abs=0.04)


@pytest.mark.parametrize("counts", [0.3, 1.0, 3.0, 10.0, 100.0, 5000.0])
def test_the_exact_unbiased_inverse_maps_the_mean_transform_back_to_the_signal(counts):
    """E[f(z)] over many draws maps back to the expected counts; the algebraic inverse is biased
    at low counts (this test is the one that tells the two apart)."""
    gain, read, offset = 2.0, 1.5, 5.0
    noise = PoissonGaussian(gain, read, offset)
    rng = np.random.default_rng(int(counts * 10))
    n = 4_000_000
    mean_transform = np.mean(noise.anscombe(gain * rng.poisson(counts, n) + offset + read * rng.standard_normal(n)))
    back = noise.to_counts(noise.exact_unbiased_inverse(np.array([mean_transform])))[0]
    tolerance = 0.01 + 0.002 * np.sqrt(counts)
    assert back == pytest.approx(counts, abs=tolerance)
    algebraic = (mean_transform / 2) ** 2 - 0.375 - (read / gain) ** 2
    if counts <= 10:
        assert abs(algebraic - counts) > 5 * tolerance


def test_stabilized_map_comes_back_through_the_exact_inverse():
    """The map's way back is the exact inverse: the mean of noisy pixels' model values, mapped
    back, is the signal (an algebraic inverse or a plain affine map would miss it)."""
    noise = PoissonGaussian(gain=4.0, read_noise=2.0, offset=0.0)
    signal = np.full((512, 512), 8.0)  # 2 counts
    noisy = _noisy(noise, signal, seed=1)
    intensity = stabilized_map_for_source(ArraySource(noisy), 4.0, 2.0, 0.0)
    unit = (intensity.to_model(noisy).astype(np.float64) + 1) / 2
    assert intensity.values_from_unit(np.array([unit.mean()]))[0] == pytest.approx(8.0, abs=0.15)
    assert intensity.sigma0 == pytest.approx(2 / (intensity.high - intensity.low))


@pytest.mark.parametrize("gain, read", [(2.0, 6.0), (6.0, 10.0)])
def test_gain_and_read_noise_are_fitted(gain, read):
    noisy = _noisy(PoissonGaussian(gain, read, 0.0), _smooth_signal(), seed=2)
    fitted = fit_poisson_gaussian([noisy], noisy.dtype)
    assert fitted.gain == pytest.approx(gain, rel=0.08)
    assert fitted.read_noise == pytest.approx(read, rel=0.15)
    assert fitted.offset == 0.0 and fitted.rule.startswith("fitted")


def test_a_black_level_above_the_read_noise_is_found_as_an_offset():
    gain, read, offset = 3.0, 6.0, 100.0
    noisy = _noisy(PoissonGaussian(gain, read, offset), _smooth_signal(low=150, high=600), seed=3)
    fitted = fit_poisson_gaussian([noisy], noisy.dtype)
    # the line fixes read^2 - gain * offset; with no read noise left, the offset carries it
    assert fitted.read_noise == 0.0
    assert fitted.offset == pytest.approx(offset - read**2 / gain, abs=4.0)
    given = fit_poisson_gaussian([noisy], noisy.dtype, offset=offset)
    assert given.read_noise == pytest.approx(read, rel=0.25) and "--offset" in given.rule


def test_signal_independent_noise_is_refused():
    noisy = _smooth_signal() + 8.0 * np.random.default_rng(4).standard_normal((384, 384))
    with pytest.raises(NoiseModelError, match="does not grow with the signal"):
        fit_poisson_gaussian([noisy], noisy.dtype)


def test_too_small_an_image_is_refused():
    noisy = _noisy(PoissonGaussian(2.0, 3.0, 0.0), _smooth_signal((40, 40)), seed=5)
    with pytest.raises(NoiseModelError, match="too few"):
        fit_poisson_gaussian([noisy], noisy.dtype)


@pytest.mark.parametrize("settings, error, message", [
    ({"noise_model": "poisson-gaussian", "sigma0": 0.1}, ValueError, "drop sigma0"),
    ({"noise_model": "poisson-gaussian", "task": "sr"}, TaskError, "denoise"),
    ({"noise_model": "poisson-gaussian", "gain": -1.0}, ValueError, "gain"),
    ({"sigma0": 0.1, "gain": 2.0}, ValueError, "gain: for noise_model 'poisson-gaussian' only"),
    ({"noise_model": "shot", "sigma0": 0.1}, ValueError, "unknown noise_model"),
])
def test_settings_refuse_what_does_not_fit(settings, error, message):
    with pytest.raises(error, match=message):
        RestoreSettings(**settings)


def test_restoration_lands_on_the_exact_inverse_of_the_denoisers_x0(tmp_path):
    model = exact_denoiser(tmp_path / "exact.onnx", TILE, x0=0.3)
    noisy = _noisy(PoissonGaussian(2.0, 3.0, 0.0), _smooth_signal((96, 96)), seed=6)
    restorer = Restorer(model, noise_model="poisson-gaussian", gain=2.0, read_noise=3.0, offset=0.0, steps=20,
                        final_step="network")  # the network's x0, as the published final step keeps it
    result = restorer.restore_full(noisy)
    assert isinstance(result.intensity, StabilizedMap)
    expected = result.intensity.noise.exact_unbiased_inverse(
        result.intensity.low + 0.65 * (result.intensity.high - result.intensity.low))
    np.testing.assert_allclose(result.image, expected, rtol=1e-4)
    assert result.provenance["intensity_map"]["noise"]["gain"] == 2.0
    assert result.provenance["sigma0"] == pytest.approx(result.intensity.sigma0)


def test_the_bundled_model_reduces_shot_noise_on_real_em(em_dir):
    truth = tifffile.imread(em_dir / "micrograph_vemstitch-mussel_tile3_2_2_1768x2048.tif")[1000:1096, 300:396]
    noisy = _noisy(PoissonGaussian(4.0, 5.0, 0.0), truth, seed=7)
    result = Restorer(noise_model="poisson-gaussian", steps=10).restore_full(noisy)

    def rms(image):
        return float(np.sqrt(np.mean((image.astype(np.float64) - truth) ** 2)))

    assert result.image.dtype == np.float32
    assert rms(result.image) < 0.75 * rms(noisy)
    assert result.intensity.noise.rule.startswith("fitted")


def cli(*args):
    result = CliRunner().invoke(main, [str(a) for a in args])
    return result.exit_code, result.output


def test_cli_degrades_and_restores_with_detector_noise(tmp_path):
    model = exact_denoiser(tmp_path / "exact.onnx", TILE, x0=0.0)
    tifffile.imwrite(tmp_path / "clean.tif", _smooth_signal((128, 128)).astype(np.float32))
    code, output = cli("degrade", tmp_path / "clean.tif", "-o", tmp_path / "noisy.tif", "--noise-model",
                       "poisson-gaussian", "--gain", "3", "--read-noise", "4", "--seed", "2")
    assert code == 0, output
    with tifffile.TiffFile(tmp_path / "noisy.tif") as tif:
        assert tif.shaped_metadata[0]["df5t"]["degraded"]["poisson_gaussian"]["gain"] == 3.0
    code, output = cli("restore", tmp_path / "noisy.tif", "-o", tmp_path / "out.tif", "--model", model,
                       "--noise-model", "poisson-gaussian", "--steps", "2", "--quiet")
    assert code == 0, output
    with tifffile.TiffFile(tmp_path / "out.tif") as tif:
        meta = tif.shaped_metadata[0]["df5t"]
    assert meta["noise_model"] == "poisson-gaussian"
    assert "poisson-gaussian: gain" in output and "fitted to the image's variance line" in output
    assert meta["intensity_map"]["noise"]["gain"] == pytest.approx(3.0, rel=0.1)


@pytest.mark.parametrize("args, message", [
    (["--noise-model", "poisson-gaussian", "--gain", "3"], "needs --gain and --read-noise"),
    (["--noise-model", "poisson-gaussian", "--gain", "3", "--read-noise", "1", "--sigma0", "0.1"], "drop --sigma0"),
    (["--sigma0", "0.1", "--gain", "3"], "apply to --noise-model poisson-gaussian"),
    (["--noise-model", "poisson-gaussian", "--gain", "0", "--read-noise", "1"], "--gain must be a positive"),
])
def test_cli_degrade_refuses_incomplete_detector_noise(tmp_path, args, message):
    tifffile.imwrite(tmp_path / "clean.tif", _smooth_signal((64, 64)).astype(np.float32))
    code, output = cli("degrade", tmp_path / "clean.tif", "-o", tmp_path / "noisy.tif", *args)
    assert code == 2 and message in output and "Traceback" not in output
    assert not (tmp_path / "noisy.tif").exists()


def test_cli_restore_refuses_noise_that_does_not_grow_in_one_line(tmp_path):
    model = exact_denoiser(tmp_path / "exact.onnx", TILE, x0=0.0)
    noisy = _smooth_signal((256, 256)) + 8.0 * np.random.default_rng(4).standard_normal((256, 256))
    tifffile.imwrite(tmp_path / "noisy.tif", noisy.astype(np.float32))
    code, output = cli("restore", tmp_path / "noisy.tif", "-o", tmp_path / "out.tif", "--model", model,
                       "--noise-model", "poisson-gaussian", "--quiet")
    assert code == 2 and "does not grow with the signal" in output
    assert len(output.strip().splitlines()) == 1
    assert not (tmp_path / "out.tif").exists()

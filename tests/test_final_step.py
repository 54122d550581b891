"""The final step "weighted": the measurement weighed back into the restoration by the Wiener
weight of the restoration's error, estimated by moments (sampler.weigh_in_measurement)."""

from __future__ import annotations

import numpy as np
import pytest
import tifffile
from click.testing import CliRunner

from df5t_deploy.api import Restorer
from df5t_deploy.cli import main
from df5t_deploy.formats import read_provenance
from df5t_deploy.operators import BlockMean, GaussianBlur, Identity, Inpainting
from df5t_deploy.sampler import weigh_in_measurement

N = 128


def _scene(op, sigma0: float, error_std: float, seed: int = 0):
    """A truth on [-1,1], its measurement with noise sigma0, and an estimate off the truth by
    an independent error of ``error_std`` (as images [1, 1, H, W] on [0, 1])."""
    rng = np.random.default_rng(seed)
    truth = rng.uniform(-0.5, 0.5, op.shape)
    y = op.forward(truth) + sigma0 * rng.standard_normal(op.measurement_shape)
    estimate = truth + error_std * rng.standard_normal(op.shape)
    return truth, y, ((estimate + 1.0) * 0.5)[None, None]


def _spectral(op, images: np.ndarray) -> np.ndarray:
    return op.vt(images[0, 0].astype(np.float64) * 2.0 - 1.0)


@pytest.mark.parametrize("op", [BlockMean((N, N), (2, 2)), BlockMean((N, N), (4, 1)),
                                Inpainting(np.random.default_rng(1).random((N, N)) < 0.3)],
                         ids=["sr", "along-z", "inpaint"])
def test_observed_coordinates_get_the_wiener_weight_and_the_others_never_move(op):
    sigma0, error_std = 0.02, 0.05
    truth, y, images = _scene(op, sigma0, error_std)
    out = weigh_in_measurement(images, y[None], op, sigma0)
    observed = op.observed()
    s = op.singular_values[observed]
    v_in, v_out, v_true = _spectral(op, images), _spectral(op, out), op.vt(truth)
    m = op.ut(y)[observed] / s
    moved = (v_out - v_in)[observed] / (m - v_in[observed])
    q = sigma0**2 / s[0] ** 2
    wiener = error_std**2 / (error_std**2 + q)
    np.testing.assert_allclose(np.median(moved), wiener, atol=0.05)  # p estimated by moments
    np.testing.assert_allclose(v_out[~observed], v_in[~observed], atol=1e-6)
    err_in = np.mean((v_in - v_true)[observed] ** 2)
    err_out = np.mean((v_out - v_true)[observed] ** 2)
    assert err_out < min(err_in, q)  # better than either source alone
    assert abs(err_out - wiener * q) < 0.1 * wiener * q


def test_an_image_within_the_measurement_noise_keeps_its_pixels():
    """A denoised image follows its noisy measurement closer than the noise: nothing to weigh in."""
    import scipy.ndimage

    op, sigma0 = Identity((N, N)), 0.2
    rng = np.random.default_rng(2)
    truth = scipy.ndimage.gaussian_filter(rng.uniform(-0.6, 0.6, op.shape), 3)
    y = truth + sigma0 * rng.standard_normal(op.shape)
    denoised = ((scipy.ndimage.gaussian_filter(y, 1.0) + 1.0) * 0.5)[None, None]
    assert np.sqrt(np.mean((y - (denoised[0, 0] * 2 - 1)) ** 2)) < sigma0  # the premise
    np.testing.assert_allclose(weigh_in_measurement(denoised, y[None], op, sigma0), denoised, atol=1e-6)


def test_a_blur_is_weighed_band_by_band():
    """Low frequencies are measured far better than high ones: in every band of measurement
    precision the weight follows the oracle Wiener weight of the planted error."""
    op, sigma0, error_std = GaussianBlur((N, N), (1.5, 1.5)), 0.01, 0.05
    truth, y, images = _scene(op, sigma0, error_std, seed=3)
    out = weigh_in_measurement(images, y[None], op, sigma0)
    observed = op.observed()
    s = np.where(observed, op.singular_values, 1.0).astype(np.float64)
    v_in, v_out, v_true = _spectral(op, images), _spectral(op, out), op.vt(truth)
    m = op.ut(y) / s
    weight = (v_out - v_in)[observed] / (m - v_in)[observed]
    q = (sigma0 / s[observed]) ** 2
    oracle = error_std**2 / (error_std**2 + q)
    bands = np.digitize(q, np.quantile(q, np.linspace(0, 1, 9)[1:-1]))
    medians = [(np.median(weight[bands == b]), np.median(oracle[bands == b])) for b in range(8)]
    assert medians[0][0] > 0.8 and medians[-1][0] < 0.05  # it spans both ends
    np.testing.assert_allclose(*zip(*medians), atol=0.06)
    err_in, err_out = (np.mean((v - v_true)[observed] ** 2) for v in (v_in, v_out))
    assert err_out < err_in and err_out < 1.15 * np.mean(oracle * q)  # near the oracle's error p q / (p + q)


def test_where_the_measurement_barely_sees_nothing_moves():
    """Real restorations err where the measurement is precise and hardly at all where a blur
    has wiped the image out: the bands the measurement barely sees keep their values exactly
    (an estimate of the error there is noise, and weighing it in would add noise)."""
    op, sigma0 = GaussianBlur((N, N), (1.5, 1.5)), 0.01
    truth, y, _ = _scene(op, sigma0, 0.0, seed=4)
    s = op.singular_values
    sharp, faint = s > 0.5, (s > 0) & (s < 0.05)
    error = np.where(sharp, 0.05 * np.random.default_rng(5).standard_normal(op.shape), 0.0)
    images = ((truth + op.v(error) + 1.0) * 0.5)[None, None]
    out = weigh_in_measurement(images, y[None], op, sigma0)
    v_in, v_out, v_true = _spectral(op, images), _spectral(op, out), op.vt(truth)
    np.testing.assert_allclose(v_out[faint], v_in[faint], atol=1e-6)
    assert np.mean((v_out - v_true)[sharp] ** 2) < 0.2 * np.mean((v_in - v_true)[sharp] ** 2)


def test_each_image_is_weighed_on_its_own():
    op, sigma0 = BlockMean((64, 64), (2, 2)), 0.02
    scenes = [_scene(op, sigma0, error_std, seed) for seed, error_std in enumerate((0.01, 0.08))]
    y = np.stack([scene[1] for scene in scenes])
    images = np.concatenate([scene[2] for scene in scenes], axis=1).repeat(2, axis=0)  # [2, 2, H, W]
    together = weigh_in_measurement(images, y, op, sigma0)
    for g in range(2):
        for sample in range(2):
            alone = weigh_in_measurement(images[g : g + 1, sample : sample + 1], y[g : g + 1], op, sigma0)
            np.testing.assert_array_equal(together[g, sample], alone[0, 0])


def test_the_restorer_weighs_the_measurement_in_and_records_it(model, tmp_path):
    """Super-resolution with the test model: the weighted final step brings the output's block
    means closer to the measurement, and the setting reaches the CLI and the provenance."""
    low = (np.random.default_rng(4).random((48, 48)) * 200 + 20).astype(np.uint8)
    options = dict(task="sr", sigma0=0.02, steps=3, samples=2)
    published = Restorer(model, final_step="network", **options).restore(low).astype(np.float64)
    weighted = Restorer(model, **options).restore(low).astype(np.float64)  # the default

    def off_measurement(image):
        return np.sqrt(np.mean((image.reshape(48, 2, 48, 2).mean(axis=(1, 3)) - low) ** 2))

    assert off_measurement(weighted) < 0.5 * off_measurement(published)
    tifffile.imwrite(tmp_path / "low.tif", low)
    result = CliRunner().invoke(main, ["restore", str(tmp_path / "low.tif"), "-o", str(tmp_path / "out.tif"),
                                       "--model", str(model), "--task", "sr", "--sigma0", "0.02", "--steps", "2",
                                       "--final-step", "weighted", "--quiet"])
    assert result.exit_code == 0, result.output
    assert read_provenance(tmp_path / "out.tif")["final_step"] == "weighted"
    result = CliRunner().invoke(main, ["restore", str(tmp_path / "low.tif"), "-o", str(tmp_path / "x.tif"),
                                       "--model", str(model), "--final-step", "projected", "--sigma0", "0.1"])
    assert result.exit_code != 0 and "final-step" in result.output and "Traceback" not in result.output


def test_isotropic_planes_are_weighed_toward_the_acquired_planes(model):
    """Isotropic restoration walks XZ and YZ planes: each is weighed against its own
    measurement, so the restored planes' means over each acquired plane's z block come
    closer to the acquired planes."""
    stack = (np.random.default_rng(6).random((4, 32, 32)) * 200 + 20).astype(np.uint8)
    options = dict(task="isotropic", z_factor=2, sigma0=0.02, steps=3)
    published, weighted = (Restorer(model, final_step=final_step, **options).restore(stack).astype(np.float64)
                           for final_step in ("network", "weighted"))

    def off_measurement(volume):
        return np.sqrt(np.mean((volume.reshape(4, 2, 32, 32).mean(axis=1) - stack) ** 2))

    assert weighted.shape == published.shape == (8, 32, 32)
    assert off_measurement(weighted) < 0.5 * off_measurement(published)

"""Where a walk starts: the matched walk of an operator that observes every grey coordinate
begins where the measurement stops deciding the result, with the full walk's state there."""

from __future__ import annotations

import numpy as np
import pytest
import tifffile
from click.testing import CliRunner

from df5t_deploy.api import Restorer
from df5t_deploy.cli import main
from df5t_deploy.artifact import Schedule
from df5t_deploy.formats import read_provenance
from df5t_deploy.operators import BlockMean, GaussianBlur, Identity, Inpainting
from df5t_deploy.sampler import (
    DDRM,
    GREY_GAIN,
    SamplerSettings,
    Timesteps,
    matched_start,
    run_ddrm,
    to_channel_basis,
    walk_timesteps,
)
from df5t_deploy.settings import TASK_SAMPLES, TASK_STEPS

SCHEDULE = Schedule(1000)
N = 8


def _measurement(rng, sigma0: float) -> np.ndarray:
    return (rng.uniform(-0.8, 0.8, (1, N, N)) + sigma0 * rng.standard_normal((1, N, N))).astype(np.float32)


def _grey(x: np.ndarray) -> np.ndarray:
    return to_channel_basis(x)[..., 0, :, :]


@pytest.mark.parametrize("sigma0", [0.01, 0.09, 0.2, 0.6])
def test_the_matched_start_is_the_smallest_timestep_the_measurement_decides(sigma0):
    alphas_bar = np.cumprod(1.0 - SCHEDULE.betas())
    sigma_t = np.sqrt(1.0 - alphas_bar) / np.sqrt(alphas_bar)
    start = matched_start(alphas_bar, GREY_GAIN, sigma0)
    assert GREY_GAIN * sigma_t[start] > sigma0
    assert start == 0 or GREY_GAIN * sigma_t[start - 1] <= sigma0
    ddrm = DDRM(Identity((N, N)), SCHEDULE, SamplerSettings(sigma0=sigma0, steps=3))
    assert ddrm.timesteps.start == max(start, 2) and len(ddrm.timesteps) == 3


def test_above_the_start_the_full_walk_ignores_the_network_and_below_it_follows_it():
    """The full walk over every timestep with two different networks: their grey states agree
    down to the matched start, and part at the first step below it."""
    sigma0, rng = 0.2, np.random.default_rng(4)
    y = _measurement(rng, sigma0)
    full = DDRM(Identity((N, N)), SCHEDULE, SamplerSettings(sigma0=sigma0, steps=1000, walk="full"))
    start = matched_start(full.timesteps.alphas_bar, GREY_GAIN, sigma0)
    networks = [lambda x, t: np.zeros_like(x), lambda x, t: np.full_like(x, 0.7)]
    states = []
    for eps_fn in networks:
        noise = np.random.default_rng(9)
        x = full.initial_state(full.spectral_measurement(y), noise.standard_normal((1, 3, N, N)).astype(np.float32))
        at = {}
        for plan in full.timesteps:
            x = full.step(plan, x, eps_fn(x, plan.t), full.spectral_measurement(y),
                          noise.standard_normal((1, 3, N, N)).astype(np.float32))
            at[plan.t - 1] = x
            if plan.t - 1 < start:
                break
        states.append(at)
    # float32 rounding of 900 steps (x0 reaches hundreds near t = T-1) against a network's pull of ~0.3
    np.testing.assert_allclose(_grey(states[0][start]), _grey(states[1][start]), atol=1e-3)
    assert np.abs(_grey(states[0][start - 1]) - _grey(states[1][start - 1])).min() > 0.1


def test_the_matched_initial_state_is_the_full_walks_state_at_the_start():
    """Drawn with the same normals, the matched walk's initial state and the full walk's state
    at the matched start have the same grey coordinates: the initial value is scaled to the
    variance-preserving state exactly (the published division by sigma_t is a factor of about
    3 off there)."""
    sigma0, rng = 0.2, np.random.default_rng(5)
    y = _measurement(rng, sigma0)
    op = Identity((N, N))
    matched = DDRM(op, SCHEDULE, SamplerSettings(sigma0=sigma0, steps=2))
    full = DDRM(op, SCHEDULE, SamplerSettings(sigma0=sigma0, steps=1000, walk="full"))
    start = matched.timesteps.start
    z = rng.standard_normal((1, 3, N, N)).astype(np.float32)
    initial = matched.initial_state(matched.spectral_measurement(y), z)
    step_into_start = next(plan for plan in full.timesteps if plan.t == start + 1)
    x_above = rng.standard_normal((1, 3, N, N)).astype(np.float32)  # anything: the measurement decides
    into = full.step(step_into_start, x_above, np.zeros_like(x_above), full.spectral_measurement(y), z)
    np.testing.assert_allclose(_grey(initial), _grey(into), atol=1e-5)
    # with the noise switched off the grey state is the measurement on the variance-preserving scale
    quiet = matched.initial_state(matched.spectral_measurement(y), np.zeros_like(z))
    np.testing.assert_allclose(quiet, np.sqrt(matched.timesteps.alphas_bar[start]) * np.repeat(y[:, None], 3, 1),
                               atol=1e-6)


def test_the_matched_walk_calls_the_network_steps_times_never_above_its_start():
    sigma0, rng = 0.2, np.random.default_rng(6)
    y = _measurement(rng, sigma0)
    ddrm = DDRM(Identity((N, N)), SCHEDULE, SamplerSettings(sigma0=sigma0, steps=3))
    calls = []

    def eps_fn(x, t):
        calls.append(t)
        return np.zeros_like(x)

    run_ddrm(ddrm, y, eps_fn, lambda step: rng.standard_normal((1, 3, N, N)).astype(np.float32))
    start = matched_start(ddrm.timesteps.alphas_bar, GREY_GAIN, sigma0)
    assert calls == [start, round(start / 2), 0]
    assert ddrm.timesteps.to_dict() == {"start": start, "timesteps": calls, "network_calls": 3}


@pytest.mark.parametrize("op", [Inpainting(np.eye(N, dtype=bool)), BlockMean((N, N), (2, 2)),
                                BlockMean((N, N), (4, 1)), GaussianBlur((N, N), (3.0, 3.0))],
                         ids=["inpaint", "sr", "along-z", "wide blur"])
def test_an_operator_that_leaves_coordinates_unobserved_walks_in_full(op):
    assert not op.observed().all()
    timesteps = walk_timesteps(SCHEDULE, SamplerSettings(sigma0=0.05, steps=20), op)
    assert timesteps.published and timesteps.seq == Timesteps(SCHEDULE, 20).seq


def test_a_blur_that_observes_everything_starts_from_its_weakest_frequency():
    op = GaussianBlur((N, N), (0.4, 0.4))
    assert op.observed().all()
    timesteps = walk_timesteps(SCHEDULE, SamplerSettings(sigma0=0.05, steps=4), op)
    weakest = float(np.float32(op.singular_values.min() * GREY_GAIN))
    assert timesteps.start == matched_start(timesteps.alphas_bar, weakest, 0.05)
    assert timesteps.start > matched_start(timesteps.alphas_bar, GREY_GAIN, 0.05)


def test_eta_b_below_one_walks_in_full():
    """With eta_b < 1 the network's estimate enters every update, so no step may be skipped."""
    timesteps = walk_timesteps(SCHEDULE, SamplerSettings(sigma0=0.2, steps=4, eta_b=0.9), Identity((N, N)))
    assert timesteps.published


def test_steps_are_network_calls_even_for_a_start_below_them():
    assert Timesteps(SCHEDULE, 5, start=2).seq == [0, 1, 2, 3, 4]
    assert Timesteps(SCHEDULE, 1, start=140).seq == [140]
    assert Timesteps(SCHEDULE, 4, start=100).seq == [0, 33, 67, 100]


def test_denoising_defaults_and_provenance(model, mussel_tile3, tmp_path):
    """No noise level for denoising means an estimated one; the walk's timesteps and calls are
    recorded, and the progress total is the tiles the walk really runs."""
    em_crop = mussel_tile3[400:448, 600:640]
    restorer = Restorer(model)
    assert restorer.settings.sigma0 == "auto"
    assert (restorer.steps, restorer.samples) == (TASK_STEPS["denoise"], TASK_SAMPLES["denoise"])
    events = []
    result = Restorer(model, steps=3).restore_full(em_crop, progress=events.append)
    walk = result.provenance["walk_timesteps"]
    assert walk["network_calls"] == 3 and walk["start"] < 500 and walk["timesteps"][-1] == 0
    assert result.provenance["walk"] == "matched" and result.estimated_noise_std > 0
    assert events[-1].tiles_done == events[-1].tiles_total
    assert events[-1].tiles_total == 3 * TASK_SAMPLES["denoise"] * restorer.denoiser.tiles_per_call(1, *em_crop.shape)
    full = Restorer(model, sigma0=0.1, walk="full", steps=3).restore_full(em_crop)
    assert full.provenance["walk_timesteps"] == {"start": 999, "timesteps": [999, 666, 333, 0], "network_calls": 4}
    tifffile.imwrite(tmp_path / "in.tif", em_crop)
    out = CliRunner().invoke(main, ["restore", str(tmp_path / "in.tif"), "-o", str(tmp_path / "out.tif"),
                                    "--model", str(model), "--quiet"])
    assert out.exit_code == 0, out.output
    assert read_provenance(tmp_path / "out.tif")["walk_timesteps"]["network_calls"] == TASK_STEPS["denoise"]

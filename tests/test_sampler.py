"""The DDRM sampler against a straightforward dense implementation of REFERENCE.md section 4."""

from __future__ import annotations

import numpy as np
import pytest

from df5t_deploy.artifact import Schedule
from df5t_deploy.operators import BLUR_ZERO_THRESHOLD, BlockMean, GaussianBlur, Identity, Inpainting
from df5t_deploy.sampler import DDRM, SamplerSettings, Timesteps

N = 16
SCHEDULE = Schedule(1000)


def _operators():
    rng = np.random.default_rng(5)
    return {
        "denoise": Identity((N, N)),
        "sr": BlockMean((N, N), (2, 2)),
        "deblur": GaussianBlur((N, N), (1.2, 1.2)),
        "inpaint": Inpainting(rng.random((N, N)) < 0.25),
        "along-z": BlockMean((N, N), (4, 1)),
    }


def dense_operator(op) -> np.ndarray:
    """H (m x 3n): the spatial operator's matrix, built column by column, times the channel mean."""
    n = N * N
    basis = np.eye(n, dtype=np.float64).reshape(n, N, N)
    columns = [op.forward(b.astype(np.float32)).astype(np.float64).ravel() for b in basis]
    spatial = np.stack(columns, axis=1)
    if isinstance(op, Inpainting):  # measurement = observed pixels only
        spatial = spatial[~op.missing.ravel()]
    mean = np.hstack([np.eye(n) / 3.0] * 3)
    return spatial @ mean


class DenseDDRM:
    """DDRM written the obvious way, with explicit U, S, V from numpy.linalg.svd."""

    def __init__(self, H, sigma0, eta, eta_b, zero_below):
        self.U, s, self.Vt = np.linalg.svd(H, full_matrices=True)
        self.s = np.zeros(H.shape[1])
        self.s[: len(s)] = np.where(s < zero_below, 0.0, s)
        self.m = H.shape[0]
        self.sigma0, self.eta, self.eta_b = sigma0, eta, eta_b

    def ybar(self, y):
        out = np.zeros(len(self.s))
        out[: self.m] = self.U.T @ y
        return out

    def init(self, ybar, z, sig, abar, published):
        """At a start where sigma_t = sig and alpha_bar = abar: the state is sqrt(abar) V(v)
        exactly, V(v) / sig in the published walk (the limit for abar -> 0)."""
        v = np.empty_like(z)
        for i, (s, zi) in enumerate(zip(self.s, self.Vt @ z)):
            if s > 0 and s * sig > self.sigma0:
                v[i] = ybar[i] / s + np.sqrt(sig**2 - self.sigma0**2 / s**2) * zi
            else:
                v[i] = sig * zi
        return (1.0 / sig if published else np.sqrt(abar)) * (self.Vt.T @ v)

    def step(self, x, eps, ybar, z, a, a_next):
        x0 = (x - np.sqrt(1 - a) * eps) / np.sqrt(a)
        sn = np.sqrt(1 - a_next) / np.sqrt(a_next)
        v0, ve, vz = self.Vt @ x0, self.Vt @ eps, self.Vt @ z
        v = np.empty_like(v0)
        c = np.sqrt(sn**2 - (self.eta * sn) ** 2)
        for i, s in enumerate(self.s):
            if s == 0:
                v[i] = v0[i] + c * ve[i] + self.eta * sn * vz[i]
            elif s * sn <= self.sigma0:
                v[i] = v0[i] + c * (ybar[i] - s * v0[i]) / self.sigma0 + self.eta * sn * vz[i]
            else:
                v[i] = (
                    self.eta_b * ybar[i] / s
                    + (1 - self.eta_b) * v0[i]
                    + np.sqrt(sn**2 - self.sigma0**2 * self.eta_b**2 / s**2) * vz[i]
                )
        return np.sqrt(a_next) * (self.Vt.T @ v)


def _measure(op, x_true, rng, sigma0):
    grey = x_true.mean(axis=0)
    y = op.forward(grey.astype(np.float32)).astype(np.float64)
    y = y + sigma0 * rng.standard_normal(y.shape)
    return y * (~op.missing) if isinstance(op, Inpainting) else y


@pytest.mark.parametrize("task", list(_operators()))
@pytest.mark.parametrize("eta, eta_b", [(0.85, 1.0), (0.5, 0.7)])
def test_one_step_equals_dense_ddrm(task, eta, eta_b):
    op = _operators()[task]
    rng = np.random.default_rng(11)
    sigma0 = 0.05
    settings = SamplerSettings(sigma0=sigma0, steps=20, eta=eta, eta_b=eta_b)
    ddrm = DDRM(op, SCHEDULE, settings)
    zero_below = BLUR_ZERO_THRESHOLD / np.sqrt(3) if task == "deblur" else 1e-9
    dense = DenseDDRM(dense_operator(op), sigma0, eta, eta_b, zero_below)
    x_true = np.repeat(rng.uniform(-1, 1, (1, N, N)), 3, axis=0)
    y = _measure(op, x_true, rng, sigma0)
    y_dense = y[~op.missing] if isinstance(op, Inpainting) else y.ravel()
    ybar, ybar_dense = ddrm.spectral_measurement(y.astype(np.float32)), dense.ybar(y_dense)

    z = rng.standard_normal((3, N, N)).astype(np.float32)
    x_init = ddrm.initial_state(ybar, z)
    start = ddrm.timesteps.start
    x_init_dense = dense.init(ybar_dense, z.ravel().astype(np.float64), ddrm.timesteps.init_sigma,
                              ddrm.timesteps.alphas_bar[start], ddrm.timesteps.published)
    np.testing.assert_allclose(x_init.ravel(), x_init_dense, atol=1e-5)

    # a middle step and the last (abar_next = 1) step, with injected eps and noise
    plans = list(ddrm.timesteps)
    for plan in (plans[len(plans) // 2], plans[-1]):
        x = rng.standard_normal((3, N, N)).astype(np.float32)
        eps = rng.standard_normal((3, N, N)).astype(np.float32)
        z = rng.standard_normal((3, N, N)).astype(np.float32)
        ours = ddrm.step(plan, x, eps, ybar, z)
        reference = dense.step(*(a.ravel().astype(np.float64) for a in (x, eps)), ybar_dense,
                               z.ravel().astype(np.float64), plan.alpha_bar, plan.alpha_bar_next)
        scale = max(1.0, np.abs(reference).max())
        np.testing.assert_allclose(ours.ravel() / scale, reference / scale, atol=1e-5)


def test_boundary_s_times_sn_equal_sigma0_is_the_noisy_case():
    from df5t_deploy.sampler import ddrm_update

    v0, ve, z = np.array([0.3]), np.array([0.7]), np.array([0.1])
    s, sn = 0.5, 0.4  # s * sn == sigma0
    out = ddrm_update(v0, ve, np.array([0.2]), np.array([s]), z, sn, sigma0=0.2, eta=0.85, eta_b=1.0)
    c = np.sqrt(sn**2 - (0.85 * sn) ** 2)
    np.testing.assert_allclose(out, v0 + c * (0.2 - s * v0) / 0.2 + 0.85 * sn * z, rtol=1e-6)


def test_published_skip_schedule():
    steps = Timesteps(Schedule(1000), 30)
    assert len(steps) == 31 and steps.seq[:3] == [0, 33, 66] and steps.seq[-1] == 990
    walk = list(steps)
    assert [p.t for p in walk[:2]] == [990, 957] and walk[-1].t == 0
    assert walk[-1].alpha_bar_next == 1.0
    assert walk[0].alpha_bar_next == pytest.approx(steps.alphas_bar[957])
    assert len(Timesteps(Schedule(1000), 50)) == 50


@pytest.mark.parametrize("kwargs, match", [
    (dict(sigma0=0.0), r"sigma0 must be a finite number in \[1e-06, 10\]"),
    (dict(sigma0=-0.1), r"sigma0 must be a finite number in \[1e-06, 10\]"),
    (dict(sigma0=float("inf")), r"sigma0 must be a finite number in \[1e-06, 10\]"),
    (dict(sigma0=float("nan")), r"sigma0 must be a finite number in \[1e-06, 10\]"),
    (dict(sigma0=0.1, eta=1.5), r"eta must be a finite number in \[0, 1\]"),
    (dict(sigma0=0.1, steps=0), "steps must be"),
])
def test_settings_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SamplerSettings(**kwargs)

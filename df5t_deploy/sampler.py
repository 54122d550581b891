"""The DDRM sampler as DF5T runs it (REFERENCE.md section 4), written once.

The network state x has three channels (grey replicated) and the measurement is one grey
image, so the full operator is H = (spatial operator) o (channel mean). Its right singular
vectors split into the grey direction (1,1,1)/sqrt(3) times the spatial ones, with singular
values s_spatial/sqrt(3), and two colour-difference directions that are never observed.
Arrays carry any leading axes (planes, samples) before [3, H, W]; y and its spectral form
``ybar`` carry the same leading axes before the grey [H, W] (or measurement) grid.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np

from .artifact import Schedule
from .operators import SpatialOperator
from .parameters import real_number
from .settings import (
    DEFAULT_FINAL_STEP,
    MAX_SIGMA0,
    PUBLISHED_ETA,
    PUBLISHED_ETA_B,
    PUBLISHED_STEPS,
    check_walk,
)

#: Orthonormal channel basis: the grey direction first, then two colour differences.
CHANNEL_BASIS = np.array(
    [
        [1.0, 1.0, 1.0],
        [1.0, -1.0, 0.0],
        [1.0, 1.0, -2.0],
    ]
) / np.sqrt([[3.0], [2.0], [6.0]])
GREY_GAIN = 1.0 / np.sqrt(3.0)  # channel mean = GREY_GAIN * grey coordinate


@dataclass(frozen=True)
class SamplerSettings:
    sigma0: float  # noise std of the grey measurement on the [-1,1] scale
    steps: int = PUBLISHED_STEPS
    eta: float = PUBLISHED_ETA
    eta_b: float = PUBLISHED_ETA_B
    final_step: str = DEFAULT_FINAL_STEP  # applied to the walk's images: weigh_in_measurement

    def __post_init__(self):
        try:
            real_number("sigma0", self.sigma0, 0.0, MAX_SIGMA0)
        except ValueError as err:
            raise ValueError(f"{err} (the measurement noise std on the [-1,1] scale); pass --sigma0, --noise-std "
                             "or --sigma0 auto") from None
        check_walk(self.steps, self.eta, self.eta_b, self.final_step)


@dataclass(frozen=True)
class StepPlan:
    index: int  # position in the walk, 0 first
    t: int  # timestep index given to the network
    alpha_bar: float
    alpha_bar_next: float  # 1 after t = 0


class Timesteps:
    """The published skip schedule: seq = 0, skip, 2*skip, ... < T, walked from the end."""

    def __init__(self, schedule: Schedule, steps: int):
        T = schedule.num_diffusion_timesteps
        if steps > T:
            raise ValueError(f"steps ({steps}) exceeds the model's {T} diffusion timesteps")
        skip = T // steps
        self.seq = list(range(0, T, skip))
        self.alphas_bar = np.cumprod(1.0 - schedule.betas())

    def __len__(self) -> int:
        """Network calls per restoration (exceeds ``steps`` when T is not a multiple of it)."""
        return len(self.seq)

    def abar(self, t: int) -> float:
        return 1.0 if t < 0 else float(self.alphas_bar[t])

    def __iter__(self) -> Iterator[StepPlan]:
        walk = list(reversed(self.seq))
        nexts = walk[1:] + [-1]
        for index, (t, t_next) in enumerate(zip(walk, nexts)):
            yield StepPlan(index, t, self.abar(t), self.abar(t_next))

    @property
    def init_sigma(self) -> float:
        a = self.abar(self.seq[-1])
        return float(np.sqrt(1.0 - a) / np.sqrt(a))


def to_channel_basis(x: np.ndarray) -> np.ndarray:
    """[..., 3, H, W] pixel channels -> (grey, diff1, diff2) coordinates."""
    return np.einsum("ck,...khw->...chw", CHANNEL_BASIS, x, dtype=np.float32, optimize=True)


def from_channel_basis(a: np.ndarray) -> np.ndarray:
    return np.einsum("kc,...khw->...chw", CHANNEL_BASIS, a, dtype=np.float32, optimize=True)


def ddrm_init(ybar: np.ndarray, s: np.ndarray, z: np.ndarray, sig_t: float, sigma0: float) -> np.ndarray:
    """Spectral initial value at the first timestep (variance-exploding scale)."""
    confident = s * sig_t > sigma0
    s_safe = np.where(confident, s, 1.0)
    from_data = ybar / s_safe + np.sqrt(np.maximum(sig_t**2 - sigma0**2 / s_safe**2, 0.0)) * z
    return np.where(confident, from_data, sig_t * z).astype(np.float32)


def ddrm_update(
    v0: np.ndarray,
    ve: np.ndarray,
    ybar: np.ndarray | float,
    s: np.ndarray | float,
    z: np.ndarray,
    sn: float,
    sigma0: float,
    eta: float,
    eta_b: float,
) -> np.ndarray:
    """One DDRM update of spectral coordinates (REFERENCE.md section 4); s = 0 is unobserved."""
    observed = s > 0
    s_safe = np.where(observed, s, 1.0)
    c_dir = np.sqrt(sn**2 - (eta * sn) ** 2)
    noisy = v0 + c_dir * np.where(observed, (ybar - s_safe * v0) / sigma0, ve) + eta * sn * z
    clean = (
        eta_b * ybar / s_safe
        + (1.0 - eta_b) * v0
        + np.sqrt(np.maximum(sn**2 - sigma0**2 * eta_b**2 / s_safe**2, 0.0)) * z
    )
    return np.where(observed & (s * sn > sigma0), clean, noisy).astype(np.float32)


class DDRM:
    """The sampler for one degradation; states are [..., 3, H, W] on the operator's grid."""

    def __init__(self, op: SpatialOperator, schedule: Schedule, settings: SamplerSettings):
        self.op = op
        self.settings = settings
        self.timesteps = Timesteps(schedule, settings.steps)
        self.s = (op.singular_values * GREY_GAIN).astype(np.float32)

    def spectral_measurement(self, y: np.ndarray) -> np.ndarray:
        """ybar = U^T y for the full operator (U is the spatial operator's)."""
        return self.op.ut(y)

    def initial_state(self, ybar: np.ndarray, z: np.ndarray) -> np.ndarray:
        """x at the first timestep; the colour differences start from pure noise."""
        sig = self.timesteps.init_sigma
        az = to_channel_basis(z)
        a = az * np.float32(sig)
        grey = ddrm_init(ybar, self.s, self.op.vt(az[..., 0, :, :]), sig, self.settings.sigma0)
        a[..., 0, :, :] = self.op.v(grey)
        return from_channel_basis(a) / np.float32(sig)

    def step(self, plan: StepPlan, x: np.ndarray, eps: np.ndarray, ybar: np.ndarray, z: np.ndarray) -> np.ndarray:
        """x at the next timestep from x, the network's eps, ybar and pixel-space normals z."""
        cfg = self.settings
        x0 = (x - np.sqrt(1.0 - plan.alpha_bar) * eps) / np.sqrt(plan.alpha_bar)
        sn = float(np.sqrt(1.0 - plan.alpha_bar_next) / np.sqrt(plan.alpha_bar_next))
        a0, ae, az = (to_channel_basis(v) for v in (x0, eps, z))
        update = dict(sn=sn, sigma0=cfg.sigma0, eta=cfg.eta, eta_b=cfg.eta_b)
        out = np.empty_like(a0)
        diff = np.s_[..., 1:, :, :]
        out[diff] = ddrm_update(a0[diff], ae[diff], 0.0, 0.0, az[diff], **update)  # never observed
        vt, grey = self.op.vt, np.s_[..., 0, :, :]
        out[grey] = self.op.v(ddrm_update(vt(a0[grey]), vt(ae[grey]), ybar, self.s, vt(az[grey]), **update))
        return from_channel_basis(out) * np.float32(np.sqrt(plan.alpha_bar_next))


NoiseSource = Callable[[int], np.ndarray]  # step id -> pixel normals shaped like the state
EpsFunction = Callable[[np.ndarray, int], np.ndarray]  # (x, t) -> eps


def run_ddrm(
    ddrm: DDRM,
    y: np.ndarray,
    eps_fn: EpsFunction,
    noise: NoiseSource,
    on_step: Callable[[StepPlan], None] | None = None,
) -> np.ndarray:
    """The whole loop; returns the final state [..., 3, H, W] (x0 of t = 0, [-1,1] scale).

    Noise step ids: the initial value uses ``len(timesteps)``, walk step i uses i.
    """
    ybar = ddrm.spectral_measurement(y)
    x = ddrm.initial_state(ybar, noise(len(ddrm.timesteps)))
    for plan in ddrm.timesteps:
        x = ddrm.step(plan, x, eps_fn(x, plan.t), ybar, noise(plan.index))
        if on_step is not None:
            on_step(plan)
    return x


def state_to_image(x: np.ndarray) -> np.ndarray:
    """Final state -> grey image in [0, 1]: clamp((x+1)/2), channels averaged."""
    return np.clip((x + 1.0) * 0.5, 0.0, 1.0).mean(axis=-3, dtype=np.float32)


#: The final step "weighted" estimates the restoration's error separately in this many bands
#: of measurement precision (a blur measures low frequencies far better than high ones) ...
PRECISION_BANDS = 8
#: ... and weighs the measurement in only where the estimate exceeds this many standard errors:
#: in a band the measurement barely sees, the estimate is noise, and a small weight there
#: would add far more noise than the restoration's error it removes.
SIGNIFICANT_ERRORS = 3.0


def weigh_in_measurement(images: np.ndarray, y: np.ndarray, op: SpatialOperator, sigma0: float) -> np.ndarray:
    """The final step "weighted": grey images [G, S, H, W] on [0, 1] (S samples of each of G
    measurements y [G, ...] on the [-1,1] scale) with the measurement weighed back in.

    DDRM's last steps pull the observed coordinates toward the measurement only weakly, so the
    network's x0 of t = 0 can stray from it by more than the measurement's own noise
    (super-resolution, inpainting and deblurring at low noise). Each observed spectral
    coordinate v0 becomes v0 + w (m - v0), with m = ybar / s the measurement's value (noise
    variance q = sigma0^2 / s^2) and the Wiener weight w = p / (p + q) for the image's error
    variance p. p is estimated by moments per image and band of q, from E[(m - v0)^2] = p + q,
    each coordinate weighted by its precision 1 / q^2 (a band of a blur still spans decades of
    q, and the least precise coordinates would otherwise swamp the estimate), and counts only
    where it is significant (``SIGNIFICANT_ERRORS``). An image that explains the measurement
    to within its noise (as a denoised one does) keeps its pixels; unobserved coordinates
    never change. Every image is weighed on its own, so grouping planes or samples changes
    nothing.
    """
    observed = op.observed()
    if not observed.any():
        return images
    v0, residual, q = measured_residual(images, y, op, sigma0)
    weight = np.zeros_like(residual)
    for band in _precision_bands(q, observed):
        precision = q[band] ** -2.0
        # a row-wise sum, not a BLAS product, so that an image's sum never depends on the batch
        excess = np.sum((residual[..., band] ** 2 - q[band]) * precision, axis=-1) / precision.sum()
        # var((m - v0)^2 - q) = 2 (p + q)^2, so with p = 0 the estimate's standard error is
        # sqrt(2 / sum(precision)).
        significant = excess > SIGNIFICANT_ERRORS * np.sqrt(2.0 / precision.sum())
        p = np.where(significant, excess, 0.0)[..., None]
        weight[..., band] = p / (p + q[band])
    return from_spectrum(v0 + weight * residual, op)


def measured_residual(images: np.ndarray, y: np.ndarray, op: SpatialOperator,
                      sigma0: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(v0, m - v0, q): the spectral coordinates v0 of images [G, S, H, W] on [0, 1], and on the
    observed coordinates the measurement's value m = ybar / s less v0 and m's noise variance
    q = sigma0^2 / s^2 (both 0 on the unobserved ones)."""
    observed = op.observed()
    s = np.where(observed, op.singular_values, 1.0).astype(np.float64)
    q = np.where(observed, sigma0**2 / s**2, 0.0)
    v0 = op.vt(images.astype(np.float64) * 2.0 - 1.0)
    m = op.ut(y.astype(np.float64))[:, None] / s
    return v0, np.where(observed, m - v0, 0.0), q


def from_spectrum(v: np.ndarray, op: SpatialOperator) -> np.ndarray:
    """Images on [0, 1] (float32) of spectral coordinates v on the [-1,1] scale."""
    return np.clip((op.v(v) + 1.0) * 0.5, 0.0, 1.0).astype(np.float32)


def _precision_bands(q: np.ndarray, observed: np.ndarray) -> list[np.ndarray]:
    """The observed coordinates in up to PRECISION_BANDS groups of similar noise variance q
    (quantiles of log q); an operator with one singular value makes one band."""
    log_q = np.log(q[observed])
    edges = np.unique(np.quantile(log_q, np.linspace(0.0, 1.0, PRECISION_BANDS + 1)[1:-1]))
    band = np.full(q.shape, -1)
    band[observed] = np.searchsorted(edges, log_q, side="right")
    return [band == b for b in np.unique(band[observed])]

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
    DEFAULT_WALK,
    MAX_SIGMA0,
    MIN_SIGMA0,
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
    walk: str = DEFAULT_WALK  # where the walk starts: walk_timesteps

    def __post_init__(self):
        try:
            real_number("sigma0", self.sigma0, MIN_SIGMA0, MAX_SIGMA0, low_inclusive=True)
        except ValueError as err:
            raise ValueError(f"{err} (the measurement noise std on the [-1,1] scale); pass --sigma0, --noise-std "
                             "or --sigma0 auto") from None
        check_walk(self.steps, self.eta, self.eta_b, self.final_step, self.walk)


@dataclass(frozen=True)
class StepPlan:
    index: int  # position in the walk, 0 first
    t: int  # timestep index given to the network
    alpha_bar: float
    alpha_bar_next: float  # 1 after t = 0


class Timesteps:
    """The timesteps of a walk, ``seq`` ascending and walked from its end.

    Without ``start``, the published skip schedule: seq = 0, skip, 2*skip, ... < T, so the
    network is called ceil(T / skip) times, which exceeds ``steps`` when T is not a multiple
    of it. With ``start``, exactly ``steps`` calls spread evenly over [0, start]; a start
    below ``steps`` - 1 leaves no room for them, and the walk starts at ``steps`` - 1 instead.
    """

    def __init__(self, schedule: Schedule, steps: int, start: int | None = None):
        T = schedule.num_diffusion_timesteps
        if steps > T:
            raise ValueError(f"steps ({steps}) exceeds the model's {T} diffusion timesteps")
        self.alphas_bar = np.cumprod(1.0 - schedule.betas())
        self.published = start is None
        if start is None:
            self.seq = list(range(0, T, T // steps))
        else:
            top = min(max(start, steps - 1), T - 1)
            # spacing >= 1, so the rounded timesteps are distinct; linspace from the top keeps it for one step
            self.seq = sorted(int(t) for t in np.rint(np.linspace(top, 0, steps)))

    def __len__(self) -> int:
        """Network calls per restoration."""
        return len(self.seq)

    def abar(self, t: int) -> float:
        return 1.0 if t < 0 else float(self.alphas_bar[t])

    def __iter__(self) -> Iterator[StepPlan]:
        walk = list(reversed(self.seq))
        nexts = walk[1:] + [-1]
        for index, (t, t_next) in enumerate(zip(walk, nexts)):
            yield StepPlan(index, t, self.abar(t), self.abar(t_next))

    @property
    def start(self) -> int:
        """The first timestep of the walk (where its initial value is drawn)."""
        return self.seq[-1]

    @property
    def init_sigma(self) -> float:
        """sigma_t = sqrt(1 - abar) / sqrt(abar) at the start: the initial value's noise std on
        the variance-exploding scale of DDRM's spectral coordinates."""
        a = self.abar(self.start)
        return float(np.sqrt(1.0 - a) / np.sqrt(a))

    @property
    def init_divisor(self) -> float:
        """x = V(v) / init_divisor for the initial spectral value v.

        Exactly, the variance-preserving state of v is V(v) / sqrt(1 + sigma_t^2) (= sqrt(abar)
        V(v)), and a walk with a ``start`` divides so. The published walk divides by sigma_t,
        the limit for abar -> 0: right to 3e-5 at the first step of 50, to 0.2% at the first
        of 4, and far off where a matched walk starts (a factor of 2.9 at sigma_t 0.35). It
        keeps that division, so that its results stay the published sampler's.
        """
        sig = self.init_sigma
        return sig if self.published else float(np.sqrt(1.0 + sig**2))

    def to_dict(self) -> dict:
        """What provenance records of the walk: its first timestep and every network call's."""
        return {"start": self.start, "timesteps": list(reversed(self.seq)), "network_calls": len(self)}


def matched_start(alphas_bar: np.ndarray, weakest_gain: float, sigma0: float) -> int:
    """The first timestep of a matched walk: the smallest t with s * sigma_t > sigma0 for the
    operator's weakest singular value s, or T - 1 if there is none.

    From there up, DDRM's update of every observed coordinate is ybar / s plus fresh noise
    (eta_b = 1; REFERENCE.md section 4): the network's estimate is discarded, and the state
    at t is exactly DDRM's initial value drawn at t. A walk that starts there and spends its
    steps on [0, t] loses nothing the measurement decides and calls the network only where it
    counts. The colour differences, never observed, start from noise there rather than from
    the network's pull toward zero above it.
    """
    sigma_t = np.sqrt(1.0 - alphas_bar) / np.sqrt(alphas_bar)
    # in float32, as ddrm_init and the kernels compare: at a start on the edge, the initial
    # value must still count every coordinate as decided by the measurement
    decided = np.float32(weakest_gain) * sigma_t.astype(np.float32) > np.float32(sigma0)
    return int(np.argmax(decided)) if decided.any() else len(alphas_bar) - 1


def weakest_observing_gain(op: SpatialOperator) -> float | None:
    """The full operator's smallest singular value when its spatial operator observes every
    grey coordinate (denoising), else None: a coordinate never observed must be generated by
    the network from pure noise, so its walk must be the full one."""
    observed = op.observed()
    if not observed.all():
        return None
    return float(np.float32(np.min(op.singular_values) * GREY_GAIN))  # DDRM.s's float32 value


def walk_timesteps(schedule: Schedule, settings: SamplerSettings, op: SpatialOperator | None) -> Timesteps:
    """The timesteps of a walk as ``settings.walk`` asks: "full", the published walk from
    t = T - 1; "matched", from ``matched_start`` where the operator observes every grey
    coordinate, and the full walk where it does not, where eta_b < 1 (the network's estimate
    then counts at every t) or where no operator is given (a task whose operator never
    observes everything: ``TaskOptions.walk_operator``)."""
    gain = weakest_observing_gain(op) if op is not None and settings.walk == "matched" else None
    if gain is None or settings.eta_b != 1.0:
        return Timesteps(schedule, settings.steps)
    alphas_bar = np.cumprod(1.0 - schedule.betas())
    return Timesteps(schedule, settings.steps, matched_start(alphas_bar, gain, settings.sigma0))


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
        self.timesteps = walk_timesteps(schedule, settings, op)
        self.s = (op.singular_values * GREY_GAIN).astype(np.float32)

    def spectral_measurement(self, y: np.ndarray) -> np.ndarray:
        """ybar = U^T y for the full operator (U is the spatial operator's)."""
        return self.op.ut(y)

    def initial_state(self, ybar: np.ndarray, z: np.ndarray) -> np.ndarray:
        """x at the first timestep (``Timesteps.init_divisor``); the colour differences start
        from pure noise."""
        sig = self.timesteps.init_sigma
        az = to_channel_basis(z)
        a = az * np.float32(sig)
        grey = ddrm_init(ybar, self.s, self.op.vt(az[..., 0, :, :]), sig, self.settings.sigma0)
        a[..., 0, :, :] = self.op.v(grey)
        return from_channel_basis(a) / np.float32(self.timesteps.init_divisor)

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

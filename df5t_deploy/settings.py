"""The settings of a restoration, declared once.

``RestoreSettings`` holds every setting that changes the result, named as the CLI options,
with its default and its help. The CLI's options (``cli.py``), the ``Restorer``'s keyword
arguments and the provenance recorded in every output (``to_dict``) are derived from it;
a setting is added here and nowhere else. Each default is the one of the module that owns
the concept (the published sampler defaults, ``tasks.DEFAULT_MIN_HOLE``,
``regions.DEFAULT_MAX_REGION``).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields

from .parameters import choice, real_number, whole_number
from .regions import DEFAULT_MAX_REGION
from .tasks import DEFAULT_MIN_HOLE, TASKS, TaskError, parse_blur_sigma

#: The published DF5T run (REFERENCE.md, section 4).
PUBLISHED_STEPS, PUBLISHED_ETA, PUBLISHED_ETA_B = 50, 0.85, 1.0
#: DDRM's eta where we depart from the published one, per task: chosen on the quality
#: benchmark's validation crops (``benchmarks/results/eta_on_validation.md``). Denoising gains
#: 0.04 to 0.81 dB with less noise injected (0.05 to 0.23 with Poisson-Gaussian noise): the mean
#: of a few samples is then the closer to the posterior mean. The other tasks, where part of the
#: image is measured weakly or not at all, gain with more (eta 1.0: super-resolution up to 0.31
#: dB, deblurring 0.24, inpainting 0.99, isotropic 0.12; ``benchmarks/results/eta-on-validation-17600``)
#: and lose with less.
TASK_ETA = {"denoise": 0.5, "sr": 1.0, "deblur": 1.0, "inpaint": 1.0, "isotropic": 1.0}


#: Where a task's walk departs from the published 50 steps of one sample: chosen on the quality
#: benchmark's validation crops (``benchmarks/walk_frontier.py``, results in
#: ``benchmarks/results/walk-frontier``). A matched denoising walk (``WALKS``) spends its steps
#: where the network counts, so a few steps there match the full walk's, and the calls saved buy
#: samples, whose mean is the closer to the posterior mean. 3 steps x 4 samples (12 calls per
#: pixel) was the cheapest setting that lost nowhere against the full walk's 20 x 4 (80 calls):
#: +0.02 dB on average over Gaussian and Poisson-Gaussian noise on three datasets, the worst case
#: -0.004; 2 x 4 and 1 x 8 gained more on average (+0.07, +0.08) but lost up to 0.14 dB on the
#: mussel tile.
TASK_STEPS = {"denoise": 3}
TASK_SAMPLES = {"denoise": 4}
PUBLISHED_SAMPLES = 1


def default_eta(task: str) -> float:
    """A task's eta when none is given: ours where we depart (``TASK_ETA``), else the published."""
    return TASK_ETA.get(task, PUBLISHED_ETA)


def default_steps(task: str) -> int:
    """A task's steps (network calls per sample) when none are given."""
    return TASK_STEPS.get(task, PUBLISHED_STEPS)


def default_samples(task: str) -> int:
    """A task's posterior samples when none are given."""
    return TASK_SAMPLES.get(task, PUBLISHED_SAMPLES)


def defaults_by_task(default_of: Callable[[str], float], published: float) -> str:
    """A setting's default for every task, in words (the CLI's help, the benchmarks' headers)."""
    tasks_by_value: dict[float, list[str]] = {}
    for task in TASKS:
        tasks_by_value.setdefault(default_of(task), []).append(task)
    return "; ".join(f"{value:g}{' (published)' if value == published else ''} for {', '.join(tasks)}"
                     for value, tasks in tasks_by_value.items())


def eta_defaults() -> str:
    """The default eta of every task, in words."""
    return defaults_by_task(default_eta, PUBLISHED_ETA)


#: How a walk ends: "network" keeps the network's x0 of t = 0 (the published sampler);
#: "weighted" weighs the measurement back in (``sampler.weigh_in_measurement``).
FINAL_STEPS = ("network", "weighted")
PUBLISHED_FINAL_STEP = "network"
#: A restoration's final step. We depart from the published sampler here: on held-out real EM
#: the weighted step gains in every case where the measurement is more precise than the
#: network's estimate and changes nothing elsewhere (README, "The final step").
DEFAULT_FINAL_STEP = "weighted"
#: Where a walk starts: "full" at t = T - 1 (the published walk); "matched" where the
#: diffusion's noise falls to the measurement's (``sampler.matched_start``) when the operator
#: observes every grey coordinate (denoising), which leaves the result as the measurement
#: decides it and calls the network only where it counts; other operators walk in full.
WALKS = ("matched", "full")
PUBLISHED_WALK = "full"
DEFAULT_WALK = "matched"
NOISE_MODELS = ("gaussian", "poisson-gaussian")
POISSON_GAUSSIAN_PARAMETERS = ("gain", "read_noise", "offset")
#: The largest noise std on the [-1,1] scale: five times the whole intensity range.
MAX_SIGMA0 = 10.0
#: The smallest: below float32's range (1e-45) sigma0 is 0 to the kernels, and the final step's
#: precisions (sigma0^-4) overflow float64 below 1e-77; 1e-6 keeps far from both and is still
#: 30 times below the quantisation noise of 16-bit data over its whole range.
MIN_SIGMA0 = 1e-6


def check_walk(steps: int, eta: float, eta_b: float, final_step: str, walk: str) -> None:
    """The checks of the sampler's own settings, shared by ``RestoreSettings`` and the
    sampler's ``SamplerSettings``."""
    whole_number("steps", steps, 1)
    real_number("eta", eta, 0.0, 1.0, low_inclusive=True)
    real_number("eta_b", eta_b, 0.0, 1.0, low_inclusive=True)
    choice("final_step", final_step, FINAL_STEPS)
    choice("walk", walk, WALKS)


def _setting(default, help: str, kind: type, choices: tuple[str, ...] | None = None):
    """A field with what the CLI and the napari widget need to offer it: its help, the type of
    its value and, for a choice, the values to choose from."""
    return field(default=default, metadata={"help": help, "type": kind, "choices": choices})


@dataclass(frozen=True)
class RestoreSettings:
    """Everything that changes a restoration's pixels, checked when made (a wrong value is a
    ValueError, a wrong type a TypeError, each naming the setting)."""

    task: str = _setting("denoise", "Restoration task.", str, TASKS)
    sigma0: float | str | None = _setting(
        None, "Noise std of the measurement on the [-1,1] scale (published runs: 0.2), or 'auto' (estimated from "
        "the image). Default: auto for denoise (Gaussian noise model); other tasks need it or --noise-std.", float)
    noise_std: float | None = _setting(None, "The same noise std in input units.", float)
    noise_model: str = _setting(
        "gaussian", "gaussian: one noise level (--sigma0 or --noise-std); poisson-gaussian: shot plus read noise, "
        "denoised in the generalised Anscombe domain (denoise only).", str, NOISE_MODELS)
    gain: float | None = _setting(None, "poisson-gaussian: input units per detected count. Default: fitted.", float)
    read_noise: float | None = _setting(None, "poisson-gaussian: read-noise std in input units. Default: fitted.",
                                        float)
    offset: float | None = _setting(None, "poisson-gaussian: black level in input units. Default: fitted.", float)
    seed: int = _setting(0, "Seed of the counter-based noise (0 to 2^64 - 1).", int)
    steps: int | None = _setting(
        None, "Sampler steps: network calls per sample (a full walk of the published schedule makes "
        "ceil(T / (T // steps)) of them). Default: "
        f"{defaults_by_task(default_steps, PUBLISHED_STEPS)}.", int)
    eta: float | None = _setting(
        None, f"DDRM eta: noise injected into unobserved coordinates (0..1). Default: {eta_defaults()}.", float)
    eta_b: float = _setting(PUBLISHED_ETA_B, "DDRM eta_b: weight of the measurement (0..1).", float)
    final_step: str = _setting(
        DEFAULT_FINAL_STEP, "weighted: the measurement weighed back into the network's final estimate where it "
        "is the more precise; network: that estimate as it is (the published sampler).", str, FINAL_STEPS)
    walk: str = _setting(
        DEFAULT_WALK, "matched: start where the diffusion's noise falls to the measurement's, when every grey "
        "coordinate is measured (denoise; eta_b 1), and spend the steps below it; full: the published walk from "
        "t = T-1 (always, for the other tasks).", str, WALKS)
    scale: int | None = _setting(None, "sr: factor R (2..8, default 2).", int)
    blur_sigma: tuple[float, float] | None = _setting(None, "deblur: PSF std in pixels, or SY,SX.", str)
    min_hole: int = _setting(DEFAULT_MIN_HOLE, "inpaint auto: smallest zero/NaN region counted as missing.", int)
    z_factor: int | None = _setting(None, "isotropic: z spacing / xy spacing.", int)
    overlap: int | None = _setting(None, "Tile overlap in pixels. Default: tile/8.", int)
    batch: int | None = _setting(None, "Tiles per network call. Default: per backend.", int)
    max_region: int = _setting(DEFAULT_MAX_REGION,
                               "Largest plane side restored at once; larger planes go by blended super-tiles.", int)
    samples: int | None = _setting(
        None, f"Posterior samples averaged. Default: {defaults_by_task(default_samples, PUBLISHED_SAMPLES)}.", int)

    def __post_init__(self):
        if self.task not in TASKS:
            raise TaskError(f"unknown task {self.task!r}; choose one of {', '.join(TASKS)}")
        self._check_noise_model()
        if self.sigma0 != "auto" and self.sigma0 is not None:
            real_number("sigma0", self.sigma0, MIN_SIGMA0, MAX_SIGMA0, low_inclusive=True)
        if self.noise_std is not None:
            real_number("noise_std", self.noise_std, 0.0)
        whole_number("seed", self.seed, 0, 2**64 - 1)
        for name, default_of in (("eta", default_eta), ("steps", default_steps), ("samples", default_samples)):
            if getattr(self, name) is None:
                object.__setattr__(self, name, default_of(self.task))
        check_walk(self.steps, self.eta, self.eta_b, self.final_step, self.walk)
        whole_number("min_hole", self.min_hole, 1)
        whole_number("max_region", self.max_region, 1)
        whole_number("samples", self.samples, 1)
        for name, minimum in (("overlap", 0), ("batch", 1)):
            if getattr(self, name) is not None:
                whole_number(name, getattr(self, name), minimum)
        object.__setattr__(self, "blur_sigma", parse_blur_sigma(self.blur_sigma))

    def _check_noise_model(self) -> None:
        choice("noise_model", self.noise_model, NOISE_MODELS)
        poisson_parameters = [name for name in POISSON_GAUSSIAN_PARAMETERS if getattr(self, name) is not None]
        if self.noise_model == "gaussian":
            if self.sigma0 is None and self.noise_std is None and self.task == "denoise":
                object.__setattr__(self, "sigma0", "auto")
            if (self.sigma0 is None) == (self.noise_std is None):
                raise ValueError(f"{'no noise level' if self.sigma0 is None else 'two noise levels'}: give one, "
                                 "--sigma0 (on the [-1,1] scale, or --sigma0 auto to estimate it from the image) or "
                                 "--noise-std (in input units); in Python sigma0= or noise_std=")
            if poisson_parameters:
                raise ValueError(f"{', '.join(poisson_parameters)}: for noise_model 'poisson-gaussian' only")
            return
        if self.sigma0 is not None or self.noise_std is not None:
            raise ValueError("noise_model 'poisson-gaussian' takes the noise level from gain and read_noise "
                             "(given or fitted): drop sigma0 and noise_std")
        if self.task != "denoise":
            raise TaskError(f"noise_model 'poisson-gaussian' is for --task denoise, not {self.task}")
        if self.gain is not None:
            real_number("gain", self.gain, 0.0)
        if self.read_noise is not None:
            real_number("read_noise", self.read_noise, 0.0, low_inclusive=True)
        if self.offset is not None:
            real_number("offset", self.offset, -math.inf)

    def to_dict(self) -> dict:
        """The settings as recorded in provenance (JSON types)."""
        record = asdict(self)
        record["blur_sigma"] = None if self.blur_sigma is None else list(self.blur_sigma)
        return record


def setting_fields(*names: str):
    """The fields of these settings (all, by default), in declaration order."""
    chosen = [f for f in fields(RestoreSettings) if not names or f.name in names]
    unknown = set(names) - {f.name for f in chosen}
    if unknown:
        raise ValueError(f"not settings: {sorted(unknown)}")
    return chosen

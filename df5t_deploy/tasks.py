"""The five restoration tasks: their options, checked together, and their operators."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import scipy.ndimage

from .operators import BlockMean, GaussianBlur, Identity, Inpainting, SpatialOperator

TASKS = ("denoise", "deblur", "sr", "inpaint", "isotropic")
#: Each task's own options, declared once: an option set for another task is refused, and
#: a task's provenance records its own.
TASK_OPTIONS = {"denoise": (), "deblur": ("blur_sigma",), "sr": ("scale",), "inpaint": ("mask", "min_hole"),
                "isotropic": ("z_factor",)}
#: The options refused outside their task when given (min_hole has a default everywhere).
_EXCLUSIVE = ("scale", "blur_sigma", "mask", "z_factor")
SR_FACTORS = range(2, 9)
DEFAULT_MIN_HOLE = 200
#: isotropic: z spacing / xy spacing; beyond 64 there is too little data per restored plane.
MIN_Z_FACTOR, MAX_Z_FACTOR = 2, 64
#: deblur: the PSF's std may be at most this fraction of the image's shorter side.
MAX_BLUR_FRACTION = 4.0


class TaskError(ValueError):
    """Options that do not fit the task; the message names the option and the fix."""


@dataclass(frozen=True)
class TaskOptions:
    task: str
    scale: int | None = None  # sr: R
    blur_sigma: tuple[float, float] | None = None  # deblur: (sigma_y, sigma_x) in pixels
    mask: np.ndarray | str | None = None  # inpaint: bool array (True = missing) or "auto"
    min_hole: int = DEFAULT_MIN_HOLE  # inpaint auto: smallest hole in pixels
    z_factor: int | None = None  # isotropic: z spacing / xy spacing

    def __post_init__(self):
        if self.task not in TASKS:
            raise TaskError(f"unknown task {self.task!r}; choose one of {', '.join(TASKS)}")
        for name in _EXCLUSIVE:
            owner = next(task for task, options in TASK_OPTIONS.items() if name in options)
            if getattr(self, name) is not None and self.task != owner:
                raise TaskError(f"--{name.replace('_', '-')} applies only to --task {owner}, not to --task {self.task}")
        if self.task == "sr" and self.factor not in SR_FACTORS:
            raise TaskError(f"--scale must be an integer from 2 to 8, got {self.scale}")
        if self.task == "deblur":
            if self.blur_sigma is None:
                raise TaskError("--task deblur needs --blur-sigma (the PSF's std in pixels, or SY,SX)")
            if not all(math.isfinite(v) and v > 0 for v in self.blur_sigma):
                raise TaskError(f"--blur-sigma must be finite and positive, got {self.blur_sigma}")
        if isinstance(self.mask, str) and self.mask != "auto":
            raise TaskError(f"mask must be an array or 'auto', got {self.mask!r}")
        if self.min_hole < 1:
            raise TaskError(f"--min-hole must be >= 1, got {self.min_hole}")
        if self.z_factor is not None and not MIN_Z_FACTOR <= self.z_factor <= MAX_Z_FACTOR:
            raise TaskError(f"--z-factor must be an integer from {MIN_Z_FACTOR} to {MAX_Z_FACTOR}, got {self.z_factor}")

    def check_plane(self, shape: tuple[int, int]) -> None:
        """Options that cannot work on planes of this (measurement) shape, refused before work."""
        if self.task == "deblur" and max(self.blur_sigma) > min(shape) / MAX_BLUR_FRACTION:
            raise TaskError(f"--blur-sigma {max(self.blur_sigma):g} is wider than the {shape[0]} x {shape[1]} image "
                            f"allows (at most 1/{MAX_BLUR_FRACTION:g} of its shorter side, "
                            f"{min(shape) / MAX_BLUR_FRACTION:g} px): nearly nothing would be observed")

    @property
    def factor(self) -> int:
        """Upsampling factor from measurement grid to restoration grid (sr only)."""
        return (2 if self.scale is None else self.scale) if self.task == "sr" else 1

    def grid_shape(self, measurement_shape: tuple[int, int]) -> tuple[int, int]:
        return measurement_shape[0] * self.factor, measurement_shape[1] * self.factor

    def operator(self, grid_shape: tuple[int, int], missing: np.ndarray | None = None) -> SpatialOperator:
        """The spatial operator of a 2D task on a restoration grid."""
        if self.task == "denoise":
            return Identity(grid_shape)
        if self.task == "sr":
            return BlockMean(grid_shape, (self.factor, self.factor))
        if self.task == "deblur":
            return GaussianBlur(grid_shape, self.blur_sigma)
        if self.task == "inpaint":
            if missing is None:
                raise TaskError("inpainting needs a mask")
            return Inpainting(missing)
        raise TaskError("--task isotropic restores volumes (ZYX); it has no 2D operator")

    def walk_operator(self, grid_shape: tuple[int, int]) -> SpatialOperator | None:
        """The operator that decides where a walk on this grid starts (``sampler.walk_timesteps``),
        or None where the walk is the full one whatever the input: an inpainting mask misses
        pixels by definition, and isotropic restoration's z block mean leaves k - 1 of every k
        coordinates unmeasured."""
        return None if self.task in ("inpaint", "isotropic") else self.operator(grid_shape)

    def to_dict(self) -> dict:
        """The task and its own options as resolved (sr's factor, whether a mask was given)."""
        resolved = {"scale": self.factor, "blur_sigma": list(self.blur_sigma or ()), "min_hole": self.min_hole,
                    "mask": "auto" if isinstance(self.mask, str) or self.mask is None else "given",
                    "z_factor": self.z_factor}
        return {"task": self.task, **{name: resolved[name] for name in TASK_OPTIONS[self.task]}}


def parse_blur_sigma(text: str | float | tuple | None) -> tuple[float, float] | None:
    """"1.5" -> (1.5, 1.5); "2,1" -> (2.0, 1.0) as (sigma_y, sigma_x)."""
    if text is None:
        return None
    if isinstance(text, (int, float)):
        return float(text), float(text)
    if isinstance(text, tuple):
        values = list(text)
    else:
        try:
            values = [float(v) for v in str(text).split(",")]
        except ValueError:
            raise TaskError(f"--blur-sigma takes one number or SY,SX, got {text!r}") from None
    if len(values) == 1:
        values *= 2
    if len(values) != 2:
        raise TaskError(f"--blur-sigma takes one number or SY,SX, got {text!r}")
    return float(values[0]), float(values[1])


def auto_mask(image: np.ndarray, min_hole: int = DEFAULT_MIN_HOLE) -> np.ndarray:
    """Missing pixels: connected regions of exact zeros of at least ``min_hole`` pixels, and
    every NaN (a NaN can never be observed). Small zero blobs are real EM content."""
    nan = np.isnan(image) if image.dtype.kind == "f" else np.zeros(image.shape, bool)
    zero = (image == 0) | nan
    labels, count = scipy.ndimage.label(zero)
    if count == 0:
        return nan
    sizes = np.bincount(labels.ravel())
    big = sizes >= min_hole
    big[0] = False
    return big[labels] | nan


def missing_pixels(options: TaskOptions, image: np.ndarray) -> np.ndarray:
    """The inpainting mask for ``image`` (True = missing), checked against it."""
    if options.mask is None or isinstance(options.mask, str):
        missing = auto_mask(image, options.min_hole)
    else:
        missing = np.asarray(options.mask) != 0
        if missing.shape != image.shape:
            raise TaskError(
                f"mask shape {missing.shape} does not match the image {image.shape}; give a mask "
                "of the same height and width (nonzero = missing)"
            )
        if image.dtype.kind == "f":
            missing = missing | np.isnan(image)
    if not missing.any():
        raise TaskError(
            "no missing pixels: the mask is empty (auto masks need zero or NaN regions of at "
            f"least --min-hole={options.min_hole} pixels); pass --mask FILE"
        )
    if missing.all():
        raise TaskError("every pixel is masked as missing; nothing is observed")
    return missing

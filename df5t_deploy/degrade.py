"""Known-truth pairs: apply a task's degradation H plus grey Gaussian noise to an image.

The noise comes from the same counter-based generator as the sampler (its measurement
counter), so ``df5t degrade --seed S`` is reproducible everywhere.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import scipy.ndimage

from .intensity import IntensityMap, check_dtype, in_dtype, intensity_map_for
from .noise import MEASUREMENT_STEP, gaussian_field
from .poisson_gaussian import PoissonGaussian
from .tasks import TaskError, TaskOptions


@dataclass
class Degraded:
    image: np.ndarray  # in the input's dtype (float for inpaint of float input keeps NaN holes)
    missing: np.ndarray | None  # inpaint: True where removed
    intensity: IntensityMap | None  # None for detector noise, added in input units
    sigma0: float
    cropped_shape: tuple[int, ...]  # the truth this measurement belongs to
    poisson_gaussian: PoissonGaussian | None = None  # the detector noise added, in place of sigma0


def blob_mask(shape: tuple[int, int], fraction: float, seed: int, blob_sigma: float = 12.0) -> np.ndarray:
    """Random smooth blobs covering ``fraction`` of the image (True = missing)."""
    if not 0.0 < fraction < 1.0:
        raise TaskError(f"--missing-fraction must be in (0, 1), got {fraction}")
    field = scipy.ndimage.gaussian_filter(np.random.default_rng(seed).standard_normal(shape), blob_sigma)
    return field > np.quantile(field, 1.0 - fraction)


def degrade(
    image: np.ndarray,
    options: TaskOptions,
    *,
    sigma0: float | None = None,
    noise_std: float | None = None,
    seed: int = 0,
    missing: np.ndarray | None = None,
    poisson_gaussian: PoissonGaussian | None = None,
) -> Degraded:
    """y = H x + noise for a YX image, or for a ZYX volume with ``isotropic`` (z box mean);
    with ``poisson_gaussian``, shot and read noise of those parameters (denoise only)."""
    check_dtype(image)
    if poisson_gaussian is not None:
        return _with_detector_noise(image, options, poisson_gaussian, seed)
    if (sigma0 is None) == (noise_std is None):
        raise TaskError("give exactly one of --sigma0 (on the [-1,1] scale) or --noise-std (input units)")
    intensity = intensity_map_for(image)
    sigma0 = sigma0 if sigma0 is not None else intensity.sigma0_from_noise_std(noise_std)
    if sigma0 < 0:
        raise TaskError(f"the noise std must be >= 0, got {sigma0}")
    truth = _crop_to_blocks(image, options)
    x = intensity.to_model(truth)
    if options.task == "isotropic":
        k = options.z_factor
        y = x.reshape(x.shape[0] // k, k, *x.shape[1:]).mean(axis=1)
    else:
        if x.ndim != 2:
            raise TaskError(f"--task {options.task} degrades YX images; got shape {x.shape}")
        if options.task == "inpaint":
            if missing is None or missing.shape != x.shape:
                raise TaskError("inpainting needs a mask of the image's shape (--mask FILE or --mask blobs)")
            y = np.where(missing, 0.0, x)
        else:
            y = options.operator(x.shape).forward(x)
    y = y + np.float32(sigma0) * _measurement_noise(y.shape, seed)
    out = intensity.from_unit((y + 1.0) * 0.5)
    if options.task == "inpaint":
        out = np.where(missing, np.nan if out.dtype.kind == "f" else 0, out).astype(out.dtype)
    return Degraded(out, missing if options.task == "inpaint" else None, intensity, sigma0, truth.shape)


def _with_detector_noise(image: np.ndarray, options: TaskOptions, noise: PoissonGaussian, seed: int) -> Degraded:
    """The image as the noise-free mean of a Poisson-Gaussian detector: counts drawn by the
    Poisson quantile function of one counter normal, read noise from another."""
    if options.task != "denoise":
        raise TaskError(f"--noise-model poisson-gaussian degrades for --task denoise, not {options.task}")
    if image.dtype.kind == "f" and not np.isfinite(image).all():
        raise TaskError("the image has NaN or Inf pixels: a detector's mean must be finite")
    normals = _measurement_noise(image.shape, seed, channels=2)
    measured = in_dtype(noise.sample(image.astype(np.float64), normals), image.dtype)
    return Degraded(measured, None, None, float("nan"), image.shape, noise)


def _measurement_noise(shape: tuple[int, ...], seed: int, channels: int = 1) -> np.ndarray:
    """Grey normals for a YX measurement, or for every plane of a ZYX one ([channels, ...]
    with several channels: independent fields from the counter's other outputs)."""
    planes = shape[0] if len(shape) == 3 else 1
    fields = np.stack([
        gaussian_field(seed, step=MEASUREMENT_STEP, plane=p, y0=0, x0=0, height=shape[-2], width=shape[-1])[:channels]
        for p in range(planes)
    ], axis=1)
    return fields.reshape(shape) if channels == 1 else fields.reshape(channels, *shape)


def _crop_to_blocks(image: np.ndarray, options: TaskOptions) -> np.ndarray:
    """Crop sr images to a multiple of R (and isotropic volumes to a multiple of k planes)."""
    if options.task == "sr":
        r = options.factor
        h, w = image.shape[-2] - image.shape[-2] % r, image.shape[-1] - image.shape[-1] % r
        if (h, w) != image.shape[-2:]:
            warnings.warn(f"cropped {image.shape[-2]}x{image.shape[-1]} to {h}x{w}, a multiple of --scale {r}", stacklevel=3)
        return image[..., :h, :w]
    if options.task == "isotropic":
        if image.ndim != 3:
            raise TaskError("--task isotropic degrades ZYX volumes")
        k = options.z_factor
        if k is None:
            raise TaskError("--task isotropic needs --z-factor (planes averaged into one)")
        z = image.shape[0] - image.shape[0] % k
        if z == 0:
            raise TaskError(f"the volume has {image.shape[0]} planes, fewer than --z-factor {k}")
        if z != image.shape[0]:
            warnings.warn(f"cropped {image.shape[0]} planes to {z}, a multiple of --z-factor {k}", stacklevel=3)
        return image[:z]
    return image

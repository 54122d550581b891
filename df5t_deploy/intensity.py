"""One affine intensity map per image or volume, to the model's [-1, 1] scale and back.

uint8: v / 255. uint16 and float: the 0.1 and 99.9 percentiles map to 0 and 1, estimated
once per image, or from a sample of planes for a volume. The output is mapped back with the
same map and clipped to the input's dtype; the map is recorded in the output's metadata.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

import numpy as np

from .poisson_gaussian import PoissonGaussian, fit_poisson_gaussian

if TYPE_CHECKING:
    from .formats.base import Source

SUPPORTED_DTYPES = (np.uint8, np.uint16, np.float32, np.float64)
PERCENTILES = (0.1, 99.9)
#: Planes a volume's percentiles are estimated from (evenly spaced).
SAMPLE_PLANES = 16


@dataclass(frozen=True)
class IntensityMap:
    low: float  # input value mapped to 0
    high: float  # input value mapped to 1
    dtype: str
    rule: str  # "uint8 full range" or "percentiles 0.1/99.9"

    def to_model(self, values: np.ndarray) -> np.ndarray:
        """Input units -> [-1, 1] float32."""
        unit = (values.astype(np.float32) - np.float32(self.low)) / np.float32(self.high - self.low)
        return unit * 2.0 - 1.0

    def from_unit(self, unit: np.ndarray) -> np.ndarray:
        """[0, 1] -> input units, rounded and clipped for integer dtypes."""
        return in_dtype(self.values_from_unit(unit), self.dtype)

    def values_from_unit(self, unit: np.ndarray) -> np.ndarray:
        """[0, 1] -> input units (float64)."""
        return unit.astype(np.float64) * (self.high - self.low) + self.low

    def std_from_unit(self, mean_unit: np.ndarray, std_unit: np.ndarray) -> np.ndarray:
        """A std on the [0, 1] scale around ``mean_unit``, in input units (float32)."""
        return (std_unit * np.float32(self.high - self.low)).astype(np.float32)

    def sigma0_from_noise_std(self, noise_std: float) -> float:
        """A noise std in input units, expressed on the [-1, 1] scale."""
        return float(noise_std) * 2.0 / (self.high - self.low)

    def to_dict(self) -> dict:
        return asdict(self)


def in_dtype(values: np.ndarray, dtype) -> np.ndarray:
    """Values in input units as ``dtype``: rounded and clipped for integer dtypes."""
    dtype = np.dtype(dtype)
    if dtype.kind == "u":
        info = np.iinfo(dtype)
        return np.clip(np.rint(values), info.min, info.max).astype(dtype)
    return values.astype(dtype)


def check_dtype(array: np.ndarray) -> None:
    if array.dtype.type not in SUPPORTED_DTYPES:
        raise ValueError(
            f"unsupported pixel type {array.dtype}; supported: uint8, uint16, float32, float64 "
            "(convert the image first)"
        )


def intensity_map_for(array: np.ndarray) -> IntensityMap:
    """The map for an image [Y, X] or a volume [Z, Y, X] (percentiles from sampled planes)."""
    check_dtype(array)
    sample = array
    if array.ndim == 3 and array.shape[0] > SAMPLE_PLANES:
        sample = array[np.linspace(0, array.shape[0] - 1, SAMPLE_PLANES).round().astype(int)]
    values = np.asarray(sample, dtype=np.float64)
    values = values[np.isfinite(values)]
    if not values.size:
        raise ValueError("every pixel is NaN or Inf: nothing to restore")
    if values.min() == values.max():
        raise ValueError(f"the image is constant (every pixel {values.min():g}): nothing to restore")
    if array.dtype == np.uint8:
        return IntensityMap(0.0, 255.0, "uint8", "uint8 full range")
    low, high = np.percentile(values, PERCENTILES)
    if not high > low:
        raise ValueError(
            f"the image is nearly constant (0.1 and 99.9 percentiles both {low:g}): nothing to restore"
        )
    return IntensityMap(float(low), float(high), array.dtype.name, "percentiles 0.1/99.9")


def intensity_map_for_source(source: Source) -> IntensityMap:
    """One map per image or volume; a volume's percentiles come from sampled planes."""
    if source.planes == 1:
        return intensity_map_for(source.plane(0))
    chosen = np.unique(np.linspace(0, source.planes - 1, SAMPLE_PLANES).round().astype(int))
    return intensity_map_for(np.stack([source.plane(int(z)) for z in chosen]))


def mean_and_std(unit: np.ndarray, intensity: IntensityMap) -> tuple[np.ndarray, np.ndarray | None]:
    """Samples [S, H, W] on [0, 1] -> mean in the input dtype, std in input units."""
    mean_unit = unit.mean(axis=0)
    std = intensity.std_from_unit(mean_unit, unit.std(axis=0)) if len(unit) > 1 else None
    return intensity.from_unit(mean_unit), std


@dataclass(frozen=True)
class StabilizedMap(IntensityMap):
    """``--noise-model poisson-gaussian``: input values go through the generalised Anscombe
    transform of ``noise`` (unit noise std), whose 0.1 and 99.9 percentiles map to 0 and 1;
    the way back is the transform's exact unbiased inverse. ``low`` and ``high`` are in the
    stabilised domain."""

    noise: PoissonGaussian | None = None

    def to_model(self, values: np.ndarray) -> np.ndarray:
        return super().to_model(self.noise.anscombe(values).astype(np.float32))

    def values_from_unit(self, unit: np.ndarray) -> np.ndarray:
        return self.noise.exact_unbiased_inverse(super().values_from_unit(unit))

    def std_from_unit(self, mean_unit: np.ndarray, std_unit: np.ndarray) -> np.ndarray:
        # first order: the std in the stabilised domain times the inverse's local slope
        slope = self.noise.inverse_slope(super().values_from_unit(mean_unit))
        return (super().std_from_unit(mean_unit, std_unit) * slope).astype(np.float32)

    @property
    def sigma0(self) -> float:
        """The noise std on the [-1, 1] scale: the stabilised noise's unit std."""
        return self.sigma0_from_noise_std(1.0)


def stabilized_map_for_source(source: Source, gain: float | None = None, read_noise: float | None = None,
                              offset: float | None = None) -> StabilizedMap:
    """The map of ``--noise-model poisson-gaussian``: the parameters not given are fitted to
    a few planes; the percentiles come from the stabilised sampled planes."""
    from .noise_estimate import ESTIMATE_PLANES

    chosen = np.unique(np.linspace(0, source.planes - 1, max(ESTIMATE_PLANES, SAMPLE_PLANES)).round().astype(int))
    planes = [source.plane(int(z)) for z in chosen]
    check_dtype(planes[0])
    noise = fit_poisson_gaussian(planes[:: max(1, len(planes) // ESTIMATE_PLANES)], planes[0].dtype,
                                 gain, read_noise, offset)
    stack = np.stack(planes)
    base = intensity_map_for(stack)  # refuses constant and non-finite images
    stabilized = noise.anscombe(stack)
    low, high = np.percentile(stabilized[np.isfinite(stabilized)], PERCENTILES)
    if not high > low:
        raise ValueError("the stabilised image is nearly constant: nothing to restore")
    return StabilizedMap(float(low), float(high), base.dtype, "generalised Anscombe, then percentiles 0.1/99.9",
                         noise)


def check_finite(planes: np.ndarray, missing: np.ndarray | None, first_plane: int | None = None) -> None:
    """Refuse NaN or Inf where pixels are observed; ``first_plane``: the stack index of
    ``planes[0]``, so the message names the plane."""
    if planes.dtype.kind != "f":
        return
    bad = ~np.isfinite(planes)
    if missing is not None:
        bad &= ~missing
    if bad.any():
        where = "the image has"
        if first_plane is not None and planes.ndim == 3:
            z = first_plane + int(np.flatnonzero(bad.any(axis=(1, 2)))[0])
            where = f"plane {z} has"
        raise ValueError(
            f"{where} {int(bad.sum())} NaN or Inf pixels; clean them, or restore them "
            "with --task inpaint (NaN pixels count as missing)"
        )

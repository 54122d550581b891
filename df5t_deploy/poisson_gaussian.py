"""Real EM detector noise: Poisson-Gaussian (shot noise plus read noise), and its stabilisation.

The model (Foi et al. 2008), in input units: z = gain * p + n, p ~ Poisson(lambda) detected
counts, n ~ N(offset, read_noise^2). The noise grows with the signal, while DDRM assumes
additive Gaussian noise of one level, so ``--noise-model poisson-gaussian`` runs DDRM in the
domain of the generalised Anscombe transform

    f(z) = 2 / gain * sqrt(gain * z + 3/8 gain^2 + read_noise^2 - gain * offset),

where the noise is nearly Gaussian with unit std, and comes back with the exact unbiased
inverse (Makitalo and Foi 2013): the lambda whose expected transform E[f(z) | lambda] equals
the denoised value. The algebraic inverse (f^-1) is biased where counts are low, because the
mean of a square root is not the square root of the mean.

In counts (c = (z - offset) / gain, s = read_noise / gain) the transform is 2 sqrt(c + 3/8 +
s^2), so the table of E[f | lambda] depends on s alone: an exact Poisson sum of Gaussian
integrals up to ``EXACT_COUNTS``, the second-order expansion above (its error there is below
1e-4 of the unit noise).
"""

from __future__ import annotations

import functools
from dataclasses import asdict, dataclass

import numpy as np

#: Largest expected count whose E[f | lambda] is summed exactly; above, the expansion.
EXACT_COUNTS = 1000.0
#: Blocks of 2 x 2 pixels one intensity bin of the variance line needs.
BLOCKS_PER_BIN = 200
#: Intensity bins of the variance line, at most.
MAX_BINS = 24
#: The fitted slope must exceed its standard error this many times to count as shot noise.
MIN_SLOPE_SIGNIFICANCE = 3.0
#: Standard normal's MAD-to-std factor, 1 / Phi^-1(3/4).
_MAD_TO_STD = 1.482602218505602


class NoiseModelError(ValueError):
    """The Poisson-Gaussian parameters cannot be had from this image or these options."""


@dataclass(frozen=True)
class PoissonGaussian:
    """Detector noise parameters, in input units, and where they came from."""

    gain: float  # input units per detected count
    read_noise: float  # std of the Gaussian part
    offset: float  # black level: the Gaussian part's mean
    rule: str = "given (--gain, --read-noise, --offset)"

    def __post_init__(self):
        if not (np.isfinite(self.gain) and self.gain > 0):
            raise NoiseModelError(f"--gain must be a positive number, got {self.gain}")
        if not (np.isfinite(self.read_noise) and self.read_noise >= 0):
            raise NoiseModelError(f"--read-noise must be >= 0, got {self.read_noise}")
        if not np.isfinite(self.offset):
            raise NoiseModelError(f"--offset must be a finite number, got {self.offset}")

    @property
    def read_noise_counts(self) -> float:
        return self.read_noise / self.gain

    def to_counts(self, values: np.ndarray) -> np.ndarray:
        return (np.asarray(values, dtype=np.float64) - self.offset) / self.gain

    def from_counts(self, counts: np.ndarray) -> np.ndarray:
        return counts * self.gain + self.offset

    def anscombe(self, values: np.ndarray) -> np.ndarray:
        """The generalised Anscombe transform of input values (unit noise std)."""
        s = self.read_noise_counts
        return 2.0 * np.sqrt(np.maximum(self.to_counts(values) + 0.375 + s * s, 0.0))

    def exact_unbiased_inverse(self, stabilized: np.ndarray) -> np.ndarray:
        """Input values whose expected transform is ``stabilized`` (values below the
        transform's expectation at zero signal map to the offset)."""
        expected, root = _expectation_table(round(self.read_noise_counts, 12))
        return self.from_counts(self._counts(np.interp(stabilized, expected, root)))

    def inverse_slope(self, stabilized: np.ndarray) -> np.ndarray:
        """d(input value) / d(stabilized value) of the exact unbiased inverse."""
        expected, root = _expectation_table(round(self.read_noise_counts, 12))
        slopes = np.diff(root) / np.maximum(np.diff(expected), 1e-300)
        index = np.clip(np.searchsorted(expected, stabilized) - 1, 0, len(slopes) - 1)
        return 2.0 * np.interp(stabilized, expected, root) * slopes[index] * self.gain

    def _counts(self, root: np.ndarray) -> np.ndarray:
        s = self.read_noise_counts
        return np.maximum(root * root - 0.375 - s * s, 0.0)

    def sample(self, signal: np.ndarray, normals: np.ndarray) -> np.ndarray:
        """A noisy measurement of ``signal`` (input units, the noise-free mean) from two
        standard normal fields [2, ...]: the first, through its CDF, draws the counts by the
        Poisson quantile function (exact, and as reproducible as the normals), the second
        is the read noise."""
        from scipy.special import ndtr
        from scipy.stats import poisson

        counts = poisson.ppf(ndtr(normals[0].astype(np.float64)), np.maximum(self.to_counts(signal), 0.0))
        return self.from_counts(counts) + self.read_noise * normals[1]

    def to_dict(self) -> dict:
        return asdict(self)


@functools.lru_cache(maxsize=16)
def _expectation_table(read_noise_counts: float) -> tuple[np.ndarray, np.ndarray]:
    """(E[2 sqrt(p + s xi + 3/8 + s^2)], sqrt(lambda + 3/8 + s^2)) on a grid of lambda from 0 to
    1e12 counts, both increasing. The inverse interpolates the root, nearly linear in the
    expectation (about half of it), so a coarse grid of large lambda stays exact."""
    from scipy.stats import poisson

    s = read_noise_counts
    exact = np.unique(np.concatenate([np.linspace(0.0, 30.0, 601), np.geomspace(30.0, EXACT_COUNTS, 400)]))
    k = np.arange(int(EXACT_COUNTS + 12 * np.sqrt(EXACT_COUNTS) + 50))
    # E over the read noise of the transform at each count k: a fine trapezoid in xi, which
    # also handles the kink where the square root's argument reaches 0.
    xi = np.linspace(-9.0, 9.0, 1801)
    weight = np.exp(-0.5 * xi * xi)
    weight /= np.trapezoid(weight, xi)
    per_count = np.trapezoid(2.0 * np.sqrt(np.maximum(k[:, None] + s * xi[None, :] + 0.375 + s * s, 0.0)) * weight,
                             xi, axis=1)
    expected_exact = poisson.pmf(k[None, :], exact[:, None]) @ per_count
    large = np.geomspace(EXACT_COUNTS, 1e12, 600)[1:]
    mean, variance = large + 0.375 + s * s, large + s * s
    # E[2 sqrt(X)] = 2 sqrt(m) - v / (4 m^1.5) + O(m^-2.5): second-order delta method.
    expected_large = 2.0 * np.sqrt(mean) - variance / (4.0 * mean**1.5)
    lambdas = np.concatenate([exact, large])
    expected = np.maximum.accumulate(np.concatenate([expected_exact, expected_large]))
    return expected, np.sqrt(lambdas + 0.375 + s * s)


@dataclass(frozen=True)
class VarianceLine:
    """The noise variance as a line in the signal, var = slope * mean + intercept, fitted from
    2 x 2 blocks: their mean, and their diagonal Haar detail (a - b - c + d) / 2, whose
    variance is the pixels' noise variance and which cancels a linear gradient of the signal.
    Blocks are binned by mean; each bin's variance is robust (MAD), so edges do not inflate it."""

    slope: float
    intercept: float
    slope_error: float

    @classmethod
    def fit(cls, planes: list[np.ndarray], saturated: tuple[float, float] | None, gain: float | None = None
            ) -> VarianceLine:
        means, details = _block_statistics(planes, saturated)
        bins = min(MAX_BINS, len(means) // BLOCKS_PER_BIN)
        if bins < 4:
            raise NoiseModelError(
                f"too few unsaturated 2 x 2 blocks ({len(means)}) to fit the noise's variance line; "
                f"the image needs at least {4 * BLOCKS_PER_BIN}: give --gain and --read-noise")
        edges = np.quantile(means, np.linspace(0.0, 1.0, bins + 1))
        which = np.clip(np.searchsorted(edges, means, side="right") - 1, 0, bins - 1)
        bin_means, bin_vars, counts = [], [], []
        for b in range(bins):
            chosen = which == b
            d = details[chosen]
            bin_means.append(float(means[chosen].mean()))
            bin_vars.append(float((_MAD_TO_STD * np.median(np.abs(d - np.median(d)))) ** 2))
            counts.append(int(chosen.sum()))
        m, v, n = np.array(bin_means), np.array(bin_vars), np.array(counts, dtype=float)
        # A robust variance from n values has a relative spread of about sqrt(2.7 / n).
        w = n / np.maximum(v, 1e-12) ** 2
        if gain is not None:
            intercept = float(np.sum(w * (v - gain * m)) / np.sum(w))
            return cls(gain, intercept, 0.0)
        design = np.stack([m, np.ones_like(m)], axis=1)
        normal = design.T @ (design * w[:, None])
        slope, intercept = np.linalg.solve(normal, design.T @ (w * v))
        residual = v - design @ np.array([slope, intercept])
        scale = float(np.sum(w * residual**2) / max(1, len(m) - 2))
        slope_error = float(np.sqrt(max(scale, 1e-300) * np.linalg.inv(normal)[0, 0]))
        return cls(float(slope), float(intercept), slope_error)


def _block_statistics(planes: list[np.ndarray], saturated: tuple[float, float] | None
                      ) -> tuple[np.ndarray, np.ndarray]:
    means, details = [], []
    for plane in planes:
        p = np.asarray(plane, dtype=np.float64)
        p = p[: p.shape[0] // 2 * 2, : p.shape[1] // 2 * 2]
        a, b, c, d = p[0::2, 0::2], p[0::2, 1::2], p[1::2, 0::2], p[1::2, 1::2]
        block = np.stack([a, b, c, d])
        keep = np.isfinite(block).all(axis=0)
        if saturated is not None:  # a clipped pixel has lost its noise
            keep &= ((block > saturated[0]) & (block < saturated[1])).all(axis=0)
        means.append(block.mean(axis=0)[keep])
        details.append(((a - b - c + d) / 2.0)[keep])
    return np.concatenate(means), np.concatenate(details)


def fit_poisson_gaussian(planes: list[np.ndarray], dtype: np.dtype, gain: float | None = None,
                         read_noise: float | None = None, offset: float | None = None) -> PoissonGaussian:
    """The parameters not given, from the image's variance line var = gain * (mean - offset) +
    read_noise^2. The line fixes gain and read_noise^2 - gain * offset (all the transform
    needs); the split between read noise and offset is the given one, else no offset while
    the intercept is positive, else no read noise and the offset that makes the intercept."""
    given = [f"--{name}" for name, value in (("gain", gain), ("read-noise", read_noise), ("offset", offset))
             if value is not None]
    if len(given) == 3:
        return PoissonGaussian(gain, read_noise, offset)
    saturated = (np.iinfo(dtype).min, np.iinfo(dtype).max) if np.dtype(dtype).kind in "ui" else None
    line = VarianceLine.fit(planes, saturated, gain)
    if gain is None and not line.slope > MIN_SLOPE_SIGNIFICANCE * line.slope_error:
        raise NoiseModelError(
            f"the noise does not grow with the signal (variance slope {line.slope:.3g} +- {line.slope_error:.2g} "
            "per input unit): use --noise-model gaussian (with --sigma0 auto), or give --gain")
    gain = gain if gain is not None else line.slope
    c = line.intercept  # = read_noise^2 - gain * offset
    if read_noise is None and offset is None:
        offset = 0.0 if c >= 0 else -c / gain
        read_noise = float(np.sqrt(max(c, 0.0)))
    elif read_noise is None:
        squared = c + gain * offset
        if squared < 0:
            raise NoiseModelError(
                f"--offset {offset} leaves a negative read-noise variance ({squared:.3g}) on this image's variance "
                "line: give a smaller --offset, or --read-noise")
        read_noise = float(np.sqrt(squared))
    elif offset is None:
        offset = (read_noise**2 - c) / gain
    rule = "fitted to the image's variance line (2 x 2 Haar details, robust variances in intensity bins)"
    if given:
        rule += "; given: " + ", ".join(given)
    return PoissonGaussian(float(gain), float(read_noise), float(offset), rule)

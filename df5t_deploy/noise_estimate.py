"""``--sigma0 auto``: the input's noise level, from scikit-image's wavelet estimator.

``skimage.restoration.estimate_sigma`` is Donoho and Johnstone's robust median estimator on
the finest diagonal wavelet sub-band: sigma = median(|HH|) / 0.6745. It assumes additive,
roughly Gaussian, signal-independent noise, and reads structure finer than the noise as
noise; treat its value as a starting point, not a measurement.
"""

from __future__ import annotations

import numpy as np

from .formats.base import Source

#: Planes of a stack the estimate is the median over.
ESTIMATE_PLANES = 4
RULE = "auto: skimage.restoration.estimate_sigma (wavelet median absolute deviation)"


def estimate_noise_std(source: Source) -> float:
    """Noise std in input units, the median of the per-plane estimates of a few planes."""
    from skimage.restoration import estimate_sigma

    chosen = np.unique(np.linspace(0, source.planes - 1, ESTIMATE_PLANES).round().astype(int))
    estimates = []
    for z in chosen:
        plane = source.plane(int(z)).astype(np.float64)
        finite = np.isfinite(plane)
        if not finite.all():
            plane = np.where(finite, plane, np.median(plane[finite]))
        estimates.append(float(estimate_sigma(plane)))
    std = float(np.median(estimates))
    if not std > 0:
        raise ValueError("the noise estimate is 0 (a noise-free or constant image); pass --sigma0 explicitly")
    return std

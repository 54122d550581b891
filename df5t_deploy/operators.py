"""Degradation operators in SVD form (REFERENCE.md section 5).

Every operator measures ONE grey image: H = (spatial operator) o (channel mean). This module
holds the spatial operators; ``degradation.Degradation`` adds the channel part. A spatial
operator acts on the last two axes of an array [..., H, W] and keeps its spectral coordinates
in an array of the same shape, so that

    H g  = U(S * V^T(g))          (``forward`` computes the same thing directly)
    H^+ y = V(S^+ * U^T(y))

where ``singular_values`` S is 0 at unobserved coordinates. Measurements live in "measurement
space" (``measurement_shape``); ``ut`` brings them into the spectral layout.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field

import numpy as np
import scipy.fft
import scipy.ndimage

#: Blur eigenvalues below this count as zero (unobserved), REFERENCE.md section 5.
BLUR_ZERO_THRESHOLD = 1e-3
#: Kernel half-width in standard deviations, as scipy.ndimage.gaussian_filter's default.
BLUR_TRUNCATE = 4.0


class SpatialOperator(ABC):
    """A linear degradation of a grey image [..., H, W] given by its SVD.

    Subclasses set ``shape`` (the restoration grid) and ``_s`` (the singular values).
    """

    shape: tuple[int, int]
    _s: np.ndarray

    @property
    def measurement_shape(self) -> tuple[int, int]:
        """The measurement grid; the restoration grid unless the operator subsamples."""
        return self.shape

    @property
    def singular_values(self) -> np.ndarray:
        """[H, W] in the spectral layout, 0 where unobserved."""
        return self._s

    @abstractmethod
    def vt(self, g: np.ndarray) -> np.ndarray: ...

    @abstractmethod
    def v(self, c: np.ndarray) -> np.ndarray: ...

    @abstractmethod
    def ut(self, y: np.ndarray) -> np.ndarray: ...

    @abstractmethod
    def u(self, c: np.ndarray) -> np.ndarray: ...

    @abstractmethod
    def forward(self, g: np.ndarray) -> np.ndarray:
        """H g computed directly, without the SVD."""

    def observed(self) -> np.ndarray:
        return self.singular_values > 0

    def pinv(self, y: np.ndarray) -> np.ndarray:
        """H^+ y: the least-norm image that explains the measurement."""
        s = self.singular_values
        inverse = np.divide(1.0, s, out=np.zeros_like(s), where=s > 0)
        return self.v(self.ut(y) * inverse)


@dataclass
class Identity(SpatialOperator):
    """Denoising: H = I, every singular value 1."""

    shape: tuple[int, int]

    def __post_init__(self):
        self._s = np.ones(self.shape, dtype=np.float32)

    def vt(self, g):
        return g

    v = ut = u = forward = vt


@dataclass
class Inpainting(SpatialOperator):
    """Keeps the observed pixels; V is the permutation that lists them first.

    The spectral layout is the pixel grid itself, with S = 1 at observed pixels and 0 at
    missing ones, which is that permutation without moving anything. Measurements are
    full-size images whose missing pixels are ignored (set to 0).
    """

    missing: np.ndarray  # bool [H, W], True where the pixel is missing
    shape: tuple[int, int] = field(init=False)

    def __post_init__(self):
        self.missing = np.asarray(self.missing, dtype=bool)
        if self.missing.ndim != 2:
            raise ValueError(f"mask must be 2D, got shape {self.missing.shape}")
        self.shape = self.missing.shape
        self._s = (~self.missing).astype(np.float32)

    def vt(self, g):
        return g

    v = vt

    def ut(self, y):
        return y * self._s

    u = forward = ut


@dataclass
class BlockMean(SpatialOperator):
    """Mean over by x bx blocks, subsampled: super-resolution (R x R) and the along-z operator (k x 1).

    Within each block V is the orthonormal 2D DCT-II, whose first basis vector is the
    normalised block mean: one singular value 1/sqrt(by*bx) per block at the block's first
    position, U = identity.
    """

    shape: tuple[int, int]
    block: tuple[int, int]

    def __post_init__(self):
        (h, w), (by, bx) = self.shape, self.block
        if by < 1 or bx < 1 or h % by or w % bx:
            raise ValueError(f"image {h}x{w} is not a whole number of {by}x{bx} blocks")
        s = np.zeros(self.shape, dtype=np.float32)
        s[::by, ::bx] = 1.0 / np.sqrt(by * bx)
        self._s = s

    @property
    def measurement_shape(self) -> tuple[int, int]:
        return self.shape[0] // self.block[0], self.shape[1] // self.block[1]

    def _blocks(self, a: np.ndarray) -> np.ndarray:
        (h, w), (by, bx) = self.shape, self.block
        return a.reshape(*a.shape[:-2], h // by, by, w // bx, bx)

    def vt(self, g):
        c = scipy.fft.dctn(self._blocks(g), type=2, norm="ortho", axes=(-3, -1))
        return c.reshape(g.shape).astype(np.float32, copy=False)

    def v(self, c):
        g = scipy.fft.idctn(self._blocks(c), type=2, norm="ortho", axes=(-3, -1))
        return g.reshape(c.shape).astype(np.float32, copy=False)

    def ut(self, y):
        out = np.zeros(y.shape[:-2] + self.shape, dtype=np.float32)
        out[..., :: self.block[0], :: self.block[1]] = y
        return out

    def u(self, c):
        return c[..., :: self.block[0], :: self.block[1]]

    def forward(self, g):
        return self._blocks(g).mean(axis=(-3, -1), dtype=np.float64).astype(np.float32)


@dataclass
class GaussianBlur(SpatialOperator):
    """Gaussian PSF with half-sample symmetric boundaries, diagonalised by the 2D DCT-II.

    The kernel is scipy.ndimage's (truncated at 4 sigma, normalised). With symmetric
    boundaries the blur is exactly DCT-II(kernel eigenvalues), so V = DCT basis and
    U = DCT basis with the signs of the eigenvalues; |eigenvalue| < 1e-3 counts as zero.
    """

    shape: tuple[int, int]
    sigma: tuple[float, float]  # (sigma_y, sigma_x) in pixels
    zero_threshold: float = BLUR_ZERO_THRESHOLD

    def __post_init__(self):
        if min(self.sigma) <= 0:
            raise ValueError(f"blur sigma must be positive, got {self.sigma}")
        ey = _symmetric_blur_eigenvalues(self.shape[0], self.sigma[0])
        ex = _symmetric_blur_eigenvalues(self.shape[1], self.sigma[1])
        eig = np.outer(ey, ex)
        self._sign = np.where(eig < 0, -1.0, 1.0).astype(np.float32)
        self._s = np.where(np.abs(eig) < self.zero_threshold, 0.0, np.abs(eig)).astype(np.float32)

    def vt(self, g):
        return scipy.fft.dctn(g, type=2, norm="ortho", axes=(-2, -1)).astype(np.float32, copy=False)

    def v(self, c):
        return scipy.fft.idctn(c, type=2, norm="ortho", axes=(-2, -1)).astype(np.float32, copy=False)

    def ut(self, y):
        return self.vt(y) * self._sign

    def u(self, c):
        return self.v(c * self._sign)

    def forward(self, g):
        sy, sx = self.sigma
        sigma = (0,) * (g.ndim - 2) + (sy, sx)
        return scipy.ndimage.gaussian_filter(g, sigma, mode="reflect", truncate=BLUR_TRUNCATE).astype(np.float32)


def gaussian_kernel(sigma: float) -> np.ndarray:
    """scipy.ndimage's 1D Gaussian: radius int(4 sigma + 0.5), normalised."""
    radius = int(BLUR_TRUNCATE * sigma + 0.5)
    x = np.arange(-radius, radius + 1, dtype=np.float64)
    k = np.exp(-0.5 * (x / sigma) ** 2)
    return k / k.sum()


def _symmetric_blur_eigenvalues(n: int, sigma: float) -> np.ndarray:
    """Eigenvalues of the symmetric-boundary blur on n samples, one per DCT-II frequency.

    The half-sample symmetric extension has period 2n; the DCT-II basis functions
    cos(pi k (j + 1/2) / n) are eigenvectors of any symmetric kernel h on it, with
    eigenvalue sum_j h_j cos(pi k j / n), whatever the kernel's length.
    """
    kernel = gaussian_kernel(sigma)
    radius = len(kernel) // 2
    offsets = np.arange(-radius, radius + 1)
    k = np.arange(n)[:, None]
    return (kernel[None, :] * np.cos(np.pi * k * offsets[None, :] / n)).sum(axis=1)

"""Counter-based Gaussian noise: Philox4x32-10 plus Box-Muller (DESIGN.md, "Noise").

Every normal the sampler draws is a pure function of (seed, step, draw, orientation, plane,
global y, global x), so a restoration does not depend on how the image is cut into regions,
tiles or batches, nor on the backend: the CUDA kernels use the same generator.

Counter layout (four 32-bit words): c0 = global x, c1 = global y, c2 = plane,
c3 = step | draw << 16 | orientation << 24. The key is the 64-bit seed (low word, high word).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

PHILOX_M0 = np.uint64(0xD2511F53)
PHILOX_M1 = np.uint64(0xCD9E8D57)
PHILOX_W0 = np.uint32(0x9E3779B9)
PHILOX_W1 = np.uint32(0xBB67AE85)
ROUNDS = 10
_MASK32 = np.uint64(0xFFFFFFFF)
_TWO_POW_M32 = 2.0**-32

#: The ``step`` field is 16 bits; the measurement noise of ``df5t degrade`` uses the last value.
MAX_STEP = 0xFFFF
MEASUREMENT_STEP = 0xFFFF
MAX_DRAW = 0xFF
MAX_ORIENTATION = 0xFF


def philox4x32(counter: np.ndarray, key: tuple[int, int]) -> np.ndarray:
    """Philox4x32-10 of ``counter`` [..., 4] (uint32) under ``key`` (k0, k1); returns [..., 4]."""
    c = [counter[..., i].astype(np.uint64) for i in range(4)]
    k0, k1 = np.uint32(key[0]), np.uint32(key[1])
    for round_index in range(ROUNDS):
        if round_index:
            k0, k1 = _bump(k0, PHILOX_W0), _bump(k1, PHILOX_W1)
        p0 = PHILOX_M0 * c[0]
        p1 = PHILOX_M1 * c[2]
        c = [
            (p1 >> np.uint64(32)) ^ c[1] ^ np.uint64(k0),
            p1 & _MASK32,
            (p0 >> np.uint64(32)) ^ c[3] ^ np.uint64(k1),
            p0 & _MASK32,
        ]
    return np.stack([w.astype(np.uint32) for w in c], axis=-1)


def _bump(k: np.uint32, w: np.uint32) -> np.uint32:
    return np.uint32((int(k) + int(w)) & 0xFFFFFFFF)


def seed_key(seed: int) -> tuple[int, int]:
    if not 0 <= seed < 2**64:
        raise ValueError(f"seed must be in [0, 2**64), got {seed}")
    return seed & 0xFFFFFFFF, seed >> 32


def uniforms_to_normals(words: np.ndarray) -> np.ndarray:
    """Box-Muller on the four 32-bit outputs [..., 4] -> three float32 normals [..., 3].

    u1 = (w0 + 0.5) / 2^32 lies in (0, 1), so the logarithm is finite; computed in float64
    and rounded once, which the CUDA twin matches to about 1e-7.
    """
    w = words.astype(np.float64)
    radius01 = np.sqrt(-2.0 * np.log((w[..., 0] + 0.5) * _TWO_POW_M32))
    angle01 = 2.0 * np.pi * (w[..., 1] * _TWO_POW_M32)
    radius23 = np.sqrt(-2.0 * np.log((w[..., 2] + 0.5) * _TWO_POW_M32))
    angle23 = 2.0 * np.pi * (w[..., 3] * _TWO_POW_M32)
    normals = np.stack(
        [radius01 * np.cos(angle01), radius01 * np.sin(angle01), radius23 * np.cos(angle23)], axis=-1
    )
    return normals.astype(np.float32)


def gaussian_field(
    seed: int,
    *,
    step: int,
    draw: int = 0,
    orientation: int = 0,
    plane: int = 0,
    y0: int,
    x0: int,
    height: int,
    width: int,
) -> np.ndarray:
    """Normals [3, height, width] for the pixels at global rows y0.. and columns x0.. ."""
    if not (0 <= step <= MAX_STEP and 0 <= draw <= MAX_DRAW and 0 <= orientation <= MAX_ORIENTATION):
        raise ValueError(f"noise counter out of range: step={step} draw={draw} orientation={orientation}")
    ys = np.arange(y0, y0 + height, dtype=np.uint32)
    xs = np.arange(x0, x0 + width, dtype=np.uint32)
    counter = np.empty((height, width, 4), dtype=np.uint32)
    counter[..., 0] = xs[None, :]
    counter[..., 1] = ys[:, None]
    counter[..., 2] = np.uint32(plane)
    counter[..., 3] = np.uint32(step | draw << 16 | orientation << 24)
    normals = uniforms_to_normals(philox4x32(counter, seed_key(seed)))
    return np.moveaxis(normals, -1, 0)


#: Which planes of a volume a walk restores (the counter's orientation field).
ORIENTATION_XY, ORIENTATION_XZ, ORIENTATION_YZ = 0, 1, 2


@dataclass(frozen=True)
class NoiseKey:
    """Where a group's noise comes from in the counter space (DESIGN.md, Noise).

    ``seed`` is every plane's seed, or each plane's own: frames submitted with their own seeds
    walk together as planes of one group (``Restorer.submit``), each drawing the noise it
    would draw alone."""

    seed: int | Sequence[int]
    orientation: int  # ORIENTATION_XY, _XZ or _YZ
    plane_ids: Sequence[int]
    y0: int = 0  # global position of the region's first row and column in its plane
    x0: int = 0

    def entries(self) -> list[tuple[int, int]]:
        """(seed, plane) of each plane of the group, in order."""
        planes = [int(plane) for plane in self.plane_ids]
        if np.ndim(self.seed) == 0:
            return [(int(self.seed), plane) for plane in planes]
        seeds = [int(seed) for seed in self.seed]
        if len(seeds) != len(planes):
            raise ValueError(f"a noise key with {len(seeds)} seeds for {len(planes)} planes")
        return list(zip(seeds, planes))


def group_noise(key: NoiseKey, samples: int, shape: tuple[int, int], step: int) -> np.ndarray:
    """Pixel normals [G * samples, 3, H, W] of a group at a noise step (plane-major)."""
    return np.stack([
        gaussian_field(seed, step=step, draw=sample, orientation=key.orientation, plane=plane,
                       y0=key.y0, x0=key.x0, height=shape[0], width=shape[1])
        for seed, plane in key.entries() for sample in range(samples)
    ])

"""The data of the bundled model: which real EM files it trains on, and what is held out.

Only files whose terms allow shipping a model trained on them are used for training
(``../shared/data/em/README.md``): the CC-BY FlyEM FIB-SEM volume and the CC0 mussel tiles.
Held out, never seen in training: FlyEM planes z >= 176 (a gap of 16 planes after the
training planes z < 160) and mussel tile 3 whole. Everything else is for evaluation only.
No torch here: the quality benchmark imports the same split.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tifffile

FLYEM_VOLUME = "fibsem_isotropic_flyem-medulla_256x256x256.tif"
MUSSEL_TRAIN = "micrograph_vemstitch-mussel_tile1_2_2_1768x2048.tif"
MUSSEL_HELDOUT = "micrograph_vemstitch-mussel_tile3_2_2_1768x2048.tif"
FLYEM_TRAIN_PLANES = slice(0, 160)
FLYEM_HELDOUT_PLANES = slice(176, None)


def to_model_scale(image: np.ndarray) -> np.ndarray:
    """uint8 grey levels to the network's [-1,1] scale (the runtime's map for uint8: v/255)."""
    return (image.astype(np.float32) / 255.0) * 2.0 - 1.0


def load_training_sources(data_dir: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """The FlyEM training sub-volume (ZYX) and the training mussel tile, on the model scale."""
    data_dir = Path(data_dir)
    volume = tifffile.imread(data_dir / FLYEM_VOLUME)[FLYEM_TRAIN_PLANES]
    tile = tifffile.imread(data_dir / MUSSEL_TRAIN)
    return to_model_scale(volume), to_model_scale(tile)


@dataclass
class CropSampler:
    """Random square crops, augmented so that the prior covers what EM users acquire.

    Half the crops come from the FlyEM sub-volume, from XY, XZ or YZ planes alike (the volume
    is isotropic, and the 3D isotropic task restores XZ and YZ planes), half from the mussel
    tile, so both modalities weigh equally whatever their pixel counts. Each crop is taken at
    a random scale (a ``scale * crop`` square averaged over scale x scale blocks: the same
    structures at other pixel sizes, and less noise), turned by flips and 90-degree rotations,
    and its contrast and brightness jittered (detectors and staining differ between runs).
    """

    volume: np.ndarray
    image: np.ndarray
    crop: int
    max_scale: int = 1
    contrast_jitter: float = 0.0
    brightness_jitter: float = 0.0

    def batch(self, rng: np.random.Generator, size: int) -> np.ndarray:
        """[size, 1, crop, crop] float32 crops on the [-1,1] scale."""
        return np.stack([self._one(rng)[None] for _ in range(size)])

    def _one(self, rng: np.random.Generator) -> np.ndarray:
        plane = self._volume_plane(rng) if rng.random() < 0.5 else self.image
        scale = int(rng.integers(1, self.max_scale + 1))
        side = self.crop * scale
        if side > min(plane.shape):
            scale, side = 1, self.crop
        y = rng.integers(0, plane.shape[0] - side + 1)
        x = rng.integers(0, plane.shape[1] - side + 1)
        crop = plane[y : y + side, x : x + side].reshape(self.crop, scale, self.crop, scale).mean(axis=(1, 3))
        crop = np.rot90(crop, k=int(rng.integers(4)))
        if rng.random() < 0.5:
            crop = crop[:, ::-1]
        return np.ascontiguousarray(self._jitter(crop, rng), dtype=np.float32)

    def _jitter(self, crop: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """Contrast about the crop's mean and brightness, kept inside [-1, 1]."""
        if not (self.contrast_jitter or self.brightness_jitter):
            return crop
        contrast = 1.0 + rng.uniform(-self.contrast_jitter, self.contrast_jitter)
        brightness = rng.uniform(-self.brightness_jitter, self.brightness_jitter)
        mean = crop.mean()
        return np.clip((crop - mean) * contrast + mean + brightness, -1.0, 1.0)

    def _volume_plane(self, rng: np.random.Generator) -> np.ndarray:
        axis = int(rng.integers(3))
        index = int(rng.integers(self.volume.shape[axis]))
        return np.take(self.volume, index, axis=axis)

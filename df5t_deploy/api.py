"""``Restorer``: the object a program embeds to restore EM images with DF5T."""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from . import __version__
from .backends import Backend, open_backend
from .files import sha256_of
from .intensity import IntensityMap, check_dtype, intensity_map_for
from .models import default_model_path
from .noise import gaussian_field
from .sampler import DDRM, SamplerSettings, run_ddrm, state_to_image
from .tasks import TaskOptions, missing_pixels, parse_blur_sigma
from .tiling import BlendedDenoiser


class RestorationCancelled(RuntimeError):
    """The progress callback asked to stop; nothing was returned or written."""


@dataclass(frozen=True)
class Progress:
    tiles_done: int
    tiles_total: int
    step: int  # sampler steps finished in the current plane
    steps: int
    plane: int
    planes: int


ProgressCallback = Callable[[Progress], "bool | None"]  # return False to cancel


@dataclass
class Restoration:
    """A restored image in the input's dtype, with what is needed to reproduce it."""

    image: np.ndarray
    intensity: IntensityMap
    sigma0: float
    provenance: dict = field(default_factory=dict)
    std: np.ndarray | None = None  # per-pixel std over samples, in input units (samples > 1)


class Restorer:
    """Restores YX images (and stacks of them, ZYX) with DDRM and a DF5T model.

    One instance may be shared by threads: calls are serialised and reuse the backend.
    """

    def __init__(
        self,
        model: str | Path | None = None,
        task: str = "denoise",
        *,
        sigma0: float | None = None,
        noise_std: float | None = None,
        steps: int = 50,
        eta: float = 0.85,
        eta_b: float = 1.0,
        seed: int = 0,
        scale: int | None = None,
        blur_sigma: float | str | tuple[float, float] | None = None,
        mask: np.ndarray | str | None = None,
        min_hole: int = 200,
        z_factor: int | None = None,
        overlap: int | None = None,
        batch: int | None = None,
        samples: int = 1,
        backend: str = "auto",
        device: str = "cpu",
        threads: int | None = None,
    ):
        self.options = TaskOptions(
            task, scale=scale, blur_sigma=parse_blur_sigma(blur_sigma), mask=mask,
            min_hole=min_hole, z_factor=z_factor,
        )
        if (sigma0 is None) == (noise_std is None):
            raise ValueError("give exactly one of sigma0 (on the [-1,1] scale) or noise_std (in input units)")
        if noise_std is not None and not noise_std > 0:
            raise ValueError(f"noise_std must be > 0, got {noise_std}")
        if sigma0 is not None:
            SamplerSettings(sigma0=sigma0, steps=steps, eta=eta, eta_b=eta_b)  # validate early
        if samples < 1:
            raise ValueError(f"samples must be >= 1, got {samples}")
        self.sigma0, self.noise_std = sigma0, noise_std
        self.steps, self.eta, self.eta_b, self.seed, self.samples = steps, eta, eta_b, seed, samples
        self.model_path = Path(model) if model is not None else default_model_path()
        self.backend: Backend = open_backend(backend, self.model_path, device=device, threads=threads)
        self.model_sha256 = sha256_of(self.model_path)
        tile = self.backend.info.tile
        self.overlap = tile // 8 if overlap is None else overlap
        self.batch = batch or self.backend.preferred_batch
        self.denoiser = BlendedDenoiser(self.backend, tile, self.overlap, self.batch)
        self._lock = threading.Lock()

    def restore(self, image: np.ndarray, progress: ProgressCallback | None = None) -> np.ndarray:
        """The restored YX image or ZYX stack (same dtype; sr grows YX by the scale)."""
        return self.restore_full(image, progress).image

    def restore_full(self, image: np.ndarray, progress: ProgressCallback | None = None) -> Restoration:
        """Like ``restore``, with the intensity map, sigma0, provenance and sample std.

        A ZYX stack gets the 2D task on every plane, with one intensity map for the stack.
        """
        image = np.asarray(image)
        check_dtype(image)
        if image.ndim not in (2, 3) or min(image.shape) < 1:
            raise ValueError(f"expected a YX image or a ZYX stack, got an array of shape {image.shape}")
        if self.options.task == "isotropic":
            raise ValueError("--task isotropic needs the volume restorer (not available yet)")
        if self.options.task != "inpaint":  # for inpainting, NaN pixels are the missing ones
            _check_finite(image, None)
        planes = image if image.ndim == 3 else image[None]
        with self._lock:
            intensity = intensity_map_for(image)
            settings = self._settings(intensity)
            results = [
                self._restore_plane(plane, index, len(planes), intensity, settings, progress)
                for index, plane in enumerate(planes)
            ]
        mean = np.stack([intensity.from_unit(unit.mean(axis=0)) for unit in results])
        std = None
        if self.samples > 1:
            std = np.stack([unit.std(axis=0) for unit in results]) * np.float32(intensity.high - intensity.low)
        if image.ndim == 2:
            mean, std = mean[0], None if std is None else std[0]
        provenance = self.provenance(intensity, settings.sigma0)
        return Restoration(mean, intensity, settings.sigma0, provenance, std)

    def _settings(self, intensity: IntensityMap) -> SamplerSettings:
        sigma0 = self.sigma0 if self.sigma0 is not None else intensity.sigma0_from_noise_std(self.noise_std)
        return SamplerSettings(sigma0=sigma0, steps=self.steps, eta=self.eta, eta_b=self.eta_b)

    def _restore_plane(self, plane, index, planes, intensity, settings, progress) -> np.ndarray:
        """All samples of one plane on the [0, 1] scale, [samples, H, W]."""
        missing = missing_pixels(self.options, plane) if self.options.task == "inpaint" else None
        _check_finite(plane, missing)
        y = intensity.to_model(np.where(missing, 0, plane) if missing is not None else plane)
        grid = self.options.grid_shape(plane.shape)
        ddrm = DDRM(self.options.operator(grid, missing), self.backend.info.schedule, settings)
        y = np.broadcast_to(y, (self.samples, *y.shape))

        def noise(step: int) -> np.ndarray:
            return np.stack([
                gaussian_field(self.seed, step=step, draw=sample, plane=index, y0=0, x0=0, height=grid[0], width=grid[1])
                for sample in range(self.samples)
            ])

        per_step = self.denoiser.tiles_per_call(self.samples, *grid)
        total = per_step * len(ddrm.timesteps)

        def on_step(plan) -> None:
            if progress is not None:
                event = Progress((plan.index + 1) * per_step, total, plan.index + 1, len(ddrm.timesteps), index, planes)
                if progress(event) is False:
                    raise RestorationCancelled("restoration cancelled by the progress callback")

        return state_to_image(run_ddrm(ddrm, y, self.denoiser, noise, on_step))

    def provenance(self, intensity: IntensityMap, sigma0: float) -> dict:
        return {
            "software": f"df5t-deploy {__version__}",
            "model": str(self.model_path),
            "model_sha256": self.model_sha256,
            "model_info": self.backend.info.to_dict(),
            "backend": self.backend.name,
            **self.options.to_dict(),
            "sigma0": sigma0,
            "noise_std": self.noise_std,
            "steps": self.steps,
            "eta": self.eta,
            "eta_b": self.eta_b,
            "seed": self.seed,
            "samples": self.samples,
            "tile": self.backend.info.tile,
            "overlap": self.overlap,
            "intensity_map": intensity.to_dict(),
        }


def _check_finite(plane: np.ndarray, missing: np.ndarray | None) -> None:
    if plane.dtype.kind != "f":
        return
    bad = ~np.isfinite(plane)
    if missing is not None:
        bad &= ~missing
    if bad.any():
        raise ValueError(
            f"the image has {int(bad.sum())} NaN or Inf pixels; clean them, or restore them "
            "with --task inpaint (NaN pixels count as missing)"
        )


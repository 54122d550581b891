"""``Restorer``: the object a program embeds to restore EM images with DF5T."""

from __future__ import annotations

import copy
import dataclasses
import threading
from collections.abc import Callable
from concurrent.futures import Future
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .backends import AUTO_DEVICE, Backend, open_backend
from .files import sha256_of
from .formats.base import Source
from .frames import DEFAULT_MAX_PENDING, FrameQueue, QueueFull
from .group_walker import GroupWalker
from .intensity import (
    IntensityMap,
    StabilizedMap,
    check_dtype,
    intensity_map_for_source,
    mean_and_std,
    stabilized_map_for_source,
)
from .models import default_model_path
from .parameters import whole_number
from .progress import ProgressCallback, RestorationCancelled, shared_progress
from .regions import layout
from .sampler import SamplerSettings, Timesteps, walk_timesteps
from .settings import RestoreSettings, setting_fields
from .stack import plane_regions, restore_frames, restore_planes
from .streaming import ArraySource
from .tasks import TaskOptions
from .tiling import BlendedDenoiser, NetworkOutputError
from .version import __version__
from .volume import restore_isotropic, z_factor_of
from .work import TaskStore

#: An overlap that makes the network run this many times as often as without is warned about.
OVERLAP_WARNING_FACTOR = 2.0

#: Called with (output plane index, samples [S, H, W] on the [0, 1] scale), in plane order.
Emit = Callable[[int, np.ndarray], None]

#: Settings a single call (``restore``, ``submit``) may give in place of the Restorer's.
PER_CALL_SETTINGS = ("seed", "sigma0", "noise_std", "samples")

__all__ = ["AUTO_DEVICE", "NoiseLevel", "PER_CALL_SETTINGS", "QueueFull", "Restoration", "RestorationCancelled", "Restorer"]


@dataclass
class Restoration:
    """A restored image in the input's dtype, with what is needed to reproduce it."""

    image: np.ndarray
    intensity: IntensityMap
    sigma0: float
    provenance: dict = field(default_factory=dict)
    std: np.ndarray | None = None  # per-pixel std over samples, in input units (samples > 1)
    estimated_noise_std: float | None = None  # sigma0 "auto": the estimate, in input units


@dataclass(frozen=True)
class NoiseLevel:
    """The measurement noise of one call: sigma0 on the [-1,1] scale and, for sigma0 "auto",
    the estimate it came from (per call, so threads sharing a Restorer never see each
    other's)."""

    sigma0: float
    estimated_noise_std: float | None = None


@dataclass(frozen=True)
class _PreparedFrame:
    restorer: Restorer  # with the call's settings
    source: ArraySource
    intensity: IntensityMap
    noise: NoiseLevel
    progress: ProgressCallback | None


class Restorer:
    """Restores YX images and ZYX stacks with DDRM and a DF5T model.

    2D tasks restore every plane of a stack; ``isotropic`` restores an anisotropic volume on
    the isotropic grid. ``backend`` is a name (``open_backend`` chooses) or an open backend
    for ``model``. One instance may be shared by threads: calls are serialised and reuse the
    backend.
    """

    def __init__(
        self,
        model: str | Path | None = None,
        task: str = "denoise",
        *,
        mask: np.ndarray | str | None = None,
        backend: str | Backend = "auto",
        device: str = AUTO_DEVICE,
        threads: int | None = None,
        report: Callable[[str], None] | None = None,
        gpu_memory_gb: float | None = None,
        strict_gpu: bool = False,
        max_pending: int = DEFAULT_MAX_PENDING,
        **settings,
    ):
        """``settings``: any of ``RestoreSettings`` (sigma0 or noise_std, or noise_model
        "poisson-gaussian" with gain, read_noise and offset; steps, eta, eta_b, final_step, seed, scale,
        blur_sigma, min_hole, z_factor, overlap, batch, max_region, samples);
        ``mask``: inpainting's mask array (True or nonzero = missing) or "auto";
        ``max_pending``: frames ``submit`` holds before it blocks."""
        unknown = sorted(set(settings) - {f.name for f in setting_fields()})
        if unknown:
            raise TypeError(f"Restorer got unknown settings {unknown}; the settings are those of RestoreSettings: "
                            f"{', '.join(f.name for f in setting_fields())}")
        s = RestoreSettings(task=task, **settings)
        self._adopt(s)
        self.options = TaskOptions(task, scale=s.scale, blur_sigma=s.blur_sigma, mask=mask, min_hole=s.min_hole,
                                   z_factor=s.z_factor)
        if threads is not None:
            whole_number("threads", threads, 1)
        whole_number("max_pending", max_pending, 1)
        self.max_pending = max_pending
        self._frames: FrameQueue | None = None
        self._frames_lock = threading.Lock()  # not the restoring lock: submit must not wait for a restore
        self.model_path = Path(model) if model is not None else default_model_path()
        if gpu_memory_gb is not None:
            cap_gpu_memory(device, gpu_memory_gb)
        if isinstance(backend, str):
            backend = open_backend(backend, self.model_path, device=device, threads=threads, report=report)
        self.backend: Backend = backend
        self.model_sha256 = sha256_of(self.model_path)
        tile = self.backend.info.tile
        self.overlap = tile // 8 if s.overlap is None else s.overlap
        self.batch = s.batch or self.backend.preferred_batch
        self.denoiser = BlendedDenoiser(self.backend, tile, self.overlap, self.batch)
        work = (tile / max(1, tile - self.overlap)) ** 2
        if work > OVERLAP_WARNING_FACTOR and report is not None:
            report(f"warning: overlap {self.overlap} of tile {tile} runs the network about {work:.1f}x as often "
                   f"as without overlap (default overlap: {tile // 8})")
        self.max_region = s.max_region
        layout((s.max_region, s.max_region), 1, tile, s.max_region)  # validates max_region early
        self._lock = threading.Lock()
        self.walker = GroupWalker(self.backend, self.denoiser, self.samples, strict_gpu)

    @property
    def schedule(self):
        return self.backend.info.schedule

    def _adopt(self, s: RestoreSettings) -> None:
        self.settings = s
        self.sigma0, self.noise_std = s.sigma0, s.noise_std
        self.steps, self.eta, self.eta_b, self.seed, self.samples = s.steps, s.eta, s.eta_b, s.seed, s.samples

    def close(self, cancel_pending: bool = False) -> None:
        """Finish the submitted frames (or cancel those not started, with ``cancel_pending``),
        then release the backend (model, engine, device buffers). ``with Restorer(...)``
        does it, cancelling if the block ends by an exception."""
        if self._frames is not None:
            self._frames.close(cancel_pending)
        with self._lock:
            self.walker.release()
            self.backend.close()

    def __enter__(self) -> Restorer:
        return self

    def __exit__(self, exc_type, *exc) -> None:
        self.close(cancel_pending=exc_type is not None)

    # ------------------------------------------------------------------ arrays

    def restore(self, image: np.ndarray, progress: ProgressCallback | None = None, **options) -> np.ndarray:
        """The restored YX image or ZYX stack (same dtype; sr grows YX, isotropic grows Z).
        ``options``: per-call settings (``PER_CALL_SETTINGS``: seed, sigma0 or noise_std,
        samples) in place of the Restorer's."""
        return self.restore_full(image, progress, **options).image

    def restore_full(self, image: np.ndarray, progress: ProgressCallback | None = None, **options) -> Restoration:
        """Like ``restore``, with the intensity map, sigma0, provenance and sample std."""
        return self._restore_prepared(self._prepare(image, {**options, "progress": progress}))

    def submit(self, image: np.ndarray, *, block: bool = True, timeout: float | None = None,
               progress: ProgressCallback | None = None, **options) -> Future:
        """Queue ``image`` for restoration; the future's result is its ``Restoration``, the same
        as ``restore_full(image, **options)`` gives. Frames finish in submission order; the
        next is prepared while one is restored. With ``max_pending`` frames queued this
        blocks (up to ``timeout`` seconds), or raises ``QueueFull`` if ``block`` is False.
        ``cancel()`` works for a frame not yet started; errors arrive through the future."""
        self._call(options)  # a wrong option is the caller's error, raised here
        with self._frames_lock:
            if self._frames is None:
                self._frames = FrameQueue(self._prepare, self._restore_together, self._joins, self.max_pending)
        return self._frames.submit(image, {**options, "progress": progress}, block, timeout)

    def _call(self, options: dict) -> Restorer:
        """This Restorer with the per-call settings ``options`` in place of its own, sharing its
        backend, lock and device buffers."""
        unknown = sorted(set(options) - set(PER_CALL_SETTINGS))
        if unknown:
            raise TypeError(f"per-call options are {', '.join(PER_CALL_SETTINGS)}; got {unknown}")
        if not options:
            return self
        changes = dict(options)
        if "sigma0" in changes or "noise_std" in changes:  # one replaces the other
            changes = {"sigma0": None, "noise_std": None, **changes}
        call = copy.copy(self)
        call._adopt(dataclasses.replace(self.settings, **changes))
        if call.samples != self.samples:
            call.walker = GroupWalker(self.backend, self.denoiser, call.samples, self.walker.strict_gpu)
        return call

    def _prepare(self, image: np.ndarray, options: dict) -> _PreparedFrame:
        """What restoring one array needs, worked out before the walk: checks, the intensity
        map and the noise level."""
        options = dict(options)
        progress = options.pop("progress", None)
        restorer = self._call(options)
        if not isinstance(image, (np.ndarray, list, tuple)):
            raise TypeError(f"image must be a numpy array (YX or ZYX), got {type(image).__name__}")
        image = np.asarray(image)
        try:
            check_dtype(image)
            source = ArraySource(image)
        except ValueError as err:
            raise ValueError(f"image: {err}") from None
        intensity = restorer.intensity_for(source)
        return _PreparedFrame(restorer, source, intensity, restorer.noise_level(source, intensity), progress)

    @staticmethod
    def _restore_prepared(frame: _PreparedFrame) -> Restoration:
        restorer, source, intensity, noise = frame.restorer, frame.source, frame.intensity, frame.noise
        means, stds = {}, {}

        def collect(z: int, unit: np.ndarray) -> None:
            means[z], stds[z] = mean_and_std(unit, intensity)

        restorer.restore_source(source, collect, intensity, frame.progress, settings=restorer.sampler_settings(noise))
        mean = np.stack([means[z] for z in sorted(means)])
        std = np.stack([stds[z] for z in sorted(stds)]) if restorer.samples > 1 else None
        if source.array.ndim == 2:
            mean, std = mean[0], None if std is None else std[0]
        return _restoration(frame, mean, std)

    def _joins(self, group: list[_PreparedFrame], frame: _PreparedFrame) -> bool:
        """Whether ``frame`` may walk with the frames of ``group`` (``restore_frames``): 2D
        frames of one shape in one region, one operator for all (so not inpainting, whose
        mask is each frame's own), the same samples and sampler settings (so sigma0 too),
        and room left in the backend's batch (``group_size``). A frame whose options cannot
        work on its shape raises here; the queue lets it walk alone, to meet its error there."""
        first = group[0]
        r = first.restorer
        shape = first.source.shape
        return (len(shape) == 2 and frame.source.shape == shape and r.options.task not in ("inpaint", "isotropic")
                and frame.restorer.samples == r.samples
                and frame.restorer.sampler_settings(frame.noise) == r.sampler_settings(first.noise)
                and len(plane_regions(r, first.source)) == 1
                and len(group) < r.group_size(r.options.grid_shape(shape)))

    def _restore_together(self, frames: list[_PreparedFrame]) -> list[Restoration]:
        """Restorations of frames that ``_joins`` let walk together, in order."""
        if len(frames) == 1:
            return [self._restore_prepared(frames[0])]
        first = frames[0]
        r = first.restorer
        with self._lock, self._naming_the_model():
            units = restore_frames(r, [f.source.array for f in frames], [f.intensity for f in frames],
                                   [f.restorer.seed for f in frames], r.sampler_settings(first.noise),
                                   shared_progress([f.progress for f in frames]))
        return [_restoration(frame, *mean_and_std(unit, frame.intensity)) for frame, unit in zip(frames, units, strict=True)]

    # ------------------------------------------------------------------ streaming

    def output_shape(self, source: Source) -> tuple[int, ...]:
        """The result's shape; options that cannot work on this input are refused here."""
        self.options.check_plane(source.shape[-2:])
        if self.options.task == "isotropic":
            k = self.z_factor_for(source)  # refuses a 2D image first
            z, y, x = source.shape
            return z * k, y, x
        grid = self.options.grid_shape(source.shape[-2:])
        return (*source.shape[:-2], *grid)

    def z_factor_for(self, source: Source) -> int:
        return z_factor_of(source, self.options.z_factor)

    def restore_source(
        self, source: Source, emit: Emit, intensity: IntensityMap, progress: ProgressCallback | None = None,
        planes: range | None = None, settings: SamplerSettings | None = None, store: TaskStore | None = None,
    ) -> float:
        """Restore ``source`` plane by plane, emitting output planes in order.

        ``planes``: the consecutive output planes to emit, all by default; their noise is that
        of their place in the whole result. ``store``: where the run's tasks leave their
        done-markers and intermediate results (``work``); a store kept from an interrupted run
        of the same settings lets this one skip what that one finished. Returns the sigma0
        used. Memory is bounded by a group of planes (or, for isotropic restoration, by a slab
        of the volume), whatever the stack's length.
        """
        with self._lock, self._naming_the_model():
            settings = settings or self.sampler_settings(self.noise_level(source, intensity))
            if self.options.task == "isotropic":
                restore_isotropic(self, source, intensity, settings, emit, progress, planes, store)
            else:
                restore_planes(self, source, intensity, settings, emit, progress,
                               range(source.planes) if planes is None else planes, store)
        return settings.sigma0

    @contextmanager
    def _naming_the_model(self):
        try:
            yield
        except NetworkOutputError as err:
            raise NetworkOutputError(f"{self.model_path}: {err}") from None

    def intensity_for(self, source: Source) -> IntensityMap:
        """This input's intensity map: affine, or through the generalised Anscombe transform
        for the Poisson-Gaussian noise model (its parameters given or fitted to the input)."""
        s = self.settings
        if s.noise_model == "poisson-gaussian":
            return stabilized_map_for_source(source, s.gain, s.read_noise, s.offset)
        return intensity_map_for_source(source)

    def noise_level(self, source: Source, intensity: IntensityMap) -> NoiseLevel:
        """This input's noise level: sigma0 given, from --noise-std, estimated, or the unit
        noise of the stabilised domain."""
        if isinstance(intensity, StabilizedMap):
            return NoiseLevel(intensity.sigma0)
        if self.sigma0 == "auto":
            from .noise_estimate import estimate_noise_std

            estimate = estimate_noise_std(source)
            return NoiseLevel(intensity.sigma0_from_noise_std(estimate), estimate)
        if self.sigma0 is not None:
            return NoiseLevel(self.sigma0)
        return NoiseLevel(intensity.sigma0_from_noise_std(self.noise_std))

    def sampler_settings(self, noise: NoiseLevel) -> SamplerSettings:
        return SamplerSettings(sigma0=noise.sigma0, steps=self.steps, eta=self.eta, eta_b=self.eta_b,
                               final_step=self.settings.final_step, walk=self.settings.walk)

    def walk_timesteps(self, grid: tuple[int, int], settings: SamplerSettings) -> Timesteps:
        """The timesteps a plane's walk visits on this restoration grid (progress totals,
        provenance); the sampler derives the same from the plane's own operator."""
        return walk_timesteps(self.schedule, settings, self.options.walk_operator(grid))

    def group_size(self, grid: tuple[int, int]) -> int:
        """Planes restored together so that their tiles fill the backend's batch."""
        if self.options.task == "inpaint":  # each plane has its own mask, hence operator
            return 1
        per_plane = self.denoiser.tiles_per_call(self.samples, *grid)
        return max(1, self.batch // per_plane)

    def provenance(self, source: Source, intensity: IntensityMap, noise: NoiseLevel) -> dict:
        """What an output records: the settings (RestoreSettings), as resolved for this call
        (sigma0 and the noise std used, the walk's timesteps and network calls, the overlap and
        batch the tile gave), the model and the intensity map."""
        grid = self.options.grid_shape(source.shape[-2:])
        return {
            "software": f"df5t-deploy {__version__}",
            "model": str(self.model_path),
            "model_sha256": self.model_sha256,
            "model_info": self.backend.info.to_dict(),
            "backend": self.backend.name,
            **self.settings.to_dict(),
            **self.options.to_dict(),
            "sigma0": noise.sigma0,
            "sigma0_rule": _sigma0_rule(self.settings),
            "noise_std": self.noise_std if self.sigma0 != "auto" else noise.estimated_noise_std,
            "walk_timesteps": self.walk_timesteps(grid, self.sampler_settings(noise)).to_dict(),
            "tile": self.backend.info.tile,
            "overlap": self.overlap,
            "batch": self.batch,
            "intensity_map": intensity.to_dict(),
        }


def _restoration(frame: _PreparedFrame, mean: np.ndarray, std: np.ndarray | None) -> Restoration:
    restorer, noise = frame.restorer, frame.noise
    provenance = restorer.provenance(frame.source, frame.intensity, noise)
    return Restoration(mean, frame.intensity, noise.sigma0, provenance, std, noise.estimated_noise_std)


def cap_gpu_memory(device: str, gigabytes: float) -> None:
    """Cap what this process takes through PyTorch's allocator on ``device`` (the device
    loop's buffers and a PyTorch network live there); TensorRT's workspace and onnxruntime's
    CUDA arena have their own limits. On device ``auto`` it applies to the GPU auto takes."""
    if not device.startswith("cuda") and device != AUTO_DEVICE:
        raise ValueError("--gpu-memory applies to --device cuda[:N] (or auto, on a machine with a GPU)")
    try:
        import torch
    except ImportError:
        raise ValueError("--gpu-memory caps PyTorch's CUDA allocator; PyTorch is not installed") from None
    if not torch.cuda.is_available():
        raise ValueError(f"--gpu-memory applies to --device cuda[:N]; PyTorch sees no CUDA GPU here (--device {device})")
    index = int(device.partition(":")[2] or 0)
    total = torch.cuda.get_device_properties(index).total_memory
    if not 0 < gigabytes * 2**30 <= total:
        raise ValueError(f"--gpu-memory must be in (0, {total / 2**30:.1f}] GB for {device}")
    torch.cuda.set_per_process_memory_fraction(gigabytes * 2**30 / total, index)


def _sigma0_rule(settings: RestoreSettings) -> str:
    from .noise_estimate import RULE

    if settings.noise_model == "poisson-gaussian":
        return "unit noise of the generalised Anscombe domain (intensity_map.noise: the Poisson-Gaussian parameters)"
    if settings.sigma0 == "auto":
        return RULE
    return "given (--sigma0)" if settings.sigma0 is not None else "from --noise-std"

"""Which loop walks a group of planes: the on-device loop where the backend offers it for the
operator and its device passed the self-check, else the host loop (``walks``)."""

from __future__ import annotations

import warnings
from collections.abc import Callable

import numpy as np

from .device_check import DeviceCheckError, Verdict, trusted_verdict
from .device_loop import DeviceSampler
from .device_loop import supports as supports_device_loop
from .noise import NoiseKey
from .operators import Inpainting, SpatialOperator
from .progress import ProgressTracker
from .sampler import SamplerSettings, weigh_in_measurement
from .tiling import BlendedDenoiser
from .walks import restore_group


class GroupWalker:
    """Starts the walk of a group of planes where it runs best: on the backend's device when
    it offers the on-device loop for the operator and has passed its self-check, else the
    host loop. Keeps the device buffers of the last shape for the next group."""

    def __init__(self, backend, denoiser: BlendedDenoiser, samples: int, strict_gpu: bool = False):
        self.backend, self.denoiser, self.samples, self.strict_gpu = backend, denoiser, samples, strict_gpu
        self._device_samplers: dict = {}
        self._verdict: Verdict | None = None

    def start(self, y: np.ndarray, op: SpatialOperator, settings: SamplerSettings, key: NoiseKey,
              tracker: ProgressTracker) -> Callable[[], np.ndarray]:
        """Begin restoring measurements y [G, ...]; the collector returns samples [G, S, H, W]
        on [0, 1], after the final step the settings ask for. On the device the walk is queued
        and the collector waits for it, reporting steps as the device finishes them; the host
        loop runs now."""
        collect = self._walk(y, op, settings, key, tracker)
        if settings.final_step == "weighted":
            return lambda: weigh_in_measurement(collect(), y, op, settings.sigma0)
        return collect

    def _walk(self, y: np.ndarray, op: SpatialOperator, settings: SamplerSettings, key: NoiseKey,
              tracker: ProgressTracker) -> Callable[[], np.ndarray]:
        schedule = self.backend.info.schedule
        device = self._trusted_device()
        if device is None or not supports_device_loop(op):
            result = restore_group(y, op, schedule, settings, self.denoiser, key, self.samples, tracker)
            return lambda: result
        states = len(y) * self.samples
        sampler = self._device_sampler(device, op, settings, states)
        run = sampler.start(y, self.backend.device_network, key)
        on_step = tracker.step_reporter(self.denoiser.tiles_per_call(states, *op.shape), len(sampler.ddrm.timesteps))
        return lambda: run.result(on_step).reshape(len(y), self.samples, *op.shape)

    def release(self) -> None:
        """Free the device buffers."""
        self._device_samplers = {}

    def _trusted_device(self):
        """The backend's device for the on-device loop, once it has passed its self-check
        (device_check): a device that failed runs the host loop, with one warning, or is an
        error with ``strict_gpu``."""
        device = getattr(self.backend, "device_api", None)
        if device is None:
            return None
        if self._verdict is None:
            self._verdict = trusted_verdict(device)
            if not self._verdict.passed:
                message = (f"the on-device loop failed its self-check on {device.identity().get('gpu', 'this device')} "
                           f"({self._verdict.summary}); details in {self._verdict.details}")
                if self.strict_gpu:
                    raise DeviceCheckError(message)
                warnings.warn(message + ". This GPU runs the host loop (the network stays on it) until the package "
                              "or the driver changes", stacklevel=5)
        return device if self._verdict.passed else None

    def _device_sampler(self, device, op: SpatialOperator, settings: SamplerSettings, states: int) -> DeviceSampler:
        """Device buffers are allocated once per operator shape and group size, and reused for
        every plane; an inpainting mask is part of its operator, so those are not reused."""
        tile_dtype = np.float16 if self.backend.info.precision == "fp16" else np.float32
        key = (type(op).__name__, op.shape, getattr(op, "block", None), states, settings)
        sampler = self._device_samplers.get(key)
        if sampler is None:
            sampler = DeviceSampler(device, op, self.backend.info.schedule, settings, self.denoiser.grid(*op.shape),
                                    states, self.samples, tile_dtype)
            if not isinstance(op, Inpainting):
                self._device_samplers = {key: sampler}  # one shape at a time: earlier buffers are freed
        return sampler

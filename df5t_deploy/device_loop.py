"""The DDRM loop on a device: buffers allocated once, kernels for every non-network step,
no host round trip inside the loop, and one step captured as a CUDA graph and replayed.

The loop is written against a small ``Device`` interface (allocate, upload, download
asynchronously, zero, copy, launch a kernel by name, capture, markers), so the very same code runs on a GPU
(``TorchCudaDevice``: PyTorch tensors and the NVRTC-built kernels on PyTorch's current
stream) and, in the tests, on the CPU (numpy arrays and the kernels compiled by g++ through
the grid-emulation header). Even the initial value is computed on the device (as a step,
see ``step_table``), so no noise is drawn on the host. A step reads its scalars, its
network timestep and its noise counter from device tables at a device cursor that the step
itself advances, and the walk's measurements and noise key (``walk_table``) from fixed
buffers, so one step captured for a sampler's first walk is valid for every step of every
later walk of the same shape.

``DeviceSampler.start`` only queues a walk: it returns a ``DeviceRun`` whose result the host
collects later, so the host reads, prepares and queues the next group of planes while the
device still samples this one. Progress comes from markers the device passes after each step,
never from the host's queueing.

Supported operators: identity/permutation (denoise, inpaint) and block means (sr, along-z)
with a fused step kernel each, and the blur (split, DCTs as matrix products, spectral
update, inverse DCTs, merge).
"""

from __future__ import annotations

import ctypes
import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from .artifact import Schedule
from .noise import NoiseKey
from .operators import BlockMean, GaussianBlur, Identity, Inpainting, SpatialOperator
from .sampler import DDRM, SamplerSettings, StepPlan
from .tiling import TileGrid, axis_window, check_network_output

U32, U64, INT = ctypes.c_uint32, ctypes.c_uint64, ctypes.c_int


class Marker(Protocol):
    def synchronize(self) -> None:
        """Block the host until the device has run everything queued before this marker."""


class PendingDownload(Protocol):
    def result(self) -> np.ndarray:
        """The downloaded array, once its copy has finished."""


class Device(Protocol):
    def bind_thread(self) -> None:
        """Make this device current in the calling thread (several GPUs, one thread each)."""

    def empty(self, shape: tuple[int, ...], dtype: Any) -> Any: ...
    def upload(self, array: np.ndarray) -> Any: ...
    def zero(self, buffer: Any) -> None: ...
    def copy(self, destination: Any, source: Any) -> None: ...
    def pointer(self, buffer: Any) -> ctypes.c_void_p: ...
    def launch(self, name: str, *args) -> None: ...
    def capture(self, step: Callable[[], None]) -> Callable[[], None]:
        """A replayable recording of ``step`` (a CUDA graph), or ``step`` itself."""

    def marker(self) -> Marker:
        """A marker behind the work queued so far."""

    def download_async(self, buffer: Any) -> PendingDownload:
        """Start copying ``buffer`` to the host behind the work queued so far (on a GPU: into
        pinned memory, on a copy stream), without waiting for it."""

    def transform(self, out: Any, a: Any, left: Any, right: Any) -> None:
        """out[b] = left @ a[b] @ right^T for every b (a separable 2D transform; cuBLAS on a GPU)."""

    def run_network(self, network: Callable[[Any, Any, Any], None], tiles: Any, eps_tiles: Any, t: Any) -> None:
        """Enqueue ``network`` on device buffers (on a GPU it enqueues on the compute stream
        itself, so a capture holds it)."""

    def identity(self) -> dict:
        """What the device is (model, driver, runtime), for the self-check's verdict cache."""


#: (tiles in, eps tiles out, timesteps [tiles] float32): fills eps in place, on the device.
DeviceNetwork = Callable[[Any, Any, Any], None]


def supports(op: SpatialOperator) -> bool:
    return type(op) in DEVICE_STEPS


def dct_matrix(n: int) -> np.ndarray:
    """The orthonormal DCT-II matrix (scipy.fft.dct(norm="ortho") as a matrix)."""
    k, j = np.arange(n)[:, None], np.arange(n)[None, :]
    d = np.sqrt(2.0 / n) * np.cos(np.pi * (2 * j + 1) * k / (2 * n))
    d[0] /= np.sqrt(2.0)
    return d.astype(np.float32)


def covering_tiles(starts: list[int], length: int, size: int) -> tuple[np.ndarray, np.ndarray]:
    """The blend kernel's table along one axis: for each position, the first tile (of
    ``size`` at the sorted ``starts``) that covers it, and how many consecutive ones do."""
    position = np.arange(length)[:, None]
    covers = (np.asarray(starts)[None, :] <= position) & (position < np.asarray(starts)[None, :] + size)
    return covers.argmax(axis=1).astype(np.int32), covers.sum(axis=1).astype(np.int32)


#: The walk table: a head (region row and column, orientation << 24), then per plane of the
#: group its id and its seed's low and high 32 bits.
WALK_HEAD_WORDS, WALK_PLANE_WORDS = 3, 3


def walk_words(groups: int) -> int:
    return WALK_HEAD_WORDS + WALK_PLANE_WORDS * groups


def walk_table(key: NoiseKey) -> np.ndarray:
    """The kernels' DF5TWalk words for a group's noise key (as int32 bits)."""
    words = [key.y0, key.x0, key.orientation << 24]
    for seed, plane in key.entries():
        words += [plane, seed & 0xFFFFFFFF, seed >> 32]
    return np.array(words, dtype=np.uint64).astype(np.uint32).view(np.int32)


def step_table(ddrm: DDRM) -> np.ndarray:
    """The kernels' DF5TStep table [steps + 1, 7] float32: sqrt(abar), sqrt(1 - abar), sn,
    sigma0, eta, eta_b, sqrt(abar_next) for each walk step, then the initial value's row.

    The initial value is a step from x = eps = 0 with eta = eta_b = 1 and sn = sigma_t of the
    walk's start, divided by ``Timesteps.init_divisor``: its three cases are then exactly DDRM's
    initialisation (REFERENCE.md section 4) at that start, and it draws the noise of step id
    len(timesteps), as the host loop does.
    """
    cfg = ddrm.settings
    rows = []
    for plan in ddrm.timesteps:
        sn = np.sqrt(1.0 - plan.alpha_bar_next) / np.sqrt(plan.alpha_bar_next)
        rows.append([np.sqrt(plan.alpha_bar), np.sqrt(1.0 - plan.alpha_bar), sn, cfg.sigma0, cfg.eta, cfg.eta_b,
                     np.sqrt(plan.alpha_bar_next)])
    rows.append([1.0, 0.0, ddrm.timesteps.init_sigma, cfg.sigma0, 1.0, 1.0, 1.0 / ddrm.timesteps.init_divisor])
    return np.ascontiguousarray(rows, dtype=np.float32)


class DeviceSampler:
    """DDRM for one region shape and group size, with every buffer allocated once."""

    def __init__(self, device: Device, op: SpatialOperator, schedule: Schedule, settings: SamplerSettings,
                 grid: TileGrid, states: int, samples: int, tile_dtype=np.float32):
        if not supports(op):
            raise ValueError(f"{type(op).__name__} has no fused device step; use the host loop")
        self.device, self.op, self.grid = device, op, grid
        self.ddrm = DDRM(op, schedule, settings)
        self.states, self.samples, self.tile_dtype = states, samples, np.dtype(tile_dtype)
        h, w = op.shape
        tile = grid.tile
        self.jobs = [(b, y, x) for b in range(states) for (y, x) in grid.positions]
        self.x = device.empty((states, 3, h, w), np.float32)
        self.x_next = device.empty((states, 3, h, w), np.float32)
        self.eps = device.empty((states, 3, h, w), np.float32)
        self.tiles = device.empty((len(self.jobs), 3, tile, tile), self.tile_dtype)
        self.eps_tiles = device.empty((len(self.jobs), 3, tile, tile), self.tile_dtype)
        self.ys, self.xs = (device.upload(np.array(starts, dtype=np.int32)) for starts in (grid.ys, grid.xs))
        self.row_windows, self.col_windows = (
            device.upload(np.array([axis_window(start, starts, tile) for start in starts], np.float32))
            for starts in (grid.ys, grid.xs))
        self.row_cover, self.col_cover = (
            tuple(device.upload(table) for table in covering_tiles(starts, length, tile))
            for starts, length in ((grid.ys, grid.padded[0]), (grid.xs, grid.padded[1])))
        self.tp, self.ty, self.tx = (device.upload(np.array([j[i] for j in self.jobs], dtype=np.int32)) for i in range(3))
        self.s = device.upload(np.ascontiguousarray(self.ddrm.s, dtype=np.float32))
        self.operator_step: DeviceStep = DEVICE_STEPS[type(op)](device, op, states)
        self.steps = device.upload(step_table(self.ddrm))
        self.t_table = device.upload(np.array([plan.t for plan in self.ddrm.timesteps], dtype=np.float32))
        self.t = device.empty((len(self.jobs),), np.float32)
        self.cursor = device.upload(np.zeros(1, np.int32))  # read as u32 by the kernels
        self.walk = device.upload(np.zeros(walk_words(states // samples), np.int32))  # read as u32: walk_table
        self.ybar = None  # the measurements as the step's kernel reads them; allocated for the first walk
        self._captured: tuple[DeviceNetwork, Callable[[], None]] | None = None  # (network, its replay)

    def start(self, y: np.ndarray, network: DeviceNetwork, key: NoiseKey) -> DeviceRun:
        """Queue the whole walk for measurements y [G, ...] (host) and return at once.

        The walk's measurements and noise key go into fixed device buffers, so the step
        captured for the sampler's first walk replays for every later one; that first walk
        runs its first step directly (it also warms the network up outside a capture). The
        final states are mapped to grey images on [0, 1] (sampler.state_to_image) and their
        download is queued too.
        """
        d = self.device
        d.bind_thread()
        kernel_ybar = np.ascontiguousarray(self.operator_step.measurement(self.ddrm, y), dtype=np.float32)
        if self.ybar is None:
            self.ybar = d.empty(kernel_ybar.shape, np.float32)
        elif tuple(self.ybar.shape) != kernel_ybar.shape:
            raise ValueError(f"measurements {kernel_ybar.shape} for a sampler made for {tuple(self.ybar.shape)}")
        d.copy(self.ybar, d.upload(kernel_ybar))
        d.copy(self.walk, d.upload(walk_table(key)))
        self._initial_state()
        markers = []
        if self._captured is None or self._captured[0] != network:  # bound methods compare by owner
            step = functools.partial(self._step, network)
            step()
            # once per sampler, before any replay: non-finite eps would be clamped away silently
            check_network_output(d.download_async(self.eps).result(), next(iter(self.ddrm.timesteps)).t)
            markers.append(d.marker())
            self._captured = (network, d.capture(step))
        replay = self._captured[1]
        while len(markers) < len(self.ddrm.timesteps):
            replay()
            markers.append(d.marker())
        download = d.download_async(self._grey_images())
        return DeviceRun(list(self.ddrm.timesteps), markers, download, keep_alive=replay)

    def _initial_state(self) -> None:
        """x at the first timestep, on the device: the table's last row (see step_table)."""
        d = self.device
        d.zero(self.x)
        d.zero(self.eps)
        d.copy(self.cursor, d.upload(np.array([len(self.ddrm.timesteps)], np.int32)))
        self._update()
        d.copy(self.x, self.x_next)
        d.zero(self.cursor)

    def _step(self, network: DeviceNetwork) -> None:
        """One whole step on the device, at the step the cursor points to; then the cursor moves."""
        d = self.device
        self._predict_eps(network)
        self._update()
        d.copy(self.x, self.x_next)  # fixed buffers, so a captured step stays valid
        d.launch("df5t_advance", d.pointer(self.cursor))

    def _update(self) -> None:
        """x_next from x and eps: the operator's DDRM update at the cursor's step."""
        d = self.device
        h, w = self.op.shape
        common = (U32(self.states), U32(self.samples), U32(h), U32(w))
        where = (d.pointer(self.walk), d.pointer(self.steps), d.pointer(self.cursor))
        self.operator_step.update(self, common, where)

    def _predict_eps(self, network: DeviceNetwork) -> None:
        d, grid = self.device, self.grid
        (pt, _), (pl, _) = grid.padding
        h, w = self.op.shape
        kind = "f16" if self.tile_dtype == np.float16 else "f32"
        n = len(self.jobs)
        d.launch("df5t_fill_timesteps", d.pointer(self.t), d.pointer(self.t_table), d.pointer(self.cursor), U32(n))
        d.launch(f"df5t_gather_tiles_{kind}", d.pointer(self.x), d.pointer(self.tiles), d.pointer(self.tp),
                 d.pointer(self.ty), d.pointer(self.tx), U32(n), U32(h), U32(w), INT(pt), INT(pl), U32(grid.tile))
        d.run_network(network, self.tiles, self.eps_tiles, self.t)
        first_row, rows = self.row_cover
        first_col, cols = self.col_cover
        d.launch(f"df5t_blend_tiles_{kind}", d.pointer(self.eps_tiles), d.pointer(self.ys), d.pointer(self.xs),
                 d.pointer(self.row_windows), d.pointer(self.col_windows), d.pointer(first_row), d.pointer(rows),
                 d.pointer(first_col), d.pointer(cols), U32(len(grid.ys)), U32(len(grid.xs)), d.pointer(self.eps),
                 U32(self.states), U32(h), U32(w), INT(pt), INT(pl), U32(grid.tile))

    def _grey_images(self):
        """The final states as grey images [states, H, W] on [0, 1], in a fresh buffer (the
        next walk may overwrite x while this one is still being downloaded)."""
        d = self.device
        h, w = self.op.shape
        out = d.empty((self.states, h, w), np.float32)
        d.launch("df5t_state_to_grey", d.pointer(self.x), d.pointer(out), U32(self.states), U64(h * w))
        return out


@dataclass
class DeviceRun:
    """A walk queued on the device: a marker after each step, and the result's download."""

    plans: Sequence[StepPlan]
    markers: Sequence[Marker]
    download: PendingDownload
    keep_alive: Any  # the captured step: it must outlive its replays

    def result(self, on_step: Callable[[StepPlan], None] | None = None) -> np.ndarray:
        """Grey images [states, H, W] on [0, 1], which the host averages over samples exactly
        as in the host loop; ``on_step`` is called as the device finishes each step."""
        for plan, marker in zip(self.plans, self.markers, strict=True):
            marker.synchronize()
            if on_step is not None:
                on_step(plan)
        return self.download.result()


class DeviceStep(Protocol):
    """An operator's DDRM update on the device: its buffers, its measurement's layout, its
    launches (between the blend of eps and the copy of x_next into x)."""

    def __init__(self, device: Device, op: SpatialOperator, states: int): ...

    def measurement(self, ddrm: DDRM, y: np.ndarray) -> np.ndarray:
        """The measurements as its kernel reads them."""

    def update(self, sampler: DeviceSampler, common: tuple, where: tuple) -> None:
        """Queue x_next = the update of x, eps, the measurement and the noise."""


class PointwiseStep:
    """Identity and inpainting: V is the identity or a permutation, so the spectral layout is
    the pixel grid. Twin: DDRM.step with Identity / Inpainting."""

    def __init__(self, device: Device, op: SpatialOperator, states: int):
        pass  # x, eps, ybar and s are the sampler's

    def measurement(self, ddrm: DDRM, y: np.ndarray) -> np.ndarray:
        return ddrm.spectral_measurement(y)

    def update(self, sampler: DeviceSampler, common: tuple, where: tuple) -> None:
        d = sampler.device
        d.launch("df5t_ddrm_step_pointwise", d.pointer(sampler.x), d.pointer(sampler.eps), d.pointer(sampler.ybar),
                 d.pointer(sampler.s), U64(0), d.pointer(sampler.x_next), *common, *where)  # s shared: stride 0


class BlockStep:
    """Block means (sr R x R, along z k x 1): one thread a block. Twin: DDRM.step with BlockMean."""

    def __init__(self, device: Device, op: SpatialOperator, states: int):
        self.block = op.block

    def measurement(self, ddrm: DDRM, y: np.ndarray) -> np.ndarray:
        return y  # on the measurement grid: U is the identity

    def update(self, sampler: DeviceSampler, common: tuple, where: tuple) -> None:
        d = sampler.device
        by, bx = self.block
        d.launch("df5t_ddrm_step_block", d.pointer(sampler.x), d.pointer(sampler.eps), d.pointer(sampler.ybar),
                 d.pointer(sampler.x_next), *common, U32(by), U32(bx), *where)


class BlurStep:
    """The Gaussian blur: V is the 2D DCT, applied as matrix products between kernels: split
    (x0, eps, noise to grey coordinates; colour differences updated), V^T by DCTs, the
    spectral update, V by inverse DCTs, merge. Twin: DDRM.step with GaussianBlur."""

    def __init__(self, device: Device, op: SpatialOperator, states: int):
        h, w = op.shape
        self.dct_y, self.dct_x = (device.upload(dct_matrix(n)) for n in op.shape)
        self.idct_y, self.idct_x = (device.upload(np.ascontiguousarray(dct_matrix(n).T)) for n in op.shape)
        self.grey = [device.empty((states, h, w), np.float32) for _ in range(4)]
        self.diffs = device.empty((states, 2, h, w), np.float32)

    def measurement(self, ddrm: DDRM, y: np.ndarray) -> np.ndarray:
        return ddrm.spectral_measurement(y)

    def update(self, sampler: DeviceSampler, common: tuple, where: tuple) -> None:
        """Four [states, H, W] buffers serve six roles in turn (a region can hold 2 GB of
        them): each is renamed for its new role once its old content is spent."""
        d = sampler.device
        x0_pixels, eps_pixels, noise_pixels, free = self.grey
        h, w = sampler.op.shape
        d.launch("df5t_ddrm_split", d.pointer(sampler.x), d.pointer(sampler.eps), d.pointer(x0_pixels),
                 d.pointer(eps_pixels), d.pointer(noise_pixels), d.pointer(self.diffs), *common, *where)
        x0_spectral = free
        d.transform(x0_spectral, x0_pixels, self.dct_y, self.dct_x)
        eps_spectral = x0_pixels  # x0 in pixels is spent
        d.transform(eps_spectral, eps_pixels, self.dct_y, self.dct_x)
        noise_spectral = eps_pixels  # eps in pixels is spent
        d.transform(noise_spectral, noise_pixels, self.dct_y, self.dct_x)
        d.launch("df5t_ddrm_update", d.pointer(x0_spectral), d.pointer(eps_spectral), d.pointer(noise_spectral),
                 d.pointer(sampler.ybar), d.pointer(sampler.s), common[0], common[1], U64(h * w), *where[-2:])
        grey_next = noise_pixels  # the noise in pixels is spent; x0_spectral now holds the update
        d.transform(grey_next, x0_spectral, self.idct_y, self.idct_x)
        d.launch("df5t_ddrm_merge", d.pointer(grey_next), d.pointer(self.diffs), d.pointer(sampler.x_next), common[0],
                 U64(h * w), *where[-2:])


#: Each operator's device step; an operator without one runs the host loop.
DEVICE_STEPS: dict[type, type[DeviceStep]] = {
    Identity: PointwiseStep, Inpainting: PointwiseStep, BlockMean: BlockStep, GaussianBlur: BlurStep,
}

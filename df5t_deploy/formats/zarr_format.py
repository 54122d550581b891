"""zarr and OME-Zarr: NGFF 0.5 on zarr v3 (0.4 on zarr v2), a multiscale image whose level 0
is the full resolution, one plane a chunk unless asked otherwise.

The output is built in a hidden folder beside the target and renamed when complete. Planes
may be written in any order; each leaves a done-marker in the folder's task store (``work``),
which also holds the run's intermediate results. With ``resume=True`` an interrupted output
is continued: planes and tasks already done are skipped by the caller.
"""

from __future__ import annotations

import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..work import TaskStore
from .base import (
    ImageFormatError,
    ImageMeta,
    Source,
    TempDirSink,
    check_grey,
    check_plane_size,
)

SUFFIXES = (".zarr",)
#: The task store inside an unfinished output (removed before it takes its name).
TASKS_FOLDER = ".df5t-tasks"
#: The most pyramid levels an output may have (each halves y and x).
MAX_LEVELS = 8


def _array(group_or_array):
    import zarr

    if isinstance(group_or_array, zarr.Array):
        return group_or_array, {}
    arrays = dict(group_or_array.arrays())
    if "0" not in arrays:
        raise ImageFormatError("zarr group without array '0' (not OME-Zarr)")
    return arrays["0"], dict(group_or_array.attrs)


class ZarrSource(Source):
    def __init__(self, path: Path):
        import zarr

        self.path = path
        try:
            self._array, attrs = _array(zarr.open(str(path), mode="r"))
        except (ValueError, KeyError, OSError, FileNotFoundError) as err:
            raise ImageFormatError(f"{path}: not a readable zarr store ({err})") from None
        self.shape, self.dtype = tuple(self._array.shape), np.dtype(self._array.dtype)
        check_grey(path, self.shape, "?" * len(self.shape))
        check_plane_size(path, self.shape)
        self._check_chunks()
        self.meta = ImageMeta("ZYX" if len(self.shape) == 3 else "YX", _ome_voxel_size(attrs, len(self.shape)))
        self.provenance = attrs.get("df5t") if isinstance(attrs.get("df5t"), dict) else None

    def _check_chunks(self) -> None:
        """zarr reads a missing chunk as its fill value: refuse rather than restore it as data."""
        present, total = self._array.nchunks_initialized, self._array.nchunks
        if present < total:
            raise ImageFormatError(
                f"{self.path}: {total - present} of {total} chunks are missing (never written, or elided because "
                f"they held only the fill value {self._array.fill_value!r}); complete the store, or rewrite it "
                "with write_empty_chunks=True if those regions really are that value")

    def plane(self, z: int) -> np.ndarray:
        try:
            return np.asarray(self._array[...] if len(self.shape) == 2 else self._array[z])
        except (RuntimeError, ValueError, OSError) as err:  # a damaged chunk: the codec's own error
            raise ImageFormatError(f"{self.path}: plane {z} cannot be read, a chunk is damaged ({err})") from None


def multiscales(attrs: dict) -> list:
    """The NGFF multiscales of a group's attributes: under "ome" (0.5) or at the top (0.4)."""
    ome = attrs.get("ome")
    return (ome if isinstance(ome, dict) else attrs).get("multiscales") or []


def _ome_voxel_size(attrs: dict, ndim: int):
    try:
        transform = multiscales(attrs)[0]["datasets"][0]["coordinateTransformations"][0]["scale"]
    except (KeyError, IndexError, TypeError):
        return None
    scale = [float(v) for v in transform[-ndim:]]
    return (scale[-1], scale[-2], scale[0] if ndim == 3 else None)


def partial_store(path: Path) -> Path | None:
    """The interrupted output a resumed run continues (the latest, by name)."""
    candidates = sorted(Path(path).parent.glob(f".{Path(path).name}.partial-*"))
    return candidates[-1] if candidates else None


@dataclass(frozen=True)
class ZarrLayout:
    """How an OME-Zarr output is laid out: its chunks (default: one plane), and ``levels``
    downsampled copies (2 x 2 block means in y and x per level, z kept: the multiscale
    pyramid napari and neuroglancer read), each computed from a plane as it is written."""

    chunks: tuple[int, ...] | None = None
    levels: int = 0

    def __post_init__(self):
        if not 0 <= self.levels <= MAX_LEVELS:
            raise ImageFormatError(f"--pyramid must be from 0 to {MAX_LEVELS}, got {self.levels}")
        if self.chunks is not None and (not self.chunks or min(self.chunks) < 1):
            raise ImageFormatError(f"--chunks must be positive sizes, got {self.chunks}")

    def check(self, shape: tuple[int, ...]) -> None:
        """Refuse, before anything is created, a layout that an output of ``shape`` cannot take."""
        self.level_shapes(shape)
        self.chunks_for(shape)

    def describe(self, shape: tuple[int, ...]) -> str:
        return f"chunks {','.join(map(str, self.chunks_for(shape)))}, {self.levels} pyramid levels"

    def level_shapes(self, shape: tuple[int, ...]) -> list[tuple[int, ...]]:
        shapes = [tuple(shape)]
        for _ in range(self.levels):
            *lead, h, w = shapes[-1]
            if h < 2 or w < 2:
                raise ImageFormatError(f"--pyramid {self.levels}: a {shape[-2]} x {shape[-1]} plane halves only "
                                       f"{len(shapes) - 1} times")
            shapes.append((*lead, h // 2, w // 2))
        return shapes

    def chunks_for(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        if self.chunks is None:
            return (1, *shape[1:]) if len(shape) == 3 else tuple(shape)
        if len(self.chunks) != len(shape):
            raise ImageFormatError(f"--chunks {','.join(map(str, self.chunks))} has {len(self.chunks)} sizes for a "
                                   f"{len(shape)}-D output")
        return tuple(min(c, n) for c, n in zip(self.chunks, shape, strict=True))


class ZarrSink(TempDirSink):
    any_order = True

    def __init__(self, path, shape, dtype, meta, provenance, resume: bool = False, layout: ZarrLayout | None = None):
        import zarr

        self.layout = layout or ZarrLayout()
        self.layout.check(tuple(shape))  # before the partial folder exists
        partial = partial_store(path) if resume else None
        super().__init__(path, shape, dtype, meta, provenance, partial=partial)
        if partial is not None:
            self._continue(zarr.open_group(str(self.tmp), mode="r+"))
            return
        try:
            self._group = zarr.open_group(str(self.tmp), mode="w")
            # every chunk written, even one of fill values, so that readers can tell data from absence
            self._levels = [self._group.create_array(str(i), shape=level, dtype=self.dtype,
                                                     chunks=self.layout.chunks_for(level),
                                                     config={"write_empty_chunks": True},
                                                     dimension_names=self._dimension_names())
                            for i, level in enumerate(self.layout.level_shapes(self.shape))]
            self._group.attrs.update(self._ome_attrs())
            self.tasks = partial_tasks(self.tmp)  # after the group: creating it empties the folder
        except BaseException:
            shutil.rmtree(self.tmp, ignore_errors=True)  # nothing begun is kept: there is nothing to resume
            raise

    def _continue(self, group) -> None:
        """Resume into an earlier partial store: only the same shape, type and layout."""
        self._group, self._levels = group, _levels_of(group)
        full = self._levels[0]
        if tuple(full.shape) != self.shape or np.dtype(full.dtype) != self.dtype:
            raise ImageFormatError(f"{self.tmp}: cannot resume, it holds {full.shape} {full.dtype}")
        earlier = ZarrLayout(tuple(full.chunks), len(self._levels) - 1)
        if earlier.describe(self.shape) != self.layout.describe(self.shape):
            raise ImageFormatError(f"--resume: {self.tmp} has {earlier.describe(self.shape)}, this run asks for "
                                   f"{self.layout.describe(self.shape)}; resume with the same --chunks and --pyramid, "
                                   f"or run without --resume to start afresh")
        self.tasks = partial_tasks(self.tmp)
        self.recount()

    def _dimension_names(self) -> list[str] | None:
        """NGFF 0.5 asks zarr v3 arrays to name their axes as the multiscales metadata does."""
        return [axis.lower() for axis in self.meta.axes] if self._group.metadata.zarr_format >= 3 else None

    def _ome_attrs(self) -> dict:
        axes = [{"name": a.lower(), "type": "space", "unit": "nanometer"} for a in self.meta.axes]
        voxel = self.meta.voxel_size_nm or (1.0, 1.0, 1.0)
        scale = [voxel[1], voxel[0]] if len(self.shape) == 2 else [voxel[2] or 1.0, voxel[1], voxel[0]]
        origin = (self.provenance or {}).get("roi", {}).get("origin")
        datasets = []
        start = [float(o) for o in origin[-len(scale):]] if origin is not None else [0.0] * len(scale)
        for level in range(self.layout.levels + 1):
            factor = [1.0] * (len(scale) - 2) + [2.0**level] * 2
            transforms = [{"type": "scale", "scale": [s * f for s, f in zip(scale, factor, strict=True)]}]
            # a block mean's centre lies (factor - 1) / 2 pixels in; a --roi box starts at its origin
            shift = [(o + (f - 1) / 2) * s for o, f, s in zip(start, factor, scale, strict=True)]
            if any(shift):
                transforms.append({"type": "translation", "translation": shift})
            datasets.append({"path": str(level), "coordinateTransformations": transforms})
        if self._group.metadata.zarr_format >= 3:
            attrs = {"ome": {"version": "0.5", "multiscales": [{"axes": axes, "datasets": datasets}]}}
        else:
            attrs = {"multiscales": [{"version": "0.4", "axes": axes, "datasets": datasets}]}
        if self.provenance:
            attrs["df5t"] = self.provenance
        return attrs

    def _write(self, z: int, plane: np.ndarray) -> None:
        _write_levels(self._levels, z, plane)
        self.tasks.plane_written(z)

    def recount(self) -> None:
        """Count the planes written into this output by earlier runs or other processes
        (cluster workers), from their done-markers."""
        self.written = self.planes - len(self.missing_planes())

    def _commit(self) -> None:
        shutil.rmtree(self.tasks.folder)
        super()._commit()

    def _abort(self) -> None:
        """Keep the partial store for ``--resume`` (hidden, named as partial), and say so."""
        warnings.warn(f"the unfinished output is kept as {self.tmp} for --resume; `df5t clean {self.path} --yes` "
                      "removes it", stacklevel=2)


def write_plane_into(partial: Path, z: int, plane: np.ndarray) -> None:
    """Write plane ``z`` (and its pyramid levels) into the unfinished output ``partial``, as a
    cluster worker does, and mark it done. Planes go into separate chunks (one plane a chunk
    along z), so workers never write the same chunk."""
    import zarr

    levels = _levels_of(zarr.open_group(str(partial), mode="r+"))
    _write_levels(levels, z, np.asarray(plane, dtype=levels[0].dtype))
    partial_tasks(partial).plane_written(z)


def partial_tasks(partial: Path) -> TaskStore:
    """The task store of the unfinished output ``partial``: done-markers and intermediate results."""
    return TaskStore(Path(partial) / TASKS_FOLDER, "write the output to a disk with more free space")


def _levels_of(group) -> list:
    """The pyramid's arrays of an output group, full resolution first."""
    return [group[str(i)] for i in range(len(multiscales(dict(group.attrs))[0]["datasets"]))]


def _write_levels(levels, z: int, plane: np.ndarray) -> None:
    for level in levels:
        if level.ndim == 2:
            level[...] = plane
        else:
            level[z] = plane
        plane = _half(plane, level.dtype)


def _half(plane: np.ndarray, dtype) -> np.ndarray:
    """The next pyramid level of a plane: means of 2 x 2 blocks (a last odd row or column
    dropped), rounded back to integers for integer data."""
    h, w = (plane.shape[0] // 2) * 2, (plane.shape[1] // 2) * 2
    mean = plane[:h, :w].reshape(h // 2, 2, w // 2, 2).mean(axis=(1, 3), dtype=np.float64)
    return np.rint(mean).astype(dtype) if np.dtype(dtype).kind in "iu" else mean.astype(dtype)

"""The work of one restoration split into tasks, and the folder that remembers which are done.

The tasks of a run, and their names, depend only on the input's shape, the task's factor, the
model's tile and ``--max-region``: never on devices, batch sizes, workers or timing.

- ``plane-Z``: output plane Z (a plane of a 2D task that fits in one region, or a plane of the
  isotropic result averaged from its two passes);
- ``region-Z-R``: super-tile R of plane Z, when the plane is larger than ``--max-region``; its
  float32 samples, margins included, are kept until every region of the plane is done and
  the plane is blended;
- ``xz-A-B`` / ``yz-A-B``: the XZ planes of rows A..B, or the YZ planes of columns A..B, of the
  isotropic passes, kept as float32 samples until both passes are done and averaged.

A finished task leaves a done-marker, an empty file created only after its result is written,
so a run resumed from the same folder redoes only what had not finished: a process that dies
mid-task leaves that task unmarked, and redoing a task writes the same values again. This is
the unit a cluster distributes.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np

#: Pixels of input per isotropic slab (rows for XZ planes, columns for YZ planes): its result,
#: held until the slab is written, is this times the z factor and the samples, in float32.
SLAB_PIXELS = 8 * 2**20


def plane_task(z: int) -> str:
    return f"plane-{z:06d}"


def region_task(z: int, region: int) -> str:
    return f"{_regions_of(z)}{region:03d}"


def _regions_of(z: int) -> str:
    return f"region-{z:06d}-"


def slab_task(orientation: str, start: int, stop: int) -> str:
    return f"{orientation}-{start:06d}-{stop:06d}"


def slabs(lines: int, pixels_per_line: int) -> list[tuple[int, int]]:
    """The slabs an isotropic pass restores one after another: [start, stop) of ``lines``."""
    step = max(1, SLAB_PIXELS // max(1, pixels_per_line))
    return [(i, min(lines, i + step)) for i in range(0, lines, step)]


class InsufficientScratchSpace(OSError):
    """The folder for intermediate results has less free space than the run needs."""


class TaskStore:
    """Done-markers and intermediate results of one run's tasks, kept in ``folder``.

    Intermediate results are region samples (``.npy``, written beside and renamed, so a file
    is whole or absent) and the isotropic passes (zarr arrays, written a slab at a time).
    """

    def __init__(self, folder: str | Path, space_hint: str):
        self.folder, self.space_hint = Path(folder), space_hint
        self._done = self.folder / "done"
        self._done.mkdir(parents=True, exist_ok=True)

    @classmethod
    @contextlib.contextmanager
    def temporary(cls) -> Iterator[TaskStore]:
        """A store for a run that will not be resumed, removed afterwards."""
        with tempfile.TemporaryDirectory(prefix="df5t-work-") as folder:
            yield cls(folder, "set TMPDIR to a folder on a larger disk")

    def is_done(self, task: str) -> bool:
        return (self._done / task).exists()

    def mark_done(self, task: str) -> None:
        (self._done / task).touch()

    def save(self, task: str, array: np.ndarray) -> None:
        """Keep ``task``'s result, whole or not at all, and mark the task done."""
        final = self.folder / f"{task}.npy"
        partial = final.with_name(f".{final.name}.partial")
        with open(partial, "wb") as file:  # a file, so that np.save keeps the name
            np.save(file, array)
        os.replace(partial, final)
        self.mark_done(task)

    def load(self, task: str) -> np.ndarray:
        return np.load(self.folder / f"{task}.npy")

    def plane_written(self, z: int) -> None:
        """Output plane ``z`` is written: mark it done and free the region results it was
        blended from (their markers stay, so they are not redone)."""
        self.mark_done(plane_task(z))
        for result in self.folder.glob(f"{_regions_of(z)}*.npy"):
            result.unlink()

    def scratch(self, chunks: dict[str, tuple[int, ...]], shape: tuple[int, ...], what: str) -> None:
        """Create float32 scratch arrays of ``shape`` (zarr, uncompressed), one per name with
        its chunks, unless an earlier run of this store did. The disk must hold the new ones
        whole before any work starts: they fill as the run goes."""
        import zarr

        new = {name: chunk for name, chunk in chunks.items() if not (self.folder / f"{name}.zarr").exists()}
        needed = len(new) * 4 * int(np.prod(shape))
        free = shutil.disk_usage(self.folder).free
        if free < needed:
            raise InsufficientScratchSpace(
                f"{what} need {_size(needed)} of scratch space in {self.folder}, but only {_size(free)} is free; "
                f"free some space or {self.space_hint}")
        for name, chunk in new.items():  # created beside and renamed, so an array that exists is whole
            partial = self.folder / f".{name}.zarr.partial"
            shutil.rmtree(partial, ignore_errors=True)
            zarr.create_array(str(partial), shape=shape, chunks=chunk, dtype=np.float32, compressors=None,
                              fill_value=0.0)
            os.replace(partial, self.folder / f"{name}.zarr")

    def open_scratch(self, name: str):
        import zarr

        return zarr.open_array(str(self.folder / f"{name}.zarr"), mode="r+")


def _size(nbytes: int) -> str:
    return f"{nbytes / 2**30:.1f} GiB" if nbytes >= 2**30 else f"{nbytes / 2**20:.1f} MiB"

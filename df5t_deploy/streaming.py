"""Streaming helpers: arrays as sources, and a reader thread that keeps the next planes ready."""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator, Sequence

import numpy as np

from .formats.base import ImageMeta, Source


class ArraySource(Source):
    """An in-memory YX image or ZYX stack seen as a Source."""

    def __init__(self, array: np.ndarray, meta: ImageMeta | None = None):
        if array.ndim not in (2, 3) or min(array.shape) < 1:
            raise ValueError(f"expected a YX image or a ZYX stack, got an array of shape {array.shape}")
        self.array, self.path = array, "<array>"
        self.shape, self.dtype = array.shape, array.dtype
        self.meta = meta or ImageMeta("ZYX" if array.ndim == 3 else "YX")

    def plane(self, z: int) -> np.ndarray:
        return self.array if self.array.ndim == 2 else self.array[z]

    def rows(self, y0: int, y1: int) -> np.ndarray:
        return self.array[:, y0:y1]


def prefetch(source: Source, planes: Sequence[int], group: int, depth: int = 2) -> Iterator[tuple[int, np.ndarray]]:
    """Yield (first plane index, planes [G, Y, X]) while a thread reads the next groups.

    Reading (and decompressing) overlaps the restoration; at most ``depth`` groups wait in
    memory. An error in the reader is raised here, in the consumer.
    """
    starts = list(range(0, len(planes), group))
    q: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def read() -> None:
        try:
            for i in starts:
                chunk = planes[i : i + group]
                item = (chunk[0], np.stack([source.plane(z) for z in chunk]))
                while not stop.is_set():
                    try:
                        q.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
        except BaseException as err:  # handed to the consumer
            q.put(err)

    thread = threading.Thread(target=read, name="df5t-reader", daemon=True)
    thread.start()
    try:
        for _ in starts:
            item = q.get()
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        thread.join(timeout=5)


class RoiSource(Source):
    """A box of another source (``--roi``): planes z0..z1, rows y0..y1, columns x0..x1 of it,
    half-open, in the input's coordinates; ``origin`` says where the box starts."""

    def __init__(self, inner: Source, roi: str):
        self.inner, self.path, self.dtype, self.meta = inner, inner.path, inner.dtype, inner.meta
        self.provenance = inner.provenance
        self.boxes = parse_roi(roi, inner.shape)
        self.origin = tuple(box.start for box in self.boxes)
        self.shape = tuple(box.stop - box.start for box in self.boxes)
        self._rows, self._cols = self.boxes[-2:]

    def plane(self, z: int) -> np.ndarray:
        first = self.boxes[0].start if len(self.shape) == 3 else 0
        return self.inner.plane(first + z)[self._rows, self._cols]

    def close(self) -> None:
        self.inner.close()


def parse_roi(text: str, shape: tuple[int, ...]) -> tuple[slice, ...]:
    """"z0:z1,y0:y1,x0:x1" (or "y0:y1,x0:x1" for an image) -> slices inside ``shape``; an
    omitted end means the edge. Boxes outside the input, or empty, are refused."""
    parts = text.split(",")
    if len(parts) != len(shape):
        axes = "z0:z1,y0:y1,x0:x1" if len(shape) == 3 else "y0:y1,x0:x1"
        raise ValueError(f"--roi {text!r}: give {axes} for a {len(shape)}-D input of shape {shape}")
    boxes = []
    for part, size, axis in zip(parts, shape, "zyx"[-len(shape):], strict=True):
        try:
            start_text, stop_text = part.split(":")
            start = int(start_text) if start_text.strip() else 0
            stop = int(stop_text) if stop_text.strip() else size
        except ValueError:
            raise ValueError(f"--roi {text!r}: {part!r} is not START:STOP (whole numbers, half-open)") from None
        if not 0 <= start < stop <= size:
            raise ValueError(f"--roi {text!r}: {axis} {start}:{stop} is empty or outside 0:{size}")
        boxes.append(slice(start, stop))
    return tuple(boxes)

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

"""Frames submitted to a ``Restorer`` while data is acquired: ``Restorer.submit``.

Two threads form a pipeline: one prepares the next frame (checks, intensity map, noise
estimate) while the other restores the current one, so the restoring thread, and a GPU
behind it, never waits for preparation. Frames finish in submission order. At most
``max_pending`` frames are in the queue (submitted, not finished): ``submit`` blocks when it
is full, or raises ``QueueFull`` when asked not to block.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

import numpy as np

#: Frames a Restorer holds (submitted, not finished) before ``submit`` blocks.
DEFAULT_MAX_PENDING = 4

_STOP = object()


class QueueFull(RuntimeError):
    """``submit(..., block=False)`` found ``max_pending`` frames already waiting."""


@dataclass
class _Frame:
    image: np.ndarray
    options: dict
    future: Future
    prepared: Any = None


class FrameQueue:
    """Restores submitted frames on two worker threads: ``prepare(image, options)`` on the
    first, ``restore(prepared)`` on the second; each frame's result or error goes to its
    future."""

    def __init__(self, prepare: Callable[[np.ndarray, dict], Any], restore: Callable[[Any], Any],
                 max_pending: int = DEFAULT_MAX_PENDING):
        if not isinstance(max_pending, int) or max_pending < 1:
            raise ValueError(f"max_pending must be a whole number of at least 1, got {max_pending!r}")
        self._prepare, self._restore = prepare, restore
        self._slots = threading.BoundedSemaphore(max_pending)
        self._to_prepare: queue.Queue = queue.Queue()
        self._to_restore: queue.Queue = queue.Queue()
        self._closed = False
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._preparing, name="df5t-prepare", daemon=True),
                         threading.Thread(target=self._restoring, name="df5t-restore", daemon=True)]
        for thread in self._threads:
            thread.start()

    def submit(self, image: np.ndarray, options: dict, block: bool = True, timeout: float | None = None) -> Future:
        if not self._slots.acquire(blocking=block, timeout=timeout if block else None):
            raise QueueFull(f"{self._pending()} frames are already waiting (max_pending); wait for one, or submit "
                            "with block=True")
        with self._lock:
            if self._closed:
                self._slots.release()
                raise RuntimeError("this Restorer is closed; frames can no longer be submitted")
            frame = _Frame(image, options, Future())
            frame.future.add_done_callback(lambda _: self._slots.release())
            self._to_prepare.put(frame)
        return frame.future

    def close(self, cancel_pending: bool = False) -> None:
        """Stop taking frames; finish those queued (or cancel those not yet started) and stop
        the threads."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._to_prepare.put(_STOP)
        if cancel_pending:
            for frame in list(self._to_prepare.queue) + list(self._to_restore.queue):
                if isinstance(frame, _Frame):
                    frame.future.cancel()
        for thread in self._threads:
            thread.join()

    def _pending(self) -> int:
        return self._to_prepare.qsize() + self._to_restore.qsize()

    def _preparing(self) -> None:
        while (frame := self._to_prepare.get()) is not _STOP:
            if not frame.future.cancelled():
                try:
                    frame.prepared = self._prepare(frame.image, frame.options)
                except BaseException as err:  # the frame's problem, handed to its future in order
                    frame.prepared = err
            self._to_restore.put(frame)
        self._to_restore.put(_STOP)

    def _restoring(self) -> None:
        while (frame := self._to_restore.get()) is not _STOP:
            if not frame.future.set_running_or_notify_cancel():
                continue
            try:
                if isinstance(frame.prepared, BaseException):
                    raise frame.prepared
                frame.future.set_result(self._restore(frame.prepared))
            except BaseException as err:  # every error reaches the caller through the future
                frame.future.set_exception(err)

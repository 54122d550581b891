"""Frames submitted to a ``Restorer`` while data is acquired: ``Restorer.submit``.

Two threads form a pipeline: one prepares the next frame (checks, intensity map, noise
estimate) while the other restores the current one, so the restoring thread, and a GPU
behind it, never waits for preparation. Consecutive frames already prepared when a walk
starts join it where they can (``joins``: the same shape and settings, and room left in the
backend's batch), so their tiles share network calls. Frames finish in submission order. At
most ``max_pending`` frames are in the queue (submitted, not finished): ``submit`` blocks
when it is full, or raises ``QueueFull`` when asked not to block.
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


#: Restores prepared frames together; returns their results in order.
RestoreTogether = Callable[[list[Any]], list[Any]]

#: Whether a prepared frame may join the prepared frames of a walk about to start.
Joins = Callable[[list[Any], Any], bool]


class FrameQueue:
    """Restores submitted frames on two worker threads: ``prepare(image, options)`` on the
    first, ``restore([prepared, ...])`` on the second, for a frame and the prepared frames
    that ``joins`` lets walk with it; each frame's result or error goes to its future. When a
    walk of several frames fails, each is restored again alone, so an error (or a
    cancellation by a frame's progress callback) reaches only the frame it belongs to."""

    def __init__(self, prepare: Callable[[np.ndarray, dict], Any], restore: RestoreTogether, joins: Joins,
                 max_pending: int = DEFAULT_MAX_PENDING):
        if not isinstance(max_pending, int) or max_pending < 1:
            raise ValueError(f"max_pending must be a whole number of at least 1, got {max_pending!r}")
        self._prepare, self._restore, self._joins = prepare, restore, joins
        self._held: _Frame | object | None = None  # taken from _to_restore, not yet started: goes first
        # Every future submitted and not done, wherever its frame is (queued, being prepared,
        # held): close(cancel_pending) must reach a frame the preparing thread holds, which is
        # in no queue at that moment.
        self._unfinished: set[Future] = set()
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
            self._unfinished.add(frame.future)
            frame.future.add_done_callback(self._finished)
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
            unfinished = list(self._unfinished)
        if cancel_pending:
            for future in unfinished:
                future.cancel()  # refused by a frame already being restored, which goes on
        for thread in self._threads:
            thread.join()

    def _finished(self, future: Future) -> None:
        with self._lock:
            self._unfinished.discard(future)
        self._slots.release()

    def _pending(self) -> int:
        with self._lock:
            return len(self._unfinished)

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
        while (frame := self._next_to_restore()) is not _STOP:
            if not frame.future.set_running_or_notify_cancel():
                continue
            if isinstance(frame.prepared, BaseException):
                frame.future.set_exception(frame.prepared)
                continue
            self._restore_group([frame, *self._companions(frame)])

    def _next_to_restore(self):
        held, self._held = self._held, None
        return held if held is not None else self._to_restore.get()

    def _companions(self, first: _Frame) -> list[_Frame]:
        """The frames after ``first`` that are already prepared and may join its walk, in
        order; the first that may not is held back for the next walk."""
        group = [first]
        while self._held is None and not self._to_restore.empty():
            frame = self._to_restore.get()
            if frame is not _STOP and frame.future.cancelled():  # cancelled while queued: never prepared
                frame.future.set_running_or_notify_cancel()
                continue
            if frame is _STOP or isinstance(frame.prepared, BaseException) or not self._may_join(group, frame):
                self._held = frame
            elif frame.future.set_running_or_notify_cancel():
                group.append(frame)
        return group[1:]

    def _may_join(self, group: list[_Frame], frame: _Frame) -> bool:
        try:
            return self._joins([f.prepared for f in group], frame.prepared)
        except Exception:  # the frame's problem: it walks alone and meets its error there
            return False

    def _restore_group(self, group: list[_Frame]) -> None:
        try:
            results = self._restore([frame.prepared for frame in group])
        except Exception as err:  # a walk of several frames is redone frame by frame
            if len(group) > 1:
                for frame in group:
                    self._restore_group([frame])
                return
            group[0].future.set_exception(err)
            return
        except BaseException as err:  # every error reaches the callers through the futures
            for frame in group:
                frame.future.set_exception(err)
            return
        for frame, result in zip(group, results, strict=True):
            frame.future.set_result(result)

"""Restorer.submit: frames queued while they are acquired, results in submission order and
identical to restore() of the same frame, a bounded queue, cancellation and clean closing."""

from __future__ import annotations

import threading
import time
from concurrent.futures import CancelledError

import numpy as np
import pytest

from df5t_deploy import QueueFull, Restorer
from df5t_deploy.frames import FrameQueue
from df5t_deploy.progress import RestorationCancelled


@pytest.fixture
def frames(mussel_tile3):
    return [mussel_tile3[50 * i : 50 * i + 48, 100:164] for i in range(6)]


def _restorer(model, **options) -> Restorer:
    return Restorer(model, **{"sigma0": 0.1, "steps": 2, "seed": 3, "samples": 1, **options})


def test_each_frame_equals_restore_of_that_frame_with_its_own_options(model, frames):
    with _restorer(model) as restorer:
        options = [{}, {"seed": 11}, {"sigma0": 0.3}, {"noise_std": 4.0}, {"samples": 2, "seed": 5}, {"seed": 2**40}]
        futures = [restorer.submit(frame, **option) for frame, option in zip(frames, options, strict=True)]
        results = [future.result(timeout=60) for future in futures]
        for frame, option, result in zip(frames, options, results, strict=True):
            np.testing.assert_array_equal(result.image, restorer.restore(frame, **option))
            assert result.provenance["seed"] == option.get("seed", 3)
        assert results[4].std is not None and results[0].std is None
        assert not np.array_equal(results[0].image, results[1].image)  # the per-call seed was used
        assert restorer.seed == 3 and restorer.samples == 1  # the Restorer's own settings are untouched


def test_frames_finish_in_submission_order(model, frames):
    finished: list[int] = []
    with _restorer(model) as restorer:
        futures = [restorer.submit(frame) for frame in frames]
        for index, future in enumerate(futures):
            future.add_done_callback(lambda _, index=index: finished.append(index))
        for future in futures:
            future.result(timeout=60)
    assert finished == list(range(len(frames)))


def _blocking_restorer(model, max_pending: int):
    """A restorer whose first frame waits until ``release`` is set."""
    release, started = threading.Event(), threading.Event()

    def hold(event):
        started.set()
        release.wait(30)

    return _restorer(model, max_pending=max_pending), release, started, hold


def test_a_full_queue_blocks_or_raises_and_a_queued_frame_can_be_cancelled(model, frames):
    restorer, release, started, hold = _blocking_restorer(model, max_pending=2)
    with restorer:
        running = restorer.submit(frames[0], progress=hold)
        assert started.wait(30)
        queued = restorer.submit(frames[1])
        with pytest.raises(QueueFull, match="max_pending"):
            restorer.submit(frames[2], block=False)
        with pytest.raises(QueueFull):
            restorer.submit(frames[2], timeout=0.2)
        assert queued.cancel() and not running.cancel()  # the running frame goes on
        later = restorer.submit(frames[2])  # the cancelled frame freed its place
        release.set()
        assert running.result(timeout=60).image.shape == frames[0].shape
        assert later.result(timeout=60).image.shape == frames[2].shape
        with pytest.raises(CancelledError):
            queued.result()


def test_errors_arrive_through_the_future_and_the_queue_goes_on(model, frames):
    with _restorer(model) as restorer:
        bad = restorer.submit(np.full((48, 64), 7, np.uint8))  # constant: nothing to restore
        nan = restorer.submit(np.full((48, 64), np.nan, np.float32))
        good = restorer.submit(frames[0])
        with pytest.raises(ValueError, match="constant"):
            bad.result(timeout=60)
        with pytest.raises(ValueError):
            nan.result(timeout=60)
        np.testing.assert_array_equal(good.result(timeout=60).image, restorer.restore(frames[0]))
        with pytest.raises(TypeError, match="per-call options"):
            restorer.submit(frames[0], steps=5)  # not a per-call option: the caller's error, raised now


def test_close_drains_and_an_exception_in_with_cancels(model, frames):
    restorer = _restorer(model)
    futures = [restorer.submit(frame) for frame in frames[:3]]
    restorer.close()
    assert all(future.done() and not future.cancelled() for future in futures)
    with pytest.raises(RuntimeError, match="closed"):
        restorer.submit(frames[0])

    restorer, release, started, hold = _blocking_restorer(model, max_pending=4)
    with pytest.raises(KeyError):
        with restorer:
            running = restorer.submit(frames[0], progress=hold)
            assert started.wait(30)  # before the others are queued, else they may join its walk
            queued = [restorer.submit(frame) for frame in frames[1:3]]
            threading.Timer(0.5, release.set).start()
            raise KeyError("the acquisition failed")
    assert running.result(timeout=1).image.shape == frames[0].shape
    assert all(future.cancelled() for future in queued)


def test_closing_with_cancel_reaches_a_frame_being_prepared():
    """A frame the preparing thread holds is in neither queue; cancelling must still reach it
    (it once escaped and was restored after the caller's exception)."""
    preparing, release, restored = threading.Event(), threading.Event(), []

    def prepare(image, options):
        preparing.set()
        release.wait(30)
        return image

    frames = FrameQueue(prepare, lambda group: restored.extend(group) or group, lambda group, frame: False)
    future = frames.submit(np.zeros((4, 4)), {})
    assert preparing.wait(30)
    threading.Timer(0.2, release.set).start()
    frames.close(cancel_pending=True)
    assert future.cancelled() and restored == []


# ------------------------------------------------------------------ frames walked together


class CallLog:
    """The bundled model on onnxruntime (a real convolutional network, whose rounding changes
    with the batch shape), logging the tiles of every network call."""

    def __init__(self):
        from df5t_deploy.backends.onnxruntime_backend import OnnxRuntimeBackend
        from df5t_deploy.models import default_model_path

        self.inner = OnnxRuntimeBackend(default_model_path())
        self.name, self.info, self.preferred_batch = self.inner.name, self.inner.info, 4
        self.calls: list[int] = []

    def __call__(self, x, t):
        self.calls.append(len(x))
        return self.inner(x, t)

    def close(self):
        self.inner.close()


@pytest.fixture
def small_frames(mussel_tile3):
    """64 x 64 frames: one tile of the bundled model each, so four fill a call of batch 4."""
    return [mussel_tile3[64 * i : 64 * i + 64, 300:364] for i in range(6)]


def _held_first(restorer: Restorer, frames, options, progress=None):
    """Submit frames[0] with a progress callback that holds its walk, then the rest, and let
    it go once they are all prepared: they walk after it, together as far as they may."""
    started, release = threading.Event(), threading.Event()

    def hold(_):
        started.set()
        release.wait(60)

    first = restorer.submit(frames[0], progress=hold, **options[0])
    assert started.wait(60)
    rest = [restorer.submit(frame, progress=progress(index) if progress else None, **option)
            for index, (frame, option) in enumerate(zip(frames[1:], options[1:], strict=True), 1)]
    _wait_until(lambda: restorer._frames._to_restore.qsize() == len(rest))  # the queue's own state
    release.set()
    return [first, *rest]


def _wait_until(condition, seconds: float = 60) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def test_queued_frames_share_network_calls_and_each_equals_restore_of_it(small_frames):
    backend = CallLog()
    steps = 3
    options = [{}, {"seed": 11}, {"seed": 2**40}, {}, {"seed": 5}, {"samples": 2}]
    with Restorer(backend=backend, sigma0=0.1, steps=steps, seed=3, samples=1, max_pending=8) as restorer:
        futures = _held_first(restorer, small_frames, options)
        results = [future.result(timeout=120) for future in futures]
        # frame 0 alone (its walk was held), frames 1-4 in one walk (batch 4, a tile each),
        # frame 5 alone (two samples: other sampler states); a matched walk calls the network `steps` times
        assert backend.calls == [4] * steps + [4] * steps + [4] * steps
        backend.calls.clear()
        for frame, option, result in zip(small_frames, options, results, strict=True):
            alone = restorer.restore_full(frame, **option)
            assert result.image.tobytes() == alone.image.tobytes()
            assert result.provenance == alone.provenance
        assert backend.calls == [4] * 6 * steps  # alone, each pads its one tile to the batch
        assert len({result.image.tobytes() for result in results[:5]}) == 5


def test_a_frame_that_fails_or_cancels_in_a_shared_walk_fails_alone(small_frames):
    frames = list(small_frames[:4])
    frames[2] = frames[2].astype(np.float32)
    frames[2][5, 5] = np.nan  # found when the walk measures it
    seen = []

    def cancel_frame_3(progress):
        seen.append(progress)
        return False

    with Restorer(backend=CallLog(), sigma0=0.1, steps=2, seed=3) as restorer:
        futures = _held_first(restorer, frames, [{}] * 4, lambda index: cancel_frame_3 if index == 3 else None)
        futures[0].result(timeout=60)
        np.testing.assert_array_equal(futures[1].result(timeout=60).image, restorer.restore(frames[1]))
        with pytest.raises(ValueError, match="NaN"):
            futures[2].result(timeout=60)
        with pytest.raises(RestorationCancelled):
            futures[3].result(timeout=60)
    assert seen[0].tiles_total == seen[-1].tiles_total  # the frame's own share, walked together or alone

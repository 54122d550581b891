"""Restorer.submit: frames queued while they are acquired, results in submission order and
identical to restore() of the same frame, a bounded queue, cancellation and clean closing."""

from __future__ import annotations

import threading
from concurrent.futures import CancelledError

import numpy as np
import pytest

from df5t_deploy import QueueFull, Restorer


@pytest.fixture
def frames(mussel_tile3):
    return [mussel_tile3[50 * i : 50 * i + 48, 100:164] for i in range(6)]


def _restorer(model, **options) -> Restorer:
    return Restorer(model, sigma0=0.1, steps=2, seed=3, **options)


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
            queued = [restorer.submit(frame) for frame in frames[1:3]]
            assert started.wait(30)
            threading.Timer(0.5, release.set).start()
            raise KeyError("the acquisition failed")
    assert running.result(timeout=1).image.shape == frames[0].shape
    assert all(future.cancelled() for future in queued)

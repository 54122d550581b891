"""A whole run is split into tasks (planes, super-tile regions, isotropic slabs) that leave
done-markers in the unfinished output; a resumed run redoes only the tasks that had not
finished, and its result is the uninterrupted run's, bit for bit."""

from __future__ import annotations

import numpy as np
import pytest

from df5t_deploy import Restorer
from df5t_deploy.formats import ImageMeta, read_image, write_image
from df5t_deploy.pipeline import restore_file
from df5t_deploy.progress import RestorationCancelled


def _restorer(model, **options) -> Restorer:
    return Restorer(model, **{"sigma0": 0.1, "steps": 2, "seed": 5, "samples": 1, **options})


def _cancel_at(tiles: int):
    return lambda event: event.tiles_done < tiles


def _counting_planes_started(restorer: Restorer) -> list[int]:
    """Record how many planes each walk the restorer starts restores."""
    started: list[int] = []
    real_start = restorer.walker.start

    def start(y, *args, **kwargs):
        started.append(len(y))
        return real_start(y, *args, **kwargs)

    restorer.walker.start = start
    return started


def _done_markers(tmp_path) -> set[str]:
    (partial,) = tmp_path.glob(".out.zarr.partial-*")
    return {marker.name for marker in (partial / ".df5t-tasks" / "done").iterdir()}


def _interrupted(model, source, tmp_path, cancel_at_tiles: int, **options) -> set[str]:
    with pytest.raises(RestorationCancelled):
        restore_file(_restorer(model, **options), source, tmp_path / "out.zarr", progress=_cancel_at(cancel_at_tiles))
    return _done_markers(tmp_path)


def _check_same_as_uninterrupted(model, source, tmp_path, **options) -> None:
    restore_file(_restorer(model, **options), source, tmp_path / "whole.tif")
    np.testing.assert_array_equal(read_image(tmp_path / "out.zarr")[0], read_image(tmp_path / "whole.tif")[0])
    assert not list(tmp_path.glob(".*")), "the resumed output left its partial folder behind"
    assert not (tmp_path / "out.zarr" / ".df5t-tasks").exists(), "the finished output kept its task store"


def test_a_large_plane_resumes_from_its_finished_regions(model, mussel_tile3, tmp_path):
    source = tmp_path / "plane.tif"
    write_image(source, mussel_tile3[:160, :160], ImageMeta("YX"))
    done = _interrupted(model, source, tmp_path, cancel_at_tiles=110, max_region=128)  # 50 tiles a region
    regions = sorted(name for name in done if name.startswith("region-"))
    assert regions and len(regions) < 4 and "plane-000000" not in done, done  # a 2 x 2 layout, stopped inside it

    resumed = _restorer(model, max_region=128)
    started = _counting_planes_started(resumed)
    restore_file(resumed, source, tmp_path / "out.zarr", resume=True)
    assert len(started) == 4 - len(regions), "finished regions were restored again"
    _check_same_as_uninterrupted(model, source, tmp_path, max_region=128)


def test_a_stack_resumes_from_its_written_planes_with_another_batch_size(model, mussel_tile3, tmp_path):
    source = tmp_path / "stack.tif"
    write_image(source, np.stack([mussel_tile3[40 * i : 40 * i + 48, :64] for i in range(6)]), ImageMeta("ZYX"))
    done = _interrupted(model, source, tmp_path, cancel_at_tiles=30, batch=1)
    planes = sorted(name for name in done if name.startswith("plane-"))
    assert 0 < len(planes) < 6, done

    resumed = _restorer(model, batch=8)  # how the work is batched is no part of the task layout
    started = _counting_planes_started(resumed)
    restore_file(resumed, source, tmp_path / "out.zarr", resume=True)
    assert sum(started) == 6 - len(planes), "written planes were restored again"
    _check_same_as_uninterrupted(model, source, tmp_path)


def test_an_isotropic_run_resumes_from_its_finished_slabs(model, mussel_tile3, tmp_path, monkeypatch):
    monkeypatch.setattr("df5t_deploy.work.SLAB_PIXELS", 6 * 48 * 8)  # slabs of 8 rows or columns
    source = tmp_path / "volume.tif"
    write_image(source, np.stack([mussel_tile3[30 * i : 30 * i + 48, :48] for i in range(6)]), ImageMeta("ZYX"))
    options = {"task": "isotropic", "z_factor": 2}

    def cancel_in_the_yz_pass(event):
        return event.planes_done < 48 + 16  # every XZ plane (48 rows), then into the YZ pass

    with pytest.raises(RestorationCancelled):
        restore_file(_restorer(model, **options), source, tmp_path / "out.zarr", progress=cancel_in_the_yz_pass)
    done = _done_markers(tmp_path)
    assert {f"xz-{y:06d}-{y + 8:06d}" for y in range(0, 48, 8)} <= done, done
    yz_done = sorted(name for name in done if name.startswith("yz-"))
    assert 1 <= len(yz_done) < 6 and not any(name.startswith("plane-") for name in done), done

    resumed = _restorer(model, **options)
    started = _counting_planes_started(resumed)
    restore_file(resumed, source, tmp_path / "out.zarr", resume=True)
    assert sum(started) == 48 - 8 * len(yz_done), "finished slabs were restored again"
    _check_same_as_uninterrupted(model, source, tmp_path, **options)


def test_an_isotropic_run_refuses_to_start_without_scratch_space(model, mussel_tile3, tmp_path, monkeypatch):
    import shutil

    write_image(tmp_path / "volume.tif", np.stack([mussel_tile3[:40, :48]] * 4), ImageMeta("ZYX"))
    monkeypatch.setattr(shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10**12, 10**12 - 1000, 1000))
    with pytest.raises(OSError, match=r"the isotropic passes need 0\.1 MiB of scratch space .* only 0\.0 MiB is free"):
        restore_file(_restorer(model, task="isotropic", z_factor=2), tmp_path / "volume.tif", tmp_path / "out.zarr")
    assert not (tmp_path / "out.zarr").exists()

"""Chunked volumes: a box of the input (--roi), and OME-Zarr outputs with chosen chunks and a
multiscale pyramid that viewers open."""

from __future__ import annotations

import numpy as np
import pytest
import tifffile
from click.testing import CliRunner

from df5t_deploy.cli import main
from df5t_deploy.formats import read_provenance


@pytest.fixture
def stack(tmp_path, mussel_tile3):
    volume = np.stack([mussel_tile3[60 * i : 60 * i + 70, 100:190] for i in range(5)])
    tifffile.imwrite(tmp_path / "stack.tif", volume, photometric="minisblack")
    return volume


def restore(model, *args):
    result = CliRunner().invoke(main, ["restore", *map(str, args), "--model", str(model), "--sigma0", "0.1",
                                       "--steps", "2", "--seed", "7", "--quiet"])
    return result.exit_code, result.output


def test_a_roi_is_the_restoration_of_that_box_and_records_its_origin(model, stack, tmp_path):
    code, output = restore(model, tmp_path / "stack.tif", "-o", tmp_path / "roi.tif", "--roi", "1:4,10:60,20:84")
    assert code == 0, output
    tifffile.imwrite(tmp_path / "box.tif", stack[1:4, 10:60, 20:84], photometric="minisblack")
    assert restore(model, tmp_path / "box.tif", "-o", tmp_path / "box_out.tif")[0] == 0
    np.testing.assert_array_equal(tifffile.imread(tmp_path / "roi.tif"), tifffile.imread(tmp_path / "box_out.tif"))
    assert read_provenance(tmp_path / "roi.tif")["roi"] == {"origin": [1, 10, 20], "shape": [3, 50, 64]}


@pytest.mark.parametrize("roi, message", [("1:4,10:60", "give z0:z1,y0:y1,x0:x1"), ("1:9,0:70,0:90", "outside 0:5"),
                                          ("3:3,0:70,0:90", "empty"), ("a:b,0:70,0:90", "is not START:STOP")])
def test_bad_rois_are_refused_before_any_work(model, stack, tmp_path, roi, message):
    code, output = restore(model, tmp_path / "stack.tif", "-o", tmp_path / "out.tif", "--roi", roi)
    assert code == 2 and message in output, output


def test_a_zarr_output_has_the_chunks_and_the_pyramid_asked_for(model, stack, tmp_path):
    import zarr

    out = tmp_path / "out.zarr"
    code, output = restore(model, tmp_path / "stack.tif", "-o", out, "--chunks", "1,32,48", "--pyramid", "2",
                           "--roi", "0:5,2:70,0:90")
    assert code == 0, output
    group = zarr.open(str(out))
    full, half, quarter = (np.asarray(group[level][:]) for level in ("0", "1", "2"))
    assert group["0"].chunks == (1, 32, 48) and full.shape == (5, 68, 90)
    expected_half = np.rint(full.reshape(5, 34, 2, 45, 2).mean(axis=(2, 4))).astype(np.uint8)
    np.testing.assert_array_equal(half, expected_half)
    assert quarter.shape == (5, 17, 22)
    assert group.attrs["ome"]["version"] == "0.5"  # NGFF 0.5 on zarr v3
    datasets = group.attrs["ome"]["multiscales"][0]["datasets"]
    assert [d["path"] for d in datasets] == ["0", "1", "2"]
    assert datasets[1]["coordinateTransformations"][0]["scale"] == [1.0, 2.0, 2.0]
    assert datasets[0]["coordinateTransformations"][1]["translation"] == [0.0, 2.0, 0.0]  # the roi's origin


def test_chunks_and_pyramid_need_a_zarr_output(model, stack, tmp_path):
    code, output = restore(model, tmp_path / "stack.tif", "-o", tmp_path / "out.tif", "--pyramid", "1")
    assert code == 2 and "zarr outputs only" in output, output
    code, output = restore(model, tmp_path / "stack.tif", "-o", tmp_path / "o.zarr", "--chunks", "1,x")
    assert code == 2 and "--chunks" in output, output

"""Every format round-trips shape, dtype, axes and voxel size; broken files give clear errors."""

from __future__ import annotations

import numpy as np
import pytest
import tifffile

from df5t_deploy.formats import (
    ImageFormatError,
    ImageMeta,
    create_sink,
    open_source,
    read_image,
    write_image,
)

VOXEL_3D = (4.0, 4.0, 40.0)
VOXEL_2D = (2.5, 3.5, None)


def _data(dtype, shape):
    rng = np.random.default_rng(0)
    if np.dtype(dtype).kind == "f":
        return rng.standard_normal(shape).astype(dtype)
    return rng.integers(0, np.iinfo(dtype).max, shape, endpoint=True).astype(dtype)


@pytest.mark.parametrize("name", ["out.tif", "out.ome.tif", "out.mrc", "out.zarr"])
@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.float32])
@pytest.mark.parametrize("shape", [(5, 24, 32), (24, 32)], ids=["ZYX", "YX"])
def test_round_trip(tmp_path, name, dtype, shape):
    array = _data(dtype, shape)
    meta = ImageMeta("ZYX" if len(shape) == 3 else "YX", VOXEL_3D if len(shape) == 3 else VOXEL_2D)
    write_image(tmp_path / name, array, meta, {"task": "denoise", "seed": 3})
    back, back_meta = read_image(tmp_path / name)
    assert back.dtype == array.dtype and back.shape == array.shape
    np.testing.assert_array_equal(back, array)
    assert back_meta.axes == meta.axes
    assert back_meta.voxel_size_nm == pytest.approx(meta.voxel_size_nm)
    assert sorted(p.name for p in tmp_path.iterdir()) == [name]  # no temporary left


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16])
def test_png_round_trip(tmp_path, dtype):
    array = _data(dtype, (20, 30))
    write_image(tmp_path / "a.png", array, ImageMeta("YX"))
    back, meta = read_image(tmp_path / "a.png")
    np.testing.assert_array_equal(back, array)
    assert back.dtype == dtype and meta.axes == "YX"


def test_bigtiff_is_chosen_for_huge_outputs(tmp_path, monkeypatch):
    import df5t_deploy.formats.tiff as tiff

    monkeypatch.setattr(tiff, "_BIGTIFF_BYTES", 100)
    write_image(tmp_path / "big.tif", _data(np.uint8, (3, 20, 20)), ImageMeta("ZYX", VOXEL_3D))
    with tifffile.TiffFile(tmp_path / "big.tif") as tif:
        assert tif.is_bigtiff
    assert read_image(tmp_path / "big.tif")[1].voxel_size_nm == VOXEL_3D


def test_reads_the_shared_data_voxel_size(em_dir):
    with open_source(em_dir / "sstem_isbi2012_30x512x512.tif") as source:
        assert source.shape == (30, 512, 512) and source.meta.voxel_size_nm == (4, 4, 50)
        assert source.plane(29).shape == (512, 512)


def test_truncated_tiff(tmp_path):
    path = tmp_path / "a.tif"
    write_image(path, _data(np.uint8, (4, 64, 64)), ImageMeta("ZYX"))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 3])
    with pytest.raises(ImageFormatError, match="truncated"):
        read_image(path)


def test_mrc_with_a_bad_header(tmp_path):
    path = tmp_path / "a.mrc"
    write_image(path, _data(np.float32, (2, 16, 16)), ImageMeta("ZYX"))
    raw = bytearray(path.read_bytes())
    raw[208:212] = b"XXXX"  # the MAP identifier
    path.write_bytes(bytes(raw))
    with pytest.raises(ImageFormatError, match="not a valid MRC"):
        read_image(path)


@pytest.mark.parametrize("name", ["a.tif", "a.zarr"])
def test_4d_arrays_are_refused(tmp_path, name):
    array = _data(np.uint8, (2, 4, 8, 8))
    if name.endswith(".tif"):
        tifffile.imwrite(tmp_path / name, array, photometric="minisblack")
    else:
        import zarr

        zarr.create_array(str(tmp_path / name), shape=array.shape, dtype=array.dtype)[...] = array
    with pytest.raises(ImageFormatError, match="expected a grey YX image or a ZYX stack"):
        read_image(tmp_path / name)


def test_unsupported_suffix(tmp_path):
    with pytest.raises(ImageFormatError, match="unsupported file type .jpg"):
        read_image(tmp_path / "a.jpg")


@pytest.mark.parametrize("name", ["out.tif", "out.mrc", "out.png"])
def test_interrupted_write_leaves_nothing(tmp_path, name):
    shape = (24, 32) if name.endswith(".png") else (3, 24, 32)
    with pytest.raises(KeyboardInterrupt):
        with create_sink(tmp_path / name, shape, np.uint8, ImageMeta("YX")) as sink:
            sink.write_plane(np.zeros(shape[-2:], np.uint8))
            raise KeyboardInterrupt
    assert list(tmp_path.iterdir()) == []


def test_incomplete_write_is_an_error_and_leaves_nothing(tmp_path):
    with pytest.raises(ValueError, match="only 1 of 3 planes"):
        with create_sink(tmp_path / "a.tif", (3, 8, 8), np.uint8, ImageMeta("ZYX")) as sink:
            sink.write_plane(np.zeros((8, 8), np.uint8))
    assert list(tmp_path.iterdir()) == []


def test_zarr_resume_continues_where_it_stopped(tmp_path):
    volume = _data(np.uint16, (4, 8, 8))
    with pytest.raises(KeyboardInterrupt):
        with create_sink(tmp_path / "v.zarr", volume.shape, volume.dtype, ImageMeta("ZYX")) as sink:
            sink.write_plane(volume[0])
            sink.write_plane(volume[1])
            raise KeyboardInterrupt
    assert not (tmp_path / "v.zarr").exists()  # only the hidden partial store is left
    with create_sink(tmp_path / "v.zarr", volume.shape, volume.dtype, ImageMeta("ZYX"), resume=True) as sink:
        assert sink.written == 2
        for plane in volume[2:]:
            sink.write_plane(plane)
    np.testing.assert_array_equal(read_image(tmp_path / "v.zarr")[0], volume)
    assert [p.name for p in tmp_path.iterdir()] == ["v.zarr"]


def test_mrc_header_statistics_are_gathered_plane_by_plane(tmp_path):
    import mrcfile

    volume = (np.random.default_rng(3).random((3, 20, 30)) * 200).astype(np.float32)
    write_image(tmp_path / "v.mrc", volume, ImageMeta("ZYX"))
    with mrcfile.open(tmp_path / "v.mrc") as mrc:
        header = mrc.header
        np.testing.assert_allclose([header.dmin, header.dmax, header.dmean, header.rms],
                                   [volume.min(), volume.max(), volume.mean(), volume.std()], rtol=1e-5)

"""Stacks and volumes: every plane restored, 3D isotropic restoration, bounded memory."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import numpy as np
import pytest
import tifffile
from click.testing import CliRunner
from onnx_models import gaussian_prior_denoiser, tile_mean_model

from df5t_deploy.api import Restorer
from df5t_deploy.cli import main
from df5t_deploy.formats import ImageMeta, open_source, read_image, write_image
from df5t_deploy.progress import RestorationCancelled


def cli(*args):
    result = CliRunner().invoke(main, [str(a) for a in args])
    return result.exit_code, result.output


@pytest.fixture(scope="module")
def flyem(em_dir):
    return tifffile.imread(em_dir / "fibsem_isotropic_flyem-medulla_256x256x256.tif")


@pytest.fixture(scope="module")
def prior_model(tmp_path_factory):
    return gaussian_prior_denoiser(tmp_path_factory.mktemp("m") / "prior32.onnx", 32, prior_std=1.0)


def test_stack_planes_are_restored_as_2d_images(tmp_path, flyem):
    model = tile_mean_model(tmp_path / "mean.onnx", 32)
    stack = flyem[:3, :40, :48]
    restorer = Restorer(model, sigma0=0.1, steps=5, seed=2)
    whole = restorer.restore(stack)
    assert whole.shape == stack.shape and whole.dtype == np.uint8
    # plane 0 of a stack and a 2D image share the noise counters of plane 0 (and, for uint8,
    # the intensity map); the other planes draw their own noise
    alone = Restorer(model, sigma0=0.1, steps=5, seed=2).restore(stack[0])
    np.testing.assert_array_equal(whole[0], alone)
    noise_only = Restorer(model, sigma0=0.1, steps=5, seed=2).restore(np.stack([stack[0]] * 2))
    assert np.abs(noise_only[0].astype(int) - noise_only[1].astype(int)).mean() > 1


def test_planes_grouped_into_one_batch_give_the_same_result(tmp_path, flyem):
    model = tile_mean_model(tmp_path / "mean.onnx", 32)
    stack = flyem[:4, :32, :32].astype(np.float32)  # one tile per plane
    one = Restorer(model, sigma0=0.1, steps=5, samples=1, batch=1).restore(stack)
    grouped_restorer = Restorer(model, sigma0=0.1, steps=5, samples=1, batch=4)
    assert grouped_restorer.group_size((32, 32)) == 4
    grouped = grouped_restorer.restore(stack)
    assert np.abs(one - grouped).max() / np.ptp(stack) < 1e-4


def test_isotropic_restoration_of_a_subsampled_fibsem_volume(tmp_path, flyem, prior_model):
    k = 4
    truth = flyem[:64, 96:160, 96:160]
    write_image(tmp_path / "iso.tif", truth, ImageMeta("ZYX", (10.0, 10.0, 10.0)))
    code, output = cli("degrade", tmp_path / "iso.tif", "-o", tmp_path / "aniso.tif", "--task", "isotropic",
                       "--z-factor", k, "--sigma0", "0.02", "--seed", "1")
    assert code == 0, output
    acquired, meta = read_image(tmp_path / "aniso.tif")
    assert acquired.shape == (16, 64, 64) and meta.voxel_size_nm == (10.0, 10.0, 40.0)
    code, output = cli("restore", tmp_path / "aniso.tif", "-o", tmp_path / "restored.tif", "--task", "isotropic",
                       "--model", prior_model, "--sigma0", "0.02", "--steps", "8", "--quiet")
    assert code == 0, output  # k = 4 came from the voxel size
    restored, meta = read_image(tmp_path / "restored.tif")
    assert restored.shape == truth.shape and restored.dtype == np.uint8
    assert meta.voxel_size_nm == (10.0, 10.0, 10.0)
    # acquired plane i is the mean of restored planes [i*k, (i+1)*k): alignment, not a shift
    block_means = restored.astype(np.float64).reshape(16, k, 64, 64).mean(axis=1)
    # (a toy Gaussian prior, so only approximately: the final clamp to [0, 1] is not linear)
    errors = {shift: np.abs(np.roll(block_means, shift, axis=0)[1:-1] - acquired[1:-1]).mean() for shift in (-1, 0, 1)}
    assert errors[0] < 0.75 * min(errors[-1], errors[1]), errors


def test_isotropic_needs_a_z_factor(tmp_path, flyem, prior_model):
    write_image(tmp_path / "v.tif", flyem[:8, :32, :32], ImageMeta("ZYX", (10.0, 10.0, 25.0)))
    code, output = cli("restore", tmp_path / "v.tif", "-o", tmp_path / "o.tif", "--task", "isotropic",
                       "--model", prior_model, "--sigma0", "0.1")
    assert code != 0 and "z/x = 2.5, not an integer" in output and "--z-factor" in output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["v.tif"]


def test_the_uncertainty_file_is_float32_and_says_what_it_holds(tmp_path, flyem, prior_model):
    """Its values are checked against the individual samples in test_promises."""
    write_image(tmp_path / "in.tif", flyem[0, :48, :48], ImageMeta("YX"))
    code, output = cli("restore", tmp_path / "in.tif", "-o", tmp_path / "mean.tif", "--model", prior_model,
                       "--sigma0", "0.2", "--steps", "6", "--samples", "3", "--uncertainty", tmp_path / "std.tif",
                       "--quiet")
    assert code == 0, output
    std, _ = read_image(tmp_path / "std.tif")
    assert std.dtype == np.float32 and std.shape == (48, 48) and std.min() >= 0
    with tifffile.TiffFile(tmp_path / "std.tif") as tif:
        assert "std over 3 samples" in tif.shaped_metadata[0]["df5t"]["quantity"]


def test_progress_callback_can_cancel(tmp_path, flyem, prior_model):
    events = []

    def stop_after_two(event):
        events.append(event)
        return len(events) < 3

    with pytest.raises(RestorationCancelled):
        Restorer(prior_model, sigma0=0.1, steps=10).restore(flyem[:2, :40, :40], progress=stop_after_two)
    assert events[-1].tiles_total > events[-1].tiles_done > 0


_MEASURE = textwrap.dedent("""
    import resource, sys
    from df5t_deploy.cli import main
    main(sys.argv[1:], standalone_mode=False)
    print("PEAK_RSS_KB", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
""")


@pytest.mark.slow
@pytest.mark.parametrize("suffix", [".tif", ".zarr", ".mrc"])
def test_memory_is_bounded_by_a_plane_not_the_stack(tmp_path, flyem, suffix):
    """Peak RSS for 256 planes of 512 x 512 exceeds the 32-plane peak by < 32 MB, read from and
    written to TIFF, zarr and MRC alike: holding the 224 more planes whole, even as 8-bit input
    or output alone, would add 56 MB."""
    model = tile_mean_model(tmp_path / "m512.onnx", 512)
    plane = np.tile(flyem[100], (2, 2))
    peaks = {}
    for planes in (32, 256):
        path = tmp_path / f"stack{planes}{suffix}"
        write_image(path, np.broadcast_to(plane, (planes, 512, 512)), ImageMeta("ZYX"))
        out_path = tmp_path / f"out{planes}{suffix}"
        out = subprocess.run(
            [sys.executable, "-c", _MEASURE, "restore", str(path), "-o", str(out_path),
             "--model", str(model), "--sigma0", "0.1", "--steps", "1", "--samples", "1", "--quiet"],
            capture_output=True, text=True, check=True,
        )
        peaks[planes] = int(out.stdout.split("PEAK_RSS_KB")[1]) / 1024
        with open_source(out_path) as restored:
            assert restored.shape == (planes, 512, 512)
    assert peaks[256] - peaks[32] < 32, peaks


def test_interrupted_zarr_output_resumes_to_the_same_result(tmp_path, flyem):
    from df5t_deploy.pipeline import restore_file

    model = tile_mean_model(tmp_path / "mean.onnx", 32)
    write_image(tmp_path / "in.tif", flyem[:5, :32, :40], ImageMeta("ZYX", (10.0, 10.0, 10.0)))

    def restorer():
        return Restorer(model, sigma0=0.1, steps=3, seed=4)

    def interrupt_after_two(event):
        if event.planes_done == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        restore_file(restorer(), tmp_path / "in.tif", tmp_path / "out.zarr", progress=interrupt_after_two)
    assert not (tmp_path / "out.zarr").exists()
    restore_file(restorer(), tmp_path / "in.tif", tmp_path / "out.zarr", resume=True)
    restore_file(restorer(), tmp_path / "in.tif", tmp_path / "whole.tif")
    resumed, meta = read_image(tmp_path / "out.zarr")
    np.testing.assert_array_equal(resumed, read_image(tmp_path / "whole.tif")[0])
    assert meta.voxel_size_nm == (10.0, 10.0, 10.0)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.tif", "mean.onnx", "out.zarr", "whole.tif"]


def test_several_workers_share_a_stack_with_the_same_result(tmp_path, flyem):
    """One Restorer per device; here two CPU ones stand in for two GPUs."""
    from df5t_deploy.cli import parse_devices
    from df5t_deploy.pipeline import restore_file

    model = tile_mean_model(tmp_path / "mean.onnx", 32)
    write_image(tmp_path / "in.tif", flyem[:7, :32, :40], ImageMeta("ZYX", (10.0, 10.0, 10.0)))
    events = []
    workers = [Restorer(model, sigma0=0.1, steps=3, seed=4, threads=1) for _ in range(2)]
    restore_file(workers, tmp_path / "in.tif", tmp_path / "two.tif", progress=events.append)
    restore_file(Restorer(model, sigma0=0.1, steps=3, seed=4), tmp_path / "in.tif", tmp_path / "one.tif")
    np.testing.assert_array_equal(read_image(tmp_path / "two.tif")[0], read_image(tmp_path / "one.tif")[0])
    assert events[-1].planes_done == events[-1].planes_total == 7
    assert parse_devices("cuda:0,1") == ["cuda:0", "cuda:1"] and parse_devices("cpu") == ["cpu"]

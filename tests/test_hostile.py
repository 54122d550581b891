"""Hostile and careless use: nothing a run reads or did not create is ever lost, runs know
who they are, bad input is refused before compute with one line and exit status 2, and
faults (full disk, signals) leave nothing partial. Each test fails without its mechanism."""

from __future__ import annotations

import errno
import json
import os
import signal
import socket
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import tifffile
from click.testing import CliRunner
from onnx_models import tile_mean_model, with_metadata

from df5t_deploy.api import Restorer
from df5t_deploy.cli import main
from df5t_deploy.formats import ImageMeta, write_image
from df5t_deploy.output_safety import lock_path

TILE = 32


@pytest.fixture
def work(tmp_path, mussel_tile3) -> Path:
    """A folder with a real EM crop ``in.tif`` and a 3-plane stack ``stack.tif``."""
    tifffile.imwrite(tmp_path / "in.tif", mussel_tile3[400:448, 600:640])
    tifffile.imwrite(tmp_path / "stack.tif", np.stack([mussel_tile3[400 + 50 * i : 448 + 50 * i, 600:640] for i in range(3)]),
                     photometric="minisblack")
    return tmp_path


def cli(*args):
    result = CliRunner().invoke(main, [str(a) for a in args])
    return result.exit_code, result.output


def restore(work: Path, model: Path, *args, source: str = "in.tif"):
    return cli("restore", work / source, "--model", model, "--sigma0", "0.1", "--steps", "2", "--quiet", *args)


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# ------------------------------------------------------------------ data loss


def test_a_zarr_output_whose_folder_holds_the_input_is_refused_and_deletes_nothing(work, model):
    store = work / "data.zarr"
    store.mkdir()
    (store / "in.tif").write_bytes((work / "in.tif").read_bytes())
    before = snapshot(work)
    code, output = restore(work, model, "-o", store, source="data.zarr/in.tif")
    assert code == 2 and "holds the input" in output, output
    assert snapshot(work) == before


def test_degrade_save_mask_onto_the_input_is_refused(work):
    before = snapshot(work)
    code, output = cli("degrade", work / "in.tif", "-o", work / "deg.tif", "--task", "inpaint", "--sigma0", "0.1",
                       "--save-mask", work / "in.tif")
    assert code == 2 and "--save-mask" in output and "is the input" in output, output
    assert snapshot(work) == before


@pytest.mark.parametrize("case", ["output is the mask", "output is the model", "uncertainty is the input",
                                  "uncertainty is the output", "hard link to the input", "symlink to the input",
                                  "inside a zarr input"])
def test_outputs_never_alias_what_the_run_reads(work, model, case):
    mask = work / "mask.tif"
    tifffile.imwrite(mask, np.zeros((48, 40), np.uint8))
    local_model = work / "model.onnx"
    local_model.write_bytes(model.read_bytes())
    os.link(work / "in.tif", work / "hard.tif")
    os.symlink(work / "in.tif", work / "soft.tif")
    write_image(work / "input.zarr", tifffile.imread(work / "in.tif"), ImageMeta("YX"), {"note": "input"})
    args = {
        "output is the mask": ["-o", mask, "--task", "inpaint", "--mask", mask],
        "output is the model": ["-o", local_model.with_suffix(".onnx")],
        "uncertainty is the input": ["-o", work / "out.tif", "--samples", "2", "--uncertainty", work / "in.tif"],
        "uncertainty is the output": ["-o", work / "out.tif", "--samples", "2", "--uncertainty", work / "out.tif"],
        "hard link to the input": ["-o", work / "hard.tif"],
        "symlink to the input": ["-o", work / "soft.tif"],
        "inside a zarr input": ["-o", work / "input.zarr" / "out.tif"],
    }[case]
    before = snapshot(work)
    code, output = cli("restore", work / ("input.zarr" if case == "inside a zarr input" else "in.tif"),
                       "--model", local_model, "--sigma0", "0.1", "--steps", "2", "--quiet", *args)
    assert code == 2, output
    assert output.startswith("Error: ") and output.count("\n") == 1, output  # one line
    assert snapshot(work) == before


def test_an_existing_folder_that_is_not_ours_is_never_replaced(work, model):
    foreign = work / "results.zarr"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("a user's notes")
    code, output = restore(work, model, "-o", foreign)
    assert code == 2 and "not an output of df5t-deploy" in output, output
    assert (foreign / "notes.txt").read_text() == "a user's notes"


def test_a_previous_zarr_output_of_ours_is_replaced_whole(work, model):
    out = work / "out.zarr"
    assert restore(work, model, "-o", out, "--seed", "1")[0] == 0
    first = snapshot(out)
    code, output = restore(work, model, "-o", out, "--seed", "2")
    assert code == 0, output
    assert snapshot(out) != first and json.loads((out / "zarr.json").read_text())["attributes"]["df5t"]["seed"] == 2
    assert not list(work.glob(".out.zarr.*")), "nothing set aside or partial is left"


def test_a_file_output_that_is_a_folder_is_refused_in_one_line(work, model):
    (work / "out.tif").mkdir()
    code, output = restore(work, model, "-o", work / "out.tif")
    assert code == 2 and "is a folder; give a file name" in output, output


# ------------------------------------------------------------------ run identity, resume, locks


def test_every_output_records_its_run_identity(work, model):
    from df5t_deploy.files import sha256_of

    assert restore(work, model, "-o", work / "out.zarr")[0] == 0
    identity = json.loads((work / "out.zarr" / "zarr.json").read_text())["attributes"]["df5t"]["run_identity"]
    assert identity["input_sha256"] == sha256_of(work / "in.tif") and identity["model_sha256"] == sha256_of(model)
    assert identity["input_size"] == (work / "in.tif").stat().st_size


def _interrupted_zarr(work: Path, model: Path, *args) -> Path:
    """Restore the stack into zarr, cancelled after its first plane (a partial is left)."""
    from df5t_deploy.pipeline import restore_file
    from df5t_deploy.progress import RestorationCancelled

    restorer = Restorer(model, sigma0=0.1, steps=2, **dict(args))
    with pytest.raises(RestorationCancelled):
        restore_file(restorer, work / "stack.tif", work / "out.zarr", progress=lambda event: event.planes_done < 1)
    partial = list(work.glob(".out.zarr.partial-*"))
    assert len(partial) == 1
    return partial[0]


def test_resume_continues_the_same_run_only(work, model):
    _interrupted_zarr(work, model)
    code, output = restore(work, model, "-o", work / "out.zarr", "--resume", "--seed", "9", source="stack.tif")
    assert code == 2 and "another run" in output and "the settings that change pixels" in output, output
    tifffile.imwrite(work / "stack.tif", tifffile.imread(work / "stack.tif")[::-1], photometric="minisblack")  # changed
    code, output = restore(work, model, "-o", work / "out.zarr", "--resume", source="stack.tif")
    assert code == 2 and "the input's content" in output, output


def test_resume_of_the_same_run_finishes_it(work, model):
    _interrupted_zarr(work, model)
    code, output = restore(work, model, "-o", work / "out.zarr", "--resume", source="stack.tif")
    assert code == 0, output
    assert restore(work, model, "-o", work / "whole.zarr", source="stack.tif")[0] == 0
    import zarr

    np.testing.assert_array_equal(zarr.open(str(work / "out.zarr"))["0"][:], zarr.open(str(work / "whole.zarr"))["0"][:])


def _lock(output: Path, pid: int, host: str | None = None) -> None:
    lock_path(output).write_text(json.dumps({"host": host or socket.gethostname(), "pid": pid, "since": "then"}))


def test_a_second_process_writing_the_same_output_is_refused(work, model):
    _lock(work / "out.tif", os.getppid())  # a live process on this host
    code, output = restore(work, model, "-o", work / "out.tif")
    assert code == 2 and f"pid {os.getppid()}" in output and "--break-lock" in output, output
    assert not (work / "out.tif").exists() and lock_path(work / "out.tif").exists()
    with pytest.warns(UserWarning, match="--break-lock: removing"):
        code, output = restore(work, model, "-o", work / "out.tif", "--break-lock")
    assert code == 0, output
    assert (work / "out.tif").exists() and not lock_path(work / "out.tif").exists()


def test_a_stale_lock_of_a_dead_process_is_taken_over_with_a_warning(work, model):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    _lock(work / "out.tif", int(dead.stdout))
    with pytest.warns(UserWarning, match="taking over the stale lock"):
        code, output = restore(work, model, "-o", work / "out.tif")
    assert code == 0, output


def test_clean_lists_and_removes_what_interrupted_runs_left(work, model):
    partial = _interrupted_zarr(work, model)
    _lock(work / "out.zarr", 2**22 + 12345)  # no such process
    code, output = cli("clean", work / "out.zarr")
    assert code == 0 and str(partial) in output and "--yes" in output
    assert partial.exists()
    code, output = cli("clean", work / "out.zarr", "--yes")
    assert code == 0 and not partial.exists() and not lock_path(work / "out.zarr").exists()
    assert (work / "stack.tif").exists()


# ------------------------------------------------------------------ faults


@pytest.mark.parametrize("error", [errno.ENOSPC, errno.EROFS, errno.EACCES])
def test_a_failed_final_rename_leaves_nothing_partial_and_says_so_in_one_line(work, model, monkeypatch, error):
    real_replace = os.replace

    def failing(src, dst, *args, **kwargs):
        if str(dst).endswith("out.tif"):
            raise OSError(error, os.strerror(error), str(dst))
        return real_replace(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "replace", failing)
    before = snapshot(work)
    code, output = restore(work, model, "-o", work / "out.tif")
    assert code == 1 and os.strerror(error) in output and output.count("\n") == 1, output
    assert snapshot(work) == before  # no partial file, no lock


def _running_restore(work: Path, model: Path, scratch: Path, *args: str) -> subprocess.Popen:
    """A restore that runs for minutes (the signal comes long before it could finish)."""
    env = {**os.environ, "TMPDIR": str(scratch), "PYTHONFAULTHANDLER": "1"}  # a hang dumps its threads on SIGABRT
    return subprocess.Popen([sys.executable, "-m", "df5t_deploy.cli", "restore", str(work / "long.tif"), "-o",
                             str(work / "out.tif"), "--model", str(model), "--sigma0", "0.1", "--steps", "1000",
                             "--quiet", *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            preexec_fn=_default_sigint)


def _default_sigint() -> None:
    """A shell starts background jobs with SIGINT ignored, and Python keeps an ignored SIGINT
    ignored: as a user's terminal would, give the restore the default disposition."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.mark.slow
@pytest.mark.parametrize("signum, status, task", [(signal.SIGINT, 130, "denoise"), (signal.SIGTERM, 143, "denoise"),
                                                  (signal.SIGTERM, 143, "isotropic")])
def test_a_real_signal_to_a_running_restore_leaves_nothing_partial(work, model, tmp_path_factory, signum, status, task):
    scratch = tmp_path_factory.mktemp("scratch")
    # what the libraries leave in the temp folder by themselves (onnxruntime: a .ses file)
    subprocess.run([sys.executable, "-c", "import onnxruntime"], env={**os.environ, "TMPDIR": str(scratch)}, check=True)
    theirs = set(scratch.iterdir())
    tifffile.imwrite(work / "long.tif", np.tile(tifffile.imread(work / "stack.tif"), (8, 2, 2)), photometric="minisblack")
    before = snapshot(work)
    extra = ["--task", "isotropic", "--z-factor", "2"] if task == "isotropic" else []
    process = _running_restore(work, model, scratch, *extra)

    def started() -> bool:  # the output's partial exists, and for isotropic its scratch volume
        return bool(list(work.glob(".out.partial-*"))) and (
            task != "isotropic" or bool(list(scratch.glob("df5t-work-*/xz.zarr"))))

    deadline = time.monotonic() + 60
    while not started() and time.monotonic() < deadline:
        time.sleep(0.05)
    if not started():
        process.kill()  # not left running after the test
        pytest.fail(f"the restore never got going:\n{process.communicate()[0][-3000:]}")
    time.sleep(0.5)
    process.send_signal(signum)
    try:
        output, _ = process.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        process.send_signal(signal.SIGABRT)  # where every thread is, to see why it did not stop
        output, _ = process.communicate(timeout=30)
        pytest.fail(f"the restore did not stop within 120 s of the signal; its threads:\n{output[-6000:]}")
    assert process.returncode == status, output
    assert "nothing was written under the output's name" in output
    assert snapshot(work) == before and set(scratch.iterdir()) == theirs


# ------------------------------------------------------------------ silent garbage


def test_a_network_that_returns_nan_is_an_error_naming_the_model(work, tmp_path):
    nan_model = tile_mean_model(tmp_path / "nan.onnx", TILE, gain=float("nan"))
    code, output = restore(work, nan_model, "-o", work / "out.tif")
    assert code == 1 and "nan.onnx" in output and "NaN or Inf" in output, output
    assert not (work / "out.tif").exists()


@pytest.mark.parametrize("schedule, problem", [
    ({"beta_schedule": "linear", "beta_start": 0.0001, "beta_end": 1.5, "num_diffusion_timesteps": 1000}, "beta_end"),
    ({"beta_schedule": "linear", "beta_start": -0.1, "beta_end": 0.02, "num_diffusion_timesteps": 1000}, "beta_start"),
    ({"beta_schedule": "linear", "beta_start": 0.0001, "beta_end": 0.02, "num_diffusion_timesteps": 999.5}, "whole number"),
    ({"beta_schedule": "linear", "beta_start": 0.0001, "beta_end": 0.02, "num_diffusion_timesteps": 10**9}, "whole number"),
])
def test_an_invalid_schedule_is_refused_when_the_model_opens(work, model, tmp_path, schedule, problem):
    bad = with_metadata(model, tmp_path / "bad.onnx", "df5t.schedule", json.dumps(schedule))
    code, output = restore(work, bad, "-o", work / "out.tif")
    assert code == 2 and "not a valid DDPM schedule" in output and problem in output, output


# ------------------------------------------------------------------ refused up front


@pytest.mark.parametrize("args, message", [
    (["--sigma0", "inf"], "sigma0 must be a finite number"),
    (["--sigma0", "nan"], "sigma0 must be a finite number"),
    (["--noise-std", "inf", "--sigma0", None], "noise_std must be a finite number"),
    # noise levels the arithmetic cannot carry (float32 underflow, sigma0^-4 overflow): refused with the range
    (["--sigma0", "1e-46"], "sigma0 must be a finite number in [1e-06, 10], got 1e-46"),
    (["--sigma0", "1e-300"], "sigma0 must be a finite number in [1e-06, 10], got 1e-300"),
    (["--noise-std", "1e-45", "--sigma0", None], "sigma0 must be a finite number in [1e-06, 10]"),
    (["--task", "sr", "--scale", "0"], "--scale must be an integer from 2 to 8"),
    (["--task", "deblur", "--blur-sigma", "nan"], "--blur-sigma must be finite and positive"),
    (["--task", "deblur", "--blur-sigma", "inf"], "--blur-sigma must be finite and positive"),
    (["--task", "deblur", "--blur-sigma", "30"], "wider than the 48 x 40 image"),
    (["--threads", "-1"], "threads must be >= 1"),
    (["--device", "cuda:x"], "unknown device 'cuda:x'"),
    (["--overlap", "-3"], "overlap must be >= 0"),
    (["--samples", "0"], "samples must be >= 1"),
])
def test_bad_options_are_refused_before_compute_with_their_range(work, model, args, message):
    base = ["restore", work / "in.tif", "-o", work / "out.tif", "--model", model, "--steps", "2", "--quiet"]
    if None in args:
        args = args[: args.index("--sigma0")]
    else:
        base += ["--sigma0", "0.1"] if "--sigma0" not in args else []
    before = snapshot(work)
    code, output = cli(*base, *args)
    assert code == 2 and message in output, output
    assert snapshot(work) == before


def test_the_smallest_noise_level_allowed_restores_to_finite_pixels(model, mussel_tile3):
    from df5t_deploy.settings import MIN_SIGMA0

    image = mussel_tile3[:48, :40].astype(np.float32)
    for walk in ("matched", "full"):
        restored = Restorer(model, sigma0=MIN_SIGMA0, steps=3, walk=walk, final_step="weighted").restore(image)
        assert np.isfinite(restored).all() and np.ptp(restored) > 0, walk


def test_isotropic_restoration_of_a_2d_image_is_refused_in_words(work, model):
    code, output = restore(work, model, "-o", work / "iso.tif", "--task", "isotropic", "--z-factor", "2")
    assert code == 2 and "restores ZYX volumes" in output and "is a 2D image" in output, output


def test_an_absurd_z_factor_is_refused(work, model):
    code, output = restore(work, model, "-o", work / "iso.tif", "--task", "isotropic", "--z-factor", "1000",
                           source="stack.tif")
    assert code == 2 and "--z-factor must be an integer from 2 to 64" in output, output


@pytest.mark.parametrize("content, message", [("constant", "the image is constant"), ("nan", "every pixel is NaN")])
def test_images_without_content_are_refused(work, model, content, message):
    image = np.full((48, 40), 7, np.uint8) if content == "constant" else np.full((48, 40), np.nan, np.float32)
    tifffile.imwrite(work / "bad.tif", image)
    code, output = restore(work, model, "-o", work / "out.tif", source="bad.tif")
    assert code == 2 and message in output, output


@pytest.mark.parametrize("voxel", [[0, 1, 1], [-4, 4, 40], [float("nan"), 4, 40], ["four", 4, 40]])
def test_bad_voxel_sizes_are_refused_naming_the_file(work, model, voxel):
    tifffile.imwrite(work / "bad.tif", tifffile.imread(work / "in.tif"), metadata={"voxel_size_nm_xyz": voxel})
    code, output = restore(work, model, "-o", work / "out.tif", source="bad.tif")
    assert code == 2 and "bad.tif" in output and "voxel size" in output, output


@pytest.mark.parametrize("kwargs, error, name", [
    ({"steps": "10"}, TypeError, "steps"), ({"seed": 1.5}, TypeError, "seed"), ({"samples": True}, TypeError, "samples"),
    ({"eta": "high"}, TypeError, "eta"), ({"threads": 0}, ValueError, "threads"), ({"seed": -1}, ValueError, "seed"),
])
def test_the_python_api_names_the_bad_parameter(model, kwargs, error, name):
    with pytest.raises(error, match=rf"^{name} must be"):
        Restorer(model, sigma0=0.1, **kwargs)


def test_an_overlap_that_multiplies_the_work_is_warned_about_with_the_factor(model):
    messages = []
    Restorer(model, sigma0=0.1, overlap=24, report=messages.append)
    assert any("16.0x as often" in m for m in messages), messages


# ------------------------------------------------------------------ formats that lie or break


def test_a_multi_series_tiff_needs_a_series_choice(work, model):
    with tifffile.TiffWriter(work / "two.tif") as tif:
        tif.write(tifffile.imread(work / "in.tif"))
        tif.write(np.zeros((16, 16), np.uint16))
    code, output = restore(work, model, "-o", work / "out.tif", source="two.tif")
    assert code == 2 and "holds 2 image series" in output and "--series N" in output, output
    code, output = restore(work, model, "-o", work / "out.tif", "--series", "0", source="two.tif")
    assert code == 0, output
    assert tifffile.imread(work / "out.tif").shape == (48, 40)
    code, output = restore(work, model, "-o", work / "out2.tif", "--series", "5", source="two.tif")
    assert code == 2 and "--series 5 does not exist" in output, output


def test_a_zarr_input_with_missing_or_damaged_chunks_is_refused(work, model):
    import shutil

    stack = tifffile.imread(work / "stack.tif")
    write_image(work / "in.zarr", stack, ImageMeta("ZYX"))
    shutil.rmtree(work / "in.zarr" / "0" / "c" / "1")  # plane 1's chunk
    code, output = restore(work, model, "-o", work / "out.tif", source="in.zarr")
    assert code == 2 and "1 of 3 chunks are missing" in output, output
    write_image(work / "damaged.zarr", stack, ImageMeta("ZYX"))
    (work / "damaged.zarr" / "0" / "c" / "2" / "0" / "0").write_bytes(b"not a chunk")
    code, output = restore(work, model, "-o", work / "out.tif", source="damaged.zarr")
    assert code == 2 and "plane 2 cannot be read" in output, output
    assert not (work / "out.tif").exists()


def test_our_zarr_outputs_keep_chunks_of_fill_values(work):
    stack = tifffile.imread(work / "stack.tif")
    stack[1] = 0  # a black plane is data, not absence
    write_image(work / "black.zarr", stack, ImageMeta("ZYX"))
    from df5t_deploy.formats import read_image

    np.testing.assert_array_equal(read_image(work / "black.zarr")[0], stack)


def test_a_truncated_png_is_an_error_not_zeros(work, model):
    from PIL import Image

    Image.fromarray(tifffile.imread(work / "in.tif")).save(work / "in.png")
    data = (work / "in.png").read_bytes()
    (work / "cut.png").write_bytes(data[: len(data) * 2 // 3])
    code, output = restore(work, model, "-o", work / "out.tif", source="cut.png")
    assert code == 2 and "cut.png" in output and "truncated" in output, output


@pytest.mark.parametrize("kind", ["tiff", "png"])
def test_headers_declaring_enormous_images_are_refused_before_allocating(work, model, kind):
    import struct
    import zlib

    if kind == "png":  # a valid PNG header claiming 100,000 x 100,000 pixels, then a tiny stream
        header = struct.pack(">IIBBBBB", 100_000, 100_000, 8, 0, 0, 0, 0)
        chunk = lambda tag, body: struct.pack(">I", len(body)) + tag + body + struct.pack(">I", zlib.crc32(tag + body))
        data = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 100)) + chunk(b"IEND", b"")
        (work / "huge.png").write_bytes(data)
    else:  # a small TIFF whose width and length tags are rewritten to 100,000
        tifffile.imwrite(work / "huge.tif", np.zeros((16, 16), np.uint8))
        with tifffile.TiffFile(work / "huge.tif") as tif:
            offsets = [tif.pages[0].tags[name].valueoffset for name in ("ImageWidth", "ImageLength")]
        data = bytearray((work / "huge.tif").read_bytes())
        for offset in offsets:
            data[offset : offset + 4] = struct.pack("<I", 100_000)
        (work / "huge.tif").write_bytes(bytes(data))
    code, output = restore(work, model, "-o", work / "out.tif", source="huge." + kind.replace("tiff", "tif"))
    assert code == 2 and ("GPix" in output or "too large" in output) and output.count("\n") == 1, output


def test_an_ome_tiff_promising_more_planes_than_it_holds_is_refused(work, model):
    stack = tifffile.imread(work / "stack.tif")
    tifffile.imwrite(work / "lie.ome.tif", stack, metadata={"axes": "ZYX"})
    with tifffile.TiffFile(work / "lie.ome.tif") as tif:
        xml = tif.ome_metadata
    data = (work / "lie.ome.tif").read_bytes().replace(b'SizeZ="3"', b'SizeZ="9"')
    assert xml and data != (work / "lie.ome.tif").read_bytes()
    (work / "lie.ome.tif").write_bytes(data)
    code, output = restore(work, model, "-o", work / "out.tif", source="lie.ome.tif")
    assert code == 2 and "promises 9 planes but the file holds 3" in output, output


def test_problems_of_one_plane_of_a_stack_name_the_plane(work, model):
    stack = tifffile.imread(work / "stack.tif").astype(np.float32)
    stack[2, 5, 5] = np.nan
    tifffile.imwrite(work / "nan.tif", stack, photometric="minisblack")
    code, output = restore(work, model, "-o", work / "out.tif", source="nan.tif")
    assert code == 2 and "plane 2 has 1 NaN" in output, output
    holes = tifffile.imread(work / "stack.tif")
    holes[0, 10:30, 10:30] = 0  # plane 0 has a hole, plane 1 has none
    tifffile.imwrite(work / "holes.tif", holes, photometric="minisblack")
    code, output = restore(work, model, "-o", work / "out.tif", "--task", "inpaint", "--mask", "auto",
                           source="holes.tif")
    assert code == 2 and "plane 1: no missing pixels" in output, output


# ------------------------------------------------------------------ threads


def test_threads_sharing_a_restorer_each_get_their_own_noise_estimate(model, mussel_tile3):
    import threading

    rng = np.random.default_rng(0)
    clean = mussel_tile3[400:464, 600:664].astype(np.float32)
    images = [clean + rng.normal(0, sigma, clean.shape).astype(np.float32) for sigma in (2.0, 30.0)]
    restorer = Restorer(model, sigma0="auto", steps=2)
    alone = [Restorer(model, sigma0="auto", steps=2).restore_full(image) for image in images]
    results: dict[int, object] = {}

    def work(i):
        for _ in range(3):
            results[i] = restorer.restore_full(images[i])

    threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for i in range(2):
        assert results[i].estimated_noise_std == alone[i].estimated_noise_std
        assert results[i].provenance["noise_std"] == alone[i].provenance["noise_std"]
        np.testing.assert_array_equal(results[i].image, alone[i].image)
    assert alone[0].estimated_noise_std < alone[1].estimated_noise_std / 2  # the two calls differ


@pytest.mark.parametrize("output", ["out.tif", "out.zarr", "out.mrc"])
def test_a_disk_that_fills_up_while_writing_leaves_nothing_partial(work, model, monkeypatch, output):
    """ENOSPC from the writer itself (TIFF's writer thread, zarr's store, MRC's memory map)."""
    import df5t_deploy.formats as formats

    real_create = formats.create_sink

    def full_disk_sink(*args, **kwargs):
        sink = real_create(*args, **kwargs)

        def no_space(z, plane):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(sink.path))

        monkeypatch.setattr(sink, "_write", no_space)
        return sink

    monkeypatch.setattr("df5t_deploy.pipeline.create_sink", full_disk_sink)
    before = snapshot(work)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        code, message = restore(work, model, "-o", work / output, source="stack.tif")
    if output.endswith(".zarr"):  # kept for --resume, and said so
        assert any("kept as" in str(w.message) and "df5t clean" in str(w.message) for w in caught)
    assert code == 1 and os.strerror(errno.ENOSPC) in message and message.count("\n") == 1, message
    left = {name for name in snapshot(work) if name not in before}
    assert not left or all(name.startswith(f".{output}.partial-") for name in left)  # zarr keeps its partial
    assert not (work / output).exists()


@pytest.mark.parametrize("size", [-5, 100_000])
def test_an_mrc_header_with_negative_or_huge_sizes_is_refused(work, model, size):
    import struct

    write_image(work / "in.mrc", tifffile.imread(work / "stack.tif").astype(np.float32), ImageMeta("ZYX"))
    raw = bytearray((work / "in.mrc").read_bytes())
    raw[0:8] = struct.pack("<ii", size, size)  # nx, ny
    (work / "in.mrc").write_bytes(bytes(raw))
    code, output = restore(work, model, "-o", work / "out.tif", source="in.mrc")
    assert code == 2 and "not a valid MRC file" in output and output.count("\n") == 1, output


@pytest.mark.parametrize("image, error, message", [
    ("image.tif", TypeError, "image must be a numpy array"), (None, TypeError, "image must be a numpy array"),
    (np.zeros((2, 2, 16, 16), np.uint8), ValueError, "image: expected a YX image or a ZYX stack"),
    (np.ones((16, 16), np.int64), ValueError, "image: unsupported pixel type int64"),
])
def test_the_python_api_names_a_bad_image(model, image, error, message):
    with pytest.raises(error, match=message):
        Restorer(model, sigma0=0.1, steps=2).restore(image)


def test_an_artifact_is_described_without_an_inference_session(model, tmp_path, monkeypatch):
    from df5t_deploy.artifact import ArtifactError, read_artifact
    from df5t_deploy.backends.onnxruntime_backend import OnnxRuntimeBackend

    session_info = OnnxRuntimeBackend(model).info
    import onnxruntime

    monkeypatch.setattr(onnxruntime, "InferenceSession", None)  # reading must not need one
    info, metadata = read_artifact(model)
    assert info == session_info and metadata["df5t.format"] == "1"
    data = model.read_bytes()
    for name, content in (("cut.onnx", data[: len(data) // 2]), ("empty.onnx", b""), ("text.onnx", b"not a model")):
        (tmp_path / name).write_bytes(content)
        with pytest.raises(ArtifactError, match=f"{name}: not a readable ONNX model|{name}: inputs"):
            read_artifact(tmp_path / name)


# ------------------------------------------------------------------ round three: what is ours, what is asked


@pytest.mark.parametrize("how", ["folder run with --overwrite", "file run"])
def test_a_file_that_is_not_ours_is_never_written_over(work, model, how):
    folder = work / "f"
    folder.mkdir()
    foreign = folder / "in.tif"
    foreign.write_bytes((work / "in.tif").read_bytes())  # a raw image that happens to have the name
    before = snapshot(work)
    args = ("-o", f"{folder}/", "--overwrite") if how.startswith("folder") else ("-o", foreign)
    code, output = restore(work, model, *args)
    assert code == 2 and "not an output of df5t-deploy" in output and "never replaced" in output, output
    assert "--overwrite" not in output.replace("with --overwrite", "")  # the refusal does not suggest the flag
    assert snapshot(work) == before


def test_degrade_never_writes_over_a_file_that_is_not_ours(work):
    foreign = work / "noisy.tif"
    foreign.write_bytes(b"a user's file")
    code, output = cli("degrade", work / "in.tif", "-o", foreign, "--sigma0", "0.1")
    assert code == 2 and "not an output of df5t-deploy" in output, output
    assert foreign.read_bytes() == b"a user's file"
    foreign.unlink()
    assert cli("degrade", work / "in.tif", "-o", foreign, "--sigma0", "0.1")[0] == 0
    assert cli("degrade", work / "in.tif", "-o", foreign, "--sigma0", "0.2")[0] == 0  # ours: replaced


def test_a_touched_or_copied_input_is_the_same_run(work, model):
    out = work / "out"
    assert restore(work, model, "-o", f"{out}/")[0] == 0
    first = (out / "in.tif").read_bytes()
    os.utime(work / "in.tif", ns=(1, 10**18))  # touched
    code, output = restore(work, model, "-o", f"{out}/")
    assert code == 0 and "skipped 1" in output, output
    (work / "in.tif").write_bytes((work / "in.tif").read_bytes())  # a plain copy over it: new mtime, same bytes
    code, output = restore(work, model, "-o", f"{out}/")
    assert code == 0 and "skipped 1" in output, output
    assert (out / "in.tif").read_bytes() == first


def test_other_settings_never_silently_replace_a_folder_runs_outputs(work, model):
    out = work / "out"
    assert restore(work, model, "-o", f"{out}/")[0] == 0
    first = (out / "in.tif").read_bytes()
    code, output = restore(work, model, "-o", f"{out}/", "--seed", "7")
    assert code == 1 and "the settings that change pixels differ" in output and "--overwrite" in output, output
    assert (out / "in.tif").read_bytes() == first
    code, output = restore(work, model, "-o", f"{out}/", "--seed", "7", "--overwrite")
    assert code == 0 and "replaced its earlier restoration: the settings that change pixels differed" in output
    assert (out / "in.tif").read_bytes() != first


@pytest.mark.parametrize("args", [("--chunks", "1,64"), ("--chunks", "1,64,64,64"), ("--pyramid", "8"),
                                  ("--chunks", "1,16,16", "--format", "tif")])
def test_a_refused_layout_creates_nothing_and_says_so_once(work, model, args):
    before = snapshot(work), sorted(p.name for p in work.iterdir())
    target = ("-o", f"{work / 'out'}/") if "--format" in args else ("-o", work / "out.zarr")
    code, output = restore(work, model, *target, *args, source="stack.tif")
    assert code == 2 and output.startswith("Error: ") and output.count("\n") == 1, output
    assert "--chunks" in output or "--pyramid" in output
    assert (snapshot(work), sorted(p.name for p in work.iterdir())) == before  # no hidden partial either


@pytest.mark.parametrize("args", [("--pyramid", "1"), ("--chunks", "1,16,16")])
def test_resume_with_another_layout_is_refused_and_keeps_the_partial(work, model, args):
    partial = _interrupted_zarr(work, model)
    kept = snapshot(partial)
    code, output = restore(work, model, "-o", work / "out.zarr", "--resume", *args, source="stack.tif")
    assert code == 2 and "resume with the same --chunks and --pyramid" in output, output
    assert snapshot(partial) == kept and not (work / "out.zarr").exists()


def test_an_output_folder_that_is_a_file_is_refused_in_one_line(work, model):
    (work / "afile").write_text("a file")
    code, output = restore(work, model, "-o", f"{work / 'afile'}/")
    assert code == 2 and output.count("\n") == 1 and "is a file, not a folder" in output, output


def test_an_output_folder_that_cannot_be_created_is_one_line(work, model, monkeypatch):
    def read_only(self, *args, **kwargs):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(self))

    monkeypatch.setattr(Path, "mkdir", read_only)
    code, output = restore(work, model, "-o", f"{work / 'new' / 'folder'}/")
    assert code == 2 and output.count("\n") == 1 and "Read-only file system" in output, output


def _tiff_with_zero(path: Path, tag_name: str) -> Path:
    import struct

    tifffile.imwrite(path, np.arange(64 * 64, dtype=np.uint16).reshape(64, 64))
    with tifffile.TiffFile(path) as tif:
        tag = tif.pages[0].tags[tag_name]
        offset, format_ = tag.valueoffset, "<H" if tag.dtype == 3 else "<I"
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(struct.pack(format_, 0))
    return path


@pytest.mark.parametrize("tag_name", ["ImageWidth", "ImageLength"])
def test_a_tiff_declaring_zero_width_or_height_is_one_line(work, model, tag_name):
    _tiff_with_zero(work / "zero.tif", tag_name)
    code, output = restore(work, model, "-o", work / "out.tif", source="zero.tif")
    assert code == 2 and output.count("\n") == 1 and "zero.tif: not a readable TIFF" in output, output


def test_a_model_whose_t_input_is_not_float_is_refused_when_opened(tmp_path):
    import onnx

    from df5t_deploy.artifact import ArtifactError

    path = tile_mean_model(tmp_path / "int_t.onnx", TILE)
    graph = onnx.load(path)
    graph.graph.input[1].type.tensor_type.elem_type = onnx.TensorProto.INT64
    onnx.save(graph, path)
    with pytest.raises(ArtifactError, match="input t is tensor\\(int64\\); a DF5T artifact takes t as float32"):
        Restorer(path, sigma0=0.1)


def _usable_gpu() -> bool:
    from df5t_deploy.backends import diagnose

    return any(state.startswith("ok") for kind, state in diagnose(["cuda:0"]).items() if kind != "onnxruntime-cpu")


def test_an_explicit_gpu_that_cannot_run_is_an_error_and_auto_says_it_falls_back(work, model):
    if _usable_gpu():
        pytest.skip("a GPU backend can run here: --device cuda is usable, so there is no fallback to refuse")
    code, output = restore(work, model, "-o", work / "out.tif", "--device", "cuda")
    assert code == 1 and "--device cuda: no backend can run on it here" in output and "--device auto" in output
    assert not (work / "out.tif").exists()
    result = CliRunner().invoke(main, ["restore", str(work / "in.tif"), "-o", str(work / "out.tif"), "--model",
                                       str(model), "--sigma0", "0.1", "--steps", "2"])
    assert result.exit_code == 0 and "backend onnxruntime-cpu (device auto: no GPU backend can run here)" in result.output


def test_progress_in_a_log_is_plain_lines_with_tiles_per_second_and_time_left(work, model):
    result = CliRunner().invoke(main, ["restore", str(work / "stack.tif"), "-o", str(work / "out.tif"), "--model",
                                       str(model), "--sigma0", "0.1", "--steps", "2", "--batch", "1"])
    assert result.exit_code == 0, result.output
    assert "\r" not in result.output and "\x1b" not in result.output  # no bar redrawn into a log
    lines = [line for line in result.output.splitlines() if line.startswith("restoring: ")]
    assert len(lines) == len(set(lines)) >= 2, result.output  # the first and the last, each once
    assert "tiles/s" in lines[-1] and "s left" in lines[-1] and "planes 3/3" in lines[-1], lines


def test_progress_comes_with_every_network_call_not_once_a_step(model, mussel_tile3):
    events = []
    restorer = Restorer(model, sigma0=0.1, steps=2, samples=1, batch=1)
    restorer.restore(mussel_tile3[:96, :96], progress=lambda e: events.append(e.tiles_done))
    tiles_per_step = len(restorer.denoiser.grid(96, 96).positions)
    assert tiles_per_step > 1 and events[-1] == 2 * tiles_per_step
    assert set(range(1, 2 * tiles_per_step + 1)) <= set(events)  # one event per call of one tile


# ------------------------------------------------------------------ outputs their ecosystems accept


@pytest.mark.parametrize("source", ["in.tif", "stack.tif"])
def test_mrc_outputs_pass_mrcfile_validate_and_keep_their_identity(work, model, source, capsys):
    import mrcfile

    tifffile.imwrite(work / "voxel.tif", tifffile.imread(work / source), photometric="minisblack",
                     resolution=(1e7 / 4.0, 1e7 / 4.0), resolutionunit="CENTIMETER")
    assert restore(work, model, "-o", work / "voxel.mrc", source="voxel.tif")[0] == 0
    assert mrcfile.validate(str(work / "voxel.mrc"), print_file=sys.stdout), capsys.readouterr().out
    with mrcfile.open(work / "voxel.mrc") as mrc:
        assert min(mrc.voxel_size.tolist()) > 0  # a 2-D image's z spacing too (MRC2014: cell lengths positive)
    code, output = restore(work, model, "-o", f"{work}/", "--format", "mrc", source="voxel.tif")
    assert code == 0 and "skipped 1" in output, output  # its run identity is read back


def test_ome_zarr_outputs_pass_strict_ngff_validation(work, model):
    import zarr
    from ome_zarr_models.v05.image import Image

    assert restore(work, model, "-o", work / "out.zarr", "--pyramid", "1", source="stack.tif")[0] == 0
    image = Image.from_zarr(zarr.open_group(str(work / "out.zarr"), mode="r"))
    assert [axis.name for axis in image.ome_attributes.multiscales[0].axes] == ["z", "y", "x"]


def test_an_imagej_hyperstack_comes_back_as_one_with_its_z_spacing(work, model):
    stack = tifffile.imread(work / "stack.tif")
    tifffile.imwrite(work / "hyper.tif", stack, imagej=True, resolution=(1 / 4.0, 1 / 4.0),
                     metadata={"spacing": 40.0, "unit": "nm", "axes": "ZYX"})
    assert restore(work, model, "-o", work / "out.tif", source="hyper.tif")[0] == 0
    with tifffile.TiffFile(work / "out.tif") as tif:
        assert tif.is_imagej and tif.imagej_metadata["spacing"] == 40.0 and tif.imagej_metadata["unit"] == "nm"
        assert tif.imagej_metadata["slices"] == 3 and tif.pages[0].tags["XResolution"].value == (1, 4)
    from df5t_deploy.formats import read_provenance

    assert read_provenance(work / "out.tif")["task"] == "denoise"


def test_png_outputs_pass_pillows_verification(work, model):
    from PIL import Image

    assert restore(work, model, "-o", work / "out.png")[0] == 0
    with Image.open(work / "out.png") as png:
        png.verify()


def test_degrade_offers_no_estimates_or_fits_it_cannot_make(work):
    code, output = cli("degrade", "--help")
    assert code == 0 and "fitted" not in output and "'auto'" not in output.split("--mask")[0], output
    assert "(required)" in output  # the detector's gain and read noise are given, never fitted
    code, output = cli("degrade", work / "in.tif", "-o", work / "d.tif", "--sigma0", "auto")
    assert code == 2 and "'auto' is not a valid float" in output, output


def test_a_foreign_file_that_appears_during_the_run_is_not_written_over(work, model, monkeypatch):
    from df5t_deploy.formats.tiff import TiffSink

    out = work / "out.tif"
    real_close = TiffSink._close

    def another_program_writes_the_name(self):
        real_close(self)
        out.write_bytes(b"an acquisition program's file")

    monkeypatch.setattr(TiffSink, "_close", another_program_writes_the_name)
    code, output = restore(work, model, "-o", out)
    assert code == 2 and "appeared during the run" in output, output
    assert out.read_bytes() == b"an acquisition program's file" and not list(work.glob(".out*"))


@pytest.mark.parametrize("source", ["in.tif", "stack.tif"])
def test_ome_tiff_outputs_pass_the_ome_schema(work, model, source):
    import ome_types

    tifffile.imwrite(work / "voxel.tif", tifffile.imread(work / source), photometric="minisblack",
                     resolution=(1e7 / 4.0, 1e7 / 4.0), resolutionunit="CENTIMETER")
    assert restore(work, model, "-o", work / "out.ome.tif", source="voxel.tif")[0] == 0
    with tifffile.TiffFile(work / "out.ome.tif") as tif:
        ome = ome_types.from_xml(tif.ome_metadata, validate=True)  # against the OME 2016-06 schema
    pixels = ome.images[0].pixels
    assert (pixels.size_x, pixels.size_y, pixels.physical_size_x) == (40, 48, 4.0)

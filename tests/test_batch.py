"""Folder runs: many inputs into a folder, skipping what this run already did, going on past
a file that fails, refusing outputs that would collide or replace what is not ours."""

from __future__ import annotations

import numpy as np
import pytest
import tifffile
from click.testing import CliRunner

from df5t_deploy.cli import main
from df5t_deploy.formats import read_provenance


@pytest.fixture
def inputs(tmp_path, mussel_tile3):
    folder = tmp_path / "in"
    folder.mkdir()
    for i in range(3):
        tifffile.imwrite(folder / f"tile{i}.tif", mussel_tile3[100 * i : 100 * i + 40, 300:348])
    (folder / ".hidden.tif").write_bytes(b"an editor's backup, not an image")
    return folder


def run(model, *args):
    result = CliRunner().invoke(main, ["restore", *map(str, args), "--model", str(model), "--sigma0", "0.1",
                                       "--steps", "2", "--quiet"])
    return result.exit_code, result.output


def test_a_folder_is_restored_file_by_file_and_a_rerun_skips_what_is_done(model, inputs, tmp_path):
    out = tmp_path / "out"
    code, output = run(model, inputs, "-o", f"{out}/")
    assert code == 0 and output.strip().endswith("restored 3, skipped 0, failed 0"), output
    assert sorted(p.name for p in out.iterdir()) == ["tile0.tif", "tile1.tif", "tile2.tif"]
    first = {p.name: p.read_bytes() for p in out.iterdir()}
    code, output = run(model, inputs, "-o", out)
    assert code == 0 and output.strip().endswith("restored 0, skipped 3, failed 0"), output
    assert {p.name: p.read_bytes() for p in out.iterdir()} == first
    code, output = run(model, inputs, "-o", out, "--seed", "5")  # other settings: another run's outputs stay
    assert code == 1 and output.strip().endswith("restored 0, skipped 0, failed 3"), output
    assert {p.name: p.read_bytes() for p in out.iterdir()} == first
    code, output = run(model, inputs, "-o", out, "--seed", "5", "--overwrite")
    assert output.strip().endswith("restored 3, skipped 0, failed 0") and "replaced its earlier" in output, output
    assert read_provenance(out / "tile0.tif")["seed"] == 5
    code, output = run(model, inputs, "-o", out, "--seed", "5", "--overwrite")  # the same run, done again
    assert output.strip().endswith("restored 3, skipped 0, failed 0"), output


def test_a_changed_input_is_restored_again(model, inputs, tmp_path, mussel_tile3):
    out = tmp_path / "out"
    assert run(model, inputs, "-o", out)[0] == 0
    tifffile.imwrite(inputs / "tile1.tif", mussel_tile3[500:540, 300:348])
    code, output = run(model, inputs, "-o", out)
    assert output.strip().endswith("restored 1, skipped 2, failed 0"), output
    assert "replaced its earlier restoration: the input's content differed" in output, output


def test_one_bad_file_fails_alone_and_the_status_says_so(model, inputs, tmp_path):
    (inputs / "broken.tif").write_bytes(b"not a tiff at all")
    code, output = run(model, inputs, "-o", tmp_path / "out")
    assert code == 1 and "failed " in output and "broken.tif" in output, output
    assert output.strip().endswith("restored 3, skipped 0, failed 1")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["tile0.tif", "tile1.tif", "tile2.tif"]


def test_inputs_that_would_write_the_same_output_are_refused_before_any_work(model, inputs, tmp_path):
    other = tmp_path / "other"
    other.mkdir()
    tifffile.imwrite(other / "tile0.tif", np.arange(40 * 48, dtype=np.uint16).reshape(40, 48))
    code, output = run(model, inputs / "tile0.tif", other / "tile0.tif", "-o", tmp_path / "out")
    assert code == 2 and "would both be written" in output, output
    assert not (tmp_path / "out").exists()


def test_globs_formats_and_an_output_folder_that_is_the_input_folder(model, inputs, tmp_path):
    code, output = run(model, f"{inputs}/tile[01].tif", "-o", tmp_path / "png", "--format", "png")
    assert code == 0 and sorted(p.name for p in (tmp_path / "png").iterdir()) == ["tile0.png", "tile1.png"], output
    before = {p.name: p.read_bytes() for p in inputs.iterdir()}
    code, output = run(model, inputs, "-o", inputs)
    assert code == 2 and "is the input" in output, output
    assert {p.name: p.read_bytes() for p in inputs.iterdir()} == before


def test_an_existing_output_that_is_not_ours_is_left_alone(model, inputs, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    tifffile.imwrite(out / "tile2.tif", np.zeros((4, 4), np.uint8))  # someone else's file, same name
    foreign = (out / "tile2.tif").read_bytes()
    code, output = run(model, inputs, "-o", out)  # refused up front, before any file is restored
    assert code == 2 and "not an output of df5t-deploy" in output, output
    assert (out / "tile2.tif").read_bytes() == foreign and sorted(p.name for p in out.iterdir()) == ["tile2.tif"]


def test_one_input_options_are_refused_in_a_folder_run(model, inputs, tmp_path):
    code, output = run(model, inputs, "-o", tmp_path / "out", "--samples", "2", "--uncertainty", tmp_path / "u.tif")
    assert code == 2 and "--uncertainty applies to one input" in output, output


def test_resume_continues_an_interrupted_zarr_output_of_a_folder_run(model, inputs, tmp_path):
    from df5t_deploy import Restorer
    from df5t_deploy.batch import output_paths, restore_many

    outputs = output_paths(sorted(inputs.glob("tile*.tif")), tmp_path / "out", "zarr")
    restorer = Restorer(model, sigma0=0.1, steps=2, seed=1)
    plane_cost = 12  # tiles of one 40 x 48 plane at 2 steps

    def cancel_the_second_file(source):
        return (lambda event: event.tiles_done < plane_cost // 2) if source.name == "tile1.tif" else None

    summary = restore_many([restorer], outputs, progress=cancel_the_second_file, report=lambda line: None)
    assert [source.name for source, _ in summary.failed] == ["tile1.tif"]
    assert "cancelled" in summary.failed[0][1] and list((tmp_path / "out").glob(".tile1.zarr.partial-*"))
    summary = restore_many([restorer], outputs, resume=True, report=lambda line: None)
    assert (len(summary.restored), len(summary.skipped), summary.failed) == (1, 2, [])
    assert not list((tmp_path / "out").glob(".*")), "the interrupted output was not the one continued"

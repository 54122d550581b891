"""df5t watch: files restored as they arrive, each once (also across restarts), complete files
only, failures logged and skipped, a clean stop on a signal."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import tifffile

from df5t_deploy.cli import run
from df5t_deploy.files import sha256_of

OPTIONS = ("--sigma0", "0.1", "--steps", "2", "--quiet")


@pytest.fixture
def folders(tmp_path, mussel_tile3):
    incoming, restored = tmp_path / "incoming", tmp_path / "restored"
    incoming.mkdir()
    for i in range(2):
        tifffile.imwrite(incoming / f"frame{i}.tif", mussel_tile3[60 * i : 60 * i + 40, :48])
    (incoming / ".frame9.tif").write_bytes(b"a hidden partial another program is writing")
    (incoming / "notes.txt").write_text("not an image")
    return incoming, restored


def watch(model, capsys, *args) -> tuple[int, str]:
    code = run(["watch", *map(str, args), "--model", str(model), *OPTIONS])
    captured = capsys.readouterr()
    return code, captured.out + captured.err


def test_once_restores_what_is_there_and_a_restart_restores_nothing_twice(model, folders, capsys, mussel_tile3):
    incoming, restored = folders
    code, output = watch(model, capsys, incoming, "-o", restored, "--once", "--settle", "0")
    assert code == 0 and output.strip().endswith("restored 2, skipped 0, failed 0"), output
    assert sorted(p.name for p in restored.iterdir()) == ["frame0.tif", "frame1.tif"]
    first = (restored / "frame0.tif").read_bytes()
    code, output = watch(model, capsys, incoming, "-o", restored, "--once", "--settle", "0")
    assert code == 0 and output.strip().endswith("restored 0, skipped 2, failed 0"), output
    tifffile.imwrite(incoming / "frame0.tif", mussel_tile3[500:540, :48])  # a changed input
    code, output = watch(model, capsys, incoming, "-o", restored, "--once", "--settle", "0")
    assert output.strip().endswith("restored 1, skipped 1, failed 0"), output
    assert (restored / "frame0.tif").read_bytes() != first


def test_a_bad_file_is_logged_and_skipped_and_the_rest_restored(model, folders, capsys):
    incoming, restored = folders
    tifffile.imwrite(incoming / "flat.tif", np.full((40, 48), 9, np.uint8))  # constant: refused
    code, output = watch(model, capsys, incoming, "-o", restored, "--once", "--settle", "0")
    assert code == 1 and output.strip().endswith("restored 2, skipped 0, failed 1"), output
    (line,) = (restored / "failed.log").read_text().splitlines()
    when, path, digest, reason = line.split("\t")
    assert digest == sha256_of(incoming / "flat.tif")
    assert time.strptime(when[:19], "%Y-%m-%dT%H:%M:%S") and path == str(incoming / "flat.tif") and "constant" in reason
    assert sorted(p.name for p in restored.iterdir()) == ["failed.log", "frame0.tif", "frame1.tif"]


def test_a_file_that_failed_is_not_tried_again_after_a_restart_until_it_changes(model, folders, capsys, mussel_tile3):
    incoming, restored = folders
    tifffile.imwrite(incoming / "flat.tif", np.full((40, 48), 9, np.uint8))  # constant: refused
    assert watch(model, capsys, incoming, "-o", restored, "--once", "--settle", "0")[0] == 1
    code, output = watch(model, capsys, incoming, "-o", restored, "--once", "--settle", "0")  # a restart
    assert code == 1 and "unchanged since it failed before" in output, output
    assert output.strip().endswith("restored 0, skipped 2, failed 1"), output
    assert len((restored / "failed.log").read_text().splitlines()) == 1  # not tried, so not logged again
    os.utime(incoming / "flat.tif", ns=(1, 10**18))  # touched: the same content, still not tried
    assert "unchanged since it failed before" in watch(model, capsys, incoming, "-o", restored, "--once",
                                                       "--settle", "0")[1]
    tifffile.imwrite(incoming / "flat.tif", mussel_tile3[:40, :48])  # fixed: tried and restored
    code, output = watch(model, capsys, incoming, "-o", restored, "--once", "--settle", "0")
    assert code == 0 and output.strip().endswith("restored 1, skipped 2, failed 0"), output


def test_an_output_folder_inside_the_watched_folder_is_refused(model, folders, capsys):
    incoming, _ = folders
    code, output = watch(model, capsys, incoming, "-o", incoming / "out", "--once")
    assert code == 2 and "inside the watched folder" in output, output


@pytest.mark.parametrize("mode", [(), ("--poll", "0.2")], ids=["events", "polling"])
def test_a_file_written_slowly_is_restored_once_complete_and_sigterm_stops_cleanly(model, folders, mussel_tile3,
                                                                                   tmp_path, mode):
    incoming, restored = folders
    for done in incoming.glob("frame*.tif"):
        done.unlink()
    command = [sys.executable, "-c", "from df5t_deploy.cli import entry; entry()", "watch", str(incoming), "-o",
               str(restored), "--model", str(model), *OPTIONS, "--settle", "1", *mode]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        assert "watching" in process.stdout.readline()
        stack = np.stack([mussel_tile3[200:240, :48], mussel_tile3[300:340, :48]])
        with tifffile.TiffWriter(incoming / "slow.tif") as slow:  # a valid one-plane TIFF for a while
            slow.write(stack[0], metadata=None)
            slow.filehandle.flush()
            time.sleep(0.6)  # shorter than --settle
            slow.write(stack[1], metadata=None)
        deadline = time.monotonic() + 60
        while not (restored / "slow.tif").exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert (restored / "slow.tif").exists(), "the complete file was never restored"
        assert not (restored / "failed.log").exists(), (restored / "failed.log").read_text()
    finally:
        process.send_signal(signal.SIGTERM)
        output, _ = process.communicate(timeout=60)
    assert process.returncode == 143, output
    assert output.count("restored ") == 1, output  # once, complete: not first as the one-plane file it was
    tifffile.imwrite(tmp_path / "whole.tif", stack)
    assert run(["restore", str(tmp_path / "whole.tif"), "-o", str(tmp_path / "expected.tif"), "--model", str(model),
                *OPTIONS]) == 0
    result = tifffile.imread(restored / "slow.tif")
    assert result.shape == stack.shape, "the file was taken before it was complete"
    np.testing.assert_array_equal(result, tifffile.imread(tmp_path / "expected.tif"))
    assert sorted(os.listdir(restored)) == ["slow.tif"]  # nothing partial, no lock left

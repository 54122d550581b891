"""Training resumes exactly where it stopped, and a stop (SIGTERM) loses no step."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="training needs the [export] extra")

from df5t_deploy.export import train as train_module  # noqa: E402
from df5t_deploy.export.train import TrainConfig, learning_rate, train  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
TINY = TrainConfig(num_channels=32, num_res_blocks=1, num_heads=1, crop=16, batch=2, warmup_steps=2, threads=1,
                   diffusion_steps=100, max_steps=4)


def _weights(path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def test_a_resumed_run_equals_the_uninterrupted_one(tmp_path, em_dir, monkeypatch):
    monkeypatch.setattr(train_module, "LOSS_CURVE_EVERY", 1)
    whole = train(TINY, em_dir, tmp_path / "whole")
    train(replace(TINY, max_steps=2), em_dir, tmp_path / "parts")
    resumed = train(TINY, em_dir, tmp_path / "parts")
    a, b = _weights(whole), _weights(resumed)
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    assert _weights(tmp_path / "parts" / "state.pt")["step"] == 4
    whole_curve = _weights(tmp_path / "whole" / "state.pt")["loss_curve"]
    assert [step for step, _ in whole_curve] == [1, 2, 3, 4]
    assert whole_curve == _weights(tmp_path / "parts" / "state.pt")["loss_curve"]


def test_other_settings_are_refused_on_resume(tmp_path, em_dir):
    train(replace(TINY, max_steps=1), em_dir, tmp_path)
    with pytest.raises(SystemExit, match="other settings"):
        train(replace(TINY, lr=1e-3), em_dir, tmp_path)


def test_the_learning_rate_warms_up_holds_and_cools_down_to_zero():
    config = replace(TINY, lr=1.0, warmup_steps=2, max_steps=10, cooldown_steps=4)
    assert [learning_rate(config, step) for step in range(10)] == [0.5, 1, 1, 1, 1, 1, 1, 0.75, 0.5, 0.25]
    constant = replace(config, cooldown_steps=0)
    assert [learning_rate(constant, step) for step in (0, 1, 9)] == [0.5, 1, 1]


def test_a_constant_rate_run_is_cooled_down_when_resumed(tmp_path, em_dir):
    """The cooldown is decided once the run's length is known: a resumed run may add it."""
    train(replace(TINY, max_steps=2), em_dir, tmp_path)
    cooled = replace(TINY, max_steps=4, cooldown_steps=2)
    train(cooled, em_dir, tmp_path)
    state = _weights(tmp_path / "state.pt")
    assert state["step"] == 4
    assert state["optimizer"]["param_groups"][0]["lr"] == pytest.approx(learning_rate(cooled, 3)) == TINY.lr / 2


def test_a_run_resumes_compiled_and_follows_the_eager_run(tmp_path, em_dir, monkeypatch):
    """--compile changes only the rounding, so a run may switch to it when resumed: the compiled
    steps train the saved network (not a copy) and follow the eager run's losses and weights."""
    monkeypatch.setattr(train_module, "LOSS_CURVE_EVERY", 1)
    train(replace(TINY, max_steps=3), em_dir, tmp_path / "eager")
    train(replace(TINY, max_steps=1), em_dir, tmp_path / "compiled")
    start = _weights(tmp_path / "compiled" / "state.pt")["model"]
    train(replace(TINY, max_steps=3, compile=True), em_dir, tmp_path / "compiled")
    eager, compiled = (_weights(tmp_path / run / "state.pt") for run in ("eager", "compiled"))
    np.testing.assert_allclose([loss for _, loss in compiled["loss_curve"]],
                               [loss for _, loss in eager["loss_curve"]], rtol=1e-4)
    for name, weight in eager["model"].items():
        moved = (weight - start[name]).abs().max()
        assert moved > 0, name
        assert (compiled["model"][name] - weight).abs().max() <= moved / 100, name


def test_sigterm_saves_the_state_to_resume_from(tmp_path, em_dir):
    args = [sys.executable, "-m", "df5t_deploy.export.train", "--data", str(em_dir), "--out", str(tmp_path),
            "--num-channels", "32", "--crop", "16", "--batch", "2", "--threads", "1", "--diffusion-steps", "100",
            "--max-steps", "100000", "--checkpoint-minutes", "1000"]
    process = subprocess.Popen(args, stderr=subprocess.PIPE, text=True)
    deadline, progress = time.monotonic() + 300, ""
    while not re.search(r"\| *[1-9]\d*/100000", progress):  # tqdm's count: steps are being made
        chunk = process.stderr.read(64)
        if not chunk or time.monotonic() > deadline:
            process.kill()
            pytest.fail("training did not start: " + progress[-2000:])
        progress += chunk
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=300)
    assert process.returncode != 0 and "stopped by SIGTERM" in err
    state = _weights(tmp_path / "state.pt")
    assert state["step"] >= 1 and np.isfinite(state["loss_avg"])
    assert not (tmp_path / "ema.pt").exists()  # the budget was not spent: no final weights


def test_a_finished_run_bundles_into_a_model_that_restores(tmp_path, em_dir, monkeypatch):
    from PIL import Image

    from df5t_deploy.api import Restorer
    from df5t_deploy.export import bundle as bundle_module
    from df5t_deploy.export.bundle import bundle

    monkeypatch.setattr(train_module, "LOSS_CURVE_EVERY", 1)
    train(replace(TINY, crop=64, cooldown_steps=3), em_dir, tmp_path / "run")  # the export takes tiles of 64 or more
    (tmp_path / "quality.md").write_text("# Restoration quality\n\n| task | PSNR |\n|---|---|\n| denoise | 1.0 |\n")
    models = tmp_path / "models"
    models.mkdir()
    (tmp_path / "notes.md").write_text("Stopped once and resumed.\n")
    artifact = bundle(tmp_path / "run", models, "tiny-test", tmp_path / "quality.md", tmp_path / "notes.md")
    weights = torch.load(models / "tiny-test.pt", weights_only=True)
    assert {value.dtype for value in weights.values() if value.is_floating_point()} == {torch.float16}
    assert bundle_module.SIZE_LIMIT_BYTES > 17.3 * 2**20 + 8.7 * 2**20  # df5t-small-em (C=32) fits
    card = (models / "tiny-test.md").read_text()
    assert "![Training loss of tiny-test](tiny-test-loss.png)" in card and "every 1 steps, from step 1 to 4:" in card
    assert "| denoise | 1.0 |" in card and "# Restoration quality" not in card
    assert "Stopped once and resumed." in card
    assert "2 warm-up steps, then linear decay to 0 over the last 3 of 4 steps" in card
    # TrainConfig's default augmentations, as the crop sampler draws them
    assert "pixel sizes 1 to 2 times" in card and "contrast jittered by up to 0.2" in card
    curve = np.asarray(Image.open(models / "tiny-test-loss.png"))
    assert curve.ndim == 2 and (curve[20:-40, 60:-20] < 128).any()  # the curve is drawn inside the axes
    image = (np.random.default_rng(0).random((64, 64)) * 255).astype(np.uint8)
    restored = Restorer(artifact, sigma0=0.2, steps=2).restore(image)
    assert restored.shape == image.shape and restored.dtype == np.uint8
    # reproducible: the same run bundles into the same bytes (the card records their sha256)
    again = tmp_path / "again"
    again.mkdir()
    bundle(tmp_path / "run", again, "tiny-test", tmp_path / "quality.md", tmp_path / "notes.md")
    for name in ("tiny-test.pt", "tiny-test.onnx", "tiny-test.md"):
        assert (models / name).read_bytes() == (again / name).read_bytes(), name


def test_an_unusable_device_is_refused_in_one_line(tmp_path, em_dir):
    with pytest.raises(SystemExit, match="--device cuda:7"):
        train(replace(TINY, max_steps=1), em_dir, tmp_path, device="cuda:7")
    with pytest.raises(SystemExit, match="not a device"):
        train(replace(TINY, max_steps=1), em_dir, tmp_path, device="gpu")
    assert not (tmp_path / "state.pt").exists()


def _travelling_training_data(folder):
    """Training files made from the EM crop that travels with the checkout (the GPU machine has
    no shared/): the mussel crop as the tile, and a stack of its rows as the volume."""
    import tifffile

    from df5t_deploy.export.train_data import FLYEM_VOLUME, MUSSEL_TRAIN

    crop = tifffile.imread(next((REPO / "tests" / "data" / "em").glob("*mussel_tile1*_crop_*.tif")))
    folder.mkdir()
    tifffile.imwrite(folder / MUSSEL_TRAIN, crop)
    tifffile.imwrite(folder / FLYEM_VOLUME, np.stack([crop[8 * z : 8 * z + 128, :128] for z in range(40)]))
    return folder


@pytest.mark.gpu
def test_training_on_the_gpu_follows_the_cpu_run_and_resumes_on_the_cpu(tmp_path, monkeypatch):
    """The same draws on either device: a GPU run's losses track the CPU run's (fp32, TF32
    convolutions: rounding only), and its state resumes on the CPU."""
    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU on this machine")
    em_dir = _travelling_training_data(tmp_path / "em")
    monkeypatch.setattr(train_module, "LOSS_CURVE_EVERY", 1)
    train(replace(TINY, max_steps=3), em_dir, tmp_path / "cpu")
    train(replace(TINY, max_steps=3), em_dir, tmp_path / "gpu", device="cuda")
    cpu, gpu = (_weights(tmp_path / run / "state.pt") for run in ("cpu", "gpu"))
    np.testing.assert_allclose([loss for _, loss in gpu["loss_curve"]], [loss for _, loss in cpu["loss_curve"]],
                               rtol=1e-2)
    assert all(tensor.device.type == "cpu" for tensor in gpu["model"].values())
    train(TINY, em_dir, tmp_path / "gpu")  # resumed on the CPU
    assert _weights(tmp_path / "gpu" / "state.pt")["step"] == TINY.max_steps


def test_a_packed_state_travels_in_parts_and_resumes(tmp_path, em_dir, monkeypatch):
    sys.path.insert(0, str(REPO / "training"))
    import travel

    train(replace(TINY, max_steps=2), em_dir, tmp_path / "here")
    state = _weights(tmp_path / "here" / "state.pt")
    monkeypatch.setattr(travel, "PART_BYTES", 2**16)  # this small state in several parts too
    parts = travel.write_parts(travel.pack(state), tmp_path / "parcel")
    assert len(parts) > 1 and all(part.stat().st_size <= 2**16 for part in parts)
    travel.main(["unpack", str(tmp_path / "parcel"), str(tmp_path / "there")])
    back = _weights(tmp_path / "there" / "state.pt")
    for name, weight in state["model"].items():
        assert torch.equal(back["model"][name], weight), name
        gap = (state["ema"][name] - weight).abs().max()
        assert (back["ema"][name] - state["ema"][name]).abs().max() <= gap / 100 + 1e-12, name
    for i, entry in state["optimizer"]["state"].items():
        torch.testing.assert_close(back["optimizer"]["state"][i]["exp_avg_sq"], entry["exp_avg_sq"], rtol=1e-2, atol=0)
    assert {k: back[k] for k in ("step", "loss_curve", "config", "param_names")} == \
        {k: state[k] for k in ("step", "loss_curve", "config", "param_names")}
    train(TINY, em_dir, tmp_path / "there")  # resumes from the unpacked state
    assert _weights(tmp_path / "there" / "state.pt")["step"] == TINY.max_steps
    with pytest.raises(SystemExit, match="exists"):  # never over a state
        travel.main(["unpack", str(tmp_path / "parcel"), str(tmp_path / "there")])
    parts[0].write_bytes(parts[0].read_bytes()[:-1])
    with pytest.raises(SystemExit, match="damaged"):
        travel.read_parts(tmp_path / "parcel")

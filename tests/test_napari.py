"""The napari plugin under a virtual display: the widget restores a layer end to end (the
same pixels as the Restorer), places the result where its input lies, Cancel stops a run,
a bad option is an error notification, the manifest validates, the sample opens."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from df5t_deploy import Restorer



@pytest.fixture
def widget(make_napari_viewer, mussel_tile3, model, request):
    from df5t_deploy.napari_plugin import RestoreWidget

    viewer = make_napari_viewer(show=getattr(request, "param", False))
    viewer.add_image(np.stack([mussel_tile3[40 * i : 40 * i + 64, :96] for i in range(3)]), name="stack",
                     scale=(30.0, 4.0, 4.0), translate=(0.0, 100.0, 200.0))
    widget = RestoreWidget(viewer)
    widget.model.value = str(model)
    for name, value in {"sigma0": "0.1", "steps": "2", "seed": "4"}.items():
        widget.settings[name].value = value
    return widget


def _run(widget, qtbot, timeout=60_000):
    widget.run()
    assert not widget.run_button.enabled  # until the worker finishes
    qtbot.waitUntil(lambda: widget.run_button.enabled, timeout=timeout)


def test_the_widget_restores_the_current_plane_in_place(widget, qtbot, model, mussel_tile3):
    widget.viewer.dims.set_current_step(0, 1)
    widget.settings["task"].value = "sr"
    _run(widget, qtbot)
    result = widget.viewer.layers["stack restored"]
    expected = Restorer(model, task="sr", sigma0=0.1, steps=2, seed=4).restore(widget.viewer.layers["stack"].data[1])
    np.testing.assert_array_equal(result.data[0], expected)
    assert result.data.shape == (1, 128, 192)
    np.testing.assert_allclose(result.scale, (30.0, 2.0, 2.0))
    np.testing.assert_allclose(result.translate, (30.0, 99.0, 199.0))  # plane 1; finer pixels' centres
    assert result.metadata["df5t"]["task"] == "sr" and result.metadata["df5t"]["origin"] == [1, 0, 0]


def test_the_whole_layer_with_samples_adds_an_uncertainty_layer_and_saves_with_provenance(widget, qtbot, tmp_path):
    from df5t_deploy.formats import read_provenance

    widget.scope.value = "whole layer"
    widget.settings["samples"].value = "2"
    _run(widget, qtbot)
    assert widget.viewer.layers["stack restored"].data.shape == (3, 64, 96)
    assert widget.viewer.layers["stack uncertainty"].data.dtype == np.float32
    saved = widget.save(tmp_path / "restored.tif")
    assert read_provenance(saved)["samples"] == 2 and read_provenance(saved)["scope"] == "whole layer"


def test_cancel_stops_a_run_and_adds_nothing(widget, qtbot):
    widget.settings["steps"].value = "400"
    widget.scope.value = "whole layer"
    widget.run()
    qtbot.waitUntil(lambda: widget.progress.value > 0, timeout=60_000)
    widget.cancel()
    qtbot.waitUntil(lambda: widget.run_button.enabled, timeout=60_000)
    assert "cancelled" in widget.status.value and "stack restored" not in widget.viewer.layers
    assert widget.run_button.enabled


def test_a_bad_option_is_an_error_notification_not_a_frozen_viewer(widget, qtbot, monkeypatch):
    shown = []
    monkeypatch.setattr("df5t_deploy.napari_plugin.show_error", shown.append)
    widget.settings["steps"].value = "0"
    widget.run()
    assert shown and "steps" in shown[0] and widget.worker is None and widget.run_button.enabled


def test_the_manifest_validates_and_the_sample_opens():
    manifest = Path(__import__("df5t_deploy").__file__).with_name("napari.yaml")
    result = subprocess.run([sys.executable, "-m", "npe2", "validate", str(manifest)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    from df5t_deploy.napari_plugin import bundled_sample

    ((data, meta, kind),) = bundled_sample()
    assert data.shape == (256, 256) and kind == "image"


def test_an_empty_model_field_means_the_bundled_model(widget, qtbot):
    from df5t_deploy.models import default_model_path

    widget.model.value = ""
    widget.viewer.layers["stack"].data = widget.viewer.layers["stack"].data[:, :32, :32]
    _run(widget, qtbot)
    assert "restored" in widget.status.value, widget.status.value
    assert widget.viewer.layers["stack restored"].metadata["df5t"]["model"] == str(default_model_path())


@pytest.mark.parametrize("widget", [True], indirect=True)  # shown: the canvas decides what is visible
def test_the_visible_region_scope_restores_what_is_on_screen(widget, qtbot, model):
    viewer = widget.viewer
    viewer.dims.set_current_step(0, 2)
    viewer.camera.zoom = 20  # a few data pixels across the canvas
    viewer.camera.center = (0, 100 + 4 * 30, 200 + 4 * 50)  # world: data row 30, column 50
    qtbot.waitUntil(lambda: np.asarray(viewer.layers["stack"].corner_pixels)[1, -1] < 95, timeout=10_000)
    (_, y0, x0), (_, y1, x1) = np.asarray(viewer.layers["stack"].corner_pixels)
    widget.scope.value = "visible region"
    _run(widget, qtbot)
    result = viewer.layers["stack restored"]
    assert result.data.shape == (1, y1 + 1 - y0, x1 + 1 - x0) and result.metadata["df5t"]["origin"] == [2, y0, x0]
    expected = Restorer(model, sigma0=0.1, steps=2, seed=4).restore(viewer.layers["stack"].data[2, y0 : y1 + 1, x0 : x1 + 1])
    np.testing.assert_array_equal(result.data[0], expected)
    np.testing.assert_allclose(result.translate, (60.0, 100 + 4 * y0, 200 + 4 * x0))

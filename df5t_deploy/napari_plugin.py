"""The napari plugin (npe2, manifest ``napari.yaml``; the ``[napari]`` extra): a dock widget
that restores the image layer the user looks at, and the bundled sample as sample data.

The widget offers the task and every setting of ``RestoreSettings`` (the same names, defaults
and help as the CLI), the model (bundled by default), device and scope: the current plane,
the visible region of it, or the whole layer. Only the scope is read from the layer, plane
by plane, so a dask- or zarr-backed layer is never loaded whole. The restoration runs on a
worker thread with a progress bar and a Cancel button; the result is a new layer placed where
its input lies (scale and translation from the layer, the scope's origin, the task's
factor), with an uncertainty layer for several samples and the provenance in its metadata.
"""

from __future__ import annotations

import threading
from dataclasses import MISSING
from pathlib import Path

import numpy as np
from magicgui.widgets import ComboBox, Container, Label, LineEdit, ProgressBar, PushButton
from napari.qt.threading import create_worker
from napari.utils.notifications import show_error, show_info
from qtpy.QtCore import QObject, Signal

from .api import AUTO_DEVICE, Restorer
from .intensity import mean_and_std
from .progress import Progress, RestorationCancelled
from .samples import sample_path
from .settings import RestoreSettings, setting_fields
from .streaming import ArraySource

SCOPES = ("current plane", "visible region", "whole layer")
DEVICES = (AUTO_DEVICE, "cpu", "cuda", "cuda:1", "cuda:2", "cuda:3")


def bundled_sample():
    """Sample data: the bundled real EM image (vEMstitch mussel, CC0)."""
    import tifffile

    return [(tifffile.imread(sample_path()), {"name": "mussel nuclei (real EM)"}, "image")]


class _LayerSource(ArraySource):
    """A layer's data (numpy, dask or zarr) read a plane or a slab at a time."""

    def plane(self, z: int) -> np.ndarray:
        return np.asarray(self.array if self.array.ndim == 2 else self.array[z])

    def rows(self, y0: int, y1: int) -> np.ndarray:
        return np.asarray(self.array[:, y0:y1])


class _Progressed(QObject):
    """Progress from the restoring thread, delivered on the GUI thread."""

    changed = Signal(int, int)


def scope_of(layer, scope: str, current_z: int) -> tuple[object, tuple[int, ...]]:
    """The layer data a scope covers, and its origin (data coordinates of its first pixel)."""
    data = layer.data
    if scope == "whole layer" or data.ndim == 2 and scope == "current plane":
        return data, (0,) * data.ndim
    lead = (current_z,) if data.ndim == 3 else ()
    if scope == "current plane":
        return data[current_z : current_z + 1], (current_z, 0, 0)
    corners = np.asarray(layer.corner_pixels)[:, -2:]  # the visible part, in data pixels
    (y0, x0), (y1, x1) = np.clip(corners[0], 0, None), np.minimum(corners[1] + 1, data.shape[-2:])
    if data.ndim == 3:
        return data[current_z : current_z + 1, y0:y1, x0:x1], (current_z, int(y0), int(x0))
    return data[y0:y1, x0:x1], (*lead, int(y0), int(x0))


def placement(layer, origin: tuple[int, ...], restorer: Restorer, source) -> dict:
    """Scale and translation of the result: where the scope lies in the layer's world,
    with the task's factor (sr in y and x, isotropic in z; a finer pixel's centre sits
    (1/f - 1)/2 of the coarse pixel from the coarse pixel's centre)."""
    scale = np.asarray(layer.scale, float)
    translate = np.asarray(layer.translate, float) + np.asarray(origin) * scale
    factors = np.ones(len(scale))
    if restorer.options.task == "isotropic":
        factors[0] = restorer.z_factor_for(source)
    else:
        factors[-2:] = restorer.options.factor
    return {"scale": tuple(scale / factors), "translate": tuple(translate + (1 / factors - 1) / 2 * scale)}


class RestoreWidget(Container):
    """Restore the chosen image layer with DF5T."""

    def __init__(self, napari_viewer):
        super().__init__()
        self.viewer = napari_viewer
        self.layer = ComboBox(label="image", choices=self._image_layers)
        self.scope = ComboBox(label="scope", choices=SCOPES, value="current plane")
        self.settings = {f.name: self._setting_widget(f) for f in setting_fields()}
        self.model = LineEdit(label="model", value="", tooltip="A .onnx (or .pt) model file; empty: the bundled model.")
        self.browse = PushButton(text="Choose a model file...")
        self.device = ComboBox(label="device", choices=DEVICES, value=AUTO_DEVICE)
        self.progress = ProgressBar(label="progress", value=0, max=1)
        self.status = Label(value="")
        self.run_button, self.cancel_button = PushButton(text="Restore"), PushButton(text="Cancel", enabled=False)
        self.save_button = PushButton(text="Save with provenance", enabled=False)
        self.extend([self.layer, self.scope, *self.settings.values(), self.model, self.browse, self.device,
                     self.run_button,
                     self.cancel_button, self.progress, self.status, self.save_button])
        self.run_button.changed.connect(self.run)
        self.cancel_button.changed.connect(self.cancel)
        self.save_button.changed.connect(lambda: self.save())
        self.browse.changed.connect(self._choose_model)
        self.viewer.layers.events.inserted.connect(self.layer.reset_choices)
        self.viewer.layers.events.removed.connect(self.layer.reset_choices)
        self._cancelled, self._restorers, self.worker, self.result_layer = threading.Event(), {}, None, None
        self._progressed = _Progressed()
        self._progressed.changed.connect(self._show_progress)

    def _image_layers(self, _widget=None) -> list:
        from napari.layers import Image

        return [layer for layer in self.viewer.layers if isinstance(layer, Image)]

    @staticmethod
    def _setting_widget(f):
        if f.metadata["choices"]:
            return ComboBox(name=f.name, choices=f.metadata["choices"], value=f.default, tooltip=f.metadata["help"])
        default = "" if f.default is None or f.default is MISSING else str(f.default)
        return LineEdit(name=f.name, value=default, tooltip=f.metadata["help"])

    def chosen_settings(self) -> dict:
        """The settings as typed; a wrong one raises ValueError naming it (RestoreSettings)."""
        values = {}
        for f in setting_fields():
            text = str(self.settings[f.name].value).strip()
            if f.metadata["choices"]:
                values[f.name] = text
            elif text:
                kind = f.metadata["type"]
                try:
                    values[f.name] = text if (kind is str or f.name == "sigma0" and text == "auto") else kind(text)
                except ValueError:
                    raise ValueError(f"{f.name}: {text!r} is not a {kind.__name__}") from None
        RestoreSettings(**values)  # checked here, with the message the CLI gives
        return values

    def run(self) -> None:
        layer = self.layer.value
        try:
            if layer is None:
                raise ValueError("open an image layer first (File > Open, or File > Open Sample > DF5T)")
            settings = self.chosen_settings()
        except (ValueError, TypeError) as err:
            show_error(f"DF5T: {err}")
            return
        data, origin = scope_of(layer, self.scope.value, int(self.viewer.dims.current_step[0]))
        self._cancelled.clear()
        self.run_button.enabled, self.cancel_button.enabled, self.progress.value = False, True, 0
        self.status.value = f"restoring {layer.name} ({self.scope.value})"
        self.worker = create_worker(self._restore, data, settings, self._model_path(), self.device.value,
                                    _connect={"returned": lambda result: self._show(layer, origin, result),
                                              "errored": self._failed, "finished": self._finished})

    def _model_path(self) -> str:
        """The chosen model file, or "" for the bundled one."""
        return str(self.model.value).strip()

    def _choose_model(self) -> None:
        from qtpy.QtWidgets import QFileDialog

        path, _ = QFileDialog.getOpenFileName(None, "DF5T model", "", "Models (*.onnx *.pt)")
        if path:
            self.model.value = path

    def cancel(self) -> None:
        self._cancelled.set()
        self.status.value = "cancelling at the next step"

    def _restore(self, data, settings: dict, model: str, device: str):
        """On the worker thread: the restoration of ``data`` (None if cancelled)."""
        key = (model, device, tuple(sorted(settings.items())))
        if key not in self._restorers:
            self._restorers = {key: Restorer(model or None, device=device, **settings)}  # one model held
        restorer = self._restorers[key]
        source = _LayerSource(data)
        intensity = restorer.intensity_for(source)
        noise = restorer.noise_level(source, intensity)
        means, stds = {}, {}

        def emit(z: int, unit: np.ndarray) -> None:
            means[z], stds[z] = mean_and_std(unit, intensity)

        def progress(event: Progress) -> bool:
            self._progressed.changed.emit(event.tiles_done, max(1, event.tiles_total))
            return not self._cancelled.is_set()

        try:
            restorer.restore_source(source, emit, intensity, progress, settings=restorer.sampler_settings(noise))
        except RestorationCancelled:
            return None
        mean = np.stack([means[z] for z in sorted(means)])
        std = np.stack([stds[z] for z in sorted(stds)]) if restorer.samples > 1 else None
        if data.ndim == 2:
            mean, std = mean[0], None if std is None else std[0]
        return mean, std, restorer.provenance(source, intensity, noise), (restorer, source)

    def _show_progress(self, done: int, total: int) -> None:
        self.progress.max, self.progress.value = total, done

    def _show(self, layer, origin, result) -> None:
        if result is None:
            self.status.value = "cancelled: nothing was added"
            return
        mean, std, provenance, (restorer, source) = result
        where = placement(layer, origin, restorer, source)
        provenance = {**provenance, "napari_layer": layer.name, "scope": self.scope.value, "origin": list(origin)}
        self.result_layer = self.viewer.add_image(mean, name=f"{layer.name} restored", metadata={"df5t": provenance},
                                                  **where)
        if std is not None:
            self.viewer.add_image(std, name=f"{layer.name} uncertainty", colormap="magma",
                                  metadata={"df5t": provenance}, **where)
        self.save_button.enabled = True
        self.status.value = f"restored with sigma0 {provenance['sigma0']:.4g}"

    def _failed(self, error: Exception) -> None:
        show_error(f"DF5T: {error}")
        self.status.value = f"failed: {error}"

    def _finished(self) -> None:
        self.run_button.enabled, self.cancel_button.enabled = True, False

    def save(self, path: str | Path | None = None) -> Path | None:
        """Write the last result with its provenance (a TIFF, as ``df5t restore`` writes)."""
        from qtpy.QtWidgets import QFileDialog

        from .formats import ImageMeta, write_image

        layer = self.result_layer
        if path is None:
            path, _ = QFileDialog.getSaveFileName(None, "Save restoration", f"{layer.name}.tif", "TIFF (*.tif)")
            if not path:
                return None
        data = np.asarray(layer.data)
        scale = [float(v) for v in layer.scale]
        # napari's scale has no unit: it is the voxel size in nm only if the layer was given one
        voxel = None if set(scale) == {1.0} else (scale[-1], scale[-2], scale[0] if data.ndim == 3 else None)
        write_image(path, data, ImageMeta("ZYX" if data.ndim == 3 else "YX", voxel), layer.metadata["df5t"])
        show_info(f"DF5T: wrote {path}")
        return Path(path)

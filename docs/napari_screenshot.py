"""The README's screenshot of the napari plugin: the bundled sample, the DF5T dock widget and
the restoration beside it. Run under a display (``xvfb-run -a python docs/napari_screenshot.py``)."""

from __future__ import annotations

import time
from pathlib import Path

import napari
from qtpy.QtWidgets import QApplication

from df5t_deploy.napari_plugin import RestoreWidget, bundled_sample

OUT = Path(__file__).with_name("napari_plugin.png")


def main() -> None:
    viewer = napari.Viewer(show=True)
    viewer.window.resize(1400, 800)
    (data, meta, _), = bundled_sample()
    viewer.add_image(data, **meta)
    widget = RestoreWidget(viewer)
    viewer.window.add_dock_widget(widget, name="DF5T restore", area="right")
    widget.settings["sigma0"].value = "auto"
    widget.settings["steps"].value = "20"
    widget.run()
    deadline = time.monotonic() + 600
    while widget.result_layer is None and "failed" not in widget.status.value and time.monotonic() < deadline:
        QApplication.processEvents()
        time.sleep(0.05)
    if widget.result_layer is None:
        raise SystemExit(f"the restoration did not finish: {widget.status.value}")
    viewer.grid.enabled = True
    viewer.reset_view()
    QApplication.processEvents()
    viewer.screenshot(str(OUT), canvas_only=False)
    print(f"wrote {OUT}")
    viewer.close()


if __name__ == "__main__":
    main()

"""File to file: read planes, restore, write planes, with bounded memory and atomic outputs."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .api import Restorer, intensity_map_for_source, mean_and_std
from .formats import check_writable, create_sink, open_source
from .planes import ProgressCallback


@dataclass(frozen=True)
class FileResult:
    input_shape: tuple[int, ...]
    output_shape: tuple[int, ...]
    dtype: np.dtype
    sigma0: float
    provenance: dict


def restore_file(
    restorer: Restorer,
    input_path: str | Path,
    output_path: str | Path,
    *,
    uncertainty_path: str | Path | None = None,
    resume: bool = False,
    progress: ProgressCallback | None = None,
) -> FileResult:
    """Restore ``input_path`` into ``output_path`` (and the sample std into ``uncertainty_path``).

    Outputs appear only when complete; on any error or Ctrl-C they are removed (a zarr
    output is kept hidden for ``resume``).
    """
    if resume and (restorer.options.task == "isotropic" or uncertainty_path is not None):
        raise ValueError("--resume continues 2D restorations into zarr, without --uncertainty")
    with open_source(input_path) as source:
        out_shape = restorer.output_shape(source)
        check_writable(output_path, source.dtype, len(out_shape))
        if uncertainty_path is not None:
            if restorer.samples < 2:
                raise ValueError("--uncertainty needs --samples 2 or more (it is the std over samples)")
            check_writable(uncertainty_path, np.float32, len(out_shape))
        intensity = intensity_map_for_source(source)
        settings = restorer.settings_for(source, intensity)
        sigma0 = settings.sigma0
        provenance = restorer.provenance(intensity, sigma0)
        meta = _output_meta(restorer, source)
        with contextlib.ExitStack() as stack:
            sink = stack.enter_context(create_sink(output_path, out_shape, source.dtype, meta, provenance, resume=resume))
            std_sink = None
            if uncertainty_path is not None:
                std_meta = {**provenance, "quantity": f"per-pixel std over {restorer.samples} samples, input units"}
                std_sink = stack.enter_context(create_sink(uncertainty_path, out_shape, np.float32, meta, std_meta))

            def emit(z: int, unit: np.ndarray) -> None:
                mean, std = mean_and_std(unit, intensity)
                sink.write_plane(mean)
                if std_sink is not None:
                    std_sink.write_plane(std)

            restorer.restore_source(source, emit, intensity, progress, start=sink.written, settings=settings)
    return FileResult(source.shape, out_shape, source.dtype, sigma0, provenance)


def _output_meta(restorer: Restorer, source):
    if restorer.options.task == "isotropic":
        return source.meta.scaled(z=1.0 / restorer.z_factor_for(source))
    return source.meta.scaled(xy=1.0 / restorer.options.factor)

"""The ``df5t`` command line. Commands import their heavy parts only when they run."""

from __future__ import annotations

import click

from . import __version__
from .atomic import same_file


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="df5t-deploy")
def main() -> None:
    """Restore electron-microscopy images and volumes with DF5T."""


def _warn(message: str) -> None:
    click.secho(f"warning: {message}", fg="yellow", err=True)


def _require_distinct(input_path: str, output_path: str) -> None:
    if same_file(input_path, output_path):
        raise click.UsageError(f"output {output_path} is the input file; choose another path")


@main.command("export")
@click.argument("checkpoint", type=click.Path(exists=True, dir_okay=False))
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False), help="Artifact to write (.onnx).")
@click.option("--tile", type=int, default=None, help="Static tile size (multiple of 64). Default: the preset's training size.")
@click.option("--fp16", is_flag=True, help="Mixed-precision artifact for FP16 engines (float16 x/eps).")
@click.option("--diffusion-steps", type=int, default=None, help="T of the training schedule, for widths that match no preset.")
def export_command(checkpoint: str, output: str, tile: int | None, fp16: bool, diffusion_steps: int | None) -> None:
    """Export a DF5T checkpoint to a verified ONNX artifact."""
    _require_distinct(checkpoint, output)
    try:
        from .export.checkpoint import CheckpointError, load_checkpoint
        from .export.onnx_export import ExportError, export_checkpoint
        from .export.presets import DEFAULT_TILE, resolve_schedule
    except ImportError as err:
        raise click.ClickException(
            f"export needs PyTorch and ONNX ({err.name} is missing): pip install 'df5t-deploy[export]'"
        ) from None
    try:
        loaded = load_checkpoint(checkpoint)
        cfg = loaded.config
        click.echo(
            f"loaded {checkpoint} ({loaded.source}): C={cfg.num_channels} N={cfg.num_res_blocks} "
            f"h0={cfg.num_heads} out={cfg.out_channels}, preset "
            f"{loaded.preset.name if loaded.preset else 'none'}"
        )
        schedule = resolve_schedule(loaded.preset, diffusion_steps, _warn)
        if tile is None:
            tile = loaded.preset.training_size if loaded.preset else DEFAULT_TILE
        export_checkpoint(loaded, output, tile=tile, schedule=schedule, fp16=fp16, log=click.echo)
    except (CheckpointError, ExportError, ValueError) as err:
        raise click.ClickException(str(err)) from None

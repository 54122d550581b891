"""The ``df5t`` command line. Commands import their heavy parts only when they run.

Exit status, for every command: 0 done; 1 failed; 2 usage error or refused input (before
any work); 130 on SIGINT (Ctrl-C), 143 on SIGTERM, 129 on SIGHUP. A signal unwinds the run
like Ctrl-C, so no partial output or scratch file is left.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import time
from pathlib import Path

import click
import numpy as np

from .backends import AUTO_DEVICE, BACKENDS
from .formats import OUTPUT_FORMATS
from .models import DEFAULT_MODEL
from .settings import setting_fields
from .version import __version__, install_extra

EXIT_REFUSED = 2
EXIT_SIGINT = 130


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="df5t-deploy")
def main() -> None:
    """Restore electron-microscopy images and volumes with DF5T."""


def _warn(message: str) -> None:
    click.secho(f"warning: {message}", fg="yellow", err=True)


class Refused(click.ClickException):
    """Input, options or output paths refused before any work (exit status 2)."""

    exit_code = EXIT_REFUSED


class Terminated(BaseException):
    """SIGTERM or SIGHUP, raised in the main thread so that the run unwinds as on Ctrl-C."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _refused_errors() -> tuple[type[BaseException], ...]:
    """Exception types that mean the input or the options are wrong; their message is the
    whole story for a user."""
    from .artifact import ArtifactError
    from .formats import ImageFormatError
    from .output_safety import OutputLocked, UnsafeOutput
    from .tasks import TaskError

    return (ArtifactError, ImageFormatError, TaskError, UnsafeOutput, OutputLocked, FileNotFoundError, ValueError)


def _failures() -> tuple[type[BaseException], ...]:
    """Exception types of a run that could not finish (exit status 1), told in one line."""
    from .backends import BackendUnavailable
    from .device_check import DeviceCheckError
    from .progress import RestorationCancelled
    from .tiling import NetworkOutputError

    return (BackendUnavailable, DeviceCheckError, RestorationCancelled, NetworkOutputError, OSError)


@contextlib.contextmanager
def _reported(*failures: type[BaseException]):
    """Turn the exceptions a user can act on into one-line errors with the right status."""
    try:
        yield
    except _refused_errors() as err:
        raise Refused(str(err)) from None
    except (*_failures(), *failures) as err:
        raise click.ClickException(_one_line(err)) from None


def _one_line(err: BaseException) -> str:
    if isinstance(err, OSError) and err.strerror:
        where = f"{err.filename}: " if err.filename else ""
        return f"{where}{err.strerror}; nothing was written under the output's name (free space or choose a writable folder)"
    return str(err)


@main.command("export")
@click.argument("checkpoint", type=click.Path(exists=True, dir_okay=False))
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False), help="Artifact to write (.onnx).")
@click.option("--tile", type=int, default=None, help="Static tile size (multiple of 64). Default: the preset's training size.")
@click.option("--fp16", is_flag=True, help="Mixed-precision artifact for FP16 engines (float16 x/eps).")
@click.option("--diffusion-steps", type=int, default=None, help="T of the training schedule, for widths that match no preset.")
def export_command(checkpoint: str, output: str, tile: int | None, fp16: bool, diffusion_steps: int | None) -> None:
    """Export a DF5T checkpoint to a verified ONNX artifact."""
    from .output_safety import check_outputs

    with _reported():
        check_outputs({"output": output}, {"checkpoint": checkpoint})
    try:
        from .export.checkpoint import CheckpointError, load_checkpoint
        from .export.onnx_export import ExportError, export_checkpoint
        from .export.presets import DEFAULT_TILE, resolve_schedule
    except ImportError as err:
        raise click.ClickException(
            f"export needs PyTorch and ONNX ({err.name} is missing): {install_extra('export')}"
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
        with _reported(ExportError):
            export_checkpoint(loaded, output, tile=tile, schedule=schedule, fp16=fp16, log=click.echo)
    except CheckpointError as err:
        raise Refused(str(err)) from None


class _Sigma0(click.ParamType):
    name = "FLOAT|auto"

    def convert(self, value, param, ctx):
        if value == "auto" or isinstance(value, float):
            return value
        try:
            return float(value)
        except ValueError:
            self.fail(f"{value!r} is neither a number nor 'auto'", param, ctx)


def _options(*options):
    """One decorator applying several click options, in the order listed."""

    def decorate(f):
        for option in reversed(options):
            f = option(f)
        return f

    return decorate


def _setting_options(*names: str, helps: dict[str, str] | None = None):
    """click options for these RestoreSettings fields (all by default): names, defaults and
    help come from RestoreSettings, so the CLI states none of them again. ``helps``: a
    command that uses a setting otherwise (degrade adds the noise restore estimates) says
    so in its own help, and takes no 'auto' there."""
    helps = helps or {}

    def option_type(f):
        if f.metadata["choices"]:
            return click.Choice(f.metadata["choices"])
        return _Sigma0() if f.name == "sigma0" and f.name not in helps else f.metadata["type"]

    return _options(*(
        click.option("--" + f.name.replace("_", "-"), type=option_type(f), default=f.default,
                     show_default=f.default is not None, help=helps.get(f.name, f.metadata["help"]))
        for f in setting_fields(*names)))


#: The settings of the measurement model, which degrade applies and restore inverts.
MEASUREMENT_SETTINGS = ("task", "sigma0", "noise_std", "noise_model", "gain", "read_noise", "offset", "seed", "scale",
                        "blur_sigma", "min_hole", "z_factor")
#: degrade's own words for the noise settings: it adds a known noise, so nothing is estimated or fitted.
DEGRADE_NOISE_HELP = {
    "sigma0": "Std of the grey noise to add, on the [-1,1] scale (published runs: 0.2); this or --noise-std.",
    "noise_std": "The same noise std in input units.",
    "gain": "poisson-gaussian (required): input units per detected count.",
    "read_noise": "poisson-gaussian (required): read-noise std in input units.",
    "offset": "poisson-gaussian: black level in input units.  [default: 0]",
}

_input_options = _options(
    click.option("--mask", default=None, help="inpaint: mask image (nonzero = missing) or 'auto'."),
    click.option("--series", type=click.IntRange(min=0), default=None,
                 help="Which image of a TIFF file that holds several (0 first)."),
)
_run_options = _options(
    click.option("--model", type=click.Path(exists=True, dir_okay=False), default=None,
                 help=f"ONNX artifact (or .pt checkpoint for --backend torch). Default: the bundled {DEFAULT_MODEL}."),
    click.option("--backend", type=click.Choice(BACKENDS), default="auto",
                 show_default=True, help="auto: TensorRT, onnxruntime-gpu, PyTorch CUDA, then (on --device auto "
                                         "or cpu) onnxruntime on the CPU."),
    click.option("--device", default=AUTO_DEVICE, show_default=True,
                 help="auto (a GPU if one can run, else the CPU, said so), cpu, cuda[:N], or several GPUs "
                      "(cuda:0,1) that share the planes of a stack. An explicit device that cannot run is an error."),
    click.option("--threads", type=int, default=None, help="CPU threads. Default: all cores."),
    click.option("--gpu-memory", type=float, default=None,
                 help="GB of GPU memory this process may take through PyTorch (per GPU)."),
    click.option("--strict-gpu", is_flag=True,
                 help="A GPU that fails the device loop's self-check is an error (default: host loop, warned)."),
    click.option("--quiet", is_flag=True, help="No progress bar."),
)


def _read_mask(mask: str | None):
    from .formats import read_image

    if mask is None or mask == "auto":
        return mask
    array, _ = read_image(mask)
    return array


@main.command("restore")
@click.argument("inputs", metavar="INPUT...", nargs=-1, required=True)
@click.option("-o", "--output", required=True, type=click.Path(),
              help="Output file (.tif, .ome.tif, .png, .mrc, .zarr), or a folder for several inputs (or one "
                   "ending with /).")
@_setting_options()
@_input_options
@_run_options
@click.option("--uncertainty", type=click.Path(), default=None,
              help="Also write the per-pixel std over --samples (input units, float32).")
@click.option("--resume", is_flag=True, help="Continue an interrupted zarr output of the same run: only the tasks "
                                             "it had not finished are done (folder runs: every zarr output).")
@click.option("--break-lock", is_flag=True, help="Take over the output's lock left by a run that is gone.")
@click.option("--format", "output_format", type=click.Choice(OUTPUT_FORMATS), default=None,
              help="Folder runs: write every output in this format (default: each input's).")
@click.option("--overwrite", is_flag=True, help="Folder runs: restore files whose outputs are already there.")
@click.option("--roi", default=None, help="Restore a box of the input: z0:z1,y0:y1,x0:x1 (y0:y1,x0:x1 for an image), "
                                          "half-open, in input coordinates; its origin is recorded.")
@click.option("--chunks", default=None, help="zarr output: chunk shape, e.g. 1,512,512 (default: one plane).")
@click.option("--pyramid", type=int, default=0, show_default=True,
              help="zarr output: downsampled levels (2 x 2 block means each) for viewers.")
@click.option("--cluster", default=None,
              help="Run the tasks on Dask: local[:N] (N worker processes), cuda (one worker per GPU), jobqueue "
                   "(from --cluster-config), or a scheduler's tls://HOST:PORT or tcp://HOST:PORT. Writes zarr.")
@click.option("--cluster-config", type=click.Path(exists=True, dir_okay=False), default=None,
              help="YAML: 'security' (TLS certificates for Dask's Security), 'jobqueue' (kind, jobs and the "
                   "SLURM/LSF/PBS cluster's settings), 'dashboard_address'.")
def restore_command(inputs, output, mask, series, model, backend, device, threads, gpu_memory, strict_gpu, quiet,
                    uncertainty, resume, break_lock, output_format, overwrite, roi, chunks, pyramid, cluster,
                    cluster_config, **settings):
    """Restore EM images, stacks or volumes with DDRM and a DF5T model: one INPUT into the
    OUTPUT file, or several (files, folders, glob patterns) into the OUTPUT folder."""
    from .batch import check_output_folder, expand_inputs, is_folder_run, output_paths
    from .formats import ZarrLayout, check_layout_applies
    from .models import default_model_path
    from .output_safety import check_outputs
    from .pipeline import restore_file

    folder_run = is_folder_run(inputs, output)
    if folder_run and uncertainty:
        raise click.UsageError("--uncertainty applies to one input")
    if not folder_run and (output_format or overwrite):
        raise click.UsageError("--format and --overwrite apply to folder runs (several inputs, or OUTPUT ending with /)")
    model_reads = {"--mask": mask if mask not in (None, "auto") else None, "--model": model or default_model_path()}
    started = time.perf_counter()
    with _reported():
        layout = ZarrLayout(_chunk_shape(chunks), pyramid)
        if folder_run:
            check_output_folder(Path(output))
            outputs = output_paths(expand_inputs(inputs), Path(output), output_format)
            for source, out in outputs.items():  # before loading anything
                check_outputs({"output": out}, {"input": source, **model_reads})
                check_layout_applies(out, layout, resume and out.suffix.lower() == ".zarr")
        elif not Path(inputs[0]).exists():
            raise FileNotFoundError(f"{inputs[0]}: no such file")
        else:
            check_outputs({"output": output, "--uncertainty": uncertainty}, {"input": inputs[0], **model_reads})
            check_layout_applies(output, layout, resume)
        restorers = _restorers(model, mask, backend, device, threads, gpu_memory, strict_gpu, quiet, settings)
    with _dask_runner(cluster, cluster_config, restorers[0], backend, device, threads, quiet) as runner:
        if folder_run:
            with _reported():
                _restore_folder(restorers, outputs, quiet, overwrite, reads=model_reads, break_lock=break_lock,
                                series=series, roi=roi, layout=layout, resume=resume, runner=runner)
            return
        with _reported(), _ProgressBar(quiet or runner is not None) as bar:
            result = restore_file(restorers, inputs[0], output, uncertainty_path=uncertainty, resume=resume,
                                  progress=bar.update, reads=model_reads, break_lock=break_lock, series=series,
                                  roi=roi, layout=layout, runner=runner)
    _report_restoration(restorers[0], inputs[0], result, time.perf_counter() - started)
    click.echo(f"wrote {output}" + (f" and {uncertainty}" if uncertainty else ""))


@contextlib.contextmanager
def _dask_runner(spec, config_path, restorer, backend, device, threads, quiet):
    """The Dask runner of --cluster (None without it), its cluster closed afterwards."""
    if spec is None:
        if config_path is not None:
            raise Refused("--cluster-config applies with --cluster")
        yield None
        return
    with _reported():
        try:
            from .cluster import DaskRunner, WorkerRestorer, connect
        except ImportError:
            raise Refused(f"--cluster needs the [cluster] extra: {install_extra('cluster')}") from None
        config = _yaml(config_path) if config_path else {}
        local_workers = int(spec.partition(":")[2] or os.cpu_count() or 1) if spec.startswith("local") else None
        worker_threads = threads or (max(1, (os.cpu_count() or 1) // local_workers) if local_workers else None)
        client, cluster = connect(spec, config)
    try:
        click.echo(f"dask dashboard: {client.dashboard_link}", err=True)
        worker_device = "cuda" if spec == "cuda" else device
        with _reported():
            runner = DaskRunner(client, WorkerRestorer.like(restorer, worker_device, worker_threads, backend),
                                report=click.echo, quiet=quiet)
        yield runner
    finally:
        client.close()
        if cluster is not None:
            cluster.close()


def _yaml(path) -> dict:
    import yaml

    try:
        loaded = yaml.safe_load(Path(path).read_text()) or {}
    except yaml.YAMLError as err:
        raise ValueError(f"--cluster-config {path}: not valid YAML ({err})") from None
    if not isinstance(loaded, dict):
        raise ValueError(f"--cluster-config {path}: expected a mapping of sections")
    return loaded


def _restorers(model, mask, backend, device, threads, gpu_memory, strict_gpu, quiet, settings, **extra) -> list:
    """One Restorer per device of --device, from the options every restoring command takes
    (``extra``: further Restorer keywords)."""
    from .api import Restorer

    return [
        Restorer(
            model, mask=_read_mask(mask), backend=backend, device=one, threads=threads,
            report=None if quiet else lambda message: click.echo(message, err=True), gpu_memory_gb=gpu_memory,
            strict_gpu=strict_gpu, **settings, **extra,
        )
        for one in parse_devices(device)
    ]


@main.command("watch")
@click.argument("in_dir", type=click.Path(file_okay=False))
@click.option("-o", "--output", "out_dir", required=True, type=click.Path(file_okay=False),
              help="Folder the restorations are written to (outside IN_DIR), under the inputs' names.")
@_setting_options()
@_input_options
@_run_options
@click.option("--pattern", "patterns", multiple=True,
              help="Names to restore (glob, repeatable). Default: the image formats df5t reads.")
@click.option("--settle", type=float, default=None,
              help="Seconds a file's size must stay the same before it is taken.  [default: 2]")
@click.option("--poll", type=float, default=None,
              help="Scan the folder every SECONDS instead of waiting for file-system events (network shares).")
@click.option("--once", is_flag=True, help="Restore what is there, then exit (status 1 if any failed).")
def watch_command(in_dir, out_dir, mask, series, model, backend, device, threads, gpu_memory, strict_gpu, quiet,
                  patterns, settle, poll, once, **settings):
    """Restore the image files that appear in IN_DIR (as an acquisition program writes them)
    into OUTPUT, each once: complete files only, atomic outputs, failures logged to
    OUTPUT/failed.log. Runs until Ctrl-C or SIGTERM, or with --once until IN_DIR is done."""
    from .models import default_model_path
    from .watch import DEFAULT_PATTERNS, DEFAULT_SETTLE_S, FolderWatcher, check_folders

    if poll is not None and not poll > 0:
        raise Refused(f"--poll must be a positive number of seconds, got {poll}")
    reads = {"--mask": mask if mask not in (None, "auto") else None, "--model": model or default_model_path()}
    with _reported():
        watcher_options = {"patterns": patterns or DEFAULT_PATTERNS,
                           "settle": DEFAULT_SETTLE_S if settle is None else settle}
        check_folders(Path(in_dir), Path(out_dir))  # before loading the model
        restorers = _restorers(model, mask, backend, device, threads, gpu_memory, strict_gpu, quiet, settings)
        watcher = FolderWatcher(restorers, in_dir, out_dir, report=click.echo, reads=reads, series=series,
                                **watcher_options)
        if not once:
            click.echo(f"watching {in_dir} (Ctrl-C to stop)")
        summary = watcher.run(once=once, poll=poll)
    click.echo(summary.line())
    if summary.failed:
        raise click.exceptions.Exit(1)


@main.command("serve")
@_setting_options()
@_input_options
@_run_options
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to listen on; beyond loopback it needs --token-file (and should use TLS).")
@click.option("--port", type=click.IntRange(0, 65535), default=8765, show_default=True, help="0: a free port.")
@click.option("--token-file", type=click.Path(dir_okay=False), default=None,
              help="File holding the bearer token every request but /v1/health must send (mode 600).")
@click.option("--tls-cert", type=click.Path(exists=True, dir_okay=False), default=None, help="TLS certificate (PEM).")
@click.option("--tls-key", type=click.Path(exists=True, dir_okay=False), default=None, help="TLS private key (PEM).")
@click.option("--allowed-host", "allowed_hosts", multiple=True,
              help="Host header to accept besides loopback names (the name clients use; repeatable).")
@click.option("--max-bytes", type=click.IntRange(min=1), default=None, help="Largest request body.  [default: 256 MiB]")
@click.option("--max-pixels", type=click.IntRange(min=1), default=None,
              help="Largest image, in pixels.  [default: 8192 x 8192]")
@click.option("--max-samples", type=click.IntRange(min=1), default=None, help="Largest samples a request may ask.  "
                                                                                 "[default: 8]")
@click.option("--request-timeout", type=click.FloatRange(min=0, min_open=True), default=None,
              help="Seconds before a request answers 504 and its work is cancelled.  [default: 300]")
@click.option("--max-pending", type=click.IntRange(min=1), default=None,
              help="Frames queued before requests get 503.  [default: 4]")
def serve_command(mask, series, model, backend, device, threads, gpu_memory, strict_gpu, quiet, host, port,
                  token_file, tls_cert, tls_key, allowed_hosts, max_bytes, max_pixels, max_samples, request_timeout,
                  max_pending, **settings):
    """Serve restorations over HTTP: POST /v1/restore (a TIFF body) answers the restored TIFF.
    The task, model and settings are fixed here; a request may choose seed, sigma0 or
    noise_std, and samples. Stops on Ctrl-C or SIGTERM after the requests in flight."""
    from dataclasses import replace

    from .service import ServiceLimits, check_exposure, read_token, serve

    if series is not None:
        raise Refused("--series does not apply to serve (each request sends one image)")
    if (tls_cert is None) != (tls_key is None):
        raise Refused("give both --tls-cert and --tls-key, or neither")
    if "," in device:
        raise Refused("serve runs on one device; start one server per GPU")
    limits = ServiceLimits()
    given = {"max_bytes": max_bytes, "max_pixels": max_pixels, "max_samples": max_samples,
             "request_timeout": request_timeout}
    limits = replace(limits, **{name: value for name, value in given.items() if value is not None})
    with _reported():
        token = read_token(token_file) if token_file else None
        check_exposure(host, token)  # before loading the model
        (restorer,) = _restorers(model, mask, backend, device, threads, gpu_memory, strict_gpu, True, settings,
                                 **({"max_pending": max_pending} if max_pending else {}))
        with restorer:
            serve(restorer, host, port, token=token, limits=limits, allowed_hosts=tuple(allowed_hosts),
                  tls=(tls_cert, tls_key) if tls_cert else None, announce=lambda line: click.echo(line))


def _chunk_shape(text: str | None) -> tuple[int, ...] | None:
    if text is None:
        return None
    try:
        return tuple(int(size) for size in text.split(","))
    except ValueError:
        raise ValueError(f"--chunks {text!r}: give whole numbers separated by commas, e.g. 1,512,512") from None


def _walk_words(restorer, walk: dict) -> str:
    """'3 network calls x 4 samples from t=102 (matched walk)'."""
    samples = restorer.settings.samples
    return (f"{walk['network_calls']} network calls x {samples} sample{'s' if samples > 1 else ''} from "
            f"t={walk['start']} ({restorer.settings.walk} walk)")


def _report_restoration(restorer, input_path, result, seconds: float) -> None:
    megapixels = float(np.prod(result.output_shape)) / 1e6
    click.echo(
        f"restored {input_path} {result.input_shape} {result.dtype} -> {result.output_shape} "
        f"({restorer.settings.task}, {_walk_words(restorer, result.provenance['walk_timesteps'])}, "
        f"sigma0={result.sigma0:.4g}, {restorer.backend.name}) in {seconds:.1f} s, {megapixels / seconds:.3f} MPix/s"
    )
    if result.estimated_noise_std is not None:
        click.echo(f"sigma0 auto: estimated noise std {result.estimated_noise_std:.4g} (input units) "
                   f"-> sigma0 {result.sigma0:.4g} on the [-1,1] scale")
    detector = result.provenance["intensity_map"].get("noise")
    if detector is not None:
        click.echo(f"poisson-gaussian: gain {detector['gain']:.4g}, read noise {detector['read_noise']:.4g}, "
                   f"offset {detector['offset']:.4g} (input units; {detector['rule']})")


def _restore_folder(restorers, outputs: dict, quiet: bool, overwrite: bool, **restore_options) -> None:
    """A folder run: a bar over the files, one over the current file's tiles, a line per file,
    the summary last; exit status 1 if any file failed."""
    from tqdm import tqdm

    from .batch import restore_many

    files = tqdm(total=len(outputs), unit="file", desc="files", disable=quiet or not sys.stderr.isatty(), position=0,
                 dynamic_ncols=True)
    current: list[_ProgressBar] = []

    def progress(source):
        if current:
            current.pop().close()
        current.append(_ProgressBar(quiet))
        return current[-1].update

    def report(line: str) -> None:
        files.update(1)
        (files.write if not files.disable else click.echo)(line)

    try:
        summary = restore_many(restorers, outputs, overwrite=overwrite, progress=progress, report=report,
                               **restore_options)
    finally:
        for bar in current:
            bar.close()
        files.close()
    click.echo(summary.line())
    if summary.failed:
        raise click.exceptions.Exit(1)


def parse_devices(text: str) -> list[str]:
    """"cpu" -> ["cpu"]; "cuda:0,1" -> ["cuda:0", "cuda:1"]; "cuda" -> ["cuda"]."""
    if text.startswith("cuda:") and "," in text:
        indices = text[len("cuda:"):].split(",")
        if not all(i.strip().isdigit() for i in indices) or len(set(indices)) != len(indices):
            raise click.BadParameter(f"{text!r}: list distinct GPU indices, e.g. cuda:0,1", param_hint="--device")
        return [f"cuda:{i.strip()}" for i in indices]
    return [text]


#: Seconds between the plain progress lines written where stderr is not a terminal (a log).
PLAIN_PROGRESS_S = 10.0


class _ProgressBar:
    """Progress of one restoration on stderr, fed by the Restorer's progress callback: a tqdm
    bar over network tiles on a terminal; in a log, a plain line every PLAIN_PROGRESS_S
    seconds and at the end. Both give tiles per second and the time left, from the first
    tiles on (the network's warm-up before them is not counted)."""

    def __init__(self, quiet: bool):
        self.quiet = quiet
        self.terminal = sys.stderr.isatty()
        self.bar = None
        self.first: tuple[float, int] | None = None  # when the first event came, and its tiles
        self.printed_at, self.printed_end = -float("inf"), False

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()

    def update(self, event) -> None:
        if self.quiet:
            return
        now = time.perf_counter()
        if self.first is None:
            self.first = (now, event.tiles_done)
        where = f"planes {event.planes_done}/{event.planes_total}" + (
            f", step {event.step}/{event.steps}" if event.steps else "")
        if self.terminal:
            self._draw(event, where)
            return
        end = event.planes_done == event.planes_total
        if now - self.printed_at >= PLAIN_PROGRESS_S or (end and not self.printed_end):
            self.printed_at, self.printed_end = now, end
            click.echo(f"restoring: {event.tiles_done}/{event.tiles_total} tiles, {self._speed(event, now)}, {where}",
                       err=True)

    def _draw(self, event, where: str) -> None:
        if self.bar is None:
            from tqdm import tqdm

            self.bar = tqdm(total=event.tiles_total, unit="tile", desc="restoring", leave=False, dynamic_ncols=True)
        self.bar.n = event.tiles_done
        self.bar.set_postfix_str(where, refresh=False)
        self.bar.refresh()  # once per event: each refresh is a write

    def _speed(self, event, now: float) -> str:
        """'3.2 tiles/s, 1m52s left' (or '... left: after the first tiles')."""
        since, tiles_then = self.first
        ran, seconds = event.tiles_done - tiles_then, now - since
        if ran <= 0 or seconds <= 0:
            return "time left: after the first tiles"
        rate = ran / seconds
        left = round((event.tiles_total - event.tiles_done) / rate)
        return f"{rate:.3g} tiles/s, {left // 60}m{left % 60:02d}s left"


@main.command("degrade")
@click.argument("input_path", metavar="INPUT", type=click.Path(exists=True, dir_okay=False))
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False), help="Degraded image to write.")
@_setting_options(*MEASUREMENT_SETTINGS, helps=DEGRADE_NOISE_HELP)
@_input_options
@click.option("--missing-fraction", type=float, default=0.2, show_default=True,
              help="inpaint with --mask blobs: fraction of pixels removed.")
@click.option("--save-mask", type=click.Path(dir_okay=False), default=None, help="inpaint: also write the mask.")
def degrade_command(input_path, output, task, sigma0, noise_std, noise_model, gain, read_noise, offset, seed, scale,
                    blur_sigma, min_hole, z_factor, mask, series, missing_fraction, save_mask):
    """Make a known-truth pair: apply the task's degradation and grey noise (or, with
    --noise-model poisson-gaussian, a detector's shot and read noise: --gain and --read-noise)."""
    import warnings

    from .degrade import blob_mask, degrade
    from .formats import read_image, write_image
    from .output_safety import check_outputs
    from .tasks import TaskOptions, parse_blur_sigma

    detector = _detector_noise(noise_model, gain, read_noise, offset, sigma0, noise_std)
    with _reported():
        check_outputs({"output": output, "--save-mask": save_mask},
                      {"input": input_path, "--mask": mask if mask not in (None, "auto", "blobs") else None})
        image, meta = read_image(input_path, series)
        options = TaskOptions(task, scale=scale, blur_sigma=parse_blur_sigma(blur_sigma), z_factor=z_factor,
                              mask="auto" if task == "inpaint" else None, min_hole=min_hole)
        missing = None
        if task == "inpaint":
            if mask in (None, "auto", "blobs"):
                missing = blob_mask(image.shape, missing_fraction, seed)
            else:
                missing = _read_mask(mask) != 0
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            result = degrade(image, options, sigma0=sigma0, noise_std=noise_std, seed=seed, missing=missing,
                             poisson_gaussian=detector)
        for warning in caught:
            _warn(str(warning.message))
        noise = {"poisson_gaussian": detector.to_dict()} if detector else {"sigma0": result.sigma0}
        provenance = {"software": f"df5t-deploy {__version__}", "degraded": options.to_dict() | noise | {
            "seed": seed, "truth_shape": list(result.cropped_shape)}}
        scaled = meta.scaled(xy=options.factor, z=options.z_factor or 1)
        write_image(output, result.image, scaled, provenance)
        if save_mask and result.missing is not None:
            write_image(save_mask, result.missing.astype(np.uint8) * 255, meta,
                        {"software": provenance["software"], "mask_of": str(output)})
    level = (f"gain {gain:g}, read noise {read_noise:g}, offset {detector.offset:g}" if detector
             else f"sigma0={result.sigma0:.4g}")
    click.echo(f"wrote {output} {result.image.shape} {result.image.dtype} ({task}, {level}, seed {seed})")


def _detector_noise(noise_model, gain, read_noise, offset, sigma0, noise_std):
    """degrade's Poisson-Gaussian parameters (None for grey noise); all must be given."""
    if noise_model == "gaussian":
        if gain is not None or read_noise is not None or offset is not None:
            raise click.UsageError("--gain, --read-noise and --offset apply to --noise-model poisson-gaussian")
        return None
    if sigma0 is not None or noise_std is not None:
        raise click.UsageError("--noise-model poisson-gaussian adds shot and read noise: drop --sigma0 and --noise-std")
    if gain is None or read_noise is None:
        raise click.UsageError("--noise-model poisson-gaussian needs --gain and --read-noise (and --offset, default 0)")
    from .poisson_gaussian import NoiseModelError, PoissonGaussian

    try:
        return PoissonGaussian(gain, read_noise, 0.0 if offset is None else offset)
    except NoiseModelError as err:
        raise click.UsageError(str(err)) from None


@main.command("doctor")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.option("--selftest", is_flag=True, help="Also run the device loop's self-check on every GPU, afresh.")
def doctor_command(as_json: bool, selftest: bool) -> None:
    """What this machine can run, and what is missing for the rest."""
    import json

    from .doctor import collect, render, selftests

    facts = collect()
    if selftest:
        facts["selftest"] = selftests()
    click.echo(json.dumps(facts, indent=2) if as_json else render(facts))


@main.command("build")
@click.argument("model", type=click.Path(exists=True, dir_okay=False))
@click.option("-o", "--cache-dir", type=click.Path(file_okay=False), default=None,
              help="Engine cache folder. Default: ~/.cache/df5t-deploy/engines.")
@click.option("--max-batch", type=int, default=None, help="Largest batch of tiles (default 16).")
@click.option("--opt-batch", type=int, default=None, help="Batch TensorRT tunes for (default: --max-batch).")
@click.option("--device", default="cuda", show_default=True)
@click.option("--workspace-gb", type=float, default=8.0, show_default=True)
@click.option("--optimization-level", type=click.IntRange(0, 5), default=3, show_default=True)
@click.option("--rebuild", is_flag=True, help="Build even if the cache holds a matching plan.")
def build_command(model, cache_dir, max_batch, opt_batch, device, workspace_gb, optimization_level, rebuild):
    """Build (or find in the cache) the FP16 TensorRT engine of an ONNX artifact for this GPU."""
    from .engines.build import EngineBuildError, build_engine, choose_profile
    from .engines.cache import EngineCache, EngineCacheError

    with _reported(EngineBuildError, EngineCacheError):
        plan = build_engine(model, EngineCache(cache_dir), choose_profile(max_batch, opt_batch),
                            device=int(device.partition(":")[2] or 0), workspace_bytes=int(workspace_gb * 2**30),
                            optimization_level=optimization_level, rebuild=rebuild, log=click.echo)
    click.echo(f"engine: {plan}")


@main.command("clean")
@click.argument("output", type=click.Path())
@click.option("--yes", is_flag=True, help="Remove what is listed (otherwise only list it).")
def clean_command(output: str, yes: bool) -> None:
    """List (and with --yes remove) what interrupted runs left beside OUTPUT: partial files
    and folders, a folder set aside while replacing, a lock whose process is gone."""
    from .output_safety import remove, stale_partials

    found = stale_partials(output)
    for path in found:
        click.echo(("removed " if yes else "") + str(path))
    if yes:
        with _reported():
            remove(found)
    elif found:
        click.echo(f"{len(found)} left by interrupted runs; `df5t clean {output} --yes` removes them")
    else:
        click.echo(f"nothing left by interrupted runs beside {output}")


def run(argv: list[str] | None = None) -> int:
    """The ``df5t`` program: the commands, with signals and the exit statuses above."""
    previous = {signum: signal.signal(signum, _terminate) for signum in (signal.SIGTERM, signal.SIGHUP)}
    try:
        code = main.main(args=argv, prog_name="df5t", standalone_mode=False)
    except click.ClickException as err:
        err.show()
        return err.exit_code
    except (click.Abort, KeyboardInterrupt):
        click.echo("interrupted: nothing was written under the output's name", err=True)
        return EXIT_SIGINT
    except Terminated as stop:
        click.echo(f"stopped by {stop}: nothing was written under the output's name", err=True)
        return 128 + stop.signum
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    return code if isinstance(code, int) else 0


def _terminate(signum, frame) -> None:
    raise Terminated(signum)


def entry() -> None:
    sys.exit(run())


if __name__ == "__main__":
    entry()

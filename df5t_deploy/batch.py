"""Whole runs: many files restored into a folder, one after another, resumable.

``df5t restore IN... -o FOLDER/`` restores every input into the folder under its own name
(the format kept, or ``--format``). ``earlier_output`` decides what to do about an output
already there: with the same run identity (input content, model, settings) it is skipped, so
rerunning a batch finishes it; one of an input whose content changed is replaced; one by
other settings or another model is replaced only with ``overwrite``; the report says what
differed. Anything not ours is never replaced. A file that fails is reported and the batch goes on. Each file goes through
``pipeline.restore_file``, with all its safety (outputs checked, locked, atomic).
"""

from __future__ import annotations

import glob
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from .api import Restorer
from .formats import OUTPUT_FORMATS, SUPPORTED, read_provenance
from .output_safety import FOLDER_SUFFIXES, check_replaceable
from .pipeline import FileResult, restore_file, run_identity_of
from .progress import ProgressCallback
from .run_identity import RunIdentity

_GLOB_CHARACTERS = set("*?[")


@dataclass
class BatchSummary:
    restored: list[Path] = field(default_factory=list)
    skipped: list[Path] = field(default_factory=list)
    failed: list[tuple[Path, str]] = field(default_factory=list)

    def line(self) -> str:
        return f"restored {len(self.restored)}, skipped {len(self.skipped)}, failed {len(self.failed)}"


def is_folder_run(inputs: Sequence[str], output: str) -> bool:
    """Whether OUTPUT is a folder: several inputs, a folder or glob among them, or an OUTPUT
    that ends with /. (One file to an existing folder's name is refused, not guessed at.)"""
    return len(inputs) > 1 or output.endswith(("/", "\\")) or any(_is_many(spec) for spec in inputs)


def _is_many(spec: str) -> bool:
    path = Path(spec)
    if path.exists():
        return path.is_dir() and path.suffix.lower() not in FOLDER_SUFFIXES
    return bool(_GLOB_CHARACTERS & set(spec))


def expand_inputs(specs: Sequence[str]) -> list[Path]:
    """Files to restore: paths as given, the image files of a folder (not its hidden files),
    and glob patterns, each file once, in the order given (sorted within a folder or glob)."""
    files: list[Path] = []
    for spec in specs:
        path = Path(spec)
        if path.exists() and not _is_many(spec):
            found = [path]
        elif path.is_dir():
            found = sorted(p for p in path.iterdir() if _is_image(p) and not p.name.startswith("."))
        else:
            found = sorted(Path(p) for p in glob.glob(spec) if _is_image(Path(p)))
        if not found:
            raise ValueError(f"{spec}: no image files there (looked for {', '.join(SUPPORTED)})")
        files += found
    return list(dict.fromkeys(files))


def _is_image(path: Path) -> bool:
    return path.name.lower().endswith(SUPPORTED) and (path.is_file() or path.suffix.lower() in FOLDER_SUFFIXES)


def output_paths(inputs: Sequence[Path], folder: Path, output_format: str | None) -> dict[Path, Path]:
    """Each input's output in ``folder``: its name, with the suffix of ``output_format`` (one
    of OUTPUT_FORMATS) if given; two inputs that would write the same output are refused."""
    if output_format is not None and output_format not in OUTPUT_FORMATS:
        raise ValueError(f"--format {output_format!r}: choose one of {', '.join(OUTPUT_FORMATS)}")
    outputs: dict[Path, Path] = {}
    for source in inputs:
        name = source.name
        if output_format is not None:
            stem = name[: -len(".ome.tif")] if name.lower().endswith(".ome.tif") else Path(name).stem
            name = f"{stem}.{output_format}"
        outputs[source] = folder / name
    seen: dict[Path, Path] = {}
    for source, out in outputs.items():
        if out in seen:
            raise ValueError(f"{seen[out]} and {source} would both be written to {out}; restore them into "
                             "separate folders or rename one")
        seen[out] = source
    return outputs


def restore_many(
    restorers: Sequence[Restorer],
    outputs: dict[Path, Path],
    *,
    overwrite: bool = False,
    resume: bool = False,
    progress: Callable[[Path], ProgressCallback | None] = lambda source: None,
    report: Callable[[str], None] = print,
    **restore_options,
) -> BatchSummary:
    """Restore each input into its output, as ``earlier_output`` decides; report and go on
    past a file that fails. ``resume``: a zarr output this run left unfinished is continued,
    not begun again. ``progress(source)`` gives the progress callback of one file."""
    summary = BatchSummary()
    for folder in {out.parent for out in outputs.values()}:
        make_output_folder(folder)
    for source, out in outputs.items():
        try:
            replacing = earlier_output(restorers[0], source, out, restore_options.get("series"),
                                       restore_options.get("roi"), overwrite)
            if replacing is SAME_RUN:
                summary.skipped.append(source)
                report(f"skipped {source}: {out} is its restoration by these settings and model")
                continue
            result: FileResult = restore_file(restorers, source, out, progress=progress(source),
                                              resume=resume and out.suffix.lower() == ".zarr", **restore_options)
            summary.restored.append(source)
            replaced = f" (replaced its earlier restoration: {replacing})" if replacing else ""
            report(f"restored {source} -> {out} {result.output_shape} {result.dtype}{replaced}")
        except Exception as err:  # one bad file is reported and the batch goes on
            summary.failed.append((source, str(err)))
            report(f"failed {source}: {err}")
    return summary


def check_output_folder(folder: Path) -> None:
    """Refuse an output folder that is a file (before anything is loaded)."""
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"{folder} is a file, not a folder; choose an output folder (or remove the file yourself)")


def make_output_folder(folder: Path) -> None:
    """Create an output folder (and its parents), or say in one line why it cannot be."""
    check_output_folder(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ValueError(f"cannot create the output folder {folder}: {err.strerror}; choose a writable place") from None


#: ``earlier_output``'s answer for an output that already holds this very run's result.
SAME_RUN = "the same run"


def earlier_output(restorer: Restorer, source: Path, out: Path, series: int | None, roi: str | None,
                   overwrite: bool = False) -> str | None:
    """What restoring ``source`` into ``out`` would replace: None (nothing there, or with
    ``overwrite`` an earlier restoration by this very run), SAME_RUN (it is there already:
    skip it), or what differs from the earlier restoration, which is then replaced: an input
    whose content changed (its old restoration is of data that is gone), or with ``overwrite``
    other settings or another model. Without ``overwrite``, a restoration by other settings or
    another model is an error for this file (hours of someone's work); anything not ours is
    never replaced."""
    if not out.exists():
        return None
    check_replaceable("output", out)
    recorded = read_provenance(out) or {}
    identity = run_identity_of(restorer, source, series, roi)
    differences = identity.differences(RunIdentity.from_dict(recorded.get("run_identity") or {}))
    if not differences:
        return None if overwrite else SAME_RUN
    if not overwrite and differences != [RunIdentity.CONTENT]:
        raise ValueError(f"{out} is a restoration by another run ({', '.join(differences)} differ); pass "
                         "--overwrite to replace it, or restore into another folder")
    return f"{', '.join(differences)} differed"

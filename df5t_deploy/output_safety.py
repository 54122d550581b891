"""What an output may touch: never anything a run reads or did not create.

``check_outputs`` runs before any work. An output is refused when it is, or aliases (through
symbolic or hard links), a path the run reads (input, mask, model) or another output; when it
is a folder that holds such a path, or lies inside one; when it exists and is not recognisably
an output of ours (file or folder: our provenance in it); and when it names a folder where a
file goes.
``OutputLock`` keeps two processes from writing the same output; ``stale_partials`` lists
what interrupted runs left beside an output (``df5t clean``).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import time
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path

#: Formats whose output is a folder (the rest are single files).
FOLDER_SUFFIXES = (".zarr",)
#: The provenance key our outputs carry (zarr: in the group's attributes).
PROVENANCE_KEY = "df5t"


class UnsafeOutput(ValueError):
    """An output that would delete, replace or alias something the run must not touch."""


class OutputLocked(ValueError):
    """Another process is writing the same output."""


def check_outputs(outputs: Mapping[str, str | Path | None], reads: Mapping[str, str | Path | None]) -> None:
    """Refuse, naming both paths and the fix, any output that could harm what the run reads
    (``reads``: label -> path), another output (``outputs``: label -> path) or a file or
    folder the run did not create; None entries are ignored. Labels are what the user typed
    them as (``--uncertainty``, ``input``, ...)."""
    outs = {label: Path(path) for label, path in outputs.items() if path is not None}
    ins = {label: Path(path) for label, path in reads.items() if path is not None}
    for label, out in outs.items():
        _check_kind(label, out)
        for read_label, read in ins.items():
            _check_pair(label, out, read_label, read, "it is read by this run")
        for other_label, other in outs.items():
            if other_label != label and _same(out, other):
                raise UnsafeOutput(f"{label} {out} and {other_label} {other} are the same path; give each its own")
        if out.exists():
            check_replaceable(label, out)


def _check_kind(label: str, out: Path) -> None:
    folder_format = out.suffix.lower() in FOLDER_SUFFIXES
    if out.is_dir() and not folder_format:
        raise UnsafeOutput(f"{label} {out} is a folder; give a file name (e.g. {out / 'restored.tif'})")
    if out.exists() and not out.is_dir() and folder_format:
        raise UnsafeOutput(f"{label} {out} is a file, and a {out.suffix} output is a folder; remove it or choose another path")


def _check_pair(label: str, out: Path, read_label: str, read: Path, why: str) -> None:
    if _same(out, read):
        raise UnsafeOutput(f"{label} {out} is the {read_label} {read} ({why}); choose another output path")
    if _inside(read, out):
        raise UnsafeOutput(f"{label} {out} holds the {read_label} {read}: replacing it would delete it; "
                           "choose another output path")
    if _inside(out, read):
        raise UnsafeOutput(f"{label} {out} lies inside the {read_label} {read}; write outside it")
    if out.is_dir() and read.is_file() and any(_same(member, read) for member in _files(out)):
        raise UnsafeOutput(f"{label} {out} holds a hard link to the {read_label} {read}: replacing it would "
                           "delete it; choose another output path")


def _same(a: Path, b: Path) -> bool:
    """The same file or folder: one path, or linked (symbolic or hard)."""
    if a.exists() and b.exists():
        return os.path.samefile(a, b)
    return a.resolve() == b.resolve()


def _inside(inner: Path, outer: Path) -> bool:
    """``inner`` lies strictly inside the folder ``outer`` (links resolved)."""
    inner, outer = inner.resolve(), outer.resolve()
    return inner != outer and inner.is_relative_to(outer)


def _files(folder: Path) -> Iterator[Path]:
    return (p for p in folder.rglob("*") if p.is_file() and not p.is_symlink())


def check_replaceable(label: str, out: Path) -> None:
    """An existing output is replaced only when it is one of ours; anything else (a user's
    file, a raw acquisition that happens to have the name) is never written over, whatever
    the options."""
    if not is_previous_output(out):
        raise UnsafeOutput(f"{label} {out} exists and is not an output of df5t-deploy (no {PROVENANCE_KEY!r} "
                           "provenance in it), so it is never replaced; move it yourself or choose another path")


def is_previous_output(path: Path) -> bool:
    """A file or folder store that df5t-deploy wrote: an image or folder store (zarr v2 or
    v3) whose metadata carries our provenance, or a model artifact that ``df5t export`` wrote."""
    if path.is_dir():
        return recorded_provenance(path) is not None
    from .artifact import ArtifactError, read_artifact
    from .formats import ImageFormatError, read_provenance

    try:
        if path.suffix.lower() == ".onnx":
            return bool(read_artifact(path))
        return read_provenance(path) is not None
    except (ArtifactError, ImageFormatError, OSError, ValueError):
        return False  # unreadable or not ours


def recorded_provenance(folder: Path) -> dict | None:
    """The provenance a folder output (or its partial) recorded, if any."""
    for metadata, attributes in ((folder / "zarr.json", ("attributes",)), (folder / ".zattrs", ())):
        try:
            record = json.loads(metadata.read_text())
        except (OSError, ValueError):
            continue
        for key in attributes:
            record = record.get(key, {}) if isinstance(record, dict) else {}
        if isinstance(record, dict) and isinstance(record.get(PROVENANCE_KEY), dict):
            return record[PROVENANCE_KEY]
    return None


# --------------------------------------------------------------------------- locks


def lock_path(output: Path) -> Path:
    return output.with_name(f".{output.name}.df5t-lock")


class OutputLock:
    """``.NAME.df5t-lock`` beside the output, created with O_EXCL (which, unlike flock, holds
    on network file systems), holding host, pid and run identity; removed on exit.

    A lock whose process is gone (same host, no such pid) is taken over with a warning;
    any other is refused unless ``break_lock``.
    """

    def __init__(self, output: str | Path, run_identity: dict | None, break_lock: bool = False):
        self.output, self.path = Path(output), lock_path(Path(output))
        self.record = {"host": socket.gethostname(), "pid": os.getpid(), "since": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                       "run_identity": run_identity}
        self.break_lock = break_lock

    def __enter__(self) -> OutputLock:
        for attempt in range(2):
            try:
                descriptor = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                if attempt == 0 and self._may_take_over():
                    self.path.unlink(missing_ok=True)
                    continue
                raise OutputLocked(self._held_message()) from None
            with os.fdopen(descriptor, "w") as f:
                json.dump(self.record, f)
            return self
        raise OutputLocked(self._held_message())

    def __exit__(self, *exc) -> None:
        if self._holder() == self.record:  # never remove a lock another process took over
            self.path.unlink(missing_ok=True)

    def _holder(self) -> dict | None:
        return _lock_holder(self.path)

    def _may_take_over(self) -> bool:
        holder = self._holder()
        if self.break_lock:
            warnings.warn(f"--break-lock: removing {self.path} ({_describe(holder)})", stacklevel=3)
            return True
        if holder and holder.get("host") == self.record["host"] and not _alive(holder.get("pid")):
            warnings.warn(f"taking over the stale lock {self.path} (pid {holder.get('pid')} on this host is gone)",
                          stacklevel=3)
            return True
        return False

    def _held_message(self) -> str:
        return (f"{self.output} is being written by another run ({_describe(self._holder())}, lock {self.path}); "
                "wait for it, or pass --break-lock if that run is gone")


def _lock_holder(lock: Path) -> dict | None:
    """What a lock file says of the run holding it (None: gone or unreadable)."""
    try:
        holder = json.loads(lock.read_text())
    except (OSError, ValueError):
        return None
    return holder if isinstance(holder, dict) else None


def _describe(holder: dict | None) -> str:
    if not holder:
        return "unreadable lock"
    return f"pid {holder.get('pid')} on {holder.get('host')} since {holder.get('since')}"


def _alive(pid) -> bool:
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


# --------------------------------------------------------------------------- leftovers


def stale_partials(output: str | Path) -> list[Path]:
    """What interrupted runs left beside ``output``: hidden partial files and folders, folders
    set aside while replacing, and locks whose process is gone."""
    output = Path(output)
    found = sorted(output.parent.glob(f".{output.stem}.partial-*{output.suffix}"))
    found += sorted(output.parent.glob(f".{output.name}.partial-*"))
    found += sorted(output.parent.glob(f".{output.name}.replaced-*"))
    lock = lock_path(output)
    if lock.exists():
        holder = _lock_holder(lock)
        if not holder or (holder.get("host") == socket.gethostname() and not _alive(holder.get("pid"))):
            found.append(lock)
    return list(dict.fromkeys(found))


def remove(paths: list[Path]) -> None:
    for path in paths:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()

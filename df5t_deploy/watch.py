"""``df5t watch IN_DIR -o OUT_DIR``: restore the files an acquisition program writes into a
folder, as they arrive.

A file is taken once it is complete: its size and modification time unchanged for
``settle`` seconds, and it opens as an image. Its output goes to OUT_DIR under the same name,
atomically, through ``pipeline.restore_file`` with all its safety. A file is never restored
twice, also across restarts: an output that records this input's run identity (input,
model, settings) means it is done; a changed input is restored again. A file that fails is
logged to ``OUT_DIR/failed.log`` (time, path, content sha256, reason) and not tried again
until its content changes, also across restarts.

File-system events (``watchdog``) wake the watcher as files arrive; ``poll`` seconds instead
scans the folder at that interval (network shares, where events do not arrive).
"""

from __future__ import annotations

import fnmatch
import os
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from .api import Restorer
from .batch import SAME_RUN, BatchSummary, earlier_output, make_output_folder
from .formats import SUPPORTED, ImageFormatError, open_source
from .pipeline import restore_file
from .run_identity import content_digest

#: Seconds a file's size and modification time must stay the same before it is taken.
DEFAULT_SETTLE_S = 2.0
#: A file that still does not open after this many settle periods is logged as failed.
SETTLES_BEFORE_UNREADABLE = 10
FAILED_LOG = "failed.log"
DEFAULT_PATTERNS = tuple(f"*{suffix}" for suffix in SUPPORTED)


@dataclass
class _Seen:
    """A file as last seen: its version (size, mtime) and since when it has not changed."""

    version: tuple[int, int]
    since: float


def check_folders(in_dir: Path, out_dir: Path) -> None:
    if not in_dir.is_dir():
        raise FileNotFoundError(f"{in_dir}: no such folder to watch")
    inside = out_dir.resolve()
    if inside == in_dir.resolve() or in_dir.resolve() in inside.parents:
        raise ValueError(f"the output folder {out_dir} is inside the watched folder {in_dir}, where the outputs "
                         "would be taken for new inputs; choose an output folder outside it")


class FolderWatcher:
    """Finds complete new files in ``in_dir`` and restores each into ``out_dir``."""

    def __init__(self, restorers: Sequence[Restorer], in_dir: str | Path, out_dir: str | Path, *,
                 patterns: Sequence[str] = DEFAULT_PATTERNS, settle: float = DEFAULT_SETTLE_S,
                 report: Callable[[str], None] = print, **restore_options):
        self.restorers, self.in_dir, self.out_dir = list(restorers), Path(in_dir), Path(out_dir)
        check_folders(self.in_dir, self.out_dir)
        if not settle >= 0:
            raise ValueError(f"--settle must be 0 or more seconds, got {settle}")
        self.patterns, self.settle, self.report = tuple(patterns), settle, report
        self.restore_options = restore_options
        self.summary = BatchSummary()  # restored, skipped, failed: as a folder run counts them
        self._seen: dict[Path, _Seen] = {}
        self._finished: dict[Path, tuple[int, int]] = {}  # restored, skipped or failed, at this version
        self._failed_before = _failures_logged(self.out_dir / FAILED_LOG)
        self._wake = threading.Event()

    def run(self, once: bool = False, poll: float | None = None) -> BatchSummary:
        """Watch until interrupted (``once``: until every file present at the start is done)."""
        make_output_folder(self.out_dir)
        observer = None if once else self._observer(poll)
        present = set(self._candidates()) if once else None
        try:
            while True:
                waiting = self.scan(present)
                if once and not waiting:
                    return self.summary
                self._wake.wait(min(0.5, self.settle / 2 if self.settle else 0.05) if waiting else (poll or 1.0))
                self._wake.clear()
        finally:
            if observer is not None:
                observer.stop()
                observer.join()

    def scan(self, among: set[Path] | None = None) -> int:
        """Take every file (of ``among``, if given) that has settled; return how many are
        still settling."""
        waiting = 0
        now = time.monotonic()
        for path in self._candidates():
            if among is not None and path not in among:
                continue
            version = _version(path)
            if version is None or self._finished.get(path) == version:
                continue
            seen = self._seen.get(path)
            if seen is None or seen.version != version:
                self._seen[path] = _Seen(version, now)
                waiting += 1
            elif now - seen.since < self.settle or not self._opens(path, now - seen.since):
                waiting += 1
            else:
                self._take(path, version)
        return waiting

    def _candidates(self) -> list[Path]:
        try:
            names = sorted(os.listdir(self.in_dir))
        except FileNotFoundError:
            raise FileNotFoundError(f"the watched folder {self.in_dir} is gone") from None
        return [self.in_dir / name for name in names
                if not name.startswith(".") and any(fnmatch.fnmatch(name.lower(), p.lower()) for p in self.patterns)]

    def _opens(self, path: Path, stable_for: float) -> bool:
        """Whether the file opens as an image; one that still does not after many settle
        periods is logged as failed (a damaged file, not one being written)."""
        try:
            with open_source(path):
                return True
        except (ImageFormatError, OSError) as err:
            if stable_for >= SETTLES_BEFORE_UNREADABLE * max(self.settle, 0.1):
                self._fail(path, _version(path), f"unreadable after {stable_for:.0f} s unchanged: {err}")
            return False

    def _take(self, path: Path, version: tuple[int, int]) -> None:
        out = self.out_dir / path.name
        options = self.restore_options
        earlier_failure = self._failed_before.get((path.name, _digest(path)))
        if earlier_failure is not None:
            self.summary.failed.append((path, earlier_failure))
            self.report(f"failed {path}: unchanged since it failed before ({earlier_failure}; {FAILED_LOG}); "
                        "not tried again until it changes")
            self._finished[path] = version
            return
        try:
            if earlier_output(self.restorers[0], path, out, options.get("series"), options.get("roi")) is SAME_RUN:
                self.summary.skipped.append(path)
                self.report(f"skipped {path}: {out} is its restoration by these settings and model")
            else:
                result = restore_file(self.restorers, path, out, **options)
                self.summary.restored.append(path)
                self.report(f"restored {path} -> {out} {result.output_shape} {result.dtype}")
        except Exception as err:  # one bad file is logged and the watcher goes on
            self._fail(path, version, str(err))
            return
        self._finished[path] = version
        self._seen.pop(path, None)

    def _fail(self, path: Path, version: tuple[int, int] | None, reason: str) -> None:
        reason = " ".join(reason.split())  # one line, whatever the message
        with open(self.out_dir / FAILED_LOG, "a", encoding="utf-8") as log:
            log.write(f"{time.strftime('%Y-%m-%dT%H:%M:%S%z')}\t{path}\t{_digest(path)}\t{reason}\n")
        self.summary.failed.append((path, reason))
        self.report(f"failed {path}: {reason}")
        if version is not None:
            self._finished[path] = version
        self._seen.pop(path, None)

    def _observer(self, poll: float | None):
        """Wake the loop on file-system events in the folder (polling every ``poll`` s if set)."""
        from watchdog.events import FileSystemEventHandler
        from watchdog.observers import Observer
        from watchdog.observers.polling import PollingObserver

        wake = self._wake

        class Wake(FileSystemEventHandler):
            def on_any_event(self, event):
                wake.set()

        observer = PollingObserver(timeout=poll) if poll else Observer()
        observer.schedule(Wake(), str(self.in_dir), recursive=False)
        observer.start()
        return observer


def _digest(path: Path) -> str:
    """The content a failure is remembered by ("-" for a file gone since)."""
    try:
        return content_digest(path)
    except OSError:
        return "-"


def _failures_logged(log: Path) -> dict[tuple[str, str], str]:
    """(file name, content sha256) -> reason, of every failure ``log`` records (none if absent)."""
    try:
        lines = log.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        return {}
    except (OSError, UnicodeDecodeError) as err:
        raise ValueError(f"{log}: cannot read the log of earlier failures ({err}); move it aside") from None
    failures = {}
    for line in lines:
        fields = line.split("\t")
        if len(fields) == 4:
            _, path, digest, reason = fields
            failures[(Path(path).name, digest)] = reason
    return failures


def _version(path: Path) -> tuple[int, int] | None:
    try:
        stat = path.stat()
    except FileNotFoundError:  # removed since listed
        return None
    return stat.st_size, stat.st_mtime_ns

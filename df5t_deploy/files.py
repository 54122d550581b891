"""File helpers: atomic outputs (a result appears complete under its final name, or not at
all), checksums and the cache root."""

from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import secrets
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def atomic_path(final: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``final``; rename it over ``final`` only on success.

    On any exception, Ctrl-C included, the temporary file is removed and ``final`` is left
    as it was. The temporary name keeps the final suffix, so writers that dispatch on it work.
    """
    tmp_path = temporary_sibling(final)
    try:
        yield tmp_path
        os.replace(tmp_path, final)
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise


def temporary_sibling(final: str | Path) -> Path:
    """A new empty file beside ``final`` (same folder, so a rename is atomic), same suffix.

    Created like any output (permissions from the umask, unlike mkstemp's 0600), under a
    hidden name that says it is partial.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    while True:
        tmp = final.with_name(f".{final.stem}.partial-{secrets.token_hex(4)}{final.suffix}")
        try:
            open(tmp, "xb").close()
            return tmp
        except FileExistsError:
            continue


def sha256_of(path: str | Path) -> str:
    """The file's sha256, computed once per version of the file (the same path, inode, size
    and modification time give the remembered digest: a model is hashed once per process)."""
    stat = os.stat(path)
    return _sha256((str(Path(path).resolve()), stat.st_ino, stat.st_size, stat.st_mtime_ns))


@functools.lru_cache(maxsize=64)
def _sha256(version: tuple) -> str:
    digest = hashlib.sha256()
    with open(version[0], "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def cache_root() -> Path:
    """df5t-deploy's cache folder: $DF5T_CACHE, else $XDG_CACHE_HOME/df5t-deploy, else ~/.cache/df5t-deploy."""
    explicit = os.environ.get("DF5T_CACHE")
    if explicit:
        return Path(explicit)
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "df5t-deploy"

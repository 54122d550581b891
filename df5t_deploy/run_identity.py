"""Run identity: what a run must match to recognise its own earlier work.

One definition for every place that asks "is this the same run?" (``--resume``, batch
skipping, watched folders): the input's content (sha256), the model's sha256, and a digest of
every setting that changes pixels. Identity is content, never a timestamp: a touched or
copied input is the same input. The input's size and modification time are recorded beside
it, in the provenance of every output (``run_identity``), for the record only.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import ClassVar

from .files import sha256_of

#: Provenance keys that do not change a single output pixel (where the model file lies, how
#: many GPUs shared the work, which backend ran it within rounding, how many tiles went into
#: one network call): left out of the digest. The model's content is its own field.
NOT_PIXEL_SETTINGS = frozenset({"software", "model", "backend", "devices", "run_identity", "model_sha256", "batch"})


@dataclass(frozen=True)
class RunIdentity:
    input_size: int = field(compare=False)
    input_mtime_ns: int = field(compare=False)
    input_sha256: str
    model_sha256: str
    settings_sha256: str

    #: How ``differences`` names a change of the input's content.
    CONTENT: ClassVar[str] = "the input's content"

    @classmethod
    def of(cls, input_path: str | Path, model_sha256: str, settings: dict) -> RunIdentity:
        """The identity of restoring ``input_path`` with a model and the provenance's settings."""
        stat = Path(input_path).stat()
        return cls(stat.st_size, stat.st_mtime_ns, content_digest(input_path), model_sha256, settings_digest(settings))

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, record: dict) -> RunIdentity | None:
        try:
            return cls(**{f.name: record[f.name] for f in fields(cls)})
        except (KeyError, TypeError):
            return None

    def differences(self, other: RunIdentity | None) -> list[str]:
        """What differs from ``other``, in words (empty: the same run)."""
        if other is None:
            return ["the earlier output records no run identity"]
        labels = {"input_sha256": self.CONTENT, "model_sha256": "the model",
                  "settings_sha256": "the settings that change pixels"}
        compared = [f.name for f in fields(self) if f.compare]
        return [labels[name] for name in compared if getattr(self, name) != getattr(other, name)]


def settings_digest(settings: dict) -> str:
    """sha256 of the pixel-changing settings (a provenance dict, minus NOT_PIXEL_SETTINGS)."""
    kept = {key: value for key, value in settings.items() if key not in NOT_PIXEL_SETTINGS}
    return hashlib.sha256(json.dumps(kept, sort_keys=True, default=str).encode()).hexdigest()


def content_digest(path: str | Path) -> str:
    """sha256 of a file, or of every file of a folder store (zarr) by relative name."""
    path = Path(path)
    if path.is_file():
        return sha256_of(path)
    digest = hashlib.sha256()
    for member in sorted(p for p in path.rglob("*") if p.is_file()):
        digest.update(str(member.relative_to(path)).encode() + b"\0" + sha256_of(member).encode())
    return digest.hexdigest()

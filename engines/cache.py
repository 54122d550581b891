"""The engine cache: one TensorRT plan per (artifact, TensorRT, GPU, precision, profile).

Layout, under the cache root (default ``~/.cache/df5t-deploy/engines``):

    <key>.plan    the serialised engine
    <key>.json    its sidecar: the key's fields, the artifact's DF5T metadata, build facts

A plan is only ever loaded after its sidecar matches the running TensorRT and GPU exactly;
anything else (no sidecar, another GPU or TensorRT, a different artifact) is rebuilt.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path

from ..files import atomic_path, cache_root

SIDECAR_FORMAT = 1


class EngineCacheError(ValueError):
    """A plan or sidecar that cannot be used; the message says why."""


@dataclass(frozen=True)
class BatchProfile:
    """The optimisation profile's batch sizes (the tile is static)."""

    min: int
    opt: int
    max: int

    def __post_init__(self):
        if not 1 <= self.min <= self.opt <= self.max:
            raise EngineCacheError(
                f"batch profile must satisfy 1 <= min <= opt <= max, got {self.min}/{self.opt}/{self.max}"
            )


@dataclass(frozen=True)
class EngineKey:
    artifact_sha256: str
    tensorrt_version: str
    gpu_name: str
    compute_capability: str  # e.g. "9.0"
    precision: str  # "fp16" (strongly typed from an fp16 artifact, or the FP16 flag) or "fp32"
    tile: int
    profile: BatchProfile

    @property
    def digest(self) -> str:
        text = json.dumps(asdict(self), sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:24]

    def to_dict(self) -> dict:
        return asdict(self)


def default_root() -> Path:
    return cache_root() / "engines"


class EngineCache:
    def __init__(self, root: str | Path | None = None):
        self.root = Path(root) if root is not None else default_root()

    def paths(self, key: EngineKey) -> tuple[Path, Path]:
        stem = self.root / key.digest
        return stem.with_suffix(".plan"), stem.with_suffix(".json")

    def lookup(self, key: EngineKey) -> Path | None:
        """The plan for ``key`` if one exists whose sidecar matches it exactly, else None."""
        plan, sidecar = self.paths(key)
        if not plan.is_file() or not sidecar.is_file():
            return None
        try:
            validate_sidecar(json.loads(sidecar.read_text()), key)
        except (EngineCacheError, ValueError):
            return None
        return plan

    def store(self, key: EngineKey, plan_bytes: bytes, metadata: dict, build: dict) -> Path:
        """Write the plan, then its sidecar (so a sidecar never describes a missing plan)."""
        plan, sidecar = self.paths(key)
        self.root.mkdir(parents=True, exist_ok=True)
        with atomic_path(plan) as tmp:
            tmp.write_bytes(plan_bytes)
        document = {"format": SIDECAR_FORMAT, "key": key.to_dict(), "artifact_metadata": metadata, "build": build}
        with atomic_path(sidecar) as tmp:
            tmp.write_text(json.dumps(document, indent=2) + "\n")
        return plan


def validate_sidecar(document: dict, key: EngineKey) -> None:
    """Raise EngineCacheError naming the first field in which a sidecar differs from ``key``."""
    if document.get("format") != SIDECAR_FORMAT:
        raise EngineCacheError(f"sidecar format {document.get('format')!r}, expected {SIDECAR_FORMAT}")
    stored = document.get("key")
    if not isinstance(stored, dict):
        raise EngineCacheError("sidecar has no key")
    expected = key.to_dict()
    for field, value in expected.items():
        if stored.get(field) != value:
            raise EngineCacheError(f"plan was built for {field}={stored.get(field)!r}, this run needs {value!r}")

"""The DF5T ONNX artifact contract (DESIGN.md): metadata keys and their validation.

The export writes these keys and every runtime backend reads them; this module is the one
place that defines them. It needs no ONNX library: callers pass the metadata map and the
input description their runtime already has.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

FORMAT_VERSION = "1"
KEY_FORMAT = "df5t.format"
KEY_SCHEDULE = "df5t.schedule"
KEY_ARCH = "df5t.arch"
KEY_SOURCE_SHA256 = "df5t.source_sha256"
REQUIRED_KEYS = (KEY_FORMAT, KEY_SCHEDULE)
SCHEDULE_FIELDS = ("beta_schedule", "beta_start", "beta_end", "num_diffusion_timesteps")


class ArtifactError(ValueError):
    """The model file does not follow the DF5T artifact contract."""


@dataclass(frozen=True)
class Schedule:
    """The diffusion schedule the network was trained with."""

    num_diffusion_timesteps: int
    beta_start: float = 1e-4
    beta_end: float = 0.02
    beta_schedule: str = "linear"

    def to_dict(self) -> dict:
        return {name: getattr(self, name) for name in SCHEDULE_FIELDS}

    def betas(self) -> np.ndarray:
        if self.beta_schedule != "linear":
            raise ArtifactError(f"unsupported beta schedule {self.beta_schedule!r} (only 'linear')")
        return np.linspace(
            self.beta_start, self.beta_end, self.num_diffusion_timesteps, dtype=np.float64
        )


@dataclass(frozen=True)
class ArtifactInfo:
    """What the runtime needs to know about a model, read off its artifact."""

    tile: int
    precision: str  # "fp32" or "fp16": the element type of x and eps
    schedule: Schedule
    arch: dict = field(default_factory=dict)
    source_sha256: str = ""

    def to_dict(self) -> dict:
        return {
            "tile": self.tile,
            "precision": self.precision,
            "schedule": self.schedule.to_dict(),
            "arch": self.arch,
            "source_sha256": self.source_sha256,
        }


def metadata_for(schedule: Schedule, arch: Mapping, source_sha256: str) -> dict[str, str]:
    """The metadata_props an export writes."""
    return {
        KEY_FORMAT: FORMAT_VERSION,
        KEY_SCHEDULE: json.dumps(schedule.to_dict()),
        KEY_ARCH: json.dumps(dict(arch)),
        KEY_SOURCE_SHA256: source_sha256,
    }


def parse_artifact(
    name: str, metadata: Mapping[str, str], x_shape: list, x_dtype: str
) -> ArtifactInfo:
    """Validate an artifact's metadata and input ``x`` and describe it.

    ``x_shape`` is the declared shape of input ``x`` (symbolic batch allowed), ``x_dtype``
    its element type as onnxruntime names it ("tensor(float)" or "tensor(float16)").
    """
    missing = [k for k in REQUIRED_KEYS if k not in metadata]
    if missing:
        raise ArtifactError(
            f"{name}: not a DF5T artifact: metadata {missing} missing. Export the checkpoint "
            "with `df5t export CHECKPOINT -o MODEL.onnx`, which writes it."
        )
    if metadata[KEY_FORMAT] != FORMAT_VERSION:
        raise ArtifactError(
            f"{name}: DF5T artifact format {metadata[KEY_FORMAT]!r}; this version of df5t-deploy "
            f"reads format {FORMAT_VERSION!r}. Re-export with this version."
        )
    return ArtifactInfo(
        tile=_tile_of(name, x_shape),
        precision=_precision_of(name, x_dtype),
        schedule=_schedule_of(name, metadata[KEY_SCHEDULE]),
        arch=json.loads(metadata.get(KEY_ARCH, "{}")),
        source_sha256=metadata.get(KEY_SOURCE_SHA256, ""),
    )


def _schedule_of(name: str, text: str) -> Schedule:
    try:
        values = json.loads(text)
        schedule = Schedule(**{k: values[k] for k in SCHEDULE_FIELDS})
    except (ValueError, KeyError, TypeError) as err:
        raise ArtifactError(f"{name}: malformed {KEY_SCHEDULE} metadata {text!r}: {err}") from None
    problem = schedule_problem(schedule)
    if problem:
        raise ArtifactError(f"{name}: {KEY_SCHEDULE} is not a valid DDPM schedule: {problem}; re-export the model")
    return schedule


#: More diffusion timesteps than any published schedule by far: a sign of a corrupt file.
MAX_DIFFUSION_TIMESTEPS = 100_000


def schedule_problem(schedule: Schedule) -> str | None:
    """What makes ``schedule`` unusable, or None: T a whole number in [1, 100000], betas
    finite and inside (0, 1) (else alpha-bar is not a decreasing product in (0, 1))."""
    steps = schedule.num_diffusion_timesteps
    if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= MAX_DIFFUSION_TIMESTEPS:
        return f"num_diffusion_timesteps {steps!r} is not a whole number from 1 to {MAX_DIFFUSION_TIMESTEPS}"
    if schedule.beta_schedule != "linear":
        return f"beta schedule {schedule.beta_schedule!r} is not supported (only 'linear')"
    for label in ("beta_start", "beta_end"):
        value = getattr(schedule, label)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 < float(value) < 1.0:
            return f"{label} {value!r} is not inside (0, 1)"
    return None


def _tile_of(name: str, shape: list) -> int:
    if len(shape) != 4 or shape[1] != 3 or not all(isinstance(s, int) for s in shape[2:]):
        raise ArtifactError(
            f"{name}: input x has shape {shape}; a DF5T artifact takes [B,3,H,W] with a static tile"
        )
    if shape[2] != shape[3]:
        raise ArtifactError(f"{name}: tile {shape[2]}x{shape[3]} is not square")
    return int(shape[2])


def _precision_of(name: str, dtype: str) -> str:
    precision = {"tensor(float)": "fp32", "tensor(float16)": "fp16"}.get(dtype)
    if precision is None:
        raise ArtifactError(f"{name}: input x is {dtype}; expected float or float16")
    return precision


# --------------------------------------------------------------------------- reading a file

#: ONNX TensorProto element types of the artifacts' ``x``, as onnxruntime names them.
_FLOAT = 1
_ELEMENT_TYPES = {_FLOAT: "tensor(float)", 7: "tensor(int64)", 10: "tensor(float16)"}


def read_artifact(path: str | Path) -> tuple[ArtifactInfo, dict[str, str]]:
    """An artifact's description and metadata, read from its ONNX ModelProto (protobuf wire
    format: metadata_props, and the graph's input ``x``) without an inference session or the
    onnx package: reading what a model is must not cost loading it."""
    path = Path(path)
    try:
        metadata, inputs = _model_proto(memoryview(path.read_bytes()))  # weights over 2 GB live outside it
    except (OSError, ValueError, IndexError) as err:
        raise ArtifactError(f"{path}: not a readable ONNX model ({err})") from None
    if set(inputs) != {"x", "t"}:
        raise ArtifactError(f"{path}: inputs {sorted(inputs)}; a DF5T artifact has x and t")
    t_type = inputs["t"][1]
    if t_type != _FLOAT:  # every backend feeds t as float32; anything else fails at the first call
        raise ArtifactError(f"{path}: input t is {_ELEMENT_TYPES.get(t_type, f'element type {t_type}')}; a DF5T "
                            "artifact takes t as float32 (tensor(float)): re-export it with `df5t export`")
    shape, element_type = inputs["x"]
    info = parse_artifact(str(path), metadata, shape, _ELEMENT_TYPES.get(element_type, f"element type {element_type}"))
    return info, metadata


def _model_proto(buffer: memoryview) -> tuple[dict[str, str], dict[str, tuple[list, int]]]:
    metadata, inputs = {}, {}
    for number, value in _fields(buffer):
        if number == 14:  # ModelProto.metadata_props: StringStringEntryProto {1: key, 2: value}
            entry = {n: bytes(v).decode() for n, v in _fields(value)}
            metadata[entry.get(1, "")] = entry.get(2, "")
        elif number == 7:  # ModelProto.graph
            for graph_field, graph_value in _fields(value):
                if graph_field == 11:  # GraphProto.input: ValueInfoProto {1: name, 2: type}
                    inputs.update([_value_info(graph_value)])
    return metadata, inputs


def _value_info(buffer: memoryview) -> tuple[str, tuple[list, int]]:
    name, shape, element_type = "", [], 0
    for number, value in _fields(buffer):
        if number == 1:
            name = bytes(value).decode()
        elif number == 2:  # TypeProto {1: tensor_type {1: elem_type, 2: shape {1: dim}}}
            for tensor_field, tensor in _fields(value):
                if tensor_field != 1:
                    continue
                for part, part_value in _fields(tensor):
                    if part == 1:
                        element_type = part_value
                    elif part == 2:
                        shape = [_dimension(dim) for n, dim in _fields(part_value) if n == 1]
    return name, (shape, element_type)


def _dimension(buffer: memoryview) -> int | str:
    """A TensorShapeProto.Dimension: dim_value (1) or dim_param (2)."""
    for number, value in _fields(buffer):
        return value if number == 1 else bytes(value).decode()
    return "?"


def _fields(buffer: memoryview):
    """(field number, value) of a protobuf message: ints for varints and fixed-width values,
    memoryviews for length-delimited fields."""
    position, end = 0, len(buffer)
    while position < end:
        key, position = _varint(buffer, position)
        number, wire_type = key >> 3, key & 7
        if wire_type == 0:
            value, position = _varint(buffer, position)
        elif wire_type == 2:
            length, position = _varint(buffer, position)
            if position + length > end:
                raise ValueError("a field runs past the end of the file (truncated?)")
            value, position = buffer[position : position + length], position + length
        elif wire_type in (1, 5):
            size = 8 if wire_type == 1 else 4
            value, position = int.from_bytes(buffer[position : position + size], "little"), position + size
        else:
            raise ValueError(f"protobuf wire type {wire_type} is not ONNX")
        yield number, value


def _varint(buffer: memoryview, position: int) -> tuple[int, int]:
    value, shift = 0, 0
    while True:
        byte = buffer[position]
        position += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, position
        shift += 7
        if shift > 63:
            raise ValueError("a varint longer than 64 bits")

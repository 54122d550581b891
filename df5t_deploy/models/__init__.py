"""Models shipped inside the package."""

from __future__ import annotations

from pathlib import Path

DEFAULT_MODEL = "df5t-small-em"


def default_model_path() -> Path:
    """The bundled model's ONNX artifact (see its model card beside it)."""
    path = Path(__file__).with_name(f"{DEFAULT_MODEL}.onnx")
    if not path.is_file():
        raise FileNotFoundError(
            f"the bundled model {path.name} is not installed; pass --model MODEL.onnx "
            "(make one with `df5t export CHECKPOINT -o MODEL.onnx`)"
        )
    return path

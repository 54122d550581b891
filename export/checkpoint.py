"""Loading DF5T checkpoints safely: tensors only, any width, errors that say what is wrong."""

from __future__ import annotations

import pickle
import re
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from ..files import sha256_of
from .network import DF5TNetwork, NetworkConfig
from .presets import Preset, matching_preset, nearest_preset

PREFIX = "restormer."
#: Keys under which training code commonly nests the weights, best first (EMA weights are the
#: ones meant for sampling).
WRAPPER_KEYS = ("ema", "ema_model", "model_ema", "state_dict", "model", "net", "params", "module")
_MAX_LISTED = 8


class CheckpointError(ValueError):
    """The file is not a loadable DF5T checkpoint; the message says why and what to do."""


@dataclass(frozen=True)
class LoadedCheckpoint:
    network: DF5TNetwork
    config: NetworkConfig
    preset: Preset | None
    sha256: str
    source: str  # where in the file the weights were found, e.g. "ema" or "top level"


def load_checkpoint(path: str | Path) -> LoadedCheckpoint:
    """Load a DF5T checkpoint into a network in eval mode, inferring its architecture."""
    path = Path(path)
    raw = _read_tensors_only(path)
    state, source = _find_state_dict(raw, path)
    state = _normalise_keys(state)
    config = infer_config(state, path)
    network = DF5TNetwork(config)
    _check_keys(network.state_dict(), state, config, path)
    network.load_state_dict(state, strict=True)
    return LoadedCheckpoint(network.eval(), config, matching_preset(config), sha256_of(path), source)


def _read_tensors_only(path: Path) -> object:
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        blocked = re.search(r"unsupported GLOBAL \S+", str(err))
        if blocked is None:  # not a pickle at all
            raise _unreadable(path, err) from err
        raise CheckpointError(
            f"{path}: refused to load: the file holds Python objects other than tensors, and "
            f"loading it could execute code ({blocked.group(0)}). Only plain state dicts are "
            "accepted; re-save the weights with torch.save(model.state_dict(), path) from code "
            "you trust."
        ) from err
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError) as err:
        raise _unreadable(path, err) from err


def _unreadable(path: Path, err: BaseException) -> CheckpointError:
    # torch's own message is long; its useful part follows "WeightsUnpickler error:" if present
    detail = re.search(r"WeightsUnpickler error:\s*(\S[^\n]*)", str(err))
    lines = str(err).strip().splitlines()
    reason = detail.group(1) if detail else (lines[0] if lines else type(err).__name__)
    return CheckpointError(
        f"{path}: not a readable PyTorch checkpoint, possibly truncated or corrupted "
        f"({reason.strip()}). Check the file and its size."
    )


def _is_state_dict(obj: object) -> bool:
    return (
        isinstance(obj, Mapping)
        and len(obj) > 0
        and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())
    )


def _find_state_dict(obj: object, path: Path) -> tuple[dict[str, torch.Tensor], str]:
    """The tensors of the checkpoint, unwrapped from the usual training containers."""
    if _is_state_dict(obj):
        return dict(obj), "top level"
    if isinstance(obj, Mapping):
        for key in WRAPPER_KEYS:
            if key in obj:
                try:
                    state, inner = _find_state_dict(obj[key], path)
                except CheckpointError:
                    continue
                return state, key if inner == "top level" else f"{key}/{inner}"
    found = list(obj.keys())[:_MAX_LISTED] if isinstance(obj, Mapping) else type(obj).__name__
    raise CheckpointError(
        f"{path}: no state dict found (top level holds {found}). Expected a mapping of names "
        f"to tensors, at the top level or under one of {list(WRAPPER_KEYS)}."
    )


def _normalise_keys(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Strip DataParallel's ``module.`` prefixes and add ``restormer.`` to a bare core."""
    out = {}
    for key, value in state.items():
        while key.startswith("module."):
            key = key[len("module."):]
        if not key.startswith(PREFIX) and key.split(".")[0] in _CORE_MODULES:
            key = PREFIX + key
        out[key] = value
    return out


_CORE_MODULES = frozenset(DF5TNetwork(NetworkConfig(8, 1, 1)).restormer._modules)


def infer_config(state: Mapping[str, torch.Tensor], path: Path | str = "checkpoint") -> NetworkConfig:
    """C, N, h0 and the output channels, read off the tensor shapes."""
    try:
        width = state[PREFIX + "patch_embed.proj.weight"].shape[0]
        heads = state[PREFIX + "encoder_level1.blocks.0.attn.temperature"].shape[0]
        out_channels = state[PREFIX + "output.weight"].shape[0]
    except KeyError as err:
        raise CheckpointError(
            f"{path}: not a DF5T checkpoint: key {err.args[0]!r} is missing "
            f"({len(state)} tensors, e.g. {list(state)[:3]}). {_nearest_hint(None)}"
        ) from None
    block = re.compile(re.escape(PREFIX) + r"encoder_level1\.blocks\.(\d+)\.")
    depth = 1 + max((int(m.group(1)) for k in state if (m := block.match(k))), default=-1)
    if out_channels not in (3, 6) or depth < 1:
        raise CheckpointError(
            f"{path}: not a DF5T checkpoint: {out_channels} output channels (expected 3 or 6) "
            f"and {depth} blocks per level. {_nearest_hint(width)}"
        )
    return NetworkConfig(width, depth, heads, learn_sigma=out_channels == 6)


def _nearest_hint(width: int | None) -> str:
    if width is None:
        return "DF5T checkpoints are the published model_512.pt files (preset df5t-512)."
    preset = nearest_preset(width)
    return f"Nearest preset: {preset.name} (C={preset.network.num_channels})."


def _check_keys(
    expected: Mapping[str, torch.Tensor],
    state: Mapping[str, torch.Tensor],
    config: NetworkConfig,
    path: Path,
) -> None:
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    misshaped = [
        f"{k}: {tuple(state[k].shape)} in file, {tuple(v.shape)} expected"
        for k, v in expected.items()
        if k in state and state[k].shape != v.shape
    ]
    if not (missing or unexpected or misshaped):
        return
    problems = [
        f"{label} ({len(items)}): {', '.join(items[:_MAX_LISTED])}{' ...' if len(items) > _MAX_LISTED else ''}"
        for label, items in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", misshaped))
        if items
    ]
    raise CheckpointError(
        f"{path}: does not match the DF5T network inferred from it (C={config.num_channels}, "
        f"N={config.num_res_blocks}, h0={config.num_heads}, out={config.out_channels}):\n  "
        + "\n  ".join(problems)
        + f"\n{_nearest_hint(config.num_channels)} A truncated or foreign checkpoint looks like this."
    )

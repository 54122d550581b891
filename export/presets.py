"""The published DF5T configurations (REFERENCE.md section 3) and their diffusion schedules."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from ..artifact import Schedule
from .network import NetworkConfig


@dataclass(frozen=True)
class Preset:
    name: str
    network: NetworkConfig
    schedule: Schedule
    training_size: int
    num_parameters: int


PRESETS: dict[str, Preset] = {
    p.name: p
    for p in (
        Preset("df5t-512", NetworkConfig(64, 2, 4, True), Schedule(1000), 512, 23_252_036),
        Preset("df5t-256", NetworkConfig(256, 2, 4, True), Schedule(1500), 256, 368_919_740),
    )
}

#: The schedule assumed for a width that matches no preset and gets no explicit T.
DEFAULT_SCHEDULE = Schedule(1000)
#: The tile used for a width that matches no preset.
DEFAULT_TILE = 256


def matching_preset(config: NetworkConfig) -> Preset | None:
    """The preset with exactly this architecture, if any."""
    return next((p for p in PRESETS.values() if p.network == config), None)


def nearest_preset(num_channels: int) -> Preset:
    """The preset whose width is closest to ``num_channels`` (for error messages)."""
    return min(PRESETS.values(), key=lambda p: abs(p.network.num_channels - num_channels))


def resolve_schedule(
    preset: Preset | None, diffusion_steps: int | None, warn: Callable[[str], None]
) -> Schedule:
    """The schedule of an export: an explicit T, else the preset's, else T=1000 with a warning."""
    if diffusion_steps is not None:
        if diffusion_steps < 1:
            raise ValueError(f"--diffusion-steps must be positive, got {diffusion_steps}")
        return Schedule(diffusion_steps)
    if preset is not None:
        return preset.schedule
    warn(
        f"the network matches no preset; assuming T={DEFAULT_SCHEDULE.num_diffusion_timesteps} "
        "linear betas 1e-4..0.02. Pass --diffusion-steps if it was trained with another T."
    )
    return DEFAULT_SCHEDULE

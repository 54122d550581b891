"""Train a small DF5T network on real EM with the standard DDPM objective.

    python -m df5t_deploy.export.train --data ../shared/data/em --out runs/df5t-small-em

predicts the noise (linear betas 1e-4..0.02, T = 1000) from random augmented crops (see
``train_data.CropSampler``), keeps EMA weights, and writes a resumable training state every
few minutes and when stopped (SIGTERM, Ctrl-C): run the same command again to continue where
it stopped. When the step or time budget is spent it writes ``ema.pt`` (a plain state dict of
the EMA weights, what ``df5t export`` takes) and ``training.json`` (the facts a model card
needs).

``--device cuda`` trains on a GPU. The random draws (crops, timesteps, noise) are made on the
CPU whatever the device, so a run may move between devices when resumed: the device is not one
of the run's settings.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import signal
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from ..artifact import Schedule
from ..files import atomic_path
from .network import DF5TNetwork, NetworkConfig
from .train_data import (
    FLYEM_HELDOUT_PLANES,
    FLYEM_TRAIN_PLANES,
    FLYEM_VOLUME,
    MUSSEL_HELDOUT,
    MUSSEL_TRAIN,
    CropSampler,
    load_training_sources,
)


@dataclass(frozen=True)
class TrainConfig:
    num_channels: int = 32
    num_res_blocks: int = 1
    num_heads: int = 1
    crop: int = 64
    batch: int = 16
    lr: float = 3e-4
    warmup_steps: int = 200
    cooldown_steps: int = 0  # the last steps before max_steps decay the learning rate linearly to 0
    ema_decay: float = 0.999
    max_steps: int = 200_000
    max_minutes: float = 600.0
    seed: int = 0
    threads: int = 2
    checkpoint_minutes: float = 5.0
    diffusion_steps: int = 1000
    max_scale: int = 2  # crops also at 1/2 the pixel size (block means): see CropSampler
    contrast_jitter: float = 0.2
    brightness_jitter: float = 0.1
    bf16: bool = False  # bfloat16 autocast (benchmarks/train_settings.py measures whether it pays)
    compile: bool = False  # torch.compile the training step's network (measured there too)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, type=Path, help="folder with the real EM files")
    parser.add_argument("--out", required=True, type=Path, help="run folder (resumes if it holds a state)")
    parser.add_argument("--device", default="cpu", help="where the network trains: cpu (default), cuda, cuda:1, ...")
    for name, default in asdict(TrainConfig()).items():
        flag = "--" + name.replace("_", "-")
        if isinstance(default, bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=default)
        else:
            parser.add_argument(flag, type=type(default), default=default)
    args = vars(parser.parse_args(argv))
    data, out, device = args.pop("data"), args.pop("out"), args.pop("device")
    train(TrainConfig(**args), data, out, device)


def train(config: TrainConfig, data_dir: Path, out: Path, device: str = "cpu") -> Path:
    """Run (or resume) training on ``device``; returns the path of the EMA state dict."""
    torch.set_num_threads(config.threads)
    device = training_device(device)
    out.mkdir(parents=True, exist_ok=True)
    sampler = crop_sampler(config, data_dir)
    run = TrainingRun.resume_or_start(config, out / "state.pt", device)
    alphas_bar = torch.from_numpy(np.cumprod(1.0 - Schedule(config.diffusion_steps).betas())).float()
    budget_s = config.max_minutes * 60.0 - run.seconds
    session_start = last_save = time.monotonic()
    bar = tqdm(total=config.max_steps, initial=run.step, desc="training", unit="step")
    with _stop_requests() as stop:
        while run.step < config.max_steps and time.monotonic() - session_start < budget_s and not stop:
            loss = run.train_step(sampler, alphas_bar)
            bar.update(1)
            bar.set_postfix(loss=f"{run.loss_avg:.4f}", last=f"{loss:.4f}")
            if time.monotonic() - last_save > config.checkpoint_minutes * 60.0:
                run.seconds += time.monotonic() - last_save
                last_save = time.monotonic()
                run.save(out / "state.pt")
    bar.close()
    run.seconds += time.monotonic() - last_save
    run.save(out / "state.pt")
    if stop:
        raise SystemExit(f"stopped by {stop[0]} after step {run.step}; {out / 'state.pt'} resumes from there")
    return _write_results(run, config, out)


def training_device(name: str) -> torch.device:
    """``name`` as a torch device, refused in one line if this machine has no such device."""
    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise SystemExit(f"--device {name}: not a device ({err}); use cpu or cuda") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"--device {name}: this PyTorch sees no CUDA GPU; train with --device cpu")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise SystemExit(f"--device {name}: there are {torch.cuda.device_count()} CUDA GPUs")
    if device.type not in ("cpu", "cuda"):
        raise SystemExit(f"--device {name}: training runs on cpu or cuda")
    return device


@contextlib.contextmanager
def _stop_requests():
    """A list that SIGTERM or SIGINT (Ctrl-C) appends its name to: the step under way finishes
    and the state is saved, so a stopped run loses no work."""
    requests: list[str] = []

    def request(signum, _frame):
        requests.append(signal.Signals(signum).name)

    if threading.current_thread() is not threading.main_thread():  # only the main thread takes signals
        yield requests
        return
    previous = {sig: signal.signal(sig, request) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield requests
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def crop_sampler(config: TrainConfig, data_dir: Path) -> CropSampler:
    return CropSampler(*load_training_sources(data_dir), crop=config.crop, max_scale=config.max_scale,
                       contrast_jitter=config.contrast_jitter, brightness_jitter=config.brightness_jitter)


#: Steps between the points of the loss curve a run keeps.
LOSS_CURVE_EVERY = 25

#: Settings that may change when a run is resumed (they change the budget, where the learning
#: rate's decay ends it, or only the rounding); all others must match the saved state. The
#: cooldown is among them because a constant-rate run is cooled down once its length is known.
_RESUMABLE_CHANGES = frozenset({"max_steps", "max_minutes", "threads", "checkpoint_minutes", "compile",
                                "cooldown_steps"})


class TrainingRun:
    """The mutable state of one training run, saved and restored as a whole."""

    def __init__(self, config: TrainConfig, device: torch.device = torch.device("cpu")):
        torch.manual_seed(config.seed)
        net_config = NetworkConfig(config.num_channels, config.num_res_blocks, config.num_heads, learn_sigma=False)
        self.config, self.device = config, device
        self.model = DF5TNetwork(net_config).to(device).train()
        # Only the step's forward is compiled: the module stays eager, so its state dict, the EMA
        # and any evaluation see the plain network (and evaluating triggers no recompilation).
        self.step_model = torch.compile(self.model) if config.compile else self.model
        self.ema = copy.deepcopy(self.model).eval().requires_grad_(False)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=config.lr, weight_decay=0.0)
        self.rng = np.random.default_rng(config.seed)
        self.step = 0
        self.seconds = 0.0
        self.loss_avg = float("nan")
        self.loss_curve: list[tuple[int, float]] = []  # (step, loss EMA) every LOSS_CURVE_EVERY steps

    @classmethod
    def resume_or_start(cls, config: TrainConfig, path: Path, device: torch.device = torch.device("cpu")) -> "TrainingRun":
        run = cls(config, device)
        if path.exists():
            state = torch.load(path, map_location="cpu", weights_only=True)
            changed = {
                k: (v, state["config"].get(k))
                for k, v in asdict(config).items()
                if k not in _RESUMABLE_CHANGES and state["config"].get(k) != v
            }
            if changed:
                raise SystemExit(f"{path} was trained with other settings (now, then): {changed}")
            run.model.load_state_dict(state["model"])
            run.ema.load_state_dict(state["ema"])
            run.optimizer.load_state_dict(_by_current_order(state["optimizer"], state["param_names"], run.model))
            run.rng.bit_generator.state = state["numpy_rng"]
            torch.set_rng_state(state["torch_rng"])
            run.step, run.seconds, run.loss_avg = state["step"], state["seconds"], state["loss_avg"]
            run.loss_curve = [tuple(point) for point in state.get("loss_curve", [])]  # states before the curve: none
            print(f"resumed {path} at step {run.step} ({run.seconds / 60:.1f} min trained)")
        return run

    def train_step(self, sampler: CropSampler, alphas_bar: torch.Tensor) -> float:
        cfg = self.config
        # Drawn on the CPU on every device, so that the stream of draws is the run's own.
        x0 = torch.from_numpy(sampler.batch(self.rng, cfg.batch)).expand(-1, 3, -1, -1)
        t = torch.randint(0, len(alphas_bar), (cfg.batch,))
        noise = torch.randn(cfg.batch, 3, cfg.crop, cfg.crop)
        a = alphas_bar[t][:, None, None, None]
        xt = (a.sqrt() * x0 + (1 - a).sqrt() * noise).to(self.device)
        t, noise = t.to(self.device), noise.to(self.device)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=cfg.bf16):
            eps = self.step_model(xt, t.float())[:, :3]
        loss = torch.nn.functional.mse_loss(eps.float(), noise)
        for group in self.optimizer.param_groups:
            group["lr"] = learning_rate(cfg, self.step)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.optimizer.step()
        self._update_ema()
        self.step += 1
        value = loss.detach().item()
        self.loss_avg = value if np.isnan(self.loss_avg) else 0.99 * self.loss_avg + 0.01 * value
        if self.step % LOSS_CURVE_EVERY == 0:
            self.loss_curve.append((self.step, self.loss_avg))
        return value

    @torch.no_grad()
    def _update_ema(self) -> None:
        # Short warm-up of the decay so early EMA weights are not dominated by the random init.
        decay = min(self.config.ema_decay, (1 + self.step) / (10 + self.step))
        for ema_p, p in zip(self.ema.parameters(), self.model.parameters()):
            ema_p.lerp_(p, 1.0 - decay)

    def save(self, path: Path) -> None:
        state = {
            "config": asdict(self.config),
            "model": on_cpu(self.model.state_dict()),
            "ema": on_cpu(self.ema.state_dict()),
            "optimizer": on_cpu(self.optimizer.state_dict()),
            "param_names": [name for name, _ in self.model.named_parameters()],
            "numpy_rng": self.rng.bit_generator.state,
            "torch_rng": torch.get_rng_state(),
            "step": self.step,
            "seconds": self.seconds,
            "loss_avg": self.loss_avg,
            "loss_curve": self.loss_curve,
        }
        with atomic_path(path) as tmp:
            torch.save(state, tmp)


def learning_rate(config: TrainConfig, step: int) -> float:
    """The rate for ``step`` (0-based): a linear warm-up, constant, then a linear cooldown to 0
    over the last ``cooldown_steps`` before ``max_steps`` (warm-up, stable, decay: the decay takes
    the loss below the constant rate's plateau)."""
    warmup = min(1.0, (step + 1) / config.warmup_steps)
    cooldown = 1.0 if config.cooldown_steps <= 0 else min(1.0, (config.max_steps - step) / config.cooldown_steps)
    return config.lr * warmup * max(cooldown, 0.0)


def on_cpu(state):
    """A (nested) state dict with every tensor on the CPU: files that load on any machine."""
    if isinstance(state, torch.Tensor):
        return state.cpu()
    if isinstance(state, dict):
        return {key: on_cpu(value) for key, value in state.items()}
    if isinstance(state, (list, tuple)):
        return type(state)(on_cpu(value) for value in state)
    return state


def _by_current_order(optimizer_state: dict, saved_names: list[str], model: torch.nn.Module) -> dict:
    """The optimizer state re-indexed by parameter name: the saved indices follow the saved
    model's parameter order, which need not be this code's."""
    current = [name for name, _ in model.named_parameters()]
    if sorted(saved_names) != sorted(current):
        raise SystemExit("the saved training state belongs to a network with other parameters")
    position = {name: i for i, name in enumerate(current)}
    remapped = {position[saved_names[i]]: value for i, value in optimizer_state["state"].items()}
    return {**optimizer_state, "state": remapped}


def _write_results(run: TrainingRun, config: TrainConfig, out: Path) -> Path:
    weights = out / "ema.pt"
    with atomic_path(weights) as tmp:
        torch.save(on_cpu(run.ema.state_dict()), tmp)
    facts = {
        "config": asdict(config),
        "steps": run.step,
        "samples_seen": run.step * config.batch,
        "wall_time_minutes": round(run.seconds / 60.0, 1),
        "final_loss_ema": round(run.loss_avg, 5),
        "loss_curve": [[step, round(loss, 5)] for step, loss in run.loss_curve],
        "parameters": sum(p.numel() for p in run.ema.parameters()),
        "schedule": Schedule(config.diffusion_steps).to_dict(),
        "training_data": {
            FLYEM_VOLUME: f"planes z {FLYEM_TRAIN_PLANES.start}..{FLYEM_TRAIN_PLANES.stop - 1} (XY, XZ, YZ crops)",
            MUSSEL_TRAIN: "whole tile",
        },
        "held_out": {
            FLYEM_VOLUME: f"planes z >= {FLYEM_HELDOUT_PLANES.start}",
            MUSSEL_HELDOUT: "whole tile",
        },
        "torch": torch.__version__,
    }
    with atomic_path(out / "training.json") as tmp:
        tmp.write_text(json.dumps(facts, indent=2) + "\n")
    print(f"wrote {weights} after {run.step} steps, {facts['wall_time_minutes']} min, loss {run.loss_avg:.4f}")
    return weights


if __name__ == "__main__":
    main()

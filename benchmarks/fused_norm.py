"""The channel LayerNorm as one fused op against the package's decomposed form, in one run.

    python benchmarks/fused_norm.py [--tiles 64 256] [--batches 1 4] [--repeats 5]

Exports the same network twice through `df5t export`'s own path: once as the package writes
it (mean, centred square, rsqrt, scale and shift: about eleven elementwise nodes per norm)
and once with the candidate fused form (F.layer_norm on a channels-last view: Transpose,
LayerNormalization, Transpose in the ONNX graph). Networks: the bundled df5t-small-em
(its trained weights) and the df5t-512 architecture (random weights: speed does not depend on
them). For each: ONNX node counts, nodes per norm, onnxruntime CPU time per forward (median
of the repeats, after a warm-up) at each tile and batch, and the largest difference between
the two artifacts' eps. Writes benchmarks/results/fused-norm/fused_norm.json and prints a table.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "benchmarks" / "results" / "fused-norm"


def fused_norm(self, x):
    """The candidate ChannelLayerNorm.forward: one LayerNormalization on a channels-last view."""
    import torch.nn.functional as F

    channels_last = x.float().permute(0, 2, 3, 1)
    normed = F.layer_norm(channels_last, (channels_last.shape[-1],), self.body.weight.float(),
                          self.body.bias.float(), 1e-5)
    return normed.permute(0, 3, 1, 2).to(x.dtype)


@contextlib.contextmanager
def norm_form(form: str):
    from df5t_deploy.export.network import ChannelLayerNorm

    package_form = ChannelLayerNorm.forward
    if form == "fused":
        ChannelLayerNorm.forward = fused_norm
    try:
        yield
    finally:
        ChannelLayerNorm.forward = package_form


def checkpoints(scratch: Path) -> dict[str, Path]:
    import torch

    from df5t_deploy.export.network import DF5TNetwork
    from df5t_deploy.export.presets import PRESETS

    torch.manual_seed(0)
    big = scratch / "df5t-512-random.pt"
    torch.save(DF5TNetwork(PRESETS["df5t-512"].network).state_dict(), big)
    return {"df5t-small-em": REPO / "df5t_deploy" / "models" / "df5t-small-em.pt", "df5t-512 (random)": big}


def export(checkpoint: Path, tile: int, form: str, out: Path) -> Path:
    from df5t_deploy.export.checkpoint import load_checkpoint
    from df5t_deploy.export.onnx_export import export_checkpoint
    from df5t_deploy.export.presets import resolve_schedule

    loaded = load_checkpoint(checkpoint)
    with norm_form(form):
        export_checkpoint(loaded, out, tile=tile, schedule=resolve_schedule(loaded.preset, None, lambda m: None),
                          log=lambda message: None)
    return out


def graph_facts(path: Path) -> dict:
    import onnx

    ops = collections.Counter(node.op_type for node in onnx.load(path, load_external_data=False).graph.node)
    return {"nodes": sum(ops.values()), "ops": dict(ops.most_common())}


def time_forward(path: Path, tile: int, batch: int, repeats: int) -> tuple[float, np.ndarray]:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = os.cpu_count() or 1
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(1)
    x = rng.standard_normal((batch, 3, tile, tile)).astype(np.float32)
    t = np.full(batch, 500.0, np.float32)
    eps = session.run(["eps"], {"x": x, "t": t})[0]  # warm-up
    seconds = []
    for _ in range(repeats):
        started = time.perf_counter()
        session.run(["eps"], {"x": x, "t": t})
        seconds.append(time.perf_counter() - started)
    return statistics.median(seconds), eps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiles", type=int, nargs="+", default=[64, 256])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(prefix="df5t-fused-norm-") as scratch:
        scratch = Path(scratch)
        for name, checkpoint in checkpoints(scratch).items():
            for tile in args.tiles:
                paths = {form: export(checkpoint, tile, form, scratch / f"{form}-{tile}.onnx")
                         for form in ("decomposed", "fused")}
                facts = {form: graph_facts(path) for form, path in paths.items()}
                for batch in args.batches:
                    # interleaved, so that a change in the machine's load hits both alike
                    timed = {form: time_forward(path, tile, batch, args.repeats) for form, path in paths.items()}
                    difference = float(np.abs(timed["fused"][1] - timed["decomposed"][1]).max())
                    rows.append({
                        "network": name, "tile": tile, "batch": batch,
                        "nodes_decomposed": facts["decomposed"]["nodes"], "nodes_fused": facts["fused"]["nodes"],
                        "ms_decomposed": 1e3 * timed["decomposed"][0], "ms_fused": 1e3 * timed["fused"][0],
                        "speedup": timed["decomposed"][0] / timed["fused"][0], "max_abs_eps_difference": difference,
                        "ops_fused": facts["fused"]["ops"], "ops_decomposed": facts["decomposed"]["ops"],
                    })
                    print(_line(rows[-1]), flush=True)
    OUT.mkdir(parents=True, exist_ok=True)
    record = {"machine": {"cpu_count": os.cpu_count(), "processor": platform.processor() or platform.machine()},
              "repeats": args.repeats, "rows": rows}
    (OUT / "fused_norm.json").write_text(json.dumps(record, indent=1) + "\n")
    print(f"wrote {OUT / 'fused_norm.json'}")


def _line(row: dict) -> str:
    return (f"{row['network']:>18} tile {row['tile']:>3} batch {row['batch']}: nodes {row['nodes_decomposed']} -> "
            f"{row['nodes_fused']}, {row['ms_decomposed']:.1f} -> {row['ms_fused']:.1f} ms per forward "
            f"({row['speedup']:.2f}x), max |eps difference| {row['max_abs_eps_difference']:.2e}")


if __name__ == "__main__":
    main()

"""Small ONNX models that honour the DF5T artifact contract, with known behaviour, for tests.

Built with onnx.helper, so runtime tests need neither PyTorch nor a trained network.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from df5t_deploy.artifact import Schedule, metadata_for

SCHEDULE = Schedule(1000)


def alphas_bar(schedule: Schedule = SCHEDULE) -> np.ndarray:
    return np.cumprod(1.0 - schedule.betas())


def _io(tile: int):
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3, tile, tile])
    t = helper.make_tensor_value_info("t", TensorProto.FLOAT, ["batch"])
    eps = helper.make_tensor_value_info("eps", TensorProto.FLOAT, ["batch", 3, tile, tile])
    return x, t, eps


def _save(nodes, initializers, path: Path, tile: int, metadata: bool = True) -> Path:
    x, t, eps = _io(tile)
    graph = helper.make_graph(nodes, "df5t-test", [x, t], [eps], initializer=initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    if metadata:
        for key, value in metadata_for(SCHEDULE, {"test_model": True}, "0" * 64).items():
            model.metadata_props.add(key=key, value=value)
    onnx.checker.check_model(model)
    onnx.save(model, path)
    return path


def _per_timestep(name: str, table: np.ndarray) -> tuple[list, list]:
    """Nodes that look up ``table[t]`` and shape it [B,1,1,1] as ``name``."""
    nodes = [
        helper.make_node("Cast", ["t"], ["t_index"], to=TensorProto.INT64),
        helper.make_node("Gather", [f"{name}_table", "t_index"], [f"{name}_flat"]),
        helper.make_node("Reshape", [f"{name}_flat", "shape_b111"], [name]),
    ]
    inits = [numpy_helper.from_array(table.astype(np.float32), f"{name}_table")]
    return nodes, inits


def affine_model(path: Path, tile: int, a: np.ndarray, b: np.ndarray) -> Path:
    """eps = a[t] * x + b[t]."""
    nodes_a, inits_a = _per_timestep("a", a)
    nodes_b, inits_b = _per_timestep("b", b)
    for n in nodes_b:  # the Cast is shared
        if n.op_type == "Cast":
            nodes_b.remove(n)
    nodes = nodes_a + nodes_b + [
        helper.make_node("Mul", ["a", "x"], ["ax"]),
        helper.make_node("Add", ["ax", "b"], ["eps"]),
    ]
    shape = numpy_helper.from_array(np.array([-1, 1, 1, 1], dtype=np.int64), "shape_b111")
    return _save(nodes, inits_a + inits_b + [shape], path, tile)


def gaussian_prior_denoiser(path: Path, tile: int, prior_std: float) -> Path:
    """The exact eps-predictor for x0 ~ N(0, prior_std^2 I): linear in x."""
    ab = alphas_bar()
    k = np.sqrt(1 - ab) / (ab * prior_std**2 + 1 - ab)
    return affine_model(path, tile, k, np.zeros_like(k))


def exact_denoiser(path: Path, tile: int, x0: float) -> Path:
    """The exact eps for the constant image x0 (model scale): eps = (x - sqrt(ab) x0)/sqrt(1-ab)."""
    ab = alphas_bar()
    return affine_model(path, tile, 1 / np.sqrt(1 - ab), -x0 * np.sqrt(ab) / np.sqrt(1 - ab))


def tile_mean_model(path: Path, tile: int, gain: float = 1.0, metadata: bool = True) -> Path:
    """eps = gain * (x - mean of the tile): every output pixel depends on the whole tile."""
    nodes = [
        helper.make_node("ReduceMean", ["x", "axes_hw"], ["m"], keepdims=1),
        helper.make_node("Sub", ["x", "m"], ["centred"]),
        helper.make_node("Mul", ["centred", "gain"], ["eps"]),
    ]
    inits = [
        numpy_helper.from_array(np.array([1, 2, 3], dtype=np.int64), "axes_hw"),
        numpy_helper.from_array(np.array(gain, dtype=np.float32), "gain"),
    ]
    return _save(nodes, inits, path, tile, metadata)


def local_conv_model(path: Path, tile: int) -> Path:
    """eps = a fixed 3x3 convolution of x: purely local."""
    rng = np.random.default_rng(0)
    weight = (rng.standard_normal((3, 3, 3, 3)) * 0.2).astype(np.float32)
    weight[np.arange(3), np.arange(3), 1, 1] += 0.5
    nodes = [helper.make_node("Conv", ["x", "w"], ["eps"], pads=[1, 1, 1, 1])]
    return _save(nodes, [numpy_helper.from_array(weight, "w")], path, tile)


def with_metadata(source: Path, path: Path, key: str, value: str) -> Path:
    """A copy of the model at ``source`` whose metadata ``key`` says ``value``."""
    model = onnx.load(source)
    for prop in model.metadata_props:
        if prop.key == key:
            prop.value = value
    onnx.save(model, path)
    return path

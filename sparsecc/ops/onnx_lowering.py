"""Shared helpers of the op families' ONNX translations (their `onnx.py`), and the exporter's options.

A translation is a plain Python function of onnxscript values and Python attributes built from
`onnxscript.opset18` ops; `torch.onnx.export(..., custom_translation_table=...)` traces it
(Python `if`s on attributes and on tensor dtypes / static shapes run at export time). Each family's
onnx.py exposes `OPS` (the op names it translates), `translations(ctx) -> {op name: function}`
and optionally `density(gm, node)` (kept fraction, for the file's metadata). The exporter
(sparsecc.backends.onnx) gathers them; `ExportContext` carries what one export knows (the graph,
the options), so translations need no module state.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
import torch.fx as fx
from onnxscript import opset18 as op

from sparsecc.errors import UnsupportedError

__all__ = ["ACTIVATIONS", "ExportContext", "NEG_INF", "OnnxOptions", "apply_activation", "constant", "dim", "ints",
           "linear", "rank", "scale_value", "static", "swap_last"]

NEG_INF = float("-inf")


@dataclass(frozen=True)
class OnnxOptions:
    """Options of the ONNX export (the onnxruntime backend passes them through).

    layout_group_keys: block-sparse attention with a layout known at export runs its query blocks
        in groups of at most this many gathered key positions per head. ORT runs a node over its
        whole input, so small groups keep a group's gathered K/V, scores and probabilities in cache
        from one node to the next: at L = 4096, density 1/8, groups of 2048 keys ran 1.4x faster
        than one group.
    known_layouts: use the layouts that are constants of the graph at export (one group per kept
        count, no ELL padding slot computed); False exports the generic ELL form, which reads the
        layout from the file's initializers at run time.
    """

    layout_group_keys: int = 2048
    known_layouts: bool = True

    def __post_init__(self) -> None:
        if self.layout_group_keys < 1:
            raise ValueError(f"OnnxOptions.layout_group_keys must be >= 1, got {self.layout_group_keys}")


@dataclass(frozen=True)
class ExportContext:
    """What the translations of one export may read: the graph being exported and the options."""

    gm: fx.GraphModule
    options: OnnxOptions = OnnxOptions()


def constant(gm: fx.GraphModule, node: Any) -> Optional[torch.Tensor]:
    """The tensor a get_attr node (or a literal tensor argument) stands for, else None."""
    if isinstance(node, fx.Node) and node.op == "get_attr":
        try:
            return operator.attrgetter(node.target)(gm)
        except AttributeError:
            return None
    return node if isinstance(node, torch.Tensor) else None


# ----------------------------------------------------------------------------------------------
# helpers over onnxscript values
# ----------------------------------------------------------------------------------------------

def static(size: Any) -> Optional[int]:
    """A dimension as an int when it is static, else None."""
    return size if isinstance(size, int) else None


def rank(x: Any) -> int:
    return len(x.shape)


def dim(x: Any, i: int) -> Any:
    """1-D int64 tensor [x.shape[i]] (negative i counts from the end)."""
    return op.Shape(x, start=i) if i == -1 else op.Shape(x, start=i, end=i + 1)


def ints(*values: int) -> Any:
    """A 1-D int64 constant."""
    return op.Constant(value_ints=[int(v) for v in values])


def swap_last(x: Any, r: int) -> Any:
    """Swap the last two axes of a rank-r tensor."""
    return op.Transpose(x, perm=list(range(r - 2)) + [r - 1, r - 2])


def linear(x: Any, w: Any, b: Any = None) -> Any:
    """x @ w.T + b (nn.Linear layout; ORT folds the constant transpose)."""
    y = op.MatMul(x, op.Transpose(w, perm=[1, 0]))
    return y if b is None else op.Add(y, b)


def scale_value(q: Any, scale: Optional[float]) -> Any:
    """The attention scale: the given one, else 1/sqrt(D) (a constant when D is static)."""
    if scale is not None:
        return float(scale)
    d = static(q.shape[-1])
    if d is not None:
        return 1.0 / math.sqrt(d)
    return op.Reciprocal(op.Sqrt(op.CastLike(dim(q, -1), q)))


# GELU in the forms onnxscript's ORT fusions recognise (erfgelu / gelu rules: x * (1 + erf(x / sqrt 2)) * 0.5
# and x * (0.5 * (1 + tanh(sqrt(2/pi) * (x + 0.044715 x^3)))), so ORT gets its fused Gelu / BiasGelu /
# FastGelu kernels as it does for the dense model's export.
def _gelu(x: Any) -> Any:
    return op.Mul(op.Mul(x, op.Add(op.Erf(op.Div(x, math.sqrt(2.0))), 1.0)), 0.5)


def _gelu_tanh(x: Any) -> Any:
    inner = op.Mul(math.sqrt(2.0 / math.pi), op.Add(x, op.Mul(0.044715, op.Pow(x, 3.0))))
    return op.Mul(x, op.Mul(0.5, op.Add(op.Tanh(inner), 1.0)))


def _relu2(x: Any) -> Any:
    r = op.Relu(x)
    return op.Mul(r, r)


# Every entry of sparsecc/ops/activations.py in standard ONNX ops (tests check the table is covered).
ACTIVATIONS: dict[str, Callable[[Any], Any]] = {
    "relu": lambda x: op.Relu(x),
    "gelu": _gelu,
    "gelu_tanh": _gelu_tanh,
    "silu": lambda x: op.Mul(x, op.Sigmoid(x)),
    "quick_gelu": lambda x: op.Mul(x, op.Sigmoid(op.Mul(x, 1.702))),
    "relu2": _relu2,
}


def apply_activation(x: Any, name: str) -> Any:
    """The activation `name` of the table applied to x, or an UnsupportedError naming the known ones."""
    if name not in ACTIVATIONS:
        raise UnsupportedError(f"ONNX export: activation {name!r} has no ONNX lowering; expected one of "
                               f"{sorted(ACTIVATIONS)}")
    return ACTIVATIONS[name](x)

"""ONNX translation of `sparsecc::ffn` (standard ONNX ops; every activation of the table)."""

from __future__ import annotations

from onnxscript import opset18 as op

from sparsecc.ops.onnx_lowering import ExportContext, apply_activation, linear

OPS = ("sparsecc::ffn",)


def ffn(x, w_up, b_up, w_down, b_down, activation: str = "gelu", w_gate=None, b_gate=None):
    """Dense FFN: act(x W_up^T + b) [* gated] -> W_down; gelu as Erf, gelu_tanh as Tanh, silu as x*Sigmoid(x)."""
    up = linear(x, w_up, b_up)
    if w_gate is None:
        h = apply_activation(up, activation)
    else:
        h = op.Mul(apply_activation(linear(x, w_gate, b_gate), activation), up)
    return linear(h, w_down, b_down)


def translations(ctx: ExportContext) -> dict:
    return {"sparsecc::ffn": ffn}


def density(gm, node) -> float:
    return 1.0

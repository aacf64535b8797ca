"""ONNX translation of `sparsecc::sparse_ffn` (standard ONNX ops: only the chosen rows are read)."""

from __future__ import annotations

from onnxscript import opset18 as op

from sparsecc.errors import UnsupportedError
from sparsecc.ops.onnx_lowering import ExportContext, apply_activation, dim, ints, static

OPS = ("sparsecc::sparse_ffn",)


def sparse_ffn(x, w_in, b_in, w_out_t, b_out, c1, c2, c_bias, n: int = 1, activation: str = "relu",
               w_gate=None, b_gate=None):
    """Scaling-Transformers sparse FFN on T = prod(batch dims) tokens, k = d_ff / n chosen units each:

    logits = (x2 c1) c2 + c_bias -> Reshape [T, k, n] -> ArgMax (first on ties) + block offsets = idx [T, k]
    rows = Gather(w_in, idx) [T, k, d] -> a = rows @ x2 [T, k] (+ Gather(b_in, idx)) -> act (gated: * gate rows)
    out  = h [T, 1, k] @ Gather(w_out_t, idx) [T, k, d] + b_out -> Reshape to x's shape.
    Only the chosen rows of w_in / w_gate / w_out_t are read.
    """
    d_ff = static(w_in.shape[0])
    if d_ff is None:
        raise UnsupportedError("ONNX export: sparse_ffn needs a static d_ff (w_in rows)")
    k = d_ff // n
    x2 = op.Reshape(x, op.Concat(ints(-1), dim(x, -1), axis=0))  # [T, d]
    logits = op.MatMul(op.MatMul(x2, c1), c2)
    if c_bias is not None:
        logits = op.Add(logits, c_bias)
    local = op.ArgMax(op.Reshape(logits, [0, k, n]), axis=-1, keepdims=0)  # [T, k]
    idx = op.Add(local, op.Constant(value_ints=list(range(0, d_ff, n))))
    xcol = op.Unsqueeze(x2, [-1])  # [T, d, 1]

    def gather_dot(w, b):
        a = op.Squeeze(op.MatMul(op.Gather(w, idx, axis=0), xcol), [-1])  # [T, k]
        return a if b is None else op.Add(a, op.Gather(b, idx, axis=0))

    a = gather_dot(w_in, b_in)
    if w_gate is None:
        h = apply_activation(a, activation)
    else:
        h = op.Mul(apply_activation(gather_dot(w_gate, b_gate), activation), a)
    out = op.Squeeze(op.MatMul(op.Unsqueeze(h, [1]), op.Gather(w_out_t, idx, axis=0)), [1])  # [T, d]
    if b_out is not None:
        out = op.Add(out, b_out)
    return op.Reshape(out, op.Shape(x))


def translations(ctx: ExportContext) -> dict:
    return {"sparsecc::sparse_ffn": sparse_ffn}


def density(gm, node) -> float:
    """The kept fraction of hidden units: one per block of n."""
    return 1.0 / int(node.args[8])

"""ONNX translation of `sparsecc::sparse_ffn` (standard ONNX ops: only the chosen rows are read)."""

from __future__ import annotations

from typing import Optional

from onnxscript import opset18 as op

from sparsecc.errors import UnsupportedError
from sparsecc.ops.onnx_lowering import ExportContext, apply_activation, dim, ints, static

OPS = ("sparsecc::sparse_ffn",)


# Row gathers while tokens * (d_ff / n) * 2 <= d_ff, else one dense GEMM + gather: the crossover of the
# PyTorch kernel (sparsecc.ops.sparse_ffn.op). Gathering [T, d_ff / n, d] weight rows for many tokens
# copies more than the dense weights (at T = 1024, n = 4 on MiniLM, 3.7x slower than the dense FFN).
_GATHER_FRACTION = 2


def sparse_ffn(x, w_in, b_in, w_out_t, b_out, c1, c2, c_bias, n: int = 1, activation: str = "relu",
               w_gate=None, b_gate=None, tokens: Optional[int] = None):
    """Scaling-Transformers sparse FFN on T = prod(batch dims) tokens, k = d_ff / n chosen units each:

    logits = (x2 c1) c2 + c_bias -> Reshape [T, k, n] -> ArgMax (first on ties) + block offsets = idx [T, k]
    few tokens (decode): rows = Gather(w_in, idx) [T, k, d] -> a = rows @ x2 [T, k] (+ Gather(b_in, idx)),
      act (gated: * gate rows), out = h [T, 1, k] @ Gather(w_out_t, idx) [T, k, d] + b_out; only the chosen
      rows of w_in / w_gate / w_out_t are read;
    many tokens: h = act(x2 w_in^T + b_in) * OneHot(local) (the chosen unit of each block), out = h @ w_out_t
      + b_out: dense GEMMs and elementwise ops, never cheaper than the dense FFN (no sparse GEMM here).
    `tokens`: the token count the graph is made for (the example's, fixed at export); None: many.
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
    gather_rows = tokens is not None and tokens * k * _GATHER_FRACTION <= d_ff
    if not gather_rows:  # the dense FFN with the controller's one-hot mask on the hidden units
        def dense(w, b):
            full = op.MatMul(x2, op.Transpose(w, perm=[1, 0]))  # [T, d_ff]
            return full if b is None else op.Add(full, b)
        a = dense(w_in, b_in)
        h = apply_activation(a, activation) if w_gate is None else op.Mul(
            apply_activation(dense(w_gate, b_gate), activation), a)
        on_off = op.CastLike(op.Constant(value_floats=[0.0, 1.0]), h)
        mask = op.Reshape(op.OneHot(local, op.Constant(value_int=n), on_off), op.Shape(logits))  # [T, d_ff]
        out = op.MatMul(op.Mul(h, mask), w_out_t)
    else:
        idx = op.Add(local, op.Constant(value_ints=list(range(0, d_ff, n))))
        xcol = op.Unsqueeze(x2, [-1])  # [T, d, 1]

        def gather_dot(w, b):
            a = op.Squeeze(op.MatMul(op.Gather(w, idx, axis=0), xcol), [-1])  # [T, k]
            return a if b is None else op.Add(a, op.Gather(b, idx, axis=0))

        a = gather_dot(w_in, b_in)
        h = apply_activation(a, activation) if w_gate is None else op.Mul(
            apply_activation(gather_dot(w_gate, b_gate), activation), a)
        out = op.Squeeze(op.MatMul(op.Unsqueeze(h, [1]), op.Gather(w_out_t, idx, axis=0)), [1])  # [T, d]
    if b_out is not None:
        out = op.Add(out, b_out)
    return op.Reshape(out, op.Shape(x))


def _tokens(gm) -> Optional[int]:
    """The tokens the graph's sparse FFN calls see at export (the example's; dynamic sizes by their hint);
    None when unknown or when the calls disagree."""
    seen = set()
    for node in gm.graph.nodes:
        schema = getattr(node.target, "_schema", None) if node.op == "call_function" else None
        if schema is not None and schema.name == "sparsecc::sparse_ffn":
            val = node.args[0].meta.get("val") if hasattr(node.args[0], "meta") else None
            if val is None:
                return None
            count = 1
            for size in val.shape[:-1]:
                hint = size if isinstance(size, int) else getattr(size.node, "hint", None)
                if hint is None:
                    return None
                count *= int(hint)
            seen.add(count)
    return seen.pop() if len(seen) == 1 else None


def translations(ctx: ExportContext) -> dict:
    tokens = _tokens(ctx.gm)

    def translate(x, w_in, b_in, w_out_t, b_out, c1, c2, c_bias, n: int = 1, activation: str = "relu",
                  w_gate=None, b_gate=None):
        return sparse_ffn(x, w_in, b_in, w_out_t, b_out, c1, c2, c_bias, n, activation, w_gate, b_gate,
                          tokens=tokens)
    return {"sparsecc::sparse_ffn": translate}


def density(gm, node) -> float:
    """The kept fraction of hidden units: one per block of n."""
    return 1.0 / int(node.args[8])

"""ONNX translation of `sparsecc::attention` (standard ONNX ops)."""

from __future__ import annotations

from typing import Optional

from onnxscript import opset18 as op

from sparsecc.errors import UnsupportedError
from sparsecc.ops.onnx_lowering import NEG_INF, ExportContext, dim, ints, rank, scale_value, static, swap_last

OPS = ("sparsecc::attention",)


def attention(q, k, v, attn_mask=None, dropout_p: float = 0.0, is_causal: bool = False,
              scale: Optional[float] = None, enable_gqa: bool = False):
    """Dense SDPA: MatMul(q, k^T) * scale (+ mask / Where for bool and causal) -> Softmax -> MatMul(v).

    GQA repeats each kv head G times (Unsqueeze/Expand/Reshape, like repeat_interleave).
    """
    if dropout_p:
        raise UnsupportedError(f"ONNX export: sparsecc::attention with dropout_p={dropout_p}; expected 0 "
                               "(export in eval mode)")
    if enable_gqa:
        h, hkv = static(q.shape[-3]), static(k.shape[-3])
        if h is None or hkv is None:
            raise UnsupportedError("ONNX export: GQA attention needs static head counts; got q heads "
                                   f"{q.shape[-3]}, kv heads {k.shape[-3]}. Capture with static heads.")
        if h != hkv:
            k, v = (repeat_kv(t, h, h // hkv) for t in (k, v))
    scores = op.Mul(op.MatMul(q, swap_last(k, rank(q))), scale_value(q, scale))
    if is_causal:
        rows = op.Range(0, op.Squeeze(dim(q, -2), [0]), 1)
        cols = op.Range(0, op.Squeeze(dim(k, -2), [0]), 1)
        keep = op.LessOrEqual(op.Unsqueeze(cols, [0]), op.Unsqueeze(rows, [1]))
        scores = op.Where(keep, scores, NEG_INF)
    if attn_mask is not None:  # additive, as torch's own export: onnxscript's SDPA / MHA fusions match it
        if attn_mask.dtype is not None and attn_mask.dtype.name == "BOOL":
            attn_mask = op.Where(attn_mask, op.CastLike(0.0, scores), op.CastLike(NEG_INF, scores))
        scores = op.Add(scores, op.CastLike(attn_mask, scores))
    return op.MatMul(op.Softmax(scores, axis=-1), v)


def repeat_kv(x, heads: int, groups: int):
    """(B, Hkv, S, D) -> (B, Hkv*G, S, D), each kv head repeated G times in place."""
    expanded = op.Expand(op.Unsqueeze(x, [2]), [1, 1, groups, 1, 1])
    return op.Reshape(expanded, op.Concat(dim(x, 0), ints(heads), ints(-1), dim(x, 3), axis=0))


def translations(ctx: ExportContext) -> dict:
    return {"sparsecc::attention": attention}


def density(gm, node) -> float:
    return 1.0

"""Sparse ONNX export: every `sparsecc::*` op lowered to STANDARD ONNX ops, so any provider runs the file.

    from sparsecc.backends.onnx import export_onnx
    export_onnx(sparse_model, "m.onnx")            # or sparse_model.export_onnx("m.onnx")

The export goes through `torch.onnx.export(..., dynamo=True, custom_translation_table=...)`.
Each sparsecc op has one translation, a plain Python function built from `onnxscript.opset18`
ops (the exporter traces it; Python `if`s on attributes and on tensor dtypes/static shapes run
at export time). Adding a translation for a new op is a few lines:

    @register_translation("sparsecc::my_op")
    def _my_op(x, w, flag: bool = False):
        return op.MatMul(x, w)

What travels in the file (`ModelProto.metadata_props`), so the file alone runs and explains
itself:
  - `sparsecc.recipe`: the recipe as JSON;
  - `sparsecc.regions`: JSON list, one entry per sparsecc op in graph order: op, fx node,
    region name, layer, module path, density (kept fraction: blocks for block-sparse
    attention, hidden units for sparse FFN; 1.0 for the identity ops);
  - `sparsecc.version`, `sparsecc.inputs` (input names), `sparsecc.dynamic`.
Block layouts (ELL kv_indices / kv_counts) and sparse-FFN controllers are graph tensors, so they
are initializers of the file. ONNX node metadata (`pkg.torch.onnx.fx_node`, set by the exporter)
names the sparsecc op each node came from; `sparsecc.backends.onnx_inspect` reads both.
"""

from __future__ import annotations

import json
import logging
import math
import operator
import os
import tempfile
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
import torch.fx as fx
from onnxscript import opset18 as op

from sparsecc.errors import UnsupportedError

log = logging.getLogger("sparsecc.backends.onnx")

DEFAULT_OPSET = 20
NEG_INF = float("-inf")

# "sparsecc::op" -> translation function (plain function of onnxscript values and Python attributes)
TRANSLATIONS: dict[str, Callable] = {}


def register_translation(op_name: str) -> Callable[[Callable], Callable]:
    """Decorator: register the ONNX translation of `op_name` ("sparsecc::name")."""
    if "::" not in op_name:
        raise ValueError(f"op name {op_name!r}: expected 'namespace::name', e.g. 'sparsecc::attention'")

    def wrap(fn: Callable) -> Callable:
        TRANSLATIONS[op_name] = fn
        return fn
    return wrap


def translation_table() -> dict:
    """{OpOverload: translation} for every registered translation whose op is loaded."""
    table = {}
    for name, fn in TRANSLATIONS.items():
        ns, short = name.split("::")
        packet = getattr(getattr(torch.ops, ns), short, None) if hasattr(torch.ops, ns) else None
        if packet is not None:
            try:
                table[packet.default] = fn
            except AttributeError:
                continue
    return table


def op_name(node: fx.Node) -> Optional[str]:
    """'sparsecc::x' for a call to a sparsecc op, else None."""
    target = node.target
    if node.op == "call_function" and isinstance(target, torch._ops.OpOverload) and target.namespace == "sparsecc":
        return target._schema.name
    return None


def check_translatable(gm: fx.GraphModule) -> None:
    """Raise UnsupportedError naming every sparsecc op of `gm` that has no ONNX translation."""
    missing = sorted({name for node in gm.graph.nodes if (name := op_name(node)) and name not in TRANSLATIONS})
    if missing:
        raise UnsupportedError(
            f"ONNX export: no ONNX translation for {', '.join(missing)} (found in the graph); translations "
            f"exist for {sorted(TRANSLATIONS)}. Register one with "
            "@sparsecc.backends.onnx.register_translation('<op>'), or compile with a recipe that does not "
            "produce this op, or use backend='eager'.")


# ----------------------------------------------------------------------------------------------
# helpers over onnxscript values
# ----------------------------------------------------------------------------------------------

def _static(dim: Any) -> Optional[int]:
    return dim if isinstance(dim, int) else None


def _rank(x: Any) -> int:
    return len(x.shape)


def _dim(x: Any, i: int) -> Any:
    """1-D int64 tensor [x.shape[i]] (negative i counts from the end)."""
    return op.Shape(x, start=i) if i == -1 else op.Shape(x, start=i, end=i + 1)


def _ints(*values: int) -> Any:
    """A 1-D int64 constant."""
    return op.Constant(value_ints=[int(v) for v in values])


def _swap_last(x: Any, r: int) -> Any:
    """Swap the last two axes of a rank-r tensor."""
    return op.Transpose(x, perm=list(range(r - 2)) + [r - 1, r - 2])


def _linear(x: Any, w: Any, b: Any = None) -> Any:
    """x @ w.T + b (nn.Linear layout; ORT folds the constant transpose)."""
    y = op.MatMul(x, op.Transpose(w, perm=[1, 0]))
    return y if b is None else op.Add(y, b)


def _scale_value(q: Any, scale: Optional[float]) -> Any:
    if scale is not None:
        return float(scale)
    d = _static(q.shape[-1])
    if d is not None:
        return 1.0 / math.sqrt(d)
    return op.Reciprocal(op.Sqrt(op.CastLike(_dim(q, -1), q)))


def _gelu(x: Any) -> Any:
    return op.Mul(op.Mul(x, 0.5), op.Add(op.Erf(op.Mul(x, 1.0 / math.sqrt(2.0))), 1.0))


def _gelu_tanh(x: Any) -> Any:
    inner = op.Mul(op.Add(x, op.Mul(op.Mul(op.Mul(x, x), x), 0.044715)), math.sqrt(2.0 / math.pi))
    return op.Mul(op.Mul(x, 0.5), op.Add(op.Tanh(inner), 1.0))


ACTIVATIONS: dict[str, Callable[[Any], Any]] = {
    "relu": lambda x: op.Relu(x),
    "gelu": _gelu,
    "gelu_tanh": _gelu_tanh,
    "silu": lambda x: op.Mul(x, op.Sigmoid(x)),
}


def _activation(x: Any, name: str) -> Any:
    if name not in ACTIVATIONS:
        raise UnsupportedError(f"ONNX export: activation {name!r} has no ONNX lowering; expected one of "
                               f"{sorted(ACTIVATIONS)}")
    return ACTIVATIONS[name](x)


# ----------------------------------------------------------------------------------------------
# translations
# ----------------------------------------------------------------------------------------------

@register_translation("sparsecc::attention")
def _attention(q, k, v, attn_mask=None, dropout_p: float = 0.0, is_causal: bool = False,
               scale: Optional[float] = None, enable_gqa: bool = False):
    """Dense SDPA: MatMul(q, k^T) * scale (+ mask / Where for bool and causal) -> Softmax -> MatMul(v).

    GQA repeats each kv head G times (Unsqueeze/Expand/Reshape, like repeat_interleave).
    """
    if dropout_p:
        raise UnsupportedError(f"ONNX export: sparsecc::attention with dropout_p={dropout_p}; expected 0 "
                               "(export in eval mode)")
    if enable_gqa:
        h, hkv = _static(q.shape[-3]), _static(k.shape[-3])
        if h is None or hkv is None:
            raise UnsupportedError("ONNX export: GQA attention needs static head counts; got q heads "
                                   f"{q.shape[-3]}, kv heads {k.shape[-3]}. Capture with static heads.")
        if h != hkv:
            k, v = (_repeat_kv(t, h, h // hkv) for t in (k, v))
    scores = op.Mul(op.MatMul(q, _swap_last(k, _rank(q))), _scale_value(q, scale))
    if is_causal:
        rows = op.Range(0, op.Squeeze(_dim(q, -2), [0]), 1)
        cols = op.Range(0, op.Squeeze(_dim(k, -2), [0]), 1)
        keep = op.LessOrEqual(op.Unsqueeze(cols, [0]), op.Unsqueeze(rows, [1]))
        scores = op.Where(keep, scores, NEG_INF)
    if attn_mask is not None:
        if attn_mask.dtype is not None and attn_mask.dtype.name == "BOOL":
            scores = op.Where(attn_mask, scores, NEG_INF)
        else:
            scores = op.Add(scores, op.CastLike(attn_mask, scores))
    return op.MatMul(op.Softmax(scores, axis=-1), v)


def _repeat_kv(x, heads: int, groups: int):
    """(B, Hkv, S, D) -> (B, Hkv*G, S, D), each kv head repeated G times in place."""
    expanded = op.Expand(op.Unsqueeze(x, [2]), [1, 1, groups, 1, 1])
    return op.Reshape(expanded, op.Concat(_dim(x, 0), _ints(heads), _ints(-1), _dim(x, 3), axis=0))


@register_translation("sparsecc::ffn")
def _ffn(x, w_up, b_up, w_down, b_down, activation: str = "gelu", w_gate=None, b_gate=None):
    """Dense FFN: act(x W_up^T + b) [* gated] -> W_down; gelu as Erf, gelu_tanh as Tanh, silu as x*Sigmoid(x)."""
    up = _linear(x, w_up, b_up)
    h = _activation(up, activation) if w_gate is None else op.Mul(_activation(_linear(x, w_gate, b_gate),
                                                                                activation), up)
    return _linear(h, w_down, b_down)


@register_translation("sparsecc::sparse_ffn")
def _sparse_ffn(x, w_in, b_in, w_out_t, b_out, c1, c2, c_bias, n: int = 1, activation: str = "relu",
                w_gate=None, b_gate=None):
    """Scaling-Transformers sparse FFN on T = prod(batch dims) tokens, k = d_ff / n chosen units each:

    logits = (x2 c1) c2 + c_bias -> Reshape [T, k, n] -> ArgMax (first on ties) + block offsets = idx [T, k]
    rows = Gather(w_in, idx) [T, k, d] -> a = rows @ x2 [T, k] (+ Gather(b_in, idx)) -> act (gated: * gate rows)
    out  = h [T, 1, k] @ Gather(w_out_t, idx) [T, k, d] + b_out -> Reshape to x's shape.
    Only the chosen rows of w_in / w_gate / w_out_t are read.
    """
    d_ff = _static(w_in.shape[0])
    if d_ff is None:
        raise UnsupportedError("ONNX export: sparse_ffn needs a static d_ff (w_in rows)")
    k = d_ff // n
    x2 = op.Reshape(x, op.Concat(_ints(-1), _dim(x, -1), axis=0))  # [T, d]
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
    h = _activation(a, activation) if w_gate is None else op.Mul(_activation(gather_dot(w_gate, b_gate),
                                                                               activation), a)
    out = op.Squeeze(op.MatMul(op.Unsqueeze(h, [1]), op.Gather(w_out_t, idx, axis=0)), [1])  # [T, d]
    if b_out is not None:
        out = op.Add(out, b_out)
    return op.Reshape(out, op.Shape(x))


@register_translation("sparsecc::block_sparse_attention")
def _block_sparse_attention(q, k, v, kv_indices, kv_counts, block_size: int = 64, scale: float = 1.0,
                            causal: bool = False, key_padding_mask=None):
    """Block-sparse attention on the ELL layout; returns (out (B,H,L,D), logsumexp (B,H,L)).

    Pad L and S to whole blocks; view q as [B, Hkv, G, nq, b, D] and k, v as [B, Hkv, nk, b, D].
    Gather each query block's kept key blocks with kv_indices -> [B, Hkv, 1, n, W*b, D] (W = kept
    blocks; GQA heads share them by broadcasting); one batched MatMul -> scores [B, Hkv, G, n, b, W*b],
    one Softmax, one MatMul with the gathered values. No L x S tensor.

    Masking is one additive bias, built on the small [n, b, W*b] (or [B, n, W*b] with key padding)
    pattern and added only where some entry can be masked: a slot past the row's count, a key past
    S, the causal triangle, a padded key. A row with no allowed key gives 0 and logsumexp -inf, like
    the PyTorch op. When the layout is known at export, query blocks are grouped by their exact kept
    count, so no ELL padding slot is ever computed.
    """
    b = int(block_size)
    L, S = _dim(q, 2), _dim(k, 2)
    nq = _dim(kv_indices, 0)
    # Key blocks: those S covers, and at least those the layout names, so a layout made for a longer
    # sequence runs on its top-left corner (like crop_ell in PyTorch): keys past S are zero padding,
    # masked by the key-range check, and query blocks past L are sliced off at the end.
    nk = op.Max(op.Div(op.Add(S, b - 1), [b]), op.Add(op.ReduceMax(kv_indices, keepdims=1), [1]))
    nk = op.Reshape(nk, [1])
    zero = _ints(0)
    # pad to whole blocks along the sequence axis (Pad with a zero amount is a no-op copy ORT skips)
    q_pad = op.Pad(op.Mul(q, op.CastLike(float(scale), q)),
                   op.Concat(zero, zero, zero, zero, zero, zero, op.Sub(op.Mul(nq, _ints(b)), L), zero, axis=0))
    k_pad, v_pad = (op.Pad(t, op.Concat(zero, zero, zero, zero, zero, zero, op.Sub(op.Mul(nk, _ints(b)), S), zero,
                                        axis=0)) for t in (k, v))
    B, Hkv, D = _dim(q, 0), _dim(k, 1), _dim(q, 3)
    qb = op.Reshape(q_pad, op.Concat(B, Hkv, _ints(-1), nq, _ints(b), D, axis=0))  # [B, Hkv, G, nq, b, D]
    kv_shape = op.Concat(B, Hkv, nk, _ints(b), D, axis=0)
    kb, vb = op.Reshape(k_pad, kv_shape), op.Reshape(v_pad, kv_shape)  # [B, Hkv, nk, b, D]
    kpm = None
    if key_padding_mask is not None:
        kpm = op.Pad(key_padding_mask, op.Concat(zero, zero, zero, op.Sub(op.Mul(nk, _ints(b)), S), axis=0))
    s_static = _static(k.shape[2])
    known = _LAYOUT_VALUES.get(getattr(kv_indices, "name", None))
    # keys can fall outside [0, S): a dynamic or partial last block, or a layout made for longer sequences
    partial_keys = (s_static is None or s_static % b != 0 or known is None
                    or int(known[0].max()) >= s_static // b)
    ctx = dict(qb=qb, kb=kb, vb=vb, kpm=kpm, S=S, B=B, Hkv=Hkv, D=D, b=b, causal=causal, partial_keys=partial_keys)

    if known is None:  # one ELL group: every query block padded to the widest row
        out, lse = _bsa_group(ctx, None, kv_indices, kv_counts, op.Range(0, op.Squeeze(nq, [0]), 1), True)
    else:  # layout known at export: one group per kept count (no padding slots)
        outs, lses, order = [], [], []
        for rows, idx, cnt in _buckets(*known, b):
            rows_c = _ints(*rows)
            o, s_ = _bsa_group(ctx, rows_c, op.Constant(value=_int_tensor(idx)), _ints(*cnt), rows_c,
                               min(cnt) < idx.shape[1])
            outs.append(o)
            lses.append(s_)
            order += rows
        inverse = [0] * len(order)
        for pos, row in enumerate(order):
            inverse[row] = pos
        if len(outs) == 1 and order == sorted(order):
            out, lse = outs[0], lses[0]
        else:
            out = op.Gather(op.Concat(*outs, axis=3), _ints(*inverse), axis=3)
            lse = op.Gather(op.Concat(*lses, axis=3), _ints(*inverse), axis=3)
    H = op.Mul(Hkv, _dim(qb, 2))
    out = op.Slice(op.Reshape(out, op.Concat(B, H, _ints(-1), D, axis=0)), zero, L, _ints(2))
    lse = op.Slice(op.Reshape(lse, op.Concat(B, H, _ints(-1), axis=0)), zero, L, _ints(2))
    return out, op.Cast(lse, to=1) if q.dtype is not None and q.dtype.name in ("FLOAT16", "BFLOAT16") else lse


# kv_indices initializer name -> (indices, counts) numpy arrays, filled by export_graph for one export
_LAYOUT_VALUES: dict = {}
# Gathered key positions per head in one group of query blocks. ORT runs a node over its whole
# input, so small groups keep a group's gathered K/V, scores and probabilities in cache from one
# node to the next: at L = 4096, density 1/8, groups of 2048 keys ran 1.4x faster than one group.
_GROUP_KEYS = 2048


def _int_tensor(values: Any) -> Any:
    import numpy as np
    from onnxscript import ir
    return ir.tensor(np.ascontiguousarray(values, dtype=np.int64))


def _buckets(indices: Any, counts: Any, block: int) -> list[tuple[list[int], Any, list[int]]]:
    """Group query blocks by their exact kept count (layouts have few distinct counts), in groups of
    at most _GROUP_KEYS gathered keys per head.

    Returns [(query block rows, indices [n, count], counts [n])]; rows with no kept block get width 1
    and are masked entirely."""
    groups: dict[int, list[int]] = {}
    for row, c in enumerate(counts.tolist()):
        groups.setdefault(max(int(c), 1), []).append(row)
    out = []
    for width, rows in sorted(groups.items()):
        step = max(1, _GROUP_KEYS // (width * block))
        for i in range(0, len(rows), step):
            part = rows[i:i + step]
            out.append((part, indices[part][:, :width], counts[part].tolist()))
    return out


def _bsa_group(ctx: dict, rows: Any, idx: Any, cnt: Any, q_blocks: Any, padded_slots: bool) -> tuple[Any, Any]:
    """Attention for n query blocks (rows of qb, None = all) with kept key blocks idx [n, W], counts [n].

    padded_slots: some row keeps fewer than W blocks. Returns out [B, Hkv, G, n, b, D] and
    logsumexp [B, Hkv, G, n, b, 1]."""
    b, B, Hkv, D = ctx["b"], ctx["B"], ctx["Hkv"], ctx["D"]
    qb = ctx["qb"] if rows is None else op.Gather(ctx["qb"], rows, axis=3)
    n, width = _dim(idx, 0), _dim(idx, 1)
    gathered_shape = op.Concat(B, Hkv, _ints(1), n, op.Mul(width, _ints(b)), D, axis=0)
    kg, vg = (op.Reshape(op.Gather(t, idx, axis=2), gathered_shape) for t in (ctx["kb"], ctx["vb"]))
    scores = op.MatMul(qb, op.Transpose(kg, perm=[0, 1, 2, 3, 5, 4]))  # q was scaled before

    # allowed entries, on the small pattern shared by heads: [n, 1 or b, W*b] (x [B, ...] with padding)
    kpos = op.Reshape(op.Add(op.Unsqueeze(op.Mul(idx, b), [2]), op.Range(0, b, 1)), op.Concat(n, _ints(-1), axis=0))
    allowed = None
    if padded_slots:
        slot_ok = op.Less(op.Range(0, op.Squeeze(width, [0]), 1), op.Unsqueeze(cnt, [1]))  # [n, W]
        allowed = op.Reshape(op.Expand(op.Unsqueeze(slot_ok, [2]), [1, 1, b]), op.Concat(n, _ints(1), _ints(-1), axis=0))
    if ctx["partial_keys"]:
        in_range = op.Unsqueeze(op.Less(kpos, ctx["S"]), [1])  # [n, 1, W*b]
        allowed = in_range if allowed is None else op.And(allowed, in_range)
    if ctx["causal"]:
        qpos = op.Add(op.Unsqueeze(op.Mul(q_blocks, b), [1]), op.Range(0, b, 1))  # [n, b]
        tri = op.LessOrEqual(op.Unsqueeze(kpos, [1]), op.Unsqueeze(qpos, [2]))  # [n, b, W*b]
        allowed = tri if allowed is None else op.And(allowed, tri)
    if ctx["kpm"] is not None:
        kpm = op.Unsqueeze(op.Gather(ctx["kpm"], kpos, axis=1), [1, 2, 4])  # [B, 1, 1, n, 1, W*b]
        allowed = kpm if allowed is None else op.And(allowed, kpm)
    if allowed is not None:
        # A large finite negative (not -inf) keeps Softmax finite on rows with no allowed key;
        # those rows are zeroed below.
        low = -3.0e4 if scores.dtype is not None and scores.dtype.name == "FLOAT16" else -1.0e30
        scores = op.Add(scores, op.Where(allowed, op.CastLike(0.0, scores), op.CastLike(low, scores)))
    p = op.Softmax(scores, axis=-1)
    out = op.MatMul(p, vg)
    lse = op.ReduceLogSumExp(scores, [-1], keepdims=1)
    if allowed is not None:
        row_ok = op.ReduceMax(op.Cast(allowed, to=1), [-1], keepdims=1)  # 1 / 0 per row, broadcastable
        out = op.Mul(out, op.CastLike(row_ok, out))
        lse = op.Where(op.Cast(row_ok, to=9), lse, op.CastLike(NEG_INF, lse))
    return out, lse


@register_translation("sparsecc::flow_route")
def _flow_route(keep):
    """counts = ReduceSum(keep); K = max(1, ReduceMax(counts)); the kept positions first and ascending by
    TopK(smallest K) of a key unique per position (kept: p, skipped: L + p); padding slots -> 0."""
    keep_i = op.Cast(keep, to=7)  # INT64
    counts = op.ReduceSum(keep_i, _ints(1), keepdims=0)  # [B]
    kept_max = op.Max(op.ReduceMax(counts, keepdims=1), _ints(1))  # [1]
    length = _dim(keep, 1)
    positions = op.Range(op.Constant(value_int=0), op.Squeeze(length, [0]), op.Constant(value_int=1))
    key = op.Add(op.Mul(op.Sub(_ints(1), keep_i), length), op.Unsqueeze(positions, [0]))
    _, order = op.TopK(key, kept_max, axis=1, largest=0, sorted=1)
    index = op.Where(_flow_valid_slots(order, counts), order, _ints(0))
    return index, counts


def _flow_valid_slots(index, counts):
    """[B, K] bool: slot k < counts[b]."""
    slots = op.Range(op.Constant(value_int=0), op.Squeeze(_dim(index, 1), [0]), op.Constant(value_int=1))
    return op.Less(op.Unsqueeze(slots, [0]), op.Unsqueeze(counts, [1]))


@register_translation("sparsecc::flow_gather")
def _flow_gather(x, index, counts):
    """GatherND(x, index[..., None], batch_dims=1) [B, K, D], padding slots zeroed."""
    rows = op.GatherND(x, op.Unsqueeze(index, [2]), batch_dims=1)
    zero = op.CastLike(op.Constant(value_float=0.0), x)
    return op.Where(op.Unsqueeze(_flow_valid_slots(index, counts), [2]), rows, zero)


@register_translation("sparsecc::flow_scatter")
def _flow_scatter(x, rows, index, counts, accumulate: bool = False):
    """ScatterND into x extended by K spare rows: valid slot k writes row index[b, k], padding slot k writes
    spare row L + k (so no two writes meet); the spare rows are sliced off. accumulate adds x's rows first."""
    length, slots = _dim(x, 1), _dim(index, 1)
    valid = _flow_valid_slots(index, counts)
    spare = op.Add(op.Range(op.Constant(value_int=0), op.Squeeze(slots, [0]), op.Constant(value_int=1)),
                   op.Squeeze(length, [0]))
    target = op.Where(valid, index, op.Unsqueeze(spare, [0]))  # [B, K]
    zeros = op.Expand(op.CastLike(op.Constant(value_float=0.0), x), op.Concat(_dim(x, 0), slots, _dim(x, 2), axis=0))
    extended = op.Concat(x, zeros, axis=1)
    updates = op.CastLike(rows, x)
    if accumulate:
        updates = op.Add(updates, op.GatherND(extended, op.Unsqueeze(target, [2]), batch_dims=1))
    batch = op.Range(op.Constant(value_int=0), op.Squeeze(_dim(x, 0), [0]), op.Constant(value_int=1))
    batch = op.Expand(op.Unsqueeze(batch, [1]), op.Shape(target))
    where = op.Concat(op.Unsqueeze(batch, [2]), op.Unsqueeze(target, [2]), axis=2)  # [B, K, 2]
    out = op.ScatterND(extended, where, updates)
    return op.Slice(out, _ints(0), length, _ints(1))


# ----------------------------------------------------------------------------------------------
# export
# ----------------------------------------------------------------------------------------------

def _get_attr(gm: fx.GraphModule, node: Any) -> Optional[torch.Tensor]:
    if isinstance(node, fx.Node) and node.op == "get_attr":
        try:
            return operator.attrgetter(node.target)(gm)
        except AttributeError:
            return None
    return node if isinstance(node, torch.Tensor) else None


def _density(gm: fx.GraphModule, node: fx.Node, name: str) -> Optional[float]:
    if name in ("sparsecc::attention", "sparsecc::ffn"):
        return 1.0
    if name == "sparsecc::sparse_ffn":
        return 1.0 / int(node.args[8])
    if name == "sparsecc::block_sparse_attention":
        counts = _get_attr(gm, node.args[4])
        k = node.args[1].meta.get("val") if isinstance(node.args[1], fx.Node) else None
        if counts is None or k is None or not isinstance(k.shape[2], int):
            return None
        nk = -(-int(k.shape[2]) // int(node.args[5]))
        return round(float(counts.sum()) / (counts.numel() * nk), 6)
    return None


def _constant_layouts(gm: fx.GraphModule) -> dict:
    """{initializer name of kv_indices: (indices, counts) numpy} for block-sparse ops with constant layouts."""
    out = {}
    for node in gm.graph.nodes:
        if op_name(node) == "sparsecc::block_sparse_attention":
            idx, cnt = _get_attr(gm, node.args[3]), _get_attr(gm, node.args[4])
            if idx is not None and cnt is not None and isinstance(node.args[3], fx.Node):
                flat = node.args[3].target.replace(".", "_")  # torch.export lifts buffers as b_<path>
                for key in (node.args[3].target, flat, "b_" + flat, "c_" + flat, node.args[3].name):
                    out[key] = (idx.detach().cpu().numpy(), cnt.detach().cpu().numpy())
    return out


def region_records(gm: fx.GraphModule, regions: Optional[list] = None) -> list[dict]:
    """One record per sparsecc op in graph order: op, fx node, region, layer, path, density."""
    from sparsecc.graph.fx_utils import module_path
    regions = list(regions or [])
    records = []
    for node in gm.graph.nodes:
        name = op_name(node)
        if name is None or name.endswith("_backward"):
            continue
        path = module_path(node)
        kind = "attention" if "attention" in name else "ffn"
        best = None
        for r in regions:
            if r.kind == kind and r.path is not None and (path == r.path or path.startswith(r.path + ".")
                                                          or r.path == ""):
                if best is None or len(r.path) > len(best.path):
                    best = r
        density = _density(gm, node, name)
        if best is not None and isinstance(best.sparse, dict) and density is None:
            density = best.sparse.get("density")
        records.append({"op": name, "fx_node": node.name, "kind": kind,
                        "region": best.name if best is not None else None,
                        "layer": best.layer if best is not None else _layer_from_path(path),
                        "path": best.path if best is not None else path, "density": density})
    return records


def _layer_from_path(path: str) -> Optional[int]:
    digits = [int(p) for p in path.split(".") if p.isdigit()]
    return digits[0] if digits else None


def _dynamic_shapes(gm: fx.GraphModule, args: tuple, kwargs: dict) -> Any:
    from sparsecc.capture import dynamic_shapes_for
    return dynamic_shapes_for(gm, args, kwargs)


@dataclass
class ExportResult:
    """What `export_onnx` wrote: the path, the exported program it came from, and the region records."""

    path: str
    exported_program: Any  # torch.export.ExportedProgram (its call_spec maps inputs/outputs)
    regions: list
    dynamic: bool


def export_graph(gm: fx.GraphModule, args: tuple, kwargs: dict, path: str, dynamic: bool = True,
                 opset: Optional[int] = None, recipe: Any = None, regions: Optional[list] = None,
                 optimize: bool = True, extra_metadata: Optional[dict] = None) -> ExportResult:
    """Export a (sparsecc-rewritten) graph module to `path`, atomically; see the module docstring.

    args/kwargs: example inputs (with every call default, e.g. use_cache=False, included).
    dynamic: make batch and sequence dims symbolic where the graph allows it (else static).
    """
    check_translatable(gm)
    shapes = _dynamic_shapes(gm, args, kwargs) if dynamic else None
    ep = None
    for spec in ([shapes, None] if shapes is not None else [None]):
        try:
            ep = torch.export.export(gm, args, kwargs, dynamic_shapes=spec, strict=False)
            break
        except Exception as err:  # noqa: BLE001 - retried static, then reported
            if spec is None:
                raise UnsupportedError(f"ONNX export: torch.export could not re-capture the compiled graph "
                                       f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}); "
                                       "try dynamic=False") from err
            log.warning("dynamic re-capture failed (%s); exporting with static shapes", err)
    opset = DEFAULT_OPSET if opset is None else int(opset)
    _LAYOUT_VALUES.clear()
    _LAYOUT_VALUES.update(_constant_layouts(gm))
    try:
        program = torch.onnx.export(ep, dynamo=True, custom_translation_table=translation_table(),
                                    opset_version=opset, optimize=optimize, verbose=False)
    except Exception as err:  # noqa: BLE001 - the exporter's report is long; name the failing node
        summary = [line for line in str(err).splitlines() if line.startswith("<class")]
        raise UnsupportedError(f"ONNX export: torch.onnx could not convert the graph at opset {opset}: "
                               f"{summary[-1] if summary else str(err).splitlines()[0]} (innermost cause: "
                               f"{summary[0] if summary else type(err).__name__}). Expected every node to have "
                               "an ONNX lowering; see the chained exception for the full report") from err
    records = region_records(gm, regions)
    is_dynamic = bool(ep.range_constraints)
    meta = {"sparsecc.version": _version(), "sparsecc.regions": json.dumps(records),
            "sparsecc.recipe": json.dumps(recipe.to_dict() if hasattr(recipe, "to_dict") else recipe,
                                          default=str),
            "sparsecc.dynamic": json.dumps(is_dynamic),
            "sparsecc.inputs": json.dumps([i.name for i in program.model.graph.inputs])}
    meta.update(extra_metadata or {})
    program.model.metadata_props.update(meta)
    _save_atomic(program, path)
    return ExportResult(path=path, exported_program=ep, regions=records, dynamic=is_dynamic)


def _version() -> str:
    try:
        from sparsecc import __version__
        return __version__
    except ImportError:
        return "unknown"


def _save_atomic(program: Any, path: str) -> None:
    """Write to a temp file in the target directory, then os.replace (weights inside the file if < 2 GB)."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".onnx", prefix=".tmp-", dir=directory)
    os.close(fd)
    try:
        program.save(tmp, external_data=False)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def export_onnx(model: Any, path: str, example_inputs: Any = None, dynamic: bool = True,
                opset: Optional[int] = None, optimize: bool = True) -> ExportResult:
    """Export a `sparsecc.SparseModel` (or a plain fx.GraphModule with `example_inputs`) to `path`."""
    from sparsecc.capture import normalize_inputs
    gm = getattr(model, "graph_module", model)
    if not isinstance(gm, fx.GraphModule):
        raise UnsupportedError(f"ONNX export expects a sparsecc.SparseModel or an fx.GraphModule, got "
                               f"{type(model).__name__}; compile the model with sparsecc.compile first")
    if example_inputs is None:
        example = getattr(model, "example_inputs", None)
        if example is None:
            raise UnsupportedError("ONNX export: no example inputs; pass example_inputs=(args, kwargs)")
        args, kwargs = example
    else:
        args, kwargs = normalize_inputs(example_inputs)
    kwargs = {**getattr(model, "_call_defaults", {}), **kwargs}
    report = model.report() if hasattr(model, "report") else None
    return export_graph(gm, tuple(args), dict(kwargs), path, dynamic=dynamic and getattr(model, "dynamic", True),
                        opset=opset, recipe=getattr(model, "recipe", None),
                        regions=report.regions if report is not None else None, optimize=optimize)

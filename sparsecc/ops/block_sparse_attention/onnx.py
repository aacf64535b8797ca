"""ONNX translation of `sparsecc::block_sparse_attention` (standard ONNX ops; no L x S tensor).

The translation is made per export (`translations(ctx)`): the layouts that are constants of the
graph (buffers, lifted to initializers) are read from `ctx.gm` so that, with
`OnnxOptions.known_layouts`, query blocks are grouped by their exact kept count at export time;
`OnnxOptions.layout_group_keys` bounds a group's size.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import numpy as np
import torch
import torch.fx as fx
from onnxscript import ir
from onnxscript import opset18 as op

from sparsecc.ops.onnx_lowering import NEG_INF, ExportContext, constant, dim, ints, static

OPS = ("sparsecc::block_sparse_attention",)


def constant_layouts(gm: fx.GraphModule) -> dict:
    """{name of kv_indices as the exporter may call its initializer: (indices, counts) numpy} for the
    block-sparse ops of `gm` whose layouts are constants."""
    out = {}
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target == torch.ops.sparsecc.block_sparse_attention.default:
            idx, cnt = constant(gm, node.args[3]), constant(gm, node.args[4])
            if idx is not None and cnt is not None and isinstance(node.args[3], fx.Node):
                flat = node.args[3].target.replace(".", "_")  # torch.export lifts buffers as b_<path>
                for key in (node.args[3].target, flat, "b_" + flat, "c_" + flat, node.args[3].name):
                    out[key] = (idx.detach().cpu().numpy(), cnt.detach().cpu().numpy())
    return out


def density(gm: fx.GraphModule, node: fx.Node) -> Optional[float]:
    """Kept fraction of the blocks at the graph's lengths (a layout serving longer sequences is cropped to
    them, as the op does); None when the layout or the lengths are not static."""
    idx, counts = constant(gm, node.args[3]), constant(gm, node.args[4])
    q, k = (a.meta.get("val") if isinstance(a, fx.Node) else None for a in node.args[:2])
    if idx is None or counts is None or q is None or k is None or not all(
            isinstance(s, int) for s in (q.shape[2], k.shape[2])):
        return None
    b = int(node.args[5])
    nq, nk = -(-int(q.shape[2]) // b), -(-int(k.shape[2]) // b)
    slots = torch.arange(idx.shape[1]) < counts[:nq, None]
    return round(float((slots & (idx[:nq] < nk)).sum()) / (nq * nk), 6)


def max_len(gm: fx.GraphModule, node: fx.Node) -> Optional[int]:
    """The longest query length the call's layout covers (rows x block size; None when not constant)."""
    counts = constant(gm, node.args[4])
    return None if counts is None else int(counts.shape[0]) * int(node.args[5])


def translations(ctx: ExportContext) -> dict:
    layouts = constant_layouts(ctx.gm) if ctx.options.known_layouts else {}
    return {"sparsecc::block_sparse_attention": make_translation(layouts, ctx.options.layout_group_keys)}


def make_translation(layouts: dict, group_keys: int) -> Callable:
    """The translation for one export: `layouts` maps initializer names to known (indices, counts)."""

    def block_sparse_attention(q, k, v, kv_indices, kv_counts, block_size: int = 64, scale: float = 1.0,
                               causal: bool = False, key_padding_mask=None, bias=None):
        """Block-sparse attention on the ELL layout; returns (out (B,H,L,D), logsumexp (B,H,L)).

        Pad L and S to whole blocks; view q as [B, Hkv, G, nq, b, D] and k, v as [B, Hkv, nk, b, D].
        Gather each query block's kept key blocks with kv_indices -> [B, Hkv, 1, n, W*b, D] (W = kept
        blocks; GQA heads share them by broadcasting); one batched MatMul -> scores [B, Hkv, G, n, b, W*b],
        one Softmax, one MatMul with the gathered values. No L x S tensor.

        Masking is one additive bias, built on the small [n, b, W*b] (or [B, n, W*b] with key padding)
        pattern and added only where some entry can be masked: a slot past the row's count, a key past
        S, the causal triangle, a padded key. A score bias (B or 1, H or 1, L, S) is gathered on the kept
        entries of each group ([.., n, b, W*b]) and added there. A row with no allowed key gives 0 and logsumexp -inf, like
        the PyTorch op. When the layout is known at export, query blocks are grouped by their exact kept
        count, so no ELL padding slot is ever computed.
        """
        b = int(block_size)
        L, S = dim(q, 2), dim(k, 2)
        nq = op.Div(op.Add(L, [b - 1]), [b])  # the query blocks L needs: a layout made for longer sequences
        # (max_len) computes only its first nq rows, like crop_ell in PyTorch.
        # Key blocks: those S covers, and at least those the layout names: keys past S are zero padding,
        # masked by the key-range check; query blocks are padded to whole blocks and sliced to L at the end.
        nk = op.Max(op.Div(op.Add(S, b - 1), [b]), op.Add(op.ReduceMax(kv_indices, keepdims=1), [1]))
        nk = op.Reshape(nk, [1])
        zero = ints(0)
        # pad to whole blocks along the sequence axis (Pad with a zero amount is a no-op copy ORT skips)
        q_pad = op.Pad(op.Mul(q, op.CastLike(float(scale), q)),
                       op.Concat(zero, zero, zero, zero, zero, zero, op.Sub(op.Mul(nq, ints(b)), L), zero, axis=0))
        k_pad, v_pad = (op.Pad(t, op.Concat(zero, zero, zero, zero, zero, zero, op.Sub(op.Mul(nk, ints(b)), S), zero,
                                            axis=0)) for t in (k, v))
        B, Hkv, D = dim(q, 0), dim(k, 1), dim(q, 3)
        qb = op.Reshape(q_pad, op.Concat(B, Hkv, ints(-1), nq, ints(b), D, axis=0))  # [B, Hkv, G, nq, b, D]
        kv_shape = op.Concat(B, Hkv, nk, ints(b), D, axis=0)
        kb, vb = op.Reshape(k_pad, kv_shape), op.Reshape(v_pad, kv_shape)  # [B, Hkv, nk, b, D]
        kpm = None
        if key_padding_mask is not None:
            kpm = op.Pad(key_padding_mask, op.Concat(zero, zero, zero, op.Sub(op.Mul(nk, ints(b)), S), axis=0))
        s_static = static(k.shape[2])
        known = layouts.get(getattr(kv_indices, "name", None))
        # keys can fall outside [0, S): a dynamic or partial last block, or a layout made for longer sequences
        partial_keys = (s_static is None or s_static % b != 0 or known is None
                        or int(known[0].max()) >= s_static // b)
        biasp = None
        if bias is not None:  # padded to whole blocks; the padding is masked by the key-range check or sliced
            biasp = op.Pad(bias, op.Concat(zero, zero, zero, zero, zero, zero, op.Sub(op.Mul(nq, ints(b)), L),
                                           op.Sub(op.Mul(nk, ints(b)), S), axis=0))
            biasp = op.Reshape(biasp, op.Concat(dim(bias, 0), dim(bias, 1), nq, ints(b), op.Mul(nk, ints(b)), axis=0))
        ctx = dict(qb=qb, kb=kb, vb=vb, kpm=kpm, S=S, B=B, Hkv=Hkv, D=D, b=b, causal=causal, partial_keys=partial_keys,
                   bias=biasp, bias_heads=None if bias is None else static(bias.shape[1]))

        if known is None:  # one ELL group: every query block padded to the widest row
            out, lse = _bsa_group(ctx, None, op.Slice(kv_indices, zero, nq, zero), op.Slice(kv_counts, zero, nq, zero),
                                  op.Range(0, op.Squeeze(nq, [0]), 1), True)
        else:  # layout known at export: one group per kept count (no padding slots)
            outs, lses, orders = [], [], []
            groups = buckets(*known, b, group_keys)
            for rows, idx, cnt in groups:
                # rows ascend: those below nq are a prefix, sliced at run time
                rows_c = ints(*rows)
                here = op.ReduceSum(op.Cast(op.Less(rows_c, nq), to=7), keepdims=1)
                rows_v = op.Slice(rows_c, zero, here, zero)
                o, s_ = _bsa_group(ctx, rows_v, op.Slice(op.Constant(value=_int_tensor(idx)), zero, here, zero),
                                   op.Slice(ints(*cnt), zero, here, zero), rows_v, min(cnt) < idx.shape[1], here)
                outs.append(o)
                lses.append(s_)
                orders.append(rows_v)
            if len(outs) == 1:  # one group of rows 0..n-1
                out, lse = outs[0], lses[0]
            else:  # back to row order: the positions that sort the concatenated rows
                order = op.Concat(*orders, axis=0)
                inverse = op.TopK(order, nq, largest=0, sorted=1)[1]
                out = op.Gather(op.Concat(*outs, axis=3), inverse, axis=3)
                lse = op.Gather(op.Concat(*lses, axis=3), inverse, axis=3)
        H = op.Mul(Hkv, dim(qb, 2))
        out = op.Slice(op.Reshape(out, op.Concat(B, H, ints(-1), D, axis=0)), zero, L, ints(2))
        lse = op.Slice(op.Reshape(lse, op.Concat(B, H, ints(-1), axis=0)), zero, L, ints(2))
        return out, op.Cast(lse, to=1) if q.dtype is not None and q.dtype.name in ("FLOAT16", "BFLOAT16") else lse

    return block_sparse_attention


def _int_tensor(values: Any) -> Any:
    return ir.tensor(np.ascontiguousarray(values, dtype=np.int64))


def buckets(indices: Any, counts: Any, block: int, group_keys: int) -> list[tuple[list[int], Any, list[int]]]:
    """Group query blocks by their exact kept count (layouts have few distinct counts), in groups of
    at most `group_keys` gathered keys per head (OnnxOptions.layout_group_keys).

    Returns [(query block rows, indices [n, count], counts [n])]; rows with no kept block get width 1
    and are masked entirely."""
    groups: dict[int, list[int]] = {}
    for row, c in enumerate(counts.tolist()):
        groups.setdefault(max(int(c), 1), []).append(row)
    out = []
    for width, rows in sorted(groups.items()):
        step = max(1, group_keys // (width * block))
        for i in range(0, len(rows), step):
            part = rows[i:i + step]
            out.append((part, indices[part][:, :width], counts[part].tolist()))
    return out


def _bsa_group(ctx: dict, rows: Any, idx: Any, cnt: Any, q_blocks: Any, padded_slots: bool,
               n: Any = None) -> tuple[Any, Any]:
    """Attention for n query blocks (rows of qb, None = all) with kept key blocks idx [n, W], counts [n].

    padded_slots: some row keeps fewer than W blocks. n: the row count as a [1] tensor when it is computed
    (the exporter's shape folding must not read it off a constant idx). Returns out [B, Hkv, G, n, b, D]
    and logsumexp [B, Hkv, G, n, b, 1]."""
    b, B, Hkv, D = ctx["b"], ctx["B"], ctx["Hkv"], ctx["D"]
    qb = ctx["qb"] if rows is None else op.Gather(ctx["qb"], rows, axis=3)
    n, width = dim(idx, 0) if n is None else n, dim(idx, 1)
    gathered_shape = op.Concat(B, Hkv, ints(1), n, op.Mul(width, ints(b)), D, axis=0)
    # allowzero: n may be 0 (a group with no row below L), a size, not "copy the input's dimension"
    kg, vg = (op.Reshape(op.Gather(t, idx, axis=2), gathered_shape, allowzero=1) for t in (ctx["kb"], ctx["vb"]))
    scores = op.MatMul(qb, op.Transpose(kg, perm=[0, 1, 2, 3, 5, 4]))  # q was scaled before

    # allowed entries, on the small pattern shared by heads: [n, 1 or b, W*b] (x [B, ...] with padding)
    keys = op.Mul(width, ints(b))  # explicit, not -1: n may be 0
    kpos = op.Reshape(op.Add(op.Unsqueeze(op.Mul(idx, b), [2]), op.Range(0, b, 1)), op.Concat(n, keys, axis=0),
                      allowzero=1)
    allowed = None
    if padded_slots:
        slot_ok = op.Less(op.Range(0, op.Squeeze(width, [0]), 1), op.Unsqueeze(cnt, [1]))  # [n, W]
        allowed = op.Reshape(op.Expand(op.Unsqueeze(slot_ok, [2]), [1, 1, b]), op.Concat(n, ints(1), keys, axis=0),
                             allowzero=1)
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
    # A large finite negative (not -inf) keeps Softmax finite on rows with no allowed key;
    # those rows are zeroed below.
    low = -3.0e4 if scores.dtype is not None and scores.dtype.name == "FLOAT16" else -1.0e30
    if ctx["bias"] is not None:
        tile = _bias_tile(ctx, q_blocks, kpos, n, keys, dim(qb, 2))
        finite = op.Not(op.IsInf(tile, detect_positive=0))  # -inf: a masked entry, like the PyTorch op
        allowed = finite if allowed is None else op.And(allowed, finite)
        scores = op.Add(scores, op.Where(allowed, op.Max(tile, op.CastLike(low, tile)), op.CastLike(low, scores)))
    elif allowed is not None:
        scores = op.Add(scores, op.Where(allowed, op.CastLike(0.0, scores), op.CastLike(low, scores)))
    p = op.Softmax(scores, axis=-1)
    out = op.MatMul(p, vg)
    lse = op.ReduceLogSumExp(scores, [-1], keepdims=1)
    if allowed is not None:
        row_ok = op.ReduceMax(op.Cast(allowed, to=1), [-1], keepdims=1)  # 1 / 0 per row, broadcastable
        out = op.Mul(out, op.CastLike(row_ok, out))
        lse = op.Where(op.Cast(row_ok, to=9), lse, op.CastLike(NEG_INF, lse))
    return out, lse




def _bias_tile(ctx: dict, q_blocks: Any, kpos: Any, n: Any, keys: Any, groups: Any) -> Any:
    """The bias on a group's entries, [B or 1, Hkv or 1, G or 1, n, b, W*b]: its query blocks' rows
    (Gather), then each row's kept keys (GatherElements with the key positions kpos [n, W*b])."""
    bias = ctx["bias"]  # [B|1, H|1, nq, b, nk*b]
    rows = op.Gather(bias, q_blocks, axis=2)  # [B|1, H|1, n, b, nk*b]
    lead = op.Concat(dim(bias, 0), dim(bias, 1), n, ints(ctx["b"]), keys, axis=0)
    index = op.Expand(op.Reshape(kpos, op.Concat(ints(1, 1), n, ints(1), keys, axis=0), allowzero=1), lead)
    tile = op.GatherElements(rows, index, axis=4)
    if ctx["bias_heads"] == 1:
        return op.Unsqueeze(tile, [1])
    return op.Reshape(tile, op.Concat(dim(bias, 0), ctx["Hkv"], groups, n, ints(ctx["b"]), keys, axis=0), allowzero=1)

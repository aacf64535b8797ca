"""Plain-PyTorch functions that flowed graphs call around the token-flow ops.

The token-flow rewrite (sparsecc.methods.token_flow.rewrite) inserts calls to these functions as
`call_function` nodes; they are traced through by torch.export / torch.compile, so they
become ordinary aten ops (and standard ONNX ops) around `sparsecc::flow_*`.

- `gather_tokens(t, index, counts, dim)`: the kept rows of any tensor with a token dim
  (attention masks, rotary cos/sin, position biases): `flow_gather` on a flattened view.
- `flow_attention_mask(...)`: the mask of an attention whose queries are the kept tokens:
  the original mask's kept query rows (and kept key columns for kv="kept"), the causal
  order by POSITION (kept queries at position p see keys at positions <= p) where the
  graph had `is_causal=True`, and padding slots masked out as keys.
- `valid_tokens(mask, h, by_query)`: [B, L] non-padding tokens, read from an attention mask.
- `single_token_route(keep)`: the route of a one-token (decode) step, static shapes.
- `capacity_route(keep, slots)`: the route of select="capacity", static shapes [B, slots].
- `flow_mix(h, out, gates)`: the soft training update h + g * (out - h).
- `soft_key_mask(...)`: kv="kept" in training: log(g) of each key added to the mask.
- `packed_route(index, counts, h)`, `pack_slots(...)`, `gather_packed(...)`, `scatter_packed(...)`:
  the PACKED layout of a segment's per-token tail (layout="packed"): the valid slots of every
  example one after another as [1, N, D] (N = the batch's kept tokens), so row-wise ops (linear,
  norms, FFN, residual adds) do no work on padding slots. All on the `sparsecc::flow_*` ops.
  `single_token_packed_route` is the route of a one-token (decode) step, where N may be 0.
"""

from __future__ import annotations

from fractions import Fraction
from typing import Optional

import torch
from torch import Tensor

import sparsecc.ops.token_flow.op  # noqa: F401  (registers the ops)

__all__ = ["gather_tokens", "flow_attention_mask", "valid_tokens", "single_token_route", "capacity", "capacity_route",
           "flow_mix", "soft_key_mask", "packed_route",
           "single_token_packed_route", "pack_slots", "gather_packed", "scatter_packed"]


def gather_tokens(t: Tensor, index: Tensor, counts: Tensor, dim: int) -> Tensor:
    """Rows of `t` along its token dim `dim` at the kept positions (padding slots zero).

    Dim 0 of `t` is the batch (size B, or 1 for a tensor broadcast over the batch).
    """
    if t.dtype == torch.bool:  # ONNX Runtime's CPU Where (in the gather's translation) has no bool kernel
        return gather_tokens(t.to(torch.uint8), index, counts, dim).bool()
    B = index.shape[0]
    d = dim % t.dim()
    if d == 0:
        raise ValueError("gather_tokens: the token dim cannot be dim 0 (the batch)")
    if t.dim() == 3 and d == 1 and t.shape[0] == B:
        return torch.ops.sparsecc.flow_gather(t.contiguous(), index, counts)
    if t.shape[0] != B:
        t = t.expand(B, *t.shape[1:])
    moved = t.movedim(d, 1)
    rest = moved.shape[2:]
    flat = moved.reshape(B, moved.shape[1], -1)
    out = torch.ops.sparsecc.flow_gather(flat, index, counts)
    return out.reshape(B, out.shape[1], *rest).movedim(1, d)


def _neg(dtype: torch.dtype) -> float:
    return torch.finfo(dtype).min  # like Hugging Face masks: no NaN when a padding row sees nothing


def _combine(mask: Optional[Tensor], keep: Optional[Tensor], dtype: torch.dtype) -> Optional[Tensor]:
    """mask (bool keep-mask or additive float) AND keep (bool), in the mask's own form."""
    if keep is None:
        return mask
    if mask is None:
        return keep
    if mask.dtype == torch.bool:
        return mask & keep
    return mask.masked_fill(~keep, _neg(mask.dtype))


def flow_attention_mask(mask: Optional[Tensor], q: Tensor, k: Tensor, index: Tensor, counts: Tensor,
                        gather_query: bool, gather_key: bool, kv_kept: bool, causal: bool) -> Optional[Tensor]:
    """Mask for attention of the kept queries `q` [B, H, K, Dh] over keys `k` (all tokens, or kept ones).

    mask: the graph's original mask (bool or additive, broadcastable to [B, H, L, S]) or None;
    gather_query / gather_key: its query / key dim is the token dim (not a broadcast 1), so the kept
    rows / columns are gathered; kv_kept: `k` holds the kept tokens (padding slots are masked as
    keys); causal: the graph's SDPA had
    is_causal=True (rebuilt here by position, since queries and keys are no longer aligned).
    """
    B, K = index.shape
    m = mask
    if m is not None:
        while m.dim() < 4:
            m = m.unsqueeze(0)
        if gather_query:
            m = gather_tokens(m, index, counts, 2)
        if gather_key:
            m = gather_tokens(m, index, counts, 3)
    keep = None
    if causal:
        k_pos = index.unsqueeze(1) if kv_kept else torch.arange(k.shape[-2], device=q.device).view(1, 1, -1)
        keep = (k_pos <= index.unsqueeze(2)).unsqueeze(1)  # [B, 1, K, S]
    if kv_kept:
        slots = (torch.arange(K, device=q.device).unsqueeze(0) < counts.unsqueeze(1)).view(B, 1, 1, K)
        keep = slots if keep is None else keep & slots
    if m is not None and m.dtype != torch.bool and m.dtype != q.dtype:
        m = m.to(q.dtype)
    return _combine(m, keep, q.dtype)


def valid_tokens(mask: Optional[Tensor], h: Tensor, by_query: bool = False) -> Tensor:
    """[B, L] bool: the non-padding tokens of `h` [B, L, ...] under the attention `mask`.

    By default a token is valid when some query attends to it as a key - any query row, not just
    the last: under a sliding window the last query sees only the last window's keys, yet every
    token of the window before is a real token. by_query: the mask's keys are not the L tokens (a
    KV cache: keys are cache slots), so a token is valid when its own query row attends to
    something (padding queries of a left-padded prompt see only padding keys: a row all masked)."""
    B, L = h.shape[0], h.shape[1]
    if mask is None:
        return torch.ones(B, L, dtype=torch.bool, device=h.device)
    m = mask
    while m.dim() < 4:
        m = m.unsqueeze(0)
    keys = m[:, 0]  # [B or 1, L or 1, S]
    seen = keys if keys.dtype == torch.bool else keys > _neg(keys.dtype) / 2
    if by_query:
        return seen.any(dim=2).expand(B, L)
    return seen.any(dim=1).expand(B, L)


def single_token_route(keep: Tensor) -> tuple[Tensor, Tensor]:
    """`flow_route` of a one-token step (keep [B, 1]): index [B, 1] all 0, counts [B] in {0, 1}. The
    same result as the op, with static shapes (K is always 1), so a decode step stays shape-static."""
    return torch.zeros_like(keep, dtype=torch.int64), keep.sum(1, dtype=torch.int64)


def capacity(tokens, keep: float):
    """ceil(keep * tokens), at least 1 and at most `tokens`: the slots of select="capacity".

    Integer arithmetic on keep as a fraction, so it is exact and stays a size expression of `tokens`
    when that is symbolic (a dynamic-shape capture): the route's shapes follow the input's."""
    frac = Fraction(keep).limit_denominator(1 << 16)
    c = (frac.numerator * tokens + frac.denominator - 1) // frac.denominator
    if isinstance(c, int):
        return max(1, min(c, tokens))
    return torch.sym_max(1, torch.sym_min(c, tokens))


def capacity_route(keep: Tensor, fraction: float) -> tuple[Tensor, Tensor]:
    """`flow_route`'s contract with K = capacity(L, fraction) fixed (keep [B, L] holds at most K kept
    tokens per row): index [B, K] (kept positions ascending, then 0), counts [B]. Its shapes depend on L
    only, not on the data, unlike flow_route's K = the batch's most kept. The sort keys are distinct
    (kept p -> p, skipped p -> L + p), so the order is exact without a stable sort (ONNX has none)."""
    L = keep.shape[1]
    pos = torch.arange(L, device=keep.device).unsqueeze(0)
    key = torch.where(keep, pos, pos + L)
    first = torch.topk(key, capacity(L, fraction), dim=1, largest=False, sorted=True).values
    counts = keep.sum(1, dtype=torch.int64)
    slot = torch.arange(first.shape[1], device=keep.device).unsqueeze(0)
    return torch.where(slot < counts.unsqueeze(1), first, torch.zeros_like(first)), counts


def flow_mix(h: Tensor, out: Tensor, gates: Tensor) -> Tensor:
    """h + g * (out - h) per token (g [B, L]): exactly h where g = 0, out (to rounding) where g = 1."""
    return h + gates.unsqueeze(-1).to(h.dtype) * (out - h)


def soft_key_mask(mask: Optional[Tensor], q: Tensor, k: Tensor, gates: Tensor, causal: bool) -> Tensor:
    """Training for kv="kept": each key's log(gate) added to the scores (a closed gate ~ a masked key)."""
    L, S = q.shape[-2], k.shape[-2]
    bias = torch.log(gates.clamp_min(1e-30)).to(q.dtype).view(gates.shape[0], 1, 1, S)
    if mask is None:
        m = bias
    elif mask.dtype == torch.bool:
        zero = torch.zeros((), dtype=q.dtype, device=q.device)
        m = torch.where(mask, zero, zero + _neg(q.dtype)) + bias
    else:
        m = mask.to(q.dtype) + bias
    if causal:
        keep = torch.ones(L, S, dtype=torch.bool, device=q.device).tril()
        m = m.masked_fill(~keep, _neg(q.dtype))
    return m


# ------------------------------------------------------------------ packed layout
def packed_route(index: Tensor, counts: Tensor, h: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """The batch's kept tokens one after another: (slots [1, N], rows [1, N], n [1]).

    slots: flat numbers of the valid slots of the padded [B, K] layout; rows: the same tokens as flat
    row numbers of the [B * L] token stream (b * L + position), example-major and ascending, so a
    `flow_route` index of the flattened batch; n: [1] holding N, the sum of counts (N = 0 leaves one
    padding slot, never written).
    """
    B, K = index.shape
    L = h.shape[1]  # h: the segment's input stream [B, L, D]
    slot_valid = torch.arange(K, device=index.device).unsqueeze(0) < counts.unsqueeze(1)
    slots, n = torch.ops.sparsecc.flow_route(slot_valid.reshape(1, B * K))
    flat = index + torch.arange(B, device=index.device).unsqueeze(1) * L
    rows = flat.reshape(B * K)[slots.reshape(-1)].reshape(slots.shape)  # same N as `slots`
    return slots, rows, n


def single_token_packed_route(index: Tensor, counts: Tensor, h: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """`packed_route` of a one-token step (index [B, 1] all 0, counts [B] in {0, 1}): the kept rows of the
    batch, without the padding slot `flow_route` leaves when nothing is kept, so a decode step whose token
    skips a layer runs that layer's tail on no rows at all (batch 1: the tail is skipped)."""
    rows = counts.nonzero().reshape(1, -1)  # [1, N]: slot b of [B, 1] is row b of [B * 1]
    return rows, rows, counts.sum().reshape(1)


def pack_slots(x: Tensor, slots: Tensor, n: Tensor) -> Tensor:
    """[B, K, ...] padded rows -> [1, N, ...] packed rows (the valid slots only; with N = 0, the one padding slot
    reads row 0 and is never written back).

    Indexed by (example, slot) rather than as rows of x flattened to [1, B * K, ...]: that flattening Reshape
    follows the attention's merge-heads Reshape, ONNX optimisers fold the two into one, and onnxscript's
    MultiHeadAttention fusion then replaces the folded Reshape by the attention's [B, K, D] output, dropping the
    flattening (ORT then fails in the GatherND that packs the rows)."""
    K = x.shape[1]
    flat = slots.reshape(-1)
    example = flat // K
    return x[example, flat - example * K].unsqueeze(0)


def gather_packed(x: Tensor, rows: Tensor, n: Tensor) -> Tensor:
    """[B, L, ...] token rows -> [1, N, ...]: the kept tokens of every example, packed."""
    B, L = x.shape[0], x.shape[1]
    flat = x.reshape(1, B * L, -1)
    return torch.ops.sparsecc.flow_gather(flat.contiguous(), rows, n).reshape(1, rows.shape[1], *x.shape[2:])


def scatter_packed(x: Tensor, packed: Tensor, rows: Tensor, n: Tensor, accumulate: bool) -> Tensor:
    """`flow_scatter` of packed rows [1, N, D] into x [B, L, D] (a new tensor; skipped rows = x)."""
    B, L, D = x.shape
    packed = packed.reshape(1, rows.shape[1], D)  # not (1, -1, D): N may be 0 (a one-token step)
    out = torch.ops.sparsecc.flow_scatter(x.reshape(1, B * L, D).contiguous(), packed, rows, n, accumulate)
    return out.reshape(B, L, D)

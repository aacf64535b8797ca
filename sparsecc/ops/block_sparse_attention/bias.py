"""The gradient of `sparsecc::block_sparse_attention`'s additive score bias, on any device.

d bias = dS = P * (dO V^T - rowsum(dO * O)) on the kept (query, key) entries, zero elsewhere, summed
over the dimensions the bias broadcasts (batch, heads). One query block at a time: its kept key
blocks are gathered, P is recomputed from the forward's logsumexp, and dS is added into its rows of
the gradient - O(B * H * b * kept keys) memory per step, no L x S score tensor beyond the bias's own.
Relative-position terms (DeBERTa) and learned biases (T5) train through it.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from sparsecc.ops.block_sparse_attention.layout import clean_layout

__all__ = ["bias_grad"]


def bias_grad(grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, kv_indices: Tensor,
              kv_counts: Tensor, b: int, scale: float, causal: bool, key_padding_mask: Optional[Tensor],
              bias: Tensor) -> Tensor:
    B, H, L, _ = q.shape
    S, g = k.shape[2], H // k.shape[1]
    idx, cnt = clean_layout(kv_indices, kv_counts, L, S, b, causal)
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    grad = torch.zeros(bias.shape, dtype=acc, device=bias.device)
    sum_dims = [d for d in (0, 1) if bias.shape[d] == 1 and (B, H)[d] != 1]
    delta = (grad_out.to(acc) * out.to(acc)).sum(-1, keepdim=True)  # [B, H, L, 1]
    lse = lse.to(acc).masked_fill(lse.isneginf(), float("inf")).unsqueeze(-1)  # empty rows: P = 0
    ar = torch.arange(b)
    for i, m in enumerate(cnt.tolist()):
        if m == 0:
            continue
        r0, r1 = i * b, min(L, (i + 1) * b)
        cols = (idx[i, :m, None] * b + ar).flatten()
        cols = cols[cols < S].to(q.device)
        kc = k.index_select(2, cols).repeat_interleave(g, 1).to(acc)
        vc = v.index_select(2, cols).repeat_interleave(g, 1).to(acc)
        bc = bias[:, :, r0:r1].index_select(3, cols).to(acc)
        s = q[:, :, r0:r1].to(acc) @ kc.transpose(-1, -2) * scale + bc  # [B, H, r, c]
        keep = ~bc.isneginf()
        if causal:
            keep = keep & (cols[None, :] <= torch.arange(r0, r1, device=q.device)[:, None])
        if key_padding_mask is not None:
            keep = keep & key_padding_mask[:, None, None, :].index_select(3, cols)
        p = torch.exp(s - lse[:, :, r0:r1]).masked_fill(~keep, 0.0)
        ds = p * (grad_out[:, :, r0:r1].to(acc) @ vc.transpose(-1, -2) - delta[:, :, r0:r1])
        if sum_dims:
            ds = ds.sum(sum_dims, keepdim=True)
        grad[:, :, r0:r1].index_add_(3, cols, ds)
    return grad.to(bias.dtype)

"""Released SPION's softmax: keys outside the layout count as logit 0 in the denominator.

The released SPION kernels expand the block layout to an element-level CSR and take the row softmax
over its stored entries plus, in the denominator, exp(0) = 1 for every entry that is not stored. The
attention output of a row is then sum_kept exp(s_j) v_j / (Z + n_pruned) with Z = sum_kept exp(s_j)
= exp(lse): the -inf output times Z / (Z + n_pruned) = sigmoid(lse - log n_pruned). So the released
behaviour is a cheap correction of `sparsecc::block_sparse_attention`'s (out, lse), computed here from
the layout and the key padding in O(B * L * kept blocks) - no L x S tensor.

A pruned key is one the row could attend to (not padding, causally allowed with the last query
aligned to the last key) but whose block the layout leaves out.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

__all__ = ["pruned_count", "pruned_as_logit_zero"]


def pruned_count(kv_indices: Tensor, kv_counts: Tensor, block_size: int, L: int, S: int, causal: bool,
                 key_padding_mask: Optional[Tensor], batch: int) -> Tensor:
    """[batch, L] number of keys each query row could attend to that its layout leaves out."""
    b = block_size
    nq, nk = -(-L // b), -(-S // b)
    idx = kv_indices[:nq].to(torch.int64)
    slot = torch.arange(idx.shape[1], device=idx.device)
    ok = (slot.unsqueeze(0) < kv_counts[:nq].to(torch.int64).unsqueeze(1)) & (idx < nk)  # [nq, K]
    rows = torch.arange(L, device=idx.device)
    tiles, ok = idx[rows // b], ok[rows // b]  # [L, K]
    lo = tiles * b
    hi = torch.clamp((tiles + 1) * b, max=S)  # exclusive
    if causal:
        hi = torch.minimum(hi, (rows + (S - L) + 1).unsqueeze(1))
    hi = torch.maximum(hi, lo)
    if key_padding_mask is None:
        valid = torch.ones(batch, S, dtype=torch.float64, device=idx.device)
    else:
        valid = key_padding_mask.to(torch.float64)
    before = torch.cat([valid.new_zeros(valid.shape[0], 1), valid.cumsum(-1)], dim=-1)  # keys < j: [B, S + 1]
    kept = ((before[:, hi] - before[:, lo]) * ok.to(valid.dtype)).sum(-1)  # [B, L]
    seen = before[:, (rows + (S - L) + 1).clamp(0, S)] if causal else before[:, S:].expand(-1, L)
    return (seen - kept).clamp_min(0.0)


def pruned_as_logit_zero(out: Tensor, lse: Tensor, q: Tensor, k: Tensor, kv_indices: Tensor, kv_counts: Tensor,
                         block_size: int, causal: bool, key_padding_mask: Optional[Tensor]) -> Tensor:
    """The released SPION attention output from the block-sparse op's (out [B, H, L, D], lse [B, H, L])."""
    B, _, L, _ = q.shape
    n = pruned_count(kv_indices, kv_counts, block_size, L, k.shape[2], causal, key_padding_mask, B).unsqueeze(1)
    scale = torch.where(n > 0.5, torch.sigmoid(lse.to(torch.float64) - torch.log(n.clamp_min(1.0))),
                        torch.ones_like(n))
    return out * scale.unsqueeze(-1).to(out.dtype)

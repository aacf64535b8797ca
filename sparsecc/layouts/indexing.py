"""Index views of a boolean block mask, shared by layouts, ops and backends.

A block mask has shape (query_blocks, key_blocks); True keeps the block.
The padded-row (ELL) view lists, for each query block, the kept key blocks in
ascending order, padded to the longest row; `counts` says how many are valid.
Padding entries repeat the row's last valid index (0 for an empty row), so a
kernel may load them safely and must ignore them using `counts`.
"""

from __future__ import annotations

import torch


def block_mask_to_ell(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(indices int64 [nq, max_kept], counts int64 [nq]) of a bool block mask [nq, nk]."""
    if mask.dim() != 2 or mask.dtype != torch.bool:
        raise ValueError(f"block mask must be a 2-D bool tensor, got {tuple(mask.shape)} {mask.dtype}")
    nq, nk = mask.shape
    counts = mask.sum(dim=1)
    width = max(int(counts.max().item()) if nq else 0, 1)
    # Stable sort puts kept blocks first, in ascending key order.
    order = torch.sort((~mask).to(torch.int8), dim=1, stable=True).indices[:, :width]
    valid = torch.arange(width).unsqueeze(0) < counts.unsqueeze(1)
    last = order.gather(1, (counts - 1).clamp(min=0).unsqueeze(1))
    indices = torch.where(valid, order, last)
    indices = torch.where(counts.unsqueeze(1) > 0, indices, torch.zeros_like(indices))
    return indices.to(torch.int64), counts.to(torch.int64)


def block_mask_to_csr(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(crow_indices int64 [nq+1], col_indices int64 [nnz]) of a bool block mask [nq, nk]."""
    if mask.dim() != 2 or mask.dtype != torch.bool:
        raise ValueError(f"block mask must be a 2-D bool tensor, got {tuple(mask.shape)} {mask.dtype}")
    counts = mask.sum(dim=1)
    crow = torch.zeros(mask.shape[0] + 1, dtype=torch.int64)
    crow[1:] = torch.cumsum(counts, 0)
    col = mask.nonzero()[:, 1].to(torch.int64)  # nonzero is row-major: rows ascending, cols ascending
    return crow, col


def crop_ell(indices: torch.Tensor, counts: torch.Tensor, q_blocks: int, k_blocks: int
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """The ELL view of the top-left [q_blocks, k_blocks] corner of a larger layout.

    A layout calibrated at length L applies to a shorter sequence by cropping (the
    same rule as BlockLayout.fit): rows past q_blocks go, and each row keeps only its
    kept key blocks below k_blocks (indices are ascending, so a count suffices).
    A layout with exactly q_blocks rows was made for this length and is returned as it
    is: an index past k_blocks there is an error for the caller to report, not a crop.
    """
    if indices.shape[0] == q_blocks:  # made for this length: nothing to crop (callers check the range)
        return indices, counts
    indices, counts = indices[:q_blocks], counts[:q_blocks]
    valid = torch.arange(indices.shape[1]).unsqueeze(0) < counts.unsqueeze(1)
    new_counts = (valid & (indices < k_blocks)).sum(1)
    return indices.clamp(max=max(k_blocks - 1, 0)), new_counts.to(counts.dtype)

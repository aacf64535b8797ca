"""The ELL clean-up every block-sparse attention kernel starts from (CPU, C++, Triton): written once.

A layout arrives as the ELL view of a block mask (`sparsecc.layouts.indexing.block_mask_to_ell`):
kv_indices [nq', width] and kv_counts [nq'] for a sequence of nq' >= ceil(L/b) query blocks. The
kernels want, for exactly nq = ceil(L/b) query blocks, each row's key blocks ascending and unique,
no padding entries, and (causal) no block entirely above the diagonal, since every key there comes
after every query of the row.
"""

from __future__ import annotations

import torch
from torch import Tensor

from sparsecc.errors import LayoutError
from sparsecc.layouts.indexing import block_mask_to_ell, crop_ell

__all__ = ["clean_block_mask", "clean_layout", "column_layout"]


def clean_block_mask(kv_indices: Tensor, kv_counts: Tensor, L: int, S: int, block_size: int,
                     causal: bool) -> Tensor:
    """The kept blocks as a bool mask [ceil(L/b), ceil(S/b)] on the CPU: the layout cropped to L and S
    (crop_ell: a layout made for a longer sequence runs on its top-left corner), padding entries past
    each row's count dropped, duplicates merged, and with `causal` the blocks above the diagonal dropped.

    Raises LayoutError when an entry lies outside [0, ceil(S/b)) or a count outside [0, width].
    """
    b = int(block_size)
    nq, nk = -(-L // b), -(-S // b)
    idx, cnt = crop_ell(kv_indices.detach().long().cpu(), kv_counts.detach().long().cpu(), nq, nk)
    width = idx.shape[1]
    valid = torch.arange(width).unsqueeze(0) < cnt.unsqueeze(1)
    if bool(((idx < 0) | (idx >= nk))[valid].any()) or bool((cnt > width).any()) or bool((cnt < 0).any()):
        raise LayoutError(f"kv_indices must lie in [0, {nk}) (S={S}, block_size={b}) and kv_counts "
                          f"in [0, {width}]; rebuild them with block_mask_to_ell(mask[{nq}, {nk}])")
    rows = torch.arange(nq).unsqueeze(1).expand_as(idx)
    if causal:  # blocks entirely above the diagonal contribute nothing
        valid &= idx <= rows
    keep = torch.zeros(nq, nk, dtype=torch.bool)
    keep[rows[valid], idx[valid]] = True
    return keep


def clean_layout(kv_indices: Tensor, kv_counts: Tensor, L: int, S: int, block_size: int,
                 causal: bool) -> tuple[Tensor, Tensor]:
    """The cleaned ELL layout (int64, CPU): per query block its kept key blocks ascending, see
    `clean_block_mask`."""
    return block_mask_to_ell(clean_block_mask(kv_indices, kv_counts, L, S, block_size, causal))


def column_layout(keep: Tensor) -> tuple[Tensor, Tensor]:
    """The transposed (column) ELL index of a cleaned block mask: per key block the query blocks that
    keep it, ascending (what a kernel parallel over key blocks, e.g. the dK/dV backward, walks)."""
    return block_mask_to_ell(keep.t().contiguous())

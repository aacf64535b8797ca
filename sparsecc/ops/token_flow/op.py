"""Token flow (SparseFlow): route kept tokens into a block, gather them, scatter the results back.

At inference a flowed residual block runs on the KEPT tokens of each example only:

    index, counts = flow_route(keep)                  # which rows of each example are kept
    xk  = flow_gather(x, index, counts)               # [B, K, D]: the kept rows, packed
    yk  = block(xk, ...)                              # the block's own ops, on K rows
    out = flow_scatter(x, yk, index, counts)          # kept rows replaced, skipped rows = x

Skipped rows pass through unchanged (h <- g * Block(h) + (1 - g) * h with hard g).
K = max over the batch of the kept counts, so examples that keep fewer tokens
carry padding slots at the end of their index row.

Op contract (stable: Triton/CUDA kernels register against these schemas)
-------------------------------------------------------------------------

Shapes: B batch, L tokens, D features (last dim, contiguous), K kept slots.
`index` and `counts` are int64 on the same device as the data.
A SLOT k of example b is VALID when k < counts[b]; slots k >= counts[b] are
PADDING. Valid slots hold distinct positions in [0, L), strictly ascending
(so causal order is kept among gathered rows). Padding slots hold 0.

``sparsecc::flow_route(Tensor keep) -> (Tensor index, Tensor counts)``
    keep: [B, L] bool. counts[b] = keep[b].sum() (int64 [B]);
    K = max(1, max_b counts[b]) (a data-dependent size);
    index: int64 [B, K], index[b, :counts[b]] = the kept positions ascending,
    index[b, counts[b]:] = 0. Not differentiable.

``sparsecc::flow_gather(Tensor x, Tensor index, Tensor counts) -> Tensor``
    x: [B, L, D] float. Returns [B, K, D] (contiguous):
    out[b, k] = x[b, index[b, k]] for valid slots, 0 for padding slots.
    Backward: grad_x[b, index[b, k]] = grad_out[b, k] for valid slots, 0 elsewhere
    (valid positions are distinct, so no accumulation is needed).

``sparsecc::flow_scatter(Tensor x, Tensor rows, Tensor index, Tensor counts, bool accumulate=False) -> Tensor``
    x: [B, L, D], rows: [B, K, D] (same dtype). Returns a NEW [B, L, D] tensor
    (x is not mutated): out = x, then for valid slots
    out[b, index[b, k]] = rows[b, k]                    (accumulate=False)
    out[b, index[b, k]] = x[b, index[b, k]] + rows[b, k] (accumulate=True: the
    residual add of a pre-LN block fused into the scatter). Padding slots of
    `rows` are ignored (whatever they hold, NaN included).
    Backward: grad_rows[b, k] = grad_out[b, index[b, k]] for valid slots, 0 for
    padding; grad_x = grad_out with the valid rows zeroed (accumulate=False) or
    grad_out itself (accumulate=True).

The kernels below are plain PyTorch and run on every device (the CPU path); a
backend may register a faster kernel per device with
`torch.library.register_kernel("sparsecc::flow_gather", "cuda", fn)`.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["flow_route", "flow_gather", "flow_scatter", "route_reference", "gather_reference",
           "scatter_reference"]


# ------------------------------------------------------------------ references (readable, slow)
def route_reference(keep: Tensor) -> tuple[Tensor, Tensor]:
    """Per-example Python loop with the op's exact contract (tests compare against it)."""
    B = keep.shape[0]
    counts = keep.sum(1).to(torch.int64)
    K = max(1, int(counts.max())) if B else 1
    index = torch.zeros(B, K, dtype=torch.int64, device=keep.device)
    for b in range(B):
        pos = torch.nonzero(keep[b]).flatten()
        index[b, : pos.numel()] = pos
    return index, counts


def gather_reference(x: Tensor, index: Tensor, counts: Tensor) -> Tensor:
    out = x.new_zeros(x.shape[0], index.shape[1], x.shape[2])
    for b in range(x.shape[0]):
        n = int(counts[b])
        out[b, :n] = x[b, index[b, :n]]
    return out


def scatter_reference(x: Tensor, rows: Tensor, index: Tensor, counts: Tensor, accumulate: bool = False) -> Tensor:
    out = x.clone()
    for b in range(x.shape[0]):
        n = int(counts[b])
        out[b, index[b, :n]] = rows[b, :n] + (x[b, index[b, :n]] if accumulate else 0)
    return out


# ------------------------------------------------------------------ helpers of the kernels
def _slot_valid(index: Tensor, counts: Tensor) -> Tensor:
    """[B, K] bool: slot k < counts[b]."""
    return torch.arange(index.shape[1], device=index.device).unsqueeze(0) < counts.unsqueeze(1)


def check_inputs(x: Tensor, index: Tensor, counts: Tensor, op: str) -> None:
    if x.dim() != 3 or index.dim() != 2 or counts.dim() != 1:
        raise ValueError(f"sparsecc::{op}: expected x [B, L, D], index [B, K], counts [B]; got x "
                         f"{tuple(x.shape)}, index {tuple(index.shape)}, counts {tuple(counts.shape)}")
    if index.dtype != torch.int64 or counts.dtype != torch.int64:
        raise ValueError(f"sparsecc::{op}: index and counts must be int64, got {index.dtype} and {counts.dtype}")
    if not (x.shape[0] == index.shape[0] == counts.shape[0]):
        raise ValueError(f"sparsecc::{op}: batch sizes differ: x {x.shape[0]}, index {index.shape[0]}, "
                         f"counts {counts.shape[0]}")


def _flat_rows(index: Tensor, counts: Tensor, L: int) -> tuple[Tensor, Tensor]:
    """Flat row numbers into x.view(B*L, D) of the valid slots, and their flat slot numbers into [B*K]."""
    B, K = index.shape
    valid = _slot_valid(index, counts).flatten()
    slots = torch.nonzero(valid).flatten()
    batch = torch.div(slots, K, rounding_mode="floor")
    rows = batch * L + index.flatten()[slots]
    return rows, slots


def _gather(x: Tensor, index: Tensor, counts: Tensor) -> Tensor:
    B, L, D = x.shape
    K = index.shape[1]
    rows, slots = _flat_rows(index, counts, L)
    picked = x.reshape(B * L, D).index_select(0, rows)
    if slots.numel() == B * K:  # no padding slot (equal counts, or the packed layout): no zero fill
        return picked.view(B, K, D)
    out = x.new_zeros(B * K, D)
    out.index_copy_(0, slots, picked)
    return out.view(B, K, D)


def _scatter(x: Tensor, rows_in: Tensor, index: Tensor, counts: Tensor, accumulate: bool) -> Tensor:
    B, L, D = x.shape
    K = index.shape[1]
    rows, slots = _flat_rows(index, counts, L)
    out = x.contiguous().clone().view(B * L, D)
    values = rows_in.reshape(B * K, D).index_select(0, slots)
    if accumulate:
        out.index_add_(0, rows, values)
    else:
        out.index_copy_(0, rows, values)
    return out.view(B, L, D)


# ------------------------------------------------------------------ flow_route
@torch.library.custom_op("sparsecc::flow_route", mutates_args=())
def flow_route(keep: Tensor) -> tuple[Tensor, Tensor]:
    """Kept positions of each example, ascending, packed into [B, K] with counts [B] (see module docstring)."""
    if keep.dim() != 2 or keep.dtype != torch.bool:
        raise ValueError(f"sparsecc::flow_route: expected keep [B, L] bool, got {tuple(keep.shape)} {keep.dtype}")
    B, L = keep.shape
    counts = keep.sum(1, dtype=torch.int64)
    if B == 0 or L == 0:
        return torch.zeros(B, 1, dtype=torch.int64, device=keep.device), counts
    K = max(1, int(counts.max()))
    # a stable sort of (not kept) puts the kept positions first, in ascending order
    order = torch.sort((~keep).to(torch.uint8), dim=1, stable=True).indices[:, :K]
    index = order.masked_fill(~_slot_valid(order, counts), 0)
    return index.contiguous(), counts


@flow_route.register_fake
def _(keep):
    B, L = keep.shape
    K = torch.library.get_ctx().new_dynamic_size(min=1)
    torch._check(K <= torch.sym_max(L, 1))
    return keep.new_empty((B, K), dtype=torch.int64), keep.new_empty((B,), dtype=torch.int64)


# ------------------------------------------------------------------ flow_gather
@torch.library.custom_op("sparsecc::flow_gather", mutates_args=())
def flow_gather(x: Tensor, index: Tensor, counts: Tensor) -> Tensor:
    """Kept rows of x packed into [B, K, D], zeros in padding slots (see module docstring)."""
    check_inputs(x, index, counts, "flow_gather")
    return _gather(x, index, counts)


@flow_gather.register_fake
def _(x, index, counts):
    return x.new_empty((x.shape[0], index.shape[1], x.shape[2]))


def _gather_setup(ctx, inputs, output):
    x, index, counts = inputs
    ctx.save_for_backward(index, counts)
    ctx.L = x.shape[1]


def _gather_backward(ctx, grad):
    index, counts = ctx.saved_tensors
    zeros = grad.new_zeros((grad.shape[0], ctx.L, grad.shape[2]))
    return torch.ops.sparsecc.flow_scatter(zeros, grad.contiguous(), index, counts, False), None, None


flow_gather.register_autograd(_gather_backward, setup_context=_gather_setup)


# ------------------------------------------------------------------ flow_scatter
@torch.library.custom_op("sparsecc::flow_scatter", mutates_args=())
def flow_scatter(x: Tensor, rows: Tensor, index: Tensor, counts: Tensor, accumulate: bool = False) -> Tensor:
    """x with the valid slots' rows written back (or added, accumulate=True); see module docstring."""
    check_inputs(x, index, counts, "flow_scatter")
    if rows.dim() != 3 or rows.shape[0] != x.shape[0] or rows.shape[1] != index.shape[1] \
            or rows.shape[2] != x.shape[2]:
        raise ValueError(f"sparsecc::flow_scatter: rows must be [B, K, D] = {(x.shape[0], index.shape[1], x.shape[2])}"
                         f", got {tuple(rows.shape)}")
    return _scatter(x, rows.to(x.dtype), index, counts, accumulate)


@flow_scatter.register_fake
def _(x, rows, index, counts, accumulate=False):
    return x.new_empty(x.shape)


def _scatter_setup(ctx, inputs, output):
    x, rows, index, counts, accumulate = inputs
    ctx.save_for_backward(index, counts)
    ctx.accumulate = accumulate


def _scatter_backward(ctx, grad):
    index, counts = ctx.saved_tensors
    grad = grad.contiguous()
    grad_rows = torch.ops.sparsecc.flow_gather(grad, index, counts)
    if ctx.accumulate:
        grad_x = grad
    else:
        zeros = grad.new_zeros((grad.shape[0], index.shape[1], grad.shape[2]))
        grad_x = torch.ops.sparsecc.flow_scatter(grad, zeros, index, counts, False)
    return grad_x, grad_rows, None, None, None


flow_scatter.register_autograd(_scatter_backward, setup_context=_scatter_setup)

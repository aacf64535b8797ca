"""Triton kernels of the token-flow ops (SparseFlow): `sparsecc::flow_route`, `flow_gather`, `flow_scatter`.

The op contract is in op.py: index [B, K] int64 holds each example's kept
positions (ascending) in its first counts[b] slots, padding slots after them.

- route, grid (B,): walks the example's keep mask in BLOCK_L chunks, a prefix sum (tl.cumsum)
  giving each kept position its slot; K = max(counts) is data-dependent, so counts are summed
  first and K is read on the host (as the CPU op does) to size the output.
- gather, grid (B, K / BLOCK_K, D / BLOCK_D): out[b, k] = x[b, index[b, k]] for valid slots, 0 for
  padding slots; a pure row gather (the backward of scatter's `rows`, and scatter is its backward).
- scatter, grid (B, L / BLOCK_L, D / BLOCK_D): one pass over all rows of x writes the new tensor:
  a kept row becomes rows[b, slot] (accumulate=False) or x + rows[b, slot] (accumulate=True: the
  residual add fused into the scatter); a skipped row is copied. The row -> slot map it reads
  ([B, L] int32, -1 = skipped) comes from a small kernel over the K slots, so no clone of x
  precedes the scatter and no row is written twice.

The backward formulas of the ops call the ops themselves (gather <-> scatter), so on CUDA they run
these kernels too.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

from sparsecc.errors import UnsupportedError
from sparsecc.ops.token_flow.op import check_inputs
from sparsecc.ops.triton_runtime import DEFAULT_OPTIONS, TritonOptions, autotuned, check_device, import_triton

triton = import_triton()
import triton.language as tl  # noqa: E402

_OP = "sparsecc token flow (triton)"


def _mk(names):
    def make(*vals):
        *meta, warps = vals
        return triton.Config(dict(zip(names, meta)), num_warps=warps)
    return make


# Candidate configs (BLOCK_R rows, BLOCK_D columns, num_warps) of the gather and scatter kernels.
ROW_CONFIGS = ((16, 128, 4), (8, 256, 4), (32, 64, 4), (4, 512, 4), (16, 256, 8))
INTERPRETER_CONFIG = (4, 16, 1)


@triton.jit
def _route_kernel(KEEP, INDEX, L, K, BLOCK_L: tl.constexpr):
    b = tl.program_id(0)
    offset = tl.full([], 0, dtype=tl.int32)
    for l0 in range(0, L, BLOCK_L):
        pos = l0 + tl.arange(0, BLOCK_L)
        keep = tl.load(KEEP + b.to(tl.int64) * L + pos, mask=pos < L, other=0).to(tl.int32)
        slot = offset + tl.cumsum(keep, 0) - 1
        tl.store(INDEX + b.to(tl.int64) * K + slot, pos.to(tl.int64), mask=(keep != 0) & (pos < L))
        offset += tl.sum(keep, 0)


@triton.jit
def _gather_kernel(X, INDEX, COUNTS, OUT, L, K, D, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    b = tl.program_id(0)
    slots = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
    offs = tl.program_id(2) * BLOCK_D + tl.arange(0, BLOCK_D)
    d_ok = offs < D
    n = tl.load(COUNTS + b)
    in_k = slots < K
    valid = in_k & (slots < n)
    pos = tl.load(INDEX + b.to(tl.int64) * K + slots, mask=valid, other=0)
    vals = tl.load(X + (b.to(tl.int64) * L + pos)[:, None] * D + offs[None, :], mask=valid[:, None] & d_ok[None, :],
                   other=0.0)
    tl.store(OUT + (b.to(tl.int64) * K + slots)[:, None] * D + offs[None, :], vals,
             mask=in_k[:, None] & d_ok[None, :])


@triton.jit
def _slot_map_kernel(INDEX, COUNTS, MAP, L, K, BLOCK_R: tl.constexpr):
    b = tl.program_id(0)
    slots = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
    valid = (slots < K) & (slots < tl.load(COUNTS + b))
    pos = tl.load(INDEX + b.to(tl.int64) * K + slots, mask=valid, other=0)
    tl.store(MAP + b.to(tl.int64) * L + pos, slots.to(tl.int32), mask=valid)


@triton.jit
def _scatter_kernel(X, ROWS, MAP, OUT, L, K, D, ACCUMULATE: tl.constexpr, BLOCK_R: tl.constexpr,
                    BLOCK_D: tl.constexpr):
    b = tl.program_id(0)
    pos = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
    offs = tl.program_id(2) * BLOCK_D + tl.arange(0, BLOCK_D)
    p_ok = pos < L
    d_ok = offs < D
    slot = tl.load(MAP + b.to(tl.int64) * L + pos, mask=p_ok, other=-1)
    kept = slot >= 0
    x_off = (b.to(tl.int64) * L + pos)[:, None] * D + offs[None, :]
    m = p_ok[:, None] & d_ok[None, :]
    x = tl.load(X + x_off, mask=m, other=0.0)
    r = tl.load(ROWS + (b.to(tl.int64) * K + slot)[:, None] * D + offs[None, :], mask=kept[:, None] & m, other=0.0)
    if ACCUMULATE:
        out = tl.where(kept[:, None], x + r.to(x.dtype), x)
    else:
        out = tl.where(kept[:, None], r.to(x.dtype), x)
    tl.store(OUT + x_off, out, mask=m)


def tuned(name: str, options: TritonOptions = DEFAULT_OPTIONS):
    """The autotuned kernel `name` ("_gather_kernel" or "_scatter_kernel") under `options`."""
    fn = {"_gather_kernel": _gather_kernel, "_scatter_kernel": _scatter_kernel}[name]
    return autotuned(fn, name, ROW_CONFIGS, INTERPRETER_CONFIG, _mk(("BLOCK_R", "BLOCK_D")), options, key=["D"])


def _check_float(x: Tensor, op: str) -> None:
    if not x.is_floating_point():
        raise UnsupportedError(f"{_OP} {op}: x must be a floating-point tensor, got {x.dtype}")


def flow_route(keep: Tensor) -> tuple[Tensor, Tensor]:
    """Triton `sparsecc::flow_route`: (index int64 [B, K], counts int64 [B]); K = max(1, max counts)."""
    if keep.dim() != 2 or keep.dtype != torch.bool:
        raise ValueError(f"sparsecc::flow_route: expected keep [B, L] bool, got {tuple(keep.shape)} {keep.dtype}")
    check_device(keep, op=_OP)
    B, L = keep.shape
    counts = keep.sum(1, dtype=torch.int64)
    if B == 0 or L == 0:
        return torch.zeros(B, 1, dtype=torch.int64, device=keep.device), counts
    K = max(1, int(counts.max()))  # the output size depends on the data: one host sync, as on CPU
    index = torch.zeros(B, K, dtype=torch.int64, device=keep.device)
    _route_kernel[(B,)](keep.contiguous().to(torch.uint8), index, L, K, BLOCK_L=16 if _interp() else 1024)
    return index, counts


def flow_gather(x: Tensor, index: Tensor, counts: Tensor, *, options: TritonOptions = DEFAULT_OPTIONS) -> Tensor:
    """Triton `sparsecc::flow_gather`: [B, K, D], the kept rows packed, zeros in padding slots."""
    check_inputs(x, index, counts, "flow_gather")
    check_device(x, index, counts, op=_OP)
    _check_float(x, "flow_gather")
    B, L, D = x.shape
    K = index.shape[1]
    out = torch.empty(B, K, D, dtype=x.dtype, device=x.device)
    if out.numel() == 0:
        return out
    x, index, counts = x.contiguous(), index.contiguous(), counts.contiguous()
    grid = lambda meta: (B, triton.cdiv(K, meta["BLOCK_R"]), triton.cdiv(D, meta["BLOCK_D"]))  # noqa: E731
    tuned("_gather_kernel", options)[grid](x, index, counts, out, L, K, D)
    return out


def flow_scatter(x: Tensor, rows: Tensor, index: Tensor, counts: Tensor, accumulate: bool = False, *,
                 options: TritonOptions = DEFAULT_OPTIONS) -> Tensor:
    """Triton `sparsecc::flow_scatter`: a new [B, L, D]; kept rows replaced by (or, accumulate, added to) rows."""
    check_inputs(x, index, counts, "flow_scatter")
    if rows.dim() != 3 or tuple(rows.shape) != (x.shape[0], index.shape[1], x.shape[2]):
        raise ValueError(f"sparsecc::flow_scatter: rows must be [B, K, D] = {(x.shape[0], index.shape[1], x.shape[2])}"
                         f", got {tuple(rows.shape)}")
    check_device(x, rows, index, counts, op=_OP)
    _check_float(x, "flow_scatter")
    B, L, D = x.shape
    K = index.shape[1]
    out = torch.empty(B, L, D, dtype=x.dtype, device=x.device)
    if out.numel() == 0:
        return out
    x, rows, index, counts = x.contiguous(), rows.contiguous(), index.contiguous(), counts.contiguous()
    slot_map = torch.full((B, L), -1, dtype=torch.int32, device=x.device)
    block = 16 if _interp() else 256
    _slot_map_kernel[(B, triton.cdiv(K, block))](index, counts, slot_map, L, K, BLOCK_R=block)
    grid = lambda meta: (B, triton.cdiv(L, meta["BLOCK_R"]), triton.cdiv(D, meta["BLOCK_D"]))  # noqa: E731
    tuned("_scatter_kernel", options)[grid](x, rows, slot_map, out, L, K, D, ACCUMULATE=bool(accumulate))
    return out


def _interp() -> bool:
    return bool(triton.knobs.runtime.interpret)


def register(options: TritonOptions = DEFAULT_OPTIONS) -> list[str]:
    """Register the launchers as the CUDA kernels of the flow ops (their backward formulas call the ops
    themselves, so CUDA gradients run these kernels too); returns the op names."""
    kernels = {"sparsecc::flow_route": flow_route,
               "sparsecc::flow_gather": functools.partial(flow_gather, options=options),
               "sparsecc::flow_scatter": functools.partial(flow_scatter, options=options)}
    for name, fn in kernels.items():
        torch.library.register_kernel(name, "cuda", fn)
    return list(kernels)

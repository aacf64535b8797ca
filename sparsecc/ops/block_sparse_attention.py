"""`sparsecc::block_sparse_attention`: block-sparse softmax attention on CPU, forward and backward.

The layout is one block mask [ceil(L/b), ceil(S/b)] shared by every batch item and head, given
in its padded-row (ELL) view (`sparsecc.layouts.indexing.block_mask_to_ell`). The result equals
dense softmax attention whose scores are -inf outside the expanded block mask, outside the causal
triangle (key j > query i, absolute positions) and at padded keys; a row with no allowed key
outputs 0 and gets zero gradients.

How the CPU kernel works (work is proportional to the kept blocks, no L x S tensor exists).
fp32 runs the native kernels (`native/block_sparse_attention.c`) when they can be built: forward
one task per (batch item, head, query block), scores and P @ V by BLAS calls on the kept K/V
blocks where they lie (a run of consecutive blocks is one call), an exact softmax over the row in
between; backward one task per (batch item, kv head), recomputing P from the saved logsumexp.
Otherwise (other dtypes, no compiler, SPARSECC_NATIVE=0):
1. Plan: drop padding entries, duplicates and (causal) blocks above the diagonal, then bucket the
   query blocks by their number of kept key blocks m, so no padded block is ever computed.
2. For a chunk of n query blocks of one bucket, gather their kept K and V blocks once, as
   [B*Hkv, n, m*b, D] (an index_select of whole blocks). The G = H/Hkv query heads that share a
   kv head are stacked as rows, [B*Hkv, n, G*b, D], so K/V are never copied per head (GQA).
3. Run PyTorch's fused CPU flash-attention kernel (`aten._scaled_dot_product_flash_attention_for_cpu`)
   on that batch of small dense problems (online softmax in fp32; bf16/fp16 run natively). An
   additive mask is passed only where a chunk needs one: the causal triangle (one [G*b, m*b]
   pattern shared by all rows whose diagonal block is kept), the partial last key block, key padding.
4. Chunks run inline on torch's intra-op threads, or (WORKERS > 1) spread over worker threads
   with one intra-op thread each, largest first.
5. Backward recomputes P per chunk from the saved logsumexp (flash kernel backward) and
   scatter-adds dK/dV of the gathered blocks back with index_add_.
"""

from __future__ import annotations

import ctypes
import math
import threading
from concurrent.futures import ThreadPoolExecutor
from functools import lru_cache
from typing import Callable, NamedTuple, Optional

import torch
from torch import Tensor

from sparsecc.errors import LayoutError
from sparsecc.layouts.indexing import block_mask_to_ell, crop_ell
from sparsecc.ops import native

_flash_fwd = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default
_flash_bwd = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward.default

# A chunk gathers at most this many K (and as many V) elements: bounds memory, keeps blocks in cache.
CHUNK_ELEMENTS = 1 << 18
# Chunks run on this many worker threads, each with one intra-op thread (0: torch's thread count).
# 1 (the default) runs the chunks inline, each op on torch's intra-op threads: on a quiet 2-core
# machine that measured 10-35 % faster forward and forward+backward than 2 workers (the workers
# contend for the GIL between their small ops); workers can still help when other processes
# hold some of the cores.
WORKERS = 1

_pool: Optional[ThreadPoolExecutor] = None
_pool_size = 0
_pool_lock = threading.Lock()


def _single_threaded() -> None:
    """Worker initialiser: this thread's ops run on one intra-op thread (OpenMP/MKL settings are per thread)."""
    torch.get_num_threads()  # initialise the thread's settings first, or a later lazy init would undo this
    torch.set_num_threads(1)


def _run_chunks(fn: Callable[[_Chunk], None], chunks: list[_Chunk]) -> None:
    """Call fn on every chunk: inline, or spread over worker threads, largest chunks first."""
    global _pool, _pool_size
    threads = torch.get_num_threads()
    workers = min(WORKERS or threads, len(chunks))
    if workers <= 1:
        for c in chunks:
            fn(c)
        return
    with _pool_lock:
        if _pool is None or _pool_size < workers:
            _pool, _pool_size = ThreadPoolExecutor(workers, "sparsecc-bsa", _single_threaded), workers
        pool = _pool
    inference, grad = torch.is_inference_mode_enabled(), torch.is_grad_enabled()

    def in_callers_mode(c: _Chunk) -> None:  # grad / inference mode are thread-local: carry the caller's
        with torch.inference_mode(inference), torch.set_grad_enabled(grad):
            fn(c)

    try:
        for _ in pool.map(in_callers_mode, sorted(chunks, key=lambda c: -c.n * c.m)):
            pass
    finally:
        torch.set_num_threads(threads)  # a worker's set_num_threads(1) also set the default for new threads


def _check_inputs(q: Tensor, k: Tensor, v: Tensor, kv_indices: Tensor, kv_counts: Tensor,
                  block_size: int, key_padding_mask: Optional[Tensor]) -> None:
    """Raise LayoutError/ValueError when shapes do not fit together (works on fake tensors too)."""
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"block_sparse_attention expects q (B, H, L, D), k and v (B, Hkv, S, D); "
                         f"got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    B, H, L, D = q.shape
    if k.shape != v.shape or k.shape[0] != B or k.shape[3] != D or H % k.shape[1] != 0:
        raise ValueError(f"k and v must both be (B={B}, Hkv, S, D={D}) with H={H} a multiple of Hkv; "
                         f"got k {tuple(k.shape)}, v {tuple(v.shape)}")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"q, k, v must share a dtype; got {q.dtype}, {k.dtype}, {v.dtype}")
    if block_size <= 0:
        raise LayoutError(f"block_size must be positive, got {block_size}")
    nq = -(-L // block_size)
    # A layout for a longer sequence is cropped to this one (crop_ell); a shorter one cannot grow.
    if kv_indices.dim() != 2 or kv_indices.shape[0] < nq or kv_counts.shape != (kv_indices.shape[0],):
        raise LayoutError(
            f"the block layout does not fit L={L} with block_size={block_size}: expected kv_indices "
            f"[>= {nq}, max_kept] and kv_counts of the same length (see "
            f"sparsecc.layouts.indexing.block_mask_to_ell), got {tuple(kv_indices.shape)} and "
            f"{tuple(kv_counts.shape)}. A layout made for {kv_indices.shape[0] * block_size} tokens runs "
            "sequences up to that length; calibrate at the longest length you will run.")
    if kv_indices.is_floating_point() or kv_counts.is_floating_point():
        raise LayoutError("kv_indices and kv_counts must be integer tensors")
    if key_padding_mask is not None and (key_padding_mask.dtype != torch.bool
                                         or key_padding_mask.shape != (B, k.shape[2])):
        raise ValueError(f"key_padding_mask must be bool (B={B}, S={k.shape[2]}) with True = keep; "
                         f"got {key_padding_mask.dtype} {tuple(key_padding_mask.shape)}")


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of logsumexp and of gradient accumulation: fp64 for fp64 inputs, else fp32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


class _Chunk(NamedTuple):
    """n query blocks that keep m key blocks each, in the flat row views used by the kernel."""
    n: int
    m: int
    q_rows: Tensor  # [B*Hkv*n] rows of the [B*Hkv*nq, G*b*D] query-block view
    kv_rows: Tensor  # [B*Hkv*n*m] rows of the [B*Hkv*nk, b*D] key-block view
    mask: Optional[Tensor]  # additive [1 or B, 1 or n, G*b, m*b] (0 / -inf), None when nothing is masked
    empty_rows: Optional[Tensor]  # bool [1 or B, 1 or n, G*b]: rows with no allowed key, None if none


def _clean_layout(kv_indices: Tensor, kv_counts: Tensor, nq: int, nk: int, S: int, b: int,
                  causal: bool) -> tuple[Tensor, Tensor]:
    """The ELL layout with padding entries, duplicates and (causal) blocks above the diagonal dropped,
    each row's key blocks ascending. Raises LayoutError for indices outside [0, nk)."""
    idx, cnt = kv_indices.long().cpu(), kv_counts.long().cpu()
    width = idx.shape[1]
    valid = torch.arange(width).unsqueeze(0) < cnt.unsqueeze(1)
    if bool(((idx < 0) | (idx >= nk))[valid].any()) or bool((cnt > width).any()):
        raise LayoutError(f"kv_indices must lie in [0, {nk}) (S={S}, block_size={b}) and kv_counts "
                          f"in [0, {width}]; rebuild them with block_mask_to_ell(mask[{nq}, {nk}])")
    rows = torch.arange(nq).unsqueeze(1).expand_as(idx)
    if causal:  # blocks entirely above the diagonal contribute nothing
        valid &= idx <= rows
    keep = torch.zeros(nq, nk, dtype=torch.bool)
    keep[rows[valid], idx[valid]] = True
    return block_mask_to_ell(keep)


def _plan(kv_indices: Tensor, kv_counts: Tensor, B: int, H: int, kv_heads: int, L: int, S: int, D: int,
          b: int, causal: bool, key_padding_mask: Optional[Tensor], dtype: torch.dtype) -> list[_Chunk]:
    """Bucket the query blocks by kept-block count and cut the buckets into chunks.

    The layout is cleaned first (`_clean_layout`), so each chunk is a dense batch of equal-sized
    problems. Each chunk gets the element mask it needs.
    """
    nq, nk, g = -(-L // b), -(-S // b), H // kv_heads
    idx, cnt = _clean_layout(kv_indices, kv_counts, nq, nk, S, b, causal)

    kpm = None
    if key_padding_mask is not None:  # keys past S are padding too
        kpm = torch.nn.functional.pad(key_padding_mask.cpu(), (0, nk * b - S))
    # Causal: a row's blocks are ascending and none is above the diagonal, so only a kept diagonal
    # block, always the row's last, needs the triangle; the same [b, m*b] pattern serves every row.
    last = idx.gather(1, (cnt - 1).clamp(min=0).unsqueeze(1)).squeeze(1)
    diag = (cnt > 0) & (last == torch.arange(nq)) if causal else torch.zeros(nq, dtype=torch.bool)
    ar, heads = torch.arange(b), torch.arange(B * kv_heads).unsqueeze(1)
    masks: dict[tuple, tuple[Tensor, Optional[Tensor]]] = {}
    chunks = []
    for m, has_diag in torch.unique(torch.stack([cnt, diag.long()], 1), dim=0).tolist():
        if m == 0:
            continue
        q_all = ((cnt == m) & (diag == bool(has_diag))).nonzero().flatten()
        for q_blocks in q_all.split(max(1, CHUNK_ELEMENTS // (B * kv_heads * m * b * D))):
            n, kv = len(q_blocks), idx[q_blocks, :m]
            kpos = (kv.unsqueeze(-1) * b + ar).flatten(1)  # [n, m*b] key positions
            allowed = None  # broadcastable to [B, n, b, m*b]
            if has_diag:
                allowed = torch.ones(1, 1, b, m * b, dtype=torch.bool)
                allowed[..., (m - 1) * b:] = torch.ones(b, b, dtype=torch.bool).tril()
            per_row = S % b != 0 and bool((kv == nk - 1).any())
            if per_row:
                allowed = (kpos < S)[None, :, None] & (True if allowed is None else allowed)
            if kpm is not None:
                per_row = True
                allowed = kpm[:, kpos].unsqueeze(2) & (True if allowed is None else allowed)
            mask = empty = None
            if allowed is not None:
                key = (m, has_diag) if not per_row else None
                if key in masks:
                    mask, empty = masks[key]
                else:
                    rows_gb = (*allowed.shape[:2], g, b, m * b)  # rows are (G heads, b positions)
                    allowed = allowed.unsqueeze(2).expand(rows_gb).flatten(2, 3)
                    mask = torch.zeros(allowed.shape, dtype=dtype).masked_fill_(~allowed, float("-inf"))
                    empty = ~allowed.any(-1)
                    empty = empty if bool(empty.any()) else None
                    if key is not None:
                        masks[key] = mask, empty
            q_rows, kv_rows = (heads * nq + q_blocks).flatten(), (heads * nk + kv.flatten()).flatten()
            chunks.append(_Chunk(n, m, q_rows, kv_rows, mask, empty))
    return chunks


def _batches(c: _Chunk, B: int, kv_heads: int) -> list[tuple[slice, Optional[Tensor], Optional[Tensor]]]:
    """(rows of the B*Hkv dimension, mask, empty rows): one call, or one per batch item (key padding)."""
    if c.mask is None or c.mask.shape[0] == 1:
        return [(slice(None), c.mask, c.empty_rows)]
    return [(slice(i * kv_heads, (i + 1) * kv_heads), c.mask[i:i + 1],
             None if c.empty_rows is None else c.empty_rows[i:i + 1]) for i in range(B)]


def _blocked_q(x: Tensor, b: int, nq: int, kv_heads: int) -> Tensor:
    """(B, H, L, D) -> [B*Hkv*nq, G*b*D]: per (batch, kv head, query block), its G heads' rows."""
    B, H, L, D = x.shape
    g = H // kv_heads
    x = torch.nn.functional.pad(x, (0, 0, 0, nq * b - L)) if nq * b != L else x
    return x.reshape(B, kv_heads, g, nq, b * D).transpose(2, 3).reshape(B * kv_heads * nq, g * b * D)


def _unblocked_q(x: Tensor, B: int, H: int, L: int, b: int) -> Tensor:
    """Inverse of `_blocked_q`: [B*Hkv*nq, G*b*d] -> (B, H, L, d), contiguous."""
    nq = -(-L // b)
    kvh = x.shape[0] // (B * nq)
    g = H // kvh
    d = x.shape[1] // (g * b)
    x = x.view(B, kvh, nq, g, b * d).transpose(2, 3).reshape(B, H, nq * b, d)
    return x[:, :, :L].contiguous()


def _blocked_kv(x: Tensor, b: int, nk: int) -> Tensor:
    """(B, Hkv, S, D) -> [B*Hkv*nk, b*D] (zero padded)."""
    B, K, S, D = x.shape
    x = torch.nn.functional.pad(x, (0, 0, 0, nk * b - S)) if nk * b != S else x
    return x.reshape(B * K * nk, b * D)


@lru_cache(maxsize=None)
def _native_kernels() -> Optional[tuple[Callable, Callable]]:
    """(forward, backward) C functions, or None when the kernel cannot be built."""
    lib = native.load("block_sparse_attention")
    if lib is None:
        return None
    i64, ptr, tail = ctypes.c_int64, ctypes.c_void_p, [ctypes.c_float, ctypes.c_int, ctypes.c_int, ctypes.c_void_p]
    fwd, bwd = lib.sparsecc_bsa_forward_f32, lib.sparsecc_bsa_backward_f32
    fwd.argtypes = [i64] * 7 + [ptr] * 5 + [i64, ptr] + tail + [ptr, ptr]
    bwd.argtypes = [i64] * 7 + [ptr] * 8 + [i64, ptr] + tail + [ptr, ptr, ptr]
    fwd.restype = bwd.restype = ctypes.c_int
    return fwd, bwd


def _native_ready(q: Tensor) -> bool:
    """The C kernels apply: fp32, native kernels enabled and built, PyTorch's sgemm_ found."""
    return (q.dtype == torch.float32 and native.enabled() and _native_kernels() is not None
            and native.blas_sgemm() is not None)


def _ptr(t: Optional[Tensor]) -> Optional[int]:
    return None if t is None else t.data_ptr()


def _native_layout(kv_indices: Tensor, kv_counts: Tensor, L: int, S: int, b: int, causal: bool,
                   key_padding_mask: Optional[Tensor]) -> tuple[Tensor, Tensor, Optional[Tensor]]:
    """The kernels' inputs besides the tensors: the cleaned ELL layout and the padding mask as bytes."""
    idx, cnt = _clean_layout(kv_indices, kv_counts, -(-L // b), -(-S // b), S, b, causal)
    kpm = None if key_padding_mask is None else key_padding_mask.to(torch.uint8).contiguous()
    return idx.contiguous(), cnt.contiguous(), kpm


def _forward_native(q: Tensor, k: Tensor, v: Tensor, kv_indices: Tensor, kv_counts: Tensor, b: int,
                    scale: float, causal: bool, key_padding_mask: Optional[Tensor]
                    ) -> Optional[tuple[Tensor, Tensor]]:
    """The forward through the C kernel, or None when it does not apply (not fp32) or is unavailable."""
    if not _native_ready(q):
        return None
    B, H, L, D = q.shape
    kvh, S = k.shape[1], k.shape[2]
    idx, cnt, kpm = _native_layout(kv_indices, kv_counts, L, S, b, causal, key_padding_mask)
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    out, lse = torch.empty_like(q), torch.empty(B, H, L)
    status = _native_kernels()[0](B, H, kvh, L, S, D, b, *map(_ptr, (q, k, v, idx, cnt)), idx.shape[1], _ptr(kpm),
                                  scale, int(causal), torch.get_num_threads(), native.blas_sgemm(),
                                  out.data_ptr(), lse.data_ptr())
    return (out, lse) if status == 0 else None


def _backward_native(grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
                     kv_indices: Tensor, kv_counts: Tensor, b: int, scale: float, causal: bool,
                     key_padding_mask: Optional[Tensor]) -> Optional[tuple[Tensor, Tensor, Tensor]]:
    """(dq, dk, dv) through the C kernel (parallel over batch x kv heads), or None when it does not apply."""
    if not _native_ready(q):  # fp32 q: the forward's lse is fp32 too
        return None
    B, H, L, D = q.shape
    kvh, S = k.shape[1], k.shape[2]
    idx, cnt, kpm = _native_layout(kv_indices, kv_counts, L, S, b, causal, key_padding_mask)
    q, k, v, out, lse = (t.contiguous() for t in (q, k, v, out, lse))
    grad_out = grad_out.to(q.dtype).contiguous()
    dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    status = _native_kernels()[1](B, H, kvh, L, S, D, b, *map(_ptr, (q, k, v, out, grad_out, lse, idx, cnt)),
                                  idx.shape[1], _ptr(kpm), scale, int(causal), torch.get_num_threads(),
                                  native.blas_sgemm(), dq.data_ptr(), dk.data_ptr(), dv.data_ptr())
    return (dq, dk, dv) if status == 0 else None


def _forward_cpu(q: Tensor, k: Tensor, v: Tensor, kv_indices: Tensor, kv_counts: Tensor, b: int,
                 scale: float, causal: bool, key_padding_mask: Optional[Tensor]) -> tuple[Tensor, Tensor]:
    B, H, L, D = q.shape
    kvh, S = k.shape[1], k.shape[2]
    g, nq, nk = H // kvh, -(-L // b), -(-S // b)
    kv_indices, kv_counts = crop_ell(kv_indices, kv_counts, nq, nk)
    result = _forward_native(q, k, v, kv_indices, kv_counts, b, scale, causal, key_padding_mask)
    if result is not None:
        return result
    chunks = _plan(kv_indices, kv_counts, B, H, kvh, L, S, D, b, causal, key_padding_mask, q.dtype)
    qb, kb, vb = _blocked_q(q, b, nq, kvh), _blocked_kv(k, b, nk), _blocked_kv(v, b, nk)
    out = torch.zeros(B * kvh * nq, g * b * D, dtype=q.dtype)
    lse = torch.full((B * kvh * nq, g * b), float("-inf"), dtype=_acc_dtype(q.dtype))

    def run(c: _Chunk) -> None:
        qc = qb.index_select(0, c.q_rows).view(-1, c.n, g * b, D)
        kc = kb.index_select(0, c.kv_rows).view(-1, c.n, c.m * b, D)
        vc = vb.index_select(0, c.kv_rows).view(-1, c.n, c.m * b, D)
        q_rows = c.q_rows.view(-1, c.n)
        for rows, mask, empty in _batches(c, B, kvh):
            o, s = _flash_fwd(qc[rows], kc[rows], vc[rows], attn_mask=mask, scale=scale)
            if empty is not None:  # rows with no allowed key: logsumexp is -inf
                s = s.masked_fill(empty, float("-inf"))
            r = q_rows[rows].flatten()
            out.index_copy_(0, r, o.reshape(len(r), -1))
            lse.index_copy_(0, r, s.reshape(len(r), -1).to(lse.dtype))

    _run_chunks(run, chunks)
    return _unblocked_q(out, B, H, L, b), _unblocked_q(lse, B, H, L, b).squeeze(-1)


def _backward_cpu(grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
                  kv_indices: Tensor, kv_counts: Tensor, b: int, scale: float, causal: bool,
                  key_padding_mask: Optional[Tensor]) -> tuple[Tensor, Tensor, Tensor]:
    B, H, L, D = q.shape
    kvh, S = k.shape[1], k.shape[2]
    g, nq, nk = H // kvh, -(-L // b), -(-S // b)
    kv_indices, kv_counts = crop_ell(kv_indices, kv_counts, nq, nk)
    result = _backward_native(grad_out, q, k, v, out, lse, kv_indices, kv_counts, b, scale, causal,
                              key_padding_mask)
    if result is not None:
        return result
    chunks = _plan(kv_indices, kv_counts, B, H, kvh, L, S, D, b, causal, key_padding_mask, q.dtype)
    qb, kb, vb = _blocked_q(q, b, nq, kvh), _blocked_kv(k, b, nk), _blocked_kv(v, b, nk)
    dob, ob = _blocked_q(grad_out.to(q.dtype), b, nq, kvh), _blocked_q(out, b, nq, kvh)
    lse = lse.masked_fill(torch.isinf(lse), 0.0)  # rows with no allowed key: P = exp(-inf - 0) = 0
    lseb = _blocked_q(lse.unsqueeze(-1), b, nq, kvh)
    acc = _acc_dtype(q.dtype)
    dq = torch.zeros_like(qb)
    dkv: dict[int, tuple[Tensor, Tensor]] = {}  # per-thread dK, dV accumulators (index_add_ races)

    def run(c: _Chunk) -> None:
        tid = threading.get_ident()
        if tid not in dkv:
            dkv[tid] = (torch.zeros(kb.shape, dtype=acc), torch.zeros(kb.shape, dtype=acc))
        dk, dv = dkv[tid]
        qc, doc, oc = (t.index_select(0, c.q_rows).view(-1, c.n, g * b, D) for t in (qb, dob, ob))
        lc = lseb.index_select(0, c.q_rows).view(-1, c.n, g * b)
        kc = kb.index_select(0, c.kv_rows).view(-1, c.n, c.m * b, D)
        vc = vb.index_select(0, c.kv_rows).view(-1, c.n, c.m * b, D)
        q_rows, kv_rows = c.q_rows.view(-1, c.n), c.kv_rows.view(-1, c.n * c.m)
        for rows, mask, _ in _batches(c, B, kvh):
            dqc, dkc, dvc = _flash_bwd(doc[rows], qc[rows], kc[rows], vc[rows], oc[rows], lc[rows], 0.0,
                                       False, attn_mask=mask, scale=scale)
            r, kr = q_rows[rows].flatten(), kv_rows[rows].flatten()
            dq.index_copy_(0, r, dqc.reshape(len(r), -1).to(dq.dtype))
            dk.index_add_(0, kr, dkc.reshape(len(kr), -1).to(acc))
            dv.index_add_(0, kr, dvc.reshape(len(kr), -1).to(acc))

    _run_chunks(run, chunks)
    if not dkv:
        dkv[0] = (torch.zeros(kb.shape, dtype=acc), torch.zeros(kb.shape, dtype=acc))
    dks, dvs = zip(*dkv.values())
    dk, dv = sum(dks[1:], dks[0]), sum(dvs[1:], dvs[0])
    dk = dk.view(B, kvh, nk * b, D)[:, :, :S].to(k.dtype).contiguous()
    dv = dv.view(B, kvh, nk * b, D)[:, :, :S].to(v.dtype).contiguous()
    return _unblocked_q(dq, B, H, L, b), dk, dv


@torch.library.custom_op("sparsecc::block_sparse_attention", mutates_args=(), device_types="cpu")
def block_sparse_attention_op(q: Tensor, k: Tensor, v: Tensor, kv_indices: Tensor, kv_counts: Tensor,
                              block_size: int, scale: float, causal: bool,
                              key_padding_mask: Optional[Tensor]) -> tuple[Tensor, Tensor]:
    """Block-sparse attention; returns (out (B, H, L, D) in q's dtype, logsumexp (B, H, L)).

    logsumexp is fp32 (fp64 for fp64 inputs) and -inf for rows with no allowed key; it is not
    differentiable.
    """
    _check_inputs(q, k, v, kv_indices, kv_counts, block_size, key_padding_mask)
    return _forward_cpu(q, k, v, kv_indices, kv_counts, block_size, scale, causal, key_padding_mask)


@block_sparse_attention_op.register_fake
def _(q, k, v, kv_indices, kv_counts, block_size, scale, causal, key_padding_mask):
    _check_inputs(q, k, v, kv_indices, kv_counts, block_size, key_padding_mask)
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    return out, q.new_empty(q.shape[:3], dtype=_acc_dtype(q.dtype))


@torch.library.custom_op("sparsecc::block_sparse_attention_backward", mutates_args=(), device_types="cpu")
def block_sparse_attention_backward_op(
        grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, kv_indices: Tensor,
        kv_counts: Tensor, block_size: int, scale: float, causal: bool,
        key_padding_mask: Optional[Tensor]) -> tuple[Tensor, Tensor, Tensor]:
    """(dq, dk, dv) of `sparsecc::block_sparse_attention` given the forward's out and logsumexp."""
    return _backward_cpu(grad_out, q, k, v, out, lse, kv_indices, kv_counts, block_size, scale, causal,
                         key_padding_mask)


@block_sparse_attention_backward_op.register_fake
def _(grad_out, q, k, v, out, lse, kv_indices, kv_counts, block_size, scale, causal, key_padding_mask):
    return tuple(torch.empty_like(t, memory_format=torch.contiguous_format) for t in (q, k, v))


def _setup_context(ctx, inputs, output) -> None:
    q, k, v, kv_indices, kv_counts, block_size, scale, causal, key_padding_mask = inputs
    out, lse = output
    ctx.mark_non_differentiable(lse)
    ctx.save_for_backward(q, k, v, out, lse, kv_indices, kv_counts, key_padding_mask)
    ctx.args = (block_size, scale, causal)


def _backward(ctx, grad_out: Tensor, _grad_lse: Optional[Tensor]):
    q, k, v, out, lse, kv_indices, kv_counts, key_padding_mask = ctx.saved_tensors
    dq, dk, dv = block_sparse_attention_backward_op(grad_out.contiguous(), q, k, v, out, lse, kv_indices,
                                                    kv_counts, *ctx.args, key_padding_mask)
    return dq, dk, dv, None, None, None, None, None, None


block_sparse_attention_op.register_autograd(_backward, setup_context=_setup_context)


def block_sparse_attention(q: Tensor, k: Tensor, v: Tensor, kv_indices: Tensor, kv_counts: Tensor,
                           block_size: int, scale: Optional[float] = None, causal: bool = False,
                           key_padding_mask: Optional[Tensor] = None) -> Tensor:
    """Softmax attention restricted to a block layout; returns (B, H, L, D) in q's dtype.

    q: (B, H, L, D); k, v: (B, Hkv, S, D) with H % Hkv == 0 (GQA). kv_indices [ceil(L/b), max_kept]
    and kv_counts [ceil(L/b)] are the ELL view of a bool block mask [ceil(L/b), ceil(S/b)]
    (`block_mask_to_ell`). scale defaults to 1/sqrt(D). causal masks key j > query i.
    key_padding_mask: optional bool (B, S), True = a real token.
    """
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    return block_sparse_attention_op(q, k, v, kv_indices, kv_counts, block_size, float(scale), causal,
                                     key_padding_mask)[0]

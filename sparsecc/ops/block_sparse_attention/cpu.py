"""The CPU kernel of `sparsecc::block_sparse_attention` (forward and backward).

Work is proportional to the kept blocks; no L x S tensor exists.

fp32 runs the C++ kernels (`cpu.cpp`, ops `sparsecc_cpu::block_sparse_attention_forward/backward`,
built on first use by `sparsecc.ops.native`): forward one task per (batch item, head, query
block), scores and P @ V by BLAS calls on the kept K/V blocks where they lie (a run of consecutive
blocks is one call), an exact softmax over the row in between; backward one task per (batch item,
kv head), recomputing P from the saved logsumexp. Otherwise (other dtypes, no compiler,
SPARSECC_NATIVE=0, or a score bias) the PyTorch path:
1. Plan: the layout cleaned (`layout.clean_layout`: padding entries, duplicates and causal blocks
   above the diagonal dropped), then the query blocks bucketed by their number of kept key blocks
   m, so no padded block is ever computed.
2. For a chunk of n query blocks of one bucket, gather their kept K and V blocks once, as
   [B*Hkv, n, m*b, D] (an index_select of whole blocks). The G = H/Hkv query heads that share a
   kv head are stacked as rows, [B*Hkv, n, G*b, D], so K/V are never copied per head (GQA).
3. Run PyTorch's fused CPU flash-attention kernel (`aten._scaled_dot_product_flash_attention_for_cpu`)
   on that batch of small dense problems (online softmax in fp32; bf16/fp16 run natively). An
   additive mask is passed only where a chunk needs one: the causal triangle (one [G*b, m*b]
   pattern shared by all rows whose diagonal block is kept), the partial last key block, key padding.
4. Chunks run inline on torch's intra-op threads, or (options.workers > 1) spread over worker
   threads with one intra-op thread each, largest first.
5. Backward recomputes P per chunk from the saved logsumexp (flash kernel backward) and
   scatter-adds dK/dV of the gathered blocks back with index_add_.

Tunables of the PyTorch path are `CpuOptions` (`options()` reads them, `use_options(...)` sets them
for a block of code); the op's schema cannot carry them, so they are per process.
"""

from __future__ import annotations

import contextlib
import dataclasses
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import lru_cache
from typing import Callable, Iterator, NamedTuple, Optional

import torch
from torch import Tensor

from sparsecc.layouts.indexing import crop_ell
from sparsecc.ops import native
from sparsecc.ops.block_sparse_attention.layout import clean_layout

__all__ = ["CpuOptions", "backward", "forward", "native_kernels", "options", "use_options"]

_flash_fwd = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default
_flash_bwd = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward.default


@dataclass(frozen=True)
class CpuOptions:
    """Tunables of the PyTorch path (the C++ kernel has none: it runs one task per query block).

    chunk_elements: a chunk gathers at most this many K (and as many V) elements: bounds memory,
        keeps blocks in cache.
    workers: chunks run on this many worker threads, each with one intra-op thread (0: torch's
        thread count). 1 runs the chunks inline, each op on torch's intra-op threads: on a quiet
        2-core machine that measured 10-35 % faster forward and forward+backward than 2 workers
        (the workers contend for the GIL between their small ops); workers can still help when
        other processes hold some of the cores.
    """

    chunk_elements: int = 1 << 18
    workers: int = 1

    def __post_init__(self) -> None:
        if self.chunk_elements < 1 or self.workers < 0:
            raise ValueError(f"CpuOptions: chunk_elements must be >= 1 and workers >= 0, got {self}")


_options = CpuOptions()
_options_lock = threading.Lock()


def options() -> CpuOptions:
    """The tunables in effect."""
    return _options


@contextlib.contextmanager
def use_options(**changes) -> Iterator[CpuOptions]:
    """Run a block with some tunables changed, e.g. `with use_options(workers=2): ...`."""
    global _options
    with _options_lock:
        previous = _options
        _options = dataclasses.replace(previous, **changes)
    try:
        yield _options
    finally:
        with _options_lock:
            _options = previous


_pool: Optional[ThreadPoolExecutor] = None
_pool_size = 0
_pool_lock = threading.Lock()


def _single_threaded() -> None:
    """Worker initialiser: this thread's ops run on one intra-op thread (OpenMP/MKL settings are per thread)."""
    torch.get_num_threads()  # initialise the thread's settings first, or a later lazy init would undo this
    torch.set_num_threads(1)


def _run_chunks(fn: Callable[[_Chunk], None], chunks: list[_Chunk], workers_option: int) -> None:
    """Call fn on every chunk: inline, or spread over worker threads, largest chunks first."""
    global _pool, _pool_size
    threads = torch.get_num_threads()
    workers = min(workers_option or threads, len(chunks))
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


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of logsumexp and of gradient accumulation: fp64 for fp64 inputs, else fp32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


class _Chunk(NamedTuple):
    """n query blocks that keep m key blocks each, in the flat row views used by the kernel."""
    n: int
    m: int
    q_blocks: Tensor  # [n] query block ids
    kv: Tensor  # [n, m] their kept key block ids
    q_rows: Tensor  # [B*Hkv*n] rows of the [B*Hkv*nq, G*b*D] query-block view
    kv_rows: Tensor  # [B*Hkv*n*m] rows of the [B*Hkv*nk, b*D] key-block view
    mask: Optional[Tensor]  # additive [1 or B, 1 or n, G*b, m*b] (0 / -inf), None when nothing is masked
    empty_rows: Optional[Tensor]  # bool [1 or B, 1 or n, G*b]: rows with no allowed key, None if none


def _plan(kv_indices: Tensor, kv_counts: Tensor, B: int, H: int, kv_heads: int, L: int, S: int, D: int,
          b: int, causal: bool, key_padding_mask: Optional[Tensor], dtype: torch.dtype,
          chunk_elements: int) -> list[_Chunk]:
    """Bucket the query blocks by kept-block count and cut the buckets into chunks.

    The layout is cleaned first (`clean_layout`), so each chunk is a dense batch of equal-sized
    problems. Each chunk gets the element mask it needs.
    """
    nq, nk, g = -(-L // b), -(-S // b), H // kv_heads
    idx, cnt = clean_layout(kv_indices, kv_counts, L, S, b, causal)

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
        for q_blocks in q_all.split(max(1, chunk_elements // (B * kv_heads * m * b * D))):
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
            chunks.append(_Chunk(n, m, q_blocks, kv, q_rows, kv_rows, mask, empty))
    return chunks


def _chunk_bias(c: _Chunk, bias: Tensor, B: int, H: int, kv_heads: int, b: int, dtype: torch.dtype
                ) -> tuple[Tensor, Optional[Tensor]]:
    """The chunk's full additive mask with the bias on its entries: ([B*Hkv, n, G*b, m*b], empty rows or None)."""
    # Positions past L or S are clamped, not padded (padding would copy the whole bias every call): keys
    # past S are masked by the chunk's own mask, query rows past L are discarded.
    L, S = bias.shape[-2:]
    ar = torch.arange(b)
    qpos = (c.q_blocks.unsqueeze(1) * b + ar).clamp(max=L - 1)  # [n, b]
    kpos = (c.kv.unsqueeze(-1) * b + ar).flatten(1).clamp(max=S - 1)  # [n, m*b]
    tile = bias[:, :, qpos.unsqueeze(-1), kpos.unsqueeze(1)].to(dtype)  # [1|B, 1|H, n, b, m*b]
    g, mb = H // kv_heads, c.m * b
    tile = tile.expand(B, H, c.n, b, mb).reshape(B, kv_heads, g, c.n, b, mb).transpose(2, 3)
    tile = tile.reshape(B, kv_heads, c.n, g * b, mb)
    if c.mask is not None:
        tile = tile + c.mask.unsqueeze(1)
    tile = tile.reshape(B * kv_heads, c.n, g * b, mb)
    empty = tile.isneginf().all(-1)
    return tile, (empty if bool(empty.any()) else None)


def _batches(c: _Chunk, B: int, kv_heads: int, bias: Optional[Tensor] = None, H: int = 0, b: int = 0,
             dtype: torch.dtype = torch.float32) -> list[tuple[slice, Optional[Tensor], Optional[Tensor]]]:
    """(rows of the B*Hkv dimension, mask, empty rows): one call, or one per batch item (key padding).
    With a bias: one call whose mask holds the bias."""
    if bias is not None:
        return [(slice(None), *_chunk_bias(c, bias, B, H, kv_heads, b, dtype))]
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


def native_kernels() -> bool:
    """The C++ kernels are enabled (SPARSECC_NATIVE), built and loaded."""
    return native.load("block_sparse_attention") and _register_fakes()


@lru_cache(maxsize=None)
def _register_fakes() -> bool:
    """Fake kernels of the C++ ops (shapes only), so they trace like any op (torchao's ops.py pattern)."""

    @torch.library.register_fake("sparsecc_cpu::block_sparse_attention_forward")
    def _(q, k, v, kv_indices, kv_counts, key_padding_mask, block_size, scale, causal):
        return torch.empty_like(q, memory_format=torch.contiguous_format), q.new_empty(q.shape[:3])

    @torch.library.register_fake("sparsecc_cpu::block_sparse_attention_backward")
    def _(grad_out, q, k, v, out, lse, kv_indices, kv_counts, key_padding_mask, block_size, scale, causal):
        return tuple(torch.empty_like(t, memory_format=torch.contiguous_format) for t in (q, k, v))

    return True


def _native_applies(q: Tensor) -> bool:
    """The C++ kernels apply to this call: fp32 and available."""
    return q.dtype == torch.float32 and native_kernels()


def forward_native(q: Tensor, k: Tensor, v: Tensor, kv_indices: Tensor, kv_counts: Tensor, b: int,
                   scale: float, causal: bool, key_padding_mask: Optional[Tensor]
                   ) -> Optional[tuple[Tensor, Tensor]]:
    """The forward through the C++ kernel, or None when it does not apply (not fp32) or is unavailable."""
    if not _native_applies(q):
        return None
    idx, cnt = clean_layout(kv_indices, kv_counts, q.shape[2], k.shape[2], b, causal)
    return torch.ops.sparsecc_cpu.block_sparse_attention_forward(q, k, v, idx, cnt, key_padding_mask, b, scale,
                                                                 causal)


def backward_native(grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
                    kv_indices: Tensor, kv_counts: Tensor, b: int, scale: float, causal: bool,
                    key_padding_mask: Optional[Tensor]) -> Optional[tuple[Tensor, Tensor, Tensor]]:
    """(dq, dk, dv) through the C++ kernel (parallel over batch x kv heads), or None when it does not apply."""
    if not _native_applies(q):  # fp32 q: the forward's lse is fp32 too
        return None
    idx, cnt = clean_layout(kv_indices, kv_counts, q.shape[2], k.shape[2], b, causal)
    return torch.ops.sparsecc_cpu.block_sparse_attention_backward(grad_out.to(q.dtype), q, k, v, out, lse, idx, cnt,
                                                                  key_padding_mask, b, scale, causal)


def forward(q: Tensor, k: Tensor, v: Tensor, kv_indices: Tensor, kv_counts: Tensor, b: int,
            scale: float, causal: bool, key_padding_mask: Optional[Tensor],
            bias: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
    """(out, logsumexp) of the op on CPU tensors: the C++ kernel for fp32 without a bias, else the PyTorch path."""
    B, H, L, D = q.shape
    kvh, S = k.shape[1], k.shape[2]
    g, nq, nk = H // kvh, -(-L // b), -(-S // b)
    kv_indices, kv_counts = crop_ell(kv_indices, kv_counts, nq, nk)
    if bias is None:
        result = forward_native(q, k, v, kv_indices, kv_counts, b, scale, causal, key_padding_mask)
        if result is not None:
            return result
    opts = options()
    chunks = _plan(kv_indices, kv_counts, B, H, kvh, L, S, D, b, causal, key_padding_mask, q.dtype,
                   opts.chunk_elements)
    qb, kb, vb = _blocked_q(q, b, nq, kvh), _blocked_kv(k, b, nk), _blocked_kv(v, b, nk)
    out = torch.zeros(B * kvh * nq, g * b * D, dtype=q.dtype)
    lse = torch.full((B * kvh * nq, g * b), float("-inf"), dtype=_acc_dtype(q.dtype))

    def run(c: _Chunk) -> None:
        qc = qb.index_select(0, c.q_rows).view(-1, c.n, g * b, D)
        kc = kb.index_select(0, c.kv_rows).view(-1, c.n, c.m * b, D)
        vc = vb.index_select(0, c.kv_rows).view(-1, c.n, c.m * b, D)
        q_rows = c.q_rows.view(-1, c.n)
        for rows, mask, empty in _batches(c, B, kvh, bias, H, b, q.dtype):
            o, s = _flash_fwd(qc[rows], kc[rows], vc[rows], attn_mask=mask, scale=scale)
            if empty is not None:  # rows with no allowed key: logsumexp is -inf
                s = s.masked_fill(empty, float("-inf"))
            r = q_rows[rows].flatten()
            out.index_copy_(0, r, o.reshape(len(r), -1))
            lse.index_copy_(0, r, s.reshape(len(r), -1).to(lse.dtype))

    _run_chunks(run, chunks, opts.workers)
    return _unblocked_q(out, B, H, L, b), _unblocked_q(lse, B, H, L, b).squeeze(-1)


def backward(grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
             kv_indices: Tensor, kv_counts: Tensor, b: int, scale: float, causal: bool,
             key_padding_mask: Optional[Tensor], bias: Optional[Tensor] = None) -> tuple[Tensor, Tensor, Tensor]:
    """(dq, dk, dv) of the op on CPU tensors: the C++ kernel for fp32 without a bias, else the PyTorch path."""
    B, H, L, D = q.shape
    kvh, S = k.shape[1], k.shape[2]
    g, nq, nk = H // kvh, -(-L // b), -(-S // b)
    kv_indices, kv_counts = crop_ell(kv_indices, kv_counts, nq, nk)
    if bias is None:
        result = backward_native(grad_out, q, k, v, out, lse, kv_indices, kv_counts, b, scale, causal,
                                 key_padding_mask)
        if result is not None:
            return result
    opts = options()
    chunks = _plan(kv_indices, kv_counts, B, H, kvh, L, S, D, b, causal, key_padding_mask, q.dtype,
                   opts.chunk_elements)
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
        for rows, mask, _ in _batches(c, B, kvh, bias, H, b, q.dtype):
            dqc, dkc, dvc = _flash_bwd(doc[rows], qc[rows], kc[rows], vc[rows], oc[rows], lc[rows], 0.0,
                                       False, attn_mask=mask, scale=scale)
            r, kr = q_rows[rows].flatten(), kv_rows[rows].flatten()
            dq.index_copy_(0, r, dqc.reshape(len(r), -1).to(dq.dtype))
            dk.index_add_(0, kr, dkc.reshape(len(kr), -1).to(acc))
            dv.index_add_(0, kr, dvc.reshape(len(kr), -1).to(acc))

    _run_chunks(run, chunks, opts.workers)
    if not dkv:
        dkv[0] = (torch.zeros(kb.shape, dtype=acc), torch.zeros(kb.shape, dtype=acc))
    dks, dvs = zip(*dkv.values())
    dk, dv = sum(dks[1:], dks[0]), sum(dvs[1:], dvs[0])
    dk = dk.view(B, kvh, nk * b, D)[:, :, :S].to(k.dtype).contiguous()
    dv = dv.view(B, kvh, nk * b, D)[:, :, :S].to(v.dtype).contiguous()
    return _unblocked_q(dq, B, H, L, b), dk, dv

"""Triton kernels of `sparsecc::block_sparse_attention`, forward and backward.

Same semantics as the CPU op (op.py, cpu.py): one block layout
[ceil(L/b), ceil(S/b)] for every batch item and head, causal = key j > query i masked (absolute
positions), key padding mask (B, S) True = keep, GQA (H a multiple of Hkv), rows with no allowed
key give output 0, logsumexp -inf and zero gradients. fp16 / bf16 / fp32 inputs, fp32 softmax
and accumulation; fp32 dots run in IEEE fp32 (not TF32), to match the CPU op.

Kernels (flash-attention style; tiles of BLOCK_M queries x BLOCK_N keys, each a power of two
>= 16; a layout block b is covered by ceil(b / BLOCK) tiles, masked where b is not a multiple):

- forward, grid (query tiles, B*H): one program per query tile and head loops over the kept key
  blocks of its query block (the layout's row index, kv_indices/kv_counts after the clean-up
  below), keeping the running max / sum of the online softmax in fp32 (base-2 exponentials),
  and writes the output and the logsumexp.
- backward dQ, grid (query tiles, B*H): the same loop over the row's key blocks, recomputing
  P = exp(S - logsumexp) and accumulating dQ = scale * dS K with dS = P (dP - delta);
  delta = rowsum(dO * O) comes from a small kernel first (fp32, no fp32 copies of O and dO).
- backward dK/dV, grid (key tiles, B*Hkv): one program per key tile and kv head loops over the
  query blocks that keep its key block (a transposed, column index of the layout, built on the
  host) and over the G query heads of its group, accumulating dV = P^T dO and dK = scale dS^T Q in
  registers and writing them once. No atomics: each dK/dV element has exactly one writer, the
  result is deterministic, and GQA's sum over the G heads happens in registers.

Host side: the layout is cleaned by the family's one clean-up (layout.clean_block_mask: cropped,
checked, deduplicated and, causal, stripped of the blocks above the diagonal), then turned into row
(ELL) and column (CSC-as-ELL) indices on the device. The result is cached per layout tensor (the
layouts are constants of the graph). Launch configs: `TritonOptions` (autotune candidates per
kernel; the defaults are FWD_CONFIGS / BWD_CONFIGS).
"""

from __future__ import annotations

import functools
import math
import weakref
from typing import Optional

import torch
from torch import Tensor

from sparsecc.layouts.indexing import block_mask_to_ell
from sparsecc.ops.block_sparse_attention.layout import clean_block_mask, column_layout
from sparsecc.ops.block_sparse_attention.op import check_inputs
from sparsecc.ops.triton_runtime import (DEFAULT_OPTIONS, TritonOptions, autotuned, check_device, check_dtype,
                                         dot_precision, import_triton, next_pow2)

triton = import_triton()
import triton.language as tl  # noqa: E402

LOG2E = 1.4426950408889634
_OP = "sparsecc::block_sparse_attention (triton)"


def _tile_cap(nargs: dict) -> int:
    """Largest useful tile: the layout block rounded up to a power of two (at least 16)."""
    return next_pow2(nargs["BS"])


def _prune(cfgs, nargs, **kw):
    cap = _tile_cap({**nargs, **kw})
    kept = [c for c in cfgs if c.kwargs["BLOCK_M"] <= cap and c.kwargs["BLOCK_N"] <= cap]
    return kept or [min(cfgs, key=lambda c: c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"])]


def _cfg(bm: int, bn: int, warps: int, stages: int):
    return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=warps, num_stages=stages)


# Candidate configs (BLOCK_M, BLOCK_N, num_warps, num_stages); the interpreter runs the single 16 x 16 one.
FWD_CONFIGS = ((128, 64, 8, 3), (128, 128, 8, 2), (64, 64, 4, 3), (64, 128, 4, 2), (64, 32, 4, 4), (32, 32, 4, 3),
               (16, 16, 2, 2))
BWD_CONFIGS = ((64, 64, 4, 2), (32, 64, 4, 2), (64, 32, 4, 2), (128, 64, 8, 2), (64, 128, 8, 2), (32, 32, 4, 2),
               (16, 16, 2, 2))
INTERPRETER_CONFIG = (16, 16, 1, 1)
_TUNE = dict(key=["BS", "D", "CAUSAL", "HAS_KPM", "HAS_BIAS"], prune_configs_by={"early_config_prune": _prune})


@triton.jit
def _fwd_kernel(Q, K, V, O, LSE, KPM, IDX, CNT, BIAS,
                s_qb, s_qh, s_ql, s_kb, s_kh, s_ks, s_bb, s_bh, s_bl,
                H, G, L, S, IDX_W, D, scale_log2,
                BS: tl.constexpr, BLOCK_D: tl.constexpr, CAUSAL: tl.constexpr, HAS_KPM: tl.constexpr,
                HAS_BIAS: tl.constexpr,
                PREC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    TILES_M = (BS + BLOCK_M - 1) // BLOCK_M
    TILES_N = (BS + BLOCK_N - 1) // BLOCK_N
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    qblk = pid_m // TILES_M
    bi = bh // H
    hi = bh % H
    hk = hi // G

    offs_m = (pid_m % TILES_M) * BLOCK_M + tl.arange(0, BLOCK_M)
    rows = qblk * BS + offs_m
    row_ok = (offs_m < BS) & (rows < L)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D

    q_base = Q + bi.to(tl.int64) * s_qb + hi.to(tl.int64) * s_qh
    k_base = K + bi.to(tl.int64) * s_kb + hk.to(tl.int64) * s_kh
    v_base = V + bi.to(tl.int64) * s_kb + hk.to(tl.int64) * s_kh
    q = tl.load(q_base + rows[:, None] * s_ql + offs_d[None, :], mask=row_ok[:, None] & d_ok[None, :], other=0.0)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    cnt = tl.load(CNT + qblk)
    for it in range(0, cnt * TILES_N):
        kblk = tl.load(IDX + qblk * IDX_W + it // TILES_N)
        offs_n = (it % TILES_N) * BLOCK_N + tl.arange(0, BLOCK_N)
        cols = kblk * BS + offs_n
        col_ok = (offs_n < BS) & (cols < S)
        kv_mask = col_ok[:, None] & d_ok[None, :]
        k = tl.load(k_base + cols[:, None] * s_ks + offs_d[None, :], mask=kv_mask, other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=PREC) * scale_log2
        ok = col_ok[None, :] & row_ok[:, None]
        if HAS_BIAS:  # additive score bias, -inf where masked (scores are in log2 units here)
            bt = tl.load(BIAS + bi.to(tl.int64) * s_bb + hi.to(tl.int64) * s_bh + rows[:, None] * s_bl + cols[None, :],
                         mask=ok, other=0.0).to(tl.float32)
            s = s + bt * 1.4426950408889634
            ok = ok & (bt != float("-inf"))
        if CAUSAL:
            ok = ok & (cols[None, :] <= rows[:, None])
        if HAS_KPM:
            kp = tl.load(KPM + bi * S + cols, mask=col_ok, other=0)
            ok = ok & (kp != 0)[None, :]
        s = tl.where(ok, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(s - m_safe[:, None])
        alpha = tl.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_base + cols[:, None] * s_ks + offs_d[None, :], mask=kv_mask, other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PREC)
        m_i = m_new

    empty = l_i == 0.0
    l_safe = tl.where(empty, 1.0, l_i)
    out = acc / l_safe[:, None]
    lse = tl.where(empty, float("-inf"), (m_i + tl.log2(l_safe)) / 1.4426950408889634)
    tl.store(O + bi.to(tl.int64) * s_qb + hi.to(tl.int64) * s_qh + rows[:, None] * s_ql + offs_d[None, :],
             out.to(O.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])
    tl.store(LSE + bh.to(tl.int64) * L + rows, lse, mask=row_ok)


@triton.jit
def _bwd_dq_kernel(Q, K, V, DO, DQ, LSE, DELTA, KPM, IDX, CNT, BIAS,
                   s_qb, s_qh, s_ql, s_kb, s_kh, s_ks, s_bb, s_bh, s_bl,
                   H, G, L, S, IDX_W, D, scale, scale_log2,
                   BS: tl.constexpr, BLOCK_D: tl.constexpr, CAUSAL: tl.constexpr, HAS_KPM: tl.constexpr,
                   HAS_BIAS: tl.constexpr,
                   PREC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    TILES_M = (BS + BLOCK_M - 1) // BLOCK_M
    TILES_N = (BS + BLOCK_N - 1) // BLOCK_N
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    qblk = pid_m // TILES_M
    bi = bh // H
    hi = bh % H
    hk = hi // G

    offs_m = (pid_m % TILES_M) * BLOCK_M + tl.arange(0, BLOCK_M)
    rows = qblk * BS + offs_m
    row_ok = (offs_m < BS) & (rows < L)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    q_mask = row_ok[:, None] & d_ok[None, :]
    q_off = bi.to(tl.int64) * s_qb + hi.to(tl.int64) * s_qh + rows[:, None] * s_ql + offs_d[None, :]
    k_base = K + bi.to(tl.int64) * s_kb + hk.to(tl.int64) * s_kh
    v_base = V + bi.to(tl.int64) * s_kb + hk.to(tl.int64) * s_kh
    q = tl.load(Q + q_off, mask=q_mask, other=0.0)
    do = tl.load(DO + q_off, mask=q_mask, other=0.0)
    lse = tl.load(LSE + bh.to(tl.int64) * L + rows, mask=row_ok, other=float("-inf"))
    lse2 = tl.where(lse == float("-inf"), float("inf"), lse * 1.4426950408889634)  # empty rows: P = 0
    delta = tl.load(DELTA + bh.to(tl.int64) * L + rows, mask=row_ok, other=0.0)

    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    cnt = tl.load(CNT + qblk)
    for it in range(0, cnt * TILES_N):
        kblk = tl.load(IDX + qblk * IDX_W + it // TILES_N)
        offs_n = (it % TILES_N) * BLOCK_N + tl.arange(0, BLOCK_N)
        cols = kblk * BS + offs_n
        col_ok = (offs_n < BS) & (cols < S)
        kv_mask = col_ok[:, None] & d_ok[None, :]
        k = tl.load(k_base + cols[:, None] * s_ks + offs_d[None, :], mask=kv_mask, other=0.0)
        v = tl.load(v_base + cols[:, None] * s_ks + offs_d[None, :], mask=kv_mask, other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=PREC) * scale_log2
        ok = col_ok[None, :] & row_ok[:, None]
        if HAS_BIAS:  # additive score bias, -inf where masked (scores are in log2 units here)
            bt = tl.load(BIAS + bi.to(tl.int64) * s_bb + hi.to(tl.int64) * s_bh + rows[:, None] * s_bl + cols[None, :],
                         mask=ok, other=0.0).to(tl.float32)
            s = s + bt * 1.4426950408889634
            ok = ok & (bt != float("-inf"))
        if CAUSAL:
            ok = ok & (cols[None, :] <= rows[:, None])
        if HAS_KPM:
            kp = tl.load(KPM + bi * S + cols, mask=col_ok, other=0)
            ok = ok & (kp != 0)[None, :]
        p = tl.where(ok, tl.exp2(s - lse2[:, None]), 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=PREC)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k, input_precision=PREC)
    dq = dq * scale
    tl.store(DQ + q_off, dq.to(DQ.dtype.element_ty), mask=q_mask)


@triton.jit
def _bwd_dkdv_kernel(Q, K, V, DO, DK, DV, LSE, DELTA, KPM, CIDX, CCNT, BIAS,
                     s_qb, s_qh, s_ql, s_kb, s_kh, s_ks, s_bb, s_bh, s_bl,
                     H, HKV, G, L, S, CIDX_W, D, scale, scale_log2,
                     BS: tl.constexpr, BLOCK_D: tl.constexpr, CAUSAL: tl.constexpr, HAS_KPM: tl.constexpr,
                     HAS_BIAS: tl.constexpr,
                     PREC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    TILES_M = (BS + BLOCK_M - 1) // BLOCK_M
    TILES_N = (BS + BLOCK_N - 1) // BLOCK_N
    pid_n = tl.program_id(0)
    bhk = tl.program_id(1)
    kblk = pid_n // TILES_N
    bi = bhk // HKV
    hk = bhk % HKV

    offs_n = (pid_n % TILES_N) * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = kblk * BS + offs_n
    col_ok = (offs_n < BS) & (cols < S)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    kv_mask = col_ok[:, None] & d_ok[None, :]
    kv_off = bi.to(tl.int64) * s_kb + hk.to(tl.int64) * s_kh + cols[:, None] * s_ks + offs_d[None, :]
    k = tl.load(K + kv_off, mask=kv_mask, other=0.0)
    v = tl.load(V + kv_off, mask=kv_mask, other=0.0)
    key_ok = col_ok
    if HAS_KPM:
        kp = tl.load(KPM + bi * S + cols, mask=col_ok, other=0)
        key_ok = key_ok & (kp != 0)

    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    ccnt = tl.load(CCNT + kblk)
    per_block = G * TILES_M
    for it in range(0, ccnt * per_block):
        qblk = tl.load(CIDX + kblk * CIDX_W + it // per_block)
        rem = it % per_block
        hi = hk * G + rem // TILES_M
        offs_m = (rem % TILES_M) * BLOCK_M + tl.arange(0, BLOCK_M)
        rows = qblk * BS + offs_m
        row_ok = (offs_m < BS) & (rows < L)
        q_mask = row_ok[:, None] & d_ok[None, :]
        q_off = bi.to(tl.int64) * s_qb + hi.to(tl.int64) * s_qh + rows[:, None] * s_ql + offs_d[None, :]
        q = tl.load(Q + q_off, mask=q_mask, other=0.0)
        do = tl.load(DO + q_off, mask=q_mask, other=0.0)
        r_off = (bi * H + hi).to(tl.int64) * L + rows
        lse = tl.load(LSE + r_off, mask=row_ok, other=float("-inf"))
        lse2 = tl.where(lse == float("-inf"), float("inf"), lse * 1.4426950408889634)
        delta = tl.load(DELTA + r_off, mask=row_ok, other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=PREC) * scale_log2
        ok = key_ok[None, :] & row_ok[:, None]
        if HAS_BIAS:
            bt = tl.load(BIAS + bi.to(tl.int64) * s_bb + hi.to(tl.int64) * s_bh + rows[:, None] * s_bl + cols[None, :],
                         mask=ok, other=0.0).to(tl.float32)
            s = s + bt * 1.4426950408889634
            ok = ok & (bt != float("-inf"))
        if CAUSAL:
            ok = ok & (cols[None, :] <= rows[:, None])
        p = tl.where(ok, tl.exp2(s - lse2[:, None]), 0.0)
        dv += tl.dot(tl.trans(p.to(do.dtype)), do, input_precision=PREC)
        dp = tl.dot(do, tl.trans(v), input_precision=PREC)
        ds = p * (dp - delta[:, None])
        dk += tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=PREC)
    dk = dk * scale
    tl.store(DK + kv_off, dk.to(DK.dtype.element_ty), mask=kv_mask)
    tl.store(DV + kv_off, dv.to(DV.dtype.element_ty), mask=kv_mask)


@triton.jit
def _bwd_delta_kernel(O, DO, DELTA, L, D, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    # delta = rowsum(dO * O) in fp32, (B*H, L); O and dO contiguous (B, H, L, D)
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    bh = tl.program_id(1).to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    m = (rows < L)[:, None] & (offs_d < D)[None, :]
    off = bh * L * D + rows[:, None] * D + offs_d[None, :]
    o = tl.load(O + off, mask=m, other=0.0).to(tl.float32)
    do = tl.load(DO + off, mask=m, other=0.0).to(tl.float32)
    tl.store(DELTA + bh * L + rows, tl.sum(o * do, 1), mask=rows < L)


_KERNELS = {"_fwd_kernel": ("_fwd_kernel", FWD_CONFIGS), "_bwd_dq_kernel": ("_bwd_dq_kernel", BWD_CONFIGS),
            "_bwd_dkdv_kernel": ("_bwd_dkdv_kernel", BWD_CONFIGS)}


def tuned(name: str, options: TritonOptions = DEFAULT_OPTIONS):
    """The autotuned kernel `name` ("_fwd_kernel", "_bwd_dq_kernel", "_bwd_dkdv_kernel") under `options`."""
    fn_name, candidates = _KERNELS[name]
    return autotuned(globals()[fn_name], name, candidates, INTERPRETER_CONFIG, _cfg, options, **_TUNE)


class Layout:
    """Row and column indices of a cleaned block layout, on the kernels' device (int32)."""

    def __init__(self, row_idx: Tensor, row_cnt: Tensor, col_idx: Tensor, col_cnt: Tensor):
        self.row_idx, self.row_cnt, self.col_idx, self.col_cnt = row_idx, row_cnt, col_idx, col_cnt


# id(kv_indices) -> (weak reference to it, {arguments: Layout}); an entry goes with its tensor.
_layout_cache: dict[int, tuple[weakref.ref, dict]] = {}


def _cache_for(t: Tensor) -> Optional[dict]:
    entry = _layout_cache.get(id(t))
    if entry is not None and entry[0]() is t:
        return entry[1]
    try:
        ref = weakref.ref(t, lambda _, i=id(t): _layout_cache.pop(i, None))
    except TypeError:  # pragma: no cover - tensors that cannot be weakly referenced
        return None
    _layout_cache[id(t)] = (ref, {})
    return _layout_cache[id(t)][1]


def prepare_layout(kv_indices: Tensor, kv_counts: Tensor, L: int, S: int, b: int, causal: bool,
                   device: torch.device) -> Layout:
    """The cleaned layout (layout.clean_block_mask) as row and column (transposed) indices on `device`.

    Cached per kv_indices tensor (keyed on its version, kv_counts and the arguments), since a graph
    passes the same layout buffer on every call.
    """
    key = (kv_indices._version, id(kv_counts), kv_counts._version, L, S, b, causal, str(device))
    cached = _cache_for(kv_indices)
    if cached is not None and key in cached:
        return cached[key]
    keep = clean_block_mask(kv_indices, kv_counts, L, S, b, causal)
    r_idx, r_cnt = block_mask_to_ell(keep)
    c_idx, c_cnt = column_layout(keep)
    layout = Layout(*(t.to(device=device, dtype=torch.int32).contiguous() for t in (r_idx, r_cnt, c_idx, c_cnt)))
    if cached is not None:
        cached[key] = layout
    return layout


def _common(q: Tensor, k: Tensor, v: Tensor, kv_indices: Tensor, kv_counts: Tensor, block_size: int,
            causal: bool, key_padding_mask: Optional[Tensor], bias: Optional[Tensor]):
    check_inputs(q, k, v, kv_indices, kv_counts, block_size, key_padding_mask, bias)
    check_device(q, k, v, key_padding_mask, bias, op=_OP)
    check_dtype(q, _OP)
    B, H, L, D = q.shape
    S = k.shape[2]
    layout = prepare_layout(kv_indices, kv_counts, L, S, block_size, causal, q.device)
    kpm = (key_padding_mask.to(torch.uint8).contiguous() if key_padding_mask is not None
           else torch.zeros(1, dtype=torch.uint8, device=q.device))
    return layout, kpm, B, H, L, S, D


def _bias_args(bias: Optional[Tensor], q: Tensor) -> tuple:
    """(pointer, batch stride, head stride, row stride): keys contiguous, broadcast dimensions stride 0."""
    if bias is None:
        return q, 0, 0, 0
    bias = bias if bias.stride(3) == 1 else bias.contiguous()
    return (bias, *(0 if bias.shape[d] == 1 else bias.stride(d) for d in (0, 1)), bias.stride(2))


def block_sparse_attention_forward(q: Tensor, k: Tensor, v: Tensor, kv_indices: Tensor, kv_counts: Tensor,
                                   block_size: int, scale: float, causal: bool,
                                   key_padding_mask: Optional[Tensor], bias: Optional[Tensor] = None, *,
                                   options: TritonOptions = DEFAULT_OPTIONS) -> tuple[Tensor, Tensor]:
    """Triton forward: (out (B, H, L, D) in q's dtype, logsumexp (B, H, L) fp32), like the CPU op."""
    layout, kpm, B, H, L, S, D = _common(q, k, v, kv_indices, kv_counts, block_size, causal, key_padding_mask,
                                         bias)
    bias_ptr, *bias_strides = _bias_args(bias, q)
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    out = torch.empty_like(q)
    lse = torch.empty(B, H, L, dtype=torch.float32, device=q.device)
    if out.numel() == 0:
        return out, lse.fill_(float("-inf"))
    nq, b = -(-L // block_size), block_size
    grid = lambda meta: (nq * triton.cdiv(b, meta["BLOCK_M"]), B * H)  # noqa: E731
    tuned("_fwd_kernel", options)[grid](q, k, v, out, lse, kpm, layout.row_idx, layout.row_cnt, bias_ptr,
                      q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2), *bias_strides,
                      H, H // k.shape[1], L, S, layout.row_idx.shape[1], D, float(scale) * LOG2E,
                      BS=b, BLOCK_D=next_pow2(D), CAUSAL=bool(causal), HAS_KPM=key_padding_mask is not None,
                      HAS_BIAS=bias is not None, PREC=dot_precision(q.dtype))
    return out, lse


def block_sparse_attention_backward(grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
                                    kv_indices: Tensor, kv_counts: Tensor, block_size: int, scale: float,
                                    causal: bool, key_padding_mask: Optional[Tensor], bias: Optional[Tensor] = None,
                                    *, options: TritonOptions = DEFAULT_OPTIONS) -> tuple[Tensor, Tensor, Tensor]:
    """Triton backward: (dq, dk, dv) from the forward's out and logsumexp, like the CPU backward op."""
    layout, kpm, B, H, L, S, D = _common(q, k, v, kv_indices, kv_counts, block_size, causal, key_padding_mask,
                                         bias)
    bias_ptr, *bias_strides = _bias_args(bias, q)
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    do = grad_out.to(q.dtype).contiguous()
    lse = lse.float().contiguous()
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    if q.numel() == 0 or k.numel() == 0:
        return dq.zero_(), dk.zero_(), dv.zero_()
    out = out.to(q.dtype).contiguous()
    delta = torch.empty(B, H, L, dtype=torch.float32, device=q.device)  # rowsum(dO * O)
    block_rows = 16 if triton.knobs.runtime.interpret else 64
    _bwd_delta_kernel[(triton.cdiv(L, block_rows), B * H)](out, do, delta, L, D, BLOCK_M=block_rows,
                                                            BLOCK_D=next_pow2(D))
    hkv = k.shape[1]
    nq, nk, b = -(-L // block_size), -(-S // block_size), block_size
    common = dict(BS=b, BLOCK_D=next_pow2(D), CAUSAL=bool(causal), HAS_KPM=key_padding_mask is not None,
                  HAS_BIAS=bias is not None, PREC=dot_precision(q.dtype))
    strides = (q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2), *bias_strides)
    grid_q = lambda meta: (nq * triton.cdiv(b, meta["BLOCK_M"]), B * H)  # noqa: E731
    tuned("_bwd_dq_kernel", options)[grid_q](q, k, v, do, dq, lse, delta, kpm, layout.row_idx, layout.row_cnt, bias_ptr,
                           *strides,
                           H, H // hkv, L, S, layout.row_idx.shape[1], D, float(scale), float(scale) * LOG2E,
                           **common)
    grid_k = lambda meta: (nk * triton.cdiv(b, meta["BLOCK_N"]), B * hkv)  # noqa: E731
    tuned("_bwd_dkdv_kernel", options)[grid_k](q, k, v, do, dk, dv, lse, delta, kpm, layout.col_idx, layout.col_cnt,
                             bias_ptr, *strides,
                             H, hkv, H // hkv, L, S, layout.col_idx.shape[1], D, float(scale),
                             float(scale) * LOG2E, **common)
    return dq, dk, dv


def default_scale(d: int) -> float:
    return 1.0 / math.sqrt(d)


def register(options: TritonOptions = DEFAULT_OPTIONS) -> list[str]:
    """Register the launchers as the CUDA kernels of the family's ops; returns the op names."""
    kernels = {"sparsecc::block_sparse_attention": block_sparse_attention_forward,
               "sparsecc::block_sparse_attention_backward": block_sparse_attention_backward}
    for name, fn in kernels.items():
        torch.library.register_kernel(name, "cuda", functools.partial(fn, options=options))
    return list(kernels)

"""Triton kernels of `sparsecc::sparse_ffn` (Scaling Transformers one-of-N FFN), forward and backward.

Semantics are the op's (op.py): the controller logits (x @ c1) @ c2 + c_bias
are computed with the op's own `controller_logits` (two small GEMMs, so the arg-max picks exactly
the units the CPU op picks for the same logits); everything after them is fused here:

    idx[t, k] = k*N + argmax(logits[t, k*N:(k+1)*N])          (first on ties)
    a         = x . w_in[idx] + b_in[idx]      (and ag = x . w_gate[idx] + b_gate[idx] when gated)
    h         = act(a)                          or act(ag) * a
    out       = sum_k h[t, k] w_out_t[idx[t, k]] + b_out

Two variants (`variant="auto"` picks decode for at most DECODE_MAX_TOKENS tokens):

- decode (unbatched, a few tokens; a GEMV over the chosen rows, bound by reading them):
  up   grid (T, NB / BLOCK_K): arg-max of BLOCK_K blocks of the token's logits, then the dot of
       x with the BLOCK_K chosen rows of w_in (and w_gate), read in BLOCK_DM chunks; bias,
       activation, gate; writes h and idx ([T, d_ff/N], fp32 / int32). Reads only chosen rows.
  down grid (T, d_model / BLOCK_DM, SPLIT): each program sums h * w_out_t[idx] over its share of
       the chosen rows for one d_model tile; SPLIT partial sums are added on the host (no atomics).
- batched (training shapes, many tokens; tensor cores):
  up   grid (T / BLOCK_T, NB): for a token tile and one block of N units, the [BLOCK_T, N] tile of
       x @ w_in[block].T (tl.dot over d_model chunks; w_in block read once per token tile), then the
       arg-max and a select in registers: no [T, d_ff] tensor is ever written.
  down grid (T / BLOCK_T, d_model / BLOCK_DM): loops over the NB blocks, building the one-hot
       [BLOCK_T, N] tile of h in registers and accumulating onehot @ w_out_t[block] (tl.dot);
       bias and cast fused into the store.
  (Per-token gathers cannot use tensor cores; the block form reads each weight block once per
  token tile instead of once per token, which wins once tokens outnumber about N.)

Backward (the same kernels plus one): gh = go . w_out_t[idx] is the up kernel on (go, w_out_t)
with the saved selection; dL/dx = sum ga w_in[idx] (+ gg w_gate[idx]) is the down kernel; the
weight gradients dW[idx] += g x are `_wgrad_kernel`, grid (NB, d_model / BLOCK_DM): for one
block of N rows it loops over token tiles accumulating onehot(g)^T @ x (tl.dot), so each weight
row has one writer (no atomics, no dense [T, d_ff] scatter). The element-wise activation
derivative on the [T, d_ff/N] values runs in PyTorch (fp32). The controller gets no gradient,
as in the op.
"""

from __future__ import annotations

import functools
from typing import Optional

import torch
from torch import Tensor

from sparsecc.ops.sparse_ffn import op as sparse_ffn_op
from sparsecc.ops.sparse_ffn.op import activation_backward, check_inputs, activation_fn, controller_logits
from sparsecc.ops.triton_runtime import (DEFAULT_OPTIONS, TritonOptions, autotuned, check_device, check_dtype,
                                         dot_precision, import_triton, next_pow2)

triton = import_triton()
import triton.language as tl  # noqa: E402

_OP = "sparsecc::sparse_ffn (triton)"
# The decode (per-token gather) kernels serve up to this many tokens; more go to the batched kernels.
DECODE_MAX_TOKENS = 16
# Activation codes of `_act`: "none" plus every entry of sparsecc/ops/activations.py (tests check the table
# is covered; an entry missing here runs the op's PyTorch kernel, see sparse_ffn_cuda).
_ACT = {"none": 0, "relu": 1, "gelu": 2, "gelu_tanh": 3, "silu": 4, "quick_gelu": 5, "relu2": 6}


def _cfg(meta: dict, warps: int, stages: int):
    return triton.Config(dict(meta), num_warps=warps, num_stages=stages)


def _mk(names):
    def make(*vals):
        *meta, warps, stages = vals
        return _cfg(dict(zip(names, meta)), warps, stages)
    return make


# Candidate configs; the interpreter runs the small last tuple of each entry of _KERNELS.
# decode kernels: (BLOCK_K chosen rows, BLOCK_DM columns, num_warps, num_stages) per step
UP_GATHER_CONFIGS = ((4, 512, 4, 2), (2, 1024, 4, 2), (8, 256, 4, 2), (4, 1024, 8, 2), (16, 256, 8, 2))
DOWN_GATHER_CONFIGS = ((16, 128, 4, 2), (32, 128, 4, 2), (8, 256, 4, 2), (16, 256, 8, 2), (32, 64, 4, 2))
# batched kernels: (BLOCK_T tokens, BLOCK_DM columns, num_warps, num_stages)
UP_BLOCK_CONFIGS = ((64, 64, 4, 3), (128, 64, 8, 3), (64, 128, 4, 3), (32, 64, 4, 3), (128, 32, 4, 4))
DOWN_BLOCK_CONFIGS = ((64, 128, 4, 3), (128, 128, 8, 3), (64, 64, 4, 3), (128, 64, 4, 3), (32, 128, 4, 3))
WGRAD_CONFIGS = ((64, 128, 4, 3), (32, 128, 4, 3), (64, 64, 4, 3), (128, 128, 8, 3))
_KEY = ["DM", "NSEL"]


@triton.jit
def _act(a, ACT: tl.constexpr):
    if ACT == 1:
        a = tl.maximum(a, 0.0)
    elif ACT == 2:
        a = 0.5 * a * (1.0 + tl.math.erf(a * 0.7071067811865476))
    elif ACT == 3:
        u = 0.7978845608028654 * (a + 0.044715 * a * a * a)
        a = 0.5 * a * (1.0 + (2.0 * tl.sigmoid(2.0 * u) - 1.0))
    elif ACT == 4:
        a = a * tl.sigmoid(a)
    elif ACT == 5:
        a = a * tl.sigmoid(1.702 * a)
    elif ACT == 6:
        a = tl.maximum(a, 0.0)
        a = a * a
    return a


@triton.jit
def _up_gather_kernel(X, LOGITS, IDX_IN, W, BIAS, WG, BG, H, IDX, A, AG,
                      NB, DM, NSEL, DFF,
                      ACT: tl.constexpr, GATED: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_BGATE: tl.constexpr,
                      FROM_IDX: tl.constexpr, STORE_PRE: tl.constexpr, BLOCK_NN: tl.constexpr,
                      BLOCK_K: tl.constexpr, BLOCK_DM: tl.constexpr):
    t = tl.program_id(0)
    kb = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    k_ok = kb < NB
    row = t.to(tl.int64) * NB + kb
    if FROM_IDX:
        units = tl.load(IDX_IN + row, mask=k_ok, other=0).to(tl.int64)
    else:
        offs_n = tl.arange(0, BLOCK_NN)
        lg = tl.load(LOGITS + t.to(tl.int64) * DFF + kb[:, None] * NSEL + offs_n[None, :],
                     mask=k_ok[:, None] & (offs_n < NSEL)[None, :], other=float("-inf")).to(tl.float32)
        units = (kb * NSEL + tl.argmax(lg, 1)).to(tl.int64)
    acc = tl.zeros([BLOCK_K], dtype=tl.float32)
    accg = tl.zeros([BLOCK_K], dtype=tl.float32)
    for d0 in range(0, DM, BLOCK_DM):
        offs = d0 + tl.arange(0, BLOCK_DM)
        d_ok = offs < DM
        xv = tl.load(X + t.to(tl.int64) * DM + offs, mask=d_ok, other=0.0).to(tl.float32)
        wmask = k_ok[:, None] & d_ok[None, :]
        w = tl.load(W + units[:, None] * DM + offs[None, :], mask=wmask, other=0.0).to(tl.float32)
        acc += tl.sum(w * xv[None, :], 1)
        if GATED:
            wg = tl.load(WG + units[:, None] * DM + offs[None, :], mask=wmask, other=0.0).to(tl.float32)
            accg += tl.sum(wg * xv[None, :], 1)
    if HAS_BIAS:
        acc += tl.load(BIAS + units, mask=k_ok, other=0.0).to(tl.float32)
    if GATED:
        if HAS_BGATE:
            accg += tl.load(BG + units, mask=k_ok, other=0.0).to(tl.float32)
        h = _act(accg, ACT) * acc
    else:
        h = _act(acc, ACT)
    tl.store(H + row, h, mask=k_ok)
    tl.store(IDX + row, units.to(tl.int32), mask=k_ok)
    if STORE_PRE:
        tl.store(A + row, acc, mask=k_ok)
        if GATED:
            tl.store(AG + row, accg, mask=k_ok)


@triton.jit
def _up_block_kernel(X, LOGITS, IDX_IN, W, BIAS, WG, BG, H, IDX, A, AG,
                     T, NB, DM, NSEL, DFF,
                     ACT: tl.constexpr, GATED: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_BGATE: tl.constexpr,
                     FROM_IDX: tl.constexpr, STORE_PRE: tl.constexpr, PREC: tl.constexpr, BLOCK_NN: tl.constexpr,
                     BLOCK_T: tl.constexpr, BLOCK_DM: tl.constexpr):
    toks = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    t_ok = toks < T
    kb = tl.program_id(1)
    offs_n = tl.arange(0, BLOCK_NN)
    n_ok = offs_n < NSEL
    units = kb * NSEL + offs_n  # the block's N units (padded to BLOCK_NN)
    row = toks.to(tl.int64) * NB + kb
    if FROM_IDX:
        local = tl.load(IDX_IN + row, mask=t_ok, other=0) - kb * NSEL
    else:
        lg = tl.load(LOGITS + toks.to(tl.int64)[:, None] * DFF + units[None, :],
                     mask=t_ok[:, None] & n_ok[None, :], other=float("-inf")).to(tl.float32)
        local = tl.argmax(lg, 1)
    acc = tl.zeros([BLOCK_T, BLOCK_NN], dtype=tl.float32)
    accg = tl.zeros([BLOCK_T, BLOCK_NN], dtype=tl.float32)
    for d0 in range(0, DM, BLOCK_DM):
        offs = d0 + tl.arange(0, BLOCK_DM)
        d_ok = offs < DM
        xt = tl.load(X + toks.to(tl.int64)[:, None] * DM + offs[None, :], mask=t_ok[:, None] & d_ok[None, :],
                     other=0.0)
        wmask = d_ok[:, None] & n_ok[None, :]
        w = tl.load(W + units.to(tl.int64)[None, :] * DM + offs[:, None], mask=wmask, other=0.0)  # [DM, NN]
        acc += tl.dot(xt.to(w.dtype), w, input_precision=PREC)
        if GATED:
            wg = tl.load(WG + units.to(tl.int64)[None, :] * DM + offs[:, None], mask=wmask, other=0.0)
            accg += tl.dot(xt.to(wg.dtype), wg, input_precision=PREC)
    pick = offs_n[None, :] == local[:, None]
    a = tl.sum(tl.where(pick, acc, 0.0), 1)
    chosen = kb * NSEL + local
    if HAS_BIAS:
        a += tl.load(BIAS + chosen, mask=t_ok, other=0.0).to(tl.float32)
    if GATED:
        ag = tl.sum(tl.where(pick, accg, 0.0), 1)
        if HAS_BGATE:
            ag += tl.load(BG + chosen, mask=t_ok, other=0.0).to(tl.float32)
        h = _act(ag, ACT) * a
    else:
        h = _act(a, ACT)
    tl.store(H + row, h, mask=t_ok)
    tl.store(IDX + row, chosen.to(tl.int32), mask=t_ok)
    if STORE_PRE:
        tl.store(A + row, a, mask=t_ok)
        if GATED:
            tl.store(AG + row, ag, mask=t_ok)


@triton.jit
def _down_gather_kernel(H, IDX, W, H2, W2, PART, T, NB, DM, NSEL, PER_SPLIT,
                        HAS2: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_DM: tl.constexpr):
    t = tl.program_id(0)
    offs = tl.program_id(1) * BLOCK_DM + tl.arange(0, BLOCK_DM)
    d_ok = offs < DM
    sp = tl.program_id(2)
    start = sp * PER_SPLIT
    end = tl.minimum(start + PER_SPLIT, NB)
    acc = tl.zeros([BLOCK_DM], dtype=tl.float32)
    for k0 in range(start, end, BLOCK_K):
        kb = k0 + tl.arange(0, BLOCK_K)
        k_ok = kb < end
        row = t.to(tl.int64) * NB + kb
        units = tl.load(IDX + row, mask=k_ok, other=0).to(tl.int64)
        hv = tl.load(H + row, mask=k_ok, other=0.0)
        wmask = k_ok[:, None] & d_ok[None, :]
        w = tl.load(W + units[:, None] * DM + offs[None, :], mask=wmask, other=0.0).to(tl.float32)
        acc += tl.sum(w * hv[:, None], 0)
        if HAS2:
            hv2 = tl.load(H2 + row, mask=k_ok, other=0.0)
            w2 = tl.load(W2 + units[:, None] * DM + offs[None, :], mask=wmask, other=0.0).to(tl.float32)
            acc += tl.sum(w2 * hv2[:, None], 0)
    tl.store(PART + (sp * T + t).to(tl.int64) * DM + offs, acc, mask=d_ok)


@triton.jit
def _down_block_kernel(H, IDX, W, H2, W2, BIAS, OUT, T, NB, DM, NSEL,
                       HAS2: tl.constexpr, HAS_BIAS: tl.constexpr, PREC: tl.constexpr, BLOCK_NN: tl.constexpr,
                       BLOCK_T: tl.constexpr, BLOCK_DM: tl.constexpr):
    toks = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    t_ok = toks < T
    offs = tl.program_id(1) * BLOCK_DM + tl.arange(0, BLOCK_DM)
    d_ok = offs < DM
    offs_n = tl.arange(0, BLOCK_NN)
    n_ok = offs_n < NSEL
    wmask = n_ok[:, None] & d_ok[None, :]
    acc = tl.zeros([BLOCK_T, BLOCK_DM], dtype=tl.float32)
    for kb in range(0, NB):
        row = toks.to(tl.int64) * NB + kb
        local = tl.load(IDX + row, mask=t_ok, other=-1) - kb * NSEL
        pick = offs_n[None, :] == local[:, None]
        units = (kb * NSEL + offs_n).to(tl.int64)
        hv = tl.load(H + row, mask=t_ok, other=0.0)
        w = tl.load(W + units[:, None] * DM + offs[None, :], mask=wmask, other=0.0)  # [NN, DM]
        acc += tl.dot(tl.where(pick, hv[:, None], 0.0).to(w.dtype), w, input_precision=PREC)
        if HAS2:
            hv2 = tl.load(H2 + row, mask=t_ok, other=0.0)
            w2 = tl.load(W2 + units[:, None] * DM + offs[None, :], mask=wmask, other=0.0)
            acc += tl.dot(tl.where(pick, hv2[:, None], 0.0).to(w2.dtype), w2, input_precision=PREC)
    if HAS_BIAS:
        acc += tl.load(BIAS + offs, mask=d_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(OUT + toks.to(tl.int64)[:, None] * DM + offs[None, :], acc.to(OUT.dtype.element_ty),
             mask=t_ok[:, None] & d_ok[None, :])


@triton.jit
def _wgrad_kernel(G, IDX, X, DW, T, NB, DM, NSEL,
                  PREC: tl.constexpr, BLOCK_NN: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_DM: tl.constexpr):
    # DW[kb*N + j, :] = sum over the tokens t that chose unit kb*N + j of G[t, kb] * X[t, :]
    kb = tl.program_id(0)
    offs = tl.program_id(1) * BLOCK_DM + tl.arange(0, BLOCK_DM)
    d_ok = offs < DM
    offs_n = tl.arange(0, BLOCK_NN)
    n_ok = offs_n < NSEL
    acc = tl.zeros([BLOCK_NN, BLOCK_DM], dtype=tl.float32)
    for t0 in range(0, T, BLOCK_T):
        toks = t0 + tl.arange(0, BLOCK_T)
        t_ok = toks < T
        row = toks.to(tl.int64) * NB + kb
        local = tl.load(IDX + row, mask=t_ok, other=-1) - kb * NSEL
        gv = tl.load(G + row, mask=t_ok, other=0.0)
        xt = tl.load(X + toks.to(tl.int64)[:, None] * DM + offs[None, :], mask=t_ok[:, None] & d_ok[None, :],
                     other=0.0)
        onehot_t = tl.where(offs_n[:, None] == local[None, :], gv[None, :], 0.0)  # [NN, BLOCK_T]
        acc += tl.dot(onehot_t.to(xt.dtype), xt, input_precision=PREC)
    units = (kb * NSEL + offs_n).to(tl.int64)
    tl.store(DW + units[:, None] * DM + offs[None, :], acc.to(DW.dtype.element_ty),
             mask=n_ok[:, None] & d_ok[None, :])


_KERNELS = {  # name: (candidates, interpreter config, meta names)
    "_up_gather_kernel": (UP_GATHER_CONFIGS, (4, 16, 1, 1), ("BLOCK_K", "BLOCK_DM")),
    "_down_gather_kernel": (DOWN_GATHER_CONFIGS, (4, 16, 1, 1), ("BLOCK_K", "BLOCK_DM")),
    "_up_block_kernel": (UP_BLOCK_CONFIGS, (16, 16, 1, 1), ("BLOCK_T", "BLOCK_DM")),
    "_down_block_kernel": (DOWN_BLOCK_CONFIGS, (16, 16, 1, 1), ("BLOCK_T", "BLOCK_DM")),
    "_wgrad_kernel": (WGRAD_CONFIGS, (16, 16, 1, 1), ("BLOCK_T", "BLOCK_DM")),
}


def tuned(name: str, options: TritonOptions = DEFAULT_OPTIONS):
    """The autotuned kernel `name` (a key of _KERNELS) under `options`."""
    candidates, interpreter, meta = _KERNELS[name]
    return autotuned(globals()[name], name, candidates, interpreter, _mk(meta), options, key=_KEY)


# ----------------------------------------------------------------------------------------------
# launchers


def _use_decode(tokens: int, variant: str) -> bool:
    if variant not in ("auto", "decode", "batched"):
        raise ValueError(f"variant must be 'auto', 'decode' or 'batched', got {variant!r}")
    return variant == "decode" or (variant == "auto" and tokens <= DECODE_MAX_TOKENS)


def _up(x2: Tensor, logits: Optional[Tensor], idx_in: Optional[Tensor], w: Tensor, bias: Optional[Tensor],
        wg: Optional[Tensor], bg: Optional[Tensor], n: int, act: str, decode: bool, store_pre: bool,
        options: TritonOptions):
    """(h, idx, a, ag): [T, d_ff/n] fp32 values of the chosen units, their int32 indices, pre-activations."""
    T, DM = x2.shape
    d_ff = w.shape[0]
    nb = d_ff // n
    dev = x2.device
    h = torch.empty(T, nb, dtype=torch.float32, device=dev)
    idx = torch.empty(T, nb, dtype=torch.int32, device=dev)
    a = torch.empty(T, nb, dtype=torch.float32, device=dev) if store_pre else h
    ag = torch.empty(T, nb, dtype=torch.float32, device=dev) if store_pre and wg is not None else h
    dummy = h
    args = (x2, logits if logits is not None else dummy, idx_in if idx_in is not None else idx, w,
            bias if bias is not None else dummy, wg if wg is not None else w, bg if bg is not None else dummy,
            h, idx, a, ag)
    flags = dict(ACT=_ACT[act], GATED=wg is not None, HAS_BIAS=bias is not None, HAS_BGATE=bg is not None,
                 FROM_IDX=idx_in is not None, STORE_PRE=store_pre, BLOCK_NN=next_pow2(n))
    if decode:
        grid = lambda meta: (T, triton.cdiv(nb, meta["BLOCK_K"]))  # noqa: E731
        tuned("_up_gather_kernel", options)[grid](*args, nb, DM, n, d_ff, **flags)
    else:
        grid = lambda meta: (triton.cdiv(T, meta["BLOCK_T"]), nb)  # noqa: E731
        tuned("_up_block_kernel", options)[grid](*args, T, nb, DM, n, d_ff, PREC=dot_precision(w.dtype), **flags)
    return h, idx, (a if store_pre else None), (ag if store_pre and wg is not None else None)


def _down(h: Tensor, idx: Tensor, w: Tensor, h2: Optional[Tensor], w2: Optional[Tensor], bias: Optional[Tensor],
          n: int, out_dtype: torch.dtype, decode: bool, options: TritonOptions) -> Tensor:
    """sum_k h[t, k] w[idx[t, k]] (+ h2 w2 [idx]) + bias: (T, d_model) in out_dtype."""
    T, nb = h.shape
    DM = w.shape[1]
    dev = h.device
    if decode:
        # enough programs to keep the memory system busy: split the chosen rows into SPLIT shares
        split = max(1, min(nb // 8 or 1, -(-512 // (T * max(1, DM // 128)))))
        per_split = -(-nb // split)
        split = -(-nb // per_split)
        part = torch.empty(split, T, DM, dtype=torch.float32, device=dev)
        grid = lambda meta: (T, triton.cdiv(DM, meta["BLOCK_DM"]), split)  # noqa: E731
        tuned("_down_gather_kernel", options)[grid](h, idx, w, h2 if h2 is not None else h, w2 if w2 is not None else w, part,
                                  T, nb, DM, n, per_split, HAS2=h2 is not None)
        out = part.sum(0) if split > 1 else part[0]
        if bias is not None:
            out = out + bias.float()
        return out.to(out_dtype)
    out = torch.empty(T, DM, dtype=out_dtype, device=dev)
    grid = lambda meta: (triton.cdiv(T, meta["BLOCK_T"]), triton.cdiv(DM, meta["BLOCK_DM"]))  # noqa: E731
    tuned("_down_block_kernel", options)[grid](h, idx, w, h2 if h2 is not None else h, w2 if w2 is not None else w,
                             bias if bias is not None else h, out, T, nb, DM, n, HAS2=h2 is not None,
                             HAS_BIAS=bias is not None, PREC=dot_precision(w.dtype), BLOCK_NN=next_pow2(n))
    return out


def _wgrad(g: Tensor, idx: Tensor, x2: Tensor, d_ff: int, n: int, dtype: torch.dtype, options: TritonOptions
           ) -> Tensor:
    """(d_ff, d_model): row u = sum over tokens that chose u of g * x."""
    T, nb = g.shape
    DM = x2.shape[1]
    dw = torch.empty(d_ff, DM, dtype=dtype, device=x2.device)
    grid = lambda meta: (nb, triton.cdiv(DM, meta["BLOCK_DM"]))  # noqa: E731
    tuned("_wgrad_kernel", options)[grid](g, idx, x2, dw, T, nb, DM, n, PREC=dot_precision(x2.dtype), BLOCK_NN=next_pow2(n))
    return dw


def _bias_grad(g: Tensor, idx: Tensor, d_ff: int, dtype: torch.dtype) -> Tensor:
    return torch.zeros(d_ff, dtype=torch.float32, device=g.device).index_add_(
        0, idx.reshape(-1).long(), g.reshape(-1)).to(dtype)


def _prepare(x, w_in, b_in, w_out_t, b_out, c1, c2, c_bias, n, activation, w_gate, b_gate):
    check_inputs(x, w_in, b_in, w_out_t, b_out, c1, c2, c_bias, n, activation, w_gate, b_gate)
    check_device(x, w_in, b_in, w_out_t, b_out, c1, c2, c_bias, w_gate, b_gate, op=_OP)
    check_dtype(x, _OP)
    return [None if t is None else t.contiguous() for t in (w_in, b_in, w_out_t, b_out, w_gate, b_gate)]


def sparse_ffn_forward(x: Tensor, w_in: Tensor, b_in: Optional[Tensor], w_out_t: Tensor, b_out: Optional[Tensor],
                       c1: Tensor, c2: Tensor, c_bias: Optional[Tensor], n: int, activation: str,
                       w_gate: Optional[Tensor] = None, b_gate: Optional[Tensor] = None,
                       variant: str = "auto", *, options: TritonOptions = DEFAULT_OPTIONS) -> Tensor:
    """Triton forward of `sparsecc::sparse_ffn` (same arguments); variant "auto" | "decode" | "batched"."""
    w_in, b_in, w_out_t, b_out, w_gate, b_gate = _prepare(x, w_in, b_in, w_out_t, b_out, c1, c2, c_bias, n,
                                                          activation, w_gate, b_gate)
    x2 = x.reshape(-1, x.shape[-1]).contiguous()
    if x2.shape[0] == 0:
        return x.new_zeros(x.shape)
    decode = _use_decode(x2.shape[0], variant)
    logits = controller_logits(x2, c1, c2, c_bias).contiguous()
    h, idx, _, _ = _up(x2, logits, None, w_in, b_in, w_gate, b_gate, n, activation, decode, False, options)
    out = _down(h, idx, w_out_t, None, None, b_out, n, x.dtype, decode, options)
    return out.view(x.shape)


def sparse_ffn_backward(grad_out: Tensor, x: Tensor, w_in: Tensor, b_in: Optional[Tensor], w_out_t: Tensor,
                        c1: Tensor, c2: Tensor, c_bias: Optional[Tensor], w_gate: Optional[Tensor],
                        b_gate: Optional[Tensor], n: int, activation: str, needs: tuple = (True,) * 12,
                        variant: str = "auto", *, options: TritonOptions = DEFAULT_OPTIONS) -> tuple:
    """Gradients of `sparsecc::sparse_ffn` for its 12 inputs (None where not needed; the controller none)."""
    need = tuple(needs) + (False,) * (12 - len(needs))
    w_in, b_in, w_out_t, _, w_gate, b_gate = _prepare(x, w_in, b_in, w_out_t, None, c1, c2, c_bias, n,
                                                      activation, w_gate, b_gate)
    d_ff, d_model = w_in.shape
    x2 = x.reshape(-1, d_model).contiguous()
    go = grad_out.reshape(-1, d_model).to(x.dtype).contiguous()
    T = x2.shape[0]
    grads = [None] * 12
    if T == 0:
        zeros = {0: x, 1: w_in, 2: b_in, 3: w_out_t, 10: w_gate, 11: b_gate}
        for i, t in zeros.items():
            if need[i] and t is not None:
                grads[i] = torch.zeros_like(t)
        if need[4]:
            grads[4] = x.new_zeros(d_model)
        return tuple(grads)
    decode = _use_decode(T, variant)
    logits = controller_logits(x2, c1, c2, c_bias).contiguous()
    h, idx, a, ag = _up(x2, logits, None, w_in, b_in, w_gate, b_gate, n, activation, decode, True, options)
    gh, _, _, _ = _up(go, None, idx, w_out_t, None, None, None, n, "none", decode, False, options)
    if w_gate is None:
        ga, gg = activation_backward(gh, a, activation), None
    else:
        act_g = activation_fn(ag, activation)
        ga, gg = gh * act_g, activation_backward(gh * a, ag, activation)
    ga = ga.contiguous()
    gg = gg.contiguous() if gg is not None else None
    if need[0]:
        grads[0] = _down(ga, idx, w_in, gg, w_gate, None, n, x.dtype, decode, options).view(x.shape)
    if need[1]:
        grads[1] = _wgrad(ga, idx, x2, d_ff, n, w_in.dtype, options)
    if need[2] and b_in is not None:
        grads[2] = _bias_grad(ga, idx, d_ff, b_in.dtype)
    if need[3]:
        grads[3] = _wgrad(h, idx, go, d_ff, n, w_out_t.dtype, options)
    if need[4]:
        grads[4] = go.float().sum(0).to(x.dtype)
    if gg is not None and need[10]:
        grads[10] = _wgrad(gg, idx, x2, d_ff, n, w_gate.dtype, options)
    if gg is not None and need[11] and b_gate is not None:
        grads[11] = _bias_grad(gg, idx, d_ff, b_gate.dtype)
    return tuple(grads)


_GRAD_SLOTS = (0, 1, 2, 3, 4, 10, 11)  # the op's inputs that get gradients (x, weights, biases)


@torch.library.custom_op("sparsecc::triton_sparse_ffn_backward", mutates_args=())
def sparse_ffn_backward_op(grad_out: Tensor, x: Tensor, w_in: Tensor, b_in: Optional[Tensor], w_out_t: Tensor,
                           c1: Tensor, c2: Tensor, c_bias: Optional[Tensor], w_gate: Optional[Tensor],
                           b_gate: Optional[Tensor], n: int, activation: str, needs: list[bool]) -> list[Tensor]:
    """`sparse_ffn_backward` as an opaque op (so torch.compile / AOTAutograd can trace a backward that
    launches Triton kernels): the gradients of x, w_in, b_in, w_out_t, b_out, w_gate, b_gate, with an
    empty tensor for each one not needed or not applicable."""
    grads = sparse_ffn_backward(grad_out, x, w_in, b_in, w_out_t, c1, c2, c_bias, w_gate, b_gate, n, activation,
                                tuple(needs))
    return [grads[i] if grads[i] is not None else x.new_empty(0) for i in _GRAD_SLOTS]


@sparse_ffn_backward_op.register_fake
def _(grad_out, x, w_in, b_in, w_out_t, c1, c2, c_bias, w_gate, b_gate, n, activation, needs):
    need = tuple(needs) + (False,) * (12 - len(needs))
    like = {0: x, 1: w_in, 2: b_in, 3: w_out_t, 10: w_gate, 11: b_gate}
    out = []
    for i in _GRAD_SLOTS:
        if i == 4:
            out.append(x.new_empty(x.shape[-1]) if need[4] else x.new_empty(0))
        else:
            t = like[i]
            out.append(torch.empty_like(t) if need[i] and t is not None and (i < 10 or w_gate is not None)
                       else x.new_empty(0))
    return out


def autograd_backward(ctx, grad_out: Tensor) -> tuple:
    """Backward of the op from its autograd context (saved by sparsecc.ops.sparse_ffn.op.setup_context)."""
    x, w_in, b_in, w_out_t, c1, c2, c_bias, w_gate, b_gate = ctx.saved_tensors
    need = tuple(ctx.needs_input_grad) + (False,) * (12 - len(ctx.needs_input_grad))
    got = torch.ops.sparsecc.triton_sparse_ffn_backward(grad_out.contiguous(), x, w_in, b_in, w_out_t, c1, c2,
                                                        c_bias, w_gate, b_gate, ctx.n, ctx.activation, list(need))
    present = {0: x, 1: w_in, 2: b_in, 3: w_out_t, 4: grad_out, 10: w_gate, 11: b_gate}  # b_out is not saved
    grads = [None] * 12
    for i, g in zip(_GRAD_SLOTS, got):
        if need[i] and present[i] is not None:
            grads[i] = g
    return tuple(grads)


def sparse_ffn_cuda(x, w_in, b_in, w_out_t, b_out, c1, c2, c_bias, n, activation, w_gate=None, b_gate=None, *,
                    options: TritonOptions = DEFAULT_OPTIONS):
    """The CUDA kernel of `sparsecc::sparse_ffn`: the Triton kernels, or the op's PyTorch kernel for an
    activation they lack (never a KeyError)."""
    if activation not in _ACT:
        return sparse_ffn_op.pytorch_kernel(x, w_in, b_in, w_out_t, b_out, c1, c2, c_bias, n, activation, w_gate,
                                            b_gate)
    return sparse_ffn_forward(x, w_in, b_in, w_out_t, b_out, c1, c2, c_bias, n, activation, w_gate, b_gate,
                              options=options)


def register(options: TritonOptions = DEFAULT_OPTIONS) -> list[str]:
    """Register the Triton forward as the CUDA kernel of `sparsecc::sparse_ffn` (and of the opaque backward op),
    and route CUDA gradients of the op to the Triton backward; returns the op names."""
    torch.library.register_kernel("sparsecc::sparse_ffn", "cuda", functools.partial(sparse_ffn_cuda, options=options))

    def backward_cuda(grad_out, x, w_in, b_in, w_out_t, c1, c2, c_bias, w_gate, b_gate, n, activation, needs):
        grads = sparse_ffn_backward(grad_out, x, w_in, b_in, w_out_t, c1, c2, c_bias, w_gate, b_gate, n, activation,
                                    tuple(needs), options=options)
        return [grads[i] if grads[i] is not None else x.new_empty(0) for i in _GRAD_SLOTS]

    torch.library.register_kernel("sparsecc::triton_sparse_ffn_backward", "cuda", backward_cuda)
    # sparse_ffn's backward is a Python autograd formula (no backward op to give a CUDA kernel):
    # CUDA gradients go to the Triton backward, every other device keeps the op's own formula.
    op_backward = sparse_ffn_op.pytorch_backward

    def backward(ctx, grad_out):
        if grad_out.device.type == "cuda" and ctx.activation in _ACT:
            return autograd_backward(ctx, grad_out)
        return op_backward(ctx, grad_out)

    sparse_ffn_op.sparse_ffn.register_autograd(backward, setup_context=sparse_ffn_op.setup_context)
    return ["sparsecc::sparse_ffn"]


"""`sparsecc::block_sparse_attention`: schema, checks, fake, autograd and the dense reference.

The layout is one block mask [ceil(L/b), ceil(S/b)] shared by every batch item and head, given
in its padded-row (ELL) view (`sparsecc.layouts.indexing.block_mask_to_ell`). The result equals
dense softmax attention whose scores are -inf outside the expanded block mask, outside the causal
triangle (key j > query i, absolute positions) and at padded keys, plus an optional additive score
`bias` on the kept entries (`reference`); a row with no allowed key outputs 0, logsumexp -inf and
gets zero gradients.

The bias (B or 1, H or 1, L, S) carries what a causal flag and a key-padding vector cannot: ALiBi,
relative-position terms, a sliding window (-inf outside it), any other mask. Only its entries on
kept blocks are read; its gradient (`bias.py`) flows back to whatever computed it.

Kernels: the CPU one is `cpu.py` (the C++ kernel `cpu.cpp` for fp32, a chunked PyTorch path
otherwise); `triton.py` holds the CUDA kernels the Triton backend registers; `onnx.py` the
translation into standard ONNX ops. The backward is an op of its own
(`sparsecc::block_sparse_attention_backward`) so that a backend can give it a kernel too.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from sparsecc.errors import LayoutError
from sparsecc.ops.block_sparse_attention import cpu
from sparsecc.ops.block_sparse_attention.bias import bias_grad

__all__ = ["block_sparse_attention", "block_sparse_attention_backward_op", "block_sparse_attention_bias_grad_op",
           "block_sparse_attention_op", "check_inputs", "lse_dtype", "reference"]


def check_inputs(q: Tensor, k: Tensor, v: Tensor, kv_indices: Tensor, kv_counts: Tensor,
                 block_size: int, key_padding_mask: Optional[Tensor], bias: Optional[Tensor] = None) -> None:
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
            "sequences up to that length; compile with the attention config's max_len (Spion(max_len=...), "
            "Fixed(max_len=...)) at least the longest length you will run.")
    if kv_indices.is_floating_point() or kv_counts.is_floating_point():
        raise LayoutError("kv_indices and kv_counts must be integer tensors")
    if key_padding_mask is not None and (key_padding_mask.dtype != torch.bool
                                         or key_padding_mask.shape != (B, k.shape[2])):
        raise ValueError(f"key_padding_mask must be bool (B={B}, S={k.shape[2]}) with True = keep; "
                         f"got {key_padding_mask.dtype} {tuple(key_padding_mask.shape)}")
    if bias is not None and (not bias.is_floating_point() or bias.dim() != 4 or bias.shape[0] not in (1, B)
                             or bias.shape[1] not in (1, H) or bias.shape[2] != L or bias.shape[3] != k.shape[2]):
        raise ValueError(f"bias must be a floating (B or 1, H or 1, L, S) = ({B} or 1, {H} or 1, {L}, {k.shape[2]}) "
                         f"additive score bias; got {bias.dtype} {tuple(bias.shape)}")


def lse_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of logsumexp: fp64 for fp64 inputs, else fp32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


@torch.library.custom_op("sparsecc::block_sparse_attention", mutates_args=(), device_types="cpu")
def block_sparse_attention_op(q: Tensor, k: Tensor, v: Tensor, kv_indices: Tensor, kv_counts: Tensor,
                              block_size: int, scale: float, causal: bool, key_padding_mask: Optional[Tensor],
                              bias: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
    """Block-sparse attention; returns (out (B, H, L, D) in q's dtype, logsumexp (B, H, L)).

    logsumexp is fp32 (fp64 for fp64 inputs) and -inf for rows with no allowed key; it is not
    differentiable.
    """
    check_inputs(q, k, v, kv_indices, kv_counts, block_size, key_padding_mask, bias)
    return cpu.forward(q, k, v, kv_indices, kv_counts, block_size, scale, causal, key_padding_mask, bias)


@block_sparse_attention_op.register_fake
def _(q, k, v, kv_indices, kv_counts, block_size, scale, causal, key_padding_mask, bias=None):
    check_inputs(q, k, v, kv_indices, kv_counts, block_size, key_padding_mask, bias)
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    return out, q.new_empty(q.shape[:3], dtype=lse_dtype(q.dtype))


@torch.library.custom_op("sparsecc::block_sparse_attention_backward", mutates_args=(), device_types="cpu")
def block_sparse_attention_backward_op(
        grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, kv_indices: Tensor,
        kv_counts: Tensor, block_size: int, scale: float, causal: bool, key_padding_mask: Optional[Tensor],
        bias: Optional[Tensor] = None) -> tuple[Tensor, Tensor, Tensor]:
    """(dq, dk, dv) of `sparsecc::block_sparse_attention` given the forward's out and logsumexp."""
    return cpu.backward(grad_out, q, k, v, out, lse, kv_indices, kv_counts, block_size, scale, causal,
                        key_padding_mask, bias)


@block_sparse_attention_backward_op.register_fake
def _(grad_out, q, k, v, out, lse, kv_indices, kv_counts, block_size, scale, causal, key_padding_mask, bias=None):
    return tuple(torch.empty_like(t, memory_format=torch.contiguous_format) for t in (q, k, v))


@torch.library.custom_op("sparsecc::block_sparse_attention_bias_grad", mutates_args=())
def block_sparse_attention_bias_grad_op(
        grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, kv_indices: Tensor,
        kv_counts: Tensor, block_size: int, scale: float, causal: bool, key_padding_mask: Optional[Tensor],
        bias: Tensor) -> Tensor:
    """The gradient of the op's `bias` (its shape; zero off the kept entries), on any device."""
    return bias_grad(grad_out, q, k, v, out, lse, kv_indices, kv_counts, block_size, scale, causal,
                     key_padding_mask, bias)


@block_sparse_attention_bias_grad_op.register_fake
def _(grad_out, q, k, v, out, lse, kv_indices, kv_counts, block_size, scale, causal, key_padding_mask, bias):
    return torch.empty_like(bias, memory_format=torch.contiguous_format)


def _setup_context(ctx, inputs, output) -> None:
    q, k, v, kv_indices, kv_counts, block_size, scale, causal, key_padding_mask, bias = inputs
    out, lse = output
    ctx.mark_non_differentiable(lse)
    ctx.save_for_backward(q, k, v, out, lse, kv_indices, kv_counts, key_padding_mask, bias)
    ctx.args = (block_size, scale, causal)


def _backward(ctx, grad_out: Tensor, _grad_lse: Optional[Tensor]):
    q, k, v, out, lse, kv_indices, kv_counts, key_padding_mask, bias = ctx.saved_tensors
    grad_out = grad_out.contiguous()
    dq, dk, dv = block_sparse_attention_backward_op(grad_out, q, k, v, out, lse, kv_indices,
                                                    kv_counts, *ctx.args, key_padding_mask, bias)
    dbias = None
    if bias is not None and ctx.needs_input_grad[9]:
        dbias = block_sparse_attention_bias_grad_op(grad_out, q, k, v, out, lse, kv_indices, kv_counts, *ctx.args,
                                                    key_padding_mask, bias)
    return dq, dk, dv, None, None, None, None, None, None, dbias


block_sparse_attention_op.register_autograd(_backward, setup_context=_setup_context)


def block_sparse_attention(q: Tensor, k: Tensor, v: Tensor, kv_indices: Tensor, kv_counts: Tensor,
                           block_size: int, scale: Optional[float] = None, causal: bool = False,
                           key_padding_mask: Optional[Tensor] = None, bias: Optional[Tensor] = None) -> Tensor:
    """Softmax attention restricted to a block layout; returns (B, H, L, D) in q's dtype.

    q: (B, H, L, D); k, v: (B, Hkv, S, D) with H % Hkv == 0 (GQA). kv_indices [ceil(L/b), max_kept]
    and kv_counts [ceil(L/b)] are the ELL view of a bool block mask [ceil(L/b), ceil(S/b)]
    (`block_mask_to_ell`). scale defaults to 1/sqrt(D). causal masks key j > query i.
    key_padding_mask: optional bool (B, S), True = a real token. bias: optional additive score bias
    (B or 1, H or 1, L, S), -inf where a key is masked.
    """
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    return block_sparse_attention_op(q, k, v, kv_indices, kv_counts, block_size, float(scale), causal,
                                     key_padding_mask, bias)[0]


def reference(q: Tensor, k: Tensor, v: Tensor, kv_indices: Tensor, kv_counts: Tensor, block_size: int,
              scale: float, causal: bool, key_padding_mask: Optional[Tensor],
              bias: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
    """The op's definition, densely: (out, logsumexp) of softmax attention with -inf outside the
    expanded block mask, the causal triangle and padded keys, plus `bias`; empty rows give 0 and -inf.

    Builds the L x S scores: for tests and small shapes. Differentiable in q, k, v and bias.
    """
    from sparsecc.ops.block_sparse_attention.layout import clean_block_mask

    check_inputs(q, k, v, kv_indices, kv_counts, block_size, key_padding_mask, bias)
    B, H, L, _ = q.shape
    S, g = k.shape[2], H // k.shape[1]
    keep = clean_block_mask(kv_indices, kv_counts, L, S, block_size, causal).to(q.device)
    allowed = keep.repeat_interleave(block_size, 0).repeat_interleave(block_size, 1)[:L, :S]
    if causal:
        allowed = allowed & torch.ones(L, S, dtype=torch.bool, device=q.device).tril()
    allowed = allowed.expand(B, 1, L, S)
    if key_padding_mask is not None:
        allowed = allowed & key_padding_mask[:, None, None, :]
    k, v = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
    s = q @ k.transpose(-1, -2) * scale
    if bias is not None:
        s = s + bias
        allowed = allowed & ~bias.isneginf()
    s = s.masked_fill(~allowed, float("-inf"))
    lse = torch.logsumexp(s.to(lse_dtype(q.dtype)), -1)
    p = torch.exp(s - lse.to(s.dtype).unsqueeze(-1).nan_to_num(0.0, neginf=0.0, posinf=0.0))
    p = p.masked_fill(~allowed, 0.0)
    return (p @ v).to(q.dtype), lse

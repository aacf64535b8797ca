"""`sparsecc::attention`: dense scaled-dot-product attention as an opaque custom op.

Schema, fake and autograd; the CPU (and any-device) kernel is PyTorch's SDPA, `attention_reference`
spells the same function out in matmul / softmax.

This is the op the identity rewrite puts in place of every attention region's
SDPA node. It has the same semantics as `aten.scaled_dot_product_attention`
(additive or boolean mask, causal flag, scale, GQA), and an explicit backward
that also gives the gradient of a float mask (T5's learned position bias flows
through the mask). Sparse attention ops replace it with the same argument shape.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor


def _repeat_kv(x: Tensor, groups: int) -> Tensor:
    return x if groups == 1 else x.repeat_interleave(groups, dim=-3)


def _scores_mask(q: Tensor, k: Tensor, attn_mask: Optional[Tensor], is_causal: bool) -> Optional[Tensor]:
    """An additive float mask (or None) equal to SDPA's treatment of attn_mask and is_causal."""
    L, S = q.shape[-2], k.shape[-2]
    mask = None
    if is_causal:
        keep = torch.ones(L, S, dtype=torch.bool, device=q.device).tril()
        mask = torch.zeros(L, S, dtype=q.dtype, device=q.device).masked_fill(~keep, float("-inf"))
    if attn_mask is not None:
        m = attn_mask
        if m.dtype == torch.bool:
            m = torch.zeros(m.shape, dtype=q.dtype, device=q.device).masked_fill(~m, float("-inf"))
        mask = m if mask is None else mask + m
    return mask


def _forward(q, k, v, attn_mask, is_causal, scale, enable_gqa):
    groups = q.shape[-3] // k.shape[-3] if enable_gqa else 1
    k_, v_ = _repeat_kv(k, groups), _repeat_kv(v, groups)
    s = (1.0 / math.sqrt(q.shape[-1])) if scale is None else scale
    scores = torch.matmul(q, k_.transpose(-2, -1)) * s
    mask = _scores_mask(q, k_, attn_mask, is_causal)
    if mask is not None:
        scores = scores + mask
    # A row whose keys are all -inf has no gradient (zeros, not NaN).
    probs = torch.nan_to_num(torch.softmax(scores, dim=-1), nan=0.0)
    return torch.matmul(probs, v_), probs


def attention_reference(q: Tensor, k: Tensor, v: Tensor, attn_mask: Optional[Tensor] = None,
                        is_causal: bool = False, scale: Optional[float] = None, enable_gqa: bool = False) -> Tensor:
    """The op's definition in matmul / softmax (what the backward differentiates); rows whose keys are
    all masked give 0."""
    return _forward(q, k, v, attn_mask, is_causal, scale, enable_gqa)[0]


def _check_dropout(dropout_p: float) -> None:
    if dropout_p != 0.0:
        from sparsecc.errors import UnsupportedError
        raise UnsupportedError(
            f"sparsecc::attention got dropout_p={dropout_p}; sparsecc ops run attention without dropout "
            "(models are captured in eval mode). Capture the model with model.eval(), or set the "
            "attention dropout probability to 0 in its config.")


@torch.library.custom_op("sparsecc::attention", mutates_args=())
def attention(q: Tensor, k: Tensor, v: Tensor, attn_mask: Optional[Tensor] = None,
              dropout_p: float = 0.0, is_causal: bool = False, scale: Optional[float] = None,
              enable_gqa: bool = False) -> Tensor:
    """Dense attention, same contract as aten.scaled_dot_product_attention (dropout_p must be 0)."""
    _check_dropout(dropout_p)
    # contiguous, as the fake promises: SDPA's CPU kernels may return a transposed layout
    return torch.nn.functional.scaled_dot_product_attention(
        q, k, v, attn_mask=attn_mask, is_causal=is_causal, scale=scale, enable_gqa=enable_gqa).contiguous()


@attention.register_fake
def _(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    return q.new_empty((*q.shape[:-1], v.shape[-1]))


def _setup_context(ctx, inputs, output):
    q, k, v, attn_mask, dropout_p, is_causal, scale, enable_gqa = inputs
    ctx.save_for_backward(q, k, v, attn_mask)
    ctx.args = (dropout_p, is_causal, scale, enable_gqa, attn_mask is not None)


def _sum_to(grad: Tensor, shape: torch.Size) -> Tensor:
    """Reduce a broadcast gradient back to `shape`."""
    while grad.dim() > len(shape):
        grad = grad.sum(0)
    for i, n in enumerate(shape):
        if n == 1 and grad.shape[i] != 1:
            grad = grad.sum(i, keepdim=True)
    return grad


def _backward(ctx, grad_out):
    q, k, v, attn_mask = ctx.saved_tensors
    _, is_causal, scale, enable_gqa, has_mask = ctx.args
    groups = q.shape[-3] // k.shape[-3] if enable_gqa else 1
    k_, v_ = _repeat_kv(k, groups), _repeat_kv(v, groups)
    s = (1.0 / math.sqrt(q.shape[-1])) if scale is None else scale
    _, probs = _forward(q, k, v, attn_mask, is_causal, scale, enable_gqa)
    d_v = torch.matmul(probs.transpose(-2, -1), grad_out)
    d_probs = torch.matmul(grad_out, v_.transpose(-2, -1))
    d_scores = probs * (d_probs - (d_probs * probs).sum(-1, keepdim=True))
    d_q = torch.matmul(d_scores, k_) * s
    d_k = torch.matmul(d_scores.transpose(-2, -1), q) * s
    if groups > 1:
        d_k = d_k.unflatten(-3, (k.shape[-3], groups)).sum(-3)
        d_v = d_v.unflatten(-3, (v.shape[-3], groups)).sum(-3)
    d_mask = None
    if has_mask and attn_mask.dtype != torch.bool and ctx.needs_input_grad[3]:
        d_mask = _sum_to(d_scores, attn_mask.shape)
    return _sum_to(d_q, q.shape), _sum_to(d_k, k.shape), _sum_to(d_v, v.shape), d_mask, None, None, None, None


attention.register_autograd(_backward, setup_context=_setup_context)


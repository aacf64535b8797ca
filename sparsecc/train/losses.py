"""Distillation losses: how far a compiled (sparse) model's outputs are from its dense teacher's."""

from __future__ import annotations

from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils import _pytree as pytree

__all__ = ["embedding_distill", "first_float_tensor", "hidden_distill", "kl_distill", "output_distill"]


def kl_distill(student_logits: Tensor, teacher_logits: Tensor, temperature: float = 1.0) -> Tensor:
    """KL(teacher || student) of the softmax outputs (batch mean), times temperature^2."""
    t = temperature
    return F.kl_div(F.log_softmax(student_logits / t, -1), F.log_softmax(teacher_logits / t, -1),
                    log_target=True, reduction="batchmean") * t * t


def hidden_distill(student: Tensor, teacher: Tensor, mask: Optional[Tensor] = None) -> Tensor:
    """Mean (1 - cosine) between student and teacher token states (over the non-padding tokens)."""
    cos = F.cosine_similarity(student, teacher, dim=-1)
    if mask is None:
        return (1 - cos).mean()
    m = mask.to(cos.dtype)
    return ((1 - cos) * m).sum() / m.sum().clamp_min(1.0)


def embedding_distill(student: Tensor, teacher: Tensor, mask: Optional[Tensor] = None,
                      token_weight: float = 1.0) -> Tensor:
    """Sentence embeddings (mean pooling over non-padding tokens): (1 - cosine of the pooled vectors)
    + token_weight * hidden_distill. For models used as sentence encoders (e.g. all-MiniLM)."""
    m = torch.ones(student.shape[:2], dtype=student.dtype) if mask is None else mask.to(student.dtype)
    w = m.unsqueeze(-1)
    ps, pt = (student * w).sum(1) / w.sum(1).clamp_min(1.0), (teacher * w).sum(1) / w.sum(1).clamp_min(1.0)
    pooled = (1 - F.cosine_similarity(ps, pt, dim=-1)).mean()
    return pooled + token_weight * hidden_distill(student, teacher, mask)


def first_float_tensor(out: Any) -> Tensor:
    for leaf in pytree.tree_leaves(out):
        if isinstance(leaf, Tensor) and leaf.is_floating_point():
            return leaf
    raise ValueError("distillation: the model output has no floating-point tensor")


def output_distill(student_out: Any, teacher_out: Any, batch: Any = None) -> Tensor:
    """Default distillation: KL on `.logits` when the outputs have them, else cosine on the first output
    (over the tokens of `attention_mask` when the batch has one)."""
    s, t = getattr(student_out, "logits", None), getattr(teacher_out, "logits", None)
    if s is not None and t is not None:
        return kl_distill(s.reshape(-1, s.shape[-1]), t.reshape(-1, t.shape[-1]))
    mask = batch.get("attention_mask") if isinstance(batch, dict) else None
    return hidden_distill(first_float_tensor(student_out), first_float_tensor(teacher_out), mask)

"""The quality budget of `sparsecc.tune`: a metric of the compiled model's outputs against the dense model's.

    Budget("cosine", min=0.98)        Budget.parse("cosine>=0.98")      Budget.parse("kl<=0.05")
    Budget.parse("top10>=0.9")        Budget(my_metric, min=0.5)        # my_metric(student, teacher, batches)

Metrics, each over the held-out batches (outputs: the first floating-point output, e.g. last_hidden_state
or logits; tokens outside the attention mask are left out):
- "cosine": mean cosine similarity of each example's mean-pooled output to the dense model's (1 = same);
- "topK" (top10, top5, ...): the K nearest neighbours of each example among the others by the cosine of
  its pooled output, as a fraction shared with the dense model's neighbours (retrieval quality, 1 = same);
- "kl": mean KL(dense || compiled) of the softmax of the outputs per token (logits; 0 = same);
- "mse": mean squared error of the outputs (0 = same);
- a callable(student_outputs, teacher_outputs, batches) -> float, given the per-batch outputs.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any, Callable, Optional, Union

import torch
import torch.nn.functional as F

from sparsecc.errors import InputError
from sparsecc.train.losses import first_float_tensor

HIGHER_IS_BETTER = {"cosine": True, "kl": False, "mse": False}
_TOPK = re.compile(r"^top(\d+)$")
_SPEC = re.compile(r"^\s*([A-Za-z_][\w]*)\s*(>=|<=)\s*([-+0-9.eE]+)\s*$")


@dataclass(frozen=True)
class Budget:
    """The least quality the tuned model must keep: `metric >= min` or `metric <= max` on held-out data."""

    metric: Union[str, Callable] = "cosine"
    min: Optional[float] = None
    max: Optional[float] = None

    def __post_init__(self):
        if not callable(self.metric):
            if not isinstance(self.metric, str) or not (self.metric in HIGHER_IS_BETTER or _TOPK.match(self.metric)):
                raise InputError(f"budget metric {self.metric!r} is not known; expected one of "
                                 f"{sorted(HIGHER_IS_BETTER)}, 'topK' (e.g. 'top10'), or a callable(student_outputs, "
                                 "teacher_outputs, batches) -> float")
        if (self.min is None) == (self.max is None):
            raise InputError(f"budget on {self.name}: give exactly one of min= (the metric must stay at or above it) "
                             f"and max= (at or below it); got min={self.min}, max={self.max}")
        if not callable(self.metric):
            if self.higher_is_better and self.max is not None:
                raise InputError(f"budget: {self.name} is higher-is-better (1 = the dense model); give min=, "
                                 f"e.g. Budget({self.name!r}, min=0.98)")
            if not self.higher_is_better and self.min is not None:
                raise InputError(f"budget: {self.name} is lower-is-better (0 = the dense model); give max=, "
                                 f"e.g. Budget({self.name!r}, max=0.05)")

    @classmethod
    def parse(cls, text: str) -> "Budget":
        """'cosine>=0.98', 'top10>=0.9', 'kl<=0.05'."""
        m = _SPEC.match(str(text))
        if m is None:
            raise InputError(f"budget {text!r} is not of the form METRIC>=VALUE or METRIC<=VALUE "
                             "(e.g. 'cosine>=0.98', 'top10>=0.9', 'kl<=0.05')")
        name, op, value = m.group(1), m.group(2), float(m.group(3))
        return cls(name, min=value) if op == ">=" else cls(name, max=value)

    @property
    def name(self) -> str:
        return self.metric if isinstance(self.metric, str) else getattr(self.metric, "__name__", "metric")

    @property
    def higher_is_better(self) -> bool:
        if callable(self.metric):
            return self.min is not None
        return HIGHER_IS_BETTER.get(self.metric, True)  # topK: higher is better

    @property
    def bound(self) -> float:
        return self.min if self.min is not None else self.max

    def met(self, value: float) -> bool:
        return value >= self.min if self.min is not None else value <= self.max

    def better(self, a: float, b: float) -> bool:
        """Whether quality `a` is strictly better than `b`."""
        return a > b if self.higher_is_better else a < b

    def loss(self, value: float, reference: float) -> float:
        """How much quality `value` lost against `reference` (>= 0 when worse), in the metric's units."""
        return reference - value if self.higher_is_better else value - reference

    def slack(self, reference: float) -> float:
        """How much quality may be lost from `reference` before the budget is broken."""
        return self.loss(self.bound, reference)

    def __str__(self) -> str:
        return f"{self.name}{'>=' if self.min is not None else '<='}{self.bound:g}"

    def measure(self, student: list, teacher: list, batches: list) -> float:
        """The metric of the compiled model's outputs `student` against the dense `teacher`'s, batch by batch."""
        if callable(self.metric):
            return float(self.metric(student, teacher, batches))
        m = _TOPK.match(self.metric)
        if m:
            return neighbour_overlap(_pooled_all(student, batches), _pooled_all(teacher, batches), int(m.group(1)))
        if self.metric == "cosine":
            return float((F.normalize(_pooled_all(student, batches), dim=-1)
                          * F.normalize(_pooled_all(teacher, batches), dim=-1)).sum(-1).mean())
        total, count = 0.0, 0
        for s_out, t_out, inputs in zip(student, teacher, batches):
            s, t = first_float_tensor(s_out).float(), first_float_tensor(t_out).float()
            keep = _token_mask(inputs, s)
            if self.metric == "kl":
                per = F.kl_div(F.log_softmax(s, -1), F.log_softmax(t, -1), reduction="none", log_target=True).sum(-1)
            else:
                per = (s - t).pow(2).flatten(2).mean(-1) if s.dim() > 2 else (s - t).pow(2).mean(-1, keepdim=True)
            if keep is not None and keep.shape == per.shape:
                total, count = total + float(per[keep].sum()), count + int(keep.sum())
            else:
                total, count = total + float(per.sum()), count + per.numel()
        return total / max(count, 1)


def _token_mask(inputs: Any, out: torch.Tensor) -> Optional[torch.Tensor]:
    mask = inputs.get("attention_mask") if isinstance(inputs, dict) else None
    if mask is None or out.dim() < 3 or tuple(mask.shape) != tuple(out.shape[:2]):
        return None
    return mask.bool()


def _pooled_all(outputs: list, batches: list) -> torch.Tensor:
    """Each example's output mean-pooled over its tokens (the attention mask's), as one [examples, d] matrix."""
    rows = []
    for out, inputs in zip(outputs, batches):
        h = first_float_tensor(out).float()
        if h.dim() < 3:
            rows.append(h.reshape(h.shape[0], -1))
            continue
        keep = _token_mask(inputs, h)
        if keep is None:
            rows.append(h.mean(1))
        else:
            w = keep.unsqueeze(-1).to(h.dtype)
            rows.append((h * w).sum(1) / w.sum(1).clamp_min(1.0))
    return torch.cat(rows)


def neighbour_overlap(student: torch.Tensor, teacher: torch.Tensor, k: int) -> float:
    """The mean fraction of each row's k nearest other rows (cosine) that the teacher's embeddings share."""
    n = teacher.shape[0]
    if n <= k:
        raise InputError(f"budget top{k}: the held-out data has {n} examples; neighbour overlap at {k} needs more "
                         f"than {k} - give more evaluation batches or a smaller K")

    def neighbours(x: torch.Tensor) -> torch.Tensor:
        x = F.normalize(x, dim=-1)
        sim = x @ x.T
        sim.fill_diagonal_(-math.inf)
        return sim.topk(k, dim=-1).indices

    a, b = neighbours(student), neighbours(teacher)
    shared = (a.unsqueeze(-1) == b.unsqueeze(-2)).any(-1).float().sum(-1)
    return float((shared / k).mean())

"""SparseFlow training: the losses and a small fit helper.

    sm = sparsecc.compile(model, inputs, recipe=sparsecc.Recipe(flow=sparsecc.TokenFlow(keep=0.5)))
    result = fit_flow(sm, batches, teacher=model, steps=500)      # distil the gates (and the weights)
    sm.eval()                                                       # gather / scatter inference

Loss per step (as released): task loss (optional, `task_loss(out, batch)`) + distillation to the dense
teacher's outputs (`distill(student_out, teacher_out, batch)`; default KL on `.logits`, else a
token-level cosine on the first output) + `penalty` * sum over layers (layer + 1) * (kept fraction -
keep)^2 + `balance` * the mixture balance term (released gates). The gates train at `gate_lr`
(0.1, as released), the model at `lr` (2e-5); the last `final_fraction` of the steps drop the
penalty and balance terms. Training runs the soft-gate graph of the FlowSparseModel
(Gumbel-sigmoid gates, temperature from the recipe); nothing of the user's model changes.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils import _pytree as pytree

from sparsecc.capture import normalize_inputs
from sparsecc.training.flow_gates import FlowGates, keep_threshold

log = logging.getLogger("sparsecc.training.flow")

__all__ = ["FlowFitResult", "balance_loss", "calibrate_keep", "embedding_distill", "fit_flow", "hidden_distill", "kept_fractions",
           "kl_distill", "output_distill", "sparsity_penalty"]


# ------------------------------------------------------------------ losses
def _layer_weights(gates: FlowGates) -> dict:
    """segment -> (its layer number within its stack) + 1."""
    seen: dict = {}
    weights = {}
    for seg in range(gates.n_segments):
        stack = gates.stacks[seg]
        seen[stack] = seen.get(stack, 0) + 1
        weights[seg] = float(seen[stack])
    return weights


def kept_fractions(gates: FlowGates) -> dict:
    """segment -> kept fraction (mean gate over the non-padding tokens) of the last training forward."""
    out = {}
    for seg, (g, valid) in gates.last_gates.items():
        if valid is None:
            out[seg] = g.mean()
        else:
            v = valid.to(g.dtype)
            out[seg] = (g * v).sum() / v.sum().clamp_min(1.0)
    return out


def sparsity_penalty(gates: FlowGates, target: Optional[float] = None) -> Tensor:
    """sum over layers (layer + 1) * (kept fraction - target)^2 (as released); 0 for top-k gates (fixed budget).
    target: one for every segment (default: each segment's own, `TokenFlow.keep`)."""
    fractions = kept_fractions(gates)
    if not fractions or gates.select == "topk":
        return torch.zeros(())
    weights = _layer_weights(gates)
    targets = gates.keep_targets if target is None else [target] * gates.n_segments
    return sum(weights[s] * (f - targets[s]) ** 2 for s, f in fractions.items())


def balance_loss(gates: FlowGates) -> Tensor:
    """n_mix * sum_m (mean_b w[b, m])^2 - 1 over each stack's router: 0 when the mixture is used evenly."""
    if not gates.last_mix:
        return torch.zeros(())
    total = torch.zeros(())
    for mix in gates.last_mix.values():
        p = mix.mean(0)
        total = total + p.numel() * (p * p).sum() - 1.0
    return total


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


def _first_tensor(out: Any) -> Tensor:
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
    return hidden_distill(_first_tensor(student_out), _first_tensor(teacher_out), mask)


# ------------------------------------------------------------------ fit
@dataclass
class FlowFitResult:
    model: nn.Module
    history: list = field(default_factory=list)  # per step: {"loss", "distill", "task", "penalty", "balance", "kept"}
    shifts: dict = field(default_factory=dict)  # segment -> logit shift set by calibrate_keep

    @property
    def losses(self) -> list[float]:
        return [h["loss"] for h in self.history]


def calibrate_keep(sm: nn.Module, batches: Iterable[Any], keep: Optional[float] = None,
                   inputs_of: Callable[[Any], Any] = lambda batch: batch) -> dict:
    """Set each segment's logit shift so the HARD decisions keep `keep` (default: each segment's target) of the
    non-padding tokens of `batches`, layer after layer (a layer's shift changes the next one's inputs).

    Soft training matches the MEAN gate to the target; hard thresholding at 0.5 keeps the tokens
    whose logit is > 0, which is the same fraction only once the logits have polarised. Only for
    select="threshold" (top-k keeps its budget by construction). Returns segment -> shift.
    """
    gates: FlowGates = sm.flow_gates
    if gates.select != "threshold":
        return {}
    keeps = gates.keep_targets if keep is None else [keep] * gates.n_segments
    batches = list(batches)
    was_training = sm.training
    sm.eval()
    shifts = {}
    try:
        for seg in range(gates.n_segments):
            gates.capture = {}
            with torch.no_grad():
                for batch in batches:
                    _call(sm, inputs_of(batch))
            rows = gates.capture.get(seg, [])
            gates.capture = None
            if not rows:
                continue
            logits = torch.cat([lg.flatten() for lg, _ in rows])
            valid = torch.cat([(torch.ones_like(lg, dtype=torch.bool) if v is None else v).flatten()
                               for lg, v in rows])
            pinned = torch.cat([torch.zeros_like(lg, dtype=torch.bool).index_fill_(1, torch.tensor([0]),
                                                                                 gates.pin_first).flatten()
                                for lg, _ in rows]) & valid
            threshold = keep_threshold(logits, valid, pinned, keeps[seg])
            gates.shift[seg] -= threshold
            shifts[seg] = float(gates.shift[seg])
    finally:
        gates.capture = None
        sm.train(was_training)
    return shifts


def _cycle(batches: Iterable[Any]) -> Iterator[Any]:
    while True:
        empty = True
        for b in batches:
            empty = False
            yield b
        if empty:
            raise ValueError("fit_flow got an empty iterable of batches")


def _call(model: Callable, batch: Any) -> Any:
    args, kwargs = normalize_inputs(batch)
    return model(*args, **kwargs)


def fit_flow(sm: nn.Module, batches: Iterable[Any], *, steps: int, teacher: Optional[nn.Module] = None,
             distill: Optional[Callable[[Any, Any, Any], Tensor]] = None,
             task_loss: Optional[Callable[[Any, Any], Tensor]] = None,
             inputs_of: Callable[[Any], Any] = lambda batch: batch, lr: float = 2e-5, gate_lr: float = 0.1,
             penalty: float = 1.0, balance: float = 0.1, final_fraction: float = 0.1, weight_decay: float = 0.0,
             train_model: bool = True, teacher_cache: bool = True, calibrate: bool = True,
             hard_final: bool = False, track_keep: float = 0.1, progress: bool = True) -> FlowFitResult:
    """Train the gates (and, with train_model, the weights) of a token-flow `FlowSparseModel` in place.

    batches: an iterable (cycled) of batches; inputs_of(batch) -> the model inputs (a dict of keyword
    inputs, a tuple, a tensor). teacher: the dense model whose outputs are distilled (never modified);
    distill(student_out, teacher_out, inputs) -> loss (default `output_distill`); task_loss(out, batch)
    -> loss, for labelled data. teacher_cache: keep the teacher outputs of each distinct batch object.
    calibrate: at the end, set the thresholds so the hard gates keep the target fraction on the
    training batches (`calibrate_keep`; threshold gates only).
    hard_final: (threshold gates, not as released) calibrate at the start of the final phase, then
    freeze the gates and train the weights on their hard decisions, so the weights adapt to the
    tokens inference will keep; as released, the soft gates drift open once the penalty is off
    (the longer the run, the further: prefer hard_final past a few hundred steps).
    track_keep: in the hard final phase, each step moves every threshold this fraction of the way to
    the one that keeps the target on the batch: content scores move as the weights train, and with
    frozen thresholds the kept fraction drifts away from the target (0 freezes them).
    Returns the model (in eval mode: the gather / scatter graph) and the per-step history.
    """
    gates: FlowGates = sm.flow_gates
    if teacher is None and task_loss is None:
        raise ValueError("fit_flow needs a teacher (dense model to distil from) or a task_loss, or both")
    distill = distill or output_distill
    gate_params = list(gates.parameters())
    gate_ids = {id(p) for p in gate_params}
    model_params = [p for p in sm.parameters() if id(p) not in gate_ids and p.requires_grad] if train_model else []
    groups = [{"params": gate_params, "lr": gate_lr, "weight_decay": 0.0}]
    if model_params and lr > 0:
        groups.append({"params": model_params, "lr": lr, "weight_decay": weight_decay})
    opt = torch.optim.AdamW(groups)
    if teacher is not None:
        teacher.eval()
    cache: dict = {}
    final_start = steps - int(round(final_fraction * steps))
    stream = _cycle(batches)
    bar = None
    if progress:
        try:
            from tqdm.auto import tqdm
            bar = tqdm(total=steps, desc="training flow gates", unit="step", leave=False)
        except ImportError:  # pragma: no cover
            pass
    result = FlowFitResult(model=sm)
    seen: list = []
    sm.train()
    try:
        for step in range(steps):
            if hard_final and step == final_start and gates.select == "threshold":
                calibrate_keep(sm, seen, inputs_of=inputs_of)
                sm.train()
                gates.hard_training = True
                gates.track_keep = track_keep
                opt.param_groups[0]["lr"] = 0.0  # the gates stay as calibrated; the weights adapt to them
            batch = next(stream)
            if len(seen) < 64 and all(b is not batch for b in seen):
                seen.append(batch)
            inputs = inputs_of(batch)
            teacher_out = None
            if teacher is not None:
                key = id(batch)
                if teacher_cache and key in cache:
                    teacher_out = cache[key][1]
                else:
                    with torch.no_grad():
                        teacher_out = _call(teacher, inputs)
                    if teacher_cache:
                        cache[key] = (batch, teacher_out)  # keeps the batch alive, so its id stays unique
            opt.zero_grad(set_to_none=True)
            out = _call(sm, inputs)
            terms = {}
            loss = torch.zeros(())
            if teacher_out is not None:
                terms["distill"] = distill(out, teacher_out, inputs)
                loss = loss + terms["distill"]
            if task_loss is not None:
                terms["task"] = task_loss(out, batch)
                loss = loss + terms["task"]
            if step < final_start:
                terms["penalty"] = sparsity_penalty(gates)
                terms["balance"] = balance_loss(gates)
                loss = loss + penalty * terms["penalty"] + balance * terms["balance"]
            loss.backward()
            opt.step()
            fractions = kept_fractions(gates)
            kept = float(sum(float(f.detach()) for f in fractions.values()) / max(len(fractions), 1))
            record = {"loss": float(loss.detach()), "kept": kept, **{k: float(v.detach()) for k, v in terms.items()}}
            result.history.append(record)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{record['loss']:.4f}", kept=f"{kept:.3f}")
    finally:
        if bar is not None:
            bar.close()
        gates.last_gates.clear()
        gates.last_mix.clear()
        gates.hard_training = False
        gates.track_keep = 0.0
        sm.eval()
    if calibrate:
        result.shifts = calibrate_keep(sm, seen, inputs_of=inputs_of)
    return result

"""What fine-tuning a token-flow model needs: the gate losses, the thresholds, the parameter groups.

As released: the sparsity penalty sum over layers (layer + 1) * (kept fraction - keep)^2 and the
mixture balance term train the gates at their own learning rate (0.1) while the model trains at its
(2e-5); the last `final_fraction` of the steps drop both terms; afterwards `calibrate_keep` sets the
thresholds so the hard decisions keep the target fraction. `flow_hooks` hands these to a training
loop (`sparsecc.train.flow.fit_flow`).
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Optional

import torch
from torch import Tensor, nn

from sparsecc.capture import call_with_inputs
from sparsecc.methods.base import FitHooks
from sparsecc.methods.token_flow.gates import FlowGates, keep_threshold

__all__ = ["balance_loss", "calibrate_keep", "flow_hooks", "kept_fractions", "sparsity_penalty"]


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
                    call_with_inputs(sm, inputs_of(batch))
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


def flow_hooks(config: Any = None, *, gate_lr: float = 0.1, penalty: float = 1.0, balance: float = 0.1,
               final_fraction: float = 0.1) -> FitHooks:
    """The gates as their own parameter group at `gate_lr`; penalty and balance terms until the final phase."""
    def param_groups(sm: nn.Module) -> list:
        return [{"params": list(sm.flow_gates.parameters()), "lr": gate_lr, "weight_decay": 0.0}]

    def loss(sm: nn.Module, step: int, steps: int) -> dict:
        if step >= steps - int(round(final_fraction * steps)):
            return {}
        gates = sm.flow_gates
        return {"penalty": (penalty, sparsity_penalty(gates)), "balance": (balance, balance_loss(gates))}

    return FitHooks(param_groups=param_groups, loss=loss,
                    on_end=lambda sm, batches: calibrate_keep(sm, batches))

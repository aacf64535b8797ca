"""What fine-tuning a token-flow model needs: the gate losses, the thresholds, the parameter groups.

As released (yeachan-kr/sparseflow, solvers/popu_multi_solver.py): the sparsity penalty is, per layer
i, the kept fraction of each example over its non-padding tokens, (kept - keep)^2 averaged over the
batch, weighted by (i + 1), the sum divided by sum(i + 1); the balance term is, per layer, the one-hot
of each example's arg-max mixture averaged over the batch times the mean mixture probabilities,
summed over the mixtures. The gate table trains at its own learning rate (0.1), the mixture router and
the model at the model's (2e-5); the last `final_fraction` of the steps drop both terms; afterwards
`calibrate_keep` sets the thresholds so the hard decisions keep the target fraction. `flow_hooks`
hands these to a training loop (`sparsecc.train.flow.fit_flow`). The forms sparsecc 0.1 used
(`penalty_form="pooled"`: one kept fraction over the whole batch, the weighted sum not normalised;
`balance_form="squares"`: n_mix * sum_m (mean_b w[b, m])^2 - 1; the router at the gate lr) stay
reachable as options.
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


PENALTY_FORMS = ("released", "pooled")
BALANCE_FORMS = ("released", "squares")


def _per_example(g: Tensor, valid: Optional[Tensor]) -> Tensor:
    """[B] kept fraction of each example over its non-padding tokens."""
    if valid is None:
        return g.mean(1)
    v = valid.to(g.dtype)
    return (g * v).sum(1) / v.sum(1).clamp_min(1.0)


def sparsity_penalty(gates: FlowGates, target: Optional[float] = None, form: str = "released") -> Tensor:
    """The gates' distance from their kept-fraction targets; 0 for top-k and capacity gates (a fixed budget).

    form="released": sum_i (i + 1) * mean_b (kept_b,i - keep_i)^2 / sum_i (i + 1), kept_b,i per example
    over its non-padding tokens. form="pooled": sum_i (i + 1) * (kept_i - keep_i)^2 with kept_i over the
    whole batch (sparsecc 0.1; 21x the released value at 6 layers). i counts the layers of each
    stack from 0. target: one for every segment (default: each segment's own, `TokenFlow.keep`)."""
    if form not in PENALTY_FORMS:
        raise ValueError(f"penalty form {form!r} is not known; expected one of {PENALTY_FORMS}")
    if not gates.last_gates or gates.select != "threshold":
        return torch.zeros(())
    weights = _layer_weights(gates)
    targets = gates.keep_targets if target is None else [target] * gates.n_segments
    if form == "pooled":
        return sum(weights[s] * (f - targets[s]) ** 2 for s, f in kept_fractions(gates).items())
    total = sum(weights[s] * ((_per_example(g, valid) - targets[s]) ** 2).mean()
                for s, (g, valid) in gates.last_gates.items())
    return total / sum(weights[s] for s in gates.last_gates)


def balance_loss(gates: FlowGates, form: str = "released") -> Tensor:
    """How unevenly the examples use the gate mixtures (released gates; 0 without a router).

    form="released": per router, sum_m onehot(argmax_m w[b, m]).mean_b * w[b, m].mean_b, mean over
    the routers (the released code has one router, the same value at every layer).
    form="squares": n_mix * sum_m (mean_b w[b, m])^2 - 1 per router, summed (sparsecc 0.1)."""
    if form not in BALANCE_FORMS:
        raise ValueError(f"balance form {form!r} is not known; expected one of {BALANCE_FORMS}")
    if not gates.last_mix:
        return torch.zeros(())
    terms = []
    for mix in gates.last_mix.values():
        p = mix.mean(0)
        if form == "squares":
            terms.append(p.numel() * (p * p).sum() - 1.0)
        else:
            chosen = torch.nn.functional.one_hot(mix.argmax(-1), mix.shape[-1]).to(mix.dtype).mean(0)
            terms.append((chosen * p).sum())
    total = torch.stack(terms)
    return total.sum() if form == "squares" else total.mean()


def calibrate_keep(sm: nn.Module, batches: Iterable[Any], keep: Optional[float] = None,
                   inputs_of: Callable[[Any], Any] = lambda batch: batch, comm: Any = None,
                   run: Optional[nn.Module] = None) -> dict:
    """Set each segment's logit shift so the HARD decisions keep `keep` (default: each segment's target) of the
    non-padding tokens of `batches`, layer after layer (a layer's shift changes the next one's inputs).

    Soft training matches the MEAN gate to the target; hard thresholding at 0.5 keeps the tokens
    whose logit is > 0, which is the same fraction only once the logits have polarised. Only for
    select="threshold" (top-k keeps its budget by construction). Returns segment -> shift.
    With a `sparsecc.distributed.Comm`, over every rank's batches: rank 0 sets each threshold on the
    logits of all ranks, and every rank applies it. run: the module to call in eval mode (default sm; a
    `ShardedModel` of sm, whose hard-gate training graph takes the same decisions, while sm's weights are
    sharded).
    """
    gates: FlowGates = sm.flow_gates
    run = sm if run is None else run
    if gates.select != "threshold":
        return {}
    keeps = gates.keep_targets if keep is None else [keep] * gates.n_segments
    batches = list(batches)
    was_training = run.training
    run.eval()
    shifts = {}
    try:
        for seg in range(gates.n_segments):
            gates.capture = {}
            with torch.no_grad():
                for batch in batches:
                    call_with_inputs(run, inputs_of(batch))
            rows = gates.capture.get(seg, [])
            gates.capture = None
            logits = torch.cat([lg.flatten() for lg, _ in rows]) if rows else torch.zeros(0)
            valid = torch.cat([(torch.ones_like(lg, dtype=torch.bool) if v is None else v).flatten()
                               for lg, v in rows]) if rows else torch.zeros(0, dtype=torch.bool)
            pinned = torch.cat([torch.zeros_like(lg, dtype=torch.bool).index_fill_(1, torch.tensor([0]),
                                                                                 gates.pin_first).flatten()
                                for lg, _ in rows]) & valid if rows else valid.clone()
            if comm is not None:
                seen = comm.gather((logits, valid, pinned), dst=0)
                threshold = None
                if comm.rank == 0 and any(v.numel() for _, v, _ in seen):
                    logits, valid, pinned = (torch.cat(parts) for parts in zip(*seen))
                    threshold = keep_threshold(logits, valid, pinned, keeps[seg])
                threshold = comm.broadcast(threshold)
            else:
                threshold = keep_threshold(logits, valid, pinned, keeps[seg]) if rows else None
            if threshold is None:
                continue
            gates.shift[seg] -= threshold
            shifts[seg] = float(gates.shift[seg])
    finally:
        gates.capture = None
        run.train(was_training)
    return shifts


def flow_hooks(config: Any = None, *, gate_lr: float = 0.1, router_lr: Optional[float] = None,
               penalty: float = 1.0, balance: float = 1.0, final_fraction: float = 0.05,
               penalty_form: str = "released", balance_form: str = "released") -> FitHooks:
    """The gate table (and content scorers) as the "gates" group at `gate_lr`; the mixture routers as the
    "routers" group at `router_lr` (None: the model's lr, as released); penalty and balance terms until
    the final phase (released: the last of 20 epochs, 0.05)."""
    if penalty_form not in PENALTY_FORMS or balance_form not in BALANCE_FORMS:
        raise ValueError(f"penalty_form must be one of {PENALTY_FORMS} and balance_form one of {BALANCE_FORMS}; "
                         f"got {penalty_form!r}, {balance_form!r}")

    def param_groups(sm: nn.Module, model_lr: float = 2e-5) -> list:
        gates = sm.flow_gates
        routers = list(gates.routers.parameters()) if hasattr(gates, "routers") else []
        own = {id(p) for p in routers}
        table = [p for p in gates.parameters() if id(p) not in own]
        groups = [{"params": table, "lr": gate_lr, "weight_decay": 0.0, "role": "gates"}]
        if routers:
            groups.append({"params": routers, "lr": model_lr if router_lr is None else router_lr,
                           "weight_decay": 0.0, "role": "routers"})
        return [g for g in groups if g["params"]]

    def loss(sm: nn.Module, step: int, steps: int) -> dict:
        if step >= steps - int(round(final_fraction * steps)):
            return {}
        gates = sm.flow_gates
        return {"penalty": (penalty, sparsity_penalty(gates, form=penalty_form)),
                "balance": (balance, balance_loss(gates, form=balance_form))}

    return FitHooks(param_groups=param_groups, loss=loss,
                    on_end=lambda sm, batches: calibrate_keep(sm, batches))

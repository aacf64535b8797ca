"""SparseFlow training: the losses and a small fit helper.

    sm = sparsecc.compile(model, inputs, recipe=sparsecc.Recipe(flow=sparsecc.TokenFlow(keep=0.5)))
    result = fit_flow(sm, batches, teacher=model, steps=500)      # distil the gates (and the weights)
    sm.eval()                                                       # gather / scatter inference

Loss per step (as released): task loss (optional, `task_loss(out, batch)`) + distillation to the dense
teacher's outputs (`distill(student_out, teacher_out, batch)`; default KL(teacher || student) on
`.logits`, else a token-level cosine on the first output) + `penalty` * the sparsity penalty (per
example kept fractions, layer-weighted mean: `sparsecc.methods.token_flow.fit.sparsity_penalty`) +
`balance` * the mixture balance term (released gates). AdamW (eps 1e-8) with the gate table at
`gate_lr` (0.1), the mixture router and the model at `lr` (2e-5), all under one warm-up + cosine
schedule over the steps (`sparsecc.train.optim`); the last `final_fraction` of the steps drop the
penalty and balance terms. Training runs the soft-gate graph of the FlowSparseModel
(Gumbel-sigmoid gates, temperature from the recipe); nothing of the user's model changes.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Optional

import torch
from torch import Tensor, nn

from sparsecc import distributed
from sparsecc.capture import call_with_inputs
from sparsecc.errors import InputError
from sparsecc.methods.token_flow.fit import calibrate_keep, flow_hooks, kept_fractions
from sparsecc.methods.token_flow.gates import FlowGates
from sparsecc.train.losses import output_distill
from sparsecc.train.batches import cycle
from sparsecc.train.optim import Schedule, make_optimizer, param_groups
from sparsecc.train.parallel import data_parallel, fully_shard_blocks

log = logging.getLogger("sparsecc.train.flow")

__all__ = ["FlowFitResult", "fit_flow"]


@dataclass
class FlowFitResult:
    model: nn.Module
    history: list = field(default_factory=list)  # per step: {"loss", "distill", "task", "penalty", "balance", "kept"}
    shifts: dict = field(default_factory=dict)  # segment -> logit shift set by calibrate_keep

    @property
    def losses(self) -> list[float]:
        return [h["loss"] for h in self.history]


def fit_flow(sm: nn.Module, batches: Iterable[Any], *, steps: int, teacher: Optional[nn.Module] = None,
             distill: Optional[Callable[[Any, Any, Any], Tensor]] = None,
             task_loss: Optional[Callable[[Any, Any], Tensor]] = None,
             inputs_of: Callable[[Any], Any] = lambda batch: batch, lr: float = 2e-5, gate_lr: float = 0.1,
             router_lr: Optional[float] = None, penalty: float = 1.0, balance: float = 1.0,
             final_fraction: float = 0.05, weight_decay: float = 0.0, schedule: str = "cosine", warmup: int = 0,
             penalty_form: str = "released", balance_form: str = "released",
             train_model: bool = True, teacher_cache: bool = True, calibrate: bool = True,
             hard_final: bool = False, track_keep: float = 0.1, ddp: Optional[dict] = None,
             fsdp: Optional[dict] = None, progress: bool = True) -> FlowFitResult:
    """Train the gates (and, with train_model, the weights) of a token-flow `FlowSparseModel` in place.

    batches: an iterable (cycled) of batches; inputs_of(batch) -> the model inputs (a dict of keyword
    inputs, a tuple, a tensor). teacher: the dense model whose outputs are distilled (never modified);
    distill(student_out, teacher_out, inputs) -> loss (default `output_distill`); task_loss(out, batch)
    -> loss, for labelled data. teacher_cache: keep the teacher outputs of each distinct batch object.
    lr / gate_lr / router_lr (None: lr): the model's, the gate table's and the mixture router's learning
    rates; schedule ("cosine", "linear", "constant") with `warmup` warm-up steps scales all three.
    penalty_form / balance_form: "released" (default) or sparsecc 0.1's "pooled" / "squares"; to train
    as sparsecc 0.1 did: router_lr=0.1, schedule="constant", penalty_form="pooled",
    balance_form="squares", balance=0.1, final_fraction=0.1.
    calibrate: at the end, set the thresholds so the hard gates keep the target fraction on the
    training batches (`calibrate_keep`; threshold gates only).
    hard_final: (threshold gates, not as released) calibrate at the start of the final phase, then
    freeze the gates and train the weights on their hard decisions, so the weights adapt to the
    tokens inference will keep; as released, the soft gates drift open once the penalty is off
    (the longer the run, the further: prefer hard_final past a few hundred steps).
    track_keep: in the hard final phase, each step moves every threshold this fraction of the way to
    the one that keeps the target on the batch: content scores move as the weights train, and with
    frozen thresholds the kept fraction drifts away from the target (0 freezes them).
    Under torch.distributed (more than one process) every rank passes its own shard of every batch: the
    model trains under DistributedDataParallel (`ddp`: its keyword options; find_unused_parameters is on
    by default with hard_final, whose frozen gates get no gradient), the thresholds are set on the
    logits of every rank (the hard phase's tracking moves them by the mean over the ranks), and the history
    holds the means over the ranks. fsdp: FSDP2's options, to train sharded instead, one group per block
    (`sparsecc.train.parallel.fully_shard_blocks`: the gates stay whole on every rank, their gradients
    averaged); the weights are gathered back into `sm` at the end, on every rank.
    Returns the model (in eval mode: the gather / scatter graph) and the per-step history.
    """
    gates: FlowGates = sm.flow_gates
    if teacher is None and task_loss is None:
        raise ValueError("fit_flow needs a teacher (dense model to distil from) or a task_loss, or both")
    distill = distill or output_distill
    hooks = flow_hooks(gate_lr=gate_lr, router_lr=router_lr, penalty=penalty, balance=balance,
                       final_fraction=final_fraction, penalty_form=penalty_form, balance_form=balance_form)
    if fsdp is not None and ddp is not None:
        raise InputError("fit_flow: pass ddp= or fsdp=, not both (FSDP2 shards the model DDP would replicate)")
    roles = {g["role"]: (g["params"], g["lr"]) for g in hooks.param_groups(sm, lr)}
    # what trains: sm under DDP (or alone), or its blocks sharded with FSDP2
    model = fully_shard_blocks(sm, **fsdp) if fsdp is not None else sm
    groups = param_groups(model, roles, model_lr=lr if train_model else None, weight_decay=weight_decay)
    opt = make_optimizer(groups)
    sched = Schedule(steps=steps, warmup=warmup, kind=schedule).attach(opt)
    comm = distributed.current()
    trained = model if fsdp is not None else data_parallel(sm, {"find_unused_parameters": hard_final, **(ddp or {})})
    if teacher is not None:
        teacher.eval()
    cache: dict = {}
    final_start = steps - int(round(final_fraction * steps))
    stream = cycle(batches, "fit_flow")
    bar = None
    if progress and (comm is None or comm.rank == 0):
        try:
            from tqdm.auto import tqdm
            bar = tqdm(total=steps, desc="training flow gates", unit="step", leave=False)
        except ImportError:  # pragma: no cover
            pass
    result = FlowFitResult(model=sm)
    seen: list = []
    model.train()
    try:
        for step in range(steps):
            if hard_final and step == final_start and gates.select == "threshold":
                calibrate_keep(sm, seen, inputs_of=inputs_of, comm=comm, run=model)
                model.train()
                gates.hard_training = True
                gates.track_keep = track_keep
                for g in opt.param_groups:  # the gates stay as calibrated; the weights adapt to them
                    if g["role"] in ("gates", "routers"):
                        g["base_lr"] = g["lr"] = 0.0
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
                        teacher_out = call_with_inputs(teacher, inputs)
                    if teacher_cache:
                        cache[key] = (batch, teacher_out)  # keeps the batch alive, so its id stays unique
            opt.zero_grad(set_to_none=True)
            out = call_with_inputs(trained, inputs)
            terms = {}
            loss = torch.zeros(())
            if teacher_out is not None:
                terms["distill"] = distill(out, teacher_out, inputs)
                loss = loss + terms["distill"]
            if task_loss is not None:
                terms["task"] = task_loss(out, batch)
                loss = loss + terms["task"]
            for name, (weight, term) in hooks.loss(sm, step, steps).items():
                terms[name] = term
                loss = loss + weight * term
            loss.backward()
            opt.step()
            sched.step()
            if comm is not None and gates.hard_training and gates.track_keep > 0:
                comm.average_(gates.shift)  # each rank tracked the target on its shard
            fractions = kept_fractions(gates)
            kept = float(sum(float(f.detach()) for f in fractions.values()) / max(len(fractions), 1))
            record = {"loss": float(loss.detach()), "kept": kept, **{k: float(v.detach()) for k, v in terms.items()}}
            if comm is not None:
                record = comm.mean(record)
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
        model.eval()
        sm.eval()
    if fsdp is not None:
        model.gather_into(sm)
    if calibrate:
        result.shifts = calibrate_keep(sm, seen, inputs_of=inputs_of, comm=comm)
    return result

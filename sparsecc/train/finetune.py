"""`sparsecc.finetune`: recover a compiled model's quality by distillation from its dense teacher.

    sm = sparsecc.compile(model, inputs, recipe=...)
    result = sparsecc.finetune(sm, batches, teacher=model, steps=300, eval_batches=held_out, eval_every=50,
                               checkpoint="runs/ft")            # resumable: run it again after an interruption
    result.best_step, result.evals                                # the model holds the best evaluated weights

One loop for every recipe. Each method of the recipe contributes through its fine-tuning hooks
(`Method.fit_hooks`: its own parameter groups and learning rates, extra loss terms, a callback per
step and one at the end, e.g. token flow's gate table, sparsity and balance terms and its threshold
calibration); every other parameter of the compiled graph (weights, sparse-FFN controllers, ...) is
the "model" group at `lr`. Block layouts stay fixed: the block-sparse op trains the weights through
them. Loss: the distance of the student's outputs to the teacher's on the same batch - KL on logits,
cosine on hidden states for encoders without a head (`loss="auto"`), or "kl", "cosine", "mse", or a
callable(student_out, teacher_out, inputs) -> scalar. AdamW under one warm-up + cosine/linear/constant
schedule (`sparsecc.train.optim`).

Every `eval_every` steps the mean loss on `eval_batches` is measured in inference mode (the graph the
model serves, e.g. token flow's hard gates); the best weights are kept and restored at the end. With
`checkpoint=DIR` the whole state (weights, optimizer, schedule, random generators, history, best) is
written there atomically every `checkpoint_every` steps; calling finetune again with the same
arguments resumes from it, equal to a run that was never interrupted, provided `batches` yields the
same sequence again (a list, or a loader with a seeded order). The teacher is only called, under
no_grad; its parameters and train/eval mode are left as they were. Under torch.distributed every rank
passes its own shard of each batch and the model trains under DistributedDataParallel (with
find_unused_parameters: a loss on the hidden states leaves a pooler without gradient; `ddp` overrides);
rank 0 writes the checkpoints. With `fsdp={...}` (FSDP2's `fully_shard` options; `{}` for its defaults)
it trains sharded instead, one FSDP2 group per block (`sparsecc.train.parallel.fully_shard_blocks`):
each rank holds 1/world of the weights and optimizer state; the checkpoint's weights and optimizer
state are a torch.distributed.checkpoint folder every rank writes its shards into (the rest of the
state, rank 0); at the end the trained (best) weights are gathered into `sm` on every rank (while it
trains, `sm` holds no weights of its own: a run that raises leaves it so; resume from the checkpoint).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sparsecc import distributed
from sparsecc.capture import call_with_inputs
from sparsecc.errors import InputError, UnsupportedError
from sparsecc.io import atomic_write
from sparsecc.methods.base import FitHooks
from sparsecc.methods.registry import handler_for
from sparsecc.train.losses import first_float_tensor, hidden_distill, kl_distill, output_distill
from sparsecc.train.batches import cycle
from sparsecc.train.optim import SCHEDULES, Schedule, make_optimizer, param_groups
from sparsecc.train.parallel import data_parallel, fill_parameters, fully_shard_blocks

log = logging.getLogger("sparsecc.train.finetune")

__all__ = ["FinetuneResult", "finetune"]

CHECKPOINT_FILE = "finetune.pt"
SHARDS = "finetune-step{}.dcp"  # the FSDP2 run's weights and optimizer state at a step (a dcp folder)
LOSSES = ("auto", "kl", "cosine", "mse")


@dataclass
class FinetuneResult:
    model: nn.Module
    history: list = field(default_factory=list)  # per step: {"loss", "distill", <method terms>, "lr"}
    evals: list = field(default_factory=list)  # [{"step", "loss"}] on eval_batches (step: steps done; 0: before)
    best_step: Optional[int] = None  # the evaluated step whose weights the model holds (None: no evaluation)
    best_loss: Optional[float] = None
    resumed_from: int = 0  # the step a checkpoint resumed from (0: a fresh run)

    @property
    def losses(self) -> list[float]:
        return [h["loss"] for h in self.history]


def _distance(loss: Union[str, Callable]) -> Callable[[Any, Any, Any], Tensor]:
    if callable(loss):
        return loss
    if loss not in LOSSES:
        raise InputError(f"finetune: loss={loss!r} is not known; expected one of {LOSSES} or a callable "
                         "(student_out, teacher_out, inputs) -> scalar tensor")
    if loss == "auto":
        return output_distill

    def distance(student_out: Any, teacher_out: Any, inputs: Any) -> Tensor:
        s, t = getattr(student_out, "logits", None), getattr(teacher_out, "logits", None)
        if loss == "kl":
            if s is None or t is None:
                raise InputError("finetune: loss='kl' needs outputs with .logits; use loss='cosine' or 'mse' for "
                                 "models without a head")
            return kl_distill(s.reshape(-1, s.shape[-1]), t.reshape(-1, t.shape[-1]))
        s, t = (first_float_tensor(student_out), first_float_tensor(teacher_out)) if s is None or t is None else (s, t)
        if loss == "mse":
            return F.mse_loss(s, t)
        mask = inputs.get("attention_mask") if isinstance(inputs, dict) else None
        return hidden_distill(s, t, mask)

    return distance


def _method_hooks(sm: nn.Module) -> list[FitHooks]:
    """The fine-tuning hooks of every method config in the compiled model's recipe."""
    configs = []
    for slot in ("attention", "ffn", "flow"):
        for config in sm.recipe.configs(slot):  # one config, or each of a per-layer mapping's
            if all(config != c for c in configs):
                configs.append(config)
    hooks = []
    for config in configs:
        made = handler_for(config).fit_hooks(config)
        if made is not None:
            hooks.append(made)
    return hooks


def _check(sm: nn.Module, teacher: Optional[nn.Module], steps: int, schedule: str, lr: float) -> None:
    if not hasattr(sm, "graph_module") or not hasattr(sm, "recipe"):
        raise InputError(f"finetune: expected a model compiled by sparsecc.compile, got {type(sm).__name__}; "
                         "compile it first (sm = sparsecc.compile(model, inputs, recipe=...))")
    if sm.backend != "eager":
        raise UnsupportedError(f"finetune: the model was compiled for backend={sm.backend!r}, which does not train; "
                               "fine-tune the backend='eager' model, then compile again with plans=sm.plans (or "
                               "save and load it) for the backend you serve with")
    if teacher is None or teacher is sm:
        raise InputError("finetune distils from the dense model: pass teacher=<the model you compiled> (it is only "
                         "called, never changed)")
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
        raise InputError(f"finetune: steps must be a positive int, got {steps!r}")
    if not lr > 0:
        raise InputError(f"finetune: lr must be positive, got {lr!r}")
    if schedule not in SCHEDULES:
        raise InputError(f"finetune: schedule={schedule!r} is not known; expected one of {SCHEDULES}")


def _cpu_copy(state: dict) -> dict:
    return {k: v.detach().to("cpu", copy=True) for k, v in state.items()}


# ------------------------------------------------------------------ FSDP2 state
def _save_shards(sharded: nn.Module, opt: torch.optim.Optimizer, checkpoint: str, step: int, comm: Any) -> str:
    """Every rank writes its shards of the weights and optimizer state into a temporary folder, which rank 0
    renames once all are written; returns the folder's name (inside `checkpoint`). A collective."""
    import shutil

    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, get_model_state_dict
    name = SHARDS.format(step)
    final, tmp = os.path.join(checkpoint, name), os.path.join(checkpoint, name + ".tmp")
    if comm.rank == 0:
        os.makedirs(checkpoint, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
    comm.barrier()
    # the weights under the SparseModel's parameter names (buffers are plan data, saved with the plans), so
    # sparsecc.load(..., checkpoint=<this folder>) and load_checkpoint read them on one process
    weights = {sharded.names[k]: v for k, v in get_model_state_dict(sharded).items() if k in sharded.names}
    dcp.save({"model": weights, "optimizer": get_optimizer_state_dict(sharded, opt)}, checkpoint_id=tmp)
    comm.barrier()
    if comm.rank == 0:
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
    comm.barrier()
    return name


def _load_shards(sharded: nn.Module, opt: torch.optim.Optimizer, folder: str) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (get_model_state_dict, get_optimizer_state_dict,
                                                         set_model_state_dict, set_optimizer_state_dict)
    from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
    own = get_model_state_dict(sharded)
    state = {"model": {sharded.names[k]: v for k, v in own.items() if k in sharded.names},
             "optimizer": get_optimizer_state_dict(sharded, opt)}
    # partial: get_optimizer_state_dict gives every parameter AdamW state, the saved run only those that had
    # gradients (a pooler the loss does not read has none, and keeps none that matters: it gets no gradient)
    dcp.load(state, checkpoint_id=folder, planner=DefaultLoadPlanner(allow_partial_load=True))
    set_model_state_dict(sharded, {k: state["model"][sharded.names[k]] if k in sharded.names else v
                                   for k, v in own.items()})
    set_optimizer_state_dict(sharded, opt, state["optimizer"])


def _remove_other_shards(checkpoint: str, keep: str) -> None:
    import shutil
    for name in os.listdir(checkpoint):
        if name.startswith("finetune-step") and name.endswith(".dcp") and name != keep:
            shutil.rmtree(os.path.join(checkpoint, name), ignore_errors=True)


def finetune(sm: nn.Module, batches: Iterable[Any], teacher: Optional[nn.Module] = None, *, steps: int,
             lr: float = 2e-5, loss: Union[str, Callable] = "auto", eval_batches: Optional[Iterable[Any]] = None,
             eval_every: Optional[int] = None, checkpoint: Optional[str] = None,
             checkpoint_every: Optional[int] = None, resume: bool = True, keep_best: bool = True,
             schedule: str = "cosine", warmup: int = 0, weight_decay: float = 0.0,
             inputs_of: Callable[[Any], Any] = lambda batch: batch, teacher_cache: bool = True,
             ddp: Optional[dict] = None, fsdp: Optional[dict] = None, progress: bool = True) -> FinetuneResult:
    """Distil `teacher`'s outputs into the compiled model `sm`, in place; see the module docstring.

    batches: iterable (cycled) of batches; inputs_of(batch) -> the model inputs (dict of keyword inputs,
    tuple, tensor). eval_batches / eval_every: held-out batches and how often (in steps; default: steps//10,
    at least 1) their mean loss is measured; the weights of the best evaluation are kept (keep_best).
    checkpoint: a directory for resumable state, written every checkpoint_every steps (default: eval_every,
    else steps//10) and at the end; resume=False starts over (the old state is replaced).
    ddp / fsdp: under torch.distributed, DistributedDataParallel's options, or FSDP2's (training sharded).
    Returns a FinetuneResult; the model is left in eval mode.
    """
    _check(sm, teacher, steps, schedule, lr)
    distance = _distance(loss)
    comm = distributed.current()
    every = eval_every or max(1, steps // 10)
    save_every = checkpoint_every or (eval_every or max(1, steps // 10))
    eval_list = list(eval_batches) if eval_batches is not None else None

    hooks = _method_hooks(sm)
    model: nn.Module = sm  # what trains: sm itself, or its blocks sharded with FSDP2
    if fsdp is not None:
        model = fully_shard_blocks(sm, **fsdp)
    roles: dict = {}
    for h in hooks:
        if h.param_groups is not None:
            for g in h.param_groups(sm, lr):
                roles.setdefault(g["role"], (g["params"], g["lr"]))
    opt = make_optimizer(param_groups(model, roles, model_lr=lr, weight_decay=weight_decay))
    sched = Schedule(steps=steps, warmup=warmup, kind=schedule).attach(opt)
    result = FinetuneResult(model=sm)
    best_state: Optional[dict] = None

    path = os.path.join(checkpoint, CHECKPOINT_FILE) if checkpoint else None
    start = 0
    if path is not None and resume and os.path.exists(path):
        state = torch.load(path, map_location="cpu", weights_only=False)
        if state.get("steps") != steps:
            raise InputError(f"finetune: the checkpoint in {checkpoint} is of a run of {state.get('steps')} steps, "
                             f"this call asks for {steps}; pass the same steps to resume, or resume=False to start "
                             "over")
        if fsdp is None:
            sm.load_state_dict(state["model"])
            opt.load_state_dict(state["optimizer"])  # new param_group dicts: the schedule must drive these
        else:
            _load_shards(model, opt, os.path.join(checkpoint, state["shards"]))
        sched = Schedule(steps=steps, warmup=warmup, kind=schedule, step_count=state["step"]).attach(opt)
        torch.set_rng_state(state["rng"])
        result.history, result.evals = state["history"], state["evals"]
        result.best_step, result.best_loss, best_state = state["best_step"], state["best_loss"], state["best_model"]
        start = result.resumed_from = state["step"]
        log.info("finetune: resumed from step %d of %d (%s)", start, steps, path)

    teacher_mode = teacher.training
    teacher.eval()
    # outputs the loss does not read (a pooler beside the hidden states) leave parameters without gradient
    trained = model if fsdp is not None else data_parallel(sm, {"find_unused_parameters": True, **(ddp or {})})
    cache: dict = {}
    seen: list = []

    def teacher_out(batch: Any, inputs: Any) -> Any:
        key = id(batch)
        if teacher_cache and key in cache:
            return cache[key][1]
        with torch.no_grad():
            out = call_with_inputs(teacher, inputs)
        if teacher_cache:
            cache[key] = (batch, out)  # keeps the batch alive, so its id stays unique
        return out

    def evaluate() -> float:
        model.eval()
        with torch.no_grad():
            values = [float(distance(call_with_inputs(model, inputs_of(b)), teacher_out(b, inputs_of(b)),
                                     inputs_of(b))) for b in eval_list]
        model.train()
        value = sum(values) / len(values)
        return comm.mean({"loss": value})["loss"] if comm is not None else value

    def record_eval(done: int) -> None:
        nonlocal best_state
        value = evaluate()
        result.evals.append({"step": done, "loss": value})
        if result.best_loss is None or value < result.best_loss:
            result.best_step, result.best_loss = done, value
            if keep_best:
                best_state = _cpu_copy(sm.state_dict() if fsdp is None else model.full_parameters())

    def save(step: int) -> None:
        if path is None:
            return
        shards = _save_shards(model, opt, checkpoint, step, comm) if fsdp is not None else None
        if comm is not None and comm.rank != 0:
            return
        state = {"steps": steps, "step": step, "model": None if shards else _cpu_copy(sm.state_dict()),
                 "optimizer": None if shards else opt.state_dict(), "shards": shards,
                 "rng": torch.get_rng_state(), "history": result.history, "evals": result.evals,
                 "best_step": result.best_step, "best_loss": result.best_loss, "best_model": best_state}
        atomic_write(path, lambda tmp: torch.save(state, tmp))
        if shards:  # the state file now names this step's folder: the older ones are not needed
            _remove_other_shards(checkpoint, keep=shards)

    stream = cycle(batches, "finetune")
    for _ in range(start):  # the batches the interrupted run already used
        seen_batch = next(stream)
        if len(seen) < 64 and all(b is not seen_batch for b in seen):
            seen.append(seen_batch)
    bar = None
    if progress and (comm is None or comm.rank == 0):
        try:
            from tqdm.auto import tqdm
            bar = tqdm(total=steps, initial=start, desc="fine-tuning", unit="step", leave=False)
        except ImportError:  # pragma: no cover
            pass
    model.train()
    try:
        if eval_list and start == 0:  # the starting point: what training changed, and the weights to beat
            record_eval(0)
        for step in range(start, steps):
            for h in hooks:
                if h.on_step is not None:
                    h.on_step(sm, step, steps)
            batch = next(stream)
            if len(seen) < 64 and all(b is not batch for b in seen):
                seen.append(batch)
            inputs = inputs_of(batch)
            target = teacher_out(batch, inputs)
            opt.zero_grad(set_to_none=True)
            out = call_with_inputs(trained, inputs)
            terms = {"distill": distance(out, target, inputs)}
            total = terms["distill"]
            for h in hooks:
                if h.loss is not None:
                    for name, (weight, term) in h.loss(sm, step, steps).items():
                        terms[name] = term
                        total = total + weight * term
            total.backward()
            opt.step()
            sched.step()
            record = {"loss": float(total.detach()), **{k: float(v.detach()) for k, v in terms.items()},
                      "lr": opt.param_groups[-1]["lr"]}
            result.history.append(comm.mean(record) if comm is not None else record)
            done = step + 1
            if eval_list and (done % every == 0 or done == steps):
                record_eval(done)
            if done % save_every == 0 or done == steps:
                save(done)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{record['loss']:.4f}", **({"eval": f"{result.evals[-1]['loss']:.4f}"}
                                                                   if result.evals else {}))
    finally:
        if bar is not None:
            bar.close()
        teacher.train(teacher_mode)
        model.eval()
        sm.eval()
    restore_best = keep_best and best_state is not None and result.best_step != steps
    if fsdp is not None and not restore_best:
        model.gather_into(sm)  # a collective: every rank takes the same branch (evaluations are rank means)
    if restore_best:
        if fsdp is None:
            sm.load_state_dict(best_state)
        else:
            fill_parameters(sm, best_state)
        log.info("finetune: kept the weights of step %d (eval loss %.4g)", result.best_step, result.best_loss)
    for h in hooks:
        if h.on_end is not None:
            h.on_end(sm, seen)
    return result

"""SPION training: dense warm-up, the switch criterion, then sparse training with fixed layouts.

    schedule = SpionSchedule(Spion(method="spion_cf", block=64), check_every=500)
    result = fit(model, batches, loss_fn, steps=10_000, schedule=schedule, inputs_of=lambda b: b[0])
    result.model            # a SparseModel after the switch (the dense copy before it)

Every `check_every` dense steps the mean attention map of every layer is taken on
a probe batch and fed to `SwitchCriterion` (as released: the third map against the
first, then consecutive ones, switch when int(delta) < 15 % for every layer). At the
switch, layouts are generated once from maps on the calibration batches, the model is
compiled with them, and training continues on the compiled model with the same AdamW
state (moments carried over by parameter name) and the learning-rate schedule started
again, as released. `max_dense_steps` caps the dense phase (with a warning); a run that
never switches says so. `FitResult.switch_reason` records when and why.
"""

from __future__ import annotations

import copy
import logging
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Optional

import torch
from torch import nn

from sparsecc import distributed
from sparsecc.errors import InputError
from sparsecc.methods.spion import Spion
from sparsecc.methods.spion.layouts import SwitchCriterion
from sparsecc.recipe import Recipe
from sparsecc.train.batches import cycle
from sparsecc.train.optim import Schedule, move_optimizer_state
from sparsecc.train.parallel import data_parallel, full_state, fully_shard_blocks, fully_shard_layers

log = logging.getLogger("sparsecc.train")


@dataclass
class SpionSchedule:
    spion: Any = field(default_factory=Spion)  # the attention config at the switch: Spion, or Fixed for a baseline
    check_every: int = 500  # E: steps between attention-map checks (the paper: 500, or 200)
    threshold_pct: float = 15.0  # switch when every layer's delta is below this
    rule: str = "released"  # SwitchCriterion rule: "released" (A3 vs A1, int(delta)) or "consecutive"
    max_dense_steps: Optional[int] = None  # switch here at the latest (warns)
    calibration_batches: int = 4  # batches whose attention maps make the layouts at the switch


@dataclass
class FitResult:
    model: nn.Module
    losses: list = field(default_factory=list)
    switched_at: Optional[int] = None
    switch_reason: str = ""  # why the switch came then (or why it never did)
    deltas: list = field(default_factory=list)  # per check: {layer: delta %}


class _MapProbe:
    """Mean attention maps of the current weights: capture once, reload weights at each check."""

    def __init__(self, model: nn.Module, example_inputs: Any):
        from sparsecc.api import analyze
        a = analyze(model, example_inputs)
        self.captured = a.captured
        self.regions = [r for r in a.ctx.regions if r.kind == "attention" and not r.cross]

    def maps(self, model: nn.Module, batches: list, comm: Optional[distributed.Comm] = None,
             state: Optional[dict] = None) -> dict:
        """state: the weights to load (default: model.state_dict(); a sharded model's gathered state)."""
        from sparsecc.calibrate import collect_attention_maps
        self.captured.gm.load_state_dict(model.state_dict() if state is None else state, strict=False)
        return collect_attention_maps(self.captured, self.captured.gm, self.regions, batches, progress=False,
                                      comm=comm)


def fit(model: nn.Module, batches: Iterable[Any], loss_fn: Callable[[nn.Module, Any], torch.Tensor], *,
        steps: int, lr: float = 1e-3, weight_decay: float = 0.01, schedule: Optional[SpionSchedule] = None,
        inputs_of: Callable[[Any], Any] = lambda batch: batch[0], optimizer: Optional[Callable] = None,
        lr_schedule: str = "constant", warmup: int = 0, ddp: Optional[dict] = None,
        fsdp: Optional[dict] = None, progress: bool = True) -> FitResult:
    """Train a copy of `model` for `steps` steps; with a SPION schedule, switch to sparse attention.

    loss_fn(module, batch) -> scalar loss; inputs_of(batch) -> the model inputs of a batch (used to
    capture and calibrate). optimizer(params) -> a torch optimizer (default AdamW(lr, weight_decay)).
    lr_schedule ("constant", "cosine", "linear") with `warmup` steps, over the dense phase and again
    from the switch over the steps left. The caller's model is not modified.

    Under torch.distributed (more than one process) every rank passes its own shard of every batch:
    the model trains under DistributedDataParallel (`ddp`: its keyword options, e.g.
    find_unused_parameters), the attention maps of the switch checks are summed over the ranks and
    rank 0's decision holds for all, the layouts at the switch are calibrated on every rank's recent
    batches (compile's distributed calibration), and `losses` are the mean over the ranks. With equal
    shards: the run of one process on the whole batches up to float rounding, and bit for bit the run
    of one process whose loss averages the shards' losses (their gradients accumulated).
    With `fsdp={...}` (FSDP2's `fully_shard` options; `{}` for its defaults) the model trains sharded
    instead: the dense model one FSDP2 group per numbered block (`fully_shard_layers`), the compiled model
    after the switch the same (`fully_shard_blocks`), AdamW's sharded moments carried across the switch.
    The checks and the switch read the weights gathered (every rank holds them whole for that moment);
    the result's model is the compiled (or dense) model with the trained weights, on every rank.
    """
    import sparsecc

    make_opt = optimizer or (lambda params: torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay))
    comm = distributed.current()
    current: nn.Module = copy.deepcopy(model).train()
    sharded: Optional[nn.Module] = None  # under fsdp: what trains (current's weights live there)
    if fsdp is not None:
        if ddp is not None:
            raise InputError("fit: pass ddp= or fsdp=, not both")
        sharded = fully_shard_layers(current, **fsdp)
    trained = sharded if sharded is not None else data_parallel(current, ddp)
    opt = make_opt(trained.parameters())
    sched = Schedule(steps=steps, warmup=warmup, kind=lr_schedule).attach(opt)
    result = FitResult(model=current)
    stream = cycle(batches, "fit")
    probe, criterion, recent = None, None, []
    if schedule is not None:
        criterion = SwitchCriterion(threshold_pct=schedule.threshold_pct, rule=schedule.rule)
    bar = None
    if progress and (comm is None or comm.rank == 0):
        try:
            from tqdm.auto import tqdm
            bar = tqdm(total=steps, desc="training (dense)", unit="step", leave=False)
        except ImportError:  # pragma: no cover
            pass
    for step in range(steps):
        batch = next(stream)
        recent.append(batch)
        recent = recent[-max(1, schedule.calibration_batches if schedule else 1):]
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(trained, batch)
        loss.backward()
        opt.step()
        sched.step()
        result.losses.append(float(loss.detach()) if comm is None else comm.mean(float(loss.detach())))
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{result.losses[-1]:.4f}")
        if schedule is None or result.switched_at is not None:
            continue
        due = (step + 1) % schedule.check_every == 0
        forced = schedule.max_dense_steps is not None and step + 1 >= schedule.max_dense_steps
        if not (due or forced):
            continue
        current.eval()
        whole = full_state(current) if fsdp is not None else None  # a collective: every rank is here
        if probe is None:  # captures the model's structure; weights are loaded at each check
            probe = _MapProbe(_plain_copy(model, whole) if whole is not None else current, inputs_of(batch))
        stable = False
        if due:
            maps = probe.maps(current, [inputs_of(recent[-1])], comm, state=whole)
            if comm is None:
                stable = criterion.update(maps)
            else:  # rank 0 saw every rank's maps: its decision holds for all
                stable = criterion.update(maps) if comm.rank == 0 else False
                stable, criterion.deltas, criterion.steps = comm.broadcast(
                    (stable, dict(criterion.deltas), criterion.steps))
            result.deltas.append(dict(criterion.deltas))
        if stable or forced:
            worst = (f"{max(criterion.deltas.values()):.1f} %" if criterion.deltas
                     else "none yet: a delta needs three checks")
            if stable:
                result.switch_reason = (f"step {step + 1}: every layer's attention-map delta below "
                                        f"{schedule.threshold_pct:g} % ({criterion.rule} rule; largest {worst})")
            else:
                result.switch_reason = (f"step {step + 1}: max_dense_steps={schedule.max_dense_steps} reached before "
                                        f"the {criterion.rule} rule held (largest delta at the last check: "
                                        f"{worst}; threshold {schedule.threshold_pct:g} %)")
                warnings.warn(f"SPION: switching to sparse attention because {result.switch_reason}", stacklevel=2)
            calibration = [inputs_of(b) for b in recent]
            log.info("switching to sparse attention: %s", result.switch_reason)
            old = dict(trained.named_parameters() if sharded is not None else current.named_parameters())
            dense = _plain_copy(model, whole) if whole is not None else current
            current = sparsecc.compile(dense, inputs_of(batch), recipe=Recipe(attention=schedule.spion, ffn=None),
                                       calibration=calibration, check=False)
            if fsdp is not None:
                sharded = fully_shard_blocks(current, **fsdp)
                new = {sharded.names[k]: p for k, p in sharded.named_parameters()}
            else:
                new = dict(current.named_parameters())
            # as released: AdamW keeps its moments, the learning-rate schedule starts again
            carried, fresh = move_optimizer_state(opt, old, new)
            if fresh:
                log.info("SPION switch: %d parameters start with a fresh optimizer state (%s ...)", len(fresh),
                         fresh[0])
            trained = sharded if sharded is not None else data_parallel(current, ddp)
            sched.restart(steps - step - 1)
            result.switched_at = step + 1
            if bar is not None:
                bar.set_description("training (sparse)")
        current.train()
        result.model = current
    if bar is not None:
        bar.close()
    if schedule is not None and result.switched_at is None:
        worst = (f"{max(criterion.deltas.values()):.1f} %" if criterion.deltas
                 else "none: a delta needs three checks")
        result.switch_reason = (f"never: the {criterion.rule} rule did not hold in {criterion.steps} checks of "
                                f"{steps} steps (largest delta at the last check: {worst}; threshold "
                                f"{schedule.threshold_pct:g} %)")
        warnings.warn(f"SPION: the model stayed dense; switch {result.switch_reason}. Train longer, raise "
                      "threshold_pct, or set SpionSchedule(max_dense_steps=...)", stacklevel=2)
    if sharded is not None:  # every rank: the model with the trained weights, whole
        if result.switched_at is None:
            current = _plain_copy(model, full_state(current)).train()
        else:
            sharded.gather_into(current)
    result.model = current
    return result


def _plain_copy(model: nn.Module, state: dict) -> nn.Module:
    """A copy of the caller's (unsharded) model holding `state`."""
    plain = copy.deepcopy(model)
    plain.load_state_dict(state)
    return plain


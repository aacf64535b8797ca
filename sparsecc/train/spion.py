"""SPION training: dense warm-up, the switch criterion, then sparse training with fixed layouts.

    schedule = SpionSchedule(Spion(method="spion_cf", block=64), check_every=500)
    result = fit(model, batches, loss_fn, steps=10_000, schedule=schedule, inputs_of=lambda b: b[0])
    result.model            # a SparseModel after the switch (the dense copy before it)

Every `check_every` dense steps the mean attention map of every layer is taken on
a probe batch; d_t = ||A_t - A_{t-1}||_F and delta = |d_t - d_{t-1}| / d_{t-1} * 100.
When delta < threshold for every layer, layouts are generated once from maps on the
calibration batches, the model is compiled with them, and training continues on the
compiled model with a fresh optimizer (the paper restarts the LR schedule there).
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, Optional

import torch
from torch import nn

from sparsecc.methods.spion import Spion
from sparsecc.methods.spion.layouts import SwitchCriterion
from sparsecc.recipe import Recipe

log = logging.getLogger("sparsecc.train")


@dataclass
class SpionSchedule:
    spion: Any = field(default_factory=Spion)  # the attention config at the switch: Spion, or Fixed for a baseline
    check_every: int = 500  # E: steps between attention-map checks (the paper: 500, or 200)
    threshold_pct: float = 15.0  # switch when every layer's delta is below this
    max_dense_steps: Optional[int] = None  # switch here at the latest
    calibration_batches: int = 4  # batches whose attention maps make the layouts at the switch


@dataclass
class FitResult:
    model: nn.Module
    losses: list = field(default_factory=list)
    switched_at: Optional[int] = None
    deltas: list = field(default_factory=list)  # per check: {layer: delta %}


def _cycle(batches: Iterable[Any]) -> Iterator[Any]:
    while True:
        empty = True
        for b in batches:
            empty = False
            yield b
        if empty:
            raise ValueError("fit got an empty iterable of batches")


class _MapProbe:
    """Mean attention maps of the current weights: capture once, reload weights at each check."""

    def __init__(self, model: nn.Module, example_inputs: Any):
        from sparsecc.api import analyze
        a = analyze(model, example_inputs)
        self.captured = a.captured
        self.regions = [r for r in a.ctx.regions if r.kind == "attention" and not r.cross]

    def maps(self, model: nn.Module, batches: list) -> dict:
        from sparsecc.calibrate import collect_attention_maps
        self.captured.gm.load_state_dict(model.state_dict(), strict=False)
        return collect_attention_maps(self.captured, self.captured.gm, self.regions, batches, progress=False)


def fit(model: nn.Module, batches: Iterable[Any], loss_fn: Callable[[nn.Module, Any], torch.Tensor], *,
        steps: int, lr: float = 1e-3, weight_decay: float = 0.01, schedule: Optional[SpionSchedule] = None,
        inputs_of: Callable[[Any], Any] = lambda batch: batch[0], optimizer: Optional[Callable] = None,
        progress: bool = True) -> FitResult:
    """Train a copy of `model` for `steps` steps; with a SPION schedule, switch to sparse attention.

    loss_fn(module, batch) -> scalar loss; inputs_of(batch) -> the model inputs of a batch (used to
    capture and calibrate). optimizer(params) -> a torch optimizer (default AdamW(lr, weight_decay)).
    The caller's model is not modified.
    """
    import sparsecc

    make_opt = optimizer or (lambda params: torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay))
    current: nn.Module = copy.deepcopy(model).train()
    opt = make_opt(current.parameters())
    result = FitResult(model=current)
    stream = _cycle(batches)
    probe, criterion, recent = None, None, []
    if schedule is not None:
        criterion = SwitchCriterion(threshold_pct=schedule.threshold_pct)
    bar = None
    if progress:
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
        loss = loss_fn(current, batch)
        loss.backward()
        opt.step()
        result.losses.append(float(loss.detach()))
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
        if probe is None:
            probe = _MapProbe(current, inputs_of(batch))
        switch = forced
        if due:
            switch = criterion.update(probe.maps(current, [inputs_of(recent[-1])])) or forced
            result.deltas.append(dict(criterion.deltas))
        if switch:
            calibration = [inputs_of(b) for b in recent]
            log.info("switching to sparse attention at step %d", step + 1)
            current = sparsecc.compile(current, inputs_of(batch), recipe=Recipe(attention=schedule.spion, ffn=None),
                                       calibration=calibration, check=False)
            opt = make_opt(current.parameters())  # the paper restarts the schedule at the switch
            result.switched_at = step + 1
            if bar is not None:
                bar.set_description("training (sparse)")
        current.train()
        result.model = current
    if bar is not None:
        bar.close()
    result.model = current
    return result

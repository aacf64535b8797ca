"""What a method is: a frozen config (plain data) plus a handler with these steps.

    match(region, config, ctx)      -> Match: does the region fit? (Match.ok(), or Match.fail(rule, why))
    observers(target)               -> what calibration must record for it
    plan(target, stats, ctx)        -> Plan: serialisable, versioned decisions (layouts, controllers, ...)
    rewrite(gm, ctx, targets)       -> the pass: each target's region rewritten with its plan
    fit_hooks(config)               -> what fine-tuning needs (parameter groups, extra losses)
    describe(target)                -> facts for the report (density, FLOPs after)

compile() runs them in this order for every method of the recipe: match every
region, one calibration pass with every observer installed, plan, rewrite.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Optional

import torch
import torch.fx as fx

from sparsecc.graph.match import Match

PLAN_VERSION = 1


@dataclass
class Plan:
    """What a method decided for one region: plain values (JSON) and tensors, versioned.

    Plans are what `sparsecc.save` writes, what calibration on several processes broadcasts,
    and what `compile(..., plans=...)` reuses instead of calibrating again.
    """

    method: str  # the config's kind
    region: str
    values: dict = field(default_factory=dict)
    tensors: dict = field(default_factory=dict)  # name -> torch.Tensor
    version: int = PLAN_VERSION

    def digest(self) -> str:
        """A hash of the plan's content (equal plans, equal digests, on every process)."""
        h = hashlib.sha256(json.dumps([self.method, self.region, self.version, self.values], sort_keys=True,
                                      default=str).encode())
        for name in sorted(self.tensors):
            t = self.tensors[name].detach().cpu().contiguous()
            h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
            h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
        return h.hexdigest()


@dataclass
class Target:
    """One region assigned to one method config (and, once made, its plan)."""

    region: Any  # sparsecc.graph.regions.Region
    config: Any
    plan: Optional[Plan] = None

    @property
    def name(self) -> str:
        return self.region.name


@dataclass
class FitHooks:
    """What fine-tuning a compiled model needs from one method.

    param_groups(model, model_lr) -> optimizer groups for the method's own parameters, each with a "role"
    (e.g. "gates" at their own lr; the rest of the model is the loop's "model" group at model_lr);
    loss(model, step, steps) -> extra loss terms {name: (weight, tensor)} added to the distillation loss;
    on_step(model, step, steps) -> called before each step (schedules such as a dense-to-sparse warm-up);
    on_end(model, batches) -> called after training (e.g. calibrate thresholds).
    """

    param_groups: Optional[Callable[..., list]] = None
    loss: Optional[Callable[[Any, int, int], dict]] = None
    on_step: Optional[Callable[[Any, int, int], None]] = None
    on_end: Optional[Callable[[Any, list], None]] = None


class Method:
    """Base of every method handler; see the module docstring. Register with
    `@sparsecc.methods.register(ConfigClass)`."""

    slots: ClassVar[tuple[str, ...]] = ()
    # numeric check of the rewrite pass against the dense outputs (1e-5: the rewrite keeps the function);
    # None for a method that changes the function on purpose
    tolerance: ClassVar[Optional[float]] = None
    # block layouts compute whole query blocks: such attention cannot also lose queries to token flow
    needs_every_query: ClassVar[bool] = False
    # a config that fits no region is an error, except for methods that change nothing (Identity)
    optional: ClassVar[bool] = False

    def match(self, region: Any, config: Any, ctx: Any) -> Match:
        return Match.ok()

    def observers(self, target: Target) -> list:
        return []

    def plan(self, target: Target, stats: dict, ctx: Any) -> Optional[Plan]:
        return None

    def rewrite(self, gm: fx.GraphModule, ctx: Any, targets: list[Target]) -> list[str]:
        raise NotImplementedError(f"{type(self).__name__} has no rewrite")

    def fit_hooks(self, config: Any) -> Optional[FitHooks]:
        return None

    def check(self, targets: list[Target], ctx: Any) -> None:
        """Raise when the recipe as a whole cannot work with this method (conflicts across slots)."""

"""One optimiser and learning-rate schedule for every fine-tuning loop.

    groups = param_groups(model, {"gates": (gate_params, 0.1)}, model_lr=2e-5)
    opt, sched = make_optimizer(groups), Schedule(steps=1000, warmup=0, kind="cosine")
    sched.attach(opt)            # each group's lr follows its base lr times the schedule factor
    ... opt.step(); sched.step()
    sched.restart()              # a phase change (SPION's switch): the schedule starts again, AdamW keeps its moments

Parameter groups carry a `role` ("gates", "routers", "controllers", "model", ...) so a loop, a test or a
log can find a group by what it trains. The factor follows the Hugging Face schedules the released code
uses (`get_cosine_schedule_with_warmup`, `get_linear_schedule_with_warmup`): linear warm-up from 0 over
`warmup` steps, then cosine (half a period) or linear decay to 0 at `steps`, or constant.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Iterable, Optional

import torch
from torch import nn

__all__ = ["Schedule", "lr_factor", "make_optimizer", "move_optimizer_state", "param_groups"]

SCHEDULES = ("cosine", "linear", "constant")


def lr_factor(step: int, steps: int, warmup: int = 0, kind: str = "cosine") -> float:
    """The multiplier of the base learning rate at `step` (0-based) of a run of `steps` steps."""
    if kind not in SCHEDULES:
        raise ValueError(f"schedule kind {kind!r} is not known; expected one of {SCHEDULES}")
    if step < warmup:
        return step / max(1, warmup)
    if kind == "constant":
        return 1.0
    progress = (step - warmup) / max(1, steps - warmup)
    if kind == "linear":
        return max(0.0, 1.0 - progress)
    return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))


@dataclass
class Schedule:
    """Warm-up + cosine / linear / constant over `steps`; `restart()` starts it again (phase change)."""

    steps: int
    warmup: int = 0
    kind: str = "cosine"
    step_count: int = 0
    _groups: list = field(default_factory=list, repr=False)

    def __post_init__(self):
        if self.kind not in SCHEDULES:
            raise ValueError(f"schedule kind {self.kind!r} is not known; expected one of {SCHEDULES}")
        if self.steps < 1 or self.warmup < 0:
            raise ValueError(f"a schedule needs steps >= 1 and warmup >= 0, got steps={self.steps}, "
                             f"warmup={self.warmup}")

    @property
    def factor(self) -> float:
        return lr_factor(self.step_count, self.steps, self.warmup, self.kind)

    def attach(self, optimizer: torch.optim.Optimizer) -> "Schedule":
        """Drive `optimizer`'s groups: each keeps its `base_lr` (set here from its lr) times the factor."""
        self._groups = list(optimizer.param_groups)
        for g in self._groups:
            g.setdefault("base_lr", g["lr"])
        self._apply()
        return self

    def step(self) -> None:
        self.step_count += 1
        self._apply()

    def restart(self, steps: Optional[int] = None) -> None:
        """Start the schedule again from step 0 (over `steps` more steps when given); the optimizer's state
        (AdamW moments) is not touched."""
        self.step_count = 0
        if steps is not None:
            self.steps = max(1, int(steps))
        self._apply()

    def _apply(self) -> None:
        for g in self._groups:
            g["lr"] = g["base_lr"] * self.factor


def param_groups(model: nn.Module, roles: dict[str, tuple[Iterable[nn.Parameter], float]], *,
                 model_lr: Optional[float] = None, weight_decay: float = 0.0,
                 role_weight_decay: Optional[dict[str, float]] = None) -> list[dict]:
    """AdamW groups by role: `roles` maps a role to (parameters, lr); every other trainable parameter of
    `model` goes to the "model" group at `model_lr` (none when model_lr is None or 0). A parameter named
    in two roles stays in the first. Empty groups are left out."""
    groups, taken = [], set()
    decay = dict(role_weight_decay or {})
    for role, (params, lr) in roles.items():
        mine = [p for p in params if p.requires_grad and id(p) not in taken]
        taken.update(id(p) for p in mine)
        if mine:
            groups.append({"params": mine, "lr": float(lr), "weight_decay": decay.get(role, 0.0), "role": role})
    if model_lr:
        rest = [p for p in model.parameters() if p.requires_grad and id(p) not in taken]
        if rest:
            groups.append({"params": rest, "lr": float(model_lr), "weight_decay": weight_decay, "role": "model"})
    return groups


def make_optimizer(groups: list[dict], eps: float = 1e-8) -> torch.optim.AdamW:
    """AdamW over `groups` (eps 1e-8 as the released SparseFlow code)."""
    if not groups:
        raise ValueError("no trainable parameters: every parameter group is empty")
    return torch.optim.AdamW(groups, eps=eps)


def move_optimizer_state(optimizer: torch.optim.Optimizer, old: dict[str, nn.Parameter],
                         new: dict[str, nn.Parameter]) -> tuple[list[str], list[str]]:
    """Point `optimizer` at the parameters of a rebuilt model, keeping each one's state (AdamW moments and
    step): `old` and `new` map parameter names to parameters. A parameter is carried over when its name
    (or, failing that, its name without the wrappers' prefixes: SparseModel's "graph_module.",
    torch.compile's "_orig_mod.", "model.") and shape match.
    Returns (carried names, names of new parameters that start fresh); old parameters without a match are
    dropped from the optimizer."""
    def key(name: str) -> str:
        stripped = True
        while stripped:
            stripped = False
            for prefix in ("graph_module.", "_orig_mod.", "model."):
                if name.startswith(prefix):
                    name, stripped = name[len(prefix):], True
        return name

    by_key = {key(n): p for n, p in old.items()}
    target = {id(p): (n, p) for n, p in new.items()}
    carried, fresh = [], []
    mapping = {}
    for name, p in new.items():
        q = old.get(name, by_key.get(key(name)))
        if q is not None and q.shape == p.shape:
            mapping[id(q)] = p
            carried.append(name)
        else:
            fresh.append(name)
    state = {}
    for g in optimizer.param_groups:
        kept = []
        for q in g["params"]:
            p = mapping.get(id(q))
            if p is None:
                continue
            kept.append(p)
            if q in optimizer.state:
                state[p] = optimizer.state[q]
        g["params"] = kept
    placed = {id(p) for g in optimizer.param_groups for p in g["params"]}
    extra = [p for i, (n, p) in target.items() if i not in placed and p.requires_grad]
    if extra:
        model_group = next((g for g in optimizer.param_groups if g.get("role") == "model"), optimizer.param_groups[-1])
        model_group["params"].extend(extra)
    optimizer.state.clear()
    optimizer.state.update(state)
    return carried, fresh

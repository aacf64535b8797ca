"""The search of `sparsecc.tune`, over per-layer levels: sensitivity seed, level-switch evolution, global shift.

A candidate gives every unit (a slot of one layer: ("attention", 3)) a level: 0 is dense, 1..K the
slot's levels from the least to the most saving. The search sees the model only through two
functions: `quality(candidate)` (measured on held-out data by the caller, who caches it) and
`latency(candidate)` (predicted from the latency table). It looks for the lowest latency whose
quality meets the budget:

1. sensitivity: every unit alone at every level (units x levels measurements), then a greedy path
   from dense that takes, step by step, the level change with the most latency saved per quality
   lost (the losses added up); a bisection on that path, measured, finds its furthest point within
   the budget (the seed);
2. evolution (after EvoPress's level-switch search): each generation makes `offspring` mutants of the
   best candidate - one unit a level sparser, or one sparser and another denser - and keeps the
   fastest that meets the budget (at equal latency, the better quality); stops after `patience`
   generations without a gain;
3. global shift: every unit moved t levels sparser (clamped), t found by bisection - with a short
   fine-tuning inside `quality` this pushes the whole profile as far as recovery allows.

Deterministic for a seed: the only randomness is `random.Random(seed)`.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Callable, Optional

from sparsecc.tune.budget import Budget

Candidate = tuple  # one level per unit


@dataclass
class SearchSpace:
    units: list  # [(slot, layer)]
    levels: list  # per unit: its number of levels K (level 0, dense, not counted)
    savings: list  # per unit: [saving at level 0 (= 0), 1, ..., K] in seconds

    @property
    def dense(self) -> Candidate:
        return tuple(0 for _ in self.units)

    def latency_saving(self, c: Candidate) -> float:
        return sum(self.savings[i][lv] for i, lv in enumerate(c))

    def single(self, unit: int, level: int) -> Candidate:
        return tuple(level if i == unit else 0 for i in range(len(self.units)))

    def shifted(self, c: Candidate, t: int) -> Candidate:
        return tuple(min(max(lv + t, 0), self.levels[i]) for i, lv in enumerate(c))


def sensitivity(space: SearchSpace, quality: Callable[[Candidate], float], on_step=None) -> dict:
    """{(unit, level): quality with that unit alone at that level}."""
    out = {}
    for i in range(len(space.units)):
        for lv in range(1, space.levels[i] + 1):
            out[(i, lv)] = quality(space.single(i, lv))
            if on_step:
                on_step()
    return out


def greedy_path(space: SearchSpace, sens: dict, budget: Budget, reference: float) -> list:
    """Candidates from dense onwards, each one level change further: the change with the most seconds saved
    per unit of estimated quality lost (the single-unit losses added up). [(candidate, estimated loss)]."""
    def loss(i: int, lv: int) -> float:
        return 0.0 if lv == 0 else max(budget.loss(sens[(i, lv)], reference), 0.0)

    current = list(space.dense)
    total = 0.0
    path = [(tuple(current), 0.0)]
    while True:
        best = None
        for i, lv in enumerate(current):
            for nxt in range(lv + 1, space.levels[i] + 1):
                gain = space.savings[i][nxt] - space.savings[i][lv]
                if gain <= 0:
                    continue
                cost = max(loss(i, nxt) - loss(i, lv), 0.0)
                score = gain / (cost + 1e-9)
                if best is None or score > best[0]:
                    best = (score, i, nxt, cost)
        if best is None:
            return path
        _, i, nxt, cost = best
        current[i] = nxt
        total += cost
        path.append((tuple(current), total))


def furthest_within(items: list, meets: Callable[[int], bool], start: int = 0) -> int:
    """The largest index i >= start with meets(i), assuming meets holds up to some index and not after
    (items[start] is known to meet); by bisection."""
    lo, hi = start, len(items)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if meets(mid):
            lo = mid
        else:
            hi = mid
    return lo


@dataclass
class Best:
    candidate: Candidate
    quality: float
    latency_saving: float


def seed(space: SearchSpace, sens: dict, quality: Callable, budget: Budget, reference: float) -> Best:
    """The furthest point of the greedy path that meets the budget when measured."""
    path = greedy_path(space, sens, budget, reference)
    # start the bisection at the last point the additive estimate keeps within the budget
    slack = budget.slack(reference)
    guess = max((k for k, (_, est) in enumerate(path) if est <= slack), default=0)
    if guess > 0 and not budget.met(quality(path[guess][0])):
        guess = furthest_within(path[:guess], lambda k: budget.met(quality(path[k][0])))
    else:
        guess = furthest_within(path, lambda k: budget.met(quality(path[k][0])), start=guess)
    c = path[guess][0]
    return Best(c, quality(c), space.latency_saving(c))


def evolve(space: SearchSpace, start: Best, quality: Callable, budget: Budget, seed_value: int = 0,
           generations: int = 30, offspring: int = 4, patience: int = 8, on_generation=None) -> Best:
    """Level-switch evolution from `start`: the fastest candidate found that meets the budget."""
    rng = random.Random(seed_value)
    best, stale = start, 0
    for _ in range(generations):
        improved = False
        for _ in range(offspring):
            child = _mutate(space, best.candidate, rng)
            if child is None:
                continue
            saving = space.latency_saving(child)
            if saving < best.latency_saving - 1e-12:
                continue  # slower than the best: not worth a measurement
            q = quality(child)
            if not budget.met(q):
                continue
            if saving > best.latency_saving * (1 + 1e-3) + 1e-12 or (
                    saving >= best.latency_saving - 1e-12 and budget.better(q, best.quality)):
                best, improved = Best(child, q, saving), True
        if on_generation:
            on_generation()
        stale = 0 if improved else stale + 1
        if stale >= patience:
            break
    return best


def _mutate(space: SearchSpace, c: Candidate, rng: random.Random) -> Optional[Candidate]:
    levels = list(c)
    up = [i for i, lv in enumerate(levels) if lv < space.levels[i]]
    down = [i for i, lv in enumerate(levels) if lv > 0]
    if not up:
        return None
    i = rng.choice(up)
    levels[i] += 1
    if down and rng.random() < 0.5:  # a level switch: another unit gives a level back
        j = rng.choice([d for d in down if d != i] or down)
        if j != i:
            levels[j] -= 1
    return tuple(levels)


def shift(space: SearchSpace, best: Best, quality: Callable, budget: Budget) -> tuple[Best, int]:
    """The largest global shift t >= 0 (every unit t levels sparser) that meets the budget and saves more time."""
    most = max(space.levels, default=0)
    steps = [space.shifted(best.candidate, t) for t in range(most + 1)]
    steps = steps[:next((t for t in range(1, len(steps)) if steps[t] == steps[t - 1]), len(steps))]
    t = furthest_within(steps, lambda k: budget.met(quality(steps[k])))
    c = steps[t]
    if t == 0 or space.latency_saving(c) <= best.latency_saving:
        return best, 0
    return Best(c, quality(c), space.latency_saving(c)), t


def pareto(points: list, higher_is_better: bool) -> list:
    """The points no other point beats on both latency (lower) and quality; sorted by latency."""
    sign = 1 if higher_is_better else -1
    front, best_q = [], None
    for p in sorted(points, key=lambda p: (p["latency"], -sign * p["quality"])):
        if best_q is None or sign * p["quality"] > sign * best_q:
            front.append(p)
            best_q = p["quality"]
    return front

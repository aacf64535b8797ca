"""The pass manager: run named graph passes in order, lint, check numerics, time, dump.

A pass is a function `fn(gm, ctx) -> list[str]` returning a note per rewrite it
made (an empty list means "nothing changed"). Passes communicate through the
graph and through `ctx` (the captured inputs, the region records, the recipe).
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

import torch
import torch.fx as fx
from torch.utils import _pytree as pytree

from sparsecc.errors import InputError, PassError, RecipeError, UnsupportedError

log = logging.getLogger("sparsecc.passes")

PassFn = Callable[[fx.GraphModule, "PassContext"], list]


@dataclass
class Pass:
    name: str
    fn: PassFn
    # A pass that changes the model's function on purpose (sparsification) is not checked
    # against the original outputs; `tolerance` None means "skip the numeric check".
    tolerance: Optional[float] = 1e-5


@dataclass
class PassContext:
    """What passes share besides the graph."""

    captured: Any  # sparsecc.capture.Captured
    recipe: Any = None
    regions: list = field(default_factory=list)
    targets: dict = field(default_factory=dict)  # slot -> [sparsecc.methods.Target]: what each method rewrites
    data: dict = field(default_factory=dict)  # per-method products (evaluated masks, the flow plan, ...)


@dataclass
class PassResult:
    name: str
    changes: list
    seconds: float
    max_abs_error: Optional[float] = None

    @property
    def changed(self) -> bool:
        return bool(self.changes)


def flat_tensors(out: Any) -> list[torch.Tensor]:
    return [t for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]


def max_abs_error(reference: Any, out: Any) -> float:
    ref, got = flat_tensors(reference), flat_tensors(out)
    if len(ref) != len(got):
        return float("inf")
    err = 0.0
    for r, g in zip(ref, got):
        if r.shape != g.shape:
            return float("inf")
        if r.is_floating_point():
            diff = (r.double() - g.double()).abs().nan_to_num(nan=float("inf"), posinf=float("inf"))
            both_nan = r.isnan() & g.isnan()
            diff = diff.masked_fill(both_nan, 0.0)
            err = max(err, float(diff.max()) if diff.numel() else 0.0)
        elif not torch.equal(r, g):
            return float("inf")
    return err


def allowed_error(reference: Any, tolerance: float) -> float:
    """`tolerance`, or a few units in the last place of the largest fp16 / bf16 output: a rewrite that keeps
    the math still rounds differently in half precision (e.g. eager attention -> SDPA)."""
    low = [t for t in flat_tensors(reference) if t.dtype in (torch.float16, torch.bfloat16) and t.numel()]
    ulps = [4 * torch.finfo(t.dtype).eps * float(t.detach().abs().float().nan_to_num(0.0, 0.0, 0.0).max())
            for t in low]
    return max([tolerance] + ulps)


class PassManager:
    """Run passes in order over one graph module.

    check: "each" compares the outputs after every pass whose `tolerance` is set with the outputs
    before it (meaning-preserving passes: 1e-5); a pass with tolerance None changes the function on
    purpose (a sparsifying method) and is not compared, but the passes after it are compared with
    its result. "none" skips numeric checks (lint still runs). dump_dir: write the graph after
    each pass to `<dump_dir>/<index>_<name>.txt`.
    """

    def __init__(self, passes: Sequence[Pass], check: str = "each", dump_dir: Optional[str] = None):
        if check not in ("each", "none"):
            raise ValueError(f"check must be 'each' or 'none', got {check!r}")
        self.passes = list(passes)
        self.check = check
        self.dump_dir = dump_dir

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> list[PassResult]:
        reference = ctx.captured.run(gm) if self.check == "each" else None
        results = []
        for index, p in enumerate(self.passes):
            start = time.perf_counter()
            try:
                changes = p.fn(gm, ctx) or []
                gm.graph.lint()
                gm.graph.eliminate_dead_code()
                gm.recompile()
            except (PassError, InputError, RecipeError, UnsupportedError):
                raise  # bad input, said by the pass: not a broken graph
            except Exception as err:
                raise PassError(f"pass {p.name!r} broke the graph: {type(err).__name__}: {err}") from err
            seconds = time.perf_counter() - start
            error = None
            if reference is not None and p.tolerance is not None and changes:
                try:
                    error = max_abs_error(reference, ctx.captured.run(gm))
                except Exception as err:
                    raise PassError(f"pass {p.name!r} produced a graph that fails to run: "
                                    f"{type(err).__name__}: {err}; it changed: {_short(changes)}") from err
                allowed = allowed_error(reference, p.tolerance)
                if not error <= allowed:
                    raise PassError(f"pass {p.name!r} changed the model's outputs by {error:.3g} "
                                    f"(allowed {allowed:g}); it changed: {_short(changes)}")
            if reference is not None and p.tolerance is None and changes:
                # this pass changes the function on purpose: later passes must preserve the new one
                reference = ctx.captured.run(gm)
            if self.dump_dir:
                _dump(gm, self.dump_dir, f"{index:02d}_{p.name}.txt")
            log.info("pass %s: %d change(s) in %.3fs", p.name, len(changes), seconds)
            results.append(PassResult(p.name, list(changes), seconds, error))
        return results


def _short(changes: list, n: int = 5) -> str:
    text = ", ".join(str(c) for c in changes[:n])
    return text + (f" (+{len(changes) - n} more)" if len(changes) > n else "")


def _dump(gm: fx.GraphModule, directory: str, name: str) -> None:
    from sparsecc.io import write_text
    write_text(os.path.join(directory, name), str(gm.graph))

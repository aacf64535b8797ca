"""The public entry points: inspect() and compile(). They drive the stages; methods do the work.

    capture -> canonicalize -> find regions -> assign (recipe) -> match -> calibrate (one pass,
    every method's observers) -> plan -> rewrite (a pass per method) -> SparseModel on a backend
"""

from __future__ import annotations

import logging
import time
import warnings
from dataclasses import dataclass
from typing import Any, Optional

import torch.fx as fx
from torch import nn

from sparsecc import distributed
from sparsecc.backends import get_backend
from sparsecc.calibrate import calibrate
from sparsecc.capture import Captured, capture, check_calibration, normalize_inputs
from sparsecc.errors import RecipeError, SparseccError, UnsupportedError
from sparsecc.graph.canonicalize import CANONICALIZE
from sparsecc.graph.explain import unmatched
from sparsecc.graph.match import Miss
from sparsecc.graph.regions import find_regions
from sparsecc.methods import Target, handler_for
from sparsecc.methods.block_sparse import plan_layout
from sparsecc.methods.registry import SLOTS
from sparsecc.model import SparseModel
from sparsecc.passes.manager import Pass, PassContext, PassManager
from sparsecc.recipe import Recipe
from sparsecc.report import Report, density_changed, graph_summary

log = logging.getLogger("sparsecc")


@dataclass
class Analysis:
    """A captured, canonicalized model and its regions (what inspect() reports and compile() rewrites)."""

    captured: Captured
    ctx: PassContext
    passes: list
    seconds: dict


def analyze(model: Any, example_inputs: Any = None, dynamic: bool = True, check: bool = False,
            dump_dir: Optional[str] = None) -> Analysis:
    """Capture (unless given a Captured already), canonicalize, find regions."""
    times = {}
    start = time.perf_counter()
    captured = model if isinstance(model, Captured) else capture(model, example_inputs, dynamic=dynamic)
    times["capture"] = time.perf_counter() - start
    ctx = PassContext(captured=captured)
    manager = PassManager([Pass(name, fn) for name, fn in CANONICALIZE], check="each" if check else "none",
                          dump_dir=dump_dir)
    start = time.perf_counter()
    results = manager.run(captured.gm, ctx)
    times["canonicalize"] = time.perf_counter() - start
    start = time.perf_counter()
    ctx.regions = find_regions(captured.gm, captured)
    times["find_regions"] = time.perf_counter() - start
    return Analysis(captured, ctx, results, times)


def inspect(model: Any, example_inputs: Any = None, dynamic: bool = True, check: bool = False,
            dump_dir: Optional[str] = None) -> Report:
    """Capture and canonicalize `model` and report its attention and FFN regions (nothing is rewritten).

    `model` may also be a `sparsecc.capture.Captured` (e.g. from `load_exported("m.pt2")`).
    """
    a = analyze(model, example_inputs, dynamic, check, dump_dir)
    return Report(model=a.captured.model_name, regions=a.ctx.regions, graph=graph_summary(a.captured.gm),
                  passes=a.passes, unmatched=unmatched(a.captured.gm, a.ctx.regions), stage_seconds=a.seconds)


def assign(recipe: Recipe, ctx: PassContext) -> tuple[dict, list[str]]:
    """Each region's config per slot, matched by its handler: ({slot: [Target]}, notes on regions left alone).

    A sparsifying config that fits none of the regions it names is an error with every reason (a
    recipe that silently does nothing is worse than one that fails); Identity never is.
    """
    targets: dict = {slot: [] for slot in SLOTS}
    notes = []
    for slot in SLOTS:
        misses: dict = {}
        for region in ctx.regions:
            if slot != "flow" and region.kind != slot:
                continue
            config = recipe.config_for(slot, region.layer)
            if config is None:
                continue
            match = handler_for(config).match(region, config, ctx)
            if match:
                targets[slot].append(Target(region, config))
            else:
                kind = type(config).kind
                misses.setdefault(config, []).append(f"{region.name}: {match.reason}")
                anchor = region.sdpa if region.kind == "attention" else region.down
                notes.append(Miss(region.kind, f"{kind}:{match.rule}", f"{kind} not applied: {match.reason}",
                                  getattr(anchor, "name", None), region.path or region.name, region.layer))
        for config in recipe.configs(slot):
            if handler_for(config).optional or any(t.config == config for t in targets[slot]):
                continue
            kind = "attention or FFN" if slot == "flow" else ("FFN" if slot == "ffn" else slot)
            found = misses.get(config)
            if not found:
                raise UnsupportedError(f"recipe.{slot} = {describe_config(config)}: no {kind} region was found "
                                       "(see `sparsecc inspect --explain` for what the model has and why candidates "
                                       "were not recognised)")
            raise UnsupportedError(f"recipe.{slot} = {describe_config(config)} fits none of the {len(found)} {kind} "
                                   f"region(s) it was given: " + "; ".join(found[:4])
                                   + (f"; ... ({len(found) - 4} more)" if len(found) > 4 else ""))
    return targets, notes


def _groups(targets: dict) -> list[tuple[str, Any, list[Target]]]:
    """(slot, handler, its targets) in slot order, each handler once per slot."""
    out = []
    for slot in SLOTS:
        by_handler: dict = {}
        for t in targets[slot]:
            by_handler.setdefault(id(handler_for(t.config)), (handler_for(t.config), []))[1].append(t)
        out += [(slot, handler, group) for handler, group in by_handler.values()]
    return out


def _calibrate_and_plan(ctx: PassContext, groups: list, calibration: Any, plans: Optional[dict],
                        progress: bool) -> None:
    """One calibration pass with every observer of every method, then each method plans its regions.

    Under torch.distributed every rank calibrates on its own batches, the statistics are reduced, the ranks
    share the planning, and the plans are exchanged and checked (sparsecc.distributed)."""
    plans = plans or {}
    comm = distributed.current()
    observed = []
    for _, handler, group in groups:
        for t in group:
            given = plans.get(t.name)
            if given is not None and given.method == type(t.config).kind:
                t.plan = given
                continue
            observed.append((handler, t, handler.observers(t)))
    observers = [o for _, _, obs in observed for o in obs]
    if comm is not None:
        comm.check_same("the regions to plan and their observers",
                        {t.name: (type(t.config).kind, [type(o).__name__ for o in obs]) for _, t, obs in observed},
                        "Every rank must compile the same model with the same recipe and the same plans=.")
    start = time.perf_counter()
    if observers:
        if calibration is None:
            kinds = sorted({type(t.config).kind for _, t, obs in observed if obs})
            log.warning("methods %s calibrate on data; no calibration batches were given, so the example inputs are "
                        "used. Pass calibration=[inputs, ...] with real data.", kinds)
            calibration = [(ctx.captured.args, ctx.captured.kwargs)]
        _on_every_rank(comm, "calibration", lambda: calibrate(ctx.captured, ctx.captured.gm, observers, calibration,
                                                              progress=progress))
        if comm is not None:  # each region's statistics go to the rank that plans it
            for i, (_, _, obs) in enumerate(observed):
                for o in obs:
                    o.reduce(comm, owner=i % comm.world_size)
    # with several ranks each plans every world_size-th region (plans are independent: controller distillation
    # and layout search split across the ranks) and the plans are then exchanged
    mine = observed if comm is None else observed[comm.rank::comm.world_size]
    _on_every_rank(comm, "planning", lambda: [_plan(handler, t, obs, ctx) for handler, t, obs in mine])
    if comm is not None:
        made = {}
        for part in comm.all_gather({t.name: t.plan for _, t, _ in mine}):
            made.update(part)
        for _, t, _ in observed:
            t.plan = made[t.name]
        comm.check_same("plans", {t.name: t.plan.digest() if t.plan else None for _, _, g in groups for t in g},
                        "Ranks were given different plans= (or a plan changed on its way); pass every rank the same.")
        ctx.data["distributed"] = {"world_size": comm.world_size, "rank": comm.rank, "backend": comm.backend,
                                   "bytes_sent": comm.bytes_sent, "seconds": time.perf_counter() - start}


def _on_every_rank(comm: Optional[distributed.Comm], stage: str, work) -> None:
    """Run `work`; with several ranks, end the stage on all of them together (an error anywhere raises
    everywhere, naming the rank)."""
    if comm is None:
        work()
        return
    error = None
    try:
        work()
    except Exception as err:  # told to every rank by settle, which raises
        error = err
    comm.settle(stage, error)


def _plan(handler: Any, t: Target, observers: list, ctx: PassContext) -> None:
    try:
        t.plan = handler.plan(t, observers, ctx)
    except SparseccError as err:  # name the region: the message alone may not say which layer
        raise type(err)(f"region {t.name} (layer {t.region.layer}), recipe.{handler.slots[0]} = "
                        f"{describe_config(t.config)}: {err}") from err


def _rewrite_pass(handler: Any, group: list[Target]):
    """The handler's rewrite as a pass; the regions whose facts it wrote get the config's description."""
    def run(gm: fx.GraphModule, ctx: PassContext) -> list[str]:
        before = {id(t): t.region.sparse for t in group}
        changes = handler.rewrite(gm, ctx, group)
        for t in group:
            if t.region.sparse is not None and t.region.sparse is not before[id(t)]:
                t.region.sparse["config"] = describe_config(t.config)
        return changes
    return run


def compile(model: nn.Module, example_inputs: Any, recipe: Optional[Recipe] = None, backend: str = "eager",
            calibration: Any = None, dynamic: bool = True, check: bool = True,
            dump_dir: Optional[str] = None, backend_options: Optional[dict] = None,
            plans: Optional[dict] = None, progress: bool = True) -> SparseModel:
    """Capture `model`, find its regions, rewrite them as `recipe` says, and lower to `backend`.

    calibration: batches (same format as example_inputs) for the methods that calibrate; read once.
    plans: region name -> Plan (e.g. `sm.plans` of an earlier compile) to reuse instead of calibrating.
    backend="triton": the sparse ops on CUDA tensors run Triton kernels (sparsecc.backends.triton),
    the rest of the graph goes through torch.compile (inductor); needs triton and a CUDA device.
    backend="onnxruntime": the module runs the exported ONNX graph in an onnxruntime session;
    backend_options: providers (list of names), intra_op_num_threads, inter_op_num_threads,
    graph_optimization_level ("disable" | "basic" | "extended" | "all"), path (keep the .onnx), opset.

    check: compare outputs with the captured model after every meaning-preserving pass
    (1e-5), naming the pass that broke them. The user's model is never modified.
    """
    recipe = Recipe() if recipe is None else recipe
    if not isinstance(recipe, Recipe):
        raise RecipeError(f"recipe must be a sparsecc.Recipe, got {type(recipe).__name__}")
    get_backend(backend, backend_options).prepare()  # before any work: options checked, says what is missing
    if isinstance(model, Captured):
        check_calibration(calibration, model.args, model.kwargs)
    else:
        check_calibration(calibration, *normalize_inputs(example_inputs))
    a = analyze(model, example_inputs, dynamic, check, dump_dir)
    ctx, times = a.ctx, a.seconds
    ctx.recipe = recipe
    report = Report(model=a.captured.model_name, regions=ctx.regions, graph=graph_summary(a.captured.gm),
                    unmatched=unmatched(a.captured.gm, ctx.regions), stage_seconds=times)
    targets, notes = assign(recipe, ctx)
    ctx.targets = targets
    groups = _groups(targets)
    for _, handler, group in groups:
        handler.check(group, ctx)
    start = time.perf_counter()
    _calibrate_and_plan(ctx, groups, calibration, plans, progress)
    times["calibrate"] = time.perf_counter() - start
    passes = [Pass(f"{slot}_{type(group[0].config).kind}", _rewrite_pass(handler, group),
                   tolerance=handler.tolerance) for slot, handler, group in groups]
    start = time.perf_counter()
    report.passes = a.passes + PassManager(passes, check="each" if check else "none",
                                           dump_dir=dump_dir).run(a.captured.gm, ctx)
    times["rewrite"] = time.perf_counter() - start
    report.unmatched += notes + ctx.data.get("skipped", [])
    report.distributed = ctx.data.get("distributed", {})
    _warn_changed_densities(report)
    all_targets = [t for _, _, group in groups for t in group]
    from sparsecc.layouts import LayoutSet
    layouts = LayoutSet((t.name, plan_layout(t.plan)) for t in all_targets
                        if t.plan is not None and "mask" in t.plan.tensors)
    model_cls, extra = SparseModel, {}
    for _, handler, group in groups:
        wrap = getattr(handler, "model_class", None)
        if wrap is not None:
            model_cls, extra = wrap(ctx)
    return model_cls(a.captured.gm, a.captured, recipe, backend, report, layouts=layouts or None,
                     backend_options=backend_options, plans={t.name: t.plan for t in all_targets if t.plan}, **extra)


def _warn_changed_densities(report: Report) -> None:
    """One warning per config whose layouts' density differs from the density it asked for."""
    changed: dict = {}
    for r in report.regions:
        if r.sparse and density_changed(r.sparse):
            changed.setdefault(r.sparse.get("config", r.sparse["method"]), []).append(r)
    for config, regions in changed.items():
        used = sorted({f"{r.sparse['density']:.3f}" for r in regions})
        n = regions[0].sparse.get("blocks")
        windows = sorted({r.window for r in regions if getattr(r, "window", None)})
        why = (f"the sliding window of {' / '.join(map(str, windows))} keys the model's mask keeps leaves only "
               "the tiles that meet it" if windows else "the nearest this method reaches"
               + (f" on {n[0]}x{n[1]} blocks" if n else "") + "; a smaller block gives finer steps")
        message = (f"{config}: asked for density {regions[0].sparse['density_requested']:g}, the layouts have "
                   f"density {' / '.join(used)} in {len(regions)} region(s) ({regions[0].name}"
                   f"{', ...' if len(regions) > 1 else ''}): {why}. The report shows both (density column, "
                   "`density_requested` in its JSON)")
        log.warning("%s", message)
        warnings.warn(message, UserWarning, stacklevel=3)


def describe_config(config: Any) -> str:
    """`kind(field=value, ...)` with the fields that differ from the defaults."""
    import dataclasses
    changed = [f"{f.name}={getattr(config, f.name)!r}" for f in dataclasses.fields(config)
               if getattr(config, f.name) != (f.default if f.default is not dataclasses.MISSING else object())]
    return f"{type(config).kind}({', '.join(changed)})"

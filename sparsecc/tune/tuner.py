"""`sparsecc.tune`: the fastest per-layer recipe whose quality, measured on held-out data, stays within a budget.

    result = sparsecc.tune(model, example_inputs, calibration=batches, budget="cosine>=0.98",
                           backend="onnxruntime")
    result.recipe            # a per-layer Recipe (result.save("out/") writes recipe.toml, front.json, front.png)
    result.speedup           # the tuned model against the dense one, timed end to end on the backend
    sm = result.model        # the tuned model, compiled for the backend

How it works, and what each step costs:
- the model is captured once; each level (a method config of a slot: `Spion(method="spion_c",
  density=0.25)`, `SparseFFN(n=8)`, ...) is compiled on every region of its slot once, calibrated on
  the calibration batches: its plans (layouts, controllers) depend only on the dense model, so any
  per-layer mix of levels is compiled from them without calibrating again (and they are cached on
  disk, `sparsecc.tune.plan_cache`, for the next tune of the model);
- the latency table (`sparsecc.tune.latency`) times each level against the dense model on the
  backend, once, cached on disk;
- quality is measured, never estimated: every candidate the search looks at is compiled and run on
  the held-out batches, and the budget's metric compares its outputs with the dense model's;
- token flow (`methods=["flow"]`, searched alone): its content gates are trained once, on the
  calibration batches at the lowest kept fraction with the weights frozen (`fit_flow`, `flow_fit=`);
  each flow level is then those gates with thresholds calibrated to its kept fraction, so a
  per-layer mix of keeps costs no training (a layer left dense is skipped: `TokenFlow.skip`);
- the search (`sparsecc.tune.search`): sensitivity seed, level-switch evolution, global shift; with
  `finetune=`, the shift's candidates are fine-tuned (`sparsecc.finetune`) before they are measured,
  and the tuned model is the fine-tuned one;
- the tuned recipe is compiled for the backend and timed end to end beside the dense model; if it
  measures slower (the table's per-layer savings do not add up on every backend), the answer is the
  dense model, with a warning, and `result.chosen["slower_end_to_end"]` keeps the recipe turned down
  (not when the latencies were given with `latency=`: they are another machine's).
The uniform settings (each level on every layer, for each slot and for the slots combined) are
measured on the same held-out data, so the front can be compared with them (`result.save` draws both).
"""

from __future__ import annotations

import copy
import logging
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Optional, Union

import torch

from sparsecc.api import analyze, compile, describe_config
from sparsecc.backends import get_backend
from sparsecc.capture import call_with_inputs, capture
from sparsecc.errors import InputError, TuneError, UnsupportedError
from sparsecc.methods.fixed import Fixed
from sparsecc.methods.sparse_ffn import SparseFFN
from sparsecc.methods.spion import Spion
from sparsecc.methods.token_flow import TokenFlow
from sparsecc.recipe import Recipe
from sparsecc.tune import search
from sparsecc.tune.budget import Budget
from sparsecc.tune.latency import LatencyTable, default_cache_dir, fingerprint, interleaved_medians
from sparsecc.tune.plan_cache import PlanCache, plans_key

log = logging.getLogger("sparsecc.tune")

TUNABLE_SLOTS = ("attention", "ffn", "flow")
DEFAULT_SLOTS = ("attention", "ffn")
_SLOT_CONFIGS = {"attention": (Spion, Fixed), "ffn": (SparseFFN,), "flow": (TokenFlow,)}
_UNSET = object()


def default_levels(slot: str, seq_len: int) -> list:
    """The levels tune tries when `methods` names a slot without configs.

    attention: SPION-C (conv of the attention maps, top blocks) at densities 1/2 .. 1/8, on blocks of
    at most 64 with at least 8 blocks to a row; ffn: sparse FFN keeping 1 unit in 4 .. 32; flow: content
    gates keeping 0.9 .. 0.5 of the tokens."""
    if slot == "attention":
        block = max(8, min(64, 1 << max(3, (seq_len // 8).bit_length() - 1)))
        return [Spion(method="spion_c", block=block, density=d) for d in (0.5, 0.35, 0.25, 0.125)]
    if slot == "ffn":
        return [SparseFFN(n=n) for n in (4, 8, 16, 32)]
    if slot == "flow":
        return [TokenFlow(gate="content", keep=k) for k in (0.9, 0.75, 0.6, 0.5)]
    raise InputError(f"tune varies {list(TUNABLE_SLOTS)}; got {slot!r}")


def _levels(methods: Any, seq_len: int) -> dict:
    if methods is None:
        methods = list(DEFAULT_SLOTS)
    if isinstance(methods, str):
        methods = [methods]
    if isinstance(methods, (list, tuple)):
        methods = {slot: None for slot in methods}
    if not isinstance(methods, dict) or not methods:
        raise InputError(f"tune: methods={methods!r}; expected slot names (['attention', 'ffn']) or a mapping "
                         "{slot: [config, ...]} of the levels to try")
    out = {}
    for slot, configs in methods.items():
        if configs is None:
            configs = default_levels(slot, seq_len)
        elif not isinstance(configs, (list, tuple)):
            configs = [configs]
        if slot not in TUNABLE_SLOTS:
            default_levels(slot, seq_len)  # raises the reason
        for c in configs:
            if not isinstance(c, _SLOT_CONFIGS[slot]):
                raise InputError(f"tune: methods[{slot!r}] holds {c!r}; expected "
                                 f"{' or '.join(k.__name__ for k in _SLOT_CONFIGS[slot])} configs, one per level")
        if len(set(configs)) != len(configs):
            raise InputError(f"tune: methods[{slot!r}] names a level twice")
        if slot == "flow":
            _check_flow_levels(configs)
        out[slot] = list(configs)
    if "flow" in out and len(out) > 1:
        raise InputError(f"tune: methods={sorted(out)}; token flow is searched alone: a flowed layer's block holds "
                         "its attention and FFN regions (a region takes one method), and block layouts need every "
                         "query. Tune methods=['flow'], or the other slots without it")
    return out


def _check_flow_levels(configs: list) -> None:
    """Flow levels share one set of trained gates: they may differ in their kept fraction only."""
    import dataclasses
    base = dataclasses.replace(configs[0], keep=0.5)
    for c in configs:
        if isinstance(c.keep, tuple) or c.skip:
            raise InputError(f"tune: the flow level {c!r} gives per-block keep or skip; a level is one kept "
                             "fraction (tune chooses it per layer)")
        if dataclasses.replace(c, keep=0.5) != base:
            raise InputError(f"tune: the flow levels {configs[0]!r} and {c!r} differ in more than their kept "
                             "fraction; the levels share one set of trained gates, so give one gate, select, kv ...")
        if c.select != "threshold":
            raise InputError(f"tune: flow levels with select={c.select!r}; tune sets each level's kept fraction by "
                             "threshold (select='threshold')")


def _seq_len(captured: Any) -> int:
    from torch.utils import _pytree as pytree
    for leaf in pytree.tree_leaves((captured.args, captured.kwargs)):
        if isinstance(leaf, torch.Tensor) and leaf.dim() >= 2:
            return int(leaf.shape[1])
    return 128


@dataclass
class TuneResult:
    recipe: Recipe
    budget: Budget
    quality: float  # of the tuned model on the held-out batches (after fine-tuning, when asked)
    latency: float  # seconds, the tuned model on the backend, measured end to end
    dense_latency: float  # seconds, the dense model, measured beside it
    predicted_latency: float  # what the latency table predicted for the tuned recipe
    backend: str
    model: Any = None  # the tuned SparseModel (on the backend; with finetune=, the fine-tuned eager model)
    points: list = field(default_factory=list)  # every measured candidate: {"levels", "latency", "quality", ...}
    uniform: list = field(default_factory=list)  # the uniform settings: {"name", "slot", "latency", "quality"}
    chosen: dict = field(default_factory=dict)
    evaluations: int = 0
    shift: int = 0  # levels the global shift added
    table: dict = field(default_factory=dict)  # the latency table (LatencyTable.to_dict())
    seconds: dict = field(default_factory=dict)  # per stage
    finetuned: bool = False
    plans_cached: int = 0  # levels whose plans came from the cache (not calibrated again)

    @property
    def speedup(self) -> float:
        return self.dense_latency / self.latency

    @property
    def front(self) -> list:
        return search.pareto(self.points, self.budget.higher_is_better)

    def to_dict(self) -> dict:
        return {"recipe": self.recipe.to_dict(), "budget": str(self.budget), "quality": self.quality,
                "latency": self.latency, "dense_latency": self.dense_latency, "speedup": self.speedup,
                "predicted_latency": self.predicted_latency, "backend": self.backend, "finetuned": self.finetuned,
                "chosen": self.chosen, "evaluations": self.evaluations, "shift": self.shift,
                "front": self.front, "points": self.points, "uniform": self.uniform, "latency_table": self.table,
                "plans_cached": self.plans_cached, "seconds": self.seconds}

    def summary(self) -> str:
        from sparsecc.report import format_table
        dense = self.table.get("dense_seconds", self.dense_latency)
        rows = [[p["name"], f"{p['latency'] * 1e3:.2f}", f"{dense / p['latency']:.2f}x",
                 f"{p['quality']:.4f}", "yes" if self.budget.met(p["quality"]) else "no"]
                for p in [*self.uniform, *[dict(q, name="tuned front") for q in self.front]]]
        head = (f"tuned recipe on {self.backend}: {self.budget.name} {self.quality:.4f} (budget {self.budget}), "
                f"{self.latency * 1e3:.2f} ms vs dense {self.dense_latency * 1e3:.2f} ms = {self.speedup:.2f}x "
                f"(measured end to end; the table predicted {self.predicted_latency * 1e3:.2f} ms)"
                + (", after fine-tuning" if self.finetuned else ""))
        levels = "per layer: " + self.chosen.get("levels", "")
        stages = ", ".join(f"{k} {v:.0f}s" for k, v in self.seconds.items())
        return "\n".join([head, levels, f"{self.evaluations} candidates measured; {stages}",
                          format_table(["setting", "ms (table)", "speedup", self.budget.name, "within budget"],
                                       rows, align="lrrrl")])

    def save(self, out_dir: str, png: bool = True) -> list[str]:
        """recipe.toml, front.json, summary.txt and (with matplotlib) front.png in `out_dir`; the paths written."""
        import json
        import os

        from sparsecc.io import write_text
        from sparsecc.layouts.plot import plotting_available
        from sparsecc.tune.plot import save_front_png

        os.makedirs(out_dir, exist_ok=True)
        paths = [os.path.join(out_dir, name) for name in ("recipe.toml", "front.json", "summary.txt")]
        self.recipe.save(paths[0])
        write_text(paths[1], json.dumps(self.to_dict(), indent=2, default=str) + "\n")
        write_text(paths[2], self.summary() + "\n")
        if png and plotting_available():
            paths.append(os.path.join(out_dir, "front.png"))
            save_front_png(self, paths[-1])
        return paths


class _Tuner:
    """The state of one tune: the capture, the levels' plans, the latency table, the measured candidates."""

    def __init__(self, model, captured, levels: dict, budget: Budget, calibration: list, held: list,
                 backend: str, backend_options: Optional[dict], finetune: Optional[dict], flow_fit: dict,
                 seed: int, bar):
        self.model, self.captured, self.levels, self.budget = model, captured, levels, budget
        self.calibration, self.held, self.bar = calibration, held, bar
        self.backend, self.backend_options, self.finetune_args = backend, backend_options, finetune
        self.flow_fit, self.seed = flow_fit, seed
        self.plans: dict = {}  # (slot, level index from 1) -> {region name: Plan}
        self.regions: dict = {}  # (slot, layer) -> the region names of the unit (a flowed layer: its block's)
        self.flow_blocks: dict = {}  # layer -> its flow block's number (TokenFlow.keep / skip count them)
        self.flow_count = 0  # the model's flow blocks (those left out of the search among them)
        self.measured: dict = {}  # candidate -> quality
        self.finetuned: dict = {}  # candidate -> (quality after fine-tuning, the fine-tuned model)
        self._dense_on_backend = None
        self.teacher_outputs = None

    def compile(self, recipe: Recipe, backend: str = "eager", plans: Optional[dict] = None,
                calibration: Any = None):
        quiet = logging.getLogger("sparsecc")  # density notes, once per candidate, would bury the progress bar
        level = quiet.level
        quiet.setLevel(logging.ERROR)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                return compile(copy.deepcopy(self.captured), None, recipe=recipe, backend=backend, plans=plans,
                               calibration=calibration, check=False, progress=False,
                               backend_options=self.backend_options if backend == self.backend else None)
        finally:
            quiet.setLevel(level)

    def outputs(self, sm) -> list:
        with torch.no_grad():
            return [call_with_inputs(sm, b) for b in self.held]

    # -- levels -------------------------------------------------------------------------------------------
    def plan_levels(self, cache: PlanCache, weights_key: str) -> None:
        """Compile each level on every region of its slot, calibrated (or read from `cache`): its plans, and
        which layers took it."""
        teacher = self.compile(Recipe.dense())
        self.teacher_outputs = self.outputs(teacher)
        for slot, configs in self.levels.items():
            eligible = None
            flow_gates = None  # the trained gates every flow level shares (trained when a level is not cached)
            for k, cfg in enumerate(configs, start=1):
                # a flow level's plans are its share of one training: the training's arguments are part of the key
                key = plans_key(weights_key, self.calibration,
                                cfg if slot != "flow" else (cfg, self.flow_fit, self.seed, sorted(configs, key=repr)))
                found = cache.get(key)
                if found is None:
                    if slot == "flow":
                        flow_gates = flow_gates or self.train_flow_gates(configs)
                        found = self.flow_level(flow_gates, cfg.keep)
                    else:
                        found = self.calibrate_level(slot, cfg)
                    cache.put(key, *found)
                rewritten, self.plans[(slot, k)] = found
                eligible = set(rewritten) if eligible is None else eligible & set(rewritten)
                for layer, names in rewritten.items():
                    self.regions[(slot, layer)] = tuple(names)
                self.bar.update(1)
            if slot == "flow":  # every level's plans number the blocks (gate_plans' "block")
                self.flow_blocks = {layer: self.plans[("flow", 1)][names[0]].values["block"]
                                    for (s, layer), names in self.regions.items() if s == "flow"}
                self.flow_count = 1 + max(p.values["block"] for p in self.plans[("flow", 1)].values())
            for layer in sorted({lay for (s, lay) in self.regions if s == slot} - (eligible or set())):
                log.warning("tune: %s of layer %d is left dense: not every level of the slot applies to it",
                            slot, layer)
                del self.regions[(slot, layer)]

    def calibrate_level(self, slot: str, cfg: Any) -> tuple[dict, dict]:
        """({layer: region name} the level rewrote, {region name: Plan})."""
        self.bar.set_postfix_str(f"calibrating {slot} {describe_config(cfg)}")
        other = {s: None for s in ("attention", "ffn", "flow") if s != slot}
        try:
            sm = self.compile(Recipe(**{slot: cfg}, **other), calibration=self.calibration)
        except UnsupportedError as err:
            raise UnsupportedError(f"tune: the level {describe_config(cfg)} of {slot} cannot be applied: "
                                   f"{err}") from err
        rewritten = {r.layer: [r.name] for r in sm.report().regions
                     if r.kind == slot and r.sparse is not None and r.layer is not None}
        return rewritten, {name: sm.plans[name] for names in rewritten.values() for name in names if name in sm.plans}

    def train_flow_gates(self, configs: list):
        """The flow levels' shared gates: trained once on the calibration batches, at the lowest kept fraction,
        distilling the dense model with its weights frozen (so the flow levels compose with the dense weights)."""
        import dataclasses

        from sparsecc.train.flow import fit_flow

        lowest = min(c.keep for c in configs)
        self.bar.set_postfix_str(f"training the flow gates at keep {lowest:g}")
        sm = self.compile(Recipe(attention=None, ffn=None, flow=dataclasses.replace(configs[0], keep=lowest)))
        args = {"steps": 100, **self.flow_fit, "train_model": False, "calibrate": False, "progress": False}
        with torch.random.fork_rng():
            torch.manual_seed(self.seed)
            fit_flow(sm, self.calibration, teacher=self.model, **args)
        sm.eval()
        return sm

    def flow_level(self, sm, keep: float) -> tuple[dict, dict]:
        """({layer: the block's region names}, {region name: Plan with the gates}) of the flow level `keep`: the
        trained gates with every threshold calibrated, block after block, to keep `keep` of the calibration tokens."""
        from sparsecc.methods.token_flow.fit import calibrate_keep

        self.bar.set_postfix_str(f"calibrating the flow thresholds for keep {keep:g}")
        with torch.no_grad():
            sm.flow_gates.shift.zero_()
        calibrate_keep(sm, self.calibration, keep=keep)
        plans = sm.gate_plans()
        for plan in plans.values():
            plan.values["keep"] = keep
        return {seg.layer: [r.name for r in seg.regions] for seg in sm.flow.segments}, plans

    def level_key(self, slot: str, k: int) -> str:
        return f"{slot}:{describe_config(self.levels[slot][k - 1])}"

    def recipe(self, space: search.SearchSpace, c: search.Candidate) -> Recipe:
        slots: dict = {"attention": None, "ffn": None, "flow": None}
        flow_keeps: dict = {}  # flow block -> kept fraction
        for (slot, layer), lv in zip(space.units, c):
            if lv and slot == "flow":
                flow_keeps[self.flow_blocks[layer]] = self.levels[slot][lv - 1].keep
            elif lv:
                slots[slot] = slots[slot] or {}
                slots[slot][str(layer)] = self.levels[slot][lv - 1]
        if flow_keeps:  # one config for the model: a kept fraction per block, the dense blocks skipped
            import dataclasses
            blocks = range(self.flow_count)
            slots["flow"] = dataclasses.replace(
                self.levels["flow"][0], keep=tuple(flow_keeps.get(b, 1.0) for b in blocks),
                skip=tuple(b for b in blocks if b not in flow_keeps))
        return Recipe(**slots)

    def plans_for(self, space: search.SearchSpace, c: search.Candidate) -> dict:
        out = {}
        for (slot, layer), lv in zip(space.units, c):
            if lv:
                for name in self.regions[(slot, layer)]:
                    plan = self.plans[(slot, lv)].get(name)
                    if plan is not None:
                        out[name] = plan
        return out

    def dense_on_backend(self):
        if self._dense_on_backend is None:
            self._dense_on_backend = self.compile(Recipe.dense(), backend=self.backend)
        return self._dense_on_backend

    # -- latency ------------------------------------------------------------------------------------------
    def measure_latency(self, table: LatencyTable, example: Any, repeats: int, warmup: int) -> None:
        for slot, configs in self.levels.items():
            regions = sum(1 for (s, _) in self.regions if s == slot)
            for k, cfg in enumerate(configs, start=1):
                key = self.level_key(slot, k)
                if key in table:
                    continue
                self.bar.set_postfix_str(f"timing {key} on {self.backend}")
                dense = self.dense_on_backend()
                other = {s: None for s in ("attention", "ffn", "flow") if s != slot}
                sm = self.compile(Recipe(**{slot: cfg}, **other), backend=self.backend,
                                  plans=self.plans[(slot, k)])
                with torch.no_grad():
                    d, s = interleaved_medians([lambda: call_with_inputs(dense, example),
                                                lambda: call_with_inputs(sm, example)], repeats, warmup)
                table.put(key, s, d, regions)
                self.bar.update(1)

    # -- quality ------------------------------------------------------------------------------------------
    def quality(self, space: search.SearchSpace, c: search.Candidate) -> float:
        if c not in self.measured:
            sm = self.compile(self.recipe(space, c), plans=self.plans_for(space, c))
            self.measured[c] = self.budget.measure(self.outputs(sm), self.teacher_outputs, self.held)
            self.bar.update(1)
        return self.measured[c]

    def finetuned_model(self, space: search.SearchSpace, c: search.Candidate):
        from sparsecc.train.finetune import finetune
        args = dict(self.finetune_args)
        batches = args.pop("batches", None) or self.calibration
        sm = self.compile(self.recipe(space, c), plans=self.plans_for(space, c))
        finetune(sm, batches, teacher=self.model, progress=False, **args)
        sm.eval()
        return sm

    def quality_after_finetune(self, space: search.SearchSpace, c: search.Candidate) -> float:
        # the dense candidate is the teacher: fine-tuning it toward itself only adds AdamW's noise (its
        # normalised steps are lr-sized however small the gradient: 100 steps took MiniLM to top10 0.93)
        if self.finetune_args is None or c == space.dense:
            return self.quality(space, c)
        if c not in self.finetuned:
            sm = self.finetuned_model(space, c)
            self.finetuned[c] = (self.budget.measure(self.outputs(sm), self.teacher_outputs, self.held), sm)
            self.bar.update(1)
        return self.finetuned[c][0]


def tune(model: torch.nn.Module, example_inputs: Any, calibration: list, budget: Union[str, Budget] = "cosine>=0.98",
         backend: str = "eager", methods: Any = None, eval_batches: Optional[list] = None,
         finetune: Optional[dict] = None, flow_fit: Optional[dict] = None, seed: int = 0, generations: int = 30,
         offspring: int = 4, patience: int = 8, cache_dir: Any = _UNSET, latency: Optional[dict] = None,
         repeats: int = 10, warmup: int = 2, backend_options: Optional[dict] = None,
         progress: bool = True) -> TuneResult:
    """The fastest per-layer recipe for `model` on `backend` whose quality on held-out data meets `budget`.

    calibration: batches (as example_inputs) for the methods' plans; without `eval_batches` the last half
    of them is held out to measure quality, and only the first half calibrates.
    budget: a Budget or "metric>=value" / "metric<=value" (metrics: cosine, topK, kl, mse; sparsecc.tune.budget).
    methods: the slots to vary (["attention", "ffn"], the default; or ["flow"], token flow's kept fractions,
      searched alone) with default levels, or {slot: [configs]} in any order (ordered by their measured saving).
    finetune: None, or sparsecc.finetune arguments ({"steps": 100, "lr": 5e-5, ...}; "batches" defaults to
      the calibration batches): the global shift then measures quality after fine-tuning, and the tuned
      model returned is fine-tuned, unless fine-tuning made it no better (then it is returned as measured,
      `result.finetuned` is False and `result.chosen["finetuned_quality"]` says what fine-tuning gave).
    flow_fit: with methods=["flow"], sparsecc.train.flow.fit_flow arguments for the one training of the gates the
      flow levels share ({"steps": 100} by default; the weights stay frozen); a recipe with token flow carries
      trained gates, so keep `result.model` (sparsecc.save) rather than compiling its recipe again.
    cache_dir: where the latency table and each level's calibrated plans are cached (default $SPARSECC_CACHE or
      ~/.cache/sparsecc; None: no cache); a second tune of the model with the same calibration batches, with
      any budget, calibrates and times nothing again.
    latency: seconds measured elsewhere, e.g. on the target device: {"dense": s, "<slot>:<level>": s, ...} with
      the level keys of `result.table` ("ffn:sparse_ffn(n=8)"); used instead of measuring those levels here.
    Raises TuneError (with the best point it measured) when no sparse setting meets the budget.
    """
    started = time.perf_counter()
    budget = Budget.parse(budget) if isinstance(budget, str) else budget
    if not isinstance(budget, Budget):
        raise InputError(f"tune: budget={budget!r}; expected a sparsecc.tune.Budget or a string like 'cosine>=0.98'")
    get_backend(backend, backend_options).prepare()
    calibration, held = _split(calibration, eval_batches)
    if finetune is not None and not isinstance(finetune, dict):
        raise InputError(f"tune: finetune={finetune!r}; expected None or a dict of sparsecc.finetune arguments "
                         "(e.g. {'steps': 100, 'lr': 5e-5})")
    if flow_fit is not None and not isinstance(flow_fit, dict):
        raise InputError(f"tune: flow_fit={flow_fit!r}; expected None or a dict of sparsecc.train.flow.fit_flow "
                         "arguments (e.g. {'steps': 200})")
    seconds: dict = {}
    bar = _bar(progress)
    try:
        stage = time.perf_counter()
        bar.set_postfix_str("capturing")
        captured = capture(model, example_inputs, dynamic=True)
        analysis = analyze(copy.deepcopy(captured))  # for a clear error before any calibration
        levels = _levels(methods, _seq_len(captured))
        # a flow block holds its layer's attention and FFN regions
        kinds = set(levels) - {"flow"} | ({"attention", "ffn"} if "flow" in levels else set())
        if not any(r.kind in kinds for r in analysis.ctx.regions):
            raise UnsupportedError(f"tune: the model has no {' or '.join(levels)} region to vary; `sparsecc inspect "
                                   "--explain` shows what was found and why")
        tuner = _Tuner(model, captured, levels, budget, calibration, held, backend, backend_options, finetune,
                       dict(flow_fit or {}), seed, bar)
        cache_dir = default_cache_dir() if cache_dir is _UNSET else cache_dir
        plan_cache = PlanCache(cache_dir)
        tuner.plan_levels(plan_cache, fingerprint(model, example_inputs, "plans", None))
        seconds["plan levels"] = time.perf_counter() - stage

        stage = time.perf_counter()
        key = fingerprint(model, example_inputs, backend, backend_options)
        table = LatencyTable(key, cache_dir)
        if latency:
            table.give(latency, {slot: sum(1 for (s, _) in tuner.regions if s == slot) for slot in levels})
        tuner.measure_latency(table, example_inputs, repeats, warmup)
        seconds["latency table"] = time.perf_counter() - stage

        # each slot's levels from the least to the most saving
        for slot in list(levels):
            order = sorted(range(1, len(levels[slot]) + 1), key=lambda k: table.region_saving(tuner.level_key(slot, k)))
            levels[slot] = [levels[slot][k - 1] for k in order]
            tuner.plans.update({(slot, i): p for i, p in enumerate([tuner.plans[(slot, k)] for k in order], 1)})
        units = sorted(tuner.regions, key=lambda u: (u[1], list(levels).index(u[0])))
        space = search.SearchSpace(
            units=units, levels=[len(levels[s]) for s, _ in units],
            savings=[[0.0] + [table.region_saving(tuner.level_key(s, k)) for k in range(1, len(levels[s]) + 1)]
                     for s, _ in units])

        def quality(c):
            return tuner.quality(space, c)

        stage = time.perf_counter()
        bar.set_postfix_str("uniform settings")
        uniform = _uniform(tuner, space, table, quality)
        seconds["uniform"] = time.perf_counter() - stage

        stage = time.perf_counter()
        reference = quality(space.dense)
        bar.set_postfix_str("sensitivity")
        sens = search.sensitivity(space, quality)
        if not any(budget.met(q) for q in sens.values()):
            raise _nothing_meets(tuner, space, table, budget)
        best = search.seed(space, sens, quality, budget, reference)
        if best.candidate == space.dense:
            message = (f"tune: no level that saves time on {backend} at this shape stays within the budget {budget} "
                       "(the latency table: " + ", ".join(f"{k} {e['seconds'] * 1e3:.2f} ms vs dense "
                                                         f"{e['dense_seconds'] * 1e3:.2f} ms"
                                                         for k, e in table.entries.items())
                       + "); the fastest model within the budget is the dense one")
            log.warning("%s", message)
            warnings.warn(message, UserWarning, stacklevel=2)
        seconds["sensitivity and seed"] = time.perf_counter() - stage
        stage = time.perf_counter()
        bar.set_postfix_str("evolution")
        best = search.evolve(space, best, quality, budget, seed_value=seed, generations=generations,
                             offspring=offspring, patience=patience)
        seconds["evolution"] = time.perf_counter() - stage
        stage = time.perf_counter()
        bar.set_postfix_str("global shift" + (" (fine-tuned)" if finetune else ""))
        best, shifted = search.shift(space, best, lambda c: tuner.quality_after_finetune(space, c), budget)
        seconds["global shift"] = time.perf_counter() - stage

        stage = time.perf_counter()
        bar.set_postfix_str(f"timing the tuned model on {backend}")
        slower = None
        recipe, plans = tuner.recipe(space, best.candidate), tuner.plans_for(space, best.candidate)
        dense_sm = tuner.dense_on_backend()
        if best.candidate == space.dense:  # the dense model itself: timing it twice would report noise as speed
            tuned_sm = dense_sm
            with torch.no_grad():
                dense_s = tuned_s = interleaved_medians([lambda: call_with_inputs(dense_sm, example_inputs)],
                                                        repeats, warmup)[0]
        else:
            tuned_sm = tuner.compile(recipe, backend=backend, plans=plans)
            with torch.no_grad():
                dense_s, tuned_s = interleaved_medians([lambda: call_with_inputs(dense_sm, example_inputs),
                                                        lambda: call_with_inputs(tuned_sm, example_inputs)],
                                                       repeats, warmup)
            # the table's sum of per-layer savings did not hold end to end (when the table was timed here: seconds
            # given with latency=, from the target device, are not this machine's to overrule)
            if tuned_s > dense_s and not latency:
                slower = {"levels": _describe(tuner, space, best.candidate), "measured_latency": tuned_s,
                          "measured_dense_latency": dense_s}
                message = (f"tune: the tuned recipe ({slower['levels']}) measured {tuned_s * 1e3:.2f} ms end to end on "
                           f"{backend}, the dense model {dense_s * 1e3:.2f} ms beside it (the latency table predicted "
                           f"{(table.dense_seconds - best.latency_saving) * 1e3:.2f} ms against "
                           f"{table.dense_seconds * 1e3:.2f}); the fastest model within the budget is the dense one")
                log.warning("%s", message)
                warnings.warn(message, UserWarning, stacklevel=2)
                best = search.Best(space.dense, quality(space.dense), 0.0)
                recipe, tuned_sm, tuned_s = tuner.recipe(space, space.dense), dense_sm, dense_s
        final_quality = tuner.quality_after_finetune(space, best.candidate)
        finetuned = best.candidate in tuner.finetuned
        plain = tuner.measured.get(best.candidate)
        if finetuned and plain is not None and budget.met(plain) and not budget.better(final_quality, plain):
            # fine-tuning the answer did not improve it (100 steps of AdamW can move a good model away): the
            # answer as the search measured it; fine-tuned, it kept final_quality
            log.warning("tune: fine-tuning the tuned recipe gave %s %.4f, not better than its %.4f without; "
                        "returning it without fine-tuning", budget.name, final_quality, plain)
            chosen_note = {"finetuned_quality": final_quality}
            final_quality, finetuned = plain, False
        else:
            chosen_note = {}
        model_out = tuner.finetuned[best.candidate][1] if finetuned else tuned_sm
        seconds["end to end"] = time.perf_counter() - stage
        seconds["total"] = time.perf_counter() - started
    finally:
        bar.close()
    dense_table = table.dense_seconds
    points = [_point(tuner, space, c, q, dense_table) for c, q in tuner.measured.items()]
    chosen = dict(_point(tuner, space, best.candidate, final_quality, dense_table), measured_latency=tuned_s,
                  measured_dense_latency=dense_s)
    if slower is not None:
        chosen["slower_end_to_end"] = slower  # the sparse answer the end-to-end timing turned down
    chosen.update(chosen_note)
    return TuneResult(recipe=recipe, budget=budget, quality=final_quality, latency=tuned_s, dense_latency=dense_s,
                      predicted_latency=dense_table - best.latency_saving, backend=backend, model=model_out,
                      points=points, uniform=uniform, chosen=chosen,
                      evaluations=len(tuner.measured) + len(tuner.finetuned), shift=shifted, table=table.to_dict(),
                      seconds=seconds, finetuned=finetuned, plans_cached=plan_cache.hits)


def _split(calibration: Any, eval_batches: Optional[list]) -> tuple[list, list]:
    if not isinstance(calibration, (list, tuple)) or not calibration:
        raise InputError(f"tune: calibration must be a non-empty list of batches (as example_inputs), got "
                         f"{type(calibration).__name__}")
    calibration = list(calibration)
    if eval_batches is not None:
        if not isinstance(eval_batches, (list, tuple)) or not eval_batches:
            raise InputError("tune: eval_batches must be a non-empty list of batches")
        return calibration, list(eval_batches)
    if len(calibration) < 2:
        raise InputError(f"tune: {len(calibration)} calibration batch; quality is measured on held-out data, so give "
                         "at least 2 (the last half is held out) or pass eval_batches=")
    half = len(calibration) // 2
    return calibration[: len(calibration) - half], calibration[len(calibration) - half:]


def _uniform(tuner: _Tuner, space: search.SearchSpace, table: LatencyTable, quality) -> list:
    """Each level on every layer of its slot, and (with two slots) every pair of levels on both."""
    out = []
    slots = list(tuner.levels)

    def at(levels_by_slot: dict) -> search.Candidate:
        return tuple(levels_by_slot.get(slot, 0) for slot, _ in space.units)

    for slot in slots:
        for k, cfg in enumerate(tuner.levels[slot], start=1):
            c = at({slot: k})
            # the level's saving against the dense run timed beside it, off the table's dense latency: the
            # same scale as every other point (a level's raw seconds carry the drift of its own minute)
            out.append({"name": f"{slot} {describe_config(cfg)}", "slot": slot, "quality": quality(c),
                        "latency": table.dense_seconds - space.latency_saving(c), "measured": True})
    if len(slots) == 2:
        a, f = slots
        for i in range(1, len(tuner.levels[a]) + 1):
            for j in range(1, len(tuner.levels[f]) + 1):
                c = at({a: i, f: j})
                out.append({"name": f"{describe_config(tuner.levels[a][i - 1])} + "
                                    f"{describe_config(tuner.levels[f][j - 1])}", "slot": "both",
                            "quality": quality(c), "latency": table.dense_seconds - space.latency_saving(c),
                            "measured": False})
    return out


def _point(tuner: _Tuner, space: search.SearchSpace, c: search.Candidate, q: float, dense: float) -> dict:
    return {"levels": _describe(tuner, space, c), "latency": dense - space.latency_saving(c), "quality": q,
            "within_budget": tuner.budget.met(q), "measured": False}


def _describe(tuner: _Tuner, space: search.SearchSpace, c: search.Candidate) -> str:
    parts = []
    for (slot, layer), lv in zip(space.units, c):
        parts.append(f"{layer}.{slot}=" + ("dense" if lv == 0 else describe_config(tuner.levels[slot][lv - 1])))
    return " ".join(parts)


def _nothing_meets(tuner: _Tuner, space: search.SearchSpace, table: LatencyTable, budget: Budget) -> TuneError:
    tried = [(c, q) for c, q in tuner.measured.items() if c != space.dense]
    if not tried:
        return TuneError(f"tune: no candidate was measured against the budget {budget}", None)
    c, q = max(tried, key=lambda cq: (cq[1] if budget.higher_is_better else -cq[1]))
    best = _point(tuner, space, c, q, table.dense_seconds)
    return TuneError(f"tune: no sparse setting meets the budget {budget} on the held-out data. The best measured was "
                     f"{budget.name} {q:.4g} ({best['levels']}, {table.dense_seconds / best['latency']:.2f}x by the "
                     "latency table). Loosen the budget, add gentler levels (methods={slot: [configs]}), or pass "
                     "finetune={'steps': ...} to recover quality", best)


class _NoBar:
    def update(self, n: int = 1) -> None:
        pass

    def set_postfix_str(self, text: str) -> None:
        log.info("tune: %s", text)

    def close(self) -> None:
        pass


def _bar(enabled: bool):
    if not enabled:
        return _NoBar()
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover
        return _NoBar()
    return tqdm(desc="tune", unit="model", leave=False)


__all__ = ["TuneResult", "tune", "default_levels"]

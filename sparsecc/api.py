"""The public entry points: inspect() and compile(), and the SparseModel they build."""

from __future__ import annotations

import logging
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
import torch.fx as fx
from torch import nn

from sparsecc.capture import Captured, capture
from sparsecc.errors import UnsupportedError
from sparsecc.graph.canonicalize import CANONICALIZE
from sparsecc.graph.fx_utils import SDPA, aten, is_call, module_path
from sparsecc.graph.regions import Region, find_regions
from sparsecc.passes.identity import attention_to_op, ffn_to_op
from sparsecc.passes.manager import Pass, PassContext, PassManager, PassResult
from sparsecc.recipe import Identity, Recipe, SparseFFN, Spion

log = logging.getLogger("sparsecc")

BACKENDS = ("eager", "inductor", "onnxruntime", "triton")


@dataclass
class GraphSummary:
    nodes: int
    ops: dict
    parameters: int
    inputs: list

    def to_dict(self) -> dict:
        return dict(self.__dict__)


@dataclass
class Report:
    """What sparsecc found (and did) in a model."""

    model: str
    regions: list  # list[Region]
    graph: GraphSummary
    passes: list = field(default_factory=list)  # list[PassResult]
    unmatched: list = field(default_factory=list)  # "why not" notes for attention-like nodes left alone
    stage_seconds: dict = field(default_factory=dict)

    @property
    def attention(self) -> list:
        return [r for r in self.regions if r.kind == "attention"]

    @property
    def ffn(self) -> list:
        return [r for r in self.regions if r.kind == "ffn"]

    def dense_flops(self) -> int:
        return sum(r.flops for r in self.regions)

    def to_dict(self) -> dict:
        return {"model": self.model, "regions": [r.to_dict() for r in self.regions],
                "graph": self.graph.to_dict(), "unmatched": list(self.unmatched),
                "passes": [{"name": p.name, "changes": len(p.changes), "seconds": p.seconds,
                            "max_abs_error": p.max_abs_error} for p in self.passes],
                "stage_seconds": dict(self.stage_seconds)}

    def table(self) -> str:
        from sparsecc.report import region_table
        return region_table(self)

    def __str__(self) -> str:
        return self.table()


def graph_summary(gm: fx.GraphModule, captured: Captured) -> GraphSummary:
    ops = Counter(str(n.target) for n in gm.graph.nodes if n.op == "call_function")
    inputs = [n.name for n in gm.graph.nodes if n.op == "placeholder"]
    params = sum(p.numel() for p in gm.parameters())
    return GraphSummary(nodes=len(gm.graph.nodes), ops=dict(ops.most_common()), parameters=params, inputs=inputs)


def _unmatched(gm: fx.GraphModule, regions: list) -> list[str]:
    """Attention-looking nodes that no region covers, with the reason."""
    notes = []
    covered = {r.sdpa for r in regions if r.kind == "attention"}
    for node in gm.graph.nodes:
        if is_call(node, aten.softmax.int, aten._softmax.default):
            notes.append(f"softmax {node.name} at {module_path(node) or '?'}: not rewritten to SDPA (its "
                         "input is not matmul*scale+mask, or its probabilities are also used elsewhere, "
                         "e.g. output_attentions=True)")
        elif is_call(node, SDPA) and node not in covered:
            notes.append(f"SDPA {node.name} at {module_path(node) or '?'}: no region")
    for r in regions:
        if r.kind == "attention" and (r.q_proj is None or r.o_proj is None):
            missing = [n for n, p in (("q", r.q_proj), ("k", r.k_proj), ("v", r.v_proj), ("out", r.o_proj))
                       if p is None]
            notes.append(f"attention {r.name}: projection(s) {missing} not found (fine for the SDPA rewrite; "
                         "methods that need the projections skip this region)")
    return notes


def _canonicalize_passes() -> list[Pass]:
    return [Pass(name, fn) for name, fn in CANONICALIZE]


def _analyze(model: Any, example_inputs: Any, dynamic: bool, check: bool, dump_dir: Optional[str]):
    """Capture (unless given a Captured already), canonicalize, find regions."""
    times = {}
    start = time.perf_counter()
    captured = model if isinstance(model, Captured) else capture(model, example_inputs, dynamic=dynamic)
    times["capture"] = time.perf_counter() - start
    ctx = PassContext(captured=captured)
    manager = PassManager(_canonicalize_passes(), check="each" if check else "none", dump_dir=dump_dir)
    start = time.perf_counter()
    results = manager.run(captured.gm, ctx)
    times["canonicalize"] = time.perf_counter() - start
    start = time.perf_counter()
    ctx.regions = find_regions(captured.gm, captured)
    times["find_regions"] = time.perf_counter() - start
    return captured, ctx, results, times


def inspect(model: Any, example_inputs: Any = None, dynamic: bool = True, check: bool = False,
            dump_dir: Optional[str] = None) -> Report:
    """Capture and canonicalize `model` and report its attention and FFN regions (nothing is rewritten).

    `model` may also be a `sparsecc.capture.Captured` (e.g. from `load_exported("m.pt2")`).
    """
    captured, ctx, results, times = _analyze(model, example_inputs, dynamic, check, dump_dir)
    return Report(model=captured.model_name, regions=ctx.regions, graph=graph_summary(captured.gm, captured),
                  passes=results, unmatched=_unmatched(captured.gm, ctx.regions), stage_seconds=times)


def _prepare_spion(cfg: Spion, ctx: PassContext, calibration: Any) -> None:
    """Layouts for every self-attention region: loaded, calibrated, or fixed."""
    from sparsecc.calibrate import collect_attention_maps
    from sparsecc.layouts import LayoutSet
    from sparsecc.passes.spion import make_layouts

    regions = [r for r in ctx.regions if r.kind == "attention" and not r.cross]
    if cfg.layouts is not None:
        ctx.data["layouts"] = LayoutSet.load_dir(cfg.layouts)
        return
    maps = None
    if cfg.needs_calibration:
        if calibration is None:
            log.warning("recipe.attention method %r calibrates on data; no calibration batches were given, so "
                        "the example inputs are used. Pass calibration=[inputs, ...] with real data.", cfg.method)
            calibration = [(ctx.captured.args, ctx.captured.kwargs)]
        maps = collect_attention_maps(ctx.captured, ctx.captured.gm, regions, calibration)
        ctx.data["attention_maps"] = maps
    ctx.data["layouts"] = make_layouts(cfg, regions, maps)


def _rewrite_passes(recipe: Recipe, ctx: PassContext, calibration: Any) -> list[Pass]:
    passes = []
    if isinstance(recipe.attention, Spion):
        from sparsecc.passes.spion import spion_rewrite
        _prepare_spion(recipe.attention, ctx, calibration)
        passes.append(Pass("spion", spion_rewrite, tolerance=None))
    if isinstance(recipe.attention, Identity):
        passes.append(Pass("attention_identity", attention_to_op))
    if isinstance(recipe.ffn, SparseFFN):
        from sparsecc.passes.sparse_ffn import prepare_sparse_ffn, sparse_ffn_rewrite
        prepare_sparse_ffn(recipe.ffn, ctx, calibration)
        passes.append(Pass("sparse_ffn", sparse_ffn_rewrite, tolerance=None))
    if isinstance(recipe.ffn, Identity):
        passes.append(Pass("ffn_identity", ffn_to_op))
    if recipe.flow is not None:
        from sparsecc.passes.token_flow import prepare_token_flow, token_flow_rewrite
        if isinstance(recipe.attention, Spion):
            raise UnsupportedError("recipe.flow with recipe.attention=Spion: block layouts need every query of a "
                                   "block, token flow removes queries; use one of them (attention=None or "
                                   "Identity() with flow)")
        prepare_token_flow(recipe.flow, ctx)
        # not checked against the dense outputs: padding tokens never flow, so their rows differ by design
        passes.append(Pass("token_flow", token_flow_rewrite, tolerance=None))
    return passes


class SparseModel(nn.Module):
    """The compiled model: an nn.Module that runs, trains, and reports what was rewritten."""

    def __init__(self, graph: fx.GraphModule, captured: Captured, recipe: Recipe, backend: str, report: Report,
                 layouts: Any = None, backend_options: Optional[dict] = None):
        super().__init__()
        self.graph_module = graph
        self.layouts = layouts  # sparsecc.layouts.LayoutSet of the SPION regions, or None
        self.recipe = recipe
        self.backend = backend
        self._call_defaults = dict(captured.call_defaults)
        self._report = report
        self.example_inputs = (captured.args, captured.kwargs)  # for export_onnx
        self.dynamic = captured.dynamic
        # the runner comes from the backend (sparsecc.backends): the graph itself, torch.compile, an ORT session
        from sparsecc.backends import LoweringInputs, get_backend
        self._runner = get_backend(backend, backend_options).lower(graph, LoweringInputs(
            tuple(captured.args), {**self._call_defaults, **captured.kwargs}, recipe=recipe, regions=report.regions,
            dynamic=captured.dynamic))

    def forward(self, *args, **kwargs):
        return self._runner(*args, **{**self._call_defaults, **kwargs})

    def train(self, mode: bool = True) -> "SparseModel":
        """Set the training flag. The graph computes the same in both modes: it was captured in eval
        mode (no dropout), and torch.export's graph modules do not switch modes."""
        self.training = mode
        return self

    def report(self) -> Report:
        return self._report

    @property
    def regions(self) -> list[Region]:
        return self._report.regions

    def export_onnx(self, path: str, dynamic: bool = True, opset: Optional[int] = None) -> str:
        """Write the compiled graph as ONNX (sparsecc ops in standard ONNX ops, recipe and regions in the
        file's metadata); see sparsecc.backends.onnx. Returns `path`."""
        from sparsecc.backends.onnx import export_onnx
        return export_onnx(self, path, dynamic=dynamic, opset=opset).path

    def save_layouts(self, directory: str, png: bool = True) -> None:
        """Write the block layouts (one file per layer + index.json) and, optionally, their picture."""
        if not self.layouts:
            raise UnsupportedError("this model has no block layouts (its recipe has no SPION attention)")
        self.layouts.save_dir(directory)
        if png:
            import os
            from sparsecc.layouts import save_layout_png
            save_layout_png(self.layouts, os.path.join(directory, "layouts.png"))


def compile(model: nn.Module, example_inputs: Any, recipe: Optional[Recipe] = None, backend: str = "eager",
            calibration: Any = None, dynamic: bool = True, check: bool = True,
            dump_dir: Optional[str] = None, backend_options: Optional[dict] = None) -> SparseModel:
    """Capture `model`, find its regions, rewrite them as `recipe` says, and lower to `backend`.

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
        from sparsecc.errors import RecipeError
        raise RecipeError(f"recipe must be a sparsecc.Recipe, got {type(recipe).__name__}")
    if backend not in BACKENDS:
        raise UnsupportedError(f"backend {backend!r} is not available; expected one of {list(BACKENDS)}")
    from sparsecc.backends import get_backend  # before any work: options checked, says what is missing
    get_backend(backend, backend_options).prepare()  # (e.g. triton: a CUDA device; registers the CUDA kernels)
    captured, ctx, results, times = _analyze(model, example_inputs, dynamic, check, dump_dir)
    ctx.recipe = recipe
    report = Report(model=captured.model_name, regions=ctx.regions, graph=graph_summary(captured.gm, captured),
                    unmatched=_unmatched(captured.gm, ctx.regions), stage_seconds=times)
    start = time.perf_counter()
    passes = _rewrite_passes(recipe, ctx, calibration)
    times["calibrate"] = time.perf_counter() - start
    start = time.perf_counter()
    results += PassManager(passes, check="each" if check else "none", dump_dir=dump_dir).run(captured.gm, ctx)
    times["rewrite"] = time.perf_counter() - start
    report.passes = results
    report.unmatched += ctx.data.get("skipped", [])
    if "flow" in ctx.data:  # two graphs (training: soft gates; inference: gather/scatter), one set of weights
        from sparsecc.flow_model import FlowSparseModel
        return FlowSparseModel(captured.gm, captured, recipe, backend, report, layouts=ctx.data.get("layouts"),
                               backend_options=backend_options, flow=ctx.data["flow"])
    return SparseModel(captured.gm, captured, recipe, backend, report, layouts=ctx.data.get("layouts"),
                       backend_options=backend_options)

"""Sparse ONNX export: every `sparsecc::*` op lowered to STANDARD ONNX ops, so any provider runs the file.

    from sparsecc.backends.onnx import export_onnx
    export_onnx(sparse_model, "m.onnx")            # or sparse_model.export_onnx("m.onnx")

The export goes through `torch.onnx.export(..., dynamo=True, custom_translation_table=...)`. The
translations live with their ops: each op family's `onnx.py` (sparsecc/ops/<family>/onnx.py, helpers
in sparsecc.ops.onnx_lowering) gives `translations(ctx)` for one export, and this driver gathers
them, plus any registered here for other ops:

    @register_translation("sparsecc::my_op")
    def _my_op(x, w, flag: bool = False):
        return op.MatMul(x, w)

Options (`OnnxOptions`: block-sparse layout grouping, known layouts) are arguments of the export,
not module state. What travels in the file (`ModelProto.metadata_props`), so the file alone runs
and explains itself:
  - `sparsecc.recipe`: the recipe as JSON;
  - `sparsecc.regions`: JSON list, one entry per sparsecc op in graph order: op, fx node,
    region name, layer, module path, density (kept fraction: blocks for block-sparse
    attention, hidden units for sparse FFN; 1.0 for the identity ops);
  - `sparsecc.version`, `sparsecc.inputs` (input names), `sparsecc.dynamic`.
Block layouts (ELL kv_indices / kv_counts) and sparse-FFN controllers are graph tensors, so they
are initializers of the file. ONNX node metadata (`pkg.torch.onnx.fx_node`, set by the exporter)
names the sparsecc op each node came from; `sparsecc.backends.onnx_inspect` reads both.
"""

from __future__ import annotations

import importlib
import json
import logging
from dataclasses import dataclass
from functools import lru_cache
from types import ModuleType
from typing import Any, Callable, Optional

import torch
import torch.fx as fx

from sparsecc.errors import UnsupportedError
from sparsecc.io import atomic_write
from sparsecc.ops import FAMILIES
from sparsecc.ops.onnx_lowering import ExportContext, OnnxOptions
from sparsecc.version import __version__

__all__ = ["DEFAULT_OPSET", "ExportResult", "OnnxOptions", "TRANSLATIONS", "check_translatable", "export_graph",
           "export_onnx", "op_name", "region_records", "register_translation", "translation_table"]

log = logging.getLogger("sparsecc.backends.onnx")

DEFAULT_OPSET = 20

# "namespace::op" -> translation of ops outside the families (the families' own are gathered per export)
TRANSLATIONS: dict[str, Callable] = {}


def register_translation(op_name: str) -> Callable[[Callable], Callable]:
    """Decorator: register the ONNX translation of `op_name` ("sparsecc::name"), used by every export."""
    if "::" not in op_name:
        raise ValueError(f"op name {op_name!r}: expected 'namespace::name', e.g. 'sparsecc::attention'")

    def wrap(fn: Callable) -> Callable:
        TRANSLATIONS[op_name] = fn
        return fn
    return wrap


@lru_cache(maxsize=None)
def _family_modules() -> tuple[ModuleType, ...]:
    """The `onnx.py` of every op family (imported on the first export: they import onnxscript)."""
    return tuple(importlib.import_module(f"sparsecc.ops.{family}.onnx") for family in FAMILIES)


def _translations(ctx: ExportContext) -> dict[str, Callable]:
    """{op name: translation} for one export: the families' and the registered ones (those win)."""
    table: dict[str, Callable] = {}
    for module in _family_modules():
        table.update(module.translations(ctx))
    table.update(TRANSLATIONS)
    return table


def translatable() -> set[str]:
    """The op names that have an ONNX translation."""
    return {name for module in _family_modules() for name in module.OPS} | set(TRANSLATIONS)


def translation_table(gm: Optional[fx.GraphModule] = None, options: Optional[OnnxOptions] = None) -> dict:
    """{OpOverload: translation} for every translation whose op is loaded, for an export of `gm`."""
    ctx = ExportContext(gm if gm is not None else fx.GraphModule(torch.nn.Module(), fx.Graph()),
                        options or OnnxOptions())
    table = {}
    for name, fn in _translations(ctx).items():
        ns, short = name.split("::")
        packet = getattr(getattr(torch.ops, ns), short, None) if hasattr(torch.ops, ns) else None
        if packet is not None:
            try:
                table[packet.default] = fn
            except AttributeError:
                continue
    return table


def op_name(node: fx.Node) -> Optional[str]:
    """'sparsecc::x' for a call to a sparsecc op, else None."""
    target = node.target
    if node.op == "call_function" and isinstance(target, torch._ops.OpOverload) and target.namespace == "sparsecc":
        return target._schema.name
    return None


def check_translatable(gm: fx.GraphModule) -> None:
    """Raise UnsupportedError naming every sparsecc op of `gm` that has no ONNX translation."""
    known = translatable()
    missing = sorted({name for node in gm.graph.nodes if (name := op_name(node)) and name not in known})
    if missing:
        raise UnsupportedError(
            f"ONNX export: no ONNX translation for {', '.join(missing)} (found in the graph); translations "
            f"exist for {sorted(known)}. Add one to the op family's onnx.py, or register one with "
            "@sparsecc.backends.onnx.register_translation('<op>'), or compile with a recipe that does not "
            "produce this op, or use backend='eager'.")


def _density(gm: fx.GraphModule, node: fx.Node, name: str) -> Optional[float]:
    for module in _family_modules():
        if name in module.OPS and hasattr(module, "density"):
            return module.density(gm, node)
    return None


def max_len(gm: fx.GraphModule) -> Optional[int]:
    """The longest sequence every sparsecc op of `gm` covers (block layouts are made for a length), or
    None when no op limits it."""
    limits = []
    for node in gm.graph.nodes:
        name = op_name(node)
        for module in _family_modules():
            if name in getattr(module, "OPS", ()) and hasattr(module, "max_len"):
                limits.append(module.max_len(gm, node))
    limits = [n for n in limits if n is not None]
    return min(limits) if limits else None


def region_records(gm: fx.GraphModule, regions: Optional[list] = None) -> list[dict]:
    """One record per sparsecc op in graph order: op, fx node, region, layer, path, density."""
    from sparsecc.graph.fx_utils import module_path
    regions = list(regions or [])
    records = []
    for node in gm.graph.nodes:
        name = op_name(node)
        if name is None or name.endswith("_backward"):
            continue
        path = module_path(node)
        kind = "attention" if "attention" in name else "ffn"
        best = None
        for r in regions:
            if r.kind == kind and r.path is not None and (path == r.path or path.startswith(r.path + ".")
                                                          or r.path == ""):
                if best is None or len(r.path) > len(best.path):
                    best = r
        density = _density(gm, node, name)
        if best is not None and isinstance(best.sparse, dict) and density is None:
            density = best.sparse.get("density")
        records.append({"op": name, "fx_node": node.name, "kind": kind,
                        "region": best.name if best is not None else None,
                        "layer": best.layer if best is not None else _layer_from_path(path),
                        "path": best.path if best is not None else path, "density": density})
    return records


def _layer_from_path(path: str) -> Optional[int]:
    digits = [int(p) for p in path.split(".") if p.isdigit()]
    return digits[0] if digits else None


@dataclass
class ExportResult:
    """What `export_onnx` wrote: the path, the exported program it came from, and the region records."""

    path: str
    exported_program: Any  # torch.export.ExportedProgram (its call_spec maps inputs/outputs)
    regions: list
    dynamic: bool


def _copies_before_attention_views(gm: fx.GraphModule) -> int:
    """A contiguous copy before every view/reshape downstream of an SDPA (through view-like ops). The exporter
    decomposes SDPA again, into a kernel whose output strides differ from those the re-capture traced with,
    and a reshape traced as a view of `transpose(sdpa(...))` (T5's `.transpose(1, 2).contiguous().view(...)`
    when the CPU flash kernel left no copy to make) then fails. In ONNX the copy is an Identity."""
    from sparsecc.graph.fx_utils import SDPA, VIEW_LIKE, aten, is_call
    reshapes = (aten.view.default, aten.reshape.default, aten._unsafe_view.default)
    added = 0
    for node in list(gm.graph.nodes):
        if not is_call(node, SDPA):
            continue
        stack = list(node.users)
        while stack:
            user = stack.pop()
            if user.op != "call_function" or user.target not in VIEW_LIKE:
                continue
            if user.target in reshapes and isinstance(user.args[0], fx.Node) \
                    and not is_call(user.args[0], aten.clone.default):
                with gm.graph.inserting_before(user):
                    copy = gm.graph.call_function(aten.clone.default, (user.args[0],),
                                                  {"memory_format": torch.contiguous_format})
                copy.meta = dict(user.args[0].meta)
                user.args = (copy, *user.args[1:])
                added += 1
                continue
            stack.extend(user.users)
    return added


def _recapture(gm: fx.GraphModule, args: tuple, kwargs: dict, dynamic: bool,
               dynamic_shapes: Optional[tuple] = None) -> Any:
    """torch.export of the compiled graph: the explicit spec it was captured with, else dynamic batch /
    sequence dims where it allows, else static."""
    from sparsecc.capture import dynamic_shapes_for, recapture
    if dynamic_shapes is not None:
        return recapture(gm, args, kwargs, dynamic_shapes=dynamic_shapes)
    shapes = dynamic_shapes_for(gm, args, kwargs) if dynamic else None
    if shapes is not None:
        try:
            return torch.export.export(gm, args, kwargs, dynamic_shapes=shapes, strict=False)
        except Exception as err:  # noqa: BLE001 - retried with static shapes
            log.warning("dynamic re-capture failed (%s); exporting with static shapes", err)
    try:
        return torch.export.export(gm, args, kwargs, strict=False)
    except Exception as err:  # noqa: BLE001 - reported with what to do
        raise UnsupportedError(f"ONNX export: torch.export could not re-capture the compiled graph "
                               f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}); "
                               "try dynamic=False") from err


def output_names(out_spec: Any) -> list[str]:
    """The names of the model's outputs, from the pytree spec of what it returns: the keys of a
    ModelOutput or dict ("last_hidden_state", "past_key_values.0.key"), "output" for one tensor,
    "output_0", "output_1", ... for a tuple."""
    from torch.utils import _pytree as pytree
    structure = pytree.tree_unflatten(list(range(out_spec.num_leaves)), out_spec)
    names = []
    for path, _ in pytree.tree_flatten_with_path(structure)[0]:
        keys = [str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))) for k in path]
        names.append(".".join(keys) if keys and not keys[0].isdigit() else "_".join(["output", *keys]))
    return names


def name_outputs(graph: Any, out_spec: Any) -> None:
    """Rename the ONNX graph's outputs (the exporter names them after internal nodes, `layer_norm_4`) to
    the model's output names; left as they are where the count differs or a name would repeat."""
    names = output_names(out_spec) if out_spec is not None else []
    outputs = list(graph.outputs)
    taken = {v.name for v in graph.inputs} | {v.name for node in graph for v in node.outputs} - {
        v.name for v in outputs}
    if len(names) != len(outputs) or len(set(names)) != len(names) or taken & set(names) \
            or len({id(v) for v in outputs}) != len(outputs) or any(v in graph.inputs for v in outputs):
        log.info("ONNX outputs keep the exporter's names (%d outputs, %d names)", len(outputs), len(names))
        return
    for value, name in zip(outputs, names):
        value.name = name


def export_graph(gm: fx.GraphModule, args: tuple, kwargs: dict, path: str, dynamic: bool = True,
                 opset: Optional[int] = None, recipe: Any = None, regions: Optional[list] = None,
                 optimize: bool = True, extra_metadata: Optional[dict] = None,
                 options: Optional[OnnxOptions] = None, dynamic_shapes: Optional[tuple] = None) -> ExportResult:
    """Export a (sparsecc-rewritten) graph module to `path`, atomically; see the module docstring.

    args/kwargs: example inputs (with every call default, e.g. use_cache=False, included).
    dynamic: make batch and sequence dims symbolic where the graph allows it (else static).
    options: OnnxOptions of the translations (defaults when None).
    dynamic_shapes: the explicit spec the graph was captured with (`Captured.dynamic_shapes`), if any.
    """
    check_translatable(gm)
    ep = _recapture(gm, args, kwargs, dynamic, dynamic_shapes if dynamic else None)
    if _copies_before_attention_views(ep.graph_module):
        ep.graph_module.recompile()
    opset = DEFAULT_OPSET if opset is None else int(opset)
    table = translation_table(gm, options)
    try:
        program = torch.onnx.export(ep, dynamo=True, custom_translation_table=table, opset_version=opset,
                                    optimize=optimize, verbose=False)
    except Exception as err:  # noqa: BLE001 - the exporter's report is long; name the failing node
        summary = [line for line in str(err).splitlines() if line.startswith("<class")]
        raise UnsupportedError(f"ONNX export: torch.onnx could not convert the graph at opset {opset}: "
                               f"{summary[-1] if summary else str(err).splitlines()[0]} (innermost cause: "
                               f"{summary[0] if summary else type(err).__name__}). Expected every node to have "
                               "an ONNX lowering; see the chained exception for the full report") from err
    name_outputs(program.model.graph, ep.call_spec.out_spec)
    records = region_records(gm, regions)
    is_dynamic = bool(ep.range_constraints)
    meta = {"sparsecc.version": __version__, "sparsecc.regions": json.dumps(records),
            "sparsecc.recipe": json.dumps(recipe.to_dict() if hasattr(recipe, "to_dict") else recipe,
                                          default=str),
            "sparsecc.dynamic": json.dumps(is_dynamic), "sparsecc.max_len": json.dumps(max_len(gm)),
            "sparsecc.inputs": json.dumps([i.name for i in program.model.graph.inputs])}
    meta.update(extra_metadata or {})
    program.model.metadata_props.update(meta)
    # weights inside the file (< 2 GB); readers never see a half-written file
    atomic_write(path, lambda tmp: program.save(tmp, external_data=False))
    return ExportResult(path=path, exported_program=ep, regions=records, dynamic=is_dynamic)


def export_onnx(model: Any, path: str, example_inputs: Any = None, dynamic: bool = True,
                opset: Optional[int] = None, optimize: bool = True,
                options: Optional[OnnxOptions] = None) -> ExportResult:
    """Export a `sparsecc.SparseModel` (or a plain fx.GraphModule with `example_inputs`) to `path`."""
    from sparsecc.capture import normalize_inputs
    gm = getattr(model, "graph_module", model)
    if not isinstance(gm, fx.GraphModule):
        raise UnsupportedError(f"ONNX export expects a sparsecc.SparseModel or an fx.GraphModule, got "
                               f"{type(model).__name__}; compile the model with sparsecc.compile first")
    if example_inputs is None:
        example = getattr(model, "example_inputs", None)
        if example is None:
            raise UnsupportedError("ONNX export: no example inputs; pass example_inputs=(args, kwargs)")
        args, kwargs = example
    else:
        args, kwargs = normalize_inputs(example_inputs)
    kwargs = {**getattr(model, "_call_defaults", {}), **kwargs}
    report = model.report() if hasattr(model, "report") else None
    return export_graph(gm, tuple(args), dict(kwargs), path, dynamic=dynamic and getattr(model, "dynamic", True),
                        opset=opset, recipe=getattr(model, "recipe", None),
                        regions=report.regions if report is not None else None, optimize=optimize, options=options,
                        dynamic_shapes=getattr(model, "dynamic_shapes", None))

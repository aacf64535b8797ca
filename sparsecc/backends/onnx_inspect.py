"""List what an ONNX file holds: its sparsecc regions and the dense attention / FFN left.

    from sparsecc.backends.onnx_inspect import inspect_onnx
    print(inspect_onnx("m.onnx").table())          # or: sparsecc inspect m.onnx [--json]

Sparse regions come from the file itself: the `sparsecc.regions` metadata written by
`sparsecc.backends.onnx` (op, layer, module path, density), matched with the ONNX nodes whose
exporter metadata (`pkg.torch.onnx.fx_node`) names a sparsecc op. What is left dense is read
from the nodes: fused attention ops (Attention, MultiHeadAttention, ...), Softmax nodes outside
sparsecc regions (unfused eager attention), SDPA nodes, and FFN-shaped linears (MatMul/Gemm
outside the regions, fused Gelu/FastGelu/BiasGelu). Files from other exporters (no metadata)
still get the dense summary.
"""

from __future__ import annotations

import json
import os
import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Optional

from sparsecc.errors import ModelSpecError

FUSED_ATTENTION = {"Attention", "MultiHeadAttention", "GroupQueryAttention", "SparseAttention",
                   "PackedAttention", "PackedMultiHeadAttention"}
FUSED_FFN_ACT = {"Gelu", "FastGelu", "BiasGelu", "QuickGelu", "BiasFastGelu"}
_FX_NODE = re.compile(r"^%(\S+) : .*?target=([^\]]+)\]")


@dataclass
class OnnxRegion:
    """One sparsecc op in the file."""

    op: str
    fx_node: str
    layer: Optional[int] = None
    path: Optional[str] = None
    density: Optional[float] = None
    nodes: int = 0
    op_types: dict = field(default_factory=dict)


@dataclass
class OnnxInspection:
    path: str
    opset: dict
    inputs: list
    outputs: list
    nodes: int
    initializer_bytes: int
    regions: list  # list[OnnxRegion]
    dense: dict  # what is left dense: name -> count
    recipe: Optional[dict] = None
    op_types: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        out = dict(self.__dict__)
        out["regions"] = [dict(r.__dict__) for r in self.regions]
        return out

    def table(self) -> str:
        lines = [f"{os.path.basename(self.path)}: {self.nodes} nodes, opset {self.opset}, "
                 f"weights {self.initializer_bytes / 2**20:.1f} MiB",
                 f"inputs: {', '.join(self.inputs)}; outputs: {', '.join(self.outputs)}"]
        if self.recipe is not None:
            lines.append(f"recipe: {json.dumps(self.recipe)}")
        lines.append(f"sparsecc regions: {len(self.regions)}")
        if self.regions:
            lines.append(f"  {'op':<36} {'layer':>5} {'density':>8} {'nodes':>5}  path")
            for r in self.regions:
                density = "-" if r.density is None else f"{r.density:.3f}"
                layer = "-" if r.layer is None else str(r.layer)
                lines.append(f"  {r.op:<36} {layer:>5} {density:>8} {r.nodes:>5}  {r.path or ''}")
        lines.append("dense left: " + (", ".join(f"{k} x{v}" for k, v in self.dense.items()) or "none"))
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()


def _fx_origin(node) -> tuple[Optional[str], Optional[str]]:
    """(fx node name, target) from the exporter's node metadata, or (None, None)."""
    for prop in node.metadata_props:
        if prop.key == "pkg.torch.onnx.fx_node":
            m = _FX_NODE.match(prop.value)
            if m:
                return m.group(1), m.group(2)
    return None, None


def inspect_onnx(path: str) -> OnnxInspection:
    """Read `path` (weights are not loaded) and list its sparse regions and the dense attention/FFN left."""
    import onnx
    if not os.path.isfile(path):
        raise ModelSpecError(f"{path}: no such file")
    try:
        model = onnx.load(path, load_external_data=False)
    except Exception as err:  # noqa: BLE001 - reported with the file name
        raise ModelSpecError(f"{path} is not a readable ONNX model ({type(err).__name__}: {err}); expected a "
                             "file written by sparsecc export / torch.onnx.export") from err
    meta = {p.key: p.value for p in model.metadata_props}
    records = json.loads(meta.get("sparsecc.regions", "[]"))
    recipe = json.loads(meta["sparsecc.recipe"]) if "sparsecc.recipe" in meta else None

    groups: dict[str, OnnxRegion] = {}
    dense: Counter = Counter()
    op_types: Counter = Counter()
    sdpa_nodes: set = set()
    for node in _all_nodes(model.graph):
        op_types[node.op_type] += 1
        fx_name, target = _fx_origin(node)
        if target is not None and target.startswith("torch.ops.sparsecc."):
            op = "sparsecc::" + target.split(".")[3]
            region = groups.setdefault(fx_name, OnnxRegion(op=op, fx_node=fx_name))
            region.nodes += 1
            region.op_types[node.op_type] = region.op_types.get(node.op_type, 0) + 1
            continue
        if node.op_type in FUSED_ATTENTION:
            dense[f"attention ({node.op_type})"] += 1
        elif target is not None and "scaled_dot_product_attention" in target:
            sdpa_nodes.add(fx_name)
        elif node.op_type == "Softmax":
            dense["attention (unfused Softmax)"] += 1
        elif node.op_type in FUSED_FFN_ACT:
            dense[f"FFN activation ({node.op_type})"] += 1
        elif node.op_type in ("MatMul", "Gemm", "FusedMatMul", "MatMulNBits") and _has_weight(node, model.graph):
            dense["linear (MatMul/Gemm with a weight)"] += 1
    if sdpa_nodes:
        dense["attention (SDPA, decomposed)"] += len(sdpa_nodes)

    regions = list(groups.values())
    by_node = {r.get("fx_node"): r for r in records}
    for i, region in enumerate(regions):
        rec = by_node.get(region.fx_node) or (records[i] if i < len(records) and records[i]["op"] == region.op
                                              else None)
        if rec is not None:
            region.layer, region.path, region.density = rec.get("layer"), rec.get("path"), rec.get("density")
    return OnnxInspection(path=path, opset={o.domain or "ai.onnx": o.version for o in model.opset_import},
                          inputs=[i.name for i in model.graph.input], outputs=[o.name for o in model.graph.output],
                          nodes=sum(op_types.values()),
                          initializer_bytes=sum(_tensor_bytes(t) for t in model.graph.initializer),
                          regions=regions, dense=dict(dense), recipe=recipe, op_types=dict(op_types.most_common()))


def _all_nodes(graph):
    for node in graph.node:
        yield node
        for attr in node.attribute:  # subgraphs (If/Loop/Scan)
            if attr.g is not None and attr.g.node:
                yield from _all_nodes(attr.g)


def _has_weight(node, graph) -> bool:
    names = _initializer_names(graph)
    return any(name in names for name in node.input)


_INIT_CACHE: dict = {}


def _initializer_names(graph) -> set:
    key = id(graph)
    if key not in _INIT_CACHE:
        _INIT_CACHE.clear()
        _INIT_CACHE[key] = {t.name for t in graph.initializer}
    return _INIT_CACHE[key]


def _tensor_bytes(t) -> int:
    from onnx import helper
    n = 1
    for d in t.dims:
        n *= d
    try:
        size = helper.tensor_dtype_to_np_dtype(t.data_type).itemsize
    except Exception:  # noqa: BLE001
        size = 4
    return n * size

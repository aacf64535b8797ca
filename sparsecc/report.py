"""Reports: what sparsecc found (and did) in a model, and their text renderings for people."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import torch.fx as fx

from sparsecc.graph.match import Miss, as_miss


@dataclass
class GraphSummary:
    nodes: int
    ops: dict
    parameters: int
    inputs: list  # the tensor inputs, as the compiled model and its ONNX export take them
    constants: dict = field(default_factory=dict)  # non-tensor inputs fixed at capture, e.g. use_cache=False

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def graph_summary(gm: fx.GraphModule) -> GraphSummary:
    ops = Counter(str(n.target) for n in gm.graph.nodes if n.op == "call_function")
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    inputs = [n.name for n in placeholders if not _is_constant(n.meta.get("val"))]
    constants = {n.name: n.meta["val"] for n in placeholders if _is_constant(n.meta.get("val"))}
    params = sum(p.numel() for p in gm.parameters())
    return GraphSummary(nodes=len(gm.graph.nodes), ops=dict(ops.most_common()), parameters=params, inputs=inputs,
                        constants=constants)


def _is_constant(value) -> bool:
    return isinstance(value, (bool, int, float, str)) or value is None


@dataclass
class Report:
    """What sparsecc found (and did) in a model."""

    model: str
    regions: list  # list[Region]
    graph: GraphSummary
    passes: list = field(default_factory=list)  # list[PassResult]
    # candidates left alone: sparsecc.graph.match.Miss records (kind, rule, reason, node, path, layer), and
    # the free-text notes of methods (regions a method's match refused)
    unmatched: list = field(default_factory=list)
    stage_seconds: dict = field(default_factory=dict)
    # calibration on several processes: world_size, rank, backend, bytes_sent (by this rank), seconds
    distributed: dict = field(default_factory=dict)

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
                "graph": self.graph.to_dict(), "unmatched": [as_miss(u).to_dict() for u in self.unmatched],
                "passes": [{"name": p.name, "changes": len(p.changes), "notes": [str(c) for c in p.changes],
                            "seconds": p.seconds, "max_abs_error": p.max_abs_error} for p in self.passes],
                "stage_seconds": dict(self.stage_seconds), "distributed": dict(self.distributed)}

    def table(self) -> str:
        return region_table(self)

    def misses(self) -> list:
        """`unmatched` as sparsecc.graph.match.Miss records (a method's free-text note becomes kind "note")."""
        return [as_miss(u) for u in self.unmatched]

    def explain(self) -> str:
        """For each attention / FFN candidate that was not rewritten: where it is, the rule and the reason."""
        return explain_table(self)

    def __str__(self) -> str:
        return self.table()


def human(n: float) -> str:
    for unit in ("", "K", "M", "G", "T", "P"):
        if abs(n) < 1000:
            return f"{n:.3g}{unit}"
        n /= 1000
    return f"{n:.3g}E"


class SavedRegion:
    """A region record read back from a saved report (its fields as saved; node fields are node names)."""

    def __init__(self, data: dict):
        self._data = dict(data)
        self.__dict__.update(data)
        residual = data.get("residual")
        self.residual = SavedRegion(residual) if isinstance(residual, dict) else residual

    def to_dict(self) -> dict:
        return dict(self._data)


def saved_report(data: dict) -> Report:
    """A Report rebuilt from `Report.to_dict()` (what `sparsecc.save` writes)."""
    from sparsecc.passes.manager import PassResult
    return Report(model=data["model"], regions=[SavedRegion(r) for r in data["regions"]],
                  graph=GraphSummary(**data["graph"]),
                  passes=[PassResult(p["name"], list(p.get("notes", [])), p["seconds"], p["max_abs_error"])
                          for p in data["passes"]],
                  unmatched=[Miss(**u) if isinstance(u, dict) else u for u in data["unmatched"]],
                  stage_seconds=dict(data["stage_seconds"]), distributed=dict(data.get("distributed", {})))


#: a layout whose density differs from the requested one by more than this fraction of it is reported
DENSITY_TOLERANCE = 0.05


def density_changed(facts: dict) -> bool:
    """Whether a region's used density differs materially from the one its config asked for."""
    asked = facts.get("density_requested")
    return asked is not None and abs(facts["density"] - asked) > DENSITY_TOLERANCE * asked


def density_cell(facts: dict) -> str:
    """`0.875 (asked 1.000)` when the density used differs from the requested one, else `0.875`."""
    used = f"{facts['density']:.3f}"
    return used + (f" (asked {facts['density_requested']:.3f})" if density_changed(facts) else "")


def ratio(before: float, after: float) -> str:
    """'2.00x fewer' / '1.25x more' / 'unchanged': the change from `before` to `after`, the right way round."""
    if after == before:
        return "unchanged"
    if after < before:
        return f"{before / max(after, 1e-12):.2f}x fewer"
    return f"{after / max(before, 1e-12):.2f}x more"


def format_table(headers: list[str], rows: list[list], align: str = "") -> str:
    cells = [[str(c) for c in headers]] + [[("-" if c is None else str(c)) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = []
    for i, row in enumerate(cells):
        lines.append("  ".join(c.ljust(w) if (align[j:j + 1] or "l") == "l" else c.rjust(w)
                               for j, (c, w) in enumerate(zip(row, widths))).rstrip())
        if i == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def region_table(report) -> str:
    rows = []
    sparse = any(r.sparse for r in report.regions)
    for r in report.regions:
        if r.kind == "attention":
            detail = f"heads={r.heads}" + (f"/kv={r.kv_heads}" if r.kv_heads != r.heads else "")
            detail += f" d={r.head_dim}" + (" cross" if r.cross else "") + (" rotary" if r.rotary else "")
            detail += f" mask={r.mask_kind}"
            causal = "yes" if r.causal else "no"
        else:
            detail = f"{r.activation or '?'}{' gated' if r.gated else ''} {r.d_model}->{r.d_ff}"
            causal = ""
        norm = r.residual.norm_position if r.residual is not None else "?"
        row = [r.kind, r.layer, r.path or r.name, r.module_class, detail, causal, norm, human(r.flops)]
        if sparse:
            row += [r.sparse["method"], r.sparse.get("config", ""), density_cell(r.sparse),
                    human(r.sparse["flops"])] if r.sparse else ["dense", "", "1.000", human(r.flops)]
        rows.append(row)
    headers = ["kind", "layer", "module path", "class", "shape", "causal", "LN", "dense FLOPs"]
    if sparse:
        headers += ["method", "config", "density", "sparse FLOPs"]
    table = format_table(headers, rows, align="lllllllrllrr")
    g = report.graph
    total = human(report.dense_flops())
    top = ", ".join(f"{k.replace('aten.', '').replace('.default', '')}x{v}" for k, v in list(g.ops.items())[:8])
    summary = f"{total} dense FLOPs in them"
    if sparse:
        after = sum((r.sparse or {"flops": r.flops})["flops"] for r in report.regions)
        summary += f", {human(after)} after sparsification ({ratio(report.dense_flops(), after)})"
    lines = [f"{report.model}: {len(report.attention)} attention and {len(report.ffn)} FFN regions, {summary}",
             table,
             f"graph: {g.nodes} nodes, {human(g.parameters)} parameters, inputs {g.inputs}"
             + (f", constants {', '.join(f'{k}={v!r}' for k, v in g.constants.items())}" if g.constants else ""),
             f"ops: {top}"]
    flow = flow_summary(report)
    if flow:
        lines.insert(2, flow)
    ours = {k.split(".")[1]: v for k, v in g.ops.items() if k.startswith("sparsecc.")}
    if ours:
        lines.insert(1, "this graph was compiled by sparsecc already: it holds "
                     + ", ".join(f"{name} x{count}" for name, count in ours.items())
                     + " (regions already rewritten are not listed again)")
    if report.unmatched:
        lines.append("not rewritten (`sparsecc inspect --explain` for a table):")
        lines += [f"  - {note}" for note in report.unmatched]
    return "\n".join(lines)


def explain_table(report) -> str:
    """The candidates left alone, one row each: kind, layer, module path, anchor node, rule, reason."""
    misses = report.misses()
    head = (f"{report.model}: {len(report.attention)} attention and {len(report.ffn)} FFN regions; "
            f"{len(misses)} candidate(s) not matched")
    if not misses:
        return head
    rows = [[m.kind, m.layer, m.path, m.node, m.rule, m.reason] for m in misses]
    return head + "\n" + format_table(["kind", "layer", "module path", "node", "rule", "reason"], rows)


def flow_summary(report) -> str:
    """Token flow (SparseFlow): kept fraction per layer and FLOPs dense vs flowed, or "" without flow."""
    layers: dict = {}
    layouts: dict = {}
    dense = flowed = 0
    for r in report.regions:
        facts = r.sparse or {}
        if facts.get("method") != "token_flow":
            continue
        layers.setdefault(facts["segment"], facts["kept_fraction"])
        layouts.setdefault(facts["segment"], facts.get("layout", "padded"))
        dense += r.flops
        flowed += facts["flops"]
    if not layers:
        return ""
    kept = ", ".join(f"{name} {frac:.3f}" for name, frac in layers.items())
    line = (f"token flow: kept fraction per layer (of non-padding tokens): {kept}; FLOPs of the flowed regions "
            f"{human(dense)} dense -> {human(flowed)} flowed ({ratio(dense, flowed)}); "
            f"per-token tail packed in {sum(v == 'packed' for v in layouts.values())} of {len(layouts)} layers")
    if all(frac >= 0.999 for frac in layers.values()):
        line += ("\ntoken flow keeps every token in every layer, so it saves nothing yet: compiled gates are untrained "
                 "(with the default TokenFlow(init=3.0) every gate starts open); train them with sparsecc.train.flow.fit_flow(sm, batches, "
                 "teacher=model), then sm.measure_flow(batches)")
    return line

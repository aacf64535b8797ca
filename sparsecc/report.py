"""Text renderings of reports: region tables and graph summaries for people."""

from __future__ import annotations


def human(n: float) -> str:
    for unit in ("", "K", "M", "G", "T", "P"):
        if abs(n) < 1000:
            return f"{n:.3g}{unit}"
        n /= 1000
    return f"{n:.3g}E"


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
            row += [r.sparse["method"], f"{r.sparse['density']:.3f}", human(r.sparse["flops"])] if r.sparse else \
                ["dense", "1.000", human(r.flops)]
        rows.append(row)
    headers = ["kind", "layer", "module path", "class", "shape", "causal", "LN", "dense FLOPs"]
    if sparse:
        headers += ["method", "density", "sparse FLOPs"]
    table = format_table(headers, rows, align="lllllllrlrr")
    g = report.graph
    total = human(report.dense_flops())
    top = ", ".join(f"{k.replace('aten.', '').replace('.default', '')}x{v}" for k, v in list(g.ops.items())[:8])
    summary = f"{total} dense FLOPs in them"
    if sparse:
        after = sum((r.sparse or {"flops": r.flops})["flops"] for r in report.regions)
        summary += f", {human(after)} after sparsification ({report.dense_flops() / max(after, 1):.2f}x fewer)"
    lines = [f"{report.model}: {len(report.attention)} attention and {len(report.ffn)} FFN regions, {summary}",
             table,
             f"graph: {g.nodes} nodes, {human(g.parameters)} parameters, inputs {g.inputs}",
             f"ops: {top}"]
    flow = flow_summary(report)
    if flow:
        lines.insert(2, flow)
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
    return (f"token flow: kept fraction per layer (of non-padding tokens): {kept}; FLOPs of the flowed regions "
            f"{human(dense)} dense -> {human(flowed)} flowed ({1 - flowed / max(dense, 1):.1%} fewer); "
            f"per-token tail packed in {sum(v == 'packed' for v in layouts.values())} of {len(layouts)} layers")

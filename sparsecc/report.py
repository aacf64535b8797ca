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
                               for j, (c, w) in enumerate(zip(row, widths))))
        if i == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def region_table(report) -> str:
    rows = []
    for r in report.regions:
        if r.kind == "attention":
            detail = f"heads={r.heads}" + (f"/kv={r.kv_heads}" if r.kv_heads != r.heads else "")
            detail += f" d={r.head_dim}" + (" cross" if r.cross else "") + (" rotary" if r.rotary else "")
            detail += f" mask={r.mask_kind}"
            causal = "yes" if r.causal else "no"
        else:
            detail = f"{r.activation}{' gated' if r.gated else ''} {r.d_model}->{r.d_ff}"
            causal = ""
        norm = r.residual.norm_position if r.residual is not None else "?"
        rows.append([r.kind, r.layer, r.path or r.name, r.module_class, detail, causal, norm, human(r.flops)])
    table = format_table(["kind", "layer", "module path", "class", "shape", "causal", "LN", "dense FLOPs"], rows,
                         align="lllllllr")
    g = report.graph
    total = human(report.dense_flops())
    top = ", ".join(f"{k.replace('aten.', '').replace('.default', '')}x{v}" for k, v in list(g.ops.items())[:8])
    lines = [f"{report.model}: {len(report.attention)} attention and {len(report.ffn)} FFN regions, "
             f"{total} dense FLOPs in them", table,
             f"graph: {g.nodes} nodes, {human(g.parameters)} parameters, inputs {g.inputs}",
             f"ops: {top}"]
    if report.unmatched:
        lines.append("not rewritten:")
        lines += [f"  - {note}" for note in report.unmatched]
    return "\n".join(lines)

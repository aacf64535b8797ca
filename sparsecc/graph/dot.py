"""Graphviz (dot) rendering of a graph with its regions drawn as clusters."""

from __future__ import annotations

import torch.fx as fx

from sparsecc.graph.fx_utils import LINEAR, SDPA
from sparsecc.io import write_text

_COLORS = {"attention": "#fde0c5", "ffn": "#d4e8f7"}


def _region_nodes(region) -> set:
    """The nodes between a region's inputs and its anchor/output."""
    if region.kind == "attention":
        ends = [n for n in (region.q_proj, region.k_proj, region.v_proj) if n is not None]
        last = region.o_proj or region.sdpa
    else:
        ends = [n for n in (region.up, region.gate) if n is not None]
        last = region.down
    members, stack = set(ends), [last]
    while stack:
        n = stack.pop()
        if n in members or n.op != "call_function":
            continue
        members.add(n)
        stack.extend(n.all_input_nodes)
    return members


def graph_to_dot(gm: fx.GraphModule, regions: list, title: str = "") -> str:
    owner = {}
    for r in regions:
        for n in _region_nodes(r):
            owner.setdefault(n, r)
    lines = ["digraph sparsecc {", f'  label="{title}"; rankdir=TB; node [shape=box, fontsize=10];']
    for r_index, r in enumerate(regions):
        lines.append(f'  subgraph cluster_{r_index} {{ label="{r.kind} {r.name}"; style=filled; '
                     f'color="{_COLORS[r.kind]}";')
        lines += [f'    "{n.name}";' for n, o in owner.items() if o is r]
        lines.append("  }")
    for n in gm.graph.nodes:
        if n.op in ("get_attr",):
            continue
        target = getattr(n.target, "__name__", str(n.target)).replace(".default", "")
        style = ', style="bold"' if n.op == "call_function" and n.target in (SDPA, LINEAR) else ""
        lines.append(f'  "{n.name}" [label="{n.name}\\n{target}"{style}];')
        for a in n.all_input_nodes:
            if a.op != "get_attr":
                lines.append(f'  "{a.name}" -> "{n.name}";')
    lines.append("}")
    return "\n".join(lines)


def write_dot(path: str, text: str) -> None:
    write_text(path, text)

"""Why candidates were not matched: one `Miss` per attention / FFN / linear candidate left alone.

Run on a canonicalized graph and its regions. The matchers only read the graph, so
this asks them again about the anchors canonicalization left behind:

- each softmax still in the graph (eager attention that did not become SDPA),
- each attention region whose projections were not found,
- each linear that looks like an FFN's down projection but is not one, and each FFN
  region whose activation is none of sparsecc.ops.activations,
- each product with a matrix that did not become a linear.
"""

from __future__ import annotations

import torch.fx as fx

from sparsecc.graph.canonicalize import match_eager_attention, match_matmul_linear
from sparsecc.graph.fx_utils import LINEAR, aten, is_call
from sparsecc.graph.match import Match, Miss
from sparsecc.graph.regions import match_ffn


def unmatched(gm: fx.GraphModule, regions: list) -> list[Miss]:
    """The nearest miss of every candidate that no region covers (or that a region covers only in part)."""
    misses = []
    ffn_by_down = {r.down: r for r in regions if r.kind == "ffn"}
    attention = {r.sdpa: r for r in regions if r.kind == "attention"}
    for node in gm.graph.nodes:
        if is_call(node, aten.softmax.int, aten._softmax.default):
            m = match_eager_attention(node)
            if not m:
                misses.append(Miss.of("attention", node, m))
        elif node in attention:
            m = _projections(attention[node])
            if not m:
                misses.append(Miss.of("attention", node, m))
        elif node in ffn_by_down:
            m = ffn_by_down[node].activation_match()
            if not m:
                misses.append(Miss.of("ffn", node, m))
        elif is_call(node, LINEAR):
            m = match_ffn(node)
            if not m and m.progress > 0:
                misses.append(Miss.of("ffn", node, m))
        elif is_call(node, aten.matmul.default, aten.mm.default):
            m = match_matmul_linear(node)
            if not m and m.progress > 0:
                misses.append(Miss.of("linear", node, m))
    return misses


def _projections(region) -> Match:
    missing = [role for role, p in (("q", region.q_proj), ("k", region.k_proj), ("v", region.v_proj),
                                    ("out", region.o_proj)) if p is None]
    if not missing:
        return Match.ok()
    return Match.fail("attention.projections", f"projection(s) {', '.join(missing)} not found: no single linear "
                      "computes them (the SDPA rewrite still applies; methods that need the projections skip "
                      "this region)", region.sdpa, progress=40)


__all__ = ["unmatched"]

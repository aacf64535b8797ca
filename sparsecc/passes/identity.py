"""The identity rewrite: every region becomes a sparsecc op computing the same dense math.

It proves the rewrite machinery end to end (custom ops in the graph, outputs
unchanged, gradients to every parameter) and is the template the sparse
rewrites follow: find regions, build the op's arguments from the region's
facts, insert the op, redirect users, let dead-code elimination remove the rest.
"""

from __future__ import annotations

import torch
import torch.fx as fx

import sparsecc.ops  # noqa: F401  (registers the ops)
from sparsecc.graph.fx_utils import new_call, replace_node
from sparsecc.graph.regions import find_attention, find_ffn, sdpa_args
from sparsecc.passes.manager import PassContext


def attention_to_op(gm: fx.GraphModule, ctx: PassContext) -> list[str]:
    changes = []
    graph = gm.graph
    for region in find_attention(gm):
        node = region.sdpa
        if node.target is not torch.ops.aten.scaled_dot_product_attention.default:
            continue
        a = sdpa_args(node)
        with graph.inserting_before(node):
            op = new_call(graph, torch.ops.sparsecc.attention.default,
                          (a["query"], a["key"], a["value"], a["attn_mask"], float(a["dropout_p"]),
                           bool(a["is_causal"]), a["scale"], bool(a["enable_gqa"])), meta_from=node)
        replace_node(node, op)  # erased explicitly: SDPA is tagged nondeterministic, so DCE keeps it
        changes.append(f"attention:{region.name}")
    return changes


def _bias(linear: fx.Node):
    return linear.args[2] if len(linear.args) > 2 else None


def ffn_to_op(gm: fx.GraphModule, ctx: PassContext) -> list[str]:
    changes = []
    graph = gm.graph
    for region in find_ffn(gm):
        up, gate, down = region.up, region.gate, region.down
        with graph.inserting_before(down):
            op = new_call(graph, torch.ops.sparsecc.ffn.default,
                          (region.input, up.args[1], _bias(up), down.args[1], _bias(down), region.activation,
                           gate.args[1] if gate is not None else None, _bias(gate) if gate is not None else None),
                          meta_from=down)
        replace_node(down, op)
        changes.append(f"ffn:{region.name}")
    return changes

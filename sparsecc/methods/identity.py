"""The identity method: every region becomes a sparsecc op computing the same dense math.

It proves the rewrite machinery end to end (custom ops in the graph, outputs
unchanged, gradients to every parameter) and is the template the sparse
rewrites follow: find regions, build the op's arguments from the region's
facts, insert the op, redirect users, let dead-code elimination remove the rest.
"""

from __future__ import annotations

import typing
from dataclasses import dataclass
from typing import Optional

import torch
import torch.fx as fx

import sparsecc.ops  # noqa: F401  (registers the ops)
from sparsecc.graph.fx_utils import new_call, replace_node
from sparsecc.graph.fx_utils import attention_args
from sparsecc.graph.regions import find_attention, find_ffn
from sparsecc.methods.base import Match, Method, Target
from sparsecc.methods.registry import register
from sparsecc.passes.manager import PassContext


@dataclass(frozen=True)
class Identity:
    """Rewrite the region into the sparsecc op with the same dense math (proves the rewrite)."""

    kind: typing.ClassVar[str] = "identity"


@register(Identity)
class IdentityMethod(Method):
    slots = ("attention", "ffn")
    tolerance = 1e-5
    optional = True

    def match(self, region, config, ctx) -> Match:
        if region.kind == "attention" and region.sdpa.target is not torch.ops.aten.scaled_dot_product_attention.default:
            return Match.fail("identity", f"already rewritten ({region.sdpa.target})")
        if region.kind == "ffn":
            return region.activation_match()
        return Match.ok()

    def rewrite(self, gm: fx.GraphModule, ctx: PassContext, targets: list[Target]) -> list[str]:
        names = {t.name for t in targets}
        kinds = {t.region.kind for t in targets}
        changes = attention_to_op(gm, ctx, names) if "attention" in kinds else []
        return changes + (ffn_to_op(gm, ctx, names) if "ffn" in kinds else [])


def attention_to_op(gm: fx.GraphModule, ctx: Optional[PassContext] = None, only: Optional[set] = None) -> list[str]:
    changes = []
    graph = gm.graph
    for region in find_attention(gm):
        if only is not None and region.name not in only:
            continue
        node = region.sdpa
        if node.target is not torch.ops.aten.scaled_dot_product_attention.default:
            continue
        a = attention_args(node)
        with graph.inserting_before(node):
            op = new_call(graph, torch.ops.sparsecc.attention.default,
                          (a["query"], a["key"], a["value"], a["attn_mask"], float(a["dropout_p"]),
                           bool(a["is_causal"]), a["scale"], bool(a["enable_gqa"])), meta_from=node)
        replace_node(node, op)  # erased explicitly: SDPA is tagged nondeterministic, so DCE keeps it
        changes.append(f"attention:{region.name}")
    return changes


def _bias(linear: fx.Node):
    return linear.args[2] if len(linear.args) > 2 else None


def ffn_to_op(gm: fx.GraphModule, ctx: Optional[PassContext] = None, only: Optional[set] = None) -> list[str]:
    changes = []
    graph = gm.graph
    for region in find_ffn(gm):
        if only is not None and region.name not in only:
            continue
        up, gate, down = region.up, region.gate, region.down
        with graph.inserting_before(down):
            op = new_call(graph, torch.ops.sparsecc.ffn.default,
                          (region.input, up.args[1], _bias(up), down.args[1], _bias(down), region.activation,
                           gate.args[1] if gate is not None else None, _bias(gate) if gate is not None else None),
                          meta_from=down)
        replace_node(down, op)
        changes.append(f"ffn:{region.name}")
    return changes

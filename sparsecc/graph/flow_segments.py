"""Flow segments: the residual blocks that token routing (SparseFlow) wraps, and their node sets.

A SEGMENT is a run of residual blocks of one layer through which a token either flows
or not: with scope "layer" the attention block(s) and the FFN block of a layer (as
released: one gate for the whole layer), with scope "ffn" the FFN block alone. It has
one input (the residual stream [B, L, D] entering the first block) and one output (the
stream leaving the last block).

Inside a segment, `split_segment` sorts the nodes into
- GATHERED nodes, recomputed on the kept tokens only (queries, the attention output, the
  residual adds, norms, the FFN);
- FULL nodes, which stay on all tokens: with kv="all" the keys and values of the
  segment's self-attention (kept tokens attend to every token's keys and values).
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.fx as fx

from sparsecc.errors import UnsupportedError
from sparsecc.graph.fx_utils import SDPA, attention_args, fake, forward_through_view_like, is_call, through_view_like
from sparsecc.graph.regions import AttentionRegion, Region

def attention_targets() -> tuple:
    import sparsecc.ops  # noqa: F401  (registers sparsecc::attention)
    return (SDPA, torch.ops.sparsecc.attention.default)


@dataclass
class FlowSegment:
    index: int
    name: str  # "<stack>.<layer>" (scope layer) or the FFN region's name (scope ffn)
    stack: str
    stack_id: int
    layer: int
    regions: list  # Region records inside, in graph order
    input: fx.Node
    output: fx.Node
    mask: Optional[fx.Node] = None  # the layer's self-attention mask (padding -> validity)
    causal: bool = False
    d_model: int = 0
    flops_parts: dict = field(default_factory=dict)  # region name -> {"kept": f, "full": f, "core": f}

    def to_dict(self) -> dict:
        return {"index": self.index, "name": self.name, "stack": self.stack, "layer": self.layer,
                "regions": [r.name for r in self.regions], "causal": self.causal}


def _self_attention(regions: list[Region]) -> Optional[AttentionRegion]:
    for r in regions:
        if r.kind == "attention" and not r.cross:
            return r
    return None


def find_segments(regions: list[Region], scope: str) -> tuple[list[FlowSegment], list[str]]:
    """Segments in graph order, and a note for every region left out (and why)."""
    notes: list[str] = []
    groups: dict = {}
    for r in regions:  # a module applied several times (ALBERT's shared layer): one segment, one gate per application
        groups.setdefault((r.stack, r.layer, _application(r.name)), []).append(r)
    stacks: dict = {}
    segments: list[FlowSegment] = []
    for (stack, layer, application), members in groups.items():
        attn = _self_attention(members)
        if scope == "ffn":
            blocks = [[r] for r in members if r.kind == "ffn"]
        else:
            blocks = [members]
        for block in blocks:
            missing = [r.name for r in block if r.residual is None]
            if missing:
                notes.append(f"token flow: {', '.join(missing)}: no residual block found (x + sublayer(x)); "
                             "left dense")
                continue
            parallel = [r for r in block if r.residual.parallel]
            if parallel and scope == "ffn":
                notes.append(f"token flow: {block[0].name}: attention and FFN add to one residual in parallel "
                             "(x + attention(x) + ffn(x)); route the whole layer with TokenFlow(scope='layer'); "
                             "left dense")
                continue
            if parallel and not (len(parallel) == len(block) and len({r.residual.add for r in block}) == 1):
                notes.append(f"token flow: layer {stack}.{layer}: {parallel[0].name} adds to the residual in "
                             "parallel with a sublayer that is not in this layer's regions; left dense")
                continue
            # blocks follow each other on the stream, maybe through a reshape (OPT flattens to [B*L, D] for its FFN)
            chained = parallel or all(through_view_like(b.residual.residual) is through_view_like(a.residual.output)
                                      for a, b in zip(block, block[1:]))
            if not chained:
                notes.append(f"token flow: layer {stack}.{layer}: its blocks do not follow each other on the "
                              "residual stream; left dense")
                continue
            first, last = block[0].residual, block[-1].residual
            val = fake(first.residual)
            if val is None or val.dim() != 3:
                notes.append(f"token flow: {block[0].name}: the residual stream is not [batch, tokens, features] "
                             f"(got {None if val is None else tuple(val.shape)}); left dense")
                continue
            output = _as_stream(last.output, val)
            if output is None:
                notes.append(f"token flow: {block[-1].name}: the block's output {tuple(fake(last.output).shape)} is "
                             f"not the residual stream {tuple(val.shape)} and no reshape makes it so; left dense")
                continue
            stack_id = stacks.setdefault(stack, len(stacks))
            name = f"{stack}.{layer}" + (f"#{application}" if application else "") \
                if scope == "layer" and stack else block[0].name
            segments.append(FlowSegment(
                index=len(segments), name=name, stack=stack, stack_id=stack_id, layer=int(layer or 0),
                regions=block, input=first.residual, output=output,
                mask=attn.mask if attn is not None else None, causal=any(getattr(r, "causal", False)
                                                                          for r in members),
                d_model=int(val.shape[-1])))
    return segments, notes


def _application(name: str) -> int:
    """k for the k-th further application of a module (region names end in "#k"), else 0."""
    head, _, tail = name.rpartition("#")
    return int(tail) if head and tail.isdigit() else 0


def _as_stream(node: fx.Node, stream: torch.Tensor) -> Optional[fx.Node]:
    """`node`, or the reshape after it, holding the residual stream's [batch, tokens, features] shape."""
    for n in (node, forward_through_view_like(node)):
        val = fake(n)
        if val is not None and val.dim() == 3 and all(_same_size(a, b) for a, b in zip(val.shape, stream.shape)):
            return n
    return None


def _same_size(a, b) -> bool:
    if isinstance(a, torch.SymInt) and isinstance(b, torch.SymInt):
        return a.node.expr == b.node.expr
    return a == b if isinstance(a, int) and isinstance(b, int) else False


# ------------------------------------------------------------------ node sets
def _tensor_valued(node: fx.Node) -> bool:
    val = node.meta.get("val")
    if isinstance(val, torch.Tensor):
        return True
    return isinstance(val, (tuple, list)) and any(isinstance(v, torch.Tensor) for v in val)


def segment_nodes(start: fx.Node, end: fx.Node) -> list[fx.Node]:
    """Nodes that depend on `start` through tensor values and that `end` depends on, in graph order."""
    down, stack = set(), [start]
    while stack:
        n = stack.pop()
        for u in n.users:
            if u not in down and u.op == "call_function" and _tensor_valued(u):
                down.add(u)
                stack.append(u)
    up, stack = set(), [end]
    while stack:
        n = stack.pop()
        if n in up:
            continue
        up.add(n)
        stack.extend(i for i in n.all_input_nodes if i in down)
    inside = down & up
    return [n for n in start.graph.nodes if n in inside]


def _ancestors_within(node, members: set) -> set:
    out, stack = set(), [node]
    while stack:
        n = stack.pop()
        if not isinstance(n, fx.Node) or n in out or n not in members:
            continue
        out.add(n)
        stack.extend(n.all_input_nodes)
    return out


@dataclass
class SegmentSplit:
    nodes: list  # all segment nodes, graph order
    gathered: list  # nodes recomputed on kept tokens, graph order
    full: set  # nodes left on all tokens
    attention: list  # attention nodes inside (SDPA / sparsecc::attention)


def split_segment(start: fx.Node, end: fx.Node, kv: str, name: str) -> SegmentSplit:
    nodes = segment_nodes(start, end)
    if end not in nodes:
        raise UnsupportedError(f"token flow: segment {name}: its output does not depend on its input")
    members = set(nodes)
    targets = attention_targets()
    attention = [n for n in nodes if is_call(n, *targets)]
    full: set = set()
    if kv == "all":
        for a in attention:
            args = attention_args(a)
            for role in ("key", "value"):
                if args[role] in members:  # self-attention: keys/values of every token stay
                    full |= _ancestors_within(args[role], members)
    changed = True
    while changed:  # a getitem of a tuple computed on all tokens stays on all tokens (gathered after it)
        changed = False
        for n in nodes:
            if n not in full and n.target is operator.getitem and n.args[0] in full:
                full.add(n)
                changed = True
    gathered = [n for n in nodes if n not in full]
    gathered_set = set(gathered)
    for f in full:
        bad = [i for i in f.all_input_nodes if i in gathered_set]
        if bad:
            raise UnsupportedError(
                f"token flow: segment {name}: the keys/values node {f.name} depends on {bad[0].name}, which runs "
                "on kept tokens only (keys and values must come from the segment's input); use "
                "TokenFlow(scope='ffn') or kv='kept' for this model")
    if end in full:
        raise UnsupportedError(f"token flow: segment {name}: its output is computed on all tokens")
    return SegmentSplit(nodes=nodes, gathered=gathered, full=full, attention=attention)


def linear_parts(region: AttentionRegion) -> dict:
    """Dense FLOPs of an attention region's parts: q / o (scale with kept queries), k / v, core."""
    from sparsecc.graph.regions import linear_flops
    projections = {}
    for role, node in (("q", region.q_proj), ("k", region.k_proj), ("v", region.v_proj), ("o", region.o_proj)):
        if node is not None and node not in projections.values():
            projections[role] = node
    flops = {role: linear_flops(node) for role, node in projections.items()}
    core = region.flops - sum(flops.values())
    return {"q": flops.get("q", 0), "k": flops.get("k", 0), "v": flops.get("v", 0), "o": flops.get("o", 0),
            "core": core, "fused": region.fused_qkv}


__all__ = ["FlowSegment", "SegmentSplit", "attention_args", "attention_targets", "find_segments", "linear_parts",
           "segment_nodes", "split_segment"]

"""Packed layout for the per-token tail of a flowed segment (TokenFlow(layout="packed")).

The gathered layout is padded: [B, K, D] with K = the batch's LARGEST kept count, so with threshold
gates (examples keep different numbers of tokens) every row-wise op of the block also runs on the
padding slots of the examples that keep fewer. The tail of a segment - the nodes from the last
cross-token op (attention) to the segment's output, when each of them is row-wise (linear, FFN,
norms, activations, residual adds) - does not need the batch structure, so it runs on the kept
rows of the whole batch one after another, [1, N, D] with N = sum of the kept counts:

    slots, rows, n = packed_route(index, counts, h)     # once per segment
    frontier of the tail  ->  pack_slots(t, slots, n)   # a padded [B, K, X] input (attention output)
                          or  gather_packed(h, rows, n) # a gathered input of the stream: straight from h
    ... the tail's nodes, unchanged, on [1, N, X] ...
    flow_scatter(h, tail_out, index, counts, acc)  ->  scatter_packed(h, tail_out, rows, n, acc)

For a BERT layer the tail is the attention output projection, the residual add, both norms and the
FFN: all of the kept-token GEMMs but the query projection. A segment whose tail has no linear or FFN
(nothing to save) keeps the padded layout.
"""

from __future__ import annotations

import operator
from typing import Any, Optional

import torch
import torch.fx as fx

from sparsecc.graph.fx_utils import aten, fake, new_call
from sparsecc.ops.token_flow.helpers import gather_packed, pack_slots, packed_route, scatter_packed

# op -> positions of its per-token (row) tensor arguments; every other tensor argument must be a
# weight (for these ops) or broadcast over the rows (elementwise ops, below).
_WEIGHTED = {aten.linear.default: (0,), aten.layer_norm.default: (0,), aten.rms_norm.default: (0,)}
_ELEMENTWISE = {aten.add.Tensor, aten.sub.Tensor, aten.mul.Tensor, aten.div.Tensor, aten.gelu.default,
                aten.relu.default, aten.silu.default, aten.tanh.default, aten.sigmoid.default, aten.rsqrt.default,
                aten.pow.Tensor_Scalar, aten.neg.default, aten.clone.default, aten._to_copy.default,
                aten.dropout.default}
# views between [B, L, X] and [B * L, X] (GPT-2's Conv1D flattens the tokens around its matmul)
_SHAPE = {aten.view.default, aten.reshape.default, aten._unsafe_view.default}


def _weighted_ops() -> dict:
    ops = dict(_WEIGHTED)
    for name in ("ffn", "sparse_ffn"):
        packet = getattr(torch.ops.sparsecc, name, None)
        if packet is not None:
            ops[packet.default] = (0,)
    return ops


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, torch.SymInt) and isinstance(b, torch.SymInt):
        return a.node.expr == b.node.expr
    return isinstance(a, int) and isinstance(b, int) and a == b


class _Tail:
    """Find the row-wise tail ending at `rows` (dense-frame shapes: members keep their [B, L, X] vals)."""

    def __init__(self, members: set, gathered: dict, batch: Any, L: Any):
        self.members, self.batch, self.L = members, batch, L
        self.gathered = {node: key for key, node in gathered.items()}  # gather_tokens node -> (source, dim)
        self.weighted = _weighted_ops()

    def is_row(self, n: Any, flat_ok: bool = False) -> bool:
        """A [B, L, X] member (padded [B, K, X] at run time) or a stream token gather [B, K, X];
        flat_ok: a [B * L, X] member too."""
        if not isinstance(n, fx.Node):
            return False
        if n in self.gathered:
            source, dim = self.gathered[n]
            val = fake(source)
            return dim == 1 and val.dim() == 3 and _same(val.shape[0], self.batch)
        val = n.meta.get("val")
        if n not in self.members or not isinstance(val, torch.Tensor):
            return False
        if val.dim() == 3:
            return _same(val.shape[0], self.batch) and _same(val.shape[1], self.L)
        return flat_ok and val.dim() == 2 and _same(val.shape[0], self.batch * self.L)

    def row_args(self, n: fx.Node) -> Optional[list]:
        """The row tensors `n` reads, or None when `n` is not a row-wise op on them."""
        if n not in self.members or n.op != "call_function":
            return None
        tensors = [a for a in _leaves((n.args, n.kwargs)) if isinstance(a, fx.Node)]
        if n.target in _SHAPE:
            x = n.args[0]
            sizes_ok = all(not isinstance(a.meta.get("val"), torch.Tensor) for a in tensors if a is not x)
            ok = (self.is_row(x, flat_ok=True) and self.is_row(n, flat_ok=True) and sizes_ok
                  and isinstance(fake(n).shape[-1], int) and _same(fake(x).shape[-1], fake(n).shape[-1]))
            return [x] if ok else None
        if n.target in self.weighted:
            positions = self.weighted[n.target]
            rows = [n.args[i] for i in positions]
            if not all(self.is_row(r, flat_ok=True) for r in rows):
                return None
            return rows if all(t in rows or not self.is_row(t) and not self._per_token(t) for t in tensors) else None
        if n.target is aten.mean.dim:  # RMSNorm's mean of squares over the features of each row
            x, dims = n.args[0], n.args[1]
            keepdim = n.args[2] if len(n.args) > 2 else n.kwargs.get("keepdim", False)
            last = isinstance(x, fx.Node) and list(dims) in ([-1], [fake(x).dim() - 1])
            return [x] if last and keepdim and self.is_row(x) and len(tensors) == 1 else None
        if n.target in _ELEMENTWISE:
            rows = [t for t in tensors if self.is_row(t, flat_ok=True)]
            for t in tensors:
                if t in rows:
                    continue
                val = t.meta.get("val")
                if not isinstance(val, torch.Tensor) or any(s != 1 for s in val.shape[:-1]):
                    return None  # an operand per example or per token that is not a row tensor
            return rows or None
        return None

    def _per_token(self, t: fx.Node) -> bool:
        val = t.meta.get("val")
        return isinstance(val, torch.Tensor) and any(_same(s, self.L) for s in val.shape)

    def find(self, rows: fx.Node, outside_ok: set) -> tuple[list, list]:
        """(tail nodes in graph order, frontier nodes); nodes used outside the tail become frontier."""
        demoted: set = set()
        while True:
            tail, frontier, stack = set(), set(), [rows]
            while stack:
                n = stack.pop()
                if n in tail or n in frontier:
                    continue
                args = None if n in demoted else self.row_args(n)
                if args is None:
                    frontier.add(n)
                else:
                    tail.add(n)
                    stack.extend(args)
            leaking = [t for t in tail if any(u not in tail and u not in outside_ok for u in t.users)]
            if not leaking:
                break
            demoted.update(leaking)
        order = [n for n in rows.graph.nodes if n in tail]
        return order, sorted(frontier, key=_position(rows.graph))


def _leaves(tree: Any) -> list:
    from torch.utils import _pytree as pytree
    return pytree.tree_leaves(tree, is_leaf=lambda x: isinstance(x, fx.Node))


def _position(graph: fx.Graph):
    index = {n: i for i, n in enumerate(graph.nodes)}
    return lambda n: index[n]


def pack_tail(graph: fx.Graph, members: set, gathered: dict, batch: Any, L: Any, h_in: fx.Node,
              scatter: fx.Node, route_after: fx.Node, router: Any = packed_route) -> Optional[fx.Node]:
    """Rewrite the tail feeding `scatter` (a flow_scatter node) to the packed layout.

    Returns the node that replaces `scatter`, or None (graph untouched) when the segment has no
    row-wise tail with a linear or FFN in it. route_after: where the packed route goes (after the
    segment's flow_route). router: the function that computes (slots, rows, n) from (index, counts, h).
    """
    _, rows_node, index, counts, accumulate = scatter.args
    finder = _Tail(members, gathered, batch, L)
    if not isinstance(rows_node, fx.Node) or rows_node in finder.gathered or not finder.is_row(rows_node):
        return None
    tail, frontier = finder.find(rows_node, outside_ok={scatter})
    if rows_node not in tail or not any(n.target in finder.weighted for n in tail):
        return None
    if not all(finder.is_row(f) for f in frontier):  # 3-D [B, K, X] only: what pack_slots takes
        return None
    with graph.inserting_after(route_after):
        route = new_call(graph, router, (index, counts, h_in), meta_from=rows_node)
    with graph.inserting_after(route):
        slots, flat_rows, n = (new_call(graph, operator.getitem, (route, i), meta_from=rows_node) for i in range(3))
    packed = {}
    for f in frontier:
        with graph.inserting_after(f):
            if f in finder.gathered:
                packed[f] = new_call(graph, gather_packed, (finder.gathered[f][0], flat_rows, n), meta_from=f)
            else:
                packed[f] = new_call(graph, pack_slots, (f, slots, n), meta_from=f)
    tail_set = set(tail)
    for t in tail:
        t.args = fx.node.map_arg(t.args, lambda a: a if a in tail_set else packed.get(a, a))
        t.kwargs = fx.node.map_arg(t.kwargs, lambda a: a if a in tail_set else packed.get(a, a))
        if t.target in _SHAPE:  # [B, K, X] <-> [B * K, X] becomes [1, N, X] <-> [N, X]
            width = int(fake(t).shape[-1])
            t.args = (t.args[0], [1, -1, width] if fake(t).dim() == 3 else [-1, width], *t.args[2:])
    with graph.inserting_after(scatter):
        new = new_call(graph, scatter_packed, (h_in, rows_node, flat_rows, n, accumulate), meta_from=scatter)
    new.meta["val"] = scatter.meta["val"]
    scatter.replace_all_uses_with(new)
    graph.erase_node(scatter)
    return new


__all__ = ["pack_tail"]

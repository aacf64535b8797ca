"""Rows of an attention mask without building the whole [..., L, S] mask.

A model builds its attention mask from small pieces (the [B, S] padding input, aranges of the
positions) and broadcasts them to [B, 1, L, S] on the way; at L = 65536 that is a 4 GB bool
tensor or a 17 GB float one. Probing the mask (is it causal? is it causal + key padding?) and
reading the key padding at run time need only some of its query rows, so `row_slice` builds
`mask[..., start:stop:step, :]` by pushing the slice on the query axis down into the mask's
inputs, through elementwise ops, broadcasts and view-like ops: no new node holds all L rows.

    sample_rows(gm, mask_node, args, kwargs)   # compile time: exact when small, else sampled rows
    row_slice(graph, mask_node, (-1, None, 1)) # run time: the last query row, as graph nodes
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.fx as fx

from sparsecc.graph.fx_utils import aten, evaluate, fake, hint, new_call

#: a node whose other axes are static and hold at most this many elements per row is sliced directly
ROW_ELEMENTS = 64
#: masks up to this many elements are evaluated whole (exact probes); larger ones row by row
FULL_LIMIT = 1 << 24
#: rows per part of a sampled probe: the first, a stride over all, the last
SAMPLE_ROWS = 64

_VIEW_OF_LEAF = {aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.slice.Tensor,
                 aten.select.int, aten.expand.default, aten.permute.default, aten.transpose.int,
                 aten.unsqueeze.default, aten.squeeze.dim, aten.alias.default, aten.detach.default}


def masked_below(dtype: torch.dtype) -> float:
    """An additive mask value at or below this masks its key: -1e30, or half the dtype's lowest value for
    fp16, whose masks use torch.finfo(float16).min = -65504 (Hugging Face's convention)."""
    return max(torch.finfo(dtype).min / 2, -1e30)


def masked(mask: torch.Tensor) -> torch.Tensor:
    """Where a bool keep-mask or an additive mask hides the key."""
    return ~mask if mask.dtype == torch.bool else (mask <= masked_below(mask.dtype)) | mask.isneginf()


@dataclass
class MaskRows:
    """Some query rows of a mask: `values[..., i, :]` is the mask's row `rows[i]` of `length` rows."""

    values: torch.Tensor
    rows: torch.Tensor  # int64 query positions
    length: int

    @property
    def complete(self) -> bool:
        return self.rows.numel() == self.length


def _numel(node: fx.Node) -> Optional[int]:
    val = fake(node)
    return None if val is None else math.prod(hint(d) for d in val.shape)


def _is_leaf_view(node: Any) -> bool:
    """An input, a weight/buffer, or a view of one: slicing it allocates nothing."""
    while isinstance(node, fx.Node) and node.op == "call_function" and node.target in _VIEW_OF_LEAF:
        node = node.args[0]
    return isinstance(node, fx.Node) and node.op in ("placeholder", "get_attr")


# broadcasting elementwise ops without torch's `pointwise` tag
_ELEMENTWISE = {aten._to_copy.default, aten.where.self, aten.where.ScalarOther, aten.where.ScalarSelf,
                aten.where.Scalar, aten.__and__.Tensor, aten.__or__.Tensor, aten.masked_fill.Tensor}


def _elementwise(node: fx.Node) -> bool:
    target = node.target
    return target in _ELEMENTWISE or (isinstance(target, torch._ops.OpOverload) and torch.Tag.pointwise in target.tags)


class _Pusher:
    """Builds, in `graph` at its insert point, nodes computing `node` sliced on one axis."""

    def __init__(self, graph: fx.Graph, sl: tuple, meta_from: Optional[fx.Node], budget: int):
        self.graph, self.sl, self.meta_from, self.budget = graph, sl, meta_from, budget
        self.memo: dict = {}

    def emit(self, target, args, kwargs=None) -> fx.Node:
        return new_call(self.graph, target, tuple(args), kwargs or {}, meta_from=self.meta_from)

    def direct(self, node: fx.Node, axis: int) -> fx.Node:
        start, stop, step = self.sl
        return self.emit(aten.slice.Tensor, (node, axis, start, stop, step))

    def push(self, node: Any, axis: int) -> Optional[fx.Node]:
        """`node` sliced on `axis` (of its own rank), or None when that would need the whole tensor."""
        key = (node, axis)
        if key not in self.memo:
            self.memo[key] = self._push(node, axis)
        return self.memo[key]

    def _push(self, node: fx.Node, axis: int) -> Optional[fx.Node]:
        val = fake(node)
        if val is None or axis < 0 or axis >= val.dim():
            return None
        if isinstance(val.shape[axis], int) and val.shape[axis] == 1:
            return node  # broadcast along the axis: every row is the same
        other = [d for i, d in enumerate(val.shape) if i != axis]
        if _is_leaf_view(node) or (all(isinstance(d, int) for d in other) and math.prod(other) <= ROW_ELEMENTS):
            return self.direct(node, axis)  # a view of an input, or a few elements per row (an arange)
        pushed = self._rule(node, axis, val.dim()) if node.op == "call_function" else None
        if pushed is None and _numel(node) <= self.budget:
            return self.direct(node, axis)
        return pushed

    def _operand(self, arg: Any, axis: int, rank: int) -> Any:
        """An input of a broadcasting op: sliced when it has the axis, as it is when broadcast over it."""
        if not isinstance(arg, fx.Node):
            return arg
        val = fake(arg)
        if val is None:
            return None
        ax = axis - (rank - val.dim())
        if ax < 0:
            return arg
        return self.push(arg, ax)

    def _rule(self, node: fx.Node, axis: int, rank: int) -> Optional[fx.Node]:
        t, args = node.target, list(node.args)
        if _elementwise(node):
            new = [self._operand(a, axis, rank) for a in args]
            if any(a is None for a in new) or any(isinstance(v, fx.Node) for v in node.kwargs.values()):
                return None
            return self.emit(t, new, dict(node.kwargs))
        if t is aten.expand.default:
            x, sizes = args[0], list(args[1])
            xval = fake(x)
            ax = axis - (rank - xval.dim())
            if ax < 0 or (isinstance(xval.shape[ax], int) and xval.shape[ax] == 1):
                return self.direct(node, axis)  # the expand makes the rows: a view of a small tensor
            x2 = self.push(x, ax)
            if x2 is None:
                return None
            sizes[axis] = -1
            return self.emit(t, (x2, sizes))
        if t is aten.unsqueeze.default:
            d = args[1] % rank
            x2 = self.push(args[0], axis - 1 if axis > d else axis)
            return None if x2 is None else self.emit(t, (x2, args[1]))
        if t is aten.squeeze.dim:
            d = args[1] % (rank + 1)
            x2 = self.push(args[0], axis + 1 if axis >= d else axis)
            return None if x2 is None else self.emit(t, (x2, args[1]))
        if t is aten.permute.default:
            dims = [d % rank for d in args[1]]
            x2 = self.push(args[0], dims[axis])
            return None if x2 is None else self.emit(t, (x2, args[1]))
        if t is aten.transpose.int:
            a, b = args[1] % rank, args[2] % rank
            x2 = self.push(args[0], b if axis == a else a if axis == b else axis)
            return None if x2 is None else self.emit(t, (x2, a, b))
        if t is aten.slice.Tensor and args[1] % rank != axis:
            x2 = self.push(args[0], axis)
            return None if x2 is None else self.emit(t, (x2, *args[1:]), dict(node.kwargs))
        if t is aten.select.int:
            d = args[1] % (rank + 1)
            x2 = self.push(args[0], axis + 1 if axis >= d else axis)
            return None if x2 is None else self.emit(t, (x2, *args[1:]))
        if t is aten.index.Tensor:  # x[i0, i1, ...]: the result's axes are the broadcast indices' axes
            x, indices = args
            xval = fake(x)
            if any(i is None for i in indices) or len(indices) != xval.dim():
                return None
            new = [self._operand(i, axis, rank) for i in indices]
            return None if any(i is None for i in new) else self.emit(t, (x, new))
        return None


def row_slice(graph: fx.Graph, mask: fx.Node, sl: tuple, meta_from: Optional[fx.Node] = None,
              budget: int = 0) -> Optional[fx.Node]:
    """Nodes (at the graph's insert point) computing `mask[..., start:stop:step, :]`, `sl` = (start,
    stop, step) on the query axis (dim -2), none of which holds the whole mask; None when an op on the
    way has no rule and is larger than `budget` elements."""
    val = fake(mask)
    if val is None or val.dim() < 2:
        return None
    return _Pusher(graph, sl, meta_from, budget).push(mask, val.dim() - 2)


def sample_rows(gm: fx.GraphModule, mask: fx.Node, args: tuple, kwargs: dict,
                full_limit: int = FULL_LIMIT, per_part: int = SAMPLE_ROWS) -> Optional[MaskRows]:
    """The mask on the example inputs: whole when it has at most `full_limit` elements, else its first
    `per_part` rows, `per_part` rows strided over all, and its last `per_part` rows (each part built
    without the whole mask). None when the mask is too large and cannot be built row by row."""
    val = fake(mask)
    if val is None or val.dim() < 2:
        return None
    L = hint(val.shape[-2])
    if _numel(mask) <= full_limit or L <= 3 * per_part:
        return MaskRows(evaluate(gm, [mask], args, kwargs)[mask], torch.arange(L), L)
    step = -(-L // per_part)
    parts = [((0, per_part, 1), torch.arange(per_part)), ((0, None, step), torch.arange(0, L, step)),
             ((-per_part, None, 1), torch.arange(L - per_part, L))]
    anchor = next(iter(mask.users), None) or mask.next
    made: list[fx.Node] = []
    before = set(gm.graph.nodes)
    try:
        with gm.graph.inserting_before(anchor):
            for sl, _ in parts:
                node = row_slice(gm.graph, mask, sl, budget=full_limit)
                if node is None:
                    return None
                made.append(node)
        values = evaluate(gm, made, args, kwargs)
    finally:
        for node in reversed([n for n in gm.graph.nodes if n not in before]):
            gm.graph.erase_node(node)
    rows = torch.cat([r for _, r in parts])
    order = torch.argsort(rows, stable=True)
    stacked = torch.cat([values[n].expand(*values[n].shape[:-2], len(r), values[n].shape[-1])
                         for n, (_, r) in zip(made, parts)], dim=-2)
    rows = rows[order]
    first = torch.ones_like(rows, dtype=torch.bool)
    first[1:] = rows[1:] != rows[:-1]  # a row in two parts once
    return MaskRows(stacked.index_select(-2, order[first]), rows[first], L)

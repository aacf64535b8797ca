"""Block layouts in the one-token decode step.

The prefill graph runs `sparsecc::block_sparse_attention`, whose queries start at position 0. The
decode step's one query sits at cache slot p: it attends to the keys of the blocks that row p // block
of its layer's layout keeps (and, as always, to no key after p and no padding). This pass adds that
row to the attention mask of each decode-step SDPA, so a decode step computes what the prefill graph
computes for the same position: exact block-sparse attention (pruned keys at -inf), one query row.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.fx as fx

from sparsecc.errors import LayoutError
from sparsecc.graph.fx_utils import attention_args, fake

__all__ = ["mask_decode_attention"]

aten = torch.ops.aten


def _slot(graph: fx.Graph, kind: str, key: fx.Node) -> tuple[fx.Node, Any, fx.Node]:
    """(the query's cache slot as a [1] tensor, the number of keys, arange(keys)): the slot is the `start`
    input of a static-cache step, the past length (keys - 1) of a past / present step. Tensor arithmetic,
    not SymInt: the ONNX export keeps it a function of the inputs."""
    keys = fake(key).shape[2] if kind == "static" else graph.call_function(aten.sym_size.int, (key, 2))
    positions = graph.call_function(aten.arange.default, (keys,), {"dtype": torch.long, "device": fake(key).device})
    if kind == "static":
        start = next(n for n in graph.nodes if n.op == "placeholder" and n.name == "start")
        return graph.call_function(aten.reshape.default, (start, [1])), keys, positions
    return graph.call_function(aten.slice.Tensor, (positions, 0, -1)), keys, positions


def mask_decode_attention(gm: fx.GraphModule, regions: list, layouts: dict, kind: str, max_len: int) -> int:
    """Restrict each decode-step attention whose region has a layout (region name -> BlockLayout) to the
    keys its layout row keeps; returns how many were restricted. kind: "static" or "past" (how the step
    holds its cache)."""
    graph = gm.graph
    done = 0
    for index, region in enumerate(r for r in regions if r.kind == "attention"):
        layout = layouts.get(region.name)
        if layout is None or region.sdpa is None:
            continue
        try:
            layout.check_covers(max_len, max_len)
        except LayoutError as err:
            raise LayoutError(f"region {region.name} (decode step): {err}") from err
        node = region.sdpa
        args = attention_args(node)
        key, mask = args["key"], args.get("attn_mask")
        name = f"sparsecc_decode_layout_{index}"
        gm.register_buffer(name, layout.mask.to(torch.bool).clone(), persistent=True)
        block = int(layout.block_size)
        with graph.inserting_before(node):
            table = graph.get_attr(name)
            slot, keys, positions = _slot(graph, kind, key)
            row = graph.call_function(aten.div.Tensor_mode, (slot, block), {"rounding_mode": "floor"})
            kept = graph.call_function(aten.index_select.default, (table, 0, row))  # [1, key_blocks]
            key_blocks = graph.call_function(aten.div.Tensor_mode, (positions, block), {"rounding_mode": "floor"})
            keep = graph.call_function(aten.index_select.default, (kept, 1, key_blocks))  # [1, keys]
            keep = graph.call_function(aten.view.default, (keep, [1, 1, 1, keys]))
            if mask is None:
                new_mask = keep
            elif fake(mask).dtype == torch.bool:
                new_mask = graph.call_function(aten.logical_and.default, (mask, keep))
            else:
                drop = graph.call_function(aten.logical_not.default, (keep,))
                new_mask = graph.call_function(aten.masked_fill.Scalar, (mask, drop, float("-inf")))
        if len(node.args) > 3:
            node.update_arg(3, new_mask)
        else:
            node.update_kwarg("attn_mask", new_mask)
        done += 1
    if done:
        graph.lint()
        gm.recompile()
    return done

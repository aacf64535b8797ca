"""Block-sparse attention, the rewrite shared by the layout methods (SPION, fixed patterns).

A layout method decides one `BlockLayout` per self-attention region (its plan); this
handler base checks that a region fits and rewrites its SDPA into
`sparsecc::block_sparse_attention(q, k, v, kv_indices, kv_counts, block, scale, causal,
key_padding_mask)`. The layout's ELL indices are buffers of the compiled module, so they
travel with its state_dict and with exported graphs.

The op takes a causal flag, a key-padding vector and an optional additive score bias. A region's
mask is split into (causal, key padding) at compile time where the example inputs' real mask values
show that it is exactly that (then the [B, H, L, S] mask is no longer built); any other mask (ALiBi,
relative-position terms, T5's position bias, a sliding window) is passed whole as the bias, applied
on the kept blocks. A causal sliding window found in the mask (`AttentionRegion.window`) is also a
block layout of its own: the plan keeps only the tiles that meet it (`BlockLayout.within_window`).
"""

from __future__ import annotations

import logging
import operator
from typing import Optional

import torch
import torch.fx as fx

import sparsecc.ops.block_sparse_attention  # noqa: F401  (registers the op)
from sparsecc.ops.block_sparse_attention.pruned import pruned_as_logit_zero
from sparsecc.errors import LayoutError
from sparsecc.graph.fx_utils import SDPA, aten, attention_args, fake, hint, new_call, replace_node
from sparsecc.graph.mask_rows import masked, masked_below, row_slice, sample_rows
from sparsecc.graph.regions import attention_core_flops, find_attention
from sparsecc.layouts import BlockLayout
from sparsecc.methods.base import Match, Method, Plan, Target
from sparsecc.passes.manager import PassContext

log = logging.getLogger("sparsecc.methods.block_sparse")


def layout_plan(method: str, region: str, layout: BlockLayout) -> Plan:
    """A layout as a plan: the block mask as a tensor, the rest as values."""
    return Plan(method=method, region=region, tensors={"mask": layout.mask},
                values={"block_size": layout.block_size, "causal": layout.causal, "meta": dict(layout.meta),
                        "density": layout.density})


def plan_layout(plan: Plan) -> BlockLayout:
    return BlockLayout(plan.tensors["mask"], int(plan.values["block_size"]), bool(plan.values["causal"]),
                       plan.region, dict(plan.values.get("meta", {})))


# ------------------------------------------------------------------ mask split
def split_mask(mask: torch.Tensor, causal: bool, rows: Optional[torch.Tensor] = None,
               length: Optional[int] = None) -> Optional[torch.Tensor]:
    """If `mask` (bool keep-mask or additive 0/-inf) equals causal AND a per-key padding mask,
    return the key padding keep-mask reduced to shape (B or 1, S); else None.

    rows / length: `mask` holds only these query rows (ascending, the last row included) of a mask of
    `length` rows (`sparsecc.graph.mask_rows.sample_rows`); default: every row.
    """
    hidden = masked(mask)
    if mask.dtype != torch.bool and not bool(((mask == 0) | hidden).all()):
        return None  # a real bias, not a mask
    keep = ~hidden
    while keep.dim() < 4:
        keep = keep.unsqueeze(0)
    R, S = keep.shape[-2:]
    L = R if length is None else length
    rows = torch.arange(R) if rows is None else rows
    keys = keep[..., -1:, :]  # the last query sees every key under a causal mask
    if keys.shape[1] != 1 and not bool((keys == keys[:, :1]).all()):
        return None  # differs across heads
    rebuilt = keys[:, :1].expand(keep.shape[0], 1, R, S)
    if causal:
        rebuilt = rebuilt & (torch.arange(S).unsqueeze(0) <= rows.unsqueeze(1) + (S - L))
    if not bool((rebuilt.expand(keep.shape) == keep).all()):
        return None
    return keys[:, 0, 0, :]


def _key_padding_node(graph: fx.Graph, mask: fx.Node, anchor: fx.Node, query: fx.Node) -> Optional[fx.Node]:
    """(B, S) keep-mask read from the graph's mask: the last query row, first head. The row is computed
    from the mask's inputs where the graph allows (sparsecc.graph.mask_rows), so the [B, H, L, S] mask
    itself is no longer built once the attention that used it is rewritten."""
    m = row_slice(graph, mask, (-1, None, 1), meta_from=anchor) or mask
    val = fake(m)
    while val.dim() < 4:
        m = new_call(graph, aten.unsqueeze.default, (m, 0), meta_from=anchor)
        val = fake(m)
    m = new_call(graph, aten.select.int, (m, 1, 0), meta_from=anchor)
    m = new_call(graph, aten.select.int, (m, 1, -1), meta_from=anchor)
    if fake(m).dtype != torch.bool:
        m = new_call(graph, aten.gt.Scalar, (m, masked_below(fake(m).dtype)), meta_from=anchor)
    batch = fake(query).shape[0]
    if fake(m).shape[0] is not batch and fake(m).shape[0] == 1:  # a mask broadcast over the batch
        size = batch if isinstance(batch, int) else new_call(graph, aten.sym_size.int, (query, 0), meta_from=anchor)
        m = new_call(graph, aten.expand.default, (m, [size, -1]), meta_from=anchor)
    return m


def _key_padding_split(region, ctx: PassContext) -> bool:
    """True when the region's mask is exactly causal + key padding on the example inputs (it is then passed
    as a key-padding vector), False when it is something else (it is then the op's score bias)."""
    splits = ctx.data.setdefault("mask_splits", {})
    if region.name not in splits:
        sample = _mask_values(ctx)[region.mask]
        if getattr(region, "window", None):  # a window (maybe longer than the example) is never key padding
            sample = None
        mask_is_causal = region.causal and region.causal_source == "mask"
        ok = sample is not None and split_mask(sample.values, mask_is_causal, sample.rows, sample.length) is not None
        splits[region.name] = ok
    return splits[region.name]


def _mask_kind(region, ctx: PassContext) -> str:
    """What a mask that is not causal + key padding holds, for the report."""
    if getattr(region, "window", None):
        return f"a sliding window of {region.window} keys"
    sample = _mask_values(ctx)[region.mask]
    if sample is None:
        return "too large to read on the example inputs"
    values = sample.values
    if values.dtype != torch.bool and not bool(((values == 0) | masked(values)).all()):
        return "a score bias: ALiBi, relative positions, T5's position bias"
    return "another mask"


def _bias_node(graph: fx.Graph, mask: fx.Node, anchor: fx.Node, query: fx.Node, key: fx.Node) -> fx.Node:
    """The mask as the op's additive score bias: float in q's dtype, (B or 1, H or 1, L, S)."""
    m, dtype = mask, fake(query).dtype
    while fake(m).dim() < 4:
        m = new_call(graph, aten.unsqueeze.default, (m, 0), meta_from=anchor)
    if fake(m).dtype == torch.bool:
        m = new_call(graph, aten.where.Scalar, (m, 0.0, float("-inf")), meta_from=anchor)
    if fake(m).dtype != dtype:
        m = new_call(graph, aten._to_copy.default, (m,), {"dtype": dtype}, meta_from=anchor)
    L, S = fake(query).shape[2], fake(key).shape[2]
    if fake(m).shape[2] is not L or fake(m).shape[3] is not S:
        sizes = [size if isinstance(size, int) else new_call(graph, aten.sym_size.int, (t, 2), meta_from=anchor)
                 for size, t in ((L, query), (S, key))]
        m = new_call(graph, aten.expand.default, (m, [-1, -1, *sizes]), meta_from=anchor)
    return m


def _buffer_node(gm: fx.GraphModule, name: str, value: torch.Tensor, like: fx.Node) -> fx.Node:
    gm.register_buffer(name, value, persistent=False)  # plan data, not weights: kept out of state_dict()
    node = gm.graph.get_attr(name)
    mode = fake(like).fake_mode
    node.meta["val"] = mode.from_tensor(value, static_shapes=True)
    return node


def _mask_values(ctx: PassContext) -> dict:
    """Every attention region's mask on the example inputs, whole or sampled rows (once per compile)."""
    if "mask_values" not in ctx.data:
        masks = {r.mask for r in ctx.regions if r.kind == "attention" and r.mask is not None}
        captured = ctx.captured
        kwargs = {**captured.call_defaults, **captured.kwargs}
        ctx.data["mask_values"] = {m: sample_rows(captured.gm, m, captured.args, kwargs) for m in masks}
    return ctx.data["mask_values"]


MAX_DEFAULT_BLOCKS = 1024  # a default max_len (the model's maximum positions) covers at most this many blocks


def serving_layout(layout: BlockLayout, config, captured) -> BlockLayout:
    """`layout` fitted to the longest sequence it must serve: `config.max_len` (cropped or extended), or by
    default the model's maximum positions (extended only, up to MAX_DEFAULT_BLOCKS blocks). Beyond the
    planned length the "structure" rule continues bands and global rows/columns (BlockLayout.fit)."""
    if config.max_len is not None:
        return layout.fit(config.max_len, extend="structure")
    known = getattr(captured, "max_positions", None)
    if known is None:
        return layout
    want = min(known, MAX_DEFAULT_BLOCKS * layout.block_size)
    if -(-want // layout.block_size) <= min(layout.shape):
        return layout
    return layout.fit(want, extend="structure")


class BlockSparseMethod(Method):
    """Base of the layout methods: match and rewrite; subclasses say how a layout is made (`make_layout`)
    at the planned length; the plan holds it fitted to the longest sequence it serves (`serving_layout`)."""

    slots = ("attention",)
    needs_every_query = True

    def make_layout(self, target: Target, stats: list, ctx) -> BlockLayout:
        raise NotImplementedError

    def plan(self, target: Target, stats: list, ctx) -> Plan:
        layout = serving_layout(self.make_layout(target, stats, ctx), target.config, ctx.captured)
        if getattr(target.region, "window", None):
            layout = layout.within_window(target.region.window)
        return layout_plan(type(target.config).kind, target.region.name, layout)

    def label(self, config) -> str:
        """How the report names the layout (e.g. "spion_cf", "bigbird")."""
        raise NotImplementedError

    def requested_density(self, config) -> Optional[float]:
        """The density the config asks for (None: the method decides it, e.g. from a quantile)."""
        return None

    def pruned_logits(self, config) -> str:
        """"-inf": keys outside the layout get no weight (exact block-sparse attention); "zero": they count
        as logit 0 in the softmax denominator, as the released SPION kernels do."""
        return "-inf"

    def match(self, region, config, ctx) -> Match:
        if region.cross:
            return Match.fail("block_sparse", "cross attention (queries and keys from different sequences) stays dense")
        if region.sdpa.target is not SDPA:
            return Match.fail("block_sparse", f"already rewritten ({region.sdpa.target})")
        if len(fake(attention_args(region.sdpa)["query"]).shape) != 4:
            return Match.fail("block_sparse", "3-D (batch*heads) attention; block-sparse attention needs (B, H, L, D)")
        if region.mask is not None and not _key_padding_split(region, ctx):
            if self.pruned_logits(config) == "zero":
                return Match.fail("block_sparse", f"its mask is not causal + key padding ({_mask_kind(region, ctx)}), "
                                  "and pruned_logits='zero' (released SPION's softmax counting pruned keys) is "
                                  "defined for those only; use pruned_logits='-inf'")
        return Match.ok()

    def rewrite(self, gm: fx.GraphModule, ctx: PassContext, targets: list[Target]) -> list[str]:
        by_name = {t.name: t for t in targets}
        changes = []
        graph = gm.graph
        for index, r in enumerate(find_attention(gm)):
            target = by_name.get(r.name)
            if target is None:
                continue
            facts = target.region  # the probed facts (causal read from the mask) of this region
            causal = facts.causal
            node = r.sdpa
            a = attention_args(node)
            layout = plan_layout(target.plan)
            try:
                layout.check_covers(hint(r.q_len), hint(r.kv_len))
            except LayoutError as err:
                raise LayoutError(f"region {r.name}: {err}") from err
            indices, counts = layout.ell()
            prefix = f"sparsecc_layout_{index}"
            with graph.inserting_before(node):
                idx_node = _buffer_node(gm, f"{prefix}_indices", indices, a["query"])
                cnt_node = _buffer_node(gm, f"{prefix}_counts", counts, a["query"])
                kpm = bias = None
                if r.mask is not None and _key_padding_split(facts, ctx):
                    kpm = _key_padding_node(graph, r.mask, node, a["query"])
                elif r.mask is not None:
                    bias = _bias_node(graph, r.mask, node, a["query"], a["key"])
                scale = a["scale"] if a["scale"] is not None else fake(a["query"]).shape[-1] ** -0.5
                op = new_call(graph, torch.ops.sparsecc.block_sparse_attention.default,
                              (a["query"], a["key"], a["value"], idx_node, cnt_node, layout.block_size, float(scale),
                               bool(causal), kpm, *([bias] if bias is not None else [])), meta_from=node)
                out = new_call(graph, operator.getitem, (op, 0), meta_from=node)
                if self.pruned_logits(target.config) == "zero":
                    lse = new_call(graph, operator.getitem, (op, 1), meta_from=node)
                    out = new_call(graph, pruned_as_logit_zero, (out, lse, a["query"], a["key"], idx_node, cnt_node,
                                                                 layout.block_size, bool(causal), kpm), meta_from=node)
            core = attention_core_flops(r)  # read before the SDPA node is erased
            here = layout.fit(hint(r.q_len), hint(r.kv_len))  # the part the example's length runs
            sparse_flops = r.flops - core + int(round(core * here.density))
            replace_node(node, out)
            facts.sparse = {"method": self.label(target.config), "density": here.density, "flops": sparse_flops,
                            "block": layout.block_size, "blocks": list(here.mask.shape),
                            "max_len": layout.seq_lens[0]}
            if bias is not None:
                facts.sparse["score_bias"] = _mask_kind(facts, ctx)
            if self.requested_density(target.config) is not None:
                facts.sparse["density_requested"] = self.requested_density(target.config)
            changes.append(f"{type(target.config).kind}:{r.name} density {layout.density:.3f}")
        return changes

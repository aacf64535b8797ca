"""SPION: per-layer block layouts, and the rewrite of attention into block-sparse attention.

Two steps, as the paper does them:
1. `make_layouts`: one BlockLayout per attention region, from calibrated attention
   maps (SPION-CF/C/F) or a fixed pattern (BigBird, local, strided, random).
2. `spion_rewrite` (a pass): each region's SDPA becomes
   `sparsecc::block_sparse_attention(q, k, v, kv_indices, kv_counts, block, scale, causal,
   key_padding_mask)`. The layout's ELL indices are buffers of the compiled module, so they
   travel with its state_dict and with exported graphs.

The op takes a causal flag and a key-padding vector, not an arbitrary mask. A region's mask
is therefore split into (causal, key padding) at compile time and the split is checked on
the example inputs' real mask values; a region whose mask is something else (a learned bias
such as T5's position bias, a sliding window) is left dense with the reason in the report.
"""

from __future__ import annotations

import logging
import operator
from typing import Optional

import torch
import torch.fx as fx

import sparsecc.ops.block_sparse_attention  # noqa: F401  (registers the op)
from sparsecc.errors import LayoutError
from sparsecc.graph.fx_utils import SDPA, aten, fake, new_call, replace_node
from sparsecc.graph.regions import AttentionRegion, attention_core_flops, evaluate, find_attention, sdpa_args
from sparsecc.layouts import LayoutSet, layout_at_density, spion_c, spion_cf, spion_f
from sparsecc.passes.manager import PassContext
from sparsecc.recipe import Spion

log = logging.getLogger("sparsecc.passes.spion")

_FIXED_KIND = {"bigbird": "bigbird", "local": "local", "strided": "strided", "random": "random"}


def _layout_for(cfg: Spion, region: AttentionRegion, attn_map: Optional[torch.Tensor]):
    causal = region.causal
    if cfg.method == "spion_cf":
        return spion_cf(attn_map, block_size=cfg.block, quantile=cfg.quantile, kernel_size=cfg.kernel_size,
                        causal=causal, name=region.name)
    if cfg.method == "spion_f":
        return spion_f(attn_map, block_size=cfg.block, quantile=cfg.quantile, causal=causal, name=region.name)
    if cfg.method == "spion_c":
        return spion_c(attn_map, block_size=cfg.block, density=cfg.density, kernel_size=cfg.kernel_size,
                       causal=causal, name=region.name)
    layout = layout_at_density(_FIXED_KIND[cfg.method], region.q_len, cfg.block, cfg.density, causal=causal,
                               seed=cfg.seed)
    return layout.with_name(region.name)


def make_layouts(cfg: Spion, regions: list[AttentionRegion], maps: Optional[dict]) -> LayoutSet:
    """One layout per self-attention region (cross attention stays dense)."""
    layouts = LayoutSet()
    for r in regions:
        if r.cross:
            continue
        if cfg.needs_calibration and r.name not in (maps or {}):
            raise LayoutError(f"no calibrated attention map for region {r.name}; pass calibration=[batches] "
                              f"to sparsecc.compile for method {cfg.method!r}")
        layouts[r.name] = _layout_for(cfg, r, (maps or {}).get(r.name))
    return layouts


# ------------------------------------------------------------------ mask split
def split_mask(mask: torch.Tensor, causal: bool) -> Optional[torch.Tensor]:
    """If `mask` (bool keep-mask or additive 0/-inf) equals causal AND a per-key padding mask,
    return the key padding keep-mask reduced to shape (B or 1, S); else None."""
    if mask.dtype == torch.bool:
        keep = mask
    else:
        masked = (mask <= -1e30) | mask.isneginf()
        if not bool(((mask == 0) | masked).all()):
            return None  # a real bias, not a mask
        keep = ~masked
    while keep.dim() < 4:
        keep = keep.unsqueeze(0)
    L, S = keep.shape[-2:]
    keys = keep[..., -1:, :]  # the last query sees every key under a causal mask
    if keys.shape[1] != 1 and not bool((keys == keys[:, :1]).all()):
        return None  # differs across heads
    rebuilt = keys[:, :1].expand(keep.shape[0], 1, L, S)
    if causal:
        rebuilt = rebuilt & torch.ones(L, S, dtype=torch.bool).tril(S - L)
    if not bool((rebuilt.expand(keep.shape) == keep).all()):
        return None
    return keys[:, 0, 0, :]


def _key_padding_node(graph: fx.Graph, mask: fx.Node, anchor: fx.Node, query: fx.Node) -> Optional[fx.Node]:
    """(B, S) keep-mask read from the graph's mask: the last query row, first head."""
    m = mask
    val = fake(m)
    while val.dim() < 4:
        m = new_call(graph, aten.unsqueeze.default, (m, 0), meta_from=anchor)
        val = fake(m)
    m = new_call(graph, aten.select.int, (m, 1, 0), meta_from=anchor)
    m = new_call(graph, aten.select.int, (m, 1, -1), meta_from=anchor)
    if fake(m).dtype != torch.bool:
        m = new_call(graph, aten.gt.Scalar, (m, -1e30), meta_from=anchor)
    batch = fake(query).shape[0]
    if fake(m).shape[0] is not batch and fake(m).shape[0] == 1:  # a mask broadcast over the batch
        size = batch if isinstance(batch, int) else new_call(graph, aten.sym_size.int, (query, 0), meta_from=anchor)
        m = new_call(graph, aten.expand.default, (m, [size, -1]), meta_from=anchor)
    return m


def _buffer_node(gm: fx.GraphModule, name: str, value: torch.Tensor, like: fx.Node) -> fx.Node:
    gm.register_buffer(name, value)
    node = gm.graph.get_attr(name)
    mode = fake(like).fake_mode
    node.meta["val"] = mode.from_tensor(value, static_shapes=True)
    return node


def spion_rewrite(gm: fx.GraphModule, ctx: PassContext) -> list[str]:
    """Replace each region that has a layout by block-sparse attention."""
    layouts: LayoutSet = ctx.data["layouts"]
    skipped = ctx.data.setdefault("skipped", [])
    regions = [r for r in find_attention(gm) if r.name in layouts]
    masks = evaluate(gm, [r.mask for r in regions if r.mask is not None], ctx.captured.args,
                     {**ctx.captured.call_defaults, **ctx.captured.kwargs}) if regions else {}
    by_name = {r.name: r for r in ctx.regions}
    changes = []
    graph = gm.graph
    for index, r in enumerate(regions):
        facts = by_name.get(r.name, r)  # the probed facts (causal read from the mask) of this region
        causal = facts.causal
        mask_is_causal = causal and facts.causal_source == "mask"
        node = r.sdpa
        a = sdpa_args(node) if node.target is SDPA else dict(zip(
            ["query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa"], node.args))
        if len(fake(a["query"]).shape) != 4:
            skipped.append(f"{r.name}: 3-D (batch*heads) attention; block-sparse attention needs (B, H, L, D)")
            continue
        if r.mask is not None and split_mask(masks[r.mask], mask_is_causal) is None:
            skipped.append(f"{r.name}: its mask is not causal + key padding (e.g. a learned position bias); "
                           "left dense")
            continue
        layout = layouts[r.name]
        try:
            layout.check_lengths(r.q_len, r.kv_len)
        except LayoutError as err:
            raise LayoutError(f"region {r.name}: {err}") from err
        indices, counts = layout.ell()
        prefix = f"sparsecc_layout_{index}"
        with graph.inserting_before(node):
            idx_node = _buffer_node(gm, f"{prefix}_indices", indices, a["query"])
            cnt_node = _buffer_node(gm, f"{prefix}_counts", counts, a["query"])
            kpm = _key_padding_node(graph, r.mask, node, a["query"]) if r.mask is not None else None
            scale = a["scale"] if a["scale"] is not None else fake(a["query"]).shape[-1] ** -0.5
            op = new_call(graph, torch.ops.sparsecc.block_sparse_attention.default,
                          (a["query"], a["key"], a["value"], idx_node, cnt_node, layout.block_size, float(scale),
                           bool(causal), kpm), meta_from=node)
            out = new_call(graph, operator.getitem, (op, 0), meta_from=node)
        core = attention_core_flops(r)  # read before the SDPA node is erased
        sparse_flops = r.flops - core + int(round(core * layout.density))
        replace_node(node, out)
        facts.sparse = {"method": ctx.recipe.attention.method, "density": layout.density, "flops": sparse_flops,
                         "block": layout.block_size}
        changes.append(f"spion:{r.name} density {layout.density:.3f}")
    return changes

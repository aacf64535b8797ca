"""The fixed-layout handler: one data-independent layout per region at the config's density."""

from __future__ import annotations

from sparsecc.layouts import BlockLayout
from sparsecc.methods.base import Target
from sparsecc.methods.block_sparse import BlockSparseMethod
from sparsecc.methods.fixed.config import Fixed
from sparsecc.methods.fixed.layouts import layout_at_density
from sparsecc.methods.registry import register
from sparsecc.graph.fx_utils import hint


@register(Fixed)
class FixedMethod(BlockSparseMethod):
    def label(self, config: Fixed) -> str:
        return config.pattern

    def requested_density(self, config: Fixed) -> float:
        return config.density

    def make_layout(self, target: Target, stats: list, ctx) -> BlockLayout:
        cfg, r = target.config, target.region
        layout = layout_at_density(cfg.pattern, int(hint(r.q_len)), cfg.block, cfg.density, causal=r.causal,
                                   seed=cfg.seed)
        return layout.with_name(r.name)

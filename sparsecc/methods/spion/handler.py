"""SPION's handler: observe each layer's attention map, plan a layout by conv + flood fill, rewrite."""

from __future__ import annotations

from typing import Optional

from sparsecc.calibrate import AttentionMapObserver
from sparsecc.errors import LayoutError
from sparsecc.layouts import BlockLayout, LayoutSet
from sparsecc.methods.base import Target
from sparsecc.methods.block_sparse import BlockSparseMethod
from sparsecc.methods.registry import register
from sparsecc.methods.spion.config import Spion
from sparsecc.methods.spion.layouts import spion_c, spion_cf, spion_f


@register(Spion)
class SpionMethod(BlockSparseMethod):
    def label(self, config: Spion) -> str:
        return config.method

    def requested_density(self, config: Spion) -> Optional[float]:
        return config.density if config.method == "spion_c" else None

    def pruned_logits(self, config: Spion) -> str:
        return config.pruned_logits

    def observers(self, target: Target) -> list:
        if not target.config.needs_calibration:
            return []
        return [AttentionMapObserver(target.region.sdpa, target.name)]

    def make_layout(self, target: Target, stats: list, ctx) -> BlockLayout:
        cfg, r = target.config, target.region
        if cfg.layouts is not None:
            saved = ctx.data.setdefault("saved_layouts", {})
            if cfg.layouts not in saved:
                saved[cfg.layouts] = LayoutSet.load_dir(cfg.layouts)
            if r.name not in saved[cfg.layouts]:
                raise LayoutError(f"{cfg.layouts} has no layout for region {r.name} (it has "
                                  f"{sorted(saved[cfg.layouts])[:4]}...); save layouts of the same model")
            return saved[cfg.layouts][r.name].with_name(r.name)
        maps = [o for o in stats if not o.empty]
        if not maps:
            raise LayoutError(f"no calibrated attention map for region {r.name}; pass calibration=[batches] "
                              f"to sparsecc.compile for method {cfg.method!r}")
        attn = maps[0].mean()
        if cfg.method == "spion_cf":
            layout = spion_cf(attn, block_size=cfg.block, quantile=cfg.quantile, kernel_size=cfg.kernel_size,
                              causal=r.causal, name=r.name)
        elif cfg.method == "spion_f":
            layout = spion_f(attn, block_size=cfg.block, quantile=cfg.quantile, causal=r.causal, name=r.name)
        else:
            layout = spion_c(attn, block_size=cfg.block, density=cfg.density, kernel_size=cfg.kernel_size,
                             causal=r.causal, name=r.name)
        return layout

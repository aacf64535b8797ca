"""Block-sparse attention layouts: the layout type, SPION and fixed generators, plots."""

from sparsecc.layouts.block_layout import BlockLayout, LayoutSet, ceil_blocks
from sparsecc.layouts.fixed import bigbird, layout_at_density, local_window, random_layout, strided
from sparsecc.layouts.indexing import block_mask_to_csr, block_mask_to_ell
from sparsecc.layouts.plot import save_layout_png
from sparsecc.layouts.spion import (
    SwitchCriterion,
    block_pool,
    diagonal_conv,
    flood_fill,
    quantile_threshold,
    spion_c,
    spion_cf,
    spion_f,
    spion_layouts,
)

__all__ = [
    "BlockLayout",
    "LayoutSet",
    "SwitchCriterion",
    "bigbird",
    "block_mask_to_csr",
    "block_mask_to_ell",
    "block_pool",
    "ceil_blocks",
    "diagonal_conv",
    "flood_fill",
    "layout_at_density",
    "local_window",
    "quantile_threshold",
    "random_layout",
    "save_layout_png",
    "spion_c",
    "spion_cf",
    "spion_f",
    "spion_layouts",
    "strided",
]

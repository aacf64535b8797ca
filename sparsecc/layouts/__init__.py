"""Block-sparse attention layouts: the layout type, its index formats and pictures.

The methods that make layouts live with their method: SPION's conv + flood fill in
`sparsecc.methods.spion.layouts`, the fixed patterns in `sparsecc.methods.fixed.layouts`.
"""

from sparsecc.layouts.block_layout import BlockLayout, LayoutSet, ceil_blocks
from sparsecc.layouts.indexing import block_mask_to_csr, block_mask_to_ell
from sparsecc.layouts.plot import save_layout_png

__all__ = ["BlockLayout", "LayoutSet", "block_mask_to_csr", "block_mask_to_ell", "ceil_blocks", "save_layout_png"]

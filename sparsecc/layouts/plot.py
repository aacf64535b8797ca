"""Picture of a model's block layouts: one heat map per layer, titled with name and density."""

from __future__ import annotations

import math
import os
from collections.abc import Mapping

from sparsecc.errors import LayoutError
from sparsecc.layouts.block_layout import BlockLayout, atomic_write


PLOT_HINT = "pip install 'sparsecc[plot]'"


def plotting_available() -> bool:
    """Whether matplotlib imports (pictures are optional: callers skip them with a note when not)."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def save_layout_png(
    layouts: Mapping[str, BlockLayout] | BlockLayout,
    path: str | os.PathLike,
    cols: int | None = None,
    title: str | None = None,
    dpi: int = 120,
) -> None:
    """Write a PNG grid of the layouts (kept tiles dark, query blocks down, key blocks across).

    `layouts` is a LayoutSet (or any name -> BlockLayout mapping) or a single BlockLayout.
    The file is written to a temporary name and moved into place.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise LayoutError(f"save_layout_png needs matplotlib; {PLOT_HINT}") from None

    if isinstance(layouts, BlockLayout):
        layouts = {layouts.name or "layout": layouts}
    if not layouts:
        raise LayoutError("no layouts to plot; pass a non-empty LayoutSet")
    items = list(layouts.items())
    cols = cols or min(len(items), math.ceil(math.sqrt(len(items))))
    rows = math.ceil(len(items) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 3.5 * rows), squeeze=False, layout="constrained")
    try:
        for ax in axes.flat[len(items):]:
            ax.axis("off")
        for ax, (name, layout) in zip(axes.flat, items):
            ax.imshow(layout.mask.numpy(), cmap="Greys", vmin=0, vmax=1, interpolation="nearest")
            label = name if len(name) <= 32 else "..." + name[-29:]
            nq, nk = layout.shape
            causal = ", causal" if layout.causal else ""
            ax.set_title(f"{label}\n{nq}x{nk} x{layout.block_size}{causal}, density {layout.density:.1%}", fontsize=8)
            ax.tick_params(labelsize=6)
        if title:
            fig.suptitle(title)
        atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=dpi))
    finally:
        plt.close(fig)

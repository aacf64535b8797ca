"""The picture of a tune: latency against quality for every measured candidate, the tuned front, the
uniform settings of each slot and of both, the dense model and the chosen recipe, the budget as a line."""

from __future__ import annotations

import os
from typing import Any

from sparsecc.errors import UnsupportedError
from sparsecc.io import atomic_write
from sparsecc.layouts.plot import PLOT_HINT

_UNIFORM_STYLE = {"attention": ("s", "tab:blue", "uniform attention"), "ffn": ("^", "tab:orange", "uniform FFN"),
                  "flow": ("v", "tab:purple", "uniform token flow"),
                  "both": ("D", "tab:green", "uniform attention + FFN")}


def save_front_png(result: Any, path: str | os.PathLike, dpi: int = 120) -> None:
    """Write the latency / quality picture of a TuneResult (atomically)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise UnsupportedError(f"the tune picture needs matplotlib; {PLOT_HINT}") from None
    ms = 1e3
    fig, ax = plt.subplots(figsize=(7.5, 5), layout="constrained")
    try:
        pts = result.points
        ax.scatter([p["latency"] * ms for p in pts], [p["quality"] for p in pts], s=10, color="0.75",
                   label="candidates measured")
        front = result.front
        ax.plot([p["latency"] * ms for p in front], [p["quality"] for p in front], "-o", color="tab:red", ms=4,
                label="tuned front")
        for slot, (marker, color, label) in _UNIFORM_STYLE.items():
            us = [u for u in result.uniform if u["slot"] == slot]
            if us:
                ax.scatter([u["latency"] * ms for u in us], [u["quality"] for u in us], marker=marker, color=color,
                           s=36, label=label)
        dense_ms = result.table.get("dense_seconds", result.dense_latency) * ms
        dense_q = next((p["quality"] for p in pts if "=" in p["levels"] and all(
            part.endswith("=dense") for part in p["levels"].split())), None)
        if dense_q is not None:
            ax.scatter([dense_ms], [dense_q], marker="o", color="black", s=40, label="dense")
        ax.scatter([result.chosen["latency"] * ms], [result.quality], marker="*", color="tab:red", s=160,
                   edgecolor="black", zorder=5, label=f"tuned ({result.speedup:.2f}x measured)")
        ax.axhline(result.budget.bound, color="tab:red", ls="--", lw=1, label=f"budget {result.budget}")
        ax.set_xlabel(f"latency, ms ({result.backend}; latency table)")
        ax.set_ylabel(result.budget.name + " vs dense (held-out)")
        ax.set_title("sparsecc tune: latency vs quality")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="best")
        atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=dpi))
    finally:
        plt.close(fig)

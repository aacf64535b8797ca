"""The fixed-layout config: data-independent block-sparse attention (BigBird, Longformer, local, ...)."""

from __future__ import annotations

import typing
from dataclasses import dataclass
from typing import Optional

from sparsecc.methods.validate import check_fields, check_max_len

PATTERNS = ("bigbird", "longformer", "local", "strided", "random")


@dataclass(frozen=True)
class Fixed:
    """Block-sparse attention with one fixed pattern for every layer, at a target density.

    pattern: "bigbird" (window + global + random blocks), "longformer" (window + global blocks),
    "local" (sliding window), "strided" (Sparse Transformer), "random". The pattern's free
    parameter (window, stride, random blocks) is chosen for the density nearest `density`
    (relative to the full square of blocks) at the example inputs' length; needs no calibration.
    max_len: the longest sequence the layouts serve, as `Spion.max_len` (the pattern made at the
    example length, extended by the "structure" rule).
    """

    kind: typing.ClassVar[str] = "fixed"
    pattern: str = "bigbird"
    block: int = 64
    density: float = 0.125
    seed: int = 0
    max_len: Optional[int] = None

    def __post_init__(self):
        check_fields(self, "recipe.attention", choices={"pattern": PATTERNS}, positive_ints=("block",),
                     unit=("density",))
        check_max_len(self, "recipe.attention")

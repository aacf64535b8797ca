"""The SPION config: block-sparse attention with one layout per layer, from calibrated attention maps."""

from __future__ import annotations

import typing
from dataclasses import dataclass
from typing import Optional

from sparsecc.errors import RecipeError
from sparsecc.methods.validate import check_fields, check_max_len

SPION_METHODS = ("spion_cf", "spion_c", "spion_f")
FIXED_PATTERNS = ("bigbird", "local", "strided", "random", "longformer")


@dataclass(frozen=True)
class Spion:
    """Block-sparse attention with one layout per layer (SPION, Yoon et al.).

    method: "spion_cf" (conv + flood fill, the paper's main variant), "spion_c" (conv + top-k
    blocks at `density`), "spion_f" (flood fill without conv). All calibrate on data: pass
    calibration batches. Fixed patterns (BigBird, local, ...) are `sparsecc.Fixed`.
    layouts: a directory written by `sm.save_layouts` to reuse instead of calibrating.
    pruned_logits: "-inf" (keys outside the layout get no weight: exact block-sparse attention) or
    "zero" (they count as logit 0 in the softmax denominator, as the released SPION kernels do).
    max_len: the longest sequence the layouts serve. Layouts are planned at the calibration length
    and extended beyond it by BlockLayout.fit's "structure" rule (bands, global rows/columns).
    None: the model's maximum positions when its config says (up to MAX_DEFAULT_BLOCKS blocks),
    else the calibration length.
    """

    kind: typing.ClassVar[str] = "spion"
    method: str = "spion_cf"
    block: int = 64
    quantile: float = 0.98
    kernel_size: int = 31
    density: float = 0.04
    layouts: Optional[str] = None
    seed: int = 0
    pruned_logits: str = "-inf"
    max_len: Optional[int] = None

    def __post_init__(self):
        if self.method in FIXED_PATTERNS:
            raise RecipeError(f"recipe.attention.method: {self.method!r} is a fixed pattern, not a SPION method; "
                              f"use sparsecc.Fixed(pattern={self.method!r}, density=..., block=...) "
                              '(in a recipe file: kind = "fixed")')
        if not (isinstance(self.quantile, float) and 0.0 < self.quantile < 1.0):
            raise RecipeError(f"recipe.attention.quantile: got {self.quantile!r}; expected 0 < quantile < 1 "
                              "(the paper uses 0.96, 0.98 or 0.99)")
        check_fields(self, "recipe.attention", choices={"method": SPION_METHODS, "pruned_logits": ("-inf", "zero")},
                     positive_ints=("block", "kernel_size"), unit=("density",))
        check_max_len(self, "recipe.attention")

    @property
    def needs_calibration(self) -> bool:
        return self.layouts is None

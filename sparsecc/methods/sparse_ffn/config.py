"""The sparse FFN config (Scaling Transformers): a controller keeps one unit in every block of n."""

from __future__ import annotations

import typing
from dataclasses import dataclass

from sparsecc.methods.validate import check_fields


@dataclass(frozen=True)
class SparseFFN:
    """Sparse FFN of Scaling Transformers: a low-rank controller keeps one unit in every block of n.

    init: "distill" fits each controller to the arg-max unit of the dense FFN's activations on the
    calibration inputs (convert a dense model); "random" starts untrained (train from scratch).
    """

    kind: typing.ClassVar[str] = "sparse_ffn"
    n: int = 32
    d_lowrank: int = 64
    init: str = "distill"
    steps: int = 300  # controller distillation steps (after a least-squares start)
    max_tokens: int = 4096  # calibration rows per region
    seed: int = 0

    def __post_init__(self):
        check_fields(self, "recipe.ffn", choices={"init": ("distill", "random")},
                     positive_ints=("n", "d_lowrank", "max_tokens"), nonnegative=("steps",))

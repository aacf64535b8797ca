"""The token flow config (SparseFlow, Kim & Lee, ACL 2024): only salient tokens enter each block."""

from __future__ import annotations

import typing
from dataclasses import dataclass

from sparsecc.errors import RecipeError
from sparsecc.methods.validate import check_fields

FLOW_CHOICES = {
    "gate": ("released", "content", "random"),
    "scope": ("layer", "ffn"),
    "kv": ("all", "kept"),
    "select": ("threshold", "topk", "capacity"),
    "layout": ("packed", "padded"),
}


@dataclass(frozen=True)
class TokenFlow:
    """SparseFlow (Kim & Lee, ACL 2024): learned token-to-block flows; only kept tokens enter a block.

    gate: "released" (the authors' per-position logit tables mixed by a router over the mean input
    embedding), "content" (a linear score of each token's hidden state; the choice for causal
    decoders), or "random" (a fixed random table: a baseline).
    keep: target kept fraction (sparsity-penalty target in training; the budget of select="topk" / "capacity"):
    one number for every flowed block, or one per block in model order (e.g. (0.3, 0.4, 0.4, 0.5, 0.6,
    0.8): same mean, same FLOPs with kv="all", more tokens through the later layers).
    scope: "layer" (attention and FFN of a layer share one gate, as released) or "ffn" (FFN only).
    kv: "all" (kept tokens attend to every token's keys and values, as released) or "kept".
    select: "threshold" (gate > 0.5), "topk" (the ceil(keep * valid tokens) best of each example), or
    "capacity" (the C = ceil(keep * L) best of each example, L its padded length: a static count, so
    the route and the blocks' shapes depend on the input shape only - every batch of one shape, and
    every rank of a distributed run, runs the same program; the blocks run on [batch, C, features],
    the `layout` option does not apply).
    skip: block numbers (from 0, model order, as `keep` counts them) left out of the flow: they run
    dense, with no gate and no route (their `keep` entries are not used). `sparsecc.tune` leaves a
    layer dense this way; keep=1.0 still routes every token through the flow ops.
    pin_first: always keep position 0 (CLS). init: initial gate logit (3.0 opens every gate).
    layout: "packed" (a block's per-token tail - output projection, norms, FFN - runs on the kept
    tokens of the whole batch one after another, so no work on the padding of examples that keep
    fewer than the most) or "padded" (every op on [batch, most kept, features]).
    """

    kind: typing.ClassVar[str] = "token_flow"
    gate: str = "released"
    keep: typing.Union[float, tuple[float, ...]] = 0.5
    scope: str = "layer"
    kv: str = "all"
    select: str = "threshold"
    pin_first: bool = True
    layout: str = "packed"
    skip: tuple[int, ...] = ()
    n_mix: int = 3
    temperature: float = 0.33
    init: float = 3.0
    max_positions: int = 512
    seed: int = 0

    def __post_init__(self):
        for name in ("keep", "skip"):
            if isinstance(getattr(self, name), list):  # hashable, like the rest of the frozen config
                object.__setattr__(self, name, tuple(getattr(self, name)))
        check_fields(self, "recipe.flow", choices=FLOW_CHOICES, positive_ints=("n_mix", "max_positions"),
                     positive=("temperature",))
        keeps = self.keep if isinstance(self.keep, tuple) else (self.keep,)
        if not keeps or not all(0.0 < k <= 1.0 for k in keeps):
            raise RecipeError(f"recipe.flow.keep: got {self.keep!r}; expected 0 < keep <= 1 (e.g. 0.5), or a list of "
                              "such numbers, one per flowed block")
        if not isinstance(self.skip, tuple) or not all(isinstance(b, int) and b >= 0 for b in self.skip):
            raise RecipeError(f"recipe.flow.skip: got {self.skip!r}; expected block numbers >= 0 (e.g. (0, 5)), the "
                              "blocks left dense")

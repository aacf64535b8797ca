"""The inductor backend: `torch.compile` of the rewritten graph; the sparse ops stay opaque custom ops
(their CPU kernels run inside the compiled graph)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Optional

import torch
import torch.fx as fx

from sparsecc.backends import LoweringInputs


@dataclass(frozen=True)
class InductorBackend:
    """dynamic: torch.compile's `dynamic` (None: decide from recompilations); mode: torch.compile's `mode`
    (e.g. "max-autotune"), None for the default."""

    name: ClassVar[str] = "inductor"
    dynamic: Optional[bool] = None
    mode: Optional[str] = None

    def prepare(self) -> None:
        return None

    def lower(self, gm: fx.GraphModule, inputs: LoweringInputs) -> Callable[..., Any]:
        return torch.compile(gm, dynamic=self.dynamic, mode=self.mode)

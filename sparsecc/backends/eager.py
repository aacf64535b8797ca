"""The eager backend: the rewritten graph module runs as it is (PyTorch eager; the sparse ops' CPU
kernels are their C++ kernels where those build, else their PyTorch paths)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, ClassVar

import torch.fx as fx

from sparsecc.backends import LoweringInputs


@dataclass(frozen=True)
class EagerBackend:
    """No options."""

    name: ClassVar[str] = "eager"

    def prepare(self) -> None:
        return None

    def lower(self, gm: fx.GraphModule, inputs: LoweringInputs) -> Callable[..., Any]:
        return gm

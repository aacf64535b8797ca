"""The FFN activations every sparsecc op, kernel and translation understands: one table.

A region's activation is one of these names (sparsecc.graph.regions recognises an
elementwise chain between the FFN's linears by evaluating it against this table),
and each backend implements every entry or says which it lacks.

    gelu       exact (erf) GELU                 gelu_tanh  tanh approximation (GPT-2's gelu_new)
    relu       max(x, 0)                        relu2      relu(x)^2 (Primer's squared ReLU)
    silu       x * sigmoid(x) (SwiGLU's gate)   quick_gelu x * sigmoid(1.702 x) (CLIP)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from sparsecc.errors import UnsupportedError


@dataclass(frozen=True)
class Activation:
    name: str
    fn: Callable[[Tensor], Tensor]
    grad: Callable[[Tensor, Tensor], Tensor]  # (grad_out, pre-activation) -> grad_in, as autograd of fn


def _quick_gelu_grad(g: Tensor, a: Tensor) -> Tensor:
    s = torch.sigmoid(1.702 * a)
    return g * (s + 1.702 * a * s * (1 - s))


ACTIVATIONS: dict[str, Activation] = {a.name: a for a in (
    Activation("relu", F.relu, lambda g, a: torch.ops.aten.threshold_backward(g, a, 0)),
    Activation("gelu", F.gelu, lambda g, a: torch.ops.aten.gelu_backward(g, a, approximate="none")),
    Activation("gelu_tanh", lambda x: F.gelu(x, approximate="tanh"),
               lambda g, a: torch.ops.aten.gelu_backward(g, a, approximate="tanh")),
    Activation("silu", F.silu, lambda g, a: torch.ops.aten.silu_backward(g, a)),
    Activation("quick_gelu", lambda x: x * torch.sigmoid(1.702 * x), _quick_gelu_grad),
    Activation("relu2", lambda x: F.relu(x).square(), lambda g, a: g * 2 * F.relu(a)),
)}


def get(name: str, where: str = "FFN") -> Activation:
    """The activation called `name`, or an UnsupportedError listing the known ones."""
    found = ACTIVATIONS.get(name)
    if found is None:
        raise UnsupportedError(f"{where}: activation {name!r} is not supported; expected one of {sorted(ACTIVATIONS)}")
    return found


def apply(x: Tensor, name: str) -> Tensor:
    return get(name).fn(x)


def identify(fn: Callable[[Tensor], Tensor], atol: float = 1e-5) -> str | None:
    """The name of the table entry that `fn` computes (checked on a grid over [-8, 8]), or None."""
    x = torch.linspace(-8, 8, 257, dtype=torch.float64)
    try:
        y = fn(x)
    except Exception:  # noqa: BLE001 - a chain that cannot run on a 1-D probe is simply not recognised
        return None
    if not isinstance(y, Tensor) or y.shape != x.shape:
        return None
    for name, act in ACTIVATIONS.items():
        if torch.allclose(y, act.fn(x), atol=atol, rtol=1e-5):
            return name
    return None

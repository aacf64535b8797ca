"""`sparsecc::ffn`: a dense feed-forward block as one opaque custom op.

    h   = act(x W_up^T + b_up)                              (plain FFN)
    h   = act(x W_gate^T + b_gate) * (x W_up^T + b_up)      (gated: SwiGLU, GeGLU)
    out = h W_down^T + b_down

The identity rewrite puts it in place of every FFN region; the sparse FFN op
keeps the same arguments and adds the controller. Weights use nn.Linear layout.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from sparsecc.ops import activations


def check_activation(activation: str) -> None:
    activations.get(activation)


def ffn_reference(x: Tensor, w_up: Tensor, b_up: Optional[Tensor], w_down: Tensor, b_down: Optional[Tensor],
                  activation: str, w_gate: Optional[Tensor] = None, b_gate: Optional[Tensor] = None) -> Tensor:
    act = activations.get(activation).fn
    up = F.linear(x, w_up, b_up)
    h = act(up) if w_gate is None else act(F.linear(x, w_gate, b_gate)) * up
    return F.linear(h, w_down, b_down)


@torch.library.custom_op("sparsecc::ffn", mutates_args=())
def ffn(x: Tensor, w_up: Tensor, b_up: Optional[Tensor], w_down: Tensor, b_down: Optional[Tensor],
        activation: str, w_gate: Optional[Tensor] = None, b_gate: Optional[Tensor] = None) -> Tensor:
    """Dense FFN (see module docstring)."""
    check_activation(activation)
    return ffn_reference(x, w_up, b_up, w_down, b_down, activation, w_gate, b_gate)


@ffn.register_fake
def _(x, w_up, b_up, w_down, b_down, activation, w_gate=None, b_gate=None):
    return x.new_empty((*x.shape[:-1], w_down.shape[0]))


def _setup_context(ctx, inputs, output):
    ctx.activation = inputs[5]
    ctx.save_for_backward(*(t for i, t in enumerate(inputs) if i != 5))


def _backward(ctx, grad_out):
    # Recompute the (cheap, deterministic) forward under autograd: exact, and keeps
    # one formula for every activation and the gated variants.
    saved = ctx.saved_tensors
    with torch.enable_grad():
        leaves = [t.detach().requires_grad_(True) if t is not None else None for t in saved]
        x, w_up, b_up, w_down, b_down, w_gate, b_gate = leaves
        out = ffn_reference(x, w_up, b_up, w_down, b_down, ctx.activation, w_gate, b_gate)
        wanted = [t for t in leaves if t is not None]
        grads = iter(torch.autograd.grad(out, wanted, grad_out, allow_unused=True))
    g = [next(grads) if t is not None else None for t in leaves]
    return g[0], g[1], g[2], g[3], g[4], None, g[5], g[6]


ffn.register_autograd(_backward, setup_context=_setup_context)

"""Scaling Transformers sparse-FFN controller and the trainable sparse FFN module.

`SparseFFNController` scores the d_ff hidden units with a low-rank product
(x @ c1) @ c2 + bias and returns a mask that keeps one unit per block of N:
arg-max one-hot at eval; in training, as released in trax, per block
log-softmax, then for the whole batch one random draw: with probability
`st_prob` (0.3) the straight-through one-hot of argmax(log_softmax +
temperature * Gumbel) (forward one-hot, backward softmax gradient), otherwise
the soft softmax mask.

Dense-to-sparse warm-up (ours, not in the paper): training a small model from
scratch with the paper's mask from step 0 can stall, because with 1/N of the
units active the FFN is too weak for the model to learn to use context (see
BENCHMARKS.md, "Scaling Transformers: quality"). `dense_mix` blends the
training mask with all units on, mask = dense_mix + (1 - dense_mix) * mask;
`anneal_dense_mix` lowers it linearly from 1 to 0 over the warm-up steps, after
which training is exactly the paper's. Eval always uses the arg-max mask.

`SparseFFN` holds copies of dense FFN weights plus a controller: training runs
the dense product with the controller's mask (so the controller learns),
eval runs `torch.ops.sparsecc.sparse_ffn`, which reads only the chosen units.

`init_controller_from_activations` distils a controller from a dense FFN on
calibration inputs ("convert a dense model").
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from sparsecc.errors import LayoutError, UnsupportedError
from sparsecc.ops.sparse_ffn import ACTIVATIONS, activation_fn, controller_logits
from sparsecc.ops.sparse_ffn import sparse_ffn as _sparse_ffn_op  # noqa: F401  (registers the op)

__all__ = ["ControllerInit", "SparseFFN", "SparseFFNController", "anneal_dense_mix",
           "init_controller_from_activations"]

log = logging.getLogger("sparsecc.nn.sparse_ffn")


class SparseFFNController(nn.Module):
    """Low-rank controller choosing one active unit per block of `n` of the d_ff FFN units.

    Parameters: c1 (d_model, d_lowrank), c2 (d_lowrank, d_ff), bias (d_ff).
    `forward(x)` returns a mask (..., d_ff): one-hot per block at eval; in
    training straight-through one-hot (probability st_prob) or softmax, blended
    with all-ones by `dense_mix` (0: the paper's training; see the module doc).
    """

    def __init__(self, d_model: int, d_ff: int, n: int = 32, d_lowrank: int = 64, *,
                 temperature: float = 0.1, st_prob: float = 0.3) -> None:
        super().__init__()
        if n < 1 or d_ff % n:
            raise LayoutError(f"SparseFFNController: block size n={n} must divide d_ff={d_ff}; pick a divisor")
        self.d_model, self.d_ff, self.n, self.d_lowrank = d_model, d_ff, n, d_lowrank
        self.temperature, self.st_prob = temperature, st_prob
        self.dense_mix = 0.0  # training only: weight of the all-units mask (dense-to-sparse warm-up)
        self.c1 = nn.Parameter(torch.randn(d_model, d_lowrank) / math.sqrt(d_model))
        self.c2 = nn.Parameter(torch.randn(d_lowrank, d_ff) / math.sqrt(d_lowrank))
        self.bias = nn.Parameter(torch.zeros(d_ff))
        self.last_mode: str = "argmax"  # "argmax", "straight_through" or "soft": what the last forward used

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """Scores (..., d_ff) = (x @ c1) @ c2 + bias (same rounding as the op)."""
        return controller_logits(x, self.c1, self.c2, self.bias)

    def select(self, x: torch.Tensor) -> torch.Tensor:
        """Global indices (..., d_ff / n) of the arg-max unit of each block."""
        logits = self.logits(x)
        local = logits.view(*logits.shape[:-1], -1, self.n).argmax(-1)
        return local + torch.arange(0, self.d_ff, self.n, device=local.device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Mask (..., d_ff) over the hidden units; see the class docstring."""
        blocks = self.logits(x).view(*x.shape[:-1], self.d_ff // self.n, self.n)
        if not self.training:
            self.last_mode = "argmax"
            mask = F.one_hot(blocks.argmax(-1), self.n).to(blocks.dtype)
        else:
            log_p = F.log_softmax(blocks, dim=-1)
            soft = log_p.exp()
            if torch.rand(()).item() < self.st_prob:  # one draw for the whole batch
                self.last_mode = "straight_through"
                gumbel = -torch.empty_like(log_p).exponential_().log()
                hard = F.one_hot((log_p + self.temperature * gumbel).argmax(-1), self.n).to(soft.dtype)
                mask = hard + (soft - soft.detach())  # exactly one-hot forward, softmax gradient
            else:
                self.last_mode = "soft"
                mask = soft
            if self.dense_mix:
                mask = self.dense_mix + (1.0 - self.dense_mix) * mask
        return mask.reshape(*x.shape[:-1], self.d_ff)


def anneal_dense_mix(model: nn.Module, step: int, warmup_steps: int) -> int:
    """Set every `SparseFFNController` in `model` to dense_mix = max(0, 1 - step / warmup_steps).

    Call once per training step (step counts from 0): the FFNs start dense and
    reach the paper's sparse training at `warmup_steps` (0 disables the warm-up).
    Returns how many controllers were set, so a caller can tell a model without any.
    """
    if warmup_steps < 0 or step < 0:
        raise ValueError(f"anneal_dense_mix: step={step} and warmup_steps={warmup_steps} must be >= 0")
    mix = max(0.0, 1.0 - step / warmup_steps) if warmup_steps else 0.0
    controllers = [m for m in model.modules() if isinstance(m, SparseFFNController)]
    for c in controllers:
        c.dense_mix = mix
    return len(controllers)


MASK_AT = ("pre_activation", "post_activation")  # where training multiplies the mask (SparseFFN)


class SparseFFN(nn.Module):
    """Dense FFN weights + `SparseFFNController`; sparse op at eval, masked dense product in training.

    Weights are given in nn.Linear layout (w_in, w_gate: (d_ff, d_model); w_out:
    (d_model, d_ff)) and COPIED: the caller's tensors are never modified. The
    output projection is stored pre-transposed as the parameter `w_out_t`
    (d_ff, d_model), the layout `sparsecc::sparse_ffn` reads. With w_gate the
    FFN is gated: h = act(x w_gate^T + b_gate) * (x w_in^T + b_in) (SwiGLU with
    "silu", GeGLU with "gelu"); gate and up projections share the selection.

    mask_at: where training multiplies the controller's mask. "pre_activation" (trax's _SparseFFMain):
    act((x w_in^T + b_in) * mask), the gate's pre-activation for a gated FFN; with the straight-through
    one-hot and relu only the selected unit of each block passes a gradient to the controller.
    "post_activation" (sparsecc 0.1): act(x w_in^T + b_in) * mask, every unit passes one. Eval is the
    same either way (the sparse op reads the selected units).
    """

    def __init__(self, w_in: torch.Tensor, b_in: Optional[torch.Tensor], w_out: torch.Tensor,
                 b_out: Optional[torch.Tensor], *, n: int = 32, d_lowrank: int = 64, activation: str = "relu",
                 w_gate: Optional[torch.Tensor] = None, b_gate: Optional[torch.Tensor] = None,
                 controller: Optional[SparseFFNController] = None, mask_at: str = "pre_activation") -> None:
        super().__init__()
        if mask_at not in MASK_AT:
            raise UnsupportedError(f"SparseFFN: mask_at {mask_at!r} is not known; use one of {MASK_AT}")
        self.mask_at = mask_at
        if activation not in ACTIVATIONS:
            raise UnsupportedError(f"SparseFFN: activation {activation!r} is not supported; use one of {ACTIVATIONS}")
        d_ff, d_model = w_in.shape
        if tuple(w_out.shape) != (d_model, d_ff):
            raise LayoutError(f"SparseFFN: w_out has shape {tuple(w_out.shape)}, expected (d_model, d_ff) = "
                              f"{(d_model, d_ff)} (nn.Linear layout)")

        def copy(t: Optional[torch.Tensor]) -> Optional[nn.Parameter]:
            return None if t is None else nn.Parameter(t.detach().clone().contiguous())

        self.w_in, self.b_in = copy(w_in), copy(b_in)
        self.w_out_t = nn.Parameter(w_out.detach().t().clone(memory_format=torch.contiguous_format))
        self.b_out = copy(b_out)
        self.w_gate, self.b_gate = copy(w_gate), copy(b_gate)
        self.n, self.activation = n, activation
        self.controller = controller if controller is not None else SparseFFNController(d_model, d_ff, n, d_lowrank)
        if (self.controller.d_model, self.controller.d_ff, self.controller.n) != (d_model, d_ff, n):
            raise LayoutError("SparseFFN: controller dimensions (d_model, d_ff, n) = "
                              f"{(self.controller.d_model, self.controller.d_ff, self.controller.n)} do not match "
                              f"the FFN's {(d_model, d_ff, n)}")

    @classmethod
    def from_linears(cls, fc_in: nn.Linear, fc_out: nn.Linear, *, gate: Optional[nn.Linear] = None,
                     **kwargs) -> "SparseFFN":
        """Build from the FFN's nn.Linear layers (up projection, down projection, optional gate)."""
        return cls(fc_in.weight, fc_in.bias, fc_out.weight, fc_out.bias,
                   w_gate=None if gate is None else gate.weight, b_gate=None if gate is None else gate.bias,
                   **kwargs)

    def dense_hidden(self, x: torch.Tensor) -> torch.Tensor:
        """Unmasked hidden activations (..., d_ff) of the dense FFN."""
        up = F.linear(x, self.w_in, self.b_in)
        if self.w_gate is None:
            return activation_fn(up, self.activation)
        return activation_fn(F.linear(x, self.w_gate, self.b_gate), self.activation) * up

    def masked_hidden(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Training's hidden activations (..., d_ff) under the controller's `mask` (see `mask_at`)."""
        if self.mask_at == "post_activation":
            return self.dense_hidden(x) * mask
        up = F.linear(x, self.w_in, self.b_in)
        if self.w_gate is None:
            return activation_fn(up * mask, self.activation)
        return activation_fn(F.linear(x, self.w_gate, self.b_gate) * mask, self.activation) * up

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(..., d_model) -> (..., d_model)."""
        if self.training:
            h = self.masked_hidden(x, self.controller(x))
            out = h @ self.w_out_t
            return out if self.b_out is None else out + self.b_out
        c = self.controller
        return torch.ops.sparsecc.sparse_ffn(x, self.w_in, self.b_in, self.w_out_t, self.b_out, c.c1, c.c2,
                                             c.bias, self.n, self.activation, self.w_gate, self.b_gate)


@dataclass
class ControllerInit:
    """Result of `init_controller_from_activations`: the controller and its arg-max agreement.

    agreement: fraction of (token, block) pairs on the calibration inputs where
    the controller's arg-max is the target unit; agreement_lstsq: the same
    right after the least-squares initialisation, before cross-entropy.
    """

    controller: SparseFFNController
    agreement: float
    agreement_lstsq: float


@torch.no_grad()
def _targets(x: torch.Tensor, w_in: torch.Tensor, b_in: Optional[torch.Tensor], activation: str,
             w_gate: Optional[torch.Tensor], b_gate: Optional[torch.Tensor], n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(score (S, d_ff) to regress on, target unit per block (S, d_ff/n))."""
    up = F.linear(x, w_in, b_in)
    if w_gate is None:
        # relu/gelu/silu rise with the input above 0, so the largest activation of a block is the unit
        # with the largest pre-activation; that is linear in x, so least squares can fit it exactly.
        score = up
    else:
        score = (activation_fn(F.linear(x, w_gate, b_gate), activation) * up).abs()
    return score, score.view(score.shape[0], -1, n).argmax(-1)


def init_controller_from_activations(
    w_in: torch.Tensor, b_in: Optional[torch.Tensor], x: torch.Tensor, n: int = 32, d_lowrank: int = 64, *,
    activation: str = "relu", w_gate: Optional[torch.Tensor] = None, b_gate: Optional[torch.Tensor] = None,
    steps: int = 300, lr: float = 1e-3, batch_size: int = 1024, seed: int = 0,
) -> ControllerInit:
    """Distil a controller that picks, per block of n, the unit with the largest activation.

    Target per token and block: the unit with the largest pre-activation
    x w_in^T + b_in (for relu/gelu/silu that is the largest activation whenever
    the block has a positive one); for a gated FFN the unit with the largest
    |act(x w_gate^T + b_gate) * (x w_in^T + b_in)|.
    Method: (1) least-squares initialisation, i.e. reduced-rank regression of
    that score on x: the ridge solution B = argmin |X B - Y|^2 (X, Y centred),
    truncated to rank d_lowrank along the top right-singular vectors V of X B:
    c1 = B V, c2 = V^T, bias = mean(Y) - mean(X) c1 c2 (for a non-gated FFN,
    Y = x w_in^T + b_in is exactly linear), with c2 and bias scaled by the
    power of 2 that minimises the cross-entropy (same arg-max); then (2)
    `steps` Adam steps of per-block cross-entropy against the target units on
    minibatches of x, keeping the parameters with the best agreement seen
    (checked every 25 steps; the least-squares start included).
    x: calibration inputs (..., d_model), e.g. the FFN inputs of a few hundred
    tokens. Returns the controller (in eval mode) and its agreement.
    """
    x2 = x.detach().reshape(-1, x.shape[-1]).float()
    d_ff, d_model = w_in.shape
    ctrl = SparseFFNController(d_model, d_ff, n, d_lowrank)
    w_in, b_in = w_in.detach().float(), None if b_in is None else b_in.detach().float()
    w_gate = None if w_gate is None else w_gate.detach().float()
    b_gate = None if b_gate is None else b_gate.detach().float()
    score, target = _targets(x2, w_in, b_in, activation, w_gate, b_gate, n)

    with torch.no_grad():
        xd, yd = x2.double(), score.double()
        mx, my = xd.mean(0), yd.mean(0)
        xc, yc = xd - mx, yd - my
        gram = xc.T @ xc
        ridge = 1e-6 * gram.diagonal().mean().clamp(min=1e-12) * torch.eye(d_model, dtype=torch.float64)
        b = torch.linalg.solve(gram + ridge, xc.T @ yc)  # (d_model, d_ff)
        v = torch.linalg.svd(xc @ b, full_matrices=False).Vh[:d_lowrank].T  # (d_ff, r')
        if v.shape[1] < d_lowrank:  # fewer samples than d_lowrank: pad with zero directions
            v = torch.cat([v, v.new_zeros(d_ff, d_lowrank - v.shape[1])], 1)
        c1, c2 = b @ v, v.T
        ctrl.c1.copy_(c1)
        ctrl.c2.copy_(c2)
        ctrl.bias.copy_(my - mx @ c1 @ c2)

    def agreement() -> float:
        with torch.no_grad():
            pred = ctrl.logits(x2).view(x2.shape[0], -1, n).argmax(-1)
            return (pred == target).float().mean().item()

    def cross_entropy(rows: slice | torch.Tensor = slice(None)) -> torch.Tensor:
        return F.cross_entropy(ctrl.logits(x2[rows]).view(-1, n), target[rows].reshape(-1))

    with torch.no_grad():  # scale the least-squares logits to the best CE temperature (argmax unchanged)
        base_c2, base_bias = ctrl.c2.clone(), ctrl.bias.clone()
        losses = {}
        for k in range(-6, 13):
            ctrl.c2.copy_(base_c2 * 2.0**k)
            ctrl.bias.copy_(base_bias * 2.0**k)
            losses[k] = cross_entropy().item()
        best_k = min(losses, key=losses.get)
        ctrl.c2.copy_(base_c2 * 2.0**best_k)
        ctrl.bias.copy_(base_bias * 2.0**best_k)

    agreement_lstsq = best = agreement()
    best_state = {k: v.clone() for k, v in ctrl.state_dict().items()}
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(ctrl.parameters(), lr=lr)
    for step in range(1, steps + 1):
        rows = torch.randint(0, x2.shape[0], (min(batch_size, x2.shape[0]),), generator=gen)
        with torch.enable_grad():  # also when compile() is called under no_grad / inference code
            loss = cross_entropy(rows)
            opt.zero_grad(set_to_none=True)
            loss.backward()
        opt.step()
        if step % 25 == 0 or step == steps:  # keep the best arg-max agreement seen (CE is only a proxy)
            current = agreement()
            if current > best:
                best, best_state = current, {k: v.clone() for k, v in ctrl.state_dict().items()}
    ctrl.load_state_dict(best_state)
    ctrl.eval()
    result = ControllerInit(ctrl, best, agreement_lstsq)
    log.info("controller init: arg-max agreement %.4f after least squares, %.4f after %d CE steps",
             result.agreement_lstsq, result.agreement, steps)
    return result

"""Sparse QKV of Scaling Transformers ("Sparse is Enough", Jaszczur et al. 2021).

An architecture option for models trained or fine-tuned with it (it has far
fewer weights than dense Q/K/V projections, so it is not a drop-in for
pretrained weights). One multiplicative layer is shared by Q, K and V:

    y[s, m] = sum_i x_i D[s, i] E[i, m] + bias[s, m]     D: (S, d_model), E: (d_model, M), M = d_model / S

giving (batch, length, S, M). Then, treating M as channels and (positions x S
modules) as a 2-D image:

    Q = conv_q(y), K = conv_k(y)   kernel 3 (positions, causal) x 3 (modules, zero "same" padding)
    V = conv_v(y)                  kernel 3 (positions, causal) x 1 (module)

(The paper writes these as 3 x 3 and 1 x 3 over (modules x positions).) The
convolutions look at the current and the 2 previous positions only, so decoding
keeps a cache of y at the last 2 positions (zeros before the first token, which
is exactly the causal zero padding of the full-sequence form).

Heads: the (S, M) output is flattened row-major to d_model and split into
(n_heads, head_dim), as trax does (`MergeLastTwoAxes` then `SplitIntoHeads`):
head h covers modules [h * S / H, (h + 1) * S / H) when H divides S (S = H at
the paper's d_model 1024, S = 16, H = 16: one module per head, M = head_dim).
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from sparsecc.errors import LayoutError

__all__ = ["MultiplicativeDense", "QKV_OUTPUTS", "SparseQKV", "multiplicative_dense"]

CONTEXT = 2  # previous positions seen by the sequence convolutions (kernel 3 along positions)

# What follows the attention of a sparse QKV layer (trax `MultiplicativeConvCausalAttention(output_layer_type)`):
# "none" (trax's default, used by its sparse C4 config: the heads go straight to the residual),
# "mult" (a `MultiplicativeDense`), "dense" (a d_model x d_model Linear, like a standard Transformer).
QKV_OUTPUTS = ("none", "mult", "dense")


def multiplicative_dense(x: torch.Tensor, d: torch.Tensor, e: torch.Tensor,
                         bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """y[..., s, m] = sum_i x[..., i] d[s, i] e[i, m] (+ bias[s, m]); x (..., d_model) -> (..., S, M)."""
    y = (x.unsqueeze(-2) * d) @ e  # (..., S, d_model) @ (d_model, M)
    return y if bias is None else y + bias


class MultiplicativeDense(nn.Module):
    """trax's FactoredDense: a Dense-like (..., d_in) -> (..., d_out) layer with about S times fewer weights.

    y[..., s, m] = sum_i x_i D[s, i] E[i, m] + bias[s, m], flattened to d_out = S * M; D (S, d_in) ~ N(0, 0.5).
    """

    def __init__(self, d_in: int, d_out: int, n_modules: int, bias: bool = True) -> None:
        super().__init__()
        if d_out % n_modules:
            raise LayoutError(f"MultiplicativeDense: n_modules={n_modules} must divide d_out={d_out}")
        self.d = nn.Parameter(torch.randn(n_modules, d_in) * 0.5)
        self.e = nn.Parameter(torch.randn(d_in, d_out // n_modules) / math.sqrt(d_in))
        self.bias = nn.Parameter(torch.zeros(n_modules, d_out // n_modules)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return multiplicative_dense(x, self.d, self.e, self.bias).flatten(-2)

    def extra_repr(self) -> str:
        return f"d_in={self.d.shape[1]}, d_out={self.d.shape[0] * self.e.shape[1]}, modules S={self.d.shape[0]}"


class SparseQKV(nn.Module):
    """Shared multiplicative layer + causal sequence convolutions producing Q, K, V heads.

    forward(x, cache) with x (B, T, d_model) and cache None (start of a sequence)
    or (B, 2, S, M) (y at the 2 previous positions) returns q, k, v of shape
    (B, n_heads, T, head_dim) and the new cache (B, 2, S, M): y at the last 2 of
    the positions seen so far.

    The convolutions are written as im2col + one matmul (the same code for a
    whole sequence and for one decoded token; at decode time this is ~4x faster
    than three tiny conv2d calls): patches (B, T, S, 3 * 3 * M) of the window
    (positions t-2..t) x (modules s-1..s+1, zero-padded) times
    w_qk (3, 3, M, 2M) -> Q | K; the centre-module patches (B, T, S, 3 * M)
    times w_v (3, M, M) -> V. w[a, b, i, o] is conv2d's weight[o, i, a, b].
    """

    def __init__(self, d_model: int, n_heads: int, n_modules: int, bias: bool = True) -> None:
        super().__init__()
        if d_model % n_modules or d_model % n_heads:
            raise LayoutError(f"SparseQKV: n_modules={n_modules} and n_heads={n_heads} must divide "
                              f"d_model={d_model}")
        self.d_model, self.n_heads, self.n_modules = d_model, n_heads, n_modules
        self.d_module = m = d_model // n_modules
        k = CONTEXT + 1
        self.d = nn.Parameter(torch.randn(n_modules, d_model) * 0.5)  # D ~ N(0, 0.5) as in the paper
        self.e = nn.Parameter(torch.randn(d_model, m) / math.sqrt(d_model))
        self.bias = nn.Parameter(torch.zeros(n_modules, m)) if bias else None
        self.w_qk = nn.Parameter(torch.randn(k, 3, m, 2 * m) / math.sqrt(k * 3 * m))  # 3 x 3 kernels of Q and K
        self.w_v = nn.Parameter(torch.randn(k, m, m) / math.sqrt(k * m))  # 1-module x 3-position kernel of V
        self.b_qk = nn.Parameter(torch.zeros(2 * m)) if bias else None
        self.b_v = nn.Parameter(torch.zeros(m)) if bias else None

    def empty_cache(self, batch: int, dtype: torch.dtype = torch.float32,
                    device: Optional[torch.device] = None) -> torch.Tensor:
        """Zeros (batch, 2, S, M): the cache before the first token."""
        return torch.zeros(batch, CONTEXT, self.n_modules, self.d_module, dtype=dtype, device=device)

    def modules_output(self, x: torch.Tensor) -> torch.Tensor:
        """The shared multiplicative layer: (B, T, d_model) -> (B, T, S, M)."""
        return multiplicative_dense(x, self.d, self.e, self.bias)

    def _heads(self, z: torch.Tensor) -> torch.Tensor:
        """(B, T, S, M) -> (B, H, T, head_dim): flatten (S, M) row-major, split into heads."""
        b, t = z.shape[:2]
        return z.reshape(b, t, self.n_heads, -1).transpose(1, 2)

    def convolve(self, window: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Q, K, V (B, T, S, M) from window (B, 2 + T, S, M) (the 2 positions before the first output first)."""
        t, s, m = window.shape[1] - CONTEXT, self.n_modules, self.d_module
        padded = F.pad(window, (0, 0, 1, 1))  # zero module on each side: (B, 2 + T, S + 2, M)
        qk = torch.cat([padded[:, a:a + t, b:b + s] for a in range(CONTEXT + 1) for b in range(3)], dim=-1)
        qk = qk @ self.w_qk.view(-1, 2 * m)
        v = torch.cat([window[:, a:a + t] for a in range(CONTEXT + 1)], dim=-1) @ self.w_v.view(-1, m)
        if self.b_qk is not None:
            qk, v = qk + self.b_qk, v + self.b_v
        return qk[..., :m], qk[..., m:], v

    def forward(self, x: torch.Tensor, cache: Optional[torch.Tensor] = None
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        y = self.modules_output(x)  # (B, T, S, M)
        if cache is None:
            cache = self.empty_cache(x.shape[0], y.dtype, y.device)
        window = torch.cat([cache, y], dim=1)  # (B, 2 + T, S, M)
        q, k, v = self.convolve(window)
        return self._heads(q), self._heads(k), self._heads(v), window[:, -CONTEXT:]

    def extra_repr(self) -> str:
        return f"d_model={self.d_model}, n_heads={self.n_heads}, modules S={self.n_modules}, M={self.d_module}"

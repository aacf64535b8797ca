"""Sparse feed-forward op of Scaling Transformers ("Sparse is Enough", Jaszczur et al. 2021).

A low-rank controller scores the d_ff hidden units of an FFN, groups them in
blocks of N consecutive units and keeps the arg-max unit of each block, so a
token uses only d_ff / N units:

    logits = (x @ c1) @ c2 + c_bias                    c1: (d_model, r), c2: (r, d_ff)
    idx[b] = b * N + argmax(logits[b*N : (b+1)*N])     one unit per block b
    a      = x . w_in[idx] + b_in[idx]                 (d_ff / N) pre-activations
    h      = act(a)           or, gated (SwiGLU/GeGLU):  act(x . w_gate[idx] + b_gate[idx]) * a
    out    = sum_j h_j * w_out_t[idx_j] + b_out

This equals the dense FFN with the controller's one-hot mask applied to the
hidden activations (`sparse_ffn_reference`), but reads only the chosen rows.

Weight layout. w_in / w_gate use the nn.Linear layout (d_ff, d_model): a unit's
input weights are one contiguous row. The output weights are taken
PRE-TRANSPOSED, ``w_out_t = w_out.T.contiguous()`` of shape (d_ff, d_model), so a
unit's output weights are also one contiguous row; `pack_sparse_ffn_weights`
does this once. With that layout the decode path (few tokens) is:
controller (2 small GEMMs) -> argmax -> index_select of the chosen w_in rows
(memcpy of contiguous rows) -> one mv/bmm -> activation -> `embedding_bag` with
`per_sample_weights=h` over w_out_t, which sums the chosen rows without
materialising them. For many tokens (more than N/2) the up projection is one
dense GEMM followed by a gather (cheaper than T copies of the rows); the output
side stays the sparse embedding_bag.

Autograd: gradients flow to x and to every FFN weight/bias (the chosen units
only; the others get zero). The controller (c1, c2, c_bias) gets NO gradient
through the op: the arg-max selection is piecewise constant. Train the
controller with the straight-through / soft mask of
`sparsecc.nn.sparse_ffn.SparseFFNController` (dense masked product).
The backward recomputes the (cheap) controller selection instead of saving it.

The implementation below is the default kernel for every device (plain
PyTorch); the Triton backend registers a CUDA kernel (`triton.py`) with
`torch.library.register_kernel("sparsecc::sparse_ffn", "cuda", fn)`. On CPU,
fp32, few tokens (decoding), the forward runs the C++ kernel instead (`cpu.cpp`,
op `sparsecc_cpu::sparse_ffn_decode`, see `cpu.py`: the controller, the per-block
arg-max, then per chosen unit one dot, the activation and one axpy, prefetching
the next units' rows, split over torch's intra-op threads), which avoids the row
copy and the op-per-step dispatch; without a C++ compiler, or with
SPARSECC_NATIVE=0, the PyTorch path below runs. Its controller sums in another
order than the BLAS GEMMs of `controller_logits`, so on a near-tie (logits equal
to float rounding) the two may pick different units, as two BLAS builds may.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from sparsecc.errors import LayoutError
from sparsecc.ops import activations
from sparsecc.ops.sparse_ffn import cpu

__all__ = [
    "ACTIVATIONS",
    "SparseFFNWeights",
    "activation_fn",
    "controller_logits",
    "controller_select",
    "pack_sparse_ffn_weights",
    "sparse_ffn",
    "sparse_ffn_reference",
]

ACTIVATIONS = tuple(activations.ACTIVATIONS)

# Use per-token row gathers for the up projection while tokens * (d_ff / N) <= d_ff / 2,
# i.e. tokens <= N / 2; above that one dense GEMM + gather is faster (measured on CPU, fp32).
_GATHER_FRACTION = 2


def activation_fn(a: torch.Tensor, activation: str) -> torch.Tensor:
    """Apply one of ACTIVATIONS (sparsecc.ops.activations)."""
    return activations.get(activation, "sparse_ffn").fn(a)


def activation_backward(grad: torch.Tensor, a: torch.Tensor, activation: str) -> torch.Tensor:
    """d act(a) / d a * grad, matching autograd of `activation_fn` exactly."""
    return activations.get(activation, "sparse_ffn").grad(grad, a)


def controller_logits(
    x: torch.Tensor, c1: torch.Tensor, c2: torch.Tensor, c_bias: Optional[torch.Tensor]
) -> torch.Tensor:
    """Controller scores (..., d_ff) = (x @ c1) @ c2 + c_bias.

    Computed on x flattened to 2-D so that the op, the reference and the
    nn.Module controller round identically (and pick the same arg-max).
    """
    x2 = x.reshape(-1, x.shape[-1])
    z = torch.mm(x2, c1)
    logits = torch.mm(z, c2) if c_bias is None else torch.addmm(c_bias, z, c2)
    return logits.reshape(*x.shape[:-1], c2.shape[1])


def _block_offsets(d_ff: int, n: int, device: torch.device) -> torch.Tensor:
    return torch.arange(0, d_ff, n, device=device)


def controller_select(
    x: torch.Tensor, c1: torch.Tensor, c2: torch.Tensor, c_bias: Optional[torch.Tensor], n: int
) -> torch.Tensor:
    """Global indices (..., d_ff / n) int64 of the active unit of each block of n (arg-max, first on ties)."""
    logits = controller_logits(x, c1, c2, c_bias)
    d_ff = logits.shape[-1]
    local = logits.reshape(*logits.shape[:-1], d_ff // n, n).argmax(-1)
    return local + _block_offsets(d_ff, n, local.device)


def _gather_dot(
    x2: torch.Tensor, w: torch.Tensor, b: Optional[torch.Tensor], idx: torch.Tensor
) -> torch.Tensor:
    """out[t, j] = x2[t] . w[idx[t, j]] + b[idx[t, j]] for x2 (T, d), w (d_ff, d), idx (T, k)."""
    tokens, k = idx.shape
    if tokens * k * _GATHER_FRACTION <= w.shape[0]:
        rows = w.index_select(0, idx.reshape(-1))  # contiguous row copies: memcpy speed
        if tokens == 1:
            bias = b.index_select(0, idx[0]) if b is not None else None
            out = torch.mv(rows, x2[0]) if bias is None else torch.addmv(bias, rows, x2[0])
            return out.unsqueeze(0)
        out = torch.bmm(rows.view(tokens, k, -1), x2.unsqueeze(-1)).squeeze(-1)
        if b is not None:
            out = out + b.index_select(0, idx.reshape(-1)).view(tokens, k)
        return out
    return F.linear(x2, w, b).gather(1, idx)


def check_inputs(
    x: torch.Tensor,
    w_in: torch.Tensor,
    b_in: Optional[torch.Tensor],
    w_out_t: torch.Tensor,
    b_out: Optional[torch.Tensor],
    c1: torch.Tensor,
    c2: torch.Tensor,
    c_bias: Optional[torch.Tensor],
    n: int,
    activation: str,
    w_gate: Optional[torch.Tensor],
    b_gate: Optional[torch.Tensor],
) -> None:
    activations.get(activation, "sparse_ffn")  # UnsupportedError naming the known ones
    if w_in.dim() != 2 or w_out_t.dim() != 2:
        raise LayoutError(
            f"sparse_ffn: w_in and w_out_t must be 2-D, got {tuple(w_in.shape)} and {tuple(w_out_t.shape)}"
        )
    d_ff, d_model = w_in.shape
    expected = {
        "x": (x.shape[-1] if x.dim() else None, d_model),
        "w_out_t": (tuple(w_out_t.shape), (d_ff, d_model)),
        "c1 rows": (c1.shape[0] if c1.dim() == 2 else None, d_model),
        "c2": (tuple(c2.shape), (c1.shape[-1], d_ff)),
    }
    for name, t, size in (("b_in", b_in, d_ff), ("b_out", b_out, d_model), ("c_bias", c_bias, d_ff),
                          ("b_gate", b_gate, d_ff)):
        if t is not None:
            expected[name] = (tuple(t.shape), (size,))
    if w_gate is not None:
        expected["w_gate"] = (tuple(w_gate.shape), (d_ff, d_model))
    for name, (got, want) in expected.items():
        if got != want:
            raise LayoutError(
                f"sparse_ffn: {name} has shape {got}, expected {want} for w_in of shape (d_ff={d_ff}, "
                f"d_model={d_model}); note w_out_t is w_out.T (d_ff, d_model), see pack_sparse_ffn_weights"
            )
    if b_gate is not None and w_gate is None:
        raise LayoutError("sparse_ffn: b_gate given without w_gate; pass both or neither")
    if n < 1 or d_ff % n:
        raise LayoutError(f"sparse_ffn: block size n={n} must be >= 1 and divide d_ff={d_ff}; pick a divisor")


def pytorch_kernel(
    x: torch.Tensor,
    w_in: torch.Tensor,
    b_in: Optional[torch.Tensor],
    w_out_t: torch.Tensor,
    b_out: Optional[torch.Tensor],
    c1: torch.Tensor,
    c2: torch.Tensor,
    c_bias: Optional[torch.Tensor],
    n: int,
    activation: str,
    w_gate: Optional[torch.Tensor] = None,
    b_gate: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """The op's default kernel (plain PyTorch, any device; the C++ decode kernel on CPU where it applies).
    Kernels of other backends fall back to it for what they do not handle."""
    check_inputs(x, w_in, b_in, w_out_t, b_out, c1, c2, c_bias, n, activation, w_gate, b_gate)
    x2 = x.reshape(-1, x.shape[-1])
    if x2.shape[0] == 0:
        return x.new_zeros(x.shape)
    if x2.shape[0] * (w_in.shape[0] // n) * _GATHER_FRACTION <= w_in.shape[0]:  # few tokens: C++ kernel?
        out = cpu.decode_native(x2, w_in, b_in, w_out_t, b_out, c1, c2, c_bias, n, activation, w_gate, b_gate)
        if out is not None:
            return out.view(x.shape)
    idx = controller_select(x2, c1, c2, c_bias, n)  # (T, d_ff / n)
    a = _gather_dot(x2, w_in, b_in, idx)
    if w_gate is None:
        h = activation_fn(a, activation)
    else:
        h = activation_fn(_gather_dot(x2, w_gate, b_gate, idx), activation).mul_(a)
    out = F.embedding_bag(idx, w_out_t, per_sample_weights=h, mode="sum")
    if b_out is not None:
        out += b_out
    return out.view(x.shape)


@torch.library.custom_op("sparsecc::sparse_ffn", mutates_args=())
def sparse_ffn(
    x: torch.Tensor,
    w_in: torch.Tensor,
    b_in: Optional[torch.Tensor],
    w_out_t: torch.Tensor,
    b_out: Optional[torch.Tensor],
    c1: torch.Tensor,
    c2: torch.Tensor,
    c_bias: Optional[torch.Tensor],
    n: int,
    activation: str,
    w_gate: Optional[torch.Tensor] = None,
    b_gate: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Controller-gated FFN keeping one unit per block of n; see the module docstring.

    x (..., d_model); w_in, w_gate (d_ff, d_model) nn.Linear layout; w_out_t (d_ff, d_model)
    = nn.Linear w_out.T; c1 (d_model, r); c2 (r, d_ff); biases 1-D. Returns (..., d_model).
    """
    return pytorch_kernel(x, w_in, b_in, w_out_t, b_out, c1, c2, c_bias, n, activation, w_gate, b_gate)


@sparse_ffn.register_fake
def _sparse_ffn_fake(x, w_in, b_in, w_out_t, b_out, c1, c2, c_bias, n, activation, w_gate=None, b_gate=None):
    check_inputs(x, w_in, b_in, w_out_t, b_out, c1, c2, c_bias, n, activation, w_gate, b_gate)
    return torch.empty_like(x)


def setup_context(ctx, inputs, output) -> None:
    x, w_in, b_in, w_out_t, b_out, c1, c2, c_bias, n, activation, w_gate, b_gate = inputs
    ctx.save_for_backward(x, w_in, b_in, w_out_t, c1, c2, c_bias, w_gate, b_gate)
    ctx.n, ctx.activation = n, activation


def pytorch_backward(ctx, grad_out: torch.Tensor):
    x, w_in, b_in, w_out_t, c1, c2, c_bias, w_gate, b_gate = ctx.saved_tensors
    n, activation = ctx.n, ctx.activation
    # trailing default arguments left out of a call (e.g. b_gate=None) have no entry: pad to the schema
    need = tuple(ctx.needs_input_grad) + (False,) * (12 - len(ctx.needs_input_grad))
    d_ff, d_model = w_in.shape
    x2 = x.reshape(-1, d_model)
    go = grad_out.reshape(-1, d_model)
    # Recompute the selection and the chosen pre-activations (cheap next to the weight gradients).
    idx = controller_select(x2, c1, c2, c_bias, n)
    a = _gather_dot(x2, w_in, b_in, idx)
    gh = _gather_dot(go, w_out_t, None, idx)  # d out / d h_j = go . w_out_t[idx_j]
    if w_gate is None:
        h = activation_fn(a, activation)
        ga = activation_backward(gh, a, activation)
        gg = None
    else:
        ag = _gather_dot(x2, w_gate, b_gate, idx)
        act_g = activation_fn(ag, activation)
        h = act_g * a
        ga = gh * act_g
        gg = activation_backward(gh * a, ag, activation)

    def scatter(v: torch.Tensor) -> torch.Tensor:  # (T, d_ff/n) at idx -> dense (T, d_ff)
        return torch.zeros(v.shape[0], d_ff, dtype=v.dtype, device=v.device).scatter_(1, idx, v)

    grad_x = grad_w_in = grad_b_in = grad_w_out_t = grad_b_out = grad_w_gate = grad_b_gate = None
    if need[0]:
        grad_x = F.embedding_bag(idx, w_in, per_sample_weights=ga, mode="sum")
        if gg is not None:
            grad_x = grad_x + F.embedding_bag(idx, w_gate, per_sample_weights=gg, mode="sum")
        grad_x = grad_x.view(x.shape)
    if need[1] or need[2]:
        ga_dense = scatter(ga)
        grad_w_in = ga_dense.t() @ x2 if need[1] else None
        grad_b_in = ga_dense.sum(0) if need[2] else None
    if need[3]:
        grad_w_out_t = scatter(h).t() @ go
    if need[4]:
        grad_b_out = go.sum(0)
    if gg is not None and (need[10] or need[11]):
        gg_dense = scatter(gg)
        grad_w_gate = gg_dense.t() @ x2 if need[10] else None
        grad_b_gate = gg_dense.sum(0) if need[11] else None
    # c1, c2, c_bias: no gradient through the arg-max selection.
    return (grad_x, grad_w_in, grad_b_in, grad_w_out_t, grad_b_out, None, None, None, None, None,
            grad_w_gate, grad_b_gate)


sparse_ffn.register_autograd(pytorch_backward, setup_context=setup_context)


def sparse_ffn_reference(
    x: torch.Tensor,
    w_in: torch.Tensor,
    b_in: Optional[torch.Tensor],
    w_out: torch.Tensor,
    b_out: Optional[torch.Tensor],
    c1: torch.Tensor,
    c2: torch.Tensor,
    c_bias: Optional[torch.Tensor],
    n: int,
    activation: str,
    w_gate: Optional[torch.Tensor] = None,
    b_gate: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Dense FFN with the controller's one-hot mask on the hidden units (w_out in nn.Linear layout).

    Reads every weight; the definition `sparse_ffn` must match, and a lowering
    into standard ops (e.g. ONNX) may use it.
    """
    idx = controller_select(x, c1, c2, c_bias, n)
    mask = torch.zeros(*x.shape[:-1], w_in.shape[0], dtype=x.dtype, device=x.device)
    mask.scatter_(-1, idx, 1.0)
    up = F.linear(x, w_in, b_in)
    h = activation_fn(up, activation) if w_gate is None else activation_fn(F.linear(x, w_gate, b_gate), activation) * up
    return F.linear(h * mask, w_out, b_out)


@dataclass(frozen=True)
class SparseFFNWeights:
    """Weights packed once for `sparse_ffn`: w_out_t = w_out.T contiguous, everything else contiguous."""

    w_in: torch.Tensor
    b_in: Optional[torch.Tensor]
    w_out_t: torch.Tensor
    b_out: Optional[torch.Tensor]
    c1: torch.Tensor
    c2: torch.Tensor
    c_bias: Optional[torch.Tensor]
    n: int
    activation: str
    w_gate: Optional[torch.Tensor] = None
    b_gate: Optional[torch.Tensor] = None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """Run `torch.ops.sparsecc.sparse_ffn` on x (..., d_model)."""
        return torch.ops.sparsecc.sparse_ffn(
            x, self.w_in, self.b_in, self.w_out_t, self.b_out, self.c1, self.c2, self.c_bias,
            self.n, self.activation, self.w_gate, self.b_gate,
        )


def pack_sparse_ffn_weights(
    w_in: torch.Tensor,
    b_in: Optional[torch.Tensor],
    w_out: torch.Tensor,
    b_out: Optional[torch.Tensor],
    c1: torch.Tensor,
    c2: torch.Tensor,
    c_bias: Optional[torch.Tensor],
    n: int,
    activation: str = "relu",
    w_gate: Optional[torch.Tensor] = None,
    b_gate: Optional[torch.Tensor] = None,
) -> SparseFFNWeights:
    """Pack nn.Linear-layout FFN weights (w_in (d_ff, d_model), w_out (d_model, d_ff)) for `sparse_ffn`.

    Transposes w_out once into w_out_t (d_ff, d_model) so each unit's output
    weights are a contiguous row, and makes every tensor contiguous. The result
    is detached copies or views; the caller's tensors are never modified.
    """

    def prep(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        return None if t is None else t.detach().contiguous()

    packed = SparseFFNWeights(
        prep(w_in), prep(b_in), w_out.detach().t().contiguous(), prep(b_out), prep(c1), prep(c2),
        prep(c_bias), int(n), activation, prep(w_gate), prep(b_gate),
    )
    check_inputs(torch.empty(0, w_in.shape[-1]), packed.w_in, packed.b_in, packed.w_out_t, packed.b_out,
           packed.c1, packed.c2, packed.c_bias, packed.n, activation, packed.w_gate, packed.b_gate)
    return packed

"""The CPU decode kernel of `sparsecc::sparse_ffn`: the C++ op `sparsecc_cpu::sparse_ffn_decode` (cpu.cpp).

The op's implementation calls `decode_native` for few tokens; it returns None (and the op runs
its PyTorch path) when the kernel does not apply - not fp32 CPU tensors, a controller wider than
MAX_LOWRANK, an activation the kernel lacks - or cannot be built here (`sparsecc.ops.native`).
"""

from __future__ import annotations

from functools import lru_cache
from typing import Optional

import torch
from torch import Tensor

from sparsecc.ops import native

__all__ = ["MAX_LOWRANK", "decode_native", "kernel_activations", "native_kernel"]

MAX_LOWRANK = 256  # MAX_LOWRANK in cpu.cpp


def native_kernel() -> bool:
    """The C++ kernel is enabled (SPARSECC_NATIVE), built and loaded."""
    return native.load("sparse_ffn") and _register_fakes()


@lru_cache(maxsize=None)
def _register_fakes() -> bool:
    """The fake kernel of the C++ op (shapes only), so it traces like any op (torchao's ops.py pattern)."""

    @torch.library.register_fake("sparsecc_cpu::sparse_ffn_decode")
    def _(x, c1, c2, c_bias, w_in, b_in, w_gate, b_gate, w_out_t, b_out, n, activation):
        return x.new_empty((x.shape[0], w_in.shape[1]))

    return True


@lru_cache(maxsize=None)
def kernel_activations() -> frozenset[str]:
    """The activations the loaded C++ kernel implements (read from the kernel itself)."""
    return frozenset(torch.ops.sparsecc_cpu.sparse_ffn_activations())


def decode_native(x2: Tensor, w_in: Tensor, b_in: Optional[Tensor], w_out_t: Tensor, b_out: Optional[Tensor],
                  c1: Tensor, c2: Tensor, c_bias: Optional[Tensor], n: int, activation: str,
                  w_gate: Optional[Tensor], b_gate: Optional[Tensor]) -> Optional[Tensor]:
    """The whole op (controller included) on x2 (tokens, d_model) through the C++ kernel, or None."""
    given = (x2, w_in, b_in, w_out_t, b_out, c1, c2, c_bias, w_gate, b_gate)
    if (c1.shape[1] > MAX_LOWRANK
            or any(t is not None and (t.device.type != "cpu" or t.dtype != torch.float32) for t in given)
            or not native_kernel() or activation not in kernel_activations()):
        return None
    return torch.ops.sparsecc_cpu.sparse_ffn_decode(x2, c1, c2, c_bias, w_in, b_in, w_gate, b_gate, w_out_t, b_out,
                                                    n, activation)

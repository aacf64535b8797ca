"""Triton backend: the CUDA kernels of the sparsecc ops.

Importing this package does not import triton; `register()` does (it imports the kernel modules
and registers their launchers as the "cuda" kernels of the sparsecc custom ops), and
`sparsecc.compile(..., backend="triton")` calls it. The launchers are also plain functions:

    attention.block_sparse_attention_forward / block_sparse_attention_backward
    ffn.sparse_ffn_forward / sparse_ffn_backward (also the opaque op sparsecc::triton_sparse_ffn_backward)
    flow.flow_route / flow_gather / flow_scatter (the flow ops' backward formulas call the ops themselves)

They run on CUDA tensors, or on CPU tensors under the Triton interpreter (TRITON_INTERPRET=1 set
before triton is first imported), which is how the test suite checks them without a GPU.
"""

from __future__ import annotations

import importlib.util
import threading

import torch

from sparsecc.errors import UnsupportedError

__all__ = ["available", "register", "require"]

_lock = threading.Lock()
_registered: list[str] = []


def available() -> bool:
    """True when triton is installed and a CUDA device is visible."""
    return importlib.util.find_spec("triton") is not None and torch.cuda.is_available()


def require() -> None:
    """Raise UnsupportedError unless the Triton backend can run here (says what is missing and what to do)."""
    has_triton = importlib.util.find_spec("triton") is not None
    has_cuda = torch.cuda.is_available()
    if has_triton and has_cuda:
        return
    found = []
    if not has_triton:
        found.append("the `triton` package is not installed")
    if not has_cuda:
        build = f"torch {torch.__version__}" + (" (a CPU-only build)" if torch.version.cuda is None else "")
        found.append(f"no CUDA device is visible to {build}")
    raise UnsupportedError(
        "backend='triton' runs the sparse ops as Triton kernels on an NVIDIA GPU, but "
        + " and ".join(found) + ". Use backend='eager' or 'inductor' (CPU kernels of the same ops) or "
        "'onnxruntime' here; for the GPU backend install a CUDA build of PyTorch and `pip install "
        "'sparsecc[triton]'` on a machine with a GPU. (The kernels can be checked on CPU tensors in the "
        "Triton interpreter: see tests/triton_interp.py.)")


def register() -> list[str]:
    """Register the Triton launchers as the CUDA kernels of the sparsecc ops; returns the op names.

    Idempotent. Needs triton installed (not a GPU: registering only imports the kernels).
    """
    with _lock:
        if _registered:
            return list(_registered)
        from sparsecc.backends.triton import attention, ffn, flow
        import sparsecc.ops.block_sparse_attention  # noqa: F401  (define the ops)
        import sparsecc.ops.token_flow  # noqa: F401
        from sparsecc.ops import sparse_ffn as sparse_ffn_op

        kernels = {
            "sparsecc::block_sparse_attention": attention.block_sparse_attention_forward,
            "sparsecc::block_sparse_attention_backward": attention.block_sparse_attention_backward,
            "sparsecc::sparse_ffn": _sparse_ffn_cuda,
            # the flow ops' backward formulas call the ops themselves, so they run these kernels too
            "sparsecc::flow_route": flow.flow_route,
            "sparsecc::flow_gather": flow.flow_gather,
            "sparsecc::flow_scatter": flow.flow_scatter,
        }
        for name, fn in kernels.items():
            torch.library.register_kernel(name, "cuda", fn)
        # sparse_ffn's backward is a Python autograd formula (no backward op to give a CUDA kernel):
        # CUDA gradients go to the Triton backward, every other device keeps the op's own formula.
        cpu_backward = sparse_ffn_op._backward

        def backward(ctx, grad_out):
            if grad_out.device.type == "cuda":
                return ffn.autograd_backward(ctx, grad_out)
            return cpu_backward(ctx, grad_out)

        sparse_ffn_op.sparse_ffn.register_autograd(backward, setup_context=sparse_ffn_op._setup_context)
        _registered.extend(kernels)
        return list(_registered)


def _sparse_ffn_cuda(x, w_in, b_in, w_out_t, b_out, c1, c2, c_bias, n, activation, w_gate=None, b_gate=None):
    from sparsecc.backends.triton.ffn import sparse_ffn_forward
    return sparse_ffn_forward(x, w_in, b_in, w_out_t, b_out, c1, c2, c_bias, n, activation, w_gate, b_gate)

"""sparsecc custom ops (torch.library, namespace `sparsecc`), one package per op family.

Importing this package imports every family, which registers every op: a graph or .pt2 file that
calls `torch.ops.sparsecc.*` runs (and loads) after `import sparsecc`.

    attention               sparsecc::attention (dense SDPA)
    ffn                     sparsecc::ffn (dense FFN, plain or gated)
    block_sparse_attention  sparsecc::block_sparse_attention (+ _backward)
    sparse_ffn              sparsecc::sparse_ffn (one-of-N controller FFN)
    token_flow              sparsecc::flow_route / flow_gather / flow_scatter

A family holds op.py (schema, reference, fake, autograd), its CPU kernel (cpu.py, + cpu.cpp
built by `native` where a C++ kernel exists), triton.py (CUDA kernels, imported by the Triton
backend) and onnx.py (translations, imported by the ONNX exporter). Shared helpers: activations
(the FFN activation table), native (the C++ extension loader), triton_runtime, onnx_lowering.
"""

from sparsecc.ops import activations  # noqa: F401
from sparsecc.ops import attention, block_sparse_attention, ffn, sparse_ffn, token_flow

# the families, in the order backends gather their kernels and translations
FAMILIES = ("attention", "ffn", "block_sparse_attention", "sparse_ffn", "token_flow")

__all__ = ["FAMILIES", "activations", "attention", "block_sparse_attention", "ffn", "sparse_ffn", "token_flow"]

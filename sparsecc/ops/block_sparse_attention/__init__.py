"""Op family `sparsecc::block_sparse_attention` (+ `_backward`): attention restricted to a block layout.

    op.py      schema, checks, fake, autograd, the dense reference
    layout.py  the ELL clean-up every kernel starts from
    cpu.py     the CPU kernel: the C++ kernel (cpu.cpp) for fp32, a chunked PyTorch path otherwise
    cpu.cpp    the C++ kernels (ops sparsecc_cpu::block_sparse_attention_forward / _backward)
    triton.py  the CUDA kernels (imported by the Triton backend only: it imports triton)
    onnx.py    the translation into standard ONNX ops (imported by the exporter only)
"""

from sparsecc.ops.block_sparse_attention.layout import clean_layout
from sparsecc.ops.block_sparse_attention.op import (block_sparse_attention, block_sparse_attention_backward_op,
                                                    block_sparse_attention_op, reference)

__all__ = ["block_sparse_attention", "block_sparse_attention_backward_op", "block_sparse_attention_op",
           "clean_layout", "reference"]

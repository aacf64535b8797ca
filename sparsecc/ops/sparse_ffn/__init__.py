"""Op family `sparsecc::sparse_ffn`: the one-of-N controller FFN of Scaling Transformers.

    op.py      schema, fake, autograd, the default (PyTorch, any device) kernel, the masked-dense
               reference, the controller and weight packing
    cpu.py     the CPU decode kernel: the C++ op of cpu.cpp when it applies
    cpu.cpp    the C++ kernel (op sparsecc_cpu::sparse_ffn_decode)
    triton.py  the CUDA kernels (imported by the Triton backend only: it imports triton)
    onnx.py    the translation into standard ONNX ops (imported by the exporter only)
"""

from sparsecc.ops.sparse_ffn.op import (ACTIVATIONS, SparseFFNWeights, activation_fn, controller_logits,
                                        controller_select, pack_sparse_ffn_weights, sparse_ffn, sparse_ffn_reference)

__all__ = ["ACTIVATIONS", "SparseFFNWeights", "activation_fn", "controller_logits", "controller_select",
           "pack_sparse_ffn_weights", "sparse_ffn", "sparse_ffn_reference"]

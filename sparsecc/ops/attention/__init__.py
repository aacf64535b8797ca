"""Op family `sparsecc::attention`: dense scaled-dot-product attention as an opaque op.

    op.py    schema, fake, autograd (the float mask gets a gradient), the matmul/softmax reference
    onnx.py  the translation into standard ONNX ops (imported by the exporter only)
"""

from sparsecc.ops.attention.op import attention, attention_reference

__all__ = ["attention", "attention_reference"]

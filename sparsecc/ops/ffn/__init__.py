"""Op family `sparsecc::ffn`: a dense feed-forward block (plain or gated) as one opaque op.

    op.py    schema, fake, autograd, the reference
    onnx.py  the translation into standard ONNX ops (imported by the exporter only)
"""

from sparsecc.ops.ffn.op import check_activation, ffn, ffn_reference

__all__ = ["check_activation", "ffn", "ffn_reference"]

"""Op family token flow (SparseFlow): `sparsecc::flow_route`, `flow_gather`, `flow_scatter`.

    op.py       schemas, fakes, autograd, the PyTorch kernels (any device) and the per-example references
    helpers.py  plain-PyTorch functions flowed graphs call around the ops (masks, packed layout, ...)
    triton.py   the CUDA kernels (imported by the Triton backend only: it imports triton)
    onnx.py     the translations into standard ONNX ops (imported by the exporter only)
"""

from sparsecc.ops.token_flow.op import (flow_gather, flow_route, flow_scatter, gather_reference, route_reference,
                                        scatter_reference)

__all__ = ["flow_gather", "flow_route", "flow_scatter", "gather_reference", "route_reference", "scatter_reference"]

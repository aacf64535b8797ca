"""ONNX translations of the token-flow ops (standard ONNX ops: TopK, GatherND, ScatterND)."""

from __future__ import annotations

from onnxscript import opset18 as op

from sparsecc.ops.onnx_lowering import ExportContext, dim, ints

OPS = ("sparsecc::flow_route", "sparsecc::flow_gather", "sparsecc::flow_scatter")


def flow_route(keep):
    """counts = ReduceSum(keep); K = max(1, ReduceMax(counts)); the kept positions first and ascending by
    TopK(smallest K) of a key unique per position (kept: p, skipped: L + p); padding slots -> 0."""
    keep_i = op.Cast(keep, to=7)  # INT64
    counts = op.ReduceSum(keep_i, ints(1), keepdims=0)  # [B]
    kept_max = op.Max(op.ReduceMax(counts, keepdims=1), ints(1))  # [1]
    length = dim(keep, 1)
    positions = op.Range(op.Constant(value_int=0), op.Squeeze(length, [0]), op.Constant(value_int=1))
    key = op.Add(op.Mul(op.Sub(ints(1), keep_i), length), op.Unsqueeze(positions, [0]))
    _, order = op.TopK(key, kept_max, axis=1, largest=0, sorted=1)
    index = op.Where(valid_slots(order, counts), order, ints(0))
    return index, counts


def valid_slots(index, counts):
    """[B, K] bool: slot k < counts[b]."""
    slots = op.Range(op.Constant(value_int=0), op.Squeeze(dim(index, 1), [0]), op.Constant(value_int=1))
    return op.Less(op.Unsqueeze(slots, [0]), op.Unsqueeze(counts, [1]))


def flow_gather(x, index, counts):
    """GatherND(x, index[..., None], batch_dims=1) [B, K, D], padding slots zeroed."""
    rows = op.GatherND(x, op.Unsqueeze(index, [2]), batch_dims=1)
    zero = op.CastLike(op.Constant(value_float=0.0), x)
    return op.Where(op.Unsqueeze(valid_slots(index, counts), [2]), rows, zero)


def flow_scatter(x, rows, index, counts, accumulate: bool = False):
    """ScatterND into x extended by K spare rows: valid slot k writes row index[b, k], padding slot k writes
    spare row L + k (so no two writes meet); the spare rows are sliced off. accumulate adds x's rows first."""
    length, slots = dim(x, 1), dim(index, 1)
    valid = valid_slots(index, counts)
    spare = op.Add(op.Range(op.Constant(value_int=0), op.Squeeze(slots, [0]), op.Constant(value_int=1)),
                   op.Squeeze(length, [0]))
    target = op.Where(valid, index, op.Unsqueeze(spare, [0]))  # [B, K]
    zeros = op.Expand(op.CastLike(op.Constant(value_float=0.0), x), op.Concat(dim(x, 0), slots, dim(x, 2), axis=0))
    extended = op.Concat(x, zeros, axis=1)
    updates = op.CastLike(rows, x)
    if accumulate:
        updates = op.Add(updates, op.GatherND(extended, op.Unsqueeze(target, [2]), batch_dims=1))
    batch = op.Range(op.Constant(value_int=0), op.Squeeze(dim(x, 0), [0]), op.Constant(value_int=1))
    batch = op.Expand(op.Unsqueeze(batch, [1]), op.Shape(target))
    where = op.Concat(op.Unsqueeze(batch, [2]), op.Unsqueeze(target, [2]), axis=2)  # [B, K, 2]
    out = op.ScatterND(extended, where, updates)
    return op.Slice(out, ints(0), length, ints(1))


def translations(ctx: ExportContext) -> dict:
    return {"sparsecc::flow_route": flow_route, "sparsecc::flow_gather": flow_gather,
            "sparsecc::flow_scatter": flow_scatter}

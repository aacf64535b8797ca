"""Token-flow ops: route / gather / scatter against hand-computed cases, references, gradients, opcheck."""

import pytest
import torch

from sparsecc.ops.token_flow import op as tf
from sparsecc.ops.token_flow.helpers import (capacity, capacity_route, gather_packed, pack_slots, packed_route,
                                             scatter_packed)

route = torch.ops.sparsecc.flow_route.default
gather = torch.ops.sparsecc.flow_gather.default
scatter = torch.ops.sparsecc.flow_scatter.default


def _keep():
    # example 0 keeps 3 of 6, example 1 keeps 1, example 2 keeps none
    return torch.tensor([[1, 0, 1, 1, 0, 0], [0, 0, 0, 0, 1, 0], [0, 0, 0, 0, 0, 0]], dtype=torch.bool)


def test_route_hand_computed():
    index, counts = route(_keep())
    assert counts.tolist() == [3, 1, 0]
    assert index.tolist() == [[0, 2, 3], [4, 0, 0], [0, 0, 0]]  # ascending, padding slots hold 0
    index, counts = route(torch.zeros(2, 4, dtype=torch.bool))
    assert index.shape == (2, 1) and counts.tolist() == [0, 0]  # K >= 1 always


def test_route_matches_reference_random():
    g = torch.Generator().manual_seed(1)
    keep = torch.rand(5, 37, generator=g) < 0.4
    for a, b in zip(route(keep), tf.route_reference(keep)):
        assert torch.equal(a, b)


def test_capacity_route_has_static_slots_and_the_route_contract():
    index, counts = capacity_route(_keep(), 0.5)  # capacity(6, 0.5) = 3 slots, whatever is kept
    assert index.tolist() == [[0, 2, 3], [4, 0, 0], [0, 0, 0]] and counts.tolist() == [3, 1, 0]
    index, counts = capacity_route(_keep(), 0.9)  # 6 slots: the same route, padded further
    assert index.tolist() == [[0, 2, 3, 0, 0, 0], [4, 0, 0, 0, 0, 0], [0] * 6] and counts.tolist() == [3, 1, 0]
    assert [capacity(10, k) for k in (0.01, 0.1, 0.25, 0.3, 0.5, 1.0)] == [1, 1, 3, 3, 5, 10]
    assert capacity(7, 1 / 3) == 3 and capacity(512, 0.125) == 64  # exact: no float rounding up
    g = torch.Generator().manual_seed(2)
    for fraction in (0.2, 0.5, 0.75):
        scores = torch.rand(5, 37, generator=g)
        slots = capacity(37, fraction)
        keep = torch.zeros(5, 37, dtype=torch.bool)
        keep.scatter_(1, scores.topk(slots, dim=1).indices, True)
        keep[3, :] = False
        keep[4, 30:] = False  # rows with fewer kept tokens than slots
        index, counts = capacity_route(keep, fraction)
        ref_index, ref_counts = tf.route_reference(keep)
        assert index.shape == (5, slots) and torch.equal(counts, ref_counts)
        assert torch.equal(index[:, :ref_index.shape[1]], ref_index) and not index[:, ref_index.shape[1]:].any()


def test_gather_scatter_hand_computed():
    x = torch.arange(3 * 6 * 2, dtype=torch.float32).view(3, 6, 2)
    index, counts = route(_keep())
    g = gather(x, index, counts)
    assert g.shape == (3, 3, 2)
    assert g[0].tolist() == [x[0, 0].tolist(), x[0, 2].tolist(), x[0, 3].tolist()]
    assert g[1].tolist() == [x[1, 4].tolist(), [0, 0], [0, 0]]  # padding slots are zero
    assert g[2].abs().sum() == 0
    rows = torch.full((3, 3, 2), -1.0)
    rows[1, 1:] = float("nan")  # padding slots of rows are ignored, NaN included
    out = scatter(x, rows, index, counts)
    expect = x.clone()
    expect[0, [0, 2, 3]] = -1.0
    expect[1, 4] = -1.0
    assert torch.equal(out, expect)
    out = scatter(x, rows, index, counts, True)
    expect = x.clone()
    expect[0, [0, 2, 3]] -= 1.0
    expect[1, 4] -= 1.0
    assert torch.equal(out, expect)
    assert torch.equal(x, torch.arange(3 * 6 * 2, dtype=torch.float32).view(3, 6, 2))  # x not mutated


def test_packed_layout_hand_computed():
    """The packed layout: kept tokens of the whole batch one after another (example-major, ascending)."""
    x = torch.arange(3 * 6 * 2, dtype=torch.float32).view(3, 6, 2)
    index, counts = route(_keep())  # [[0, 2, 3], [4, 0, 0], [0, 0, 0]], counts [3, 1, 0]
    slots, rows, n = packed_route(index, counts, x)
    assert n.tolist() == [4]
    assert slots.tolist() == [[0, 1, 2, 3]]  # valid slots of the padded [3, 3] layout, flat
    assert rows.tolist() == [[0, 2, 3, 6 + 4]]  # b * L + position
    packed = gather_packed(x, rows, n)
    assert packed.tolist() == [[x[0, 0].tolist(), x[0, 2].tolist(), x[0, 3].tolist(), x[1, 4].tolist()]]
    assert torch.equal(pack_slots(gather(x, index, counts), slots, n), packed)  # padded -> packed: same rows
    out = scatter_packed(x, -packed, rows, n, False)
    expect = x.clone()
    expect[0, [0, 2, 3]] *= -1
    expect[1, 4] *= -1
    assert torch.equal(out, expect)
    assert torch.equal(scatter_packed(x, -packed, rows, n, True), x.clone().index_put_(
        (torch.tensor([0, 0, 0, 1]), torch.tensor([0, 2, 3, 4])), torch.zeros(4, 2)))
    slots, rows, n = packed_route(*route(torch.zeros(2, 4, dtype=torch.bool)), x[:2])
    assert n.tolist() == [0] and slots.shape == (1, 1)  # nothing kept: one padding slot, never written
    assert torch.equal(scatter_packed(x[:2], torch.full((1, 1, 2), float("nan")), rows, n, False), x[:2])


@pytest.mark.parametrize("accumulate", [False, True])
def test_matches_reference_and_gradients(accumulate):
    g = torch.Generator().manual_seed(2)
    keep = torch.rand(4, 19, generator=g) < 0.5
    index, counts = route(keep)
    x = torch.randn(4, 19, 8, generator=g, dtype=torch.float64, requires_grad=True)
    rows = torch.randn(4, index.shape[1], 8, generator=g, dtype=torch.float64, requires_grad=True)
    assert torch.equal(gather(x, index, counts), tf.gather_reference(x, index, counts))
    assert torch.equal(scatter(x, rows, index, counts, accumulate),
                       tf.scatter_reference(x, rows, index, counts, accumulate))
    torch.autograd.gradcheck(lambda t: gather(t, index, counts), (x,))
    torch.autograd.gradcheck(lambda a, b: scatter(a, b, index, counts, accumulate), (x, rows))
    # gradients by hand: a skipped row of x gets grad_out itself, a padding slot of rows gets 0
    gout = torch.randn(4, 19, 8, dtype=torch.float64, generator=g)
    gx, grows = torch.autograd.grad(scatter(x, rows, index, counts, accumulate), (x, rows), gout)
    skipped = ~keep
    assert torch.equal(gx[skipped], gout[skipped])
    assert torch.equal(gx[keep], gout[keep] if accumulate else torch.zeros_like(gout[keep]))
    pad = torch.arange(index.shape[1]).unsqueeze(0) >= counts.unsqueeze(1)
    assert grows[pad].abs().sum() == 0


def test_bad_inputs_are_named():
    x = torch.randn(2, 5, 4)
    index, counts = route(torch.ones(2, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match="int64"):
        gather(x, index.int(), counts)
    with pytest.raises(ValueError, match=r"expected x \[B, L, D\]"):
        gather(x[0], index, counts)
    with pytest.raises(ValueError, match=r"rows must be \[B, K, D\]"):
        scatter(x, torch.randn(2, 3, 4), index, counts)


@pytest.mark.parametrize("accumulate", [False, True])
def test_opcheck(accumulate):
    g = torch.Generator().manual_seed(3)
    keep = torch.rand(3, 11, generator=g) < 0.5
    keep[:, 0] = True
    index, counts = route(keep)
    x = torch.randn(3, 11, 6, generator=g, requires_grad=True)
    rows = torch.randn(3, index.shape[1], 6, generator=g, requires_grad=True)
    torch.library.opcheck(route, (keep,))
    torch.library.opcheck(gather, (x, index, counts))
    torch.library.opcheck(scatter, (x, rows, index, counts, accumulate))

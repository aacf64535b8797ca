"""Sparse FFN through sparsecc.compile: controllers distilled per region, the rewrite, training."""

import warnings

import pytest
import torch

import sparsecc
from sparsecc import testing as T
from sparsecc.capture import normalize_inputs
from sparsecc.ops.sparse_ffn import activation_fn, controller_logits, sparse_ffn_reference

warnings.filterwarnings("ignore")


def _run(model, inputs):
    args, kwargs = normalize_inputs(inputs)
    return model(*args, **kwargs)


@pytest.mark.parametrize("factory", [T.bert, T.gpt2, T.llama])
def test_each_ffn_equals_the_masked_dense_ffn_of_the_original_weights(factory):
    """Every rewritten FFN computes the ORIGINAL model's FFN with the plan's controller mask (1e-5):
    the weights are wired from the right parameters and the controller from the plan."""
    model, inputs = factory()
    recipe = sparsecc.Recipe(attention=None, ffn=sparsecc.SparseFFN(n=2, d_lowrank=4, steps=0))
    sm = sparsecc.compile(model, inputs, recipe=recipe, calibration=[inputs])
    regions = sm.report().ffn
    assert len(regions) == 2 and all(r.sparse["n"] == 2 for r in regions)
    calls = T.op_calls(sm, inputs, torch.ops.sparsecc.sparse_ffn.default)
    assert len(calls) == 2
    original = dict(model.named_parameters())

    def weight(r, role):  # GPT-2's Conv1D keeps (in, out): nn.Linear layout is its transpose
        w = original[r.weights[role]]
        return w.t() if factory is T.gpt2 else w

    def bias(r, role):
        name = r.weights[role].rsplit(".", 1)[0] + ".bias"
        return original.get(name)

    for r, ((x, *_), got) in zip(regions, calls):
        plan = sm.plans[r.name]
        expected = sparse_ffn_reference(
            x, weight(r, "up"), bias(r, "up"), weight(r, "down"), bias(r, "down"), plan.tensors["c1"],
            plan.tensors["c2"], plan.tensors["c_bias"], 2, r.activation,
            weight(r, "gate") if r.gated else None, bias(r, "gate") if r.gated else None)
        assert (got - expected).abs().max() <= 1e-5
        dense = sparse_ffn_reference(x, weight(r, "up"), bias(r, "up"), weight(r, "down"), bias(r, "down"),
                                     plan.tensors["c1"], plan.tensors["c2"], plan.tensors["c_bias"], 1, r.activation,
                                     weight(r, "gate") if r.gated else None, bias(r, "gate") if r.gated else None)
        assert (got - dense).abs().max() > 1e-3  # half of the units are really dropped


def test_a_rewrite_that_costs_more_is_refused_with_the_reason():
    model, inputs = T.bert()
    with pytest.raises(sparsecc.errors.UnsupportedError, match=r"would cost .* not fewer than the dense"):
        sparsecc.compile(model, inputs, recipe=sparsecc.Recipe(attention=None, ffn=sparsecc.SparseFFN(n=1)),
                         calibration=[inputs])


@pytest.mark.parametrize("factory,gated", [(T.bert, False), (T.llama, True)])
def test_sparse_ffn_distills_reports_and_trains(factory, gated):
    model, inputs = factory()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    recipe = sparsecc.Recipe(attention=None, ffn=sparsecc.SparseFFN(n=8, d_lowrank=8, steps=100))
    sm = sparsecc.compile(model, inputs, recipe=recipe, calibration=[inputs])
    report = sm.report()
    for r in report.ffn:
        assert r.gated == gated
        assert r.sparse["density"] == pytest.approx(1 / 8) and r.sparse["flops"] < r.flops / 2
    # the reported agreement is what it claims: on the calibration rows (the FFN inputs), the fraction of
    # (token, block) pairs where the controller picks the unit of the largest (gated: |act(g) * up|) score;
    # and distillation beats an untrained controller by a wide margin
    # (calibration runs the dense model: take each FFN's rows from the identity rewrite, `sparsecc::ffn`)
    dense = sparsecc.compile(model, inputs, recipe=sparsecc.Recipe(attention=None, ffn=sparsecc.Identity()))
    calls = T.op_calls(dense, inputs, torch.ops.sparsecc.ffn.default)
    random_ctrl = sparsecc.compile(model, inputs, recipe=sparsecc.Recipe(attention=None, ffn=sparsecc.SparseFFN(
        n=8, d_lowrank=8, init="random")))
    n = 8
    for r, ((x, w_in, b_in, _, _, act, w_gate, b_gate), _) in zip(report.ffn, calls):
        up = torch.nn.functional.linear(x, w_in, b_in)
        score = up if w_gate is None else (activation_fn(torch.nn.functional.linear(x, w_gate, b_gate), act) * up).abs()
        target = score.reshape(-1, score.shape[-1] // n, n).argmax(-1)
        chosen = lambda plan: controller_logits(x, plan.tensors["c1"], plan.tensors["c2"], plan.tensors["c_bias"]
                                                ).reshape(-1, score.shape[-1] // n, n).argmax(-1)  # noqa: E731
        agreement = (chosen(sm.plans[r.name]) == target).float().mean().item()
        assert r.sparse["agreement"] == pytest.approx(agreement, abs=1e-6)
        untrained = (chosen(random_ctrl.plans[r.name]) == target).float().mean().item()
        assert agreement > untrained + 0.3 and agreement > 0.6, (agreement, untrained)
    # gradients reach the FFN weights through the sparse op (the chosen units)
    out = _run(sm, inputs)
    sum(t.pow(2).mean() for t in torch.utils._pytree.tree_leaves(out)
        if isinstance(t, torch.Tensor) and t.is_floating_point()).backward()
    w_out_t = sm.graph_module.get_parameter("sparsecc_ffn_0_w_out_t")
    assert w_out_t.grad is not None and 0 < (w_out_t.grad.abs().sum(1) > 0).sum() < w_out_t.shape[0] + 1
    up = sm.graph_module.get_parameter(report.ffn[0].weights["up"])
    assert up.grad is not None and up.grad.abs().sum() > 0
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])


def test_random_init_needs_no_calibration_and_bad_n_is_named():
    model, inputs = T.bert()
    sm = sparsecc.compile(model, inputs, recipe=sparsecc.Recipe(attention=None,
                                                                ffn=sparsecc.SparseFFN(n=4, d_lowrank=8, init="random")))
    assert all(r.sparse["agreement"] is None for r in sm.report().ffn)
    with pytest.raises(sparsecc.errors.UnsupportedError, match="d_ff=64 is not a multiple of recipe.ffn.n=5"):
        sparsecc.compile(model, inputs, recipe=sparsecc.Recipe(attention=None, ffn=sparsecc.SparseFFN(n=5)))
    with pytest.raises(sparsecc.errors.RecipeError, match="recipe.ffn.init: got 'magic'"):
        sparsecc.SparseFFN(init="magic")


def test_spion_and_sparse_ffn_together():
    model, inputs = T.gpt2()
    recipe = sparsecc.Recipe(attention=sparsecc.Fixed(pattern="bigbird", block=8, density=0.75),
                             ffn=sparsecc.SparseFFN(n=4, d_lowrank=4, steps=20))
    sm = sparsecc.compile(model, inputs, recipe=recipe, calibration=[inputs])
    ops = [n.target for n in sm.graph_module.graph.nodes]
    assert ops.count(torch.ops.sparsecc.block_sparse_attention.default) == 2
    assert ops.count(torch.ops.sparsecc.sparse_ffn.default) == 2
    assert "sparse_ffn" in sm.report().table() and "bigbird" in sm.report().table()

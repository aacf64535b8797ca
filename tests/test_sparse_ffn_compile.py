"""Sparse FFN through sparsecc.compile: controllers distilled per region, the rewrite, training."""

import warnings

import pytest
import torch

import sparsecc
from sparsecc import testing as T
from sparsecc.capture import normalize_inputs
from sparsecc.passes.manager import max_abs_error

warnings.filterwarnings("ignore")


def _run(model, inputs):
    args, kwargs = normalize_inputs(inputs)
    return model(*args, **kwargs)


@pytest.mark.parametrize("factory", [T.bert, T.gpt2, T.llama])
def test_n1_equals_dense(factory):
    model, inputs = factory()
    recipe = sparsecc.Recipe(attention=None, ffn=sparsecc.SparseFFN(n=1, d_lowrank=4, steps=0))
    sm = sparsecc.compile(model, inputs, recipe=recipe, calibration=[inputs])
    ops = [n.target for n in sm.graph_module.graph.nodes]
    assert ops.count(torch.ops.sparsecc.sparse_ffn.default) == 2
    with torch.no_grad():
        assert max_abs_error(_run(model, inputs), _run(sm, inputs)) <= 1e-5


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
        assert 1 / 8 < r.sparse["agreement"] <= 1.0  # better than chance at picking each block's arg-max
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
                                                                ffn=sparsecc.SparseFFN(n=4, init="random")))
    assert all(r.sparse["agreement"] is None for r in sm.report().ffn)
    with pytest.raises(sparsecc.errors.UnsupportedError, match="d_ff=64 is not a multiple of recipe.ffn.n=5"):
        sparsecc.compile(model, inputs, recipe=sparsecc.Recipe(attention=None, ffn=sparsecc.SparseFFN(n=5)))
    with pytest.raises(sparsecc.errors.RecipeError, match="recipe.ffn.init: got 'magic'"):
        sparsecc.SparseFFN(init="magic")


def test_spion_and_sparse_ffn_together():
    model, inputs = T.gpt2()
    recipe = sparsecc.Recipe(attention=sparsecc.Spion(method="bigbird", block=8, density=0.75),
                             ffn=sparsecc.SparseFFN(n=4, d_lowrank=4, steps=20))
    sm = sparsecc.compile(model, inputs, recipe=recipe, calibration=[inputs])
    ops = [n.target for n in sm.graph_module.graph.nodes]
    assert ops.count(torch.ops.sparsecc.block_sparse_attention.default) == 2
    assert ops.count(torch.ops.sparsecc.sparse_ffn.default) == 2
    assert "sparse_ffn" in sm.report().table() and "bigbird" in sm.report().table()

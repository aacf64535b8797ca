"""SPION through sparsecc.compile: calibration, layouts per region, the rewrite, the report."""

import dataclasses
import warnings

import pytest
import torch

import sparsecc
from sparsecc import testing as T
from sparsecc.calibrate import attention_probs_mean, collect_attention_maps
from sparsecc.capture import capture, normalize_inputs
from sparsecc.graph.regions import find_regions
from sparsecc.passes.manager import max_abs_error
from sparsecc.methods.block_sparse import split_mask
from sparsecc.testing import check_block_sparse_calls, op_calls

warnings.filterwarnings("ignore")


def _run(model, inputs):
    args, kwargs = normalize_inputs(inputs)
    with torch.no_grad():
        return model(*args, **kwargs)


def test_attention_probs_mean_matches_dense_softmax():
    q, k = torch.randn(2, 3, 37, 8), torch.randn(2, 3, 37, 8)
    mask = torch.rand(2, 1, 37, 37) > 0.2
    mask[..., 0] = True
    ref = torch.softmax((q @ k.transpose(-1, -2) * 0.4).masked_fill(~mask, float("-inf"))
                        .masked_fill(torch.ones(37, 37, dtype=torch.bool).triu(1), float("-inf")), -1).mean((0, 1))
    got = attention_probs_mean(q, k, mask, is_causal=True, scale=0.4, chunk=8)  # chunks of 8 rows
    assert (got - ref).abs().max() < 1e-6
    assert torch.allclose(got.sum(-1), torch.ones(37))


def test_collect_maps_average_over_batches():
    model, inputs = T.bert("sdpa")
    captured = capture(model, inputs)
    from sparsecc.graph.canonicalize import CANONICALIZE
    for _, fn in CANONICALIZE:
        fn(captured.gm)
    captured.gm.recompile()
    regions = [r for r in find_regions(captured.gm, captured) if r.kind == "attention"]
    other = {k: v.flip(1) for k, v in inputs.items()}
    maps = collect_attention_maps(captured, captured.gm, regions, [inputs, other], progress=False)
    one = collect_attention_maps(captured, captured.gm, regions, [inputs], progress=False)
    two = collect_attention_maps(captured, captured.gm, regions, [other], progress=False)
    for name in maps:
        assert maps[name].shape == (16, 16)
        assert torch.allclose(maps[name], (one[name] + two[name]) / 2, atol=1e-6)
        assert torch.allclose(maps[name].sum(-1), torch.ones(16), atol=1e-5)
    # example 1 pads its last 3 keys: no probability may land there in its share of the mean
    assert maps[regions[0].name][:, -3:].max() < 0.5 / 16 * 4


@pytest.mark.parametrize("factory,density", [(lambda: T.bert("sdpa", seq=32), 1.0), (lambda: T.bert("eager", seq=32), 1.0),
                                             (T.gpt2, 0.75), (T.llama, 0.75)])
def test_full_layout_equals_dense(factory, density):
    """A layout that keeps every allowed block must reproduce dense attention (mask split included)."""
    model, inputs = factory()
    recipe = sparsecc.Recipe(attention=sparsecc.Fixed(pattern="random", block=8, density=density), ffn=None)
    sm = sparsecc.compile(model, inputs, recipe=recipe)
    targets = [n.target for n in sm.graph_module.graph.nodes]
    assert targets.count(torch.ops.sparsecc.block_sparse_attention.default) == 2
    assert max_abs_error(_run(model, inputs), _run(sm, inputs)) <= 1e-5


@pytest.mark.parametrize("factory", [lambda: T.bert("sdpa", seq=64), T.gpt2, T.llama])
def test_spion_cf_calibrates_rewrites_and_reports(factory):
    model, inputs = factory()
    calib = [inputs, {k: v.flip(-1) for k, v in inputs.items()} if isinstance(inputs, dict) else (inputs[0].flip(-1),)]
    recipe = sparsecc.Recipe(attention=sparsecc.Spion(method="spion_cf", block=8, quantile=0.6, kernel_size=3))
    sm = sparsecc.compile(model, inputs, recipe=recipe, calibration=calib)
    report = sm.report()
    assert len(sm.layouts) == len(report.attention) == 2
    for r in report.attention:
        # planned at the calibration length, served up to the model's maximum positions
        assert sm.layouts[r.name].seq_lens[0] == r.sparse["max_len"] == model.config.max_position_embeddings
        layout = sm.layouts[r.name].fit(r.q_len, r.kv_len)
        assert r.sparse["density"] == pytest.approx(layout.density)
        assert torch.equal(layout.mask.diagonal(), torch.ones(layout.mask.shape[0], dtype=torch.bool))
        assert layout.causal == r.causal
        assert r.sparse["flops"] < r.flops
    assert "density" in report.table()
    # at the calibrated (real) densities each call equals masked dense attention under its layout
    kept = T.check_block_sparse_calls(sm, inputs)
    assert kept == pytest.approx([sm.layouts[r.name].fit(r.q_len, r.kv_len).density for r in report.attention])
    here = {r.name: sm.layouts[r.name].fit(r.q_len, r.kv_len) for r in report.attention}
    dropped = [r for r in report.attention if here[r.name].num_blocks < (
        (lambda n: n * (n + 1) // 2)(here[r.name].shape[0]) if r.causal else here[r.name].mask.numel())]
    if dropped:  # a layout that drops an allowed block changes the output (2x2 causal ones cannot drop any)
        assert max_abs_error(_run(model, inputs), _run(sm, inputs)) > 1e-4
    # it trains: gradients reach the attention projections through the block-sparse op
    sum(t.float().pow(2).mean() for t in torch.utils._pytree.tree_leaves(
        sm(**inputs) if isinstance(inputs, dict) else sm(*inputs)) if isinstance(t, torch.Tensor)
        and t.is_floating_point()).backward()
    q_weight = sm.graph_module.get_parameter(report.attention[0].weights["q"])
    assert q_weight.grad is not None and q_weight.grad.abs().sum() > 0


def test_t5_position_bias_is_applied_on_the_kept_blocks():
    """T5 adds a learned position bias to every self-attention's scores: SPION rewrites those regions with the
    bias as the op's score bias (each call equals masked dense attention plus the bias); cross attention stays
    dense, and the report says why."""
    model, inputs = T.t5()
    sm = sparsecc.compile(model, inputs, recipe=sparsecc.Recipe(attention=sparsecc.Spion(block=8, quantile=0.5),
                                                                ffn=None), calibration=[inputs], progress=False)
    report = sm.report()
    rewritten = [r for r in report.attention if r.sparse]
    assert len(rewritten) == 4 and all("score bias" in r.sparse["score_bias"] for r in rewritten)
    assert min(r.sparse["density"] for r in rewritten) < 1.0
    misses = [m for m in report.misses() if m.kind == "attention"]
    assert len(misses) == 2 and all("cross attention" in m.reason for m in misses)
    calls = op_calls(sm, inputs, torch.ops.sparsecc.block_sparse_attention.default)
    assert len(calls) == 4 and all(len(args) == 10 and args[9] is not None for args, _ in calls)
    assert len(check_block_sparse_calls(sm, inputs)) == 4  # each call: masked dense attention + the bias
    identity = sparsecc.compile(model, inputs, recipe=sparsecc.Recipe(attention=sparsecc.Identity(), ffn=None))
    assert max_abs_error(_run(model, inputs), _run(identity, inputs)) <= 1e-5


def test_split_mask_cases():
    keys = torch.tensor([[True, True, True, False], [True, True, False, False]])
    pad = keys[:, None, None, :].expand(2, 1, 4, 4)
    assert torch.equal(split_mask(pad, causal=False), keys)
    causal = pad & torch.ones(4, 4, dtype=torch.bool).tril()
    assert torch.equal(split_mask(causal, causal=True), keys)
    assert split_mask(causal, causal=False) is None  # causal structure not declared: refuse
    additive = torch.zeros(2, 1, 4, 4).masked_fill(~pad, torch.finfo(torch.float32).min)
    assert torch.equal(split_mask(additive, causal=False), keys)
    assert split_mask(torch.randn(2, 4, 4, 4), causal=False) is None  # a bias


def test_spion_recipe_validation_and_save(tmp_path):
    with pytest.raises(sparsecc.errors.RecipeError, match=r"recipe.attention.quantile: got 1.5"):
        sparsecc.Spion(quantile=1.5)
    with pytest.raises(sparsecc.errors.RecipeError, match=r"recipe.attention.method: got 'spoin_cf'; allowed: \['spion_cf'"):
        sparsecc.Recipe.from_dict({"attention": {"kind": "spion", "method": "spoin_cf"}})
    with pytest.raises(sparsecc.errors.RecipeError, match=r"recipe.attention.block: got '64'"):
        sparsecc.Recipe.from_dict({"attention": {"kind": "spion", "block": "64"}})
    model, inputs = T.bert("sdpa", seq=32)
    sm = sparsecc.compile(model, inputs, recipe=sparsecc.Recipe(attention=sparsecc.Fixed(pattern="bigbird", block=8,
                                                                                          density=0.5)))
    sm.save_layouts(str(tmp_path / "layouts"))
    assert (tmp_path / "layouts" / "layouts.png").stat().st_size > 1000
    again = sparsecc.compile(model, inputs, recipe=sparsecc.Recipe(
        attention=sparsecc.Spion(layouts=str(tmp_path / "layouts"))))
    for name, layout in sm.layouts.items():
        assert torch.equal(again.layouts[name].mask, layout.mask)
    assert max_abs_error(_run(sm, inputs), _run(again, inputs)) <= 1e-6


def test_spion_model_runs_shorter_sequences_by_cropping_its_layouts():
    model, inputs = T.bert("sdpa", seq=32)
    sm = sparsecc.compile(model, inputs, recipe=sparsecc.Recipe(
        attention=sparsecc.Fixed(pattern="random", block=8, density=1.0, max_len=32), ffn=None))
    short = {"input_ids": inputs["input_ids"][:, :20], "attention_mask": inputs["attention_mask"][:, :20]}
    assert max_abs_error(_run(model, short), _run(sm, short)) <= 1e-5
    longer = {k: torch.cat([v, v[:, :8]], 1) for k, v in inputs.items()}
    with pytest.raises(sparsecc.errors.LayoutError, match=r"made for 32 tokens.*max_len"):
        _run(sm, longer)


def test_spion_layouts_serve_one_and_a_half_times_the_calibration_length():
    """Planned at 32 tokens, served by default up to the model's maximum positions (BERT: 512): a batch of 48
    tokens runs, each call equal to masked dense attention under the extended layout."""
    model, inputs = T.bert("sdpa", seq=32)
    recipe = sparsecc.Recipe(attention=sparsecc.Spion(block=8, quantile=0.6, kernel_size=3))
    sm = sparsecc.compile(model, inputs, recipe=recipe, calibration=[inputs])
    planned = sparsecc.compile(model, inputs, recipe=sparsecc.Recipe(attention=dataclasses.replace(
        recipe.attention, max_len=32)), calibration=[inputs])
    longer = {k: torch.cat([v, v[:, :16]], 1) for k, v in inputs.items()}
    for r in sm.report().attention:
        layout = sm.layouts[r.name]
        assert layout.shape == (64, 64) and layout.meta["extend"] == "structure"
        assert planned.layouts[r.name].shape == (4, 4)
        assert torch.equal(layout.fit(32).mask, planned.layouts[r.name].mask)  # the calibrated corner as planned
    kept = T.check_block_sparse_calls(sm, longer)
    assert kept == pytest.approx([sm.layouts[r.name].fit(48).density for r in sm.report().attention])
    assert torch.isfinite(_run(sm, longer).last_hidden_state).all()

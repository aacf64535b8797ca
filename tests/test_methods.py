"""The method interface: a method registered in this file compiles; one calibration pass for every
method; per-layer recipes; config validation; recipes that fit nothing fail with the reasons."""

from __future__ import annotations

import math
import typing
from dataclasses import dataclass

import pytest
import torch
from torch import nn

import sparsecc
from sparsecc import testing as T
from sparsecc.calibrate import AttentionMapObserver, RowObserver
from sparsecc.errors import RecipeError, UnsupportedError
from sparsecc.graph.fx_utils import new_call
from sparsecc.graph.regions import find_ffn
from sparsecc.methods import Match, Method, Plan, register
from sparsecc.methods.fixed.layouts import longformer
from sparsecc.passes.manager import max_abs_error


# ------------------------------------------------------------------ a method defined here
@dataclass(frozen=True)
class ScaleFFN:
    """Test method: multiply each FFN's output by `factor`; the plan records the mean FFN input."""

    kind: typing.ClassVar[str] = "test_scale_ffn"
    factor: float = 0.5
    min_d_ff: int = 1


@register(ScaleFFN)
class ScaleFFNMethod(Method):
    slots = ("ffn",)

    def match(self, region, config, ctx):
        return Match.ok() if region.d_ff >= config.min_d_ff else Match.fail("test_scale_ffn", f"d_ff {region.d_ff} < {config.min_d_ff}")

    def observers(self, target):
        return [RowObserver(target.region.input, target.name, max_rows=10_000)]

    def plan(self, target, stats, ctx):
        return Plan(method=target.config.kind, region=target.name, values={"factor": target.config.factor},
                    tensors={"input_mean": stats[0].value().mean(0)})

    def rewrite(self, gm, ctx, targets):
        by_name = {t.name: t for t in targets}
        changes = []
        for r in find_ffn(gm):
            t = by_name.get(r.name)
            if t is None:
                continue
            with gm.graph.inserting_after(r.down):
                scaled = new_call(gm.graph, torch.ops.aten.mul.Tensor, (r.down, t.plan.values["factor"]),
                                  meta_from=r.down)
            r.down.replace_all_uses_with(scaled, delete_user_cb=lambda u: u is not scaled)
            t.region.sparse = {"method": "scaled", "density": 1.0, "flops": t.region.flops}
            changes.append(f"scale:{r.name}")
        return changes


class Residual(nn.Module):
    def __init__(self, d: int = 8, d_ff: int = 16):
        super().__init__()
        self.up, self.down = nn.Linear(d, d_ff), nn.Linear(d_ff, d)

    def forward(self, x):
        return x + self.down(torch.relu(self.up(x)))


class TwoBlocks(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList([Residual(8, 16), Residual(8, 32)])

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return x


def test_a_method_registered_outside_the_package_compiles_calibrates_and_plans():
    torch.manual_seed(0)
    model, x = TwoBlocks().eval(), torch.randn(2, 5, 8)
    batches = [torch.randn(3, 5, 8), torch.randn(1, 5, 8)]
    sm = sparsecc.compile(model, (x,), recipe=sparsecc.Recipe(attention=None, ffn=ScaleFFN(factor=0.25)),
                          calibration=batches)
    a, b = model.layers
    h = x + 0.25 * a.down(torch.relu(a.up(x)))
    expected = h + 0.25 * b.down(torch.relu(b.up(h)))
    assert max_abs_error(expected, sm(x)) <= 1e-6
    # the first layer's plan: the mean of its inputs over all 4 calibration examples x 5 tokens
    first = sm.plans["layers.0"]
    assert first.values == {"factor": 0.25} and first.method == "test_scale_ffn"
    assert torch.allclose(first.tensors["input_mean"], torch.cat(batches).reshape(-1, 8).mean(0), atol=1e-6)
    assert [r.sparse["config"] for r in sm.report().ffn] == ["test_scale_ffn(factor=0.25)"] * 2
    # from a recipe file, by kind; a region that does not match stays as it was, with its reason
    recipe = sparsecc.Recipe.from_dict({"ffn": {"kind": "test_scale_ffn", "factor": 2.0, "min_d_ff": 32}})
    sm = sparsecc.compile(model, (x,), recipe=recipe, calibration=batches)
    h = x + a.down(torch.relu(a.up(x)))  # layer 0 (d_ff 16) does not fit min_d_ff 32
    assert max_abs_error(h + 2.0 * b.down(torch.relu(b.up(h))), sm(x)) <= 1e-6
    notes = [str(m) for m in sm.report().misses() if m.path == "layers.0"]
    assert notes and "test_scale_ffn not applied: d_ff 16 < 32" in notes[0] and "(layer 0)" in notes[0]
    # a config given to layers where it fits nowhere is an error with every reason, not a silent no-op
    with pytest.raises(UnsupportedError, match=r"test_scale_ffn\(min_d_ff=64\) fits none of the 1 FFN .* d_ff 16"):
        sparsecc.compile(model, (x,), recipe=sparsecc.Recipe(ffn={"0": ScaleFFN(min_d_ff=64), "1": ScaleFFN()}),
                         calibration=batches)


# ------------------------------------------------------------------ one calibration pass
class CountingBatches:
    def __init__(self, batches):
        self.batches, self.iterations, self.items = batches, 0, 0

    def __iter__(self):
        self.iterations += 1
        for b in self.batches:
            self.items += 1
            yield b


def test_spion_and_sparse_ffn_calibrate_in_one_pass_over_the_data(monkeypatch):
    from sparsecc import calibrate as calibration_module
    model, inputs = T.bert("sdpa", seq=32)
    runs = []
    original = calibration_module._Observing.run
    monkeypatch.setattr(calibration_module._Observing, "run", lambda self, *a: runs.append(1) or original(self, *a))
    data = CountingBatches([inputs] * 3)
    recipe = sparsecc.Recipe(attention=sparsecc.Spion(block=8, quantile=0.9),
                             ffn=sparsecc.SparseFFN(n=4, d_lowrank=4, steps=5))
    sm = sparsecc.compile(model, inputs, recipe=recipe, calibration=data, progress=True)  # with the bar
    assert (data.iterations, data.items, len(runs)) == (1, 3, 3)  # the data is read once: one forward per batch
    ops = [n.target for n in sm.graph_module.graph.nodes]
    assert ops.count(torch.ops.sparsecc.block_sparse_attention.default) == 2
    assert ops.count(torch.ops.sparsecc.sparse_ffn.default) == 2


# ------------------------------------------------------------------ calibration statistics
def test_attention_maps_of_mixed_lengths_average_each_cell_over_what_covered_it():
    obs = AttentionMapObserver(node=None, region="r")
    obs.add(torch.full((2, 2), 2.0), {(2, 2): 2})  # two items of length 2, probabilities summed: 1.0 each
    obs.add(torch.full((3, 3), 3.0), {(3, 3): 1})  # one item of length 3
    mean = obs.mean()
    # the 2x2 corner: (2 + 3) / 3 items; the rest: 3 / 1 item
    expected = torch.tensor([[5 / 3, 5 / 3, 3.0], [5 / 3, 5 / 3, 3.0], [3.0, 3.0, 3.0]])
    assert torch.allclose(mean, expected)


def test_spion_calibrated_on_longer_batches_than_the_example_serves_both_lengths():
    model, short = T.bert("sdpa", seq=16)
    _, long = T.bert("sdpa", seq=32)
    sm = sparsecc.compile(model, short, recipe=sparsecc.Recipe(attention=sparsecc.Spion(block=8, quantile=0.9)),
                          calibration=[short, long], progress=False)
    # planned at the longest calibrated length (32: 4x4 blocks), served up to BERT's 512 positions
    assert all(layout.shape == (64, 64) and layout.meta["fitted_from"] == [4, 4] for layout in sm.layouts.values())
    for inputs in (short, long):
        out = sm(**inputs).last_hidden_state
        assert out.shape[1] == inputs["input_ids"].shape[1] and torch.isfinite(out).all()


# ------------------------------------------------------------------ per-layer recipes
def test_per_layer_recipe_gives_each_layer_its_config_and_round_trips(tmp_path):
    model, inputs = T.bert("sdpa", seq=32)
    recipe = sparsecc.Recipe(attention={"0": sparsecc.Fixed(pattern="local", block=8, density=0.4375), "1-": None},
                             ffn={"1": sparsecc.SparseFFN(n=4, d_lowrank=4, steps=5)})
    sm = sparsecc.compile(model, inputs, recipe=recipe, calibration=[inputs], progress=False)
    ops = [n.target for n in sm.graph_module.graph.nodes]
    assert ops.count(torch.ops.sparsecc.block_sparse_attention.default) == 1
    assert ops.count(torch.ops.sparsecc.sparse_ffn.default) == 1
    by_layer = {(r.kind, r.layer): r.sparse for r in sm.report().regions}
    assert by_layer[("attention", 0)]["config"] == "fixed(pattern='local', block=8, density=0.4375)"
    assert by_layer[("attention", 1)] is None and by_layer[("ffn", 0)] is None
    assert by_layer[("ffn", 1)]["config"] == "sparse_ffn(n=4, d_lowrank=4, steps=5)"
    table = sm.report().table()
    assert "fixed(pattern='local'" in table and "sparse_ffn(n=4" in table
    for name in ("r.toml", "r.json"):
        recipe.save(str(tmp_path / name))
        assert sparsecc.Recipe.load(str(tmp_path / name)) == recipe
    toml = (tmp_path / "r.toml").read_text()
    assert '[attention."0"]' in toml and '[attention."1-"]' in toml and 'kind = "none"' in toml


@pytest.mark.parametrize("mapping, message", [
    ({"0-3": sparsecc.Identity(), "2-": None}, "layer ranges 0-3 and 2- overlap"),
    ({"x": sparsecc.Identity()}, "layer range 'x' is not of the form"),
    ({"3-1": sparsecc.Identity()}, "ends before it starts"),
    ({"0": sparsecc.SparseFFN()}, r"recipe.attention.0: got SparseFFN"),
])
def test_per_layer_mapping_errors(mapping, message):
    with pytest.raises(RecipeError, match=message):
        sparsecc.Recipe(attention=mapping)


def test_flow_takes_one_config():
    with pytest.raises(RecipeError, match=r"keep=\(k0, k1"):
        sparsecc.Recipe(flow={"0": sparsecc.TokenFlow()})


# ------------------------------------------------------------------ validation and errors
@pytest.mark.parametrize("make, message", [
    (lambda: sparsecc.Spion(block=True), r"recipe.attention.block: got True \(bool\); expected int"),
    (lambda: sparsecc.SparseFFN(steps=-5), r"recipe.ffn.steps: got -5; expected >= 0"),
    (lambda: sparsecc.TokenFlow(init=math.nan), r"recipe.flow.init: got nan; expected a finite number"),
    (lambda: sparsecc.Fixed(density=0.0), r"recipe.attention.density: got 0.0; expected 0 < density <= 1"),
    (lambda: sparsecc.Fixed(pattern="dense"), r"recipe.attention.pattern: got 'dense'; allowed"),
    (lambda: sparsecc.Spion(method="bigbird"), r"'bigbird' is a fixed pattern.*sparsecc.Fixed\(pattern='bigbird'"),
    (lambda: sparsecc.TokenFlow(keep=(0.5, True)), r"recipe.flow.keep\[1\]: got True"),
])
def test_config_fields_are_validated(make, message):
    with pytest.raises(RecipeError, match=message):
        make()


def test_a_sparsifying_method_on_a_model_without_its_regions_says_so():
    model, inputs = T.no_attention()
    with pytest.raises(UnsupportedError, match=r"no attention region was found \(see `sparsecc inspect --explain`"):
        sparsecc.compile(model, inputs, recipe=sparsecc.Recipe(attention=sparsecc.Spion(), ffn=None),
                         calibration=[inputs])


def test_longformer_layout_by_hand():
    layout = longformer(seq_len=16, block_size=4, window=3, global_blocks=1)
    expected = torch.tensor([[1, 1, 1, 1],
                             [1, 1, 1, 0],
                             [1, 1, 1, 1],
                             [1, 0, 1, 1]], dtype=torch.bool)
    assert torch.equal(layout.mask, expected)
    causal = longformer(seq_len=16, block_size=4, window=2, global_blocks=1, causal=True)
    assert torch.equal(causal.mask, torch.tensor([[1, 0, 0, 0], [1, 1, 0, 0], [1, 1, 1, 0], [1, 0, 1, 1]],
                                                 dtype=torch.bool))
    model, inputs = T.bert("sdpa", seq=32)
    sm = sparsecc.compile(model, inputs, recipe=sparsecc.Recipe(attention=sparsecc.Fixed(
        pattern="longformer", block=8, density=0.625)))
    assert {lay.meta["kind"] for lay in sm.layouts.values()} == {"longformer"}
    assert all(lay.fit(32).density == pytest.approx(0.625) for lay in sm.layouts.values())
    assert all(r.sparse["density"] == pytest.approx(0.625) for r in sm.report().attention)


def test_a_batch_of_one_example_compiles_a_graph_for_any_batch():
    model, inputs = T.bert("sdpa", seq=16)
    one = {k: v[:1] for k, v in inputs.items()}
    three = {k: v[:1].repeat(3, 1) for k, v in inputs.items()}
    dense = sparsecc.compile(model, one)
    assert dense.dynamic
    for x in (one, three, inputs):
        assert max_abs_error(model(**x).last_hidden_state, dense(**x).last_hidden_state) <= 1e-5
    sm = sparsecc.compile(model, one, recipe=sparsecc.Recipe(attention=sparsecc.Fixed(pattern="local", block=8,
                                                                                    density=0.75)))
    out = sm(**three).last_hidden_state
    assert out.shape[0] == 3 and max_abs_error(out[1:2], sm(**one).last_hidden_state) <= 1e-5


def test_an_optional_mask_may_be_left_out_and_other_missing_inputs_say_which(tmp_path):
    model, inputs = T.bert("sdpa", seq=16)
    sm = sparsecc.compile(model, inputs, recipe=sparsecc.Recipe(attention=sparsecc.Fixed(pattern="local", block=8,
                                                                                    density=0.75)))
    assert sm.omittable == {"attention_mask": "input_ids"}  # BERT's forward: attention_mask=None means all ones
    ids = torch.cat([inputs["input_ids"], inputs["input_ids"][:1]])  # another batch size too
    want = sm(input_ids=ids, attention_mask=torch.ones_like(ids)).last_hidden_state
    assert torch.equal(sm(input_ids=ids).last_hidden_state, want)
    dense = sparsecc.compile(model, inputs)
    assert max_abs_error(dense(input_ids=ids).last_hidden_state, model(input_ids=ids).last_hidden_state) <= 1e-5
    sparsecc.save(sm, str(tmp_path / "m"))
    assert torch.equal(sparsecc.load(str(tmp_path / "m"))(input_ids=ids).last_hidden_state, want)
    with pytest.raises(UnsupportedError, match=r"keyword inputs \['attention_mask', 'input_ids'\].* got 0 positional "
                                                r"and \['attention_mask'\].*\['attention_mask'\] may be left out"):
        sm(attention_mask=inputs["attention_mask"])

    class DefaultIsNotAllOnes(torch.nn.Module):  # None means "mask tokens 0-2": leaving it out differs from ones
        def forward(self, ids, key_mask=None):
            key_mask = (ids > 2) if key_mask is None else key_mask.bool()
            return (ids.float() * key_mask).cumsum(1)

    x = {"ids": torch.arange(16).view(2, 8) % 6, "key_mask": torch.ones(2, 8, dtype=torch.long)}
    other = sparsecc.compile(DefaultIsNotAllOnes(), x)
    assert other.omittable == {}
    with pytest.raises(UnsupportedError, match=r"got 0 positional and \['ids'\]"):
        other(ids=x["ids"])

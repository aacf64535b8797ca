"""Bad input gets a sparsecc error that says what was found and what was expected; reports never mislead.

Each case of the bad-input table in TESTING.md that the Python API can reach (the command-line
cases are in tests/test_cli_errors.py, the artifacts in tests/test_artifacts.py).
"""

from __future__ import annotations

import json
import warnings

import pytest
import torch

import sparsecc
from sparsecc import testing as T
from sparsecc.errors import CaptureError, InputError, LayoutError, RecipeError, UnsupportedError

SPION = sparsecc.Recipe(attention=sparsecc.Spion(block=4), ffn=None)


@pytest.fixture(scope="module")
def bert():
    return T.bert()


# ------------------------------------------------------------------ calibration batches
@pytest.mark.parametrize("calibration,message", [
    ([], "calibration is an empty list"),
    (iter([]), "calibration got an empty iterable of batches"),
    ({"input_ids": None}, "calibration must be an iterable of batches (a list of inputs), got dict"),
])
def test_empty_or_unbatched_calibration(bert, calibration, message):
    model, inputs = bert
    with pytest.raises(InputError) as err:
        sparsecc.compile(model, inputs, recipe=SPION, calibration=calibration, progress=False)
    assert message in str(err.value)


def test_calibration_tensor_for_a_keyword_model_names_the_expected_inputs(bert):
    model, inputs = bert
    ids = inputs["input_ids"]
    expected = "the model was compiled with keyword input_ids (tensor [2, 16] int64), attention_mask (tensor [2, 16] int64)"
    for calibration in ([ids], [(ids,)], (b for b in [ids])):  # a list is checked before capture, a generator at use
        with pytest.raises(InputError) as err:
            sparsecc.compile(model, inputs, recipe=SPION, calibration=calibration, progress=False)
        assert "calibration batch 0 has 1 positional (tensor [2, 16] int64)" in str(err.value)
        assert expected in str(err.value) and "{'input_ids': ..., 'attention_mask': ...}" in str(err.value)
    with pytest.raises(InputError, match=r"batch 1 has keyword input_ids \(tensor \[2, 16\] int64\); the model was "):
        sparsecc.compile(model, inputs, recipe=SPION, progress=False,
                         calibration=[inputs, {"input_ids": ids}])


def test_calibration_dict_for_a_positional_model():
    model, (ids,) = T.gpt2()
    with pytest.raises(InputError, match=r"compiled with 1 positional \(tensor \[2, 16\] int64\).*e\.g\. \(\.\.\.,\)"):
        sparsecc.compile(model, (ids,), calibration=[{"input_ids": ids}])


def test_sparse_ffn_max_tokens_zero_is_a_recipe_error():
    with pytest.raises(RecipeError, match=r"recipe.ffn.max_tokens: got 0; expected an int >= 1"):
        sparsecc.SparseFFN(max_tokens=0)


# ------------------------------------------------------------------ meta device
def test_model_on_the_meta_device(bert):
    model, inputs = T.bert()
    with pytest.raises(CaptureError) as err:
        sparsecc.compile(model.to("meta"), inputs)
    assert "41 of the 41 weights of BertModel are on the meta device" in str(err.value)
    assert "'embeddings.word_embeddings.weight'" in str(err.value) and "to_empty" in str(err.value)
    assert "drop_noops" not in str(err.value)
    model, inputs = bert
    with pytest.raises(CaptureError, match="example input input_ids is on the meta device"):
        sparsecc.inspect(model, {k: v.to("meta") for k, v in inputs.items()})


# ------------------------------------------------------------------ densities: requested vs used
@pytest.mark.parametrize("config,asked,used", [
    (sparsecc.Spion(method="spion_c", block=16, density=1.0), 1.0, 0.875),  # 4x4 blocks: top-12 of 16 incl. diagonal
    (sparsecc.Fixed(pattern="bigbird", block=16, density=0.3), 0.3, 0.25),  # 4x4 blocks: window 1 + 1 global
])
def test_a_changed_density_is_warned_and_reported_next_to_the_requested_one(config, asked, used):
    model, inputs = T.bert(seq=64)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        sm = sparsecc.compile(model, inputs, recipe=sparsecc.Recipe(attention=config, ffn=None), calibration=[inputs],
                              progress=False)
    ours = [str(w.message) for w in caught if "asked for density" in str(w.message)]
    assert len(ours) == 1 and f"asked for density {asked:g}, the layouts have density {used:.3f} in 2 region(s)" in ours[0]
    facts = [r.sparse for r in sm.report().attention]
    assert [(f["density"], f["density_requested"]) for f in facts] == [(used, asked)] * 2
    assert f"{used:.3f} (asked {asked:.3f})" in sm.report().table()
    data = json.loads(json.dumps(sm.report().to_dict(), default=str))
    assert data["regions"][0]["sparse"]["density_requested"] == asked


def test_a_density_met_within_rounding_is_not_warned():
    model, inputs = T.bert(seq=64)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        sm = sparsecc.compile(model, inputs, progress=False,
                              recipe=sparsecc.Recipe(attention=sparsecc.Fixed(pattern="local", block=16, density=0.625),
                                                     ffn=None))
    assert not [w for w in caught if "asked for density" in str(w.message)]
    assert sm.report().attention[0].sparse["density"] == 0.625 and "(asked" not in sm.report().table()


# ------------------------------------------------------------------ failures name the region
def test_t5_bigbird_names_the_region_whose_density_it_cannot_reach():
    """T5's self-attention takes a block layout (its position bias rides along as the score bias); at 16
    tokens one block of 64 cannot reach density 0.3, and the error names the region and the range."""
    model, inputs = T.t5()
    with pytest.raises(LayoutError) as err:
        sparsecc.compile(model, inputs, recipe=sparsecc.Recipe(attention=sparsecc.Fixed(pattern="bigbird", density=0.3),
                                                               ffn=None))
    text = str(err.value)
    assert "region encoder.block.0.layer.0.SelfAttention" in text and "density 0.3 is outside [1.0000, 1.0000]" in text


def test_a_planning_failure_names_the_region():
    model, inputs = T.bert()  # 16 tokens: one block of 64, whose only density is 1
    with pytest.raises(LayoutError) as err:
        sparsecc.compile(model, inputs, recipe=sparsecc.Recipe(attention=sparsecc.Fixed(pattern="bigbird", density=0.3),
                                                               ffn=None))
    assert str(err.value).startswith("region encoder.layer.0.attention.self (layer 0), recipe.attention = "
                                     "fixed(density=0.3): density 0.3 is outside [1.0000, 1.0000]")


# ------------------------------------------------------------------ token flow
def test_untrained_token_flow_says_so_and_points_to_fit_flow(bert):
    model, inputs = bert
    sm = sparsecc.compile(model, inputs, recipe=sparsecc.Recipe(flow=sparsecc.TokenFlow(keep=0.5)), progress=False)
    table = sm.report().table()
    assert "token flow keeps every token in every layer, so it saves nothing yet" in table
    assert "gates are untrained" in table and "sparsecc.train.flow.fit_flow(" in table
    sm = sparsecc.compile(model, inputs, progress=False,
                          recipe=sparsecc.Recipe(flow=sparsecc.TokenFlow(keep=0.5, select="topk")))
    assert "saves nothing yet" not in sm.report().table()  # top-k keeps its budget


# ------------------------------------------------------------------ pictures are optional
def test_save_layouts_without_matplotlib(tmp_path, monkeypatch):
    from sparsecc.layouts import plot
    model, inputs = T.bert()
    sm = sparsecc.compile(model, inputs, progress=False,
                          recipe=sparsecc.Recipe(attention=sparsecc.Fixed(pattern="local", block=4, density=0.4375),
                                                 ffn=None))
    monkeypatch.setattr(plot, "plotting_available", lambda: False)
    with pytest.warns(UserWarning, match="matplotlib is not installed: layouts written without layouts.png"):
        sm.save_layouts(tmp_path / "a")
    assert (tmp_path / "a" / "index.json").is_file() and not (tmp_path / "a" / "layouts.png").exists()
    with pytest.raises(UnsupportedError, match=r"png=True\) draws with matplotlib, which is not installed"):
        sm.save_layouts(tmp_path / "b", png=True)
    assert not (tmp_path / "b").exists()  # refused before writing anything


# ------------------------------------------------------------------ half precision
def test_fp16_model_takes_block_sparse_attention_and_keeps_its_padding():
    """Eager BERT in fp16: its additive mask uses finfo(float16).min (-65504), which is a mask, and the
    canonicalization to SDPA rounds differently in fp16 (checked within a few fp16 ulps, not 1e-5)."""
    model, inputs = T.bert()  # example 1 has 3 padded tokens
    recipe = sparsecc.Recipe(attention=sparsecc.Fixed(pattern="local", block=4, density=0.4375), ffn=None)
    sm = sparsecc.compile(model.half(), inputs, recipe=recipe, progress=False)
    assert [r.sparse["method"] for r in sm.report().attention] == ["local", "local"]
    sdpa = next(p for p in sm.report().passes if p.name == "eager_attention_to_sdpa")
    assert 0 < sdpa.max_abs_error < 0.01
    calls = T.op_calls(sm, inputs, torch.ops.sparsecc.block_sparse_attention.default)
    assert len(calls) == 2
    for args, _ in calls:
        assert torch.equal(args[8], inputs["attention_mask"].bool())  # the key padding read from the fp16 mask
    with pytest.raises(UnsupportedError, match="the FFN runs in torch.float16; the sparse FFN controller"):
        sparsecc.compile(model, inputs, recipe=sparsecc.Recipe(ffn=sparsecc.SparseFFN(n=4, d_lowrank=2)),
                         progress=False)

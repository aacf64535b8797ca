"""Architectures whose layers token flow once refused or merged, and shapes a capture once lost (issue 24)."""

import warnings

import pytest
import torch

import sparsecc
from sparsecc import testing as T
from sparsecc.capture import normalize_inputs


def _flow(model, inputs, **config):
    return sparsecc.compile(model, inputs, recipe=sparsecc.Recipe(flow=sparsecc.TokenFlow(**config)), progress=False)


def _max_err_on_real_tokens(model, sm, inputs) -> float:
    args, kwargs = normalize_inputs(inputs)
    diff = (model(*args, **kwargs)[0] - sm(*args, **kwargs)[0]).abs()
    mask = kwargs.get("attention_mask")
    return (diff[mask.bool()] if mask is not None else diff).max().item()


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_opt_blocks_chained_through_its_ffn_reshape_flow_at_keep_1_equal_dense(impl):
    """OPT flattens the stream to [B*L, D] around its FFN: the blocks still follow each other, the segment
    ends at the reshape back to [B, L, D]."""
    model, inputs = T.opt(impl)
    sm = _flow(model, inputs, gate="content", keep=1.0)
    assert sorted(sm.kept_fractions()) == ["decoder.layers.0", "decoder.layers.1"]
    assert _max_err_on_real_tokens(model, sm, inputs) <= 1e-5


def test_albert_shared_layer_gets_one_segment_and_gate_per_application():
    model, inputs = T.albert()
    sm = _flow(model, inputs, keep=1.0)
    assert sorted(sm.kept_fractions()) == ["encoder.albert_layer_groups.0", "encoder.albert_layer_groups.0#1"]
    routes = [n for n in sm.graph_module.graph.nodes if n.target is torch.ops.sparsecc.flow_route.default]
    assert len(routes) == 2
    assert _max_err_on_real_tokens(model, sm, inputs) <= 1e-5
    half = _flow(model, inputs, keep=0.5, init=0.0, select="topk")  # each application keeps its own top half
    fractions = half.kept_fractions()
    assert len(fractions) == 2 and all(0 < f < 1 for f in fractions.values()), fractions


def test_whisper_encoder_keeps_a_dynamic_batch():
    """use_cache is passed only to models with a cache: in an encoder's **kwargs it entered the dynamic shapes
    spec and torch.export fell back to static shapes."""
    model, (features,) = T.whisper_encoder()
    sm = sparsecc.compile(model, (features,), progress=False)
    assert sm.dynamic and "use_cache" not in sm.call_defaults
    three = torch.randn(3, *features.shape[1:])
    assert (sm(three)[0] - model(three)[0]).abs().max().item() <= 1e-5


@pytest.mark.parametrize("recipe", [
    sparsecc.Recipe(attention=None, ffn=sparsecc.SparseFFN(n=4, d_lowrank=4, init="random")),
    sparsecc.Recipe(attention=None, ffn=None, flow=sparsecc.TokenFlow(keep=1.0)),
], ids=["sparse_ffn", "token_flow"])
def test_t5_encoder_under_sdpa_exports_to_onnx_with_its_attention_left_as_sdpa(recipe):
    """T5 views `transpose(sdpa(...))` after a .contiguous() the CPU flash kernel made a no-op: re-capture and
    the exporter's own decomposition pick kernels with other strides. Views of SDPA outputs become reshapes
    (canonicalization) and the export copies before them."""
    model, inputs = T.t5_encoder("sdpa")
    eager = sparsecc.compile(model, inputs, recipe=recipe, progress=False)
    assert any(p.name == "sdpa_views_to_reshapes" and p.changes for p in eager.report().passes)
    ort = sparsecc.compile(model, inputs, recipe=recipe, plans=eager.plans, backend="onnxruntime", progress=False)
    assert (ort(**inputs)[0] - eager(**inputs)[0]).abs().max().item() <= 1e-5


def _fixed(density: float, block: int = 8) -> sparsecc.Recipe:
    return sparsecc.Recipe(attention=sparsecc.Fixed(pattern="local", block=block, density=density), ffn=None)


@pytest.mark.parametrize("factory", [T.bloom, T.deberta_v2], ids=["bloom_alibi", "deberta_v2_relative"])
def test_attention_with_a_score_bias_on_folded_heads_is_found(factory):
    """BLOOM (ALiBi through baddbmm) and DeBERTa-v2 (content + relative-position terms) compute scores on
    [B*H, L, S] and unfold the heads before the mask: both become SDPA with the bias as its additive mask.
    The identity rewrite equals dense; block-sparse attention applies the bias on its kept blocks."""
    model, inputs = factory()
    args, kwargs = normalize_inputs(inputs)
    report = sparsecc.inspect(model, inputs, check=True)
    assert len(report.attention) == 2 and not report.unmatched
    sm = sparsecc.compile(model, inputs, progress=False)
    ops = [n for n in sm.graph_module.graph.nodes if n.target is torch.ops.sparsecc.attention.default]
    assert len(ops) == 2 and all(n.args[3] is not None for n in ops)  # the bias travels as the mask
    assert (sm(*args, **kwargs)[0] - model(*args, **kwargs)[0]).abs().max().item() <= 1e-5
    full = sparsecc.compile(model, inputs, recipe=_fixed(0.75 if report.attention[0].causal else 1.0), progress=False)
    assert all("score bias" in r.sparse["score_bias"] for r in full.report().attention)
    assert (full(*args, **kwargs)[0] - model(*args, **kwargs)[0]).abs().max().item() <= 1e-5  # every tile kept
    half = sparsecc.compile(model, inputs, recipe=_fixed(0.5, block=4), progress=False)
    assert max(T.check_block_sparse_calls(half, inputs)) < 1.0  # masked dense attention + the bias, per call


def test_relative_position_terms_train_through_block_sparse_attention():
    """DeBERTa's relative terms are computed from its projections and position embeddings: with every tile
    kept, the compiled model's gradients (through the op's score-bias gradient) equal the dense model's."""
    model, inputs = T.deberta_v2()
    args, kwargs = normalize_inputs(inputs)
    sm = sparsecc.compile(model, inputs, recipe=_fixed(1.0, block=4), progress=False)
    assert sm(*args, **kwargs)[0].pow(2).mean().backward() is None
    model(*args, **kwargs)[0].pow(2).mean().backward()
    dense = dict(model.named_parameters())
    compiled = dict(sm.graph_module.named_parameters())
    for name in ("encoder.rel_embeddings.weight", "encoder.layer.0.attention.self.key_proj.weight"):
        assert compiled[name].grad is not None
        assert (compiled[name].grad - dense[name].grad).abs().max().item() <= 1e-5, name


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_a_sliding_window_is_a_block_layout_of_its_own(impl):
    """Mistral's mask keeps 24 keys per query: the window is read from the mask, the layout keeps only the
    tiles that meet it (hand-computed: blocks of 8, row I keeps I-3 .. I), the mask is the op's bias,
    and with every such tile kept the model equals dense; ONNX Runtime runs it."""
    model, inputs = T.mistral(impl, sliding_window=24, seq=64)
    assert [r.window for r in sparsecc.inspect(model, inputs).attention] == [24, 24]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        sm = sparsecc.compile(model, inputs, recipe=_fixed(9 / 16), progress=False)
    assert any("sliding window of 24 keys" in str(w.message) for w in caught)
    for layout in sm.layouts.values():  # planned at 64 tokens, served up to the model's maximum positions
        rows, cols = torch.arange(layout.shape[0]).unsqueeze(1), torch.arange(layout.shape[1]).unsqueeze(0)
        assert layout.shape[0] > 8 and layout.meta["window"] == 24
        assert torch.equal(layout.mask, (cols <= rows) & (cols >= rows - 3))
    assert all(r.sparse["score_bias"] == "a sliding window of 24 keys" for r in sm.report().attention)
    assert _max_err_on_real_tokens(model, sm, inputs) <= 1e-5
    assert max(T.check_block_sparse_calls(sm, inputs)) < 0.5
    if impl == "sdpa":
        ort = sparsecc.compile(model, inputs, recipe=_fixed(9 / 16), plans=sm.plans, backend="onnxruntime",
                               check=False, progress=False)
        assert _max_err_on_real_tokens(sm, ort, inputs) <= 1e-5


def test_a_window_longer_than_the_example_still_holds_at_longer_calls():
    """Compiled at 16 tokens, Mistral's window of 24 cannot show in the mask; the config declares it, so the
    mask stays the op's score bias (never reduced to key padding) and the layout meets the window. Called at
    64 tokens, each attention call receives the window (-inf at keys j <= i - 24) and equals masked dense
    attention under its layout plus that bias."""
    model, short = T.mistral("sdpa", sliding_window=24, seq=16)
    _, long = T.mistral("sdpa", sliding_window=24, seq=64)
    assert [r.window for r in sparsecc.inspect(model, short).attention] == [24, 24]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sm = sparsecc.compile(model, short, recipe=_fixed(0.75), progress=False)
    assert all(layout.meta["window"] == 24 for layout in sm.layouts.values())
    calls = T.op_calls(sm, long, torch.ops.sparsecc.block_sparse_attention.default)
    outside = torch.arange(64)[None] <= torch.arange(64)[:, None] - 24
    assert len(calls) == 2 and all(bool(args[9][..., outside].isneginf().all()) for args, _ in calls)
    assert len(T.check_block_sparse_calls(sm, long)) == 2


def test_pruned_logits_zero_refuses_a_window_with_the_reason():
    model, inputs = T.mistral("sdpa", sliding_window=24, seq=64)
    with pytest.raises(sparsecc.errors.UnsupportedError, match="sliding window of 24 keys.*pruned_logits='-inf'"):
        sparsecc.compile(model, inputs, recipe=sparsecc.Recipe(attention=sparsecc.Spion(block=8, pruned_logits="zero"),
                                                               ffn=None), calibration=[inputs], progress=False)


def test_bloom_token_flow_at_keep_1_equals_dense():
    model, inputs = T.bloom()
    sm = _flow(model, inputs, gate="content", keep=1.0)
    assert sorted(sm.kept_fractions()) == ["h.0", "h.1"]
    assert _max_err_on_real_tokens(model, sm, inputs) <= 1e-5


def test_deberta_token_flow_names_its_query_by_key_tensor_not_the_capture():
    """DeBERTa-v2's relative terms are [B*H, L, L]: the capture is dynamic, so the refusal says the tensor has
    two token dims, not to capture with dynamic shapes."""
    model, inputs = T.deberta_v2()
    with pytest.raises(sparsecc.errors.UnsupportedError, match="has 2 token dims") as err:
        _flow(model, inputs, keep=1.0)
    assert "capture with dynamic shapes" not in str(err.value)

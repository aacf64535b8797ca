"""Architectures whose layers token flow once refused or merged, and shapes a capture once lost (issue 24)."""

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


@pytest.mark.parametrize("factory", [T.bloom, T.deberta_v2], ids=["bloom_alibi", "deberta_v2_relative"])
def test_attention_with_a_score_bias_on_folded_heads_is_found(factory):
    """BLOOM (ALiBi through baddbmm) and DeBERTa-v2 (content + relative-position terms) compute scores on
    [B*H, L, S] and unfold the heads before the mask: both become SDPA with the bias as its additive mask.
    The identity rewrite equals dense; block-sparse attention refuses them, naming the bias."""
    model, inputs = factory()
    args, kwargs = normalize_inputs(inputs)
    report = sparsecc.inspect(model, inputs, check=True)
    assert len(report.attention) == 2 and not report.unmatched
    sm = sparsecc.compile(model, inputs, progress=False)
    ops = [n for n in sm.graph_module.graph.nodes if n.target is torch.ops.sparsecc.attention.default]
    assert len(ops) == 2 and all(n.args[3] is not None for n in ops)  # the bias travels as the mask
    assert (sm(*args, **kwargs)[0] - model(*args, **kwargs)[0]).abs().max().item() <= 1e-5
    with pytest.raises(sparsecc.errors.UnsupportedError, match="adds a score bias"):
        sparsecc.compile(model, inputs, recipe=sparsecc.Recipe(attention=sparsecc.Fixed(pattern="local", block=4,
                                                                                        density=0.5)), progress=False)


def test_bloom_token_flow_at_keep_1_equals_dense():
    model, inputs = T.bloom()
    sm = _flow(model, inputs, gate="content", keep=1.0)
    assert sorted(sm.kept_fractions()) == ["h.0", "h.1"]
    assert _max_err_on_real_tokens(model, sm, inputs) <= 1e-5

"""Capture -> canonicalize -> regions -> identity rewrite on real architectures.

Each case states the regions a person reading the model's code would count, with
their attributes, and checks the identity-compiled model against the original:
outputs within 1e-5 and the same gradient for every parameter.
"""

import copy

import pytest
import torch
from torch.utils import _pytree as pytree

import sparsecc
from sparsecc import testing as T
from sparsecc.capture import normalize_inputs


def _float_leaves(out):
    return [t for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor) and t.is_floating_point()]


def _run(model, inputs):
    args, kwargs = normalize_inputs(inputs)
    return model(*args, **kwargs)


# name -> (factory, expected attention facts per region, expected ffn facts per region)
CASES = {
    "bert_eager": (lambda: T.bert("eager"),
                   [dict(heads=4, kv_heads=4, head_dim=8, causal=False, cross=False, rotary=False, mask_kind="additive",
                         norm="post", path="encoder.layer.{i}.attention.self")] * 2,
                   [dict(activation="gelu", gated=False, d_model=32, d_ff=64, norm="post", path="encoder.layer.{i}")] * 2),
    "bert_sdpa": (lambda: T.bert("sdpa"),
                  [dict(heads=4, head_dim=8, causal=False, mask_kind="bool", norm="post")] * 2,
                  [dict(activation="gelu", d_ff=64, norm="post")] * 2),
    "gpt2": (T.gpt2,
             [dict(heads=4, kv_heads=4, head_dim=8, causal=True, causal_source="mask", fused_qkv=True, norm="pre",
                   path="h.{i}.attn")] * 2,
             [dict(activation="gelu_tanh", gated=False, d_ff=128, norm="pre", path="h.{i}.mlp")] * 2),
    "llama": (T.llama,
              [dict(heads=4, kv_heads=2, head_dim=8, causal=True, rotary=True, norm="pre",
                    path="layers.{i}.self_attn")] * 2,
              [dict(activation="silu", gated=True, d_ff=64, norm="pre", path="layers.{i}.mlp")] * 2),
    "llama_sdpa": (lambda: T.llama("sdpa"),
                   [dict(heads=4, kv_heads=2, causal=True, rotary=True)] * 2,
                   [dict(activation="silu", gated=True)] * 2),
    "t5_eager": (lambda: T.t5("eager"),
                 [dict(cross=False, causal=False, mask_kind="additive", norm="pre")] * 2
                 + [dict(cross=False, causal=True), dict(cross=True, causal=False)] * 2,
                 [dict(activation="relu", gated=False, d_ff=64, norm="pre")] * 4),
    "t5_sdpa": (lambda: T.t5("sdpa"),
                [dict(cross=False, causal=False)] * 2 + [dict(cross=False, causal=True), dict(cross=True)] * 2,
                [dict(activation="relu")] * 4),
    "vit": (T.vit,
            [dict(heads=4, head_dim=8, causal=False, norm="pre")] * 2,
            [dict(activation="gelu", d_ff=64, norm="pre")] * 2),
    "torch_post_ln": (lambda: T.torch_encoder(norm_first=False),
                      [dict(heads=4, head_dim=8, fused_qkv=True, mask_kind="none", norm="post",
                            path="layers.{i}.self_attn")] * 2,
                      [dict(activation="relu", d_ff=64, norm="post", path="layers.{i}")] * 2),
    "torch_pre_ln": (lambda: T.torch_encoder(norm_first=True),
                     [dict(heads=4, fused_qkv=True, norm="pre")] * 2,
                     [dict(activation="relu", norm="pre")] * 2),
    "hand_written": (T.hand_written,
                     [dict(heads=4, head_dim=8, causal=True, causal_source="mask", mask_kind="bool", fused_qkv=True,
                           norm="pre", name="attention.0")],
                     [dict(activation="gelu", d_ff=128, norm="pre", name="ffn.0")]),
}


def _check_facts(region, facts, index):
    for key, want in facts.items():
        if key == "norm":
            got = region.residual.norm_position if region.residual else None
        else:
            got = getattr(region, key)
        if isinstance(want, str):
            want = want.replace("{i}", str(index))
        assert got == want, f"{region.name}.{key}: got {got!r}, expected {want!r}"


@pytest.mark.parametrize("case", sorted(CASES))
def test_regions_and_identity_rewrite(case):
    factory, attn_facts, ffn_facts = CASES[case]
    model, inputs = factory()
    before = copy.deepcopy(model.state_dict())

    sm = sparsecc.compile(model, inputs)
    report = sm.report()
    attention, ffn = report.attention, report.ffn
    assert len(attention) == len(attn_facts), report.table()
    assert len(ffn) == len(ffn_facts), report.table()
    layers_seen = {}
    for region, facts in zip(attention, attn_facts):
        i = layers_seen.setdefault((region.stack, region.kind, region.layer), region.layer)
        _check_facts(region, facts, i)
        assert region.flops > 0 and region.q_proj is not None and region.o_proj is not None
    for region, facts in zip(ffn, ffn_facts):
        _check_facts(region, facts, region.layer)
        assert region.flops > 0

    # every region became a sparsecc op
    ops = [n.target for n in sm.graph_module.graph.nodes if n.op == "call_function"]
    assert ops.count(torch.ops.sparsecc.attention.default) == len(attn_facts)
    assert ops.count(torch.ops.sparsecc.ffn.default) == len(ffn_facts)
    assert torch.ops.aten.scaled_dot_product_attention.default not in ops
    assert torch.ops.aten.softmax.int not in ops

    # same outputs
    ref = _float_leaves(_run(model, inputs))
    got = _float_leaves(_run(sm, inputs))
    assert len(ref) == len(got)
    for r, g in zip(ref, got):
        assert (r - g).abs().max().item() <= 1e-5

    # same gradients for every parameter (and every parameter gets one)
    sum(t.float().pow(2).mean() for t in _float_leaves(_run(model, inputs))).backward()
    sum(t.float().pow(2).mean() for t in _float_leaves(_run(sm, inputs))).backward()
    # tied weights appear under one name in each model, not always the same one: match by any alias
    got_params = dict(sm.graph_module.named_parameters(remove_duplicate=False))
    aliases = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        aliases.setdefault(id(p), (p, []))[1].append(name)
    used = [(p, names) for p, names in aliases.values() if p.grad is not None]
    assert used, "the reference model produced no gradients"
    for p, names in used:
        mine = [got_params[n] for n in names if n in got_params]
        assert mine, f"{names} missing from the compiled model"
        g = mine[0].grad
        assert g is not None, f"no gradient reached {names}"
        scale = p.grad.abs().max().item() + 1e-6
        assert (g - p.grad).abs().max().item() <= 1e-5 * max(1.0, scale), names

    # the user's model was not changed by compiling or by training the compiled model
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_minilm_real_weights():
    from transformers import AutoModel
    model = AutoModel.from_pretrained(T.minilm_dir()).eval()
    ids = torch.randint(1000, 2000, (2, 24))
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    sm = sparsecc.compile(model, inputs)
    report = sm.report()
    assert [r.kind for r in report.regions] == ["attention", "ffn"] * 6
    for i, r in enumerate(report.attention):
        assert (r.layer, r.heads, r.head_dim, r.d_model, r.causal) == (i, 12, 32, 384, False)
        assert r.path == f"encoder.layer.{i}.attention.self"
    assert all((r.d_ff, r.activation) == (1536, "gelu") for r in report.ffn)
    ref = model(**inputs).last_hidden_state
    got = sm(**inputs).last_hidden_state
    assert (ref - got).abs().max().item() <= 1e-5


def test_dynamic_sequence_length():
    model, inputs = T.bert("sdpa")
    sm = sparsecc.compile(model, inputs)
    ids = torch.randint(0, T.VOCAB, (3, 11))
    mask = torch.ones_like(ids)
    ref = model(input_ids=ids, attention_mask=mask).last_hidden_state
    got = sm(input_ids=ids, attention_mask=mask).last_hidden_state
    assert got.shape == (3, 11, 32)
    assert (ref - got).abs().max().item() <= 1e-5


def test_model_without_attention_gives_empty_report():
    model, inputs = T.no_attention()
    report = sparsecc.inspect(model, inputs)
    assert report.regions == [] and report.attention == [] and report.ffn == []
    sm = sparsecc.compile(model, inputs)
    assert torch.allclose(sm(*inputs), model(*inputs))


class DataDependent(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(4, 4)

    def forward(self, x):
        if x.sum() > 0:  # Python control flow on a tensor value: torch.export cannot capture it
            return self.lin(x)
        return -self.lin(x)


def test_uncapturable_model_gives_sparsecc_error_and_is_untouched():
    model = DataDependent().train()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(sparsecc.errors.CaptureError) as info:
        sparsecc.compile(model, (torch.randn(2, 4),))
    message = str(info.value)
    assert "DataDependent" in message  # names the model
    assert "test_foundation.py" in message and "x.sum() > 0" in message  # names the failing construct
    assert "draft_export" in message and "dynamic=False" in message  # says what to try
    assert model.training  # mode restored
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])


def test_inspect_report_fields_and_json():
    import json
    model, inputs = T.gpt2()
    report = sparsecc.inspect(model, inputs)
    data = json.loads(json.dumps(report.to_dict()))
    assert [r["kind"] for r in data["regions"]] == ["attention", "ffn", "attention", "ffn"]
    for r in report.regions:
        assert {"kind", "layer", "path", "flops"} <= set(r.to_dict())
    # attention FLOPs by hand: B=2, L=16, d=32, 4 heads x 8: qkv 2*32*32*3*2*16 + out 2*32*32*32 + core 2*2*4*16*16*16
    attn = report.attention[0]
    assert attn.flops == 2 * 32 * 96 * 32 + 2 * 32 * 32 * 32 + 2 * 2 * 4 * 16 * 16 * (8 + 8)
    assert report.ffn[0].flops == 2 * 32 * 32 * 128 * 2

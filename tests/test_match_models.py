"""Attention and FFN regions, and the misses `inspect --explain` lists, on tiny Hugging Face models
(eager and sdpa attention where the model has both); sparse FFN on every layer of the models whose
FFNs were not found before (CLIP's quick_gelu, BLOOM's hand-written GELU, Falcon's matmul linears).
"""

import json

import pytest
import torch

import sparsecc
from sparsecc import testing as T
from sparsecc.cli import main
from sparsecc.errors import SparseccError


# ------------------------------------------------------------------ tiny Hugging Face models
# name -> (factory, attention regions, FFN regions, FFN activation, misses by rule). No misses also means no
# false FFN candidates: Llama's RMSNorm is elementwise ops between one layer's down projection and the next q/k/v.
MODELS = {
    "bert_eager": (lambda: T.bert("eager"), 2, 2, "gelu", {}),
    "bert_sdpa": (lambda: T.bert("sdpa"), 2, 2, "gelu", {}),
    "gpt2_eager": (lambda: T.gpt2("eager"), 2, 2, "gelu_tanh", {}),
    "gpt2_sdpa": (lambda: T.gpt2("sdpa"), 2, 2, "gelu_tanh", {}),
    "llama_eager": (lambda: T.llama("eager"), 2, 2, "silu", {}),
    "llama_sdpa": (lambda: T.llama("sdpa"), 2, 2, "silu", {}),
    "t5_eager": (lambda: T.t5("eager"), 6, 4, "relu", {}),
    "t5_sdpa": (lambda: T.t5("sdpa"), 6, 4, "relu", {}),
    "vit_eager": (lambda: T.vit("eager"), 2, 2, "gelu", {}),
    "vit_sdpa": (lambda: T.vit("sdpa"), 2, 2, "gelu", {}),
    "clip_text_eager": (lambda: T.clip_text("eager"), 2, 2, "quick_gelu", {}),
    "clip_text_sdpa": (lambda: T.clip_text("sdpa"), 2, 2, "quick_gelu", {}),
    "clip_vision_eager": (lambda: T.clip_vision("eager"), 2, 2, "quick_gelu", {}),
    "clip_vision_sdpa": (lambda: T.clip_vision("sdpa"), 2, 2, "quick_gelu", {}),
    "bloom": (T.bloom, 2, 2, "gelu_tanh", {}),  # ALiBi: baddbmm scores on [B*H, L, S], heads unfolded
    "deberta_v2": (T.deberta_v2, 2, 2, "gelu", {}),  # content + relative-position terms on [B*H, L, S]
    "bert_returning_attentions": (T.bert_returning_attentions, 0, 2, "gelu", {"eager_attention.probs": 2}),
    "falcon_eager": (lambda: T.falcon("eager"), 2, 2, "gelu", {}),
    "falcon_sdpa": (lambda: T.falcon("sdpa"), 2, 2, "gelu", {}),
    "falcon_bias": (lambda: T.falcon("sdpa", bias=True), 2, 2, "gelu", {}),
}


@pytest.mark.parametrize("name", sorted(MODELS))
def test_regions_and_misses_on_hf_models(name):
    factory, n_attention, n_ffn, activation, misses = MODELS[name]
    report = sparsecc.inspect(*factory(), check=True)  # numerics after every canonicalization within 1e-5
    assert len(report.attention) == n_attention, report.explain()
    assert len(report.ffn) == n_ffn, report.explain()
    assert [r.activation for r in report.ffn] == [activation] * n_ffn
    assert all(r.q_proj is not None and r.o_proj is not None for r in report.attention)
    rules: dict = {}
    for m in report.unmatched:
        rules[m.rule] = rules.get(m.rule, 0) + 1
    assert rules == misses, report.explain()


@pytest.mark.parametrize("name", ["clip_text_eager", "clip_text_sdpa", "clip_vision_eager", "clip_vision_sdpa",
                                  "bloom", "falcon_eager", "falcon_sdpa"])
def test_sparse_ffn_rewrites_every_layer(name):
    factory, _, layers, activation, _ = MODELS[name]
    model, inputs = factory()
    # every layer rewritten, with the activation found by structure; each op call equals the masked dense FFN
    # (that the activation is the model's own is checked by the identity rewrite at 1e-5 in test_match.py)
    recipe = sparsecc.Recipe(ffn=sparsecc.SparseFFN(n=2, d_lowrank=2, init="random"))
    sm = sparsecc.compile(model, inputs, recipe=recipe)
    changes = {p.name: p.changes for p in sm.report().passes}["ffn_sparse_ffn"]
    assert len(changes) == layers
    ops = [n for n in sm.graph_module.graph.nodes if n.target is torch.ops.sparsecc.sparse_ffn.default]
    assert [n.args[9] for n in ops] == [activation] * layers
    assert T.check_sparse_ffn_calls(sm, inputs) == layers


def test_spion_without_attention_points_to_explain():
    model, inputs = T.bert_returning_attentions()
    recipe = sparsecc.Recipe(attention=sparsecc.Spion(block=8), ffn=None)
    with pytest.raises(SparseccError, match=r"no attention region was found \(see `sparsecc inspect --explain`"):
        sparsecc.compile(model, inputs, recipe=recipe, calibration=[inputs])


# ------------------------------------------------------------------ report and CLI
def test_report_explain_text_and_json(capsys):
    name = "bert_returning_attentions"
    assert main(["inspect", f"sparsecc.testing:{name}", "--explain"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == f"{name}: 0 attention and 2 FFN regions; 2 candidate(s) not matched"
    assert out[1].split() == ["kind", "layer", "module", "path", "node", "rule", "reason"]
    assert out[3].split()[:5] == ["attention", "0", "encoder.layer.0.attention.self", "softmax",
                                  "eager_attention.probs"]
    assert "are used by 2 nodes" in out[3] and out[4].split()[:2] == ["attention", "1"]
    assert main(["inspect", f"sparsecc.testing:{name}", "--explain", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert (data["model"], data["attention"], data["ffn"]) == (name, 0, 2)
    assert [(u["kind"], u["rule"], u["node"], u["path"], u["layer"]) for u in data["unmatched"]] == [
        ("attention", "eager_attention.probs", "softmax", "encoder.layer.0.attention.self", 0),
        ("attention", "eager_attention.probs", "softmax_1", "encoder.layer.1.attention.self", 1)]
    report = sparsecc.inspect(*T.bert_returning_attentions())
    assert report.explain().splitlines()[0] == out[0].replace(name, "BertModel")
    assert "not rewritten" in report.table() and str(report.unmatched[0]) in report.table()
    assert report.to_dict()["unmatched"] == data["unmatched"]
    report.unmatched.append("a pass's free-text note")  # what rewrite passes add today
    assert report.to_dict()["unmatched"][-1] == {"kind": "note", "rule": "", "reason": "a pass's free-text note",
                                                 "node": None, "path": None, "layer": None}
    assert "a pass's free-text note" in report.explain()


def test_explain_refuses_onnx_files(tmp_path, capsys):
    path = tmp_path / "m.onnx"
    path.write_bytes(b"")
    assert main(["inspect", str(path), "--explain"]) == 2
    assert "--explain asks the graph matchers" in capsys.readouterr().err

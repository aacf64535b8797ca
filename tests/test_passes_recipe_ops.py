"""The pass manager's guarantees, recipe validation, and the identity ops' contracts."""

import json

import pytest
import torch

import sparsecc
from sparsecc import testing as T
from sparsecc.capture import capture
from sparsecc.errors import PassError, RecipeError
from sparsecc.passes.manager import Pass, PassContext, PassManager


def _captured():
    model, inputs = T.hand_written()
    return capture(model, inputs)


def test_pass_manager_names_the_pass_that_changes_numerics(tmp_path):
    captured = _captured()

    def break_gelu(gm, ctx):  # swap GELU for ReLU: a "canonicalization" that changes the function
        for n in gm.graph.nodes:
            if n.target is torch.ops.aten.gelu.default:
                n.target = torch.ops.aten.relu.default
                return [f"gelu->relu:{n.name}"]
        return []

    manager = PassManager([Pass("noop", lambda gm, ctx: []), Pass("break_gelu", break_gelu)],
                          dump_dir=str(tmp_path))
    with pytest.raises(PassError, match=r"pass 'break_gelu' changed the model's outputs by .* gelu->relu"):
        manager.run(captured.gm, PassContext(captured))
    assert (tmp_path / "00_noop.txt").exists()  # dumped after the pass that succeeded


def test_pass_manager_names_the_pass_that_breaks_the_graph():
    captured = _captured()

    def dangling(gm, ctx):  # uses a node before it is defined: lint must catch it
        calls = [n for n in gm.graph.nodes if n.op == "call_function"]
        with gm.graph.inserting_before(calls[0]):
            gm.graph.call_function(torch.ops.aten.relu.default, (calls[-1],))
        return ["use-before-def"]

    with pytest.raises(PassError, match="pass 'dangling' broke the graph: .*used before it has been defined"):
        PassManager([Pass("dangling", dangling)]).run(captured.gm, PassContext(captured))


def test_pass_results_time_and_count():
    sm = sparsecc.compile(*T.hand_written())
    names = [p.name for p in sm.report().passes]
    assert names == ["drop_noops", "sdpa_views_to_reshapes", "addmm_to_linear", "matmul_to_linear", "gelu_to_aten",
                     "eager_attention_to_sdpa", "repeat_kv_to_gqa", "attention_identity", "ffn_identity"]
    by_name = {p.name: p for p in sm.report().passes}
    assert len(by_name["attention_identity"].changes) == 1 and len(by_name["ffn_identity"].changes) == 1
    assert by_name["attention_identity"].max_abs_error <= 1e-5
    assert all(p.seconds > 0 for p in sm.report().passes if p.changes)  # a pass that changed something took time
    assert set(sm.report().stage_seconds) == {"capture", "canonicalize", "find_regions", "calibrate", "rewrite"}


def test_dense_recipe_keeps_aten_ops():
    sm = sparsecc.compile(*T.hand_written(), recipe=sparsecc.Recipe.dense())
    targets = {n.target for n in sm.graph_module.graph.nodes}
    assert torch.ops.aten.scaled_dot_product_attention.default in targets
    assert torch.ops.sparsecc.attention.default not in targets


def test_recipe_round_trip_and_files(tmp_path):
    r = sparsecc.Recipe()
    assert sparsecc.Recipe.from_dict(r.to_dict()) == r
    (tmp_path / "r.toml").write_text('[attention]\nkind = "identity"\n')
    assert sparsecc.Recipe.load(str(tmp_path / "r.toml")) == sparsecc.Recipe(attention=sparsecc.Identity(), ffn=None)
    (tmp_path / "r.json").write_text(json.dumps({"ffn": "identity"}))
    assert sparsecc.Recipe.load(str(tmp_path / "r.json")) == sparsecc.Recipe(attention=None, ffn=sparsecc.Identity())


@pytest.mark.parametrize("data,message", [
    ({"atention": {"kind": "identity"}}, r"unknown field\(s\) \['atention'\]; allowed: \['attention', 'ffn', 'flow'\]"),
    ({"attention": {"kind": "spoin"}}, r"recipe.attention.kind: 'spoin' is not a method for attention; allowed: "),
    ({"attention": {"kind": "identity", "block": 64}}, r"recipe.attention.block: unknown field for 'identity'"),
    ({"ffn": 3}, r"recipe.ffn: expected a table with a 'kind' field"),
])
def test_recipe_errors_name_the_field(data, message):
    with pytest.raises(RecipeError, match=message):
        sparsecc.Recipe.from_dict(data)


def test_bad_backend_and_recipe_type():
    model, inputs = T.hand_written()
    with pytest.raises(sparsecc.errors.UnsupportedError, match="backend .tensorrt. is not known; the available backends are"):
        sparsecc.compile(model, inputs, backend="tensorrt")
    with pytest.raises(RecipeError, match="recipe must be a sparsecc.Recipe"):
        sparsecc.compile(model, inputs, recipe={"attention": "identity"})


@pytest.mark.parametrize("case", ["mask", "causal_gqa", "bool_mask"])
def test_attention_op_contract(case):
    torch.manual_seed(0)
    q = torch.randn(2, 4, 5, 8, dtype=torch.float64, requires_grad=True)
    kv_heads = 2 if case == "causal_gqa" else 4
    k = torch.randn(2, kv_heads, 7, 8, dtype=torch.float64, requires_grad=True)
    v = torch.randn(2, kv_heads, 7, 8, dtype=torch.float64, requires_grad=True)
    mask = {"mask": torch.randn(2, 1, 5, 7, dtype=torch.float64, requires_grad=True), "causal_gqa": None,
            "bool_mask": torch.rand(5, 7) > 0.3}[case]
    args = (q, k, v, mask, 0.0, case == "causal_gqa", 0.3, case == "causal_gqa")
    torch.library.opcheck(torch.ops.sparsecc.attention.default, args)
    assert torch.autograd.gradcheck(lambda *a: torch.ops.sparsecc.attention(*a), args)
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=args[5], scale=0.3,
                                                           enable_gqa=args[7])
    assert (torch.ops.sparsecc.attention(*args) - ref).abs().max() < 1e-12


def test_attention_op_rejects_dropout():
    q = torch.randn(1, 1, 4, 8)
    with pytest.raises(sparsecc.errors.UnsupportedError, match="dropout_p=0.1"):
        torch.ops.sparsecc.attention(q, q, q, None, 0.1)


@pytest.mark.parametrize("activation,gated", [("gelu", False), ("relu", False), ("silu", True), ("gelu_tanh", True)])
def test_ffn_op_contract(activation, gated):
    W = lambda *s: torch.randn(*s, dtype=torch.float64, requires_grad=True)  # noqa: E731
    x = W(3, 5, 8)
    args = (x, W(16, 8), W(16), W(8, 16), W(8), activation, W(16, 8) if gated else None, W(16) if gated else None)
    torch.library.opcheck(torch.ops.sparsecc.ffn.default, args)
    assert torch.autograd.gradcheck(lambda *a: torch.ops.sparsecc.ffn(*a), args)


def test_compiled_model_exports_and_compiles():
    """The rewritten graph is still a graph torch.export and torch.compile accept (ops are opaque)."""
    model, inputs = T.hand_written()
    sm = sparsecc.compile(model, inputs)
    ep = torch.export.export(sm.graph_module, inputs)
    targets = {n.target for n in ep.graph.nodes}
    assert torch.ops.sparsecc.attention.default in targets and torch.ops.sparsecc.ffn.default in targets
    compiled = sparsecc.compile(model, inputs, backend="inductor")
    assert torch.allclose(compiled(*inputs), model(*inputs), atol=1e-5)

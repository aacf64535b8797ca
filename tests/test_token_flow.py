"""SparseFlow through sparsecc.compile: open gates = dense, closed gates = identity, kept counts,
padding, causal routing, the inference graph against independent references, report, training."""

import math
import warnings

import pytest
import torch

import sparsecc
from sparsecc import testing as T
from sparsecc.capture import normalize_inputs
from sparsecc.errors import RecipeError, UnsupportedError
from sparsecc.ops.token_flow.helpers import scatter_packed

warnings.filterwarnings("ignore")


def _run(model, inputs):
    args, kwargs = normalize_inputs(inputs)
    return model(*args, **kwargs)


def _hidden(out):
    return out[0] if isinstance(out, (tuple, list)) else out.last_hidden_state


def _compile(factory, **flow):
    model, inputs = factory()
    sm = sparsecc.compile(model, inputs, recipe=sparsecc.Recipe(flow=sparsecc.TokenFlow(**flow)), check=False)
    return model, inputs, sm


_SHARED: dict = {}


def _shared(factory, **flow):
    """One compiled model per (factory, recipe) for the tests that only run it (capture is the slow part)."""
    key = (factory.__name__, tuple(sorted(flow.items())))
    if key not in _SHARED:
        _SHARED[key] = _compile(factory, **flow)
    return _SHARED[key]


def _decisions(sm, inputs):
    """The keep decisions [B, L] of every segment on `inputs` (read off the gate module)."""
    seen = {}

    def hook(module, args, kwargs, out):
        seen[kwargs["segment"]] = out.clone()
    handle = sm.flow_gates.register_forward_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad():
            _run(sm, inputs)
    finally:
        handle.remove()
    return seen


def _hard_reference(sm, inputs):
    """The training graph with hard gates (dense compute, h + g * (Block(h) - h), keys masked by log g)."""
    sm.train()
    sm.flow_gates.eval()  # hard 0/1 gates with a straight-through gradient, no noise
    try:
        with torch.no_grad():
            return _run(sm, inputs)
    finally:
        sm.eval()


@pytest.mark.parametrize("factory,flow", [
    (T.bert, {}),  # released gates, post-LN encoder with a padded example
    (T.vit, {}),  # static token count (patches)
    (T.gpt2, {"gate": "content"}),  # causal decoder, fused QKV
    (T.llama, {"gate": "content", "kv": "kept"}),  # rotary, GQA, RMSNorm
])
def test_open_gates_equal_dense(factory, flow):
    model, inputs, sm = _shared(factory, **flow)
    assert any(n.target in (torch.ops.sparsecc.flow_scatter.default, scatter_packed) for n in sm.graph_module.graph.nodes)
    with torch.no_grad():
        ref, out = _hidden(_run(model, inputs)), _hidden(_run(sm, inputs))
    mask = inputs.get("attention_mask") if isinstance(inputs, dict) else None
    valid = torch.ones(ref.shape[:2], dtype=torch.bool) if mask is None else mask.bool()
    assert (ref - out).abs()[valid].max() <= 1e-5  # padding rows never flow: compared where valid
    assert all(f == 1.0 for f in sm.kept_fractions().values())


def test_closed_gates_make_every_block_the_identity():
    model, inputs, sm = _compile(T.bert, init=-3.0, pin_first=False)
    with torch.no_grad():
        embedded = model.embeddings(input_ids=inputs["input_ids"])
        out = _hidden(_run(sm, inputs))
    assert torch.equal(out, embedded)
    assert all(f == 0.0 for f in sm.kept_fractions().values())


def _bert_reference(model, inputs, keep: dict):
    """Hugging Face BERT layer by layer, x <- where(keep[i], layer(x), x); a layer without decisions runs whole."""
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    with torch.no_grad():
        x = model.embeddings(input_ids=ids)
        additive = (1.0 - mask[:, None, None, :].float()) * torch.finfo(torch.float32).min
        for i, layer in enumerate(model.encoder.layer):
            y = layer(x, attention_mask=additive)
            y = y[0] if isinstance(y, tuple) else y
            x = torch.where(keep[i].unsqueeze(-1), y, x) if i in keep else y
    return x


def test_bert_matches_layer_by_layer_reference():
    """Independent reference built from the Hugging Face layers: x <- where(keep, layer(x), x)."""
    model, inputs, sm = _shared(T.bert, gate="random", select="topk")
    keep = _decisions(sm, inputs)
    mask = inputs["attention_mask"]
    x = _bert_reference(model, inputs, keep)
    with torch.no_grad():
        out = _hidden(_run(sm, inputs))
    valid = mask.bool()
    assert (out - x).abs()[valid].max() <= 1e-5
    # kept counts: ceil(0.5 * non-padding tokens) per example, padding never kept, CLS always
    n_valid = mask.sum(1)
    for k in keep.values():
        assert k.sum(1).tolist() == [math.ceil(0.5 * int(n)) for n in n_valid]
        assert not (k & ~valid).any() and k[:, 0].all()


def _unbacked_sizes(gm) -> set:
    """The data-dependent (unbacked) size symbols in a graph's shapes (flow_route's K is one)."""
    found = set()
    for n in gm.graph.nodes:
        val = n.meta.get("val")
        for t in val if isinstance(val, (tuple, list)) else [val]:
            if isinstance(t, torch.Tensor):
                found |= {str(s) for d in t.shape if isinstance(d, torch.SymInt)
                          for s in d.node.expr.free_symbols if str(s).startswith("u")}
    return found


def test_capacity_routes_a_static_count_per_example():
    """select="capacity": each example keeps its C = ceil(keep * L) best tokens (fewer if it has fewer valid);
    the graph's sizes are expressions of the input's (no data-dependent size), the result the reference's."""
    model, inputs, sm = _shared(T.bert, gate="random", select="capacity", keep=0.3)
    keep = _decisions(sm, inputs)
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    for k in keep.values():  # 16 and 13 valid tokens; C = ceil(0.3 * 16) = 5; CLS pinned
        assert k.sum(1).tolist() == [5, 5] and k[:, 0].all() and not (k & ~mask.bool()).any()
    x = _bert_reference(model, inputs, keep)
    with torch.no_grad():
        out = _hidden(_run(sm, inputs))
    assert (out - x).abs()[mask.bool()].max() <= 1e-5
    assert (out - _hidden(_hard_reference(sm, inputs))).abs()[mask.bool()].max() <= 1e-5
    assert _unbacked_sizes(sm.graph_module) == set()
    _, _, topk = _shared(T.bert, gate="random", select="topk")
    assert _unbacked_sizes(topk.graph_module)  # flow_route: K is the batch's most kept
    short = {"input_ids": ids[:, :4], "attention_mask": torch.tensor([[1, 1, 1, 1], [1, 0, 0, 0]])}
    for k in _decisions(sm, short).values():  # C = ceil(0.3 * 4) = 2; the second example has 1 token
        assert k.sum(1).tolist() == [2, 1]
    # the report: 3 of 5 valid tokens kept, but the blocks compute 2 x C = 4 rows of the 8: FLOPs count the 4
    fractions = sm.measure_flow([short])
    seg = sm.flow.segments[0]
    ffn = next(r for r in sm.report().regions if r.kind == "ffn" and r.sparse["segment"] == seg.name)
    assert fractions[seg.name] == pytest.approx(3 / 5)
    assert ffn.sparse["flops"] == round(seg.flops_parts[ffn.name]["ffn"] * 4 / 8)


@pytest.mark.parametrize("factory,flow", [
    (T.bert, {"gate": "random", "kv": "kept"}),
    (T.gpt2, {"gate": "random"}),
    (T.llama, {"gate": "random", "kv": "kept"}),
    (T.t5, {"gate": "random"}),  # encoder-decoder: both stacks, cross attention
    (T.vit, {"gate": "random", "select": "topk", "keep": 0.3}),
])
def test_gathered_graph_matches_hard_dense_graph(factory, flow):
    """The gather/scatter graph (work on kept tokens) equals the dense graph with hard 0/1 gates."""
    model, inputs, sm = _shared(factory, **flow)
    with torch.no_grad():
        out = _run(sm, inputs)
    ref = _hard_reference(sm, inputs)
    assert (_hidden(out) - _hidden(ref)).abs().max() <= 1e-5
    fractions = list(sm.kept_fractions().values())
    assert all(0.0 < f < 1.0 for f in fractions)
    with torch.no_grad():
        dense = _hidden(_run(model, inputs))
    assert (dense - _hidden(out)).abs().max() > 1e-3  # skipping tokens does change the function


@pytest.mark.parametrize("factory,flow", [
    (T.bert, {}),  # post-LN encoder, a padded example
    (T.gpt2, {}),  # Conv1D: the tail flattens the tokens around its matmuls
    (T.llama, {"kv": "kept"}),
    (T.t5, {}),  # encoder-decoder, cross attention
])
def test_packed_tail_equals_padded_layout(factory, flow):
    """layout="packed" runs each block's row-wise tail on the batch's kept tokens [1, N, D]: same outputs as
    the padded [B, K, D] layout, on a batch whose examples keep different numbers of tokens."""
    model, inputs, packed = _compile(factory, gate="content", **flow)
    _, _, padded = _compile(factory, gate="content", layout="padded", **flow)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for scorer in packed.flow_gates.scorers:  # content scores that keep about half, differently per example
            scorer.weight.copy_(torch.randn(scorer.weight.shape, generator=g))
            scorer.bias.zero_()
    padded.load_state_dict(packed.state_dict())
    n_segments = len(packed.kept_fractions())
    assert sum(n.target is scatter_packed for n in packed.graph_module.graph.nodes) == n_segments
    assert not any(n.target is scatter_packed for n in padded.graph_module.graph.nodes)
    counts = [k.sum(1) for k in _decisions(packed, inputs).values()]
    assert any(len(set(c.tolist())) > 1 for c in counts)  # examples keep different numbers: padding slots
    with torch.no_grad():
        a, b = _hidden(_run(packed, inputs)), _hidden(_run(padded, inputs))
        dense = _hidden(_run(model, inputs))
    assert (a - b).abs().max() <= 1e-5
    assert (a - dense).abs().max() > 1e-3  # tokens were skipped


def test_other_sequence_length_and_batch():
    model, inputs, sm = _shared(T.bert, gate="random", select="topk")
    ids = torch.randint(0, T.VOCAB, (3, 11))
    mask = torch.ones_like(ids)
    mask[0, -4:] = 0
    new = {"input_ids": ids, "attention_mask": mask}
    keep = _decisions(sm, new)
    assert [int(n) for n in keep[0].sum(1)] == [4, 6, 6]  # ceil(0.5 * 7), ceil(0.5 * 11)
    with torch.no_grad():
        out = _hidden(_run(sm, new))
    assert (out - _hidden(_hard_reference(sm, new))).abs().max() <= 1e-5


def test_causal_routing_ignores_later_tokens():
    model, inputs, sm = _shared(T.gpt2, gate="content")
    saved = {k: v.clone() for k, v in sm.flow_gates.state_dict().items()}
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # random scorers: decisions that vary per token
        for lin in sm.flow_gates.scorers:
            lin.weight.copy_(torch.randn(lin.weight.shape, generator=g))
            lin.bias.zero_()
    try:
        _check_causal(sm, inputs)
    finally:
        sm.flow_gates.load_state_dict(saved)


def _check_causal(sm, inputs):
    ids = inputs[0]
    changed = ids.clone()
    changed[:, 9:] = (changed[:, 9:] + 7) % T.VOCAB  # new tokens from position 9 on
    a, b = _decisions(sm, (ids,)), _decisions(sm, (changed,))
    for seg in a:
        assert torch.equal(a[seg][:, :9], b[seg][:, :9])
        assert 0 < int(a[seg].sum()) < a[seg].numel()
    assert any(not torch.equal(a[s][:, 9:], b[s][:, 9:]) for s in a)  # later decisions did change
    with torch.no_grad():
        out_a, out_b = _hidden(_run(sm, (ids,))), _hidden(_run(sm, (changed,)))
    assert (out_a[:, :9] - out_b[:, :9]).abs().max() <= 1e-6


@pytest.mark.parametrize("flow,message", [
    ({"gate": "released"}, "gate='released' routes each token by a router over the mean"),
    ({"gate": "content", "select": "topk"}, "select='topk' keeps the best tokens of the whole sequence"),
    ({"gate": "content", "select": "capacity"}, "select='capacity' keeps the best tokens of the whole sequence"),
])
def test_causal_models_refuse_routing_that_sees_the_future(flow, message):
    model, inputs = T.hand_written()  # causal (masked_fill mask), quick to capture
    with pytest.raises(UnsupportedError, match=message):
        sparsecc.compile(model, inputs, recipe=sparsecc.Recipe(flow=sparsecc.TokenFlow(**flow)))


def test_unsupported_layouts_and_recipes_are_named():
    model, inputs = T.torch_encoder()
    with pytest.raises(UnsupportedError, match="sequence-first attention"):
        sparsecc.compile(model, inputs, recipe=sparsecc.Recipe(flow=sparsecc.TokenFlow()))
    model, inputs = T.hand_written()
    with pytest.raises(UnsupportedError, match="recipe.flow with recipe.attention=Spion"):
        sparsecc.compile(model, inputs, recipe=sparsecc.Recipe(attention=sparsecc.Spion(), flow=sparsecc.TokenFlow()))


def test_report_kept_fraction_and_flops():
    model, inputs, sm = _shared(T.bert, gate="random", select="topk")
    regions = sm.report().regions
    kept = (8 + 7) / (16 + 13)  # ceil(0.5 * 16) + ceil(0.5 * 13) of the non-padding tokens
    frac_all = 15 / 32  # of all token rows (FLOPs count every row of the dense model)
    for r in regions:
        assert r.sparse["method"] == "token_flow" and r.sparse["kept_fraction"] == pytest.approx(kept)
        if r.kind == "ffn":
            assert r.sparse["flops"] == round(r.flops * frac_all)
        else:
            parts = 2 * 32 * 32 * 32  # one 32x32 projection over 32 token rows
            core = r.flops - 4 * parts
            assert r.sparse["flops"] == round((2 * parts + core) * frac_all + 2 * parts)
    text = str(sm.report())
    assert "token_flow" in text and f"{kept:.3f}" in text
    assert "kept fraction per layer" in text and "per-token tail packed in 2 of 2 layers" in text
    assert all(r.sparse["layout"] == "packed" for r in regions)


def test_recipe_file_and_validation(tmp_path):
    (tmp_path / "r.toml").write_text('[flow]\nkind = "token_flow"\ngate = "content"\nkeep = 0.25\nkv = "kept"\n')
    recipe = sparsecc.Recipe.load(str(tmp_path / "r.toml"))
    assert recipe.flow == sparsecc.TokenFlow(gate="content", keep=0.25, kv="kept")
    assert recipe.attention is None and recipe.ffn is None
    assert sparsecc.Recipe.from_dict(sparsecc.Recipe(flow=sparsecc.TokenFlow()).to_dict()).flow == sparsecc.TokenFlow()
    with pytest.raises(RecipeError, match=r"recipe.flow.scope: got 'block'; allowed: \['layer', 'ffn'\]"):
        sparsecc.TokenFlow(scope="block")
    with pytest.raises(RecipeError, match="recipe.flow.keep: got 1.5; expected 0 < keep <= 1"):
        sparsecc.TokenFlow(keep=1.5)
    with pytest.raises(RecipeError, match=r"recipe.flow.kv: got 'none'"):
        sparsecc.Recipe.from_dict({"flow": {"kind": "token_flow", "kv": "none"}})
    (tmp_path / "p.toml").write_text('[flow]\nkind = "token_flow"\nkeep = [0.25, 0.75]\n')  # one per block
    assert sparsecc.Recipe.load(str(tmp_path / "p.toml")).flow == sparsecc.TokenFlow(keep=(0.25, 0.75))
    with pytest.raises(RecipeError, match=r"recipe.flow.keep: got 'half' \(str\)"):
        sparsecc.Recipe.from_dict({"flow": {"kind": "token_flow", "keep": "half"}})
    assert sparsecc.TokenFlow().layout == "packed"
    with pytest.raises(RecipeError, match=r"recipe.flow.layout: got 'ragged'; allowed: \['packed', 'padded'\]"):
        sparsecc.Recipe.from_dict({"flow": {"kind": "token_flow", "layout": "ragged"}})


def test_training_graph_soft_gates_and_user_model_untouched():
    model, inputs, sm = _shared(T.bert)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    sm.train()
    out = _hidden(_run(sm, inputs))
    gates, valid = sm.flow_gates.last_gates[0]
    assert gates.requires_grad and not ((gates > 0) & (gates < 1)).logical_not().all()  # soft values
    assert (gates[~valid] == 0).all() and (gates[:, 0] == 1).all()  # padding never, CLS always
    out.pow(2).mean().backward()
    assert sm.flow_gates.table.grad is not None and sm.flow_gates.table.grad.abs().sum() > 0
    assert all(p.grad is not None for p in sm.flow_gates.routers.parameters())
    params = dict(sm.graph_module.named_parameters())
    assert params["encoder.layer.0.attention.self.query.weight"].grad.abs().sum() > 0
    # both graphs share the weights; the user's model is unchanged
    assert sm.train_graph_module.get_parameter("encoder.layer.0.attention.self.query.weight") is \
        params["encoder.layer.0.attention.self.query.weight"]
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])
    assert not any(k.startswith("train_graph_module") for k in sm.state_dict())  # one copy of the weights
    sm.zero_grad(set_to_none=True)
    sm.eval()


def test_fit_reaches_the_target_kept_fraction():
    from sparsecc.train.flow import fit_flow
    model, inputs = T.bert()
    sm = sparsecc.compile(model, inputs, recipe=sparsecc.Recipe(flow=sparsecc.TokenFlow(keep=0.5)))
    g = torch.Generator().manual_seed(1)
    batches = [{"input_ids": torch.randint(0, T.VOCAB, (4, 16), generator=g),
                "attention_mask": torch.ones(4, 16, dtype=torch.long)} for _ in range(3)]
    result = fit_flow(sm, batches, teacher=model, steps=30, gate_lr=0.3, progress=False)
    assert result.history[0]["kept"] > 0.9 and abs(result.history[-1]["kept"] - 0.5) < 0.15
    assert result.history[-5]["penalty"] < result.history[0]["penalty"] / 10
    assert "penalty" in result.history[0] and "penalty" not in result.history[-1]  # final phase: no penalty
    assert not sm.training
    fractions = sm.measure_flow(batches)  # hard decisions after the threshold calibration
    assert all(abs(f - 0.5) <= 1 / 16 for f in fractions.values())


def test_hard_final_phase_trains_on_the_calibrated_hard_decisions():
    from sparsecc.train.flow import fit_flow
    model, inputs = T.bert()
    sm = sparsecc.compile(model, inputs, recipe=sparsecc.Recipe(flow=sparsecc.TokenFlow(keep=0.5)))
    g = torch.Generator().manual_seed(1)
    batches = [{"input_ids": torch.randint(0, T.VOCAB, (4, 16), generator=g),
                "attention_mask": torch.ones(4, 16, dtype=torch.long)} for _ in range(3)]
    result = fit_flow(sm, batches, teacher=model, steps=30, gate_lr=0.3, progress=False, hard_final=True,
                      final_fraction=0.1)
    final = [r for r in result.history if "penalty" not in r]
    assert len(final) == 3  # the last 10 % of 30 steps
    # frozen hard gates: every layer keeps a whole number of the 64 tokens, the calibrated half
    whole = 64 * sm.flow_gates.n_segments  # "kept" is the mean over segments of count / 64
    for r in final:
        assert abs(r["kept"] * whole - round(r["kept"] * whole)) < 1e-3 and abs(r["kept"] - 0.5) <= 1 / 16
    assert not any(abs(r["kept"] * whole - round(r["kept"] * whole)) < 1e-3 for r in result.history[1:5])  # soft
    assert not sm.flow_gates.hard_training and not sm.training
    fractions = sm.measure_flow(batches)
    assert all(abs(f - 0.5) <= 1 / 16 for f in fractions.values())


def test_onnx_runtime_matches_pytorch():
    """backend='onnxruntime' runs the exported flowed graph (route / gather / scatter in standard ONNX ops)."""
    model, inputs = T.llama()
    recipe = sparsecc.Recipe(flow=sparsecc.TokenFlow(gate="random", kv="kept"))
    sm = sparsecc.compile(model, inputs, recipe=recipe, backend="onnxruntime")
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for ids in (inputs[0], torch.randint(0, T.VOCAB, (3, 12), generator=g)):  # and another batch / length
            ref = _hidden(sm.graph_module(ids, **sm._call_defaults))
            got = _hidden(sm(ids))
            assert (ref - got).abs().max() <= 1e-4
            assert (ref - _hidden(_run(model, (ids,)))).abs().max() > 1e-3  # tokens were skipped


def test_minilm_benchmark_layer_distillation_term(load_tool):
    """--layer-weight: W x the mean token-state cosine loss to the dense states entering each flowed layer but the
    first. With every gate closed the stream entering every layer is the embedding output, so the term is known."""
    from sparsecc.train.losses import hidden_distill
    tool = load_tool("bench_flow_minilm")
    model, inputs, sm = _compile(T.bert, init=-3.0, pin_first=False)
    sm.eval()

    def base(s, t, b):
        return torch.zeros(())
    teacher, distill, handle = tool.layer_distillation(sm, model, base, 2.0)
    with torch.no_grad():
        t = teacher(**inputs)
        s = sm(**inputs)
        got = distill(s, t, inputs)
    handle.remove()
    mask = inputs["attention_mask"]
    expect = 2.0 * hidden_distill(t.hidden_states[0], t.hidden_states[1], mask)  # 2 layers: only layer 1 counts
    assert len(t.hidden_states) == 3 and float(expect) > 0
    assert abs(float(got) - float(expect)) <= 1e-4 * float(expect)


def test_minilm_benchmark_never_trains_on_its_held_out_text(load_tool):
    # tools/bench_flow_minilm.py: the held-out paragraphs are the same with either training corpus,
    # none of them is trained on, and the stdlib corpus adds only new paragraphs.
    from sparsecc.data import stdlib_corpus, stdlib_paragraphs
    tool = load_tool("bench_flow_minilm")
    curated, corpus = stdlib_paragraphs(), stdlib_corpus()
    assert corpus[:len(curated)] == curated and len(set(corpus)) == len(corpus)
    assert len(corpus) > 1.5 * len(curated)
    train_c, held_c = tool.split_paragraphs(corpus="curated")
    train_s, held_s = tool.split_paragraphs(corpus="stdlib")
    assert held_c == held_s and len(held_c) == len(curated) - int(0.7 * len(curated))
    assert sorted(train_c + held_c) == sorted(curated)
    assert not set(held_s) & set(train_s)
    assert len(train_s) == len(train_c) + len(corpus) - len(curated)


def test_keep_threshold_hand_computed():
    from sparsecc.methods.token_flow.gates import keep_threshold
    logits = torch.tensor([[9.0, 1.0, 4.0, 3.0, 2.0, -5.0]])
    valid = torch.tensor([[True, True, True, True, True, False]])
    pinned = torch.tensor([[True, False, False, False, False, False]])
    # keep 0.6 of 5 valid = 3 tokens: the pinned one and 2 of the 4 free (4.0, 3.0): threshold the median 2.5
    assert keep_threshold(logits, valid, pinned, 0.6) == pytest.approx(2.5)
    assert keep_threshold(logits, valid, pinned, 1.0) == pytest.approx(0.0)  # every free token: min - 1
    assert keep_threshold(logits, valid, pinned, 0.2) == pytest.approx(5.0)  # the pinned one is enough: max + 1
    assert keep_threshold(logits, valid & ~valid, pinned, 0.5) == 0.0  # nothing valid


@pytest.mark.parametrize("rate", [0.0, 1.0])
def test_hard_training_tracks_the_kept_fraction(rate):
    # content scores move while the weights train: track_keep moves the threshold back to the target
    from sparsecc.methods.token_flow.gates import FlowGates
    gates = FlowGates(sparsecc.TokenFlow(gate="content", keep=0.25), [(0, 4)], [4]).train()
    with torch.no_grad():
        gates.scorers[0].weight.copy_(torch.tensor([[1.0, 0.0, 0.0, 0.0]]))
        gates.scorers[0].bias.zero_()
    gates.hard_training, gates.track_keep = True, rate
    h = torch.zeros(2, 8, 4)
    h[:, :, 0] = torch.arange(8.0)  # scores 0..7: every free token but position 0 has logit > 0
    first = gates(h, h, None, segment=0, mode="gate")
    assert float(first.sum()) == 2 * 8  # 1..7 kept (> 0) and the pinned position 0
    second = gates(h, h, None, segment=0, mode="gate")
    if rate == 0.0:
        assert float(gates.shift[0]) == 0.0 and torch.equal(first, second)
    else:  # 2 of 8 per row: the pinned CLS and 1/7 of the free scores 1..7 (quantile 6/7: 6 + 1/7)
        assert float(gates.shift[0]) == pytest.approx(-(6 + 1 / 7))
        assert second[:, 0].all() and second[:, 7].all() and float(second.sum()) == 4


def test_keep_per_layer():
    # one target per flowed block: the penalty, the calibration and top-k capacities use each block's own
    from sparsecc.methods.token_flow.fit import sparsity_penalty
    from sparsecc.train.flow import fit_flow
    model, inputs = T.bert()
    n = len(sparsecc.compile(model, inputs, recipe=sparsecc.Recipe(flow=sparsecc.TokenFlow())).flow_gates.keep_targets)
    keeps = [0.25 + 0.5 * i / max(n - 1, 1) for i in range(n)]  # 0.25 ... 0.75
    g = torch.Generator().manual_seed(1)
    batches = [{"input_ids": torch.randint(0, T.VOCAB, (4, 16), generator=g),
                "attention_mask": torch.ones(4, 16, dtype=torch.long)} for _ in range(3)]
    for select in ("threshold", "topk"):
        recipe = sparsecc.Recipe(flow=sparsecc.TokenFlow(gate="content", keep=list(keeps), select=select))
        sm = sparsecc.compile(model, inputs, recipe=recipe)
        assert sm.flow_gates.keep_targets == keeps and sm.flow_gates.keep_target == pytest.approx(0.5)
        fit_flow(sm, batches, teacher=model, steps=4, progress=False)
        fractions = sm.measure_flow(batches)
        for (seg, got), want in zip(sorted(fractions.items()), keeps):
            # threshold: calibrated on these batches (ties aside); top-k: ceil(keep * 16) of 16 per example
            assert got == pytest.approx(math.ceil(want * 16) / 16 if select == "topk" else want, abs=1 / 16)
    gates = sparsecc.compile(model, inputs, recipe=sparsecc.Recipe(flow=sparsecc.TokenFlow(keep=keeps))).flow_gates
    gates.last_gates = {s: (torch.full((2, 8), k), None) for s, k in enumerate(keeps)}
    assert float(sparsity_penalty(gates)) == pytest.approx(0.0, abs=1e-12)  # every block at its own target
    gates.last_gates = {s: (torch.full((2, 8), 0.5), None) for s in range(n)}
    want = sum((s + 1) * (0.5 - k) ** 2 for s, k in enumerate(keeps))  # one stack: layer numbers 1..n
    assert float(sparsity_penalty(gates, form="pooled")) == pytest.approx(want)
    assert float(sparsity_penalty(gates)) == pytest.approx(want / sum(range(1, n + 1)))  # released: weighted mean
    assert float(sparsity_penalty(gates, target=0.5)) == pytest.approx(0.0, abs=1e-12)
    with pytest.raises(RecipeError, match=rf"recipe.flow.keep: got {n + 1} kept fractions .* has {n} flowed blocks"):
        sparsecc.compile(model, inputs, recipe=sparsecc.Recipe(flow=sparsecc.TokenFlow(keep=[0.5] * (n + 1))))
    with pytest.raises(RecipeError, match=r"recipe.flow.keep: got \(0.5, 1.5\)"):
        sparsecc.TokenFlow(keep=[0.5, 1.5])


def test_skipped_blocks_run_dense_and_gate_plans_rebuild_trained_gates():
    # skip: the listed blocks have no gate and no route; the others as in the reference x <- where(keep, layer(x), x)
    from sparsecc.train.flow import fit_flow
    model, inputs = T.bert()
    g = torch.Generator().manual_seed(2)
    batches = [{"input_ids": torch.randint(0, T.VOCAB, (4, 16), generator=g),
                "attention_mask": torch.ones(4, 16, dtype=torch.long)} for _ in range(3)]
    flow = sparsecc.TokenFlow(gate="content", keep=0.5)
    sm = sparsecc.compile(model, inputs, recipe=sparsecc.Recipe(flow=flow), check=False)
    fit_flow(sm, batches, teacher=model, steps=3, train_model=False, progress=False)
    n = len(sm.flow.segments)
    assert n >= 2
    routes = [nd for nd in sm.graph_module.graph.nodes if nd.target == torch.ops.sparsecc.flow_route.default]
    skipped = sparsecc.compile(model, inputs, recipe=sparsecc.Recipe(flow=flow.__class__(
        gate="content", keep=0.5, skip=(0,))), plans=sm.gate_plans(), check=False)
    assert len([nd for nd in skipped.graph_module.graph.nodes
                if nd.target == torch.ops.sparsecc.flow_route.default]) == len(routes) - 1
    assert list(skipped.kept_fractions()) == [seg.name for seg in sm.flow.segments[1:]]
    # the trained gates (scorers and calibrated thresholds) came with the plans: same decisions, same outputs
    for name, t in sm.flow_gates.state_dict().items():
        assert torch.equal(skipped.flow_gates.state_dict()[name], t), name
    keep = _decisions(skipped, inputs)
    assert sorted(keep) == list(range(1, n))
    x = _bert_reference(model, inputs, keep)  # block 0 (no decisions) runs on every token
    with torch.no_grad():
        out = _hidden(_run(skipped, inputs))
    assert (out - x).abs()[inputs["attention_mask"].bool()].max() <= 1e-5
    # the same plans with every block flowed reproduce sm exactly
    again = sparsecc.compile(model, inputs, recipe=sparsecc.Recipe(flow=flow), plans=sm.gate_plans(), check=False)
    with torch.no_grad():
        assert torch.equal(_hidden(_run(again, inputs)), _hidden(_run(sm, inputs)))
    with pytest.raises(RecipeError, match=rf"recipe.flow.skip: blocks \[{n}\] do not exist; this model has {n}"):
        sparsecc.compile(model, inputs, recipe=sparsecc.Recipe(flow=sparsecc.TokenFlow(skip=(n,))), check=False)
    with pytest.raises(RecipeError, match="recipe.flow.skip: got"):
        sparsecc.TokenFlow(skip=(-1,))
    released = sparsecc.compile(model, inputs, recipe=sparsecc.Recipe(flow=sparsecc.TokenFlow()), check=False)
    with pytest.raises(RecipeError, match="gate tensor 'weight'"):
        sparsecc.compile(model, inputs, recipe=sparsecc.Recipe(flow=sparsecc.TokenFlow()), plans=sm.gate_plans(),
                         check=False)
    assert released.gate_plans()[next(iter(released.gate_plans()))].tensors["table"].shape[0] == 3


def test_onnx_runtime_runs_the_packed_layout_with_ort_fusions():
    """BERT with the packed tail on ORT: the session runs the fused graph (MultiHeadAttention,
    SkipLayerNormalization) and matches PyTorch. Packing the attention output by flattening it to
    [1, B * K, D] made onnxscript's MHA fusion swallow the flattening, and the fused graph failed in ORT."""
    import onnx
    model, inputs = T.bert()
    recipe = sparsecc.Recipe(flow=sparsecc.TokenFlow(gate="random", select="topk", keep=0.5))
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # the fallback to the unfused graph warns
        sm = sparsecc.compile(model, inputs, recipe=recipe, backend="onnxruntime", check=False, progress=False)
    ops = {n.op_type for n in onnx.load(sm._runner.path).graph.node}
    assert {"MultiHeadAttention", "SkipLayerNormalization", "GatherND"} <= ops
    assert sm.flow.packed  # the tails run packed
    with torch.no_grad():
        ref, got = _hidden(sm.graph_module(**inputs, **sm._call_defaults)), _hidden(sm(**inputs))
    assert (ref - got).abs()[inputs["attention_mask"].bool()].max() <= 1e-4

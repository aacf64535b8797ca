"""Token flow keeps every mask a layer has: a sliding window is not padding (issue: silent wrong result)."""

import pytest
import torch

import sparsecc
from sparsecc import testing as T
from sparsecc.capture import normalize_inputs
from sparsecc.ops.token_flow.helpers import single_token_route, valid_tokens


def test_valid_tokens_under_a_sliding_window_by_hand():
    # causal window of 2 over 4 tokens, the last one padding: the last real query sees only tokens 1 and 2,
    # yet token 0 is a real token (query 0 and 1 see it)
    keep = torch.tensor([[1, 0, 0, 0], [1, 1, 0, 0], [0, 1, 1, 0], [0, 0, 1, 0]], dtype=torch.bool)
    h = torch.zeros(1, 4, 8)
    assert valid_tokens(keep[None, None], h).tolist() == [[True, True, True, False]]
    additive = torch.zeros(1, 1, 4, 4).masked_fill(~keep, torch.finfo(torch.float32).min)
    assert valid_tokens(additive, h).tolist() == [[True, True, True, False]]
    bert_style = torch.tensor([[[[0.0, 0.0, torch.finfo(torch.float32).min]]]])  # [B, 1, 1, S] padding mask
    assert valid_tokens(bert_style, torch.zeros(1, 3, 8)).tolist() == [[True, True, False]]



def test_valid_tokens_over_a_kv_cache_by_hand():
    """Keys are cache slots, not the step's tokens: a token is real when its own query row sees a key. A
    left-padded prompt of 3 tokens (the first padding) written at slots 0-2 of a cache of 5."""
    keep = torch.tensor([[0, 0, 0, 0, 0], [0, 1, 0, 0, 0], [0, 1, 1, 0, 0]], dtype=torch.bool)
    h = torch.zeros(1, 3, 8)
    assert valid_tokens(keep[None, None], h, by_query=True).tolist() == [[False, True, True]]
    additive = torch.zeros(1, 1, 3, 5).masked_fill(~keep, torch.finfo(torch.float32).min)
    assert valid_tokens(additive, h, by_query=True).tolist() == [[False, True, True]]
    step = torch.tensor([[[[1, 1, 1, 1, 0]]], [[[0, 0, 1, 1, 0]]]], dtype=torch.bool)  # a decode step, batch 2
    assert valid_tokens(step, torch.zeros(2, 1, 8), by_query=True).tolist() == [[True], [True]]


def test_single_token_route_equals_flow_route():
    keep = torch.tensor([[True], [False], [True]])
    index, counts = single_token_route(keep)
    ref_index, ref_counts = torch.ops.sparsecc.flow_route(keep)
    assert torch.equal(index, ref_index) and torch.equal(counts, ref_counts) and index.shape == (3, 1)
    assert torch.equal(single_token_route(torch.zeros(2, 1, dtype=torch.bool))[1], torch.zeros(2, dtype=torch.long))


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_sliding_window_model_with_every_gate_open_equals_dense(impl):
    model, inputs = T.mistral(impl, sliding_window=24, seq=64)
    ref = model(**inputs).last_hidden_state
    for layout in ("packed", "padded"):
        sm = sparsecc.compile(model, inputs, recipe=sparsecc.Recipe(flow=sparsecc.TokenFlow(
            gate="content", keep=1.0, layout=layout)), progress=False)
        out = sm(**inputs).last_hidden_state
        valid = inputs["attention_mask"].bool()
        assert (out - ref)[valid].abs().max().item() <= 1e-5
        assert all(f == pytest.approx(1.0) for f in sm.kept_fractions().values())  # every real token flowed


@pytest.mark.parametrize("factory", [lambda: T.bert("sdpa"), lambda: T.gpt2("sdpa"), lambda: T.llama("sdpa")])
def test_onnxruntime_runs_token_flow_graphs_under_sdpa(factory):
    """Boolean sdpa masks are gathered too; ORT's CPU Where has no bool kernel (it failed to load the graph)."""
    model, inputs = factory()
    recipe = sparsecc.Recipe(flow=sparsecc.TokenFlow(gate="content", keep=0.5, init=0.0))
    eager = sparsecc.compile(model, inputs, recipe=recipe, progress=False)
    ort = sparsecc.compile(model, inputs, recipe=recipe, backend="onnxruntime", progress=False)
    assert ort.state_dict().keys() == eager.state_dict().keys()  # each tensor once (the runner is not a child)
    assert not any(k.startswith("_runner") for k in eager.state_dict())
    args, kwargs = normalize_inputs(inputs)
    got, want = ort(*args, **kwargs)[0], eager(*args, **kwargs)[0]
    assert (got - want).abs().max().item() <= 1e-4


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_parallel_attention_and_ffn_on_one_residual_flow_as_one_segment(impl):
    """Falcon: x + attention(ln(x)) + mlp(ln(x)). The layer is one segment from x to the shared add: at keep 1
    it equals dense; scope='ffn' cannot route the FFN alone and says why."""
    model, inputs = T.falcon(impl)
    ref = model(*inputs).last_hidden_state
    sm = sparsecc.compile(model, inputs, recipe=sparsecc.Recipe(flow=sparsecc.TokenFlow(gate="content", keep=1.0)),
                          progress=False)
    assert all(r.residual.parallel and r.sparse["method"] == "token_flow" for r in sm.report().regions)
    assert sorted(sm.kept_fractions()) == ["h.0", "h.1"]
    assert (sm(*inputs).last_hidden_state - ref).abs().max().item() <= 1e-5
    routes = [n for n in sm.graph_module.graph.nodes if n.target is torch.ops.sparsecc.flow_route.default]
    assert len(routes) == 2
    with pytest.raises(sparsecc.errors.UnsupportedError, match=r"add to one residual in parallel.*scope='layer'"):
        sparsecc.compile(model, inputs, recipe=sparsecc.Recipe(flow=sparsecc.TokenFlow(gate="content", scope="ffn")),
                         progress=False)

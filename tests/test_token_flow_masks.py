"""Token flow keeps every mask a layer has: a sliding window is not padding (issue: silent wrong result)."""

import pytest
import torch

import sparsecc
from sparsecc import testing as T
from sparsecc.ops.token_flow.helpers import valid_tokens


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

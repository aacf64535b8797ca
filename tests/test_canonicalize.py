"""Each canonicalization on a small module written the way real models write it.

The pass manager checks numerics after every pass (1e-5); these tests assert the
rewrite counts and the resulting graph facts.
"""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import sparsecc
from sparsecc.graph.fx_utils import SDPA

aten = torch.ops.aten


class Attn(nn.Module):
    """Multi-head attention with the scoring written in one of several styles."""

    def __init__(self, style: str, d: int = 32, heads: int = 4):
        super().__init__()
        self.style, self.h, self.d = style, heads, d
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))

    def forward(self, x, mask=None):
        b, n, _ = x.shape
        split = lambda t: t.view(b, n, self.h, -1).transpose(1, 2)  # noqa: E731
        q, k, v = split(self.q(x)), split(self.k(x)), split(self.v(x))
        dh = self.d // self.h
        s = self.style
        if s == "div":
            scores = q @ k.transpose(-2, -1) / math.sqrt(dh)
        elif s == "scale_q_first":
            scores = (q * dh ** -0.5) @ k.transpose(-2, -1)
        elif s == "scale_both":  # q and k each scaled by dh**-0.25
            scores = (q * dh ** -0.25) @ (k * dh ** -0.25).transpose(-2, -1)
        elif s == "bmm":  # (B*H, L, D) throughout, as BART/OPT eager attention
            q3, k3, v3 = (t.reshape(b * self.h, n, dh) for t in (q, k, v))
            p3 = (torch.bmm(q3, k3.transpose(1, 2)) * dh ** -0.5).softmax(-1)
            return self.o(torch.bmm(p3, v3).view(b, self.h, n, dh).transpose(1, 2).reshape(b, n, self.d))
        else:
            scores = torch.matmul(q, k.transpose(-1, -2)) * dh ** -0.5
        if s == "additive":
            scores = scores + mask
        elif s == "masked_fill_causal":
            causal = torch.ones(n, n, dtype=torch.bool, device=x.device).triu(1)
            scores = scores.masked_fill(causal, float("-inf"))
        elif s == "where_causal":
            keep = torch.ones(n, n, dtype=torch.bool, device=x.device).tril()
            scores = torch.where(keep, scores, torch.finfo(scores.dtype).min)
        elif s == "position_bias_no_scale":  # T5: no scaling at all, bias added
            scores = torch.matmul(q, k.transpose(-1, -2)) + mask
        probs = F.softmax(scores.float(), dim=-1).type_as(scores) if s == "fp32_softmax" else scores.softmax(-1)
        probs = F.dropout(probs, p=0.1, training=self.training)
        y = (probs @ v).transpose(1, 2).reshape(b, n, self.d)
        return self.o(y)


STYLES = ["mul", "div", "scale_q_first", "scale_both", "bmm", "additive", "masked_fill_causal", "where_causal",
          "position_bias_no_scale", "fp32_softmax"]


@pytest.mark.parametrize("style", STYLES)
def test_eager_attention_becomes_one_sdpa(style):
    model = Attn(style).eval()
    x = torch.randn(2, 8, 32)
    inputs = (x, torch.randn(2, 4, 8, 8)) if style in ("additive", "position_bias_no_scale") else (x,)
    report = sparsecc.inspect(model, inputs, check=True)  # numerics checked after every pass
    counts = {p.name: len(p.changes) for p in report.passes}
    assert counts["eager_attention_to_sdpa"] == 1
    assert report.graph.ops.get("aten.softmax.int", 0) == 0
    (region,) = report.attention
    assert (region.heads, region.head_dim) == (4, 8)
    expected_scale = 1.0 if style == "position_bias_no_scale" else 8 ** -0.5
    assert region.scale == pytest.approx(expected_scale, rel=1e-6)
    assert region.causal == (style in ("masked_fill_causal", "where_causal"))
    assert region.q_proj is not None and region.o_proj is not None
    sm = sparsecc.compile(model, inputs)
    assert torch.allclose(sm(*inputs), model(*inputs), atol=1e-5)


def test_attention_weights_used_elsewhere_are_left_alone_with_a_reason():
    class ReturnsWeights(Attn):
        def forward(self, x):
            b, n, _ = x.shape
            q = self.q(x).view(b, n, 4, 8).transpose(1, 2)
            k = self.k(x).view(b, n, 4, 8).transpose(1, 2)
            v = self.v(x).view(b, n, 4, 8).transpose(1, 2)
            p = (q @ k.transpose(-1, -2) * 8 ** -0.5).softmax(-1)
            return self.o((p @ v).transpose(1, 2).reshape(b, n, 32)), p

    report = sparsecc.inspect(ReturnsWeights("mul").eval(), (torch.randn(2, 8, 32),))
    assert report.attention == []
    (miss,) = report.unmatched
    assert (miss.kind, miss.rule, miss.node) == ("attention", "eager_attention.probs", "softmax")
    assert "used by 2 nodes" in miss.reason and "output" in miss.reason and "elsewhere" in miss.reason


class GeluMLP(nn.Module):
    def __init__(self, form: str):
        super().__init__()
        self.form = form
        self.up, self.down = nn.Linear(16, 64), nn.Linear(64, 16)

    def forward(self, x):
        h = self.up(x)
        if self.form == "tanh":  # GPT-2's NewGELUActivation
            h = 0.5 * h * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (h + 0.044715 * torch.pow(h, 3.0))))
        else:  # the erf form written out
            h = h * 0.5 * (1.0 + torch.erf(h / math.sqrt(2.0)))
        return self.down(h)


@pytest.mark.parametrize("form,activation", [("tanh", "gelu_tanh"), ("erf", "gelu")])
def test_written_out_gelu_becomes_aten_gelu_and_an_ffn(form, activation):
    model = GeluMLP(form).eval()
    report = sparsecc.inspect(model, (torch.randn(3, 5, 16),), check=True)
    assert {p.name: len(p.changes) for p in report.passes}["gelu_to_aten"] == 1
    (ffn,) = report.ffn
    assert (ffn.activation, ffn.d_model, ffn.d_ff, ffn.gated) == (activation, 16, 64, False)


class Conv1D(nn.Module):
    """GPT-2's Conv1D: weight stored (in, out), computed with addmm."""

    def __init__(self, nin, nout):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(nin, nout) * 0.1)
        self.bias = nn.Parameter(torch.randn(nout) * 0.1)

    def forward(self, x):
        return torch.addmm(self.bias, x.view(-1, x.shape[-1]), self.weight).view(*x.shape[:-1], -1)


def test_addmm_becomes_linear_and_the_mlp_is_found():
    model = nn.Sequential(Conv1D(16, 64), nn.ReLU(), Conv1D(64, 16)).eval()
    report = sparsecc.inspect(model, (torch.randn(2, 5, 16),), check=True)
    assert {p.name: len(p.changes) for p in report.passes}["addmm_to_linear"] == 2
    (ffn,) = report.ffn
    assert (ffn.activation, ffn.d_ff) == ("relu", 64)
    assert ffn.weights == {"up": "0.weight", "down": "2.weight"}


def test_repeat_kv_becomes_enable_gqa():
    class GQA(nn.Module):
        def __init__(self):
            super().__init__()
            self.q, self.k, self.v, self.o = nn.Linear(32, 32), nn.Linear(32, 16), nn.Linear(32, 16), nn.Linear(32, 32)

        def forward(self, x):
            b, n, _ = x.shape
            q = self.q(x).view(b, n, 4, 8).transpose(1, 2)
            k = self.k(x).view(b, n, 2, 8).transpose(1, 2)
            v = self.v(x).view(b, n, 2, 8).transpose(1, 2)
            rep = lambda t: t[:, :, None, :, :].expand(b, 2, 2, n, 8).reshape(b, 4, n, 8)  # noqa: E731
            y = F.scaled_dot_product_attention(q, rep(k), rep(v), is_causal=True)
            return self.o(y.transpose(1, 2).reshape(b, n, 32))

    report = sparsecc.inspect(GQA().eval(), (torch.randn(2, 8, 32),), check=True)
    assert {p.name: len(p.changes) for p in report.passes}["repeat_kv_to_gqa"] == 1
    (r,) = report.attention
    assert (r.heads, r.kv_heads, r.causal, r.causal_source) == (4, 2, True, "is_causal")
    assert r.sdpa.kwargs["enable_gqa"] is True and r.sdpa.target is SDPA

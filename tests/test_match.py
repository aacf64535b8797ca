"""Matchers that explain: every rule's reason on a graph that misses it, and FFNs found by their
structure (any elementwise activation). Counts on Hugging Face models: test_match_models.py.

Graph rules are checked on small modules written the way models write them (captured with
torch.export) or on graphs built node by node; `inspect` runs the pass manager's numeric
check (1e-5) after every canonicalization.
"""

import re

import pytest
import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode

import sparsecc
from sparsecc.graph import canonicalize as C
from sparsecc.graph.fx_utils import SDPA, attention_args, new_call
from sparsecc.graph.match import Match, Miss, nearest
from sparsecc.ops.sparse_ffn import sparse_ffn_reference

aten = torch.ops.aten


# ------------------------------------------------------------------ the result type
def test_match_is_falsy_on_failure_and_nearest_keeps_the_furthest():
    ok, near, far = Match.ok(3), Match.fail("r.a", "first check"), Match.fail("r.b", "third check", progress=3)
    assert ok and ok.value == 3 and not near and not far
    assert nearest(near, far) is far and nearest(far, near) is far and nearest(near, ok) is ok
    assert str(far) == "r.b: third check" and near.after(5).progress == 6
    miss = Miss("ffn", "ffn.activation", "activation is not one of ...", "linear_3", "h.1.mlp", 1)
    assert str(miss) == "ffn linear_3 at h.1.mlp (layer 1): activation is not one of ... [ffn.activation]"
    assert miss.to_dict() == {"kind": "ffn", "rule": "ffn.activation", "reason": "activation is not one of ...",
                              "node": "linear_3", "path": "h.1.mlp", "layer": 1}


# ------------------------------------------------------------------ hand-built graphs
class _Builder:
    """An FX graph written node by node, with fake values (as an exported graph has)."""

    def __init__(self):
        self.mode, self.graph = FakeTensorMode(), fx.Graph()

    def input(self, name, *size, dtype=torch.float32):
        node = self.graph.placeholder(name)
        node.meta["val"] = self.mode.from_tensor(torch.zeros(size, dtype=dtype))
        return node

    def __call__(self, target, *args, **kwargs):
        return new_call(self.graph, target, args, kwargs)


def test_noop_rules_say_why_a_node_stays():
    b = _Builder()
    x = b.input("x", 2, 8)
    dropout = b(aten.dropout.default, x, 0.1, True)
    cast = b(aten._to_copy.default, x, dtype=torch.float16)
    part = b(aten.slice.Tensor, x, 1, 2, 2**63 - 1)
    copy = b(aten.clone.default, x)
    b(aten.view.default, copy, [16])
    assert "training mode with p=0.1" in C.match_noop(dropout).reason
    assert "casts torch.float32 on cpu to torch.float16" in C.match_noop(cast).reason
    assert "[2:9223372036854775807:1] does not take everything" in C.match_noop(part).reason
    assert "feeds view" in C.match_noop(copy).reason
    assert C.match_noop(b(aten.dropout.default, x, 0.1, False)).value is x  # eval dropout: x itself
    assert C.match_noop(x).progress == 0


def test_linear_rules_say_why_a_product_is_not_a_linear():
    b = _Builder()
    x, w, bias = b.input("x", 4, 8), b.input("w", 8, 16), b.input("b", 16)
    m = C.match_addmm(b(aten.addmm.default, bias, x, w, beta=2))
    assert not m and m.rule == "addmm_to_linear" and "beta=2" in m.reason
    m = C.match_matmul_linear(b(aten.matmul.default, x, w))
    assert not m and m.rule == "matmul_to_linear" and "w (placeholder) is computed in the graph" in m.reason
    w_out_in = b.input("w2", 16, 8)
    m = C.match_matmul_linear(b(aten.matmul.default, x, b(aten.t.default, w_out_in)))  # x @ W^T: W is read
    assert m.reason.startswith("the matrix w2 (placeholder) is computed") and m.nodes[1] is w_out_in


def test_gelu_rule_says_which_part_is_not_a_gelu():
    b = _Builder()
    x = b.input("x", 4, 8)
    t = b(aten.tanh.default, b(aten.mul.Tensor, x, 0.7))  # tanh(0.7 x): not the GELU polynomial
    m = C.match_gelu(t)
    assert not m and "is not sqrt(2/pi) * (x + 0.044715 * x**3)" in m.reason
    e = b(aten.erf.default, b(aten.div.Tensor, x, 2.0))
    assert "is not x / sqrt(2)" in C.match_gelu(e).reason
    e2 = b(aten.erf.default, b(aten.div.Tensor, x, 2 ** 0.5))  # the right input, but erf is used as is
    b(aten.sum.default, e2)
    assert C.match_gelu(e2).reason == f"{e2.name} is not used as 0.5 * x * (1 + {e2.name})"


def test_repeat_kv_rule_says_k_and_v_differ():
    b = _Builder()
    q, k, v = b.input("q", 2, 4, 8, 8), b.input("k", 2, 2, 8, 8), b.input("v", 2, 4, 8, 8)
    rep = b(aten.reshape.default, b(aten.expand.default, b(aten.unsqueeze.default, k, 2), [2, 2, 2, 8, 8]),
            [2, 4, 8, 8])
    m = C.match_repeat_kv(b(SDPA, q, rep, v))
    assert not m and m.reason == "k is repeated 2x but v is not repeated"
    assert C.match_repeat_kv(b(SDPA, q, v, v)).progress == 0  # nothing repeated: not a candidate


# ------------------------------------------------------------------ attention misses, through inspect
class Scores(nn.Module):
    """q k^T attention with the scores or probabilities bent in one way."""

    def __init__(self, style):
        super().__init__()
        self.style = style
        self.q, self.k, self.v, self.o = (nn.Linear(16, 16) for _ in range(4))

    def forward(self, x, s):
        split = lambda t: t.view(2, 8, 2, 8).transpose(1, 2)  # noqa: E731
        q, k, v = split(self.q(x)), split(self.k(x)), split(self.v(x))
        scores = q @ k.transpose(-1, -2)
        if self.style == "tensor_scale":
            scores = scores * s
        elif self.style == "weak_mask":
            scores = scores.masked_fill(torch.ones(8, 8, dtype=torch.bool).triu(1), -100.0)
        p = scores.softmax(-2 if self.style == "softmax_dim" else -1)
        if self.style == "probs_scaled":
            p = p * 2
        return self.o((p @ v).transpose(1, 2).reshape(2, 8, 16))


@pytest.mark.parametrize("style,rule,reason", [
    ("tensor_scale", "eager_attention.scores", "the scale is a tensor input: mul scales the scores by s (placeholder)"),
    ("weak_mask", "eager_attention.scores", "fills with -100.0, not a masking value"),
    ("softmax_dim", "eager_attention.softmax", "the softmax runs over dim -2, not the last (keys)"),
    ("probs_scaled", "eager_attention.probs", "the probabilities feed mul, not matmul(P, V)"),
])
def test_eager_attention_misses_name_the_rule_and_reason(style, rule, reason):
    model = Scores(style).eval()
    report = sparsecc.inspect(model, (torch.randn(2, 8, 16), torch.tensor(0.3)), check=True)
    assert report.attention == []
    (miss,) = report.unmatched
    assert (miss.kind, miss.rule, miss.node) == ("attention", rule, "softmax")
    assert reason in miss.reason, miss.reason


def test_sdpa_without_projections_is_a_region_with_a_miss():
    class Bare(nn.Module):
        def forward(self, q, k, v):
            return F.scaled_dot_product_attention(q, k, v)

    qkv = tuple(torch.randn(2, 4, 8, 8) for _ in range(3))
    report = sparsecc.inspect(Bare().eval(), qkv)
    assert len(report.attention) == 1
    (miss,) = report.unmatched
    assert (miss.kind, miss.rule) == ("attention", "attention.projections")
    assert miss.reason.startswith("projection(s) q, k, v, out not found")


# ------------------------------------------------------------------ FFN by structure
ACTIVATION_FORMS = {
    "quick_gelu": ("quick_gelu", lambda h: h * torch.sigmoid(1.702 * h)),
    "relu_squared": ("relu2", lambda h: torch.relu(h) ** 2),
    "relu_square": ("relu2", lambda h: torch.square(F.relu(h))),
    "silu_by_hand": ("silu", lambda h: h * torch.sigmoid(h)),
    "relu_as_clamp": ("relu", lambda h: h.clamp(min=0)),
    "gelu_bloom": ("gelu_tanh", lambda h: h * 0.5 * (1.0 + torch.tanh(0.79788456 * h * (1 + 0.044715 * h * h)))),
    "gelu_new": ("gelu_tanh", lambda h: F.gelu(h, approximate="tanh")),
    "gelu_in_fp64": ("gelu", lambda h: F.gelu(h.double()).to(h.dtype)),
}


class MLP(nn.Module):
    def __init__(self, act, gated=False, d=16, d_ff=32):
        super().__init__()
        self.act, self.gated = act, gated
        self.up, self.down = nn.Linear(d, d_ff), nn.Linear(d_ff, d)
        self.gate = nn.Linear(d, d_ff, bias=False) if gated else None

    def forward(self, x):
        h = self.act(self.gate(x)) * self.up(x) if self.gated else self.act(self.up(x))
        return self.down(h)


@pytest.mark.parametrize("form", sorted(ACTIVATION_FORMS))
@pytest.mark.parametrize("gated", [False, True])
def test_any_written_out_activation_makes_an_ffn_with_its_name(form, gated):
    name, act = ACTIVATION_FORMS[form]
    model, x = MLP(act, gated).eval(), torch.randn(2, 5, 16)
    sm = sparsecc.compile(model, (x,))  # identity: the FFN becomes sparsecc::ffn computing `name`
    (ffn,) = sm.report().ffn
    assert (ffn.activation, ffn.gated, ffn.d_ff) == (name, gated, 32)
    assert sm.report().unmatched == []
    ops = [n.target for n in sm.graph_module.graph.nodes if n.op == "call_function"]
    assert ops.count(torch.ops.sparsecc.ffn.default) == 1
    assert (sm(x) - model(x)).abs().max().item() <= 1e-5  # the table's function is the chain's


@pytest.mark.parametrize("form", ["quick_gelu", "relu_squared"])
@pytest.mark.parametrize("gated", [False, True])
def test_sparse_ffn_op_computes_the_activations_found_by_structure(form, gated):
    """quick_gelu and relu2 go through the op's PyTorch path (the native kernel has neither)."""
    name, act = ACTIVATION_FORMS[form]
    model, x = MLP(act, gated).eval(), torch.randn(2, 5, 16, requires_grad=True)
    sm = sparsecc.compile(model, (x,), recipe=sparsecc.Recipe(ffn=sparsecc.SparseFFN(n=4, d_lowrank=4, init="random")))
    gm = sm.graph_module
    (op,) = [n for n in gm.graph.nodes if n.target is torch.ops.sparsecc.sparse_ffn.default]
    assert op.args[9] == name
    value = lambda a: None if a is None else gm.get_parameter(a.target)  # noqa: E731
    w_in, b_in, w_out_t, b_out, c1, c2, cb = (value(a) for a in op.args[1:8])
    ref = sparse_ffn_reference(x, w_in, b_in, w_out_t.t(), b_out, c1, c2, cb, 4, name, value(op.args[10]),
                               value(op.args[11]))
    out = sm(x)
    assert (out - ref).abs().max().item() <= 1e-5 and (out - model(x)).abs().max().item() > 1e-3
    # backward: the op's gradient equals autograd through the masked dense reference
    grads = [torch.autograd.grad(y.square().sum(), x)[0] for y in (out, ref)]
    assert (grads[0] - grads[1]).abs().max().item() <= 1e-5


def test_unknown_activation_is_a_region_that_rewrites_leave_alone_with_a_reason():
    model, x = MLP(lambda h: h * torch.tanh(h)).eval(), torch.randn(2, 5, 16)
    report = sparsecc.inspect(model, (x,))
    (ffn,) = report.ffn
    assert ffn.activation is None and ffn.chain == "mul(x, tanh(x))"
    assert not ffn.activation_match() and ffn.activation_match().rule == "ffn.activation"
    (miss,) = report.unmatched
    assert (miss.kind, miss.rule, miss.node) == ("ffn", "ffn.activation", "linear_1")
    assert miss.reason == ("activation is not one of relu, gelu, gelu_tanh, silu, quick_gelu, relu2: between "
                           "linear and linear_1 it computes mul(x, tanh(x))")
    sm = sparsecc.compile(model, (x,), recipe=sparsecc.Recipe())
    assert sum(len(p.changes) for p in sm.report().passes if p.name == "ffn_identity") == 0
    assert [m.rule for m in sm.report().unmatched] == ["ffn.activation", "identity:ffn.activation"]
    assert torch.allclose(sm(x), model(x), atol=1e-6)  # left dense
    with pytest.raises(sparsecc.errors.UnsupportedError, match=r"fits none of the 1 FFN .* it computes mul\(x, tanh"):
        sparsecc.compile(model, (x,), recipe=sparsecc.Recipe(ffn=sparsecc.SparseFFN(n=2, d_lowrank=4, init="random")))


class BentMLP(nn.Module):
    """An FFN shape with one thing wrong."""

    def __init__(self, style):
        super().__init__()
        self.style = style
        self.up, self.down, self.gate, self.third = (nn.Linear(16, 32), nn.Linear(32, 16), nn.Linear(16, 32),
                                                     nn.Linear(16, 32))
        self.other = nn.Linear(16, 16)
        self.scale = nn.Parameter(torch.rand(32))

    def forward(self, x):
        s = self.style
        if s == "scaled":  # a per-unit learned scale inside the activation
            return self.down(F.gelu(self.up(x)) * self.scale)
        if s == "hidden_returned":
            h = F.gelu(self.up(x))
            return self.down(h), h
        if s == "up_returned":
            u = self.up(x)
            return self.down(F.gelu(u)), u
        if s == "gate_other_input":
            return self.down(F.silu(self.gate(self.other(x))) * self.up(x))
        if s == "both_activated":
            return self.down(F.silu(self.gate(x)) * F.gelu(self.up(x)))
        if s == "three_linears":
            return self.down(F.silu(self.gate(x)) * self.up(x) * self.third(x))
        raise ValueError(s)


@pytest.mark.parametrize("style,rule,reason", [
    ("scaled", "ffn.inputs", "the elementwise ops between linear and linear_1 also read scale (parameter), not "
                             "computed from a projection"),
    ("hidden_returned", "ffn.hidden_users", "the hidden activation gelu is also used by output"),
    ("up_returned", "ffn.up_users", "the projection linear is also used by output"),
    ("gate_other_input", "ffn.gated", "the linears linear_1 and linear_2 read different inputs (linear, x)"),
    ("both_activated", "ffn.gated", "both factors of mul(silu(linear), gelu(linear_1)) apply a function"),
    ("three_linears", "ffn.sources", "the elementwise ops combine 3 linears (linear, linear_1, linear_2)"),
])
def test_ffn_misses_name_the_rule_and_reason(style, rule, reason):
    report = sparsecc.inspect(BentMLP(style).eval(), (torch.randn(2, 5, 16),), check=True)
    assert report.ffn == []
    (miss,) = report.unmatched
    assert (miss.kind, miss.rule, miss.path) == ("ffn", rule, "down")
    assert miss.reason.startswith(reason), miss.reason


# ------------------------------------------------------------------ linears from matmul
class MatmulLinears(nn.Module):
    def __init__(self):
        super().__init__()
        self.w_in, self.b_in = nn.Parameter(torch.randn(32, 16) * 0.2), nn.Parameter(torch.randn(32) * 0.1)
        self.w_out = nn.Parameter(torch.randn(32, 16) * 0.2)  # stored (in, out): x @ W
        self.w_computed = nn.Parameter(torch.randn(16, 16))

    def forward(self, x):
        h = F.gelu(x @ self.w_in.T + self.b_in)
        y = h @ self.w_out
        return y @ (self.w_computed * 2).T


def test_matmul_with_a_stored_weight_becomes_linear_and_the_rest_is_explained():
    model, x = MatmulLinears().eval(), torch.randn(2, 5, 16)
    report = sparsecc.inspect(model, (x,), check=True)  # linear == matmul (+ bias) within 1e-5
    counts = {p.name: p.changes for p in report.passes}
    assert len(counts["matmul_to_linear"]) == 2 and counts["matmul_to_linear"][0].endswith("(+bias)")
    (ffn,) = report.ffn
    assert (ffn.activation, ffn.weights) == ("gelu", {"up": "w_in", "down": "w_out"})
    (miss,) = report.unmatched
    assert (miss.kind, miss.rule) == ("linear", "matmul_to_linear")
    assert re.fullmatch(r"the matrix mul_\d+ is computed in the graph, not a stored weight; a linear layer "
                        r"multiplies by a parameter", miss.reason), miss.reason


# ------------------------------------------------------------------ one binder for attention arguments
def test_attention_arguments_are_bound_by_schema():
    import sparsecc.ops  # noqa: F401
    from sparsecc.graph import flow_segments

    assert flow_segments.attention_args is attention_args
    b = _Builder()
    q, k, v, m = (b.input(n, 2, 4, 8, 8) for n in "qkvm")
    expected = {"query": q, "key": k, "value": v, "attn_mask": m, "dropout_p": 0.0, "is_causal": True,
                "scale": 0.5, "enable_gqa": False}
    assert attention_args(b(SDPA, q, k, v, m, 0.0, True, scale=0.5)) == expected
    assert attention_args(b(SDPA, q, k, v, attn_mask=m, is_causal=True, scale=0.5)) == expected
    op = torch.ops.sparsecc.attention.default
    assert attention_args(b(op, q, k, v, m, 0.0, True, 0.5)) == expected
    t = torch.zeros(1)
    assert attention_args(op, (t, t, t), {"scale": 2.0})["scale"] == 2.0  # run-time values
    with pytest.raises(ValueError, match="do not fit the schema"):
        attention_args(SDPA, (t,), {})

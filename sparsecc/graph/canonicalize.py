"""Canonicalization passes: many spellings of one computation become one node.

- drop_noops: eval-mode dropout, clone/contiguous copies, dtype asserts and
  same-dtype casts disappear.
- sdpa_views_to_reshapes: views of an SDPA output become reshapes (their legality depends on the
  attention kernel's output strides, which a re-capture or another backend may change).
- addmm_to_linear: GPT-2's Conv1D (addmm with an (in, out) weight) becomes linear.
- matmul_to_linear: `x @ W.T (+ b)` with a parameter W (Falcon's linears) becomes linear.
- gelu_to_aten: GELU written out in arithmetic (tanh and erf forms) becomes aten.gelu.
- eager_attention_to_sdpa: matmul -> scale -> mask -> softmax -> matmul becomes
  one aten.scaled_dot_product_attention node. Anchored on the softmax and walking
  outwards, so the order of scaling and masking, bmm vs matmul, fp32 upcasts and
  mask spellings (add, masked_fill, where) are all one matcher.
- repeat_kv_to_gqa: k/v repeated per query-head group (Llama's repeat_kv) become
  SDPA's enable_gqa, so the region sees the true number of key/value heads.

Each rule is a matcher, `match_*(anchor) -> Match` (sparsecc.graph.match), that only
reads the graph and says why it does not apply, and a pass that rewrites what matched.
`sparsecc.graph.explain` runs the matchers again on the anchors left after
canonicalization to say why they were left. Every pass returns one note per rewrite
and leaves outputs numerically equal.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
import torch.fx as fx

from sparsecc.graph.fx_utils import (LINEAR, NOOP_COPY, SDPA, VIEW_LIKE, aten, attention_args, call_args, fake,
                                     is_call, new_call, scalar, shape, views_to_reshapes)
from sparsecc.graph.match import Match, describe, nearest
from sparsecc.graph.mask_rows import masked_below

# A masking value at least this negative means "masked" (HF uses finfo(dtype).min).
_MASKED = -1e30


# ---------------------------------------------------------------- no-ops
def match_noop(node: fx.Node) -> Match:
    """Match.ok(replacement) when `node` computes nothing (replacement None: just erase it)."""
    rule = "drop_noops"
    if node.op != "call_function":
        return Match.fail(rule, "not an op call", node, progress=0)
    if node.target is aten._assert_tensor_metadata.default:
        return Match.ok(None)
    targets = NOOP_COPY | {aten.slice.Tensor, aten.dropout.default, aten._to_copy.default, aten.type_as.default}
    src = node.args[0] if node.args else None
    if node.target not in targets or not isinstance(src, fx.Node):
        return Match.fail(rule, f"{describe(node)} is not a copy, slice, dropout or cast", node, progress=0)
    a = call_args(node)
    if node.target in NOOP_COPY:
        # A copy of a contiguous tensor changes nothing. A copy feeding a view stays: it fixes
        # the strides the view needs, and a later rewrite may change the producer's layout
        # (fake strides describe today's kernel). Copies of returned values stay too.
        if not _is_contiguous(src):
            return Match.fail(rule, f"copies {src.name}, which is not (known to be) contiguous", node)
        if node.kwargs:
            return Match.fail(rule, f"copy with options {dict(node.kwargs)}", node)
        for u in node.users:
            if u.op == "output" or is_call(u, aten.view.default, aten._unsafe_view.default):
                return Match.fail(rule, f"the copy feeds {describe(u)}, which needs its strides", node, u)
    elif node.target is aten.slice.Tensor:
        end = a["end"]
        if a["start"] not in (None, 0) or a["step"] != 1 or not (end is None or (isinstance(end, int) and end >= 2**62)):
            return Match.fail(rule, f"slice [{a['start']}:{end}:{a['step']}] does not take everything", node)
    elif node.target is aten.dropout.default:
        if a["train"] and a["p"] != 0:
            return Match.fail(rule, f"dropout in training mode with p={a['p']}", node)
    else:
        before, after = fake(src), fake(node)
        if before is None or after is None:
            return Match.fail(rule, "no dtype information", node)
        if before.dtype != after.dtype or before.device != after.device:
            return Match.fail(rule, f"casts {before.dtype} on {before.device} to {after.dtype} on {after.device}",
                              node)
        if not set(node.kwargs) <= {"dtype", "device", "layout"}:
            return Match.fail(rule, f"cast with options {sorted(set(node.kwargs) - {'dtype', 'device', 'layout'})}",
                              node)
    return Match.ok(src)


def drop_noops(gm: fx.GraphModule, ctx=None) -> list[str]:
    changes = []
    graph = gm.graph
    for node in list(graph.nodes):
        m = match_noop(node)
        if not m:
            continue
        if m.value is not None:
            node.replace_all_uses_with(m.value)
        graph.erase_node(node)
        name = "assert" if m.value is None else node.target.__name__
        changes.append(f"{name}:{node.name}")
    return changes


def _is_contiguous(node: fx.Node) -> bool:
    val = fake(node)
    if val is None:
        return False
    try:
        return bool(val.is_contiguous())
    except Exception:  # a symbolic answer we cannot decide without a guard
        return False


# ---------------------------------------------------------------- linear
def match_addmm(node: fx.Node) -> Match:
    """GPT-2's Conv1D: addmm(bias, x, W) with W stored (in, out) -> Match.ok((x, W, bias))."""
    if not is_call(node, aten.addmm.default):
        return Match.fail("addmm_to_linear", "not an addmm", node, progress=0)
    a = call_args(node)
    if a["beta"] != 1 or a["alpha"] != 1:
        return Match.fail("addmm_to_linear", f"addmm with beta={a['beta']}, alpha={a['alpha']}; a linear layer "
                          "computes bias + x @ W (beta = alpha = 1)", node)
    return Match.ok((a["mat1"], a["mat2"], a["input"]))


def addmm_to_linear(gm: fx.GraphModule, ctx=None) -> list[str]:
    changes = []
    graph = gm.graph
    for node in list(graph.nodes):
        m = match_addmm(node)
        if not m:
            continue
        x, w, bias = m.value
        with graph.inserting_before(node):
            w_t = new_call(graph, aten.t.default, (w,), meta_from=node)
            lin = new_call(graph, LINEAR, (x, w_t, bias), meta_from=node)
        node.replace_all_uses_with(lin)
        graph.erase_node(node)
        changes.append(f"addmm->linear:{lin.name}")
    return changes


def _transposed_2d(node: Any) -> Optional[fx.Node]:
    """X when `node` is X^T of a 2-D X (t, permute [1, 0], transpose(0, 1))."""
    if is_call(node, aten.t.default):
        return node.args[0]
    if is_call(node, aten.permute.default) and [d % 2 for d in node.args[1]] == [1, 0]:
        return node.args[0]
    if is_call(node, aten.transpose.int) and {d % 2 for d in node.args[1:3]} == {0, 1}:
        return node.args[0]
    return None


def match_matmul_linear(node: fx.Node) -> Match:
    """x @ W^T (+ b) with a stored 2-D W (Falcon's FalconLinear) -> Match.ok((x, W, transposed, bias, output)).

    Anchored on matmul / mm whose second operand is a matrix; W may also be stored (in, out)
    (x @ W, as GPT-2's Conv1D), then the linear reads W^T.
    """
    rule = "matmul_to_linear"
    if not is_call(node, aten.matmul.default, aten.mm.default) or len(shape(node.args[1]) or ()) != 2:
        return Match.fail(rule, "not a product with a matrix", node, progress=0)
    x, w = node.args[:2]
    weight = _transposed_2d(w)
    transposed = weight is not None
    weight = weight if transposed else w
    if not isinstance(weight, fx.Node) or weight.op != "get_attr":
        return Match.fail(rule, f"the matrix {describe(weight)} is computed in the graph, not a stored weight; a "
                          "linear layer multiplies by a parameter", node, weight)
    if not shape(x):
        return Match.fail(rule, f"the input {describe(x)} is a scalar", node, x, progress=2)
    out_features = shape(weight)[0 if transposed else 1]
    bias, output = None, node
    users = list(node.users)
    if len(users) == 1 and is_call(users[0], aten.add.Tensor):
        add = users[0]
        a = call_args(add)
        other = a["other"] if a["input"] is node else a["input"]
        if (a["alpha"] == 1 and isinstance(other, fx.Node) and shape(other) == (out_features,)
                and fake(other).dtype == fake(node).dtype):
            bias, output = other, add
    return Match.ok((x, weight, transposed, bias, output))


def matmul_to_linear(gm: fx.GraphModule, ctx=None) -> list[str]:
    changes = []
    graph = gm.graph
    for node in list(graph.nodes):
        m = match_matmul_linear(node)
        if not m:
            continue
        x, weight, transposed, bias, output = m.value
        with graph.inserting_before(output):
            w = weight if transposed else new_call(graph, aten.t.default, (weight,), meta_from=node)
            lin = new_call(graph, LINEAR, (x, w, bias), meta_from=node)
        output.replace_all_uses_with(lin)
        changes.append(f"matmul->linear:{lin.name}" + (" (+bias)" if bias is not None else ""))
    return changes


# ---------------------------------------------------------------- GELU
def _const_mul(node, x_pred) -> Optional[float]:
    """If node = x * c (either order) with x_pred(x), return c."""
    if not is_call(node, aten.mul.Tensor):
        return None
    a, b = node.args[:2]
    if scalar(b) is not None and x_pred(a):
        return scalar(b)
    if scalar(a) is not None and x_pred(b):
        return scalar(a)
    return None


def match_gelu(f: fx.Node) -> Match:
    """GELU written out, anchored on its tanh or erf -> Match.ok((x, output node, approximate)).

    tanh: 0.5 * x * (1 + tanh(sqrt(2/pi) * (x + 0.044715 * x**3)));  erf: x * 0.5 * (1 + erf(x / sqrt(2))).
    """
    rule = "gelu_to_aten"
    if is_call(f, aten.tanh.default):
        inner, x_holder = f.args[0], {}

        def is_poly(n):  # x + 0.044715 * x**3
            if not is_call(n, aten.add.Tensor):
                return False
            for x, cube_term in (n.args[:2], n.args[1::-1]):
                c = _const_mul(cube_term, lambda p: is_call(p, aten.pow.Tensor_Scalar) and p.args[0] is x
                               and p.args[1] == 3)
                if c is not None and abs(c - 0.044715) < 1e-6:
                    x_holder["x"] = x
                    return True
            return False

        c = _const_mul(inner, is_poly)
        if c is None or abs(c - math.sqrt(2 / math.pi)) > 1e-6:
            return Match.fail(rule, f"the tanh's input {describe(inner)} is not sqrt(2/pi) * (x + 0.044715 * x**3)",
                              f, inner)
        x, approximate = x_holder["x"], "tanh"
    elif is_call(f, aten.erf.default):
        inner = f.args[0]
        if is_call(inner, aten.div.Tensor) and scalar(inner.args[1]) is not None:
            c, x = 1 / scalar(inner.args[1]), inner.args[0]
        else:
            c = _const_mul(inner, lambda p: True)
            x = (inner.args[0] if isinstance(inner.args[0], fx.Node) else inner.args[1]) if c is not None else None
        if c is None or abs(c - 1 / math.sqrt(2)) > 1e-6:
            return Match.fail(rule, f"the erf's input {describe(inner)} is not x / sqrt(2)", f, inner)
        approximate = "none"
    else:
        return Match.fail(rule, "not a tanh or erf", f, progress=0)
    out = _match_gelu_tail(f, x)
    if out is None:
        return Match.fail(rule, f"{f.name} is not used as 0.5 * x * (1 + {f.name})", f, progress=2)
    return Match.ok((x, out, approximate))


def _match_gelu_tail(f: fx.Node, x: fx.Node):
    """f -> (1 + f) -> product with 0.5 * x, in either association order."""
    if len(f.users) != 1:
        return None
    one_plus = next(iter(f.users))
    if not is_call(one_plus, aten.add.Tensor) or 1.0 not in [scalar(a) for a in one_plus.args[:2]]:
        return None
    if len(one_plus.users) != 1:
        return None
    prod = next(iter(one_plus.users))
    if not is_call(prod, aten.mul.Tensor):
        return None
    other = prod.args[1] if prod.args[0] is one_plus else prod.args[0]
    # (0.5 * x) * (1 + f)
    if _const_mul(other, lambda n: n is x) == 0.5:
        return prod
    # 0.5 * (x * (1 + f))  or  (x * (1 + f)) * 0.5
    if other is x and len(prod.users) == 1:
        outer = next(iter(prod.users))
        if _const_mul(outer, lambda n: n is prod) == 0.5:
            return outer
    return None


def gelu_to_aten(gm: fx.GraphModule, ctx=None) -> list[str]:
    changes = []
    graph = gm.graph
    for node in list(graph.nodes):
        m = match_gelu(node)
        if not m:
            continue
        x, out, approximate = m.value
        with graph.inserting_before(out):
            gelu = new_call(graph, aten.gelu.default, (x,), {"approximate": approximate}, meta_from=out)
        out.replace_all_uses_with(gelu)
        changes.append(f"gelu({approximate}):{gelu.name}")
    return changes


# ---------------------------------------------------------------- attention
@dataclass
class _Scores:
    """What feeds a softmax: matmul(q, kT) * scale + additive masks, with boolean keep masks."""

    matmul: fx.Node
    scale: float = 1.0
    additive: list = field(default_factory=list)  # float tensors added to the scores
    keep: list = field(default_factory=list)  # (node, keep_when_true) boolean masks, masked -> -inf
    fill: list = field(default_factory=list)  # (bool node, value) masked_fill with a finite value
    # Heads folded into the batch (BLOOM, DeBERTa: [B*H, L, S] scores viewed to [B, H, L, S] before the
    # masks): the view, and how many additive terms were found below it (on the [B*H, ...] scores).
    heads_view: Optional[fx.Node] = None
    folded_terms: int = 0


def _is_mask_value(value) -> bool:
    """-inf, <= -1e30, or fp16's lowest value (Hugging Face masks fp16 scores with finfo(float16).min)."""
    v = scalar(value)
    return v is not None and v <= max(_MASKED, masked_below(torch.float16))


_SCORES = "eager_attention.scores"
_SCORES_EXPECTED = "expected matmul(q, k^T) or bmm, scaled by numbers, with additive / masked_fill / where masks and casts"


def _scores_of(node: Any, depth: int = 0) -> Match:
    """Decompose the softmax input into matmul, scale and masks: Match.ok(_Scores), or why it is not attention."""
    fail = lambda reason, *nodes: Match.fail(_SCORES, reason, node, *nodes, progress=depth + 2)  # noqa: E731
    if depth >= 12:
        return fail("more than 12 operations between QK^T and the softmax")
    if not isinstance(node, fx.Node):
        return fail(f"the scores are the constant {node!r}")
    if is_call(node, aten.matmul.default, aten.bmm.default):
        return Match.ok(_Scores(node))
    if is_call(node, aten._to_copy.default) and set(node.kwargs) <= {"dtype"}:
        return _scores_of(node.args[0], depth + 1)
    if is_call(node, aten.mul.Tensor, aten.div.Tensor):
        a, b = node.args[:2]
        c = scalar(b)
        if c is None and node.target is aten.mul.Tensor and scalar(a) is not None:
            a, c = b, scalar(a)
        if c is None:
            if node.target is aten.mul.Tensor and shape(b) == shape(node) and shape(a) != shape(node):
                a, b = b, a
            return fail(f"the scale is a tensor input: {describe(node)} scales the scores by {describe(b)}, not a "
                        "number", b)
        if c == 0:
            return fail(f"{describe(node)} scales the scores by 0")
        inner = _scores_of(a, depth + 1)
        if inner:
            inner.value.scale *= c if node.target is aten.mul.Tensor else 1.0 / c
        return inner
    if is_call(node, aten.add.Tensor):
        alpha = call_args(node)["alpha"]
        if alpha != 1:
            return fail(f"{describe(node)} adds with alpha={alpha}")
        a, b = node.args[:2]
        if not (isinstance(a, fx.Node) and isinstance(b, fx.Node)):
            return fail(f"{describe(node)} adds the number {a if scalar(a) is not None else b} to the scores")
        # the scores have the output's full shape; a mask usually broadcasts: try that side first
        tries = []
        for main, term in ((a, b), (b, a)):
            inner = _scores_of(main, depth + 1)
            if inner:
                inner.value.additive.append(term)
                return inner
            tries.append((shape(main) == shape(node), inner))
        # the scores have the output's full shape, a mask usually broadcasts: explain the full-shape side
        return nearest(*[m for full, m in tries if full] or [m for _, m in tries])
    if is_call(node, aten.masked_fill.Scalar, aten.where.ScalarOther, aten.where.ScalarSelf):
        if node.target is aten.masked_fill.Scalar:
            scores, cond, value, masked_when_true = node.args[0], node.args[1], node.args[2], True
        elif node.target is aten.where.ScalarOther:
            cond, scores, value, masked_when_true = node.args[0], node.args[1], node.args[2], False
        else:
            cond, value, scores, masked_when_true = node.args[0], node.args[1], node.args[2], True
        if not _is_mask_value(value):
            return fail(f"{describe(node)} fills with {value!r}, not a masking value (-inf, <= {_MASKED:g}, or "
                        f"<= {masked_below(torch.float16):g} as fp16 masks)")
        inner = _scores_of(scores, depth + 1)
        if inner:
            _add_fill(inner.value, cond, value, masked_when_true)
        return inner
    if is_call(node, aten.baddbmm.default):  # beta * bias + alpha * (q @ k^T): ALiBi in BLOOM
        a = call_args(node)
        if not isinstance(a["input"], fx.Node):
            return fail(f"{describe(node)} adds the number {a['input']!r} to the scores")
        found = _Scores(node, scale=float(a["alpha"]))
        found.additive.append((a["input"], float(a["beta"])) if a["beta"] != 1 else a["input"])
        return Match.ok(found)
    if is_call(node, aten.view.default, aten.reshape.default, aten._unsafe_view.default):
        src = node.args[0]
        if _unfolds_heads(src, node):
            inner = _scores_of(src, depth + 1)
            if inner:
                if inner.value.heads_view is not None or inner.value.keep or inner.value.fill:
                    return fail(f"the scores are reshaped twice, or masked before {describe(node)} unfolds the heads")
                inner.value.heads_view, inner.value.folded_terms = node, len(inner.value.additive)
            return inner
        return fail(f"the scores are reshaped by {describe(node)} from {describe(src)} ({shape(src)} -> "
                    f"{shape(node)}) before the softmax; only [B*H, L, S] -> [B, H, L, S] is matched")
    if is_call(node, *VIEW_LIKE):
        src = node.args[0]
        return fail(f"the scores are reshaped by {describe(node)} from {describe(src)} ({shape(src)} -> "
                    f"{shape(node)}) before the softmax; reshaped scores are not matched")
    return fail(f"{describe(node)} is not part of attention scores; " + _SCORES_EXPECTED)


def _unfolds_heads(src: Any, view: fx.Node) -> bool:
    """`view` turns [B*H, L, S] into [B, H, L, S]."""
    a, b = fake(src) if isinstance(src, fx.Node) else None, fake(view)
    if a is None or b is None or a.dim() != 3 or b.dim() != 4:
        return False
    return bool(a.shape[1:] == b.shape[2:]) and _same_size(a.shape[0], b.shape[0] * b.shape[1])


def _same_size(x, y) -> bool:
    try:
        return bool(x == y)
    except Exception:  # a symbolic comparison that needs a guard
        return False


def _add_fill(scores: _Scores, cond, value, masked_when_true: bool) -> None:
    if scalar(value) == float("-inf"):
        scores.keep.append((cond, not masked_when_true))
    else:
        scores.fill.append((cond, float(value), masked_when_true))


def _strip_cast(node: fx.Node) -> fx.Node:
    while is_call(node, aten._to_copy.default) and set(node.kwargs) <= {"dtype"}:
        node = node.args[0]
    return node


def _key_from_kt(kt: fx.Node) -> tuple[Optional[fx.Node], float]:
    """k such that kt == k^T over the last two dims (None: k must be made as kt^T), and any constant k was
    scaled by."""
    nd = fake(kt).dim() if fake(kt) is not None else None
    if is_call(kt, aten.transpose.int) and nd is not None and {d % nd for d in kt.args[1:3]} == {nd - 1, nd - 2}:
        k = kt.args[0]
        c = _const_mul(k, lambda n: True) if is_call(k, aten.mul.Tensor) else None
        if c is not None:
            return (k.args[0] if isinstance(k.args[0], fx.Node) else k.args[1]), c
        return k, 1.0
    return None, 1.0


def _query(q: fx.Node) -> tuple[fx.Node, float]:
    c = _const_mul(q, lambda n: True) if is_call(q, aten.mul.Tensor) else None
    if c is not None:
        return (q.args[0] if isinstance(q.args[0], fx.Node) else q.args[1]), c
    if is_call(q, aten.div.Tensor) and scalar(q.args[1]):
        return q.args[0], 1.0 / scalar(q.args[1])
    return q, 1.0


def _probs_consumer(softmax: fx.Node, folded: bool = False) -> Match:
    """The matmul(P, V) that consumes the probabilities, through casts (and the view folding the heads back
    into the batch when the scores were unfolded); or why there is none."""
    node = softmax
    while True:
        users = list(node.users)
        if len(users) != 1:
            names = ", ".join(describe(u) for u in users) or "nothing"
            return Match.fail("eager_attention.probs", f"the probabilities {node.name} are used by {len(users)} nodes "
                              f"({names}), not by matmul(P, V) alone: they are also used elsewhere (e.g. returned "
                              "with output_attentions=True)", softmax, *users, progress=20)
        user = users[0]
        if is_call(user, aten._to_copy.default) and set(user.kwargs) <= {"dtype"} or is_call(user, *NOOP_COPY):
            node = user
            continue
        if folded and is_call(user, aten.view.default, aten.reshape.default, aten._unsafe_view.default) \
                and _unfolds_heads(user, node):  # [B, H, L, S] folded back to [B*H, L, S]
            node, folded = user, False
            continue
        if is_call(user, aten.matmul.default, aten.bmm.default) and user.args[0] is node:
            return Match.ok(user)
        return Match.fail("eager_attention.probs", f"the probabilities feed {describe(user)}, not matmul(P, V)",
                          softmax, user, progress=20)


@dataclass
class _EagerAttention:
    softmax: fx.Node
    scores: _Scores
    q: fx.Node
    kt: fx.Node
    k: Optional[fx.Node]  # None: make it as kt^T
    v: fx.Node
    pv: fx.Node
    scale: float


def match_eager_attention(sm: fx.Node) -> Match:
    """softmax(matmul(q, k^T) * scale + masks) @ v, anchored on the softmax -> Match.ok(_EagerAttention)."""
    if not is_call(sm, aten.softmax.int, aten._softmax.default):
        return Match.fail("eager_attention", "not a softmax", sm, progress=0)
    a = call_args(sm)
    val = fake(sm)
    if val is None:
        return Match.fail("eager_attention.softmax", "the softmax has no shape information", sm)
    if a["dim"] % val.dim() != val.dim() - 1:
        return Match.fail("eager_attention.softmax", f"the softmax runs over dim {a['dim']}, not the last (keys)",
                          sm)
    scores = _scores_of(a["input"])
    if not scores:
        return scores
    qk = scores.value.matmul
    if len(qk.users) != 1:
        others = [u for u in qk.users if u is not sm]
        return Match.fail("eager_attention.scores", f"QK^T ({qk.name}) is also used by "
                          f"{', '.join(describe(u) for u in others)}", sm, qk, progress=15)
    folded = scores.value.heads_view is not None
    pv = _probs_consumer(sm, folded)
    if not pv:
        return pv
    pv = pv.value
    q_arg, kt_arg = qk.args[1:3] if is_call(qk, aten.baddbmm.default) else qk.args[:2]
    q, q_scale = _query(_strip_cast(q_arg))
    kt = _strip_cast(kt_arg)
    k, k_scale = _key_from_kt(kt)
    v = pv.args[1]
    fq, fv, fo = fake(q), fake(v), fake(pv)
    rule = "eager_attention.shapes"
    if fq is None or fv is None or fo is None or fake(kt) is None:
        return Match.fail(rule, "q, k, v or the output has no shape information", sm, q, v, pv, progress=30)
    if fq.dtype != fo.dtype:
        return Match.fail(rule, f"q is {fq.dtype} but the attention output is {fo.dtype}", sm, q, pv, progress=30)
    if (fq.dim() < 2 or fq.dim() != fv.dim() or shape(q)[:-1] + shape(v)[-1:] != shape(pv)
            or not shape(q)[:-2] == shape(kt)[:-2] == shape(v)[:-2]):
        return Match.fail(rule, f"q {shape(q)}, k^T {shape(kt)} and v {shape(v)} do not have SDPA's shapes (same "
                          f"batch and head dims, output {shape(pv)})", sm, q, kt, v, pv, progress=30)
    return Match.ok(_EagerAttention(sm, scores.value, q, kt, k, v, pv, scores.value.scale * q_scale * k_scale))


def eager_attention_to_sdpa(gm: fx.GraphModule, ctx=None) -> list[str]:
    changes = []
    graph = gm.graph
    for sm in list(graph.nodes):
        m = match_eager_attention(sm)
        if not m:
            continue
        e: _EagerAttention = m.value
        with graph.inserting_before(e.pv):
            k = e.k if e.k is not None else new_call(graph, aten.transpose.int, (e.kt, -2, -1), meta_from=e.pv)
            q, v, heads = e.q, e.v, e.scores.heads_view
            if heads is not None:  # attention on [B, H, L, D]: the heads unfolded from the batch, as the scores were
                bh = list(heads.args[1][:2])
                q, k, v = (new_call(graph, aten.unflatten.int, (t, 0, bh), meta_from=e.pv) for t in (q, k, v))
            mask = _combine_masks(graph, e.scores, e.pv, fake(sm).dtype)
            sdpa = new_call(graph, SDPA, (q, k, v), {"attn_mask": mask, "scale": e.scale}, meta_from=sm)
            out = sdpa if heads is None else new_call(graph, aten.flatten.using_ints, (sdpa, 0, 1), meta_from=e.pv)
        e.pv.replace_all_uses_with(out)
        changes.append(f"eager-attention->sdpa:{sdpa.name} (softmax {sm.name})")
    return changes


def _combine_masks(graph: fx.Graph, s: _Scores, anchor: fx.Node, dtype) -> Optional[fx.Node]:
    """One SDPA mask: boolean if only -inf fills, else the sum of additive terms."""
    if not s.additive and not s.fill:
        if not s.keep:
            return None
        mask = None
        for cond, keep_when_true in s.keep:
            term = cond if keep_when_true else new_call(graph, aten.logical_not.default, (cond,), meta_from=anchor)
            mask = term if mask is None else new_call(graph, aten.logical_and.default, (mask, term), meta_from=anchor)
        return mask
    mask = None
    terms = []
    for i, term in enumerate(s.additive):
        if isinstance(term, tuple):  # (bias, beta) of a baddbmm
            term = new_call(graph, aten.mul.Tensor, term, meta_from=anchor)
        if i < s.folded_terms:  # on the [B*H, ...] scores: unfold like them
            term = new_call(graph, aten.unflatten.int, (term, 0, list(s.heads_view.args[1][:2])), meta_from=anchor)
        terms.append(term)
    for cond, value, masked_when_true in s.fill:
        # masked_fill(x, m, v) with v ~ finfo.min equals x + where(m, v, 0) in floating point.
        args = (cond, value, 0.0) if masked_when_true else (cond, 0.0, value)
        terms.append(_where_scalars(graph, args, anchor, dtype))
    for cond, keep_when_true in s.keep:
        args = (cond, 0.0, float("-inf")) if keep_when_true else (cond, float("-inf"), 0.0)
        terms.append(_where_scalars(graph, args, anchor, dtype))
    for term in terms:
        mask = term if mask is None else new_call(graph, aten.add.Tensor, (mask, term), meta_from=anchor)
    return mask


def _where_scalars(graph, args, anchor, dtype) -> fx.Node:
    """where(cond, a, b) of two numbers, in the scores' dtype."""
    node = new_call(graph, aten.where.Scalar, args, meta_from=anchor)
    if fake(node).dtype != dtype:
        node = new_call(graph, aten._to_copy.default, (node,), {"dtype": dtype}, meta_from=anchor)
    return node


def _repeat_source(node: Any) -> Optional[tuple[fx.Node, int]]:
    """If node = reshape(expand(unsqueeze(x, 2)), (B, H*n, S, D)), return (x, n)."""
    n = node
    if not is_call(n, aten.view.default, aten.reshape.default, aten._unsafe_view.default):
        return None
    n = n.args[0]
    while is_call(n, aten.clone.default, aten.contiguous.default):
        n = n.args[0]
    if not is_call(n, aten.expand.default):
        return None
    src = n.args[0]
    if not is_call(src, aten.unsqueeze.default) or src.args[1] % 5 != 2:
        return None
    x = src.args[0]
    fx_, fo = fake(x), fake(node)
    if fx_ is None or fo is None or fx_.dim() != 4 or fo.dim() != 4:
        return None
    groups = fo.shape[1] // fx_.shape[1]
    if fo.shape[1] != fx_.shape[1] * groups or fo.shape[2:] != fx_.shape[2:]:
        return None
    return x, int(groups)


def match_repeat_kv(node: fx.Node) -> Match:
    """SDPA of k and v repeated per query-head group -> Match.ok((k, v, groups)). Progress 0: not repeated."""
    rule = "repeat_kv_to_gqa"
    if not is_call(node, SDPA):
        return Match.fail(rule, "not an SDPA", node, progress=0)
    a = attention_args(node)
    if a["enable_gqa"]:
        return Match.fail(rule, "already grouped (enable_gqa)", node, progress=0)
    rk, rv = _repeat_source(a["key"]), _repeat_source(a["value"])
    if rk is None and rv is None:
        return Match.fail(rule, "k and v are not repeated per head group", node, progress=0)
    if rk is None or rv is None or rk[1] != rv[1]:
        said = lambda r: "not repeated" if r is None else f"repeated {r[1]}x"  # noqa: E731
        return Match.fail(rule, f"k is {said(rk)} but v is {said(rv)}", node, a["key"], a["value"])
    if rk[1] == 1:
        return Match.fail(rule, "k and v are repeated once (nothing to group)", node, progress=0)
    return Match.ok((rk[0], rv[0], rk[1]))


def repeat_kv_to_gqa(gm: fx.GraphModule, ctx=None) -> list[str]:
    changes = []
    for node in list(gm.graph.nodes):
        m = match_repeat_kv(node)
        if not m:
            continue
        k, v, groups = m.value
        node.args = (node.args[0], k, v, *node.args[3:])
        node.kwargs = {**node.kwargs, "enable_gqa": True}
        changes.append(f"repeat_kv->gqa:{node.name} (groups {groups})")
    return changes


def sdpa_views_to_reshapes(gm: fx.GraphModule, ctx=None) -> list[str]:
    """Views of an attention output become reshapes. The capture recorded the strides of the kernel that ran
    (CPU flash attention returns [B, L, H, D] memory, so `transpose(1, 2).view(B, L, H*D)` needed no copy and
    the model's `.contiguous()` left no node); a re-capture (ONNX export, save) or another backend may pick
    a kernel with other strides, where that view is illegal."""
    changes = []
    for node in list(gm.graph.nodes):
        if is_call(node, SDPA):
            n = views_to_reshapes(node)
            if n:
                changes.append(f"sdpa_views:{node.name} ({n} view(s) -> reshape)")
    return changes


CANONICALIZE = [
    ("drop_noops", drop_noops),
    ("sdpa_views_to_reshapes", sdpa_views_to_reshapes),
    ("addmm_to_linear", addmm_to_linear),
    ("matmul_to_linear", matmul_to_linear),
    ("gelu_to_aten", gelu_to_aten),
    ("eager_attention_to_sdpa", eager_attention_to_sdpa),
    ("repeat_kv_to_gqa", repeat_kv_to_gqa),
]

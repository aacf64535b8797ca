"""Canonicalization passes: many spellings of one computation become one node.

- drop_noops: eval-mode dropout, clone/contiguous copies, dtype asserts and
  same-dtype casts disappear.
- addmm_to_linear: GPT-2's Conv1D (addmm with an (in, out) weight) becomes linear.
- gelu_to_aten: GELU written out in arithmetic (tanh and erf forms) becomes aten.gelu.
- eager_attention_to_sdpa: matmul -> scale -> mask -> softmax -> matmul becomes
  one aten.scaled_dot_product_attention node. Anchored on the softmax and walking
  outwards, so the order of scaling and masking, bmm vs matmul, fp32 upcasts and
  mask spellings (add, masked_fill, where) are all one matcher.
- repeat_kv_to_gqa: k/v repeated per query-head group (Llama's repeat_kv) become
  SDPA's enable_gqa, so the region sees the true number of key/value heads.

Every pass returns one note per rewrite and leaves outputs numerically equal.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.fx as fx

from sparsecc.graph.fx_utils import (LINEAR, NOOP_COPY, SDPA, VIEW_LIKE, aten, fake, is_call,
                                     new_call, scalar)

# A masking value at least this negative means "masked" (HF uses finfo(dtype).min).
_MASKED = -1e30


def drop_noops(gm: fx.GraphModule, ctx=None) -> list[str]:
    changes = []
    graph = gm.graph
    for node in list(graph.nodes):
        if node.op != "call_function":
            continue
        if node.target is aten._assert_tensor_metadata.default:
            graph.erase_node(node)
            changes.append(f"assert:{node.name}")
            continue
        src = node.args[0] if node.args else None
        if not isinstance(src, fx.Node):
            continue
        replace = False
        if node.target in NOOP_COPY:
            # A copy of a contiguous tensor changes nothing. A copy feeding a view stays: it fixes
            # the strides the view needs, and a later rewrite may change the producer's layout
            # (fake strides describe today's kernel). Copies of returned values stay too.
            replace = (_is_contiguous(src) and not node.kwargs
                       and not any(u.op == "output" or is_call(u, aten.view.default, aten._unsafe_view.default)
                                   for u in node.users))
        elif node.target is aten.slice.Tensor:
            replace = _is_full_slice(node)
        elif node.target is aten.dropout.default:
            p, train = node.args[1], node.args[2]
            replace = (not train) or p == 0
        elif node.target in (aten._to_copy.default, aten.type_as.default):
            a, b = fake(src), fake(node)
            replace = (a is not None and b is not None and a.dtype == b.dtype and a.device == b.device
                       and set(node.kwargs) <= {"dtype", "device", "layout"})
        if replace:
            node.replace_all_uses_with(src)
            graph.erase_node(node)
            changes.append(f"{node.target.__name__}:{node.name}")
    return changes


def _is_contiguous(node: fx.Node) -> bool:
    val = fake(node)
    if val is None:
        return False
    try:
        return bool(val.is_contiguous())
    except Exception:  # a symbolic answer we cannot decide without a guard
        return False


def _is_full_slice(node: fx.Node) -> bool:
    """x[:, :] spelled as slice(x, dim, 0, INT_MAX, 1)."""
    args = list(node.args) + [None] * (5 - len(node.args))
    start = node.kwargs.get("start", args[2])
    end = node.kwargs.get("end", args[3])
    step = node.kwargs.get("step", args[4])
    return start in (None, 0) and (end is None or (isinstance(end, int) and end >= 2**62)) and step in (None, 1)


def addmm_to_linear(gm: fx.GraphModule, ctx=None) -> list[str]:
    changes = []
    graph = gm.graph
    for node in list(graph.nodes):
        if not is_call(node, aten.addmm.default):
            continue
        if node.kwargs.get("beta", 1) != 1 or node.kwargs.get("alpha", 1) != 1:
            continue
        bias, x, w = node.args[:3]
        with graph.inserting_before(node):
            w_t = new_call(graph, aten.t.default, (w,), meta_from=node)
            lin = new_call(graph, LINEAR, (x, w_t, bias), meta_from=node)
        node.replace_all_uses_with(lin)
        graph.erase_node(node)
        changes.append(f"addmm->linear:{lin.name}")
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


def _match_gelu_tanh(tanh: fx.Node):
    """0.5 * x * (1 + tanh(sqrt(2/pi) * (x + 0.044715 * x**3))) -> (x, output node)."""
    inner = tanh.args[0]
    x_holder = {}

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
        return None
    return _match_gelu_tail(tanh, x_holder["x"])


def _match_gelu_erf(erf: fx.Node):
    """x * 0.5 * (1 + erf(x / sqrt(2))) -> (x, output node)."""
    inner = erf.args[0]
    if is_call(inner, aten.div.Tensor) and scalar(inner.args[1]) is not None:
        if abs(scalar(inner.args[1]) - math.sqrt(2)) > 1e-6:
            return None
        x = inner.args[0]
    else:
        c = _const_mul(inner, lambda p: True)
        if c is None or abs(c - 1 / math.sqrt(2)) > 1e-6:
            return None
        x = inner.args[0] if isinstance(inner.args[0], fx.Node) else inner.args[1]
    return _match_gelu_tail(erf, x)


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
        if is_call(node, aten.tanh.default):
            out, approximate = _match_gelu_tanh(node), "tanh"
        elif is_call(node, aten.erf.default):
            out, approximate = _match_gelu_erf(node), "none"
        else:
            continue
        if out is None:
            continue
        x = _gelu_input(node, approximate)
        with graph.inserting_before(out):
            gelu = new_call(graph, aten.gelu.default, (x,), {"approximate": approximate}, meta_from=out)
        out.replace_all_uses_with(gelu)
        changes.append(f"gelu({approximate}):{gelu.name}")
    return changes


def _gelu_input(f: fx.Node, approximate: str) -> fx.Node:
    inner = f.args[0]
    if approximate == "tanh":
        poly = inner.args[0] if is_call(inner.args[0], aten.add.Tensor) else inner.args[1]
        a, b = poly.args[:2]
        return a if is_call(b, aten.mul.Tensor) and not is_call(a, aten.mul.Tensor) else b
    if is_call(inner, aten.div.Tensor):
        return inner.args[0]
    return inner.args[0] if isinstance(inner.args[0], fx.Node) else inner.args[1]


# ---------------------------------------------------------------- attention
@dataclass
class _Scores:
    """What feeds a softmax: matmul(q, kT) * scale + additive masks, with boolean keep masks."""

    matmul: fx.Node
    scale: float = 1.0
    additive: list = field(default_factory=list)  # float tensors added to the scores
    keep: list = field(default_factory=list)  # (node, keep_when_true) boolean masks, masked -> -inf
    fill: list = field(default_factory=list)  # (bool node, value) masked_fill with a finite value


def _is_mask_value(value) -> bool:
    v = scalar(value)
    return v is not None and v <= _MASKED


def _scores_of(node: fx.Node, budget: int = 12) -> Optional[_Scores]:
    """Decompose the softmax input into matmul, scale and masks; None if it is not attention."""
    if budget <= 0 or not isinstance(node, fx.Node):
        return None
    if is_call(node, aten.matmul.default, aten.bmm.default):
        return _Scores(node)
    if is_call(node, aten._to_copy.default) and set(node.kwargs) <= {"dtype"}:
        return _scores_of(node.args[0], budget - 1)
    if is_call(node, aten.mul.Tensor, aten.div.Tensor):
        a, b = node.args[:2]
        c = scalar(b)
        if c is None and node.target is aten.mul.Tensor:
            a, c = b, scalar(a)
        if c is None or c == 0:
            return None
        inner = _scores_of(a, budget - 1)
        if inner is not None:
            inner.scale *= c if node.target is aten.mul.Tensor else 1.0 / c
        return inner
    if is_call(node, aten.add.Tensor) and all(isinstance(a, fx.Node) for a in node.args[:2]):
        if node.kwargs.get("alpha", 1) != 1:
            return None
        for main, term in (node.args[:2], node.args[1::-1]):
            inner = _scores_of(main, budget - 1)
            if inner is not None:
                inner.additive.append(term)
                return inner
        return None
    if is_call(node, aten.masked_fill.Scalar) and _is_mask_value(node.args[2]):
        inner = _scores_of(node.args[0], budget - 1)
        if inner is not None:
            _add_fill(inner, node.args[1], node.args[2], masked_when_true=True)
        return inner
    if is_call(node, aten.where.ScalarOther) and _is_mask_value(node.args[2]):
        inner = _scores_of(node.args[1], budget - 1)
        if inner is not None:
            _add_fill(inner, node.args[0], node.args[2], masked_when_true=False)
        return inner
    if is_call(node, aten.where.ScalarSelf) and _is_mask_value(node.args[1]):
        inner = _scores_of(node.args[2], budget - 1)
        if inner is not None:
            _add_fill(inner, node.args[0], node.args[1], masked_when_true=True)
        return inner
    return None


def _add_fill(scores: _Scores, cond, value, masked_when_true: bool) -> None:
    if scalar(value) == float("-inf"):
        scores.keep.append((cond, not masked_when_true))
    else:
        scores.fill.append((cond, float(value), masked_when_true))


def _strip_cast(node: fx.Node) -> fx.Node:
    while is_call(node, aten._to_copy.default) and set(node.kwargs) <= {"dtype"}:
        node = node.args[0]
    return node


def _key_from_kt(graph: fx.Graph, kt: fx.Node, anchor: fx.Node) -> tuple[fx.Node, float]:
    """k such that kt == k^T over the last two dims, and any constant k was scaled by."""
    scale = 1.0
    nd = fake(kt).dim() if fake(kt) is not None else None
    if is_call(kt, aten.transpose.int) and nd is not None:
        dims = {d % nd for d in kt.args[1:3]}
        if dims == {nd - 1, nd - 2}:
            k = kt.args[0]
            c = _const_mul(k, lambda n: True) if is_call(k, aten.mul.Tensor) else None
            if c is not None:
                scale = c
                k = k.args[0] if isinstance(k.args[0], fx.Node) else k.args[1]
            return k, scale
    with graph.inserting_before(anchor):
        return new_call(graph, aten.transpose.int, (kt, -2, -1), meta_from=anchor), scale


def _query(q: fx.Node) -> tuple[fx.Node, float]:
    c = _const_mul(q, lambda n: True) if is_call(q, aten.mul.Tensor) else None
    if c is not None:
        return (q.args[0] if isinstance(q.args[0], fx.Node) else q.args[1]), c
    if is_call(q, aten.div.Tensor) and scalar(q.args[1]):
        return q.args[0], 1.0 / scalar(q.args[1])
    return q, 1.0


def _probs_consumer(softmax: fx.Node) -> Optional[fx.Node]:
    """The matmul(P, V) that consumes the probabilities, through casts; None if P is used elsewhere."""
    node = softmax
    while True:
        users = list(node.users)
        if len(users) != 1:
            return None
        user = users[0]
        if is_call(user, aten._to_copy.default) and set(user.kwargs) <= {"dtype"}:
            node = user
            continue
        if is_call(user, aten.matmul.default, aten.bmm.default) and user.args[0] is node:
            return user
        return None


def eager_attention_to_sdpa(gm: fx.GraphModule, ctx=None) -> list[str]:
    changes = []
    graph = gm.graph
    for sm in list(graph.nodes):
        if not is_call(sm, aten.softmax.int, aten._softmax.default):
            continue
        val = fake(sm)
        if val is None or sm.args[1] % val.dim() != val.dim() - 1:
            continue
        scores = _scores_of(sm.args[0])
        pv = _probs_consumer(sm)
        if scores is None or pv is None:
            continue
        qk = scores.matmul
        if len(qk.users) != 1 or fake(qk) is None or fake(pv) is None:
            continue
        q, q_scale = _query(_strip_cast(qk.args[0]))
        v = pv.args[1]
        with graph.inserting_before(pv):
            k, k_scale = _key_from_kt(graph, _strip_cast(qk.args[1]), pv)
            mask = _combine_masks(graph, scores, pv, fake(sm).dtype)
            if fake(q).dtype != fake(pv).dtype:
                continue
            sdpa = new_call(graph, SDPA, (q, k, v),
                            {"attn_mask": mask, "scale": scores.scale * q_scale * k_scale},
                            meta_from=sm)
        if tuple(fake(sdpa).shape) != tuple(fake(pv).shape):
            graph.erase_node(sdpa)
            continue
        pv.replace_all_uses_with(sdpa)
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
    terms = list(s.additive)
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


def _repeat_source(node: fx.Node) -> Optional[tuple[fx.Node, int]]:
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


def repeat_kv_to_gqa(gm: fx.GraphModule, ctx=None) -> list[str]:
    changes = []
    for node in list(gm.graph.nodes):
        if not is_call(node, SDPA) or node.kwargs.get("enable_gqa", False):
            continue
        rk, rv = _repeat_source(node.args[1]), _repeat_source(node.args[2])
        if rk is None or rv is None or rk[1] != rv[1] or rk[1] == 1:
            continue
        node.args = (node.args[0], rk[0], rv[0], *node.args[3:])
        node.kwargs = {**node.kwargs, "enable_gqa": True}
        changes.append(f"repeat_kv->gqa:{node.name} (groups {rk[1]})")
    return changes


CANONICALIZE = [
    ("drop_noops", drop_noops),
    ("addmm_to_linear", addmm_to_linear),
    ("gelu_to_aten", gelu_to_aten),
    ("eager_attention_to_sdpa", eager_attention_to_sdpa),
    ("repeat_kv_to_gqa", repeat_kv_to_gqa),
]

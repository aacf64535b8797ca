"""Small facts about FX nodes of an exported graph: op kinds, module paths, shapes, weights."""

from __future__ import annotations

import operator
import re
from typing import Any, Iterable, Optional

import torch
import torch.fx as fx
from torch.fx import _pytree as fx_pytree
from torch.fx.operator_schemas import normalize_function

aten = torch.ops.aten

# Ops that only move, reshape or copy data: walking through them keeps "the same tensor".
VIEW_LIKE = {
    aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.transpose.int,
    aten.permute.default, aten.clone.default, aten.contiguous.default, aten.alias.default,
    aten.unsqueeze.default, aten.squeeze.dim, aten.squeeze.default, aten.t.default,
    aten.expand.default, aten.detach.default, aten.flatten.using_ints,
}

# Pure no-op nodes that an eval-mode export leaves behind (dropout in eval, copies).
NOOP_COPY = {aten.clone.default, aten.contiguous.default, aten.alias.default, aten.detach.default}

SDPA = aten.scaled_dot_product_attention.default
LINEAR = aten.linear.default


def is_call(node: Any, *targets) -> bool:
    return isinstance(node, fx.Node) and node.op == "call_function" and node.target in targets


def module_stack(node: fx.Node) -> list[tuple[str, str]]:
    """[(module path, class name)] from the outermost to the innermost module that produced `node`."""
    stack = node.meta.get("nn_module_stack") or {}
    out = []
    for value in stack.values():
        path, cls = value
        cls_name = cls if isinstance(cls, str) else getattr(cls, "__qualname__", str(cls))
        out.append((_clean_path(path), cls_name.rsplit(".", 1)[-1]))
    return out


def _clean_path(path: str) -> str:
    # Strict export spells paths like L['self'].encoder.layer[0]; normalise to encoder.layer.0.
    path = re.sub(r"^L\['self'\]\.?", "", path)
    path = re.sub(r"\[(\d+)\]", r".\1", path)
    return path.strip(".")


def module_path(node: fx.Node) -> str:
    stack = module_stack(node)
    return stack[-1][0] if stack else ""


def module_class(node: fx.Node) -> str:
    stack = module_stack(node)
    return stack[-1][1] if stack else ""


def common_path(*paths: str) -> str:
    parts = [p.split(".") if p else [] for p in paths]
    out = []
    for group in zip(*parts):
        if len(set(group)) != 1:
            break
        out.append(group[0])
    return ".".join(out)


def layer_index(path: str) -> Optional[int]:
    """The first integer component of a module path (encoder.layer.3.attention -> 3)."""
    for part in path.split("."):
        if part.isdigit():
            return int(part)
    return None


def stack_name(path: str) -> str:
    """The module path up to the layer index (encoder.layer.3.attention -> encoder.layer)."""
    out = []
    for part in path.split("."):
        if part.isdigit():
            return ".".join(out)
        out.append(part)
    return ""


def fake(node: Any) -> Optional[torch.Tensor]:
    if not isinstance(node, fx.Node):
        return None
    val = node.meta.get("val")
    return val if isinstance(val, torch.Tensor) else None


def hint(dim: Any) -> int:
    """A concrete size for a possibly symbolic dimension (the example input's value)."""
    if isinstance(dim, int):
        return dim
    try:
        return int(dim.node.hint)
    except Exception:  # pragma: no cover - unbacked symbols
        return int(dim)


def shape(node: Any) -> Optional[tuple[int, ...]]:
    val = fake(node)
    return None if val is None else tuple(hint(d) for d in val.shape)


def is_dynamic(dim: Any) -> bool:
    return not isinstance(dim, int)


# Elementwise ops without a pointwise tag, and casts (elementwise when only the dtype changes).
_ELEMENTWISE_EXTRA = {aten.hardswish.default, aten.hardsigmoid.default, aten.where.ScalarOther,
                      aten.where.ScalarSelf, aten.where.Scalar}


def is_elementwise(node: Any) -> bool:
    """A deterministic op applied element by element (torch's `pointwise` tag), or a dtype cast."""
    if not isinstance(node, fx.Node) or node.op != "call_function" or not isinstance(node.target, torch._ops.OpOverload):
        return False
    if node.target is aten._to_copy.default:
        return set(node.kwargs) <= {"dtype"}
    tags = node.target.tags
    return (torch.Tag.pointwise in tags or node.target in _ELEMENTWISE_EXTRA) \
        and torch.Tag.nondeterministic_seeded not in tags


def consumers(node: fx.Node) -> list[fx.Node]:
    """The nodes that use `node`'s data, looking through view-like users (which are not listed)."""
    out, stack, seen = [], list(node.users), set()
    while stack:
        u = stack.pop()
        if u in seen:
            continue
        seen.add(u)
        if is_call(u, *VIEW_LIKE):
            stack.extend(u.users)
        elif not is_call(u, aten._assert_tensor_metadata.default):
            out.append(u)
    return out


def through_view_like(node: fx.Node) -> fx.Node:
    """Walk backwards through view-like ops to the node that produced the data."""
    while is_call(node, *VIEW_LIKE) and isinstance(node.args[0], fx.Node):
        node = node.args[0]
    return node


def single_user(node: fx.Node, skip: Iterable = ()) -> Optional[fx.Node]:
    users = [u for u in node.users if not is_call(u, *skip)]
    return users[0] if len(users) == 1 else None


def forward_through_view_like(node: fx.Node) -> fx.Node:
    """Walk forwards while the only consumer is a view-like op."""
    while True:
        users = [u for u in node.users if not is_call(u, aten._assert_tensor_metadata.default)]
        if len(users) != 1 or not is_call(users[0], *VIEW_LIKE):
            return node
        node = users[0]


def weight_name(node: Any) -> Optional[str]:
    """The parameter name behind a weight argument (a get_attr, maybe transposed)."""
    if not isinstance(node, fx.Node):
        return None
    while is_call(node, aten.t.default, aten.permute.default, aten.transpose.int):
        node = node.args[0]
    return node.target if node.op == "get_attr" else None


def scalar(value: Any) -> Optional[float]:
    """A Python number, or None if the argument is a tensor or missing."""
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value)
    return None


def bind(target: Any, args: tuple = (), kwargs: Optional[dict] = None) -> Optional[dict]:
    """Every argument of a call to an op, by the op's schema names, defaults filled in; None if they do not fit.

    Works for FX nodes' args (nodes stay nodes) and for run-time values alike. As in
    torch.fx.operator_schemas, an argument the schema calls `self` is named `input`.
    """
    if not isinstance(target, torch._ops.OpOverload):
        return None
    pair = normalize_function(target, tuple(args), dict(kwargs or {}), normalize_to_only_use_kwargs=True)
    return None if pair is None else dict(pair.kwargs)


def call_args(node: fx.Node) -> dict:
    """`bind` of a call_function node; an error naming the node if its arguments do not fit the schema."""
    bound = bind(node.target, node.args, node.kwargs)
    if bound is None:
        raise ValueError(f"{node.name}: the arguments {node.args} {node.kwargs} do not fit the schema of "
                         f"{node.target}")
    return bound


_ATTENTION_NAMES = {"q": "query", "k": "key", "v": "value"}


def attention_args(node_or_target: Any, args: Optional[tuple] = None, kwargs: Optional[dict] = None) -> dict:
    """SDPA-style arguments by name: query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa.

    For aten.scaled_dot_product_attention and the ops with its contract (sparsecc::attention,
    whose q/k/v are renamed): `attention_args(node)`, or `attention_args(target, args, kwargs)`
    with run-time values.
    """
    if isinstance(node_or_target, fx.Node):
        target, args, kwargs = node_or_target.target, node_or_target.args, node_or_target.kwargs
    else:
        target = node_or_target
    bound = bind(target, args or (), kwargs)
    if bound is None:
        raise ValueError(f"attention arguments {args} {kwargs} do not fit the schema of {target}")
    return {_ATTENTION_NAMES.get(k, k): v for k, v in bound.items()}


def is_getitem(node: Any) -> bool:
    return isinstance(node, fx.Node) and node.op == "call_function" and node.target is operator.getitem


def _fake_mode_of(*values):
    from torch._guards import detect_fake_mode
    return detect_fake_mode([v for v in values if isinstance(v, torch.Tensor)])


def new_call(graph: fx.Graph, target, args: tuple, kwargs: Optional[dict] = None,
             meta_from: Optional[fx.Node] = None) -> fx.Node:
    """Insert a call_function node (at the graph's current insert point) with a fake `val`.

    The fake value is computed from the inputs' fake values, so shape facts stay
    available to later passes; module-stack metadata is copied from `meta_from`.
    """
    kwargs = kwargs or {}
    node = graph.call_function(target, args, kwargs)
    if meta_from is not None:
        for key in ("nn_module_stack", "stack_trace", "source_fn_stack"):
            if key in meta_from.meta:
                node.meta[key] = meta_from.meta[key]
    fake_args = fx.node.map_arg(args, lambda n: n.meta.get("val"))
    fake_kwargs = fx.node.map_arg(kwargs, lambda n: n.meta.get("val"))
    mode = _fake_mode_of(*pytree_leaves((fake_args, fake_kwargs)))
    if mode is not None:
        with mode:
            node.meta["val"] = target(*fake_args, **fake_kwargs)
    return node


def pytree_leaves(tree) -> list:
    from torch.utils import _pytree as pytree
    return pytree.tree_leaves(tree)


def replace_node(old: fx.Node, new: fx.Node) -> None:
    """Redirect every use of `old` to `new`, and erase `old`.

    Views downstream of `old` were legal for the strides `old` promised; `new` may
    lay its output out differently (another kernel), so those views become
    reshapes, which copy only when the strides require it.
    """
    old.replace_all_uses_with(new)
    views_to_reshapes(new)
    old.graph.erase_node(old)


def views_to_reshapes(node: fx.Node) -> int:
    """Turn the views downstream of `node` (through view-like ops) into reshapes, which copy only when the
    strides require it: their legality depends on how `node`'s kernel lays out its output. Returns how many."""
    stack, changed = list(node.users), 0
    while stack:
        user = stack.pop()
        if user.op != "call_function" or user.target not in VIEW_LIKE:
            continue
        if user.target in (aten.view.default, aten._unsafe_view.default):
            user.target = aten.reshape.default
            changed += 1
        stack.extend(user.users)
    return changed


def evaluate(gm: fx.GraphModule, nodes: list[fx.Node], args: tuple, kwargs: dict) -> dict:
    """Values of `nodes` on the given inputs, computing only their ancestors."""
    needed, stack = set(), list(nodes)
    while stack:
        n = stack.pop()
        if n in needed:
            continue
        needed.add(n)
        stack.extend(n.all_input_nodes)
    in_spec = gm.graph._codegen.pytree_info.in_spec
    flat = fx_pytree.tree_flatten_spec((args, kwargs), in_spec)
    env: dict = {}
    placeholders = iter(flat)
    interp = fx.Interpreter(gm)
    with torch.no_grad():
        for node in gm.graph.nodes:
            if node.op == "placeholder":
                value = next(placeholders)
                if node in needed:
                    env[node] = value
                continue
            if node not in needed:
                continue
            a = fx.node.map_arg(node.args, lambda n: env[n])
            k = fx.node.map_arg(node.kwargs, lambda n: env[n])
            env[node] = getattr(interp, node.op)(node.target, a, k)
    return {n: env[n] for n in nodes}

"""Find the attention and FFN regions of a canonicalized graph, and the residual blocks around them.

Regions are plain records of graph facts. They hold references to the FX nodes
they describe (valid until the graph is rewritten; passes find regions again
after a rewrite) and `to_dict()` gives the JSON-able facts.

Attention is anchored on the SDPA node (canonicalization turns eager attention
into SDPA first) and walks outwards to the projections. An FFN is found by its
structure, anchored on its down projection: a linear whose input is computed from
one linear (up) through elementwise ops, or as act(gate) * up from two linears on
the same input. The activation is named by evaluating those ops as a function and
comparing it with sparsecc.ops.activations, so quick_gelu, GELU written out by hand,
squared ReLU... need no entry here. `match_ffn` says why a candidate is not an FFN.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
import torch.fx as fx

from sparsecc.graph.fx_utils import (LINEAR, SDPA, aten, attention_args, common_path, consumers, fake,
                                     forward_through_view_like, is_call, is_elementwise, layer_index, module_class,
                                     module_path, module_stack, shape, stack_name, through_view_like, weight_name)
from sparsecc.graph.mask_rows import MaskRows, masked, sample_rows
from sparsecc.graph.match import Match, describe
from sparsecc.ops.activations import ACTIVATIONS, identify

# Nodes a projection search does not walk through.
_BARRIERS = {SDPA, aten.layer_norm.default, aten.softmax.int, aten.embedding.default, LINEAR}


@dataclass
class ResidualBlock:
    """x -> [norm] -> sublayer -> add(x, .) [-> norm]: what token routing wraps."""

    kind: str  # "attention" | "ffn"
    region: str  # name of the region inside
    residual: fx.Node  # x, the block's input on the skip path
    add: fx.Node  # x + sublayer(...)
    norm_position: str  # "pre" | "post" | "none"
    norm: Optional[fx.Node] = None
    output: Optional[fx.Node] = None  # the block's output: the norm after the add (post-LN) or the add
    parallel: bool = False  # x + (attention(n(x)) + ffn(n'(x))): one add of x for both sublayers (Phi, Falcon)

    def to_dict(self) -> dict:
        return {"kind": self.kind, "region": self.region, "norm_position": self.norm_position, "parallel": self.parallel,
                "residual": self.residual.name, "add": self.add.name,
                "norm": self.norm.name if self.norm is not None else None,
                "output": self.output.name if self.output is not None else None}


@dataclass
class Region:
    name: str
    kind: str
    path: str
    module_class: str
    layer: Optional[int]
    stack: str
    flops: int
    residual: Optional[ResidualBlock] = None
    # filled by a sparsifying rewrite: {"method", "density", "flops" (sparse), ...}
    sparse: Optional[dict] = None

    def _node_fields(self) -> dict:
        return {}

    def to_dict(self) -> dict:
        out = {}
        for key, value in self.__dict__.items():
            if isinstance(value, fx.Node):
                value = value.name
            elif isinstance(value, ResidualBlock):
                value = value.to_dict()
            elif isinstance(value, dict):
                value = {k: (v.name if isinstance(v, fx.Node) else v) for k, v in value.items()}
            out[key] = value
        return out


@dataclass
class AttentionRegion(Region):
    sdpa: Optional[fx.Node] = None
    q_proj: Optional[fx.Node] = None
    k_proj: Optional[fx.Node] = None
    v_proj: Optional[fx.Node] = None
    o_proj: Optional[fx.Node] = None
    weights: dict = field(default_factory=dict)  # role -> parameter name
    fused_qkv: bool = False
    heads: Optional[int] = None
    kv_heads: Optional[int] = None
    head_dim: Optional[int] = None
    batch: Optional[int] = None
    q_len: Optional[int] = None
    kv_len: Optional[int] = None
    d_model: Optional[int] = None
    causal: bool = False
    causal_source: Optional[str] = None  # "is_causal" | "mask"
    mask: Optional[fx.Node] = None
    mask_kind: str = "none"  # "none" | "bool" | "additive"
    mask_shape: Optional[tuple] = None
    cross: bool = False
    rotary: bool = False
    scale: Optional[float] = None
    window: Optional[int] = None  # a causal sliding window of this many keys, read from the mask's values


@dataclass
class FFNRegion(Region):
    up: Optional[fx.Node] = None
    gate: Optional[fx.Node] = None
    down: Optional[fx.Node] = None
    input: Optional[fx.Node] = None
    activation: Optional[str] = None  # a sparsecc.ops.activations name; None: the chain computes none of them
    chain: str = ""  # what the elementwise ops compute, as a formula of x (the gate's or up's output)
    gated: bool = False
    d_model: Optional[int] = None
    d_ff: Optional[int] = None
    tokens: Optional[int] = None
    weights: dict = field(default_factory=dict)

    def activation_match(self) -> Match:
        """Ok with the activation's name, or why a rewrite that computes the activation cannot take it."""
        if self.activation is not None:
            return Match.ok(self.activation)
        return Match.fail("ffn.activation", f"activation is not one of {', '.join(ACTIVATIONS)}: between "
                          f"{(self.gate or self.up).name} and {self.down.name} it computes {self.chain}",
                          self.down, progress=10)


# ------------------------------------------------------------------ helpers


def linear_flops(node: fx.Node) -> int:
    x, w = fake(node.args[0]), fake(node.args[1])
    if x is None or w is None:
        return 0
    rows = math.prod(shape(node.args[0])[:-1])
    out_f, in_f = shape(node.args[1])
    return 2 * rows * in_f * out_f


def _projections(start: Any, limit: int = 96) -> tuple[list[fx.Node], set]:
    """Linear nodes reached walking back from `start` (not through barriers), and the ops seen."""
    found, seen_ops, visited = [], set(), set()
    queue = deque([start])
    while queue and len(visited) < limit:
        node = queue.popleft()
        if not isinstance(node, fx.Node) or node in visited:
            continue
        visited.add(node)
        if is_call(node, LINEAR):
            found.append(node)
            continue
        if node.op != "call_function" or node.target in _BARRIERS:
            continue
        seen_ops.add(node.target)
        queue.extend(a for a in node.all_input_nodes)
    return found, seen_ops


def _is_rotary(ops: set) -> bool:
    return bool(ops & {aten.cos.default, aten.sin.default}) or {aten.neg.default, aten.cat.default} <= ops


def _linear_input(node: Optional[fx.Node]) -> Optional[fx.Node]:
    return through_view_like(node.args[0]) if node is not None else None


# ------------------------------------------------------------------ mask probing (sparsecc.graph.mask_rows)


def _mask_is_causal(sample: MaskRows) -> bool:
    """True when every key after its query is masked in every batch item and head (in the sampled rows)."""
    mask = sample.values
    if mask.dim() < 2 or sample.length < 2:
        return False
    S = mask.shape[-1]
    upper = torch.arange(S).unsqueeze(0) > sample.rows.unsqueeze(1) + max(S - sample.length, 0)  # [rows, S]
    if not upper.any():
        return False
    return bool(masked(mask)[..., upper].all())


def _mask_window(sample: MaskRows) -> Optional[int]:
    """w when the mask's keys, over every batch item and head together, are exactly a causal sliding window
    of w keys (query i sees i-w < j <= i, the last query aligned with the last key) and w is shorter than
    the sequence; else None. Padding hides keys in some items only, so the union shows the window."""
    mask = sample.values
    if mask.dim() < 2 or sample.length < 2:
        return None
    R, S = mask.shape[-2:]
    seen = (~masked(mask)).reshape(-1, R, S).any(0)  # [rows, S]
    rows = (sample.rows + (S - sample.length)).unsqueeze(1)  # key-aligned query positions
    j = torch.arange(S).unsqueeze(0)
    lowest = torch.where(seen, j, S).min(1).values
    has = seen.any(1)
    if not bool(has.any()):
        return None
    w = int((rows.squeeze(1) - lowest)[has].max()) + 1
    if w >= S or not bool((seen == ((j <= rows) & (j > rows - w))).all()):
        return None
    return w


# ------------------------------------------------------------------ finders
def find_attention(gm: fx.GraphModule, captured=None) -> list[AttentionRegion]:
    regions = []
    for node in gm.graph.nodes:
        if not is_call(node, SDPA, torch.ops.sparsecc.attention.default):
            continue
        a = attention_args(node)
        q_lin, q_ops = _projections(a["query"])
        k_lin, k_ops = _projections(a["key"])
        v_lin, _ = _projections(a["value"])
        q_proj = q_lin[0] if len(q_lin) == 1 else None
        k_proj = k_lin[0] if len(k_lin) == 1 else None
        v_proj = v_lin[0] if len(v_lin) == 1 else None
        out = forward_through_view_like(node)
        o_users = [u for u in out.users if is_call(u, LINEAR)]
        o_proj = o_users[0] if len(o_users) == 1 and len(out.users) == 1 else None
        qs, ks = shape(a["query"]), shape(a["key"])
        fused = q_proj is not None and q_proj is k_proj
        heads = qs[-3] if len(qs) == 4 else None
        kv_heads = ks[-3] if len(ks) == 4 else None
        head_dim = qs[-1]
        d_model = shape(q_proj.args[0])[-1] if q_proj is not None else None
        if heads is None and q_proj is not None:
            heads = (shape(q_proj)[-1] // (3 if fused else 1)) // head_dim
            kv_heads = heads
        path = module_path(node)
        cross = not fused and _linear_input(q_proj) is not _linear_input(k_proj)
        mask = a["attn_mask"] if isinstance(a["attn_mask"], fx.Node) else None
        mval = fake(mask)
        region = AttentionRegion(
            name=path or node.name, kind="attention", path=path, module_class=module_class(node),
            layer=layer_index(path), stack=stack_name(path), flops=0, sdpa=node,
            q_proj=q_proj, k_proj=k_proj, v_proj=v_proj, o_proj=o_proj,
            weights={role: weight_name(p.args[1]) for role, p in
                     (("q", q_proj), ("k", k_proj), ("v", v_proj), ("o", o_proj)) if p is not None},
            fused_qkv=fused, heads=heads, kv_heads=kv_heads, head_dim=head_dim,
            batch=qs[0] if len(qs) >= 3 else None, q_len=qs[-2], kv_len=ks[-2], d_model=d_model,
            causal=bool(a["is_causal"]), causal_source="is_causal" if a["is_causal"] else None,
            mask=mask, mask_kind="none" if mval is None else ("bool" if mval.dtype == torch.bool else "additive"),
            mask_shape=shape(mask) if mask is not None else None,
            cross=cross, rotary=_is_rotary(q_ops) or _is_rotary(k_ops), scale=a["scale"])
        region.flops = _attention_flops(region)
        regions.append(region)
    _probe_masks(gm, regions, captured)
    _dedupe_names(regions)
    return regions


def attention_core_flops(r: AttentionRegion) -> int:
    """FLOPs of QK^T and PV alone: the part a block layout scales."""
    qs, vs = shape(r.sdpa.args[0]), shape(r.sdpa.args[2])
    return 2 * math.prod(qs[:-2]) * r.q_len * r.kv_len * (qs[-1] + vs[-1])


def _attention_flops(r: AttentionRegion) -> int:
    core = attention_core_flops(r)
    projections = {p for p in (r.q_proj, r.k_proj, r.v_proj, r.o_proj) if p is not None}
    return core + sum(linear_flops(p) for p in projections)


def _probe_masks(gm, regions: list[AttentionRegion], captured) -> None:
    """Causality and sliding windows read from the masks' values on the example inputs."""
    pending = [r for r in regions if r.mask is not None and not r.cross]
    if not pending or captured is None:
        return
    kwargs = {**captured.call_defaults, **captured.kwargs}
    samples = {m: sample_rows(gm, m, captured.args, kwargs) for m in {r.mask for r in pending}}
    for r in pending:
        sample = samples[r.mask]
        if sample is None:
            continue
        if not r.causal and _mask_is_causal(sample):
            r.causal, r.causal_source = True, "mask"
        if r.causal:
            r.window = _mask_window(sample)
            declared = getattr(captured, "sliding_window", None)
            if r.window is None and declared is not None and sample.length <= declared:
                # the example is too short to show the window the config declares: longer calls will
                r.window = declared


def _dedupe_names(regions: list[Region]) -> None:
    """Unique names; regions outside any numbered module get `<kind>.<ordinal>` and an ordinal layer."""
    seen: dict = {}
    for i, r in enumerate(regions):
        if not r.path:
            r.name = f"{r.kind}.{i}"
        if r.layer is None:
            r.layer = i
        if r.name in seen:
            seen[r.name] += 1
            r.name = f"{r.name}#{seen[r.name]}"
        else:
            seen[r.name] = 0


# ------------------------------------------------------------------ FFN by structure
@dataclass
class _Chain:
    """The elementwise ops between an FFN's up (and gate) projections and its down projection."""

    root: fx.Node  # its output: the down projection's input (through view-like ops)
    nodes: set  # the elementwise nodes, each used only inside the chain (the root: by the down projection)
    sources: list  # linears the chain reads, in graph order
    constants: set  # one-element constants it reads (tensor literals)
    foreign: list  # (node, why) other tensors it reads


def _const_tensor(node: fx.Node) -> bool:
    val = fake(node)
    return val is not None and val.numel() == 1 and (node.op == "get_attr" or (
        node.op == "call_function" and not node.all_input_nodes))


def _chain(down: fx.Node, limit: int = 64) -> Optional[_Chain]:
    """The chain feeding `down`'s input; None when no elementwise op computes it."""
    root = through_view_like(down.args[0]) if down.args and isinstance(down.args[0], fx.Node) else None
    if not is_elementwise(root):
        return None
    members, stack = set(), [root]
    while stack and len(members) < limit:
        n = stack.pop()
        if n in members:
            continue
        members.add(n)
        stack.extend(s for s in map(through_view_like, n.all_input_nodes) if is_elementwise(s))
    shared: dict = {}  # a node also used outside the chain leaves it, with one such user
    changed = True
    while changed:
        changed = False
        for n in list(members):
            outside = [u for u in consumers(n) if u not in members]
            if n is not root and outside:
                members.discard(n)
                shared[n] = outside[0]
                changed = True
    nodes, sources, constants, foreign, stack = set(), [], set(), [], [root]
    while stack:  # what is still connected to the root, and what it reads
        n = stack.pop()
        if n in nodes:
            continue
        nodes.add(n)
        for s in map(through_view_like, n.all_input_nodes):
            if s in members:
                stack.append(s)
            elif is_call(s, LINEAR):
                if s not in sources:
                    sources.append(s)
            elif _const_tensor(s):
                constants.add(s)
            elif s not in [f for f, _ in foreign]:
                why = f"also used by {describe(shared[s])}" if s in shared else "not computed from a projection"
                foreign.append((s, why))
    order = {n: i for i, n in enumerate(root.graph.nodes)}
    sources.sort(key=order.get)
    return _Chain(root, nodes, sources, constants, foreign)


def _constant_value(node: fx.Node) -> torch.Tensor:
    if node.op == "get_attr":
        value = node.graph.owning_module
        for part in node.target.split("."):
            value = getattr(value, part)
    else:
        value = node.target(*node.args, **node.kwargs)
    return value.detach().to("cpu", torch.float64)


def _is_float_cast(node: fx.Node) -> bool:
    dtype = node.kwargs.get("dtype")
    return is_call(node, aten._to_copy.default) and (dtype is None or dtype.is_floating_point)


def _branch(out: fx.Node, chain: _Chain) -> tuple[list, set]:
    """The chain nodes `out` depends on (graph order) and the linears they read."""
    nodes, found, stack = set(), set(), [through_view_like(out)]
    while stack:
        n = stack.pop()
        if n in chain.sources:
            found.add(n)
        elif n in chain.nodes and n not in nodes:
            nodes.add(n)
            stack.extend(map(through_view_like, n.all_input_nodes))
    return [n for n in out.graph.nodes if n in nodes], found


def _as_function(out: fx.Node, source: fx.Node, chain: _Chain):
    """The chain from `source` to `out` as a function of one tensor (view-like ops and float casts: identity)."""
    nodes, _ = _branch(out, chain)

    def fn(x: torch.Tensor) -> torch.Tensor:
        env = {source: x, **{c: _constant_value(c) for c in chain.constants}}
        value = lambda a: env[through_view_like(a)]  # noqa: E731
        for n in nodes:
            if _is_float_cast(n):
                env[n] = value(n.args[0])
            else:
                env[n] = n.target(*fx.node.map_arg(n.args, value), **fx.node.map_arg(n.kwargs, value))
        return env[through_view_like(out)]
    return fn


def _expr(node: Any, names: dict, depth: int = 0) -> str:
    """A readable formula of a chain node over its sources (`names`: node -> "x" / "gate" / "up")."""
    if not isinstance(node, fx.Node):
        return f"{node:g}" if isinstance(node, float) else repr(node)
    node = through_view_like(node)
    if node in names:
        return names[node]
    if depth > 8 or node.op != "call_function":
        return node.name
    op = getattr(getattr(node.target, "_overloadpacket", None), "__name__", node.name)
    args = [_expr(a, names, depth + 1) for a in node.args]
    args += [f"{k}={v!r}" for k, v in node.kwargs.items() if k != "dtype"]
    return f"{op}({', '.join(args)})" if op != "_to_copy" else args[0]


@dataclass
class _FFNParts:
    up: fx.Node
    gate: Optional[fx.Node]
    activation: Optional[str]
    chain: str  # the formula between the projections, e.g. "mul(x, sigmoid(mul(x, 1.702)))"


def match_ffn(down: fx.Node) -> Match:
    """down(act(up(x))) or down(act(gate(x)) * up(x)), act any elementwise chain -> Match.ok(_FFNParts).

    The activation is named by evaluating the chain against sparsecc.ops.activations; a chain that
    is none of them still matches, with activation None. Progress 0: `down` is no FFN's down projection.
    """
    if not is_call(down, LINEAR):
        return Match.fail("ffn", "not a linear", down, progress=0)
    chain = _chain(down)
    if chain is None or not chain.sources:
        return Match.fail("ffn", f"the input of {down.name} is not computed from another linear through elementwise "
                          "ops", down, progress=0)
    sources = ", ".join(s.name for s in chain.sources)
    if chain.foreign:
        node, why = chain.foreign[0]
        return Match.fail("ffn.inputs", f"the elementwise ops between {sources} and {down.name} also read "
                          f"{describe(node)}, {why}", down, node, progress=1)
    for s in chain.sources:
        outside = [u for u in consumers(s) if u not in chain.nodes]
        if outside:
            return Match.fail("ffn.up_users", f"the projection {s.name} is also used by {describe(outside[0])}",
                              down, s, outside[0], progress=2)
    outside = [u for u in consumers(chain.root) if u is not down]
    if outside:
        return Match.fail("ffn.hidden_users", f"the hidden activation {chain.root.name} is also used by "
                          f"{describe(outside[0])}", down, chain.root, outside[0], progress=3)
    if len(chain.sources) > 2:
        return Match.fail("ffn.sources", f"the elementwise ops combine {len(chain.sources)} linears ({sources}); an "
                          "FFN has an up projection and at most a gate", down, *chain.sources, progress=4)
    if len(chain.sources) == 1:
        up = chain.sources[0]
        return Match.ok(_ffn_parts(up, None, chain.root, chain))
    a, b = chain.sources
    if _linear_input(a) is not _linear_input(b):
        return Match.fail("ffn.gated", f"the linears {a.name} and {b.name} read different inputs "
                          f"({_linear_input(a).name}, {_linear_input(b).name}); a gated FFN's gate and up "
                          "projections read the same", down, a, b, progress=5)
    root = chain.root
    formula = _expr(root, {a: a.name, b: b.name})
    if not is_call(root, aten.mul.Tensor) or not all(isinstance(x, fx.Node) for x in root.args[:2]):
        return Match.fail("ffn.gated", f"the chain computes {formula}, not act(gate) * up", down, root, progress=5)
    branches = [(x, _branch(x, chain)) for x in root.args[:2]]
    if any(len(found) != 1 for _, (_, found) in branches) or branches[0][1][1] == branches[1][1][1]:
        return Match.fail("ffn.gated", f"the chain computes {formula}, not act(gate) * up", down, root, progress=5)
    plain = [all(_is_float_cast(n) for n in nodes) for _, (nodes, _) in branches]  # the up factor: no function
    if not any(plain):
        return Match.fail("ffn.gated", f"both factors of {formula} apply a function; expected act(gate) * up",
                          down, root, progress=6)
    (_, (_, up)), (act_side, (_, gate)) = branches if plain[0] else branches[::-1]
    return Match.ok(_ffn_parts(next(iter(up)), next(iter(gate)), act_side, chain))


def _ffn_parts(up: fx.Node, gate: Optional[fx.Node], act_out: fx.Node, chain: _Chain) -> _FFNParts:
    source = gate if gate is not None else up
    name = identify(_as_function(act_out, source, chain))
    return _FFNParts(up, gate, name, _expr(act_out, {source: "x"}))


def find_ffn(gm: fx.GraphModule, unknown_activation: bool = False) -> list[FFNRegion]:
    """FFN regions in graph order. Regions whose activation is none of sparsecc.ops.activations
    (activation None) are left out unless `unknown_activation` (rewrites cannot compute them)."""
    regions = []
    for down in gm.graph.nodes:
        m = match_ffn(down)
        if not m:
            continue
        up, gate = m.value.up, m.value.gate
        path = common_path(*(module_path(n) for n in (up, gate, down) if n is not None))
        flops = sum(linear_flops(n) for n in (up, gate, down) if n is not None)
        regions.append(FFNRegion(
            name=path or down.name, kind="ffn", path=path, module_class="", layer=layer_index(path),
            stack=stack_name(path), flops=flops, up=up, gate=gate, down=down, input=up.args[0],
            activation=m.value.activation, chain=m.value.chain, gated=gate is not None,
            d_model=shape(up.args[0])[-1], d_ff=shape(up)[-1], tokens=math.prod(shape(up.args[0])[:-1]),
            weights={role: weight_name(n.args[1]) for role, n in (("up", up), ("gate", gate), ("down", down))
                     if n is not None}))
    for r in regions:
        r.module_class = _class_at(gm, r.path)
    _dedupe_names(regions)
    return [r for r in regions if unknown_activation or r.activation is not None]


def _class_at(gm: fx.GraphModule, path: str) -> str:
    for node in gm.graph.nodes:
        for p, cls in reversed(module_stack(node)):
            if p == path:
                return cls
    return ""


# ------------------------------------------------------------------ residual blocks
_NORM_TARGETS = {aten.layer_norm.default, aten.rsqrt.default, aten.native_layer_norm.default,
                 aten.rms_norm.default} if hasattr(aten, "rms_norm") else {aten.layer_norm.default,
                                                                            aten.rsqrt.default}


def _is_norm_output(node: fx.Node, stop: fx.Node, depth: int = 12) -> Optional[fx.Node]:
    """If `node` is a normalisation of `stop` (LayerNorm, RMSNorm decomposed), the norm's anchor node."""
    queue, seen = deque([(node, 0)]), set()
    norm = None
    while queue:
        n, d = queue.popleft()
        if n in seen or d > depth or not isinstance(n, fx.Node):
            continue
        seen.add(n)
        if n is stop:
            continue
        if n.op != "call_function":
            continue
        if n.target in _NORM_TARGETS:
            norm = norm or n
        queue.extend((a, d + 1) for a in n.all_input_nodes if a.op == "call_function" or a is stop)
    return norm if stop in seen else None


def _parallel_residual(add: fx.Node, sublayer_in: fx.Node) -> Optional[tuple[fx.Node, fx.Node]]:
    """(x, the add of x) when `add` sums this sublayer's output with another branch and that sum is then
    added to x, the stream both sublayers normalise: parallel attention + FFN on one residual."""
    users = [u for u in add.users if is_call(u, aten.add.Tensor)]
    if len(users) != 1 or len(add.users) != 1:
        return None
    outer = users[0]
    residual = outer.args[1] if outer.args[0] is add else outer.args[0]
    if not isinstance(residual, fx.Node) or _is_norm_output(sublayer_in, residual) is None:
        return None
    return residual, outer  # the other branch is the other sublayer: find_segments checks both name this add


def find_residual(region: Region, sublayer_in: Optional[fx.Node], sublayer_out: Optional[fx.Node]) -> Optional[ResidualBlock]:
    if sublayer_in is None or sublayer_out is None:
        return None
    out = forward_through_view_like(sublayer_out)
    adds = [u for u in out.users if is_call(u, aten.add.Tensor)]
    if len(adds) != 1:
        return None
    add = adds[0]
    residual = add.args[1] if add.args[0] is out else add.args[0]
    if not isinstance(residual, fx.Node):
        return None
    parallel = _parallel_residual(add, sublayer_in)
    if parallel is not None:
        residual, add = parallel
        return ResidualBlock(kind=region.kind, region=region.name, residual=residual, add=add, norm_position="pre",
                             norm=sublayer_in, output=add, parallel=True)
    if through_view_like(sublayer_in) is through_view_like(residual):
        position, norm = "post", None
        after = [u for u in add.users if is_call(u, aten.layer_norm.default)]
        norm = after[0] if len(after) == 1 and len(add.users) == 1 else None
        if norm is None:
            position = "none"
    else:
        if _is_norm_output(sublayer_in, residual) is None:
            return None
        position, norm = "pre", sublayer_in
    output = norm if position == "post" else add
    return ResidualBlock(kind=region.kind, region=region.name, residual=residual, add=add,
                         norm_position=position, norm=norm, output=output)


def find_regions(gm: fx.GraphModule, captured=None) -> list[Region]:
    """All attention and FFN regions in graph order, with their residual blocks (FFNs of any activation)."""
    attention = find_attention(gm, captured)
    ffn = find_ffn(gm, unknown_activation=True)
    for r in attention:
        r.residual = find_residual(r, _linear_input(r.q_proj), r.o_proj)
    for r in ffn:
        r.residual = find_residual(r, r.input, r.down)
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    return sorted(attention + ffn, key=lambda r: order[r.sdpa if r.kind == "attention" else r.down])

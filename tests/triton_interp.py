"""Triton kernels under the interpreter vs the CPU reference ops: the cases of tests/test_triton.py.

Triton fixes its mode (compiled or interpreted) when it is first imported, and torch.compile
imports it, so the kernels cannot be interpreted reliably inside a pytest worker that ran other
tests. tests/test_triton.py runs this file in a fresh process with TRITON_INTERPRET=1
(`python tests/triton_interp.py [CASE ...]`), which prints one JSON object: case name -> max abs
errors (or the error text). Run it directly to debug a case.
"""

from __future__ import annotations

import json
import math
import os
import sys
import traceback
from typing import Callable, Optional

import torch
from torch.utils._python_dispatch import TorchDispatchMode

TOL = {torch.float32: 2e-5, torch.float16: 4e-3}

CASES: dict[str, Callable[[], dict]] = {}


def case(name: str):
    def deco(fn):
        CASES[name] = fn
        return fn
    return deco


def _max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.detach().double() - b.detach().double()).abs().max()) if a.numel() else 0.0


# ---------------------------------------------------------------------------------------------
# block-sparse attention


def _attention_case(dtype: torch.dtype, B=1, H=2, Hkv=2, L=32, S=32, D=16, b=16, causal=False, padding=False,
                    density=0.6, empty_row: Optional[int] = None, layout_len: Optional[int] = None,
                    pad_block: bool = False, bias_heads: Optional[int] = None, window: Optional[int] = None,
                    seed=0) -> dict:
    """Max abs errors of the Triton forward/backward vs the CPU op on the same (upcast) inputs."""
    from sparsecc.ops.block_sparse_attention.triton import (block_sparse_attention_backward,
                                                            block_sparse_attention_forward)
    from sparsecc.layouts.indexing import block_mask_to_ell
    from sparsecc.ops.block_sparse_attention import block_sparse_attention_backward_op, block_sparse_attention_op

    g = torch.Generator().manual_seed(seed)
    lq = layout_len or L
    nq, nk = -(-lq // b), -(-max(S, lq if layout_len else S) // b)
    block_mask = torch.rand(nq, nk, generator=g) < density
    block_mask[:, 0] |= True  # most rows keep something; empty_row below empties one on purpose
    if empty_row is not None:
        block_mask[empty_row] = False
    idx, cnt = block_mask_to_ell(block_mask)
    q = torch.randn(B, H, L, D, generator=g).to(dtype)
    k = torch.randn(B, Hkv, S, D, generator=g).to(dtype)
    v = torch.randn(B, Hkv, S, D, generator=g).to(dtype)
    kpm = (torch.rand(B, S, generator=g) < 0.7) if padding else None
    if pad_block:  # the whole first key block is padding for item 0: rows keeping only it are empty
        kpm[0, :b] = False
    bias = None
    if bias_heads is not None:  # a per-head (or shared) score bias, -inf outside a sliding window
        bias = torch.randn(B, bias_heads, L, S, generator=g)
        if window is not None:
            bias = bias.masked_fill(torch.arange(S)[None] <= torch.arange(L)[:, None] - window, float("-inf"))
        bias = bias.to(dtype)
    scale = 1.0 / math.sqrt(D)
    out, lse = block_sparse_attention_forward(q, k, v, idx, cnt, b, scale, causal, kpm, bias)
    q32, k32, v32 = q.float(), k.float(), v.float()
    b32 = None if bias is None else bias.float()
    ref_out, ref_lse = block_sparse_attention_op(q32, k32, v32, idx, cnt, b, scale, causal, kpm, b32)
    grad = torch.randn(ref_out.shape, generator=g)
    dq, dk, dv = block_sparse_attention_backward(grad.to(dtype), q, k, v, out, lse, idx, cnt, b, scale, causal, kpm,
                                                 bias)
    rdq, rdk, rdv = block_sparse_attention_backward_op(grad, q32, k32, v32, ref_out, ref_lse, idx, cnt, b, scale,
                                                       causal, kpm, b32)
    finite = torch.isfinite(ref_lse)
    return {
        "dtypes_ok": out.dtype == dtype and dq.dtype == dtype and dk.dtype == dtype and lse.dtype == torch.float32,
        "shapes_ok": out.shape == q.shape and lse.shape == q.shape[:3] and dk.shape == k.shape,
        "empty_rows": int((~finite).sum()),
        "empty_rows_match": bool(torch.equal(torch.isneginf(lse), ~finite)),
        "empty_rows_zero": bool((out[~finite] == 0).all()) and bool((dq[~finite] == 0).all()),
        "out": _max_err(out, ref_out),
        "lse": _max_err(lse[finite], ref_lse[finite]),
        "dq": _max_err(dq, rdq),
        "dk": _max_err(dk, rdk),
        "dv": _max_err(dv, rdv),
        "tol": TOL[dtype],
    }


ATTENTION = {
    # name: keyword arguments of _attention_case
    "none": dict(),
    "causal": dict(L=48, S=48, causal=True),
    "key_padding": dict(B=2, padding=True),
    "partial_blocks": dict(B=2, L=37, S=45, causal=True, padding=True),  # L, S not multiples of b; L != S
    "gqa": dict(H=6, Hkv=2, L=40, S=40, causal=True),
    "empty_rows": dict(B=2, L=48, S=48, empty_row=1, padding=True, pad_block=True),
    "small_block": dict(H=4, Hkv=2, L=29, S=29, b=8, causal=True, padding=True, empty_row=2),  # b smaller than a tile
    "multi_tile_block": dict(L=64, S=64, b=32, D=24, causal=True),  # b = 2 tiles; D not a power of two
    "cropped_layout": dict(L=40, S=40, layout_len=80, causal=True),  # a layout made for a longer sequence
    "bias_per_head": dict(B=2, H=4, Hkv=2, L=37, S=37, causal=True, padding=True, bias_heads=4),  # ALiBi-like
    "bias_window": dict(B=2, L=48, S=48, b=8, causal=True, bias_heads=1, window=12),  # a sliding window as -inf
}
for _name, _kw in ATTENTION.items():
    for _dt, _tag in ((torch.float32, "fp32"), (torch.float16, "fp16")):
        CASES[f"attention/{_name}/{_tag}"] = (lambda kw=_kw, dt=_dt: _attention_case(dt, **kw))


@case("attention/cpu_tensors_report")
def _attention_checks() -> dict:
    """Layout errors are reported like the CPU op's; fp64 is refused with a clear message."""
    from sparsecc.ops.block_sparse_attention.triton import block_sparse_attention_forward
    from sparsecc.errors import LayoutError, UnsupportedError
    q = torch.randn(1, 1, 16, 16)
    res = {}
    try:
        block_sparse_attention_forward(q, q, q, torch.tensor([[5]]), torch.tensor([1]), 16, 0.25, False, None)
        res["layout_error"] = "no error"
    except LayoutError as e:
        res["layout_error"] = str(e)
    try:
        block_sparse_attention_forward(q.double(), q.double(), q.double(), torch.tensor([[0]]), torch.tensor([1]),
                                       16, 0.25, False, None)
        res["dtype_error"] = "no error"
    except UnsupportedError as e:
        res["dtype_error"] = str(e)
    return res


# ---------------------------------------------------------------------------------------------
# sparse FFN


def _ffn_case(dtype: torch.dtype, variant: str, tokens: int, activation: str, n: int = 16, gated: bool = False,
              biases: bool = True, d_model: int = 24, d_ff: int = 64, rank: int = 8, seed: int = 0) -> dict:
    """Max abs errors of the Triton forward and gradients vs the CPU op in the same dtype (same selection)."""
    from sparsecc.ops.sparse_ffn.triton import sparse_ffn_backward, sparse_ffn_forward
    from sparsecc.ops.sparse_ffn import controller_select

    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, s=1.0):
        return (torch.randn(*shape, generator=g) * s).to(dtype)

    x = rnd(tokens, d_model) if tokens != 1 else rnd(1, 1, d_model)
    w_in, w_out_t = rnd(d_ff, d_model, s=d_model ** -0.5), rnd(d_ff, d_model, s=(d_ff // n) ** -0.5)
    b_in, b_out = (rnd(d_ff, s=0.1), rnd(d_model, s=0.1)) if biases else (None, None)
    c1, c2, c_bias = rnd(d_model, rank, s=d_model ** -0.5), rnd(rank, d_ff, s=rank ** -0.5), rnd(d_ff)
    w_gate = rnd(d_ff, d_model, s=d_model ** -0.5) if gated else None
    b_gate = rnd(d_ff, s=0.1) if gated and biases else None
    args = (x, w_in, b_in, w_out_t, b_out, c1, c2, c_bias, n, activation, w_gate, b_gate)
    out = sparse_ffn_forward(*args, variant=variant)
    grad = rnd(*x.shape)
    grads = sparse_ffn_backward(grad, x, w_in, b_in, w_out_t, c1, c2, c_bias, w_gate, b_gate, n, activation,
                                variant=variant)
    # reference: the CPU op (same dtype, so the controller picks the same units) and its autograd
    leaves = [t.clone().requires_grad_() if t is not None and i not in (5, 6, 7) else t
              for i, t in enumerate(args[:8])] + list(args[8:10]) + [
        None if t is None else t.clone().requires_grad_() for t in args[10:]]
    ref = torch.ops.sparsecc.sparse_ffn(*leaves)
    ref.backward(grad)
    res = {"out": _max_err(out, ref), "dtype_ok": out.dtype == dtype and out.shape == x.shape,
           "tol": TOL[dtype] * 4, "units": int(controller_select(x, c1, c2, c_bias, n).numel())}
    names = {0: "dx", 1: "dw_in", 2: "db_in", 3: "dw_out_t", 4: "db_out", 10: "dw_gate", 11: "db_gate"}
    for i, name in names.items():
        if leaves[i] is None:
            continue
        if grads[i] is None:
            res[name] = "missing"
            continue
        scale = max(1.0, float(leaves[i].grad.abs().max()))  # weight gradients sum over tokens
        res[name] = _max_err(grads[i], leaves[i].grad) / scale
    return res


FFN = {
    "relu_bias_n16": dict(activation="relu"),
    "gelu_n8_nobias": dict(activation="gelu", n=8, biases=False),  # N < 16: padded, masked block of units
    "swiglu": dict(activation="silu", gated=True),
    "geglu_tanh_nobias": dict(activation="gelu_tanh", gated=True, biases=False),
}
for _name, _kw in FFN.items():
    for _variant, _tokens in (("decode", 1), ("decode", 3), ("batched", 37)):
        for _dt, _tag in ((torch.float32, "fp32"), (torch.float16, "fp16")):
            if _tokens == 1 and _dt == torch.float16 and _name != "swiglu":
                continue
            CASES[f"ffn/{_name}/{_variant}{_tokens}/{_tag}"] = (
                lambda kw=_kw, v=_variant, t=_tokens, dt=_dt: _ffn_case(dt, v, t, **kw))
# the rest of the activation table (sparsecc/ops/activations.py), fp32, both kernel variants
for _name, _kw in {"quick_gelu_gated": dict(activation="quick_gelu", gated=True),
                   "relu2": dict(activation="relu2")}.items():
    for _variant, _tokens in (("decode", 3), ("batched", 37)):
        CASES[f"ffn/{_name}/{_variant}{_tokens}/fp32"] = (
            lambda kw=_kw, v=_variant, t=_tokens: _ffn_case(torch.float32, v, t, **kw))


@case("ffn/autograd_context")
def _ffn_autograd_context() -> dict:
    """The CUDA autograd path reads the context the op's own setup_context saves: run it on CPU tensors."""
    from types import SimpleNamespace

    from sparsecc.ops.sparse_ffn import op
    from sparsecc.ops.sparse_ffn.triton import autograd_backward

    g = torch.Generator().manual_seed(1)
    x = torch.randn(5, 16, generator=g)
    args = [x, torch.randn(32, 16, generator=g) / 4, torch.randn(32, generator=g), torch.randn(32, 16, generator=g) / 4,
            torch.randn(16, generator=g), torch.randn(16, 4, generator=g), torch.randn(4, 32, generator=g), None, 8,
            "silu", torch.randn(32, 16, generator=g) / 4, None]
    leaves = [t.clone().requires_grad_() if torch.is_tensor(t) and i not in (5, 6) else t for i, t in enumerate(args)]
    out = torch.ops.sparsecc.sparse_ffn(*leaves)
    grad = torch.randn(out.shape, generator=g)
    out.backward(grad)
    ctx = SimpleNamespace(needs_input_grad=tuple(torch.is_tensor(t) and t.requires_grad for t in leaves))
    ctx.save_for_backward = lambda *ts: setattr(ctx, "saved_tensors", ts)
    op.setup_context(ctx, tuple(args), out.detach())
    grads = autograd_backward(ctx, grad)
    errs = {}
    for i, t in enumerate(leaves):
        if torch.is_tensor(t) and t.requires_grad:
            errs[str(i)] = _max_err(grads[i], t.grad) if grads[i] is not None else "missing"
    errs["controller_grads"] = [grads[i] for i in (5, 6, 7)] == [None, None, None]
    return errs


@case("ffn/backward_op_opcheck")
def _ffn_backward_opcheck() -> dict:
    """The opaque backward op (what torch.compile traces on CUDA): schema, fake kernel, dispatch."""
    from sparsecc.ops.sparse_ffn import triton as ffn  # noqa: F401  (defines the op)

    g = torch.Generator().manual_seed(3)
    x = torch.randn(3, 16, generator=g)
    w = [torch.randn(32, 16, generator=g) / 4 for _ in range(3)]
    args = (torch.randn(3, 16, generator=g), x, w[0], torch.randn(32, generator=g), w[1],
            torch.randn(16, 4, generator=g), torch.randn(4, 32, generator=g), None, w[2], None, 8, "silu",
            [True, True, True, True, True] + [False] * 5 + [True, False])
    res = torch.library.opcheck(torch.ops.sparsecc.triton_sparse_ffn_backward, args,
                                test_utils=("test_schema", "test_faketensor"))
    return {k: v for k, v in res.items()}


# ---------------------------------------------------------------------------------------------
# token flow


def _flow_case(dtype: torch.dtype, accumulate: bool, B: int = 3, L: int = 37, D: int = 20, seed: int = 0) -> dict:
    """Route / gather / scatter and the kernels their backward runs vs the CPU ops and the references."""
    from sparsecc.ops.token_flow import op as ref, triton as tf

    g = torch.Generator().manual_seed(seed)
    keep = torch.rand(B, L, generator=g) < 0.45
    keep[0] = False  # an example that keeps nothing
    keep[1, :3] = True
    index, counts = tf.flow_route(keep)
    r_index, r_counts = ref.route_reference(keep)
    x = torch.randn(B, L, D, generator=g).to(dtype)
    res = {"route_equal": bool(torch.equal(index, r_index) and torch.equal(counts, r_counts)),
           "index_dtype_ok": index.dtype == torch.int64 and counts.dtype == torch.int64,
           "kept": [int(c) for c in counts]}
    xk = tf.flow_gather(x, index, counts)
    res["gather"] = _max_err(xk, ref.gather_reference(x, index, counts))
    rows = torch.randn(xk.shape, generator=g).to(dtype)
    rows[~ref._slot_valid(index, counts)] = float("nan")  # padding slots are ignored, NaN included
    out = tf.flow_scatter(x, rows, index, counts, accumulate)
    res["scatter"] = _max_err(out, ref.scatter_reference(x, rows, index, counts, accumulate))
    res["scatter_finite"] = bool(torch.isfinite(out).all())
    # backward: CPU autograd through the ops vs the same formulas on the Triton kernels
    xs, rs = x.float().clone().requires_grad_(), rows.float().nan_to_num(0.0).clone().requires_grad_()
    y = torch.ops.sparsecc.flow_scatter(xs, torch.ops.sparsecc.flow_gather(xs, index, counts) * 2 + rs, index,
                                        counts, accumulate)
    grad = torch.randn(y.shape, generator=g).to(dtype).float()
    y.backward(grad)
    gd = grad.to(dtype)
    g_rows = tf.flow_gather(gd, index, counts)  # d/d rows of the scatter
    g_x_scatter = gd if accumulate else tf.flow_scatter(gd, torch.zeros_like(g_rows), index, counts, False)
    g_x = g_x_scatter.float() + tf.flow_scatter(torch.zeros_like(gd), g_rows * 2, index, counts, False).float()
    res["grad_rows"] = _max_err(g_rows, rs.grad)
    res["grad_x"] = _max_err(g_x, xs.grad)
    res["tol"] = TOL[dtype]
    return res


for _acc in (False, True):
    for _dt, _tag in ((torch.float32, "fp32"), (torch.float16, "fp16")):
        CASES[f"flow/{'accumulate' if _acc else 'replace'}/{_tag}"] = (
            lambda acc=_acc, dt=_dt: _flow_case(dt, acc))


# ---------------------------------------------------------------------------------------------
# a compiled model end to end


def _triton_kernels_on_cpu() -> None:
    """Make the Triton launchers the ops' CPU kernels (and the Triton FFN backward the CPU autograd) in
    this process, so graphs on CPU tensors run them in the interpreter. Only for the e2e/ cases (run last)."""
    from sparsecc.ops.block_sparse_attention import triton as ta
    from sparsecc.ops.sparse_ffn import op as sffn, triton as tf
    from sparsecc.ops.token_flow import triton as tw

    for name in ("flow_route", "flow_gather", "flow_scatter"):
        torch.library.register_kernel(f"sparsecc::{name}", "cpu", getattr(tw, name))
    torch.library.register_kernel("sparsecc::block_sparse_attention", "cpu", ta.block_sparse_attention_forward)
    torch.library.register_kernel("sparsecc::block_sparse_attention_backward", "cpu",
                                  ta.block_sparse_attention_backward)
    torch.library.register_kernel("sparsecc::sparse_ffn", "cpu", tf.sparse_ffn_forward)
    sffn.sparse_ffn.register_autograd(tf.autograd_backward, setup_context=sffn.setup_context)


@case("e2e/torch_compile_traces_the_backward")
def _e2e_compile() -> dict:
    """torch.compile (AOTAutograd, aot_eager) traces a training step whose sparse ops run Triton kernels in
    forward and backward (the FFN backward is an opaque op): gradients equal eager CPU ones."""
    import sparsecc.ops.sparse_ffn  # noqa: F401  (defines the op)
    from sparsecc.layouts.indexing import block_mask_to_ell
    from sparsecc.ops.block_sparse_attention import block_sparse_attention

    g = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(1, 2, 32, 16, generator=g) for _ in range(3))
    idx, cnt = block_mask_to_ell(torch.tensor([[True, False], [True, True]]))
    w = [torch.randn(32, 16, generator=g) / 4 for _ in range(2)]
    c1, c2 = torch.randn(16, 4, generator=g), torch.randn(4, 32, generator=g)

    def step(q, k, v, w_in, w_out_t):
        a = block_sparse_attention(q, k, v, idx, cnt, 16, causal=True)
        y = torch.ops.sparsecc.sparse_ffn(a.reshape(-1, 16), w_in, None, w_out_t, None, c1, c2, None, 8, "gelu")
        return (y * y).sum()

    def grads(fn):
        leaves = [t.clone().requires_grad_() for t in (q, k, v, *w)]
        fn(*leaves).backward()
        return [t.grad for t in leaves]

    ref = grads(step)
    _triton_kernels_on_cpu()
    got = grads(torch.compile(step, backend="aot_eager", fullgraph=True))
    return {"grad": max(_max_err(a, b) for a, b in zip(got, ref))}


class _OpsSeen(TorchDispatchMode):
    """The ops a forward actually dispatches."""

    def __init__(self):
        super().__init__()
        self.ops: set = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.add(func)
        return func(*args, **(kwargs or {}))


@case("e2e/bert_spion_sparse_ffn")
def _e2e_bert() -> dict:
    """A tiny BERT compiled with block-sparse attention + sparse FFN (forward and parameter gradients), and
    with token flow (forward): the Triton launchers as the ops' kernels (registered for CPU in this process
    only) vs the CPU kernels."""
    import sparsecc
    from sparsecc.testing import bert

    model, inputs = bert(layers=1, seq=40)
    recipe = sparsecc.Recipe(attention=sparsecc.Fixed(pattern="bigbird", block=16, density=0.5),
                             ffn=sparsecc.SparseFFN(n=8, d_lowrank=8, init="random"))
    sm = sparsecc.compile(model, inputs, recipe=recipe, check=False)
    ops = {n.target for n in sm.graph_module.graph.nodes if n.op == "call_function"}

    def run() -> tuple[torch.Tensor, dict]:
        sm.graph_module.zero_grad(set_to_none=True)
        out = sm(**inputs).last_hidden_state
        (out * torch.linspace(-1, 1, out.shape[-1])).sum().backward()
        return out.detach(), {k: p.grad.clone() for k, p in sm.graph_module.named_parameters() if p.grad is not None}

    # token flow (SparseFlow, random gates): inference graph with route and scatter
    flow = sparsecc.compile(model, inputs, recipe=sparsecc.Recipe(flow=sparsecc.TokenFlow(gate="random", keep=0.5)),
                            check=False).eval()
    with torch.no_grad(), _OpsSeen() as seen:  # the flow ops run inside helpers (packed layout): record calls
        ref_flow = flow(**inputs).last_hidden_state
    ops |= seen.ops

    ref_out, ref_grads = run()
    _triton_kernels_on_cpu()
    out, grads = run()
    with torch.no_grad():
        flow_out = flow(**inputs).last_hidden_state
    return {"ops": sorted(str(o) for o in ops if "sparsecc" in str(o)), "out": _max_err(out, ref_out),
            "flow_out": _max_err(flow_out, ref_flow),
            "grads": len(grads), "same_params": sorted(grads) == sorted(ref_grads),
            "grad": max(_max_err(grads[k], ref_grads[k]) / max(1.0, float(ref_grads[k].abs().max()))
                        for k in grads)}


@case("registration")
def _registration() -> dict:
    """register() adds the CUDA kernels of every sparsecc op that has one."""
    import sparsecc.backends.triton as tb
    from sparsecc.ops.sparse_ffn import sparse_ffn_reference

    ops = tb.register()
    has = {name: torch._C._dispatch_has_kernel_for_dispatch_key(name, "CUDA") for name in ops}
    # CPU tensors still take the op's own backward after register() replaced the autograd formula
    g = torch.Generator().manual_seed(2)
    x, w_in, w_out = torch.randn(4, 8, generator=g), torch.randn(16, 8, generator=g), torch.randn(8, 16, generator=g)
    c1, c2 = torch.randn(8, 2, generator=g), torch.randn(2, 16, generator=g)
    leaves = [t.clone().requires_grad_() for t in (x, w_in, w_out)]
    torch.ops.sparsecc.sparse_ffn(leaves[0], leaves[1], None, leaves[2].t().contiguous(), None, c1, c2, None, 4,
                                  "relu").sum().backward()
    refs = [t.clone().requires_grad_() for t in (x, w_in, w_out)]
    sparse_ffn_reference(refs[0], refs[1], None, refs[2], None, c1, c2, None, 4, "relu").sum().backward()
    cpu_err = max(_max_err(a.grad, r.grad) for a, r in zip(leaves, refs))
    return {"ops": sorted(ops), "cuda_kernels": has, "cpu_backward_after_register": cpu_err}


def run(names: list[str]) -> dict:
    """Run the cases; end-to-end cases last (they replace the ops' CPU kernels in this process)."""
    results = {}
    for name in sorted(names, key=lambda n: n.startswith("e2e/")):
        try:
            results[name] = CASES[name]()
        except Exception:  # reported by the test that asked for this case
            results[name] = {"error": traceback.format_exc()}
    return results


def main(argv: list[str]) -> int:
    if os.environ.get("TRITON_INTERPRET") != "1":
        print("set TRITON_INTERPRET=1 (before triton is imported) to run these cases", file=sys.stderr)
        return 2
    torch.set_num_threads(1)
    names = argv or list(CASES)
    unknown = [n for n in names if n not in CASES]
    if unknown:
        print(f"unknown cases {unknown}; known: {list(CASES)}", file=sys.stderr)
        return 2
    print(json.dumps(run(names)))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

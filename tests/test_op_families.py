"""Every op family at once: `import sparsecc` registers every op, opcheck runs on every op (the public
`sparsecc::*` ones and the C++ `sparsecc_cpu::*` kernels), the dense families match their references,
every backend covers the activation table, and a .pt2 of a compiled model loads in a fresh process.

Family-specific behaviour (layouts, masks, kernels) is tested in test_block_sparse_attention.py,
test_sparse_ffn.py, test_token_flow_ops.py, test_native.py, test_onnx.py and test_triton.py.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import sparsecc
from sparsecc.layouts.indexing import block_mask_to_ell
from sparsecc.ops import FAMILIES, activations, onnx_lowering
from sparsecc.ops.attention import attention_reference
from sparsecc.ops.block_sparse_attention import clean_layout, cpu as bsa_cpu
from sparsecc.ops.sparse_ffn import cpu as sparse_ffn_cpu

ROOT = Path(__file__).resolve().parents[1]


def _g(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _attention_samples() -> list[tuple]:
    g = _g(0)
    q = torch.randn(2, 4, 5, 8, generator=g, requires_grad=True)
    k, v = (torch.randn(2, 2, 7, 8, generator=g, requires_grad=True) for _ in range(2))
    mask = torch.randn(2, 1, 5, 7, generator=g, requires_grad=True)
    return [(q, k.repeat_interleave(2, 1).detach().requires_grad_(), v.repeat_interleave(2, 1).detach(), mask, 0.0,
             False, 0.3, False),
            (q, k, v, None, 0.0, True, None, True)]


def _ffn_samples() -> list[tuple]:
    g = _g(1)

    def w(*s):
        return (torch.randn(*s, generator=g) / 4).requires_grad_()
    return [(w(3, 8), w(16, 8), w(16), w(8, 16), w(8), act, *((w(16, 8), w(16)) if i % 2 else (None, None)))
            for i, act in enumerate(activations.ACTIVATIONS)]


def _bsa_samples() -> list[tuple]:
    g = _g(2)
    q = torch.randn(2, 4, 40, 8, generator=g, requires_grad=True)
    k, v = (torch.randn(2, 2, 24, 8, generator=g, requires_grad=True) for _ in range(2))
    idx, cnt = block_mask_to_ell(torch.rand(5, 3, generator=g) < 0.6)
    kpm = torch.rand(2, 24, generator=g) < 0.8
    return [(q, k, v, idx, cnt, 8, 0.35, False, None), (q, k, v, idx, cnt, 8, 0.35, True, kpm)]


def _bsa_bias_samples() -> list[tuple]:
    """With a per-head score bias, -inf outside a window of 9 keys (the op's `bias` input)."""
    q, k, v, idx, cnt, b, scale, causal, kpm = _bsa_samples()[1]
    bias = torch.randn(1, 4, 40, 24, generator=_g(3))
    bias = bias.masked_fill(torch.arange(24)[None] <= torch.arange(40)[:, None] - 9, float("-inf"))
    return [(q, k, v, idx, cnt, b, scale, causal, kpm, bias.requires_grad_(True))]


def _bsa_bias_grad_samples() -> list[tuple]:
    out = []
    for q, k, v, idx, cnt, b, scale, causal, kpm, bias in _bsa_bias_samples():
        q, k, v, bias = q.detach(), k.detach(), v.detach(), bias.detach()
        o, lse = torch.ops.sparsecc.block_sparse_attention(q, k, v, idx, cnt, b, scale, causal, kpm, bias)
        out.append((torch.randn_like(o), q, k, v, o, lse, idx, cnt, b, scale, causal, kpm, bias))
    return out


def _bsa_backward_samples() -> list[tuple]:
    out = []
    for q, k, v, idx, cnt, b, scale, causal, kpm in _bsa_samples():
        q, k, v = q.detach(), k.detach(), v.detach()
        o, lse = torch.ops.sparsecc.block_sparse_attention(q, k, v, idx, cnt, b, scale, causal, kpm)
        out.append((torch.randn_like(o), q, k, v, o, lse, idx, cnt, b, scale, causal, kpm))
    return out


def _sparse_ffn_samples() -> list[tuple]:
    g = _g(3)

    def w(*s):
        return (torch.randn(*s, generator=g) / 4).requires_grad_()
    c1, c2 = torch.randn(8, 4, generator=g), torch.randn(4, 32, generator=g)
    return [(w(1, 8), w(32, 8), w(32), w(32, 8), w(8), c1, c2, None, 8, "relu2", None, None),
            (w(6, 8), w(32, 8), None, w(32, 8), None, c1, c2, torch.randn(32, generator=g), 4, "quick_gelu",
             w(32, 8), w(32))]


def _keep() -> torch.Tensor:
    return torch.tensor([[1, 0, 1, 1, 0], [0, 0, 0, 0, 0], [0, 1, 0, 0, 1]], dtype=torch.bool)


def _flow_samples(op: str) -> list[tuple]:
    keep = _keep()
    index, counts = torch.ops.sparsecc.flow_route(keep)
    x = torch.randn(3, 5, 4, generator=_g(4), requires_grad=True)
    rows = torch.randn(3, index.shape[1], 4, generator=_g(5), requires_grad=True)
    return {"flow_route": [(keep,)], "flow_gather": [(x, index, counts)],
            "flow_scatter": [(x, rows, index, counts, False), (x, rows, index, counts, True)]}[op]


# every op `import sparsecc` registers -> its sample inputs (a new op without samples fails the test below)
SAMPLES = {
    "sparsecc::attention": _attention_samples,
    "sparsecc::ffn": _ffn_samples,
    "sparsecc::block_sparse_attention": lambda: _bsa_samples() + _bsa_bias_samples(),
    "sparsecc::block_sparse_attention_backward": lambda: _bsa_backward_samples() + _bsa_bias_grad_samples(),
    "sparsecc::block_sparse_attention_bias_grad": _bsa_bias_grad_samples,
    "sparsecc::sparse_ffn": _sparse_ffn_samples,
    "sparsecc::flow_route": lambda: _flow_samples("flow_route"),
    "sparsecc::flow_gather": lambda: _flow_samples("flow_gather"),
    "sparsecc::flow_scatter": lambda: _flow_samples("flow_scatter"),
}


def _op(name: str):
    ns, short = name.split("::")
    return getattr(getattr(torch.ops, ns), short).default


def _fresh_python(code: str, **env: str) -> subprocess.CompletedProcess:
    full_env = {**os.environ, **env,
                "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    return subprocess.run([sys.executable, "-c", code], env=full_env, capture_output=True, text=True, timeout=600)


def test_import_sparsecc_registers_every_op_of_every_family():
    code = ("import json, sparsecc, torch; print(json.dumps(sorted(n for n in torch._C._dispatch_get_all_op_names() "
            "if n.startswith('sparsecc::'))))")
    proc = _fresh_python(code)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == sorted(SAMPLES)
    assert set(FAMILIES) == {"attention", "ffn", "block_sparse_attention", "sparse_ffn", "token_flow"}


@pytest.mark.parametrize("name", sorted(SAMPLES))
def test_opcheck_every_op(name):
    """Schema, fake kernel, autograd registration and AOT dispatch of every op, on each sample."""
    for args in SAMPLES[name]():
        torch.library.opcheck(_op(name), args)


NATIVE_SAMPLES = {
    "sparsecc_cpu::block_sparse_attention_forward": lambda: [
        (q.detach(), k.detach(), v.detach(), *clean_layout(idx, cnt, q.shape[2], k.shape[2], b, causal), kpm, b,
         scale, causal) for q, k, v, idx, cnt, b, scale, causal, kpm in _bsa_samples()],
    "sparsecc_cpu::block_sparse_attention_backward": lambda: [
        (go, q, k, v, o, lse, *clean_layout(idx, cnt, q.shape[2], k.shape[2], b, causal), kpm, b, scale, causal)
        for go, q, k, v, o, lse, idx, cnt, b, scale, causal, kpm in _bsa_backward_samples()],
    "sparsecc_cpu::sparse_ffn_decode": lambda: [
        (x.detach(), c1, c2, cb, w_in.detach(), None if b_in is None else b_in.detach(),
         None if w_gate is None else w_gate.detach(), None if b_gate is None else b_gate.detach(), w_out.detach(),
         None if b_out is None else b_out.detach(), n, act)
        for x, w_in, b_in, w_out, b_out, c1, c2, cb, n, act, w_gate, b_gate in _sparse_ffn_samples()],
}


@pytest.mark.skipif(shutil.which("c++") is None, reason="no C++ compiler on this machine")
@pytest.mark.parametrize("name", sorted(NATIVE_SAMPLES))
def test_opcheck_every_native_kernel(name):
    """The C++ kernels are ops of their own (sparsecc_cpu): schema, fake kernel, dispatch (no autograd:
    the public ops own the gradients)."""
    assert bsa_cpu.native_kernels() and sparse_ffn_cpu.native_kernel()
    kernels = {n for n in torch._C._dispatch_get_all_op_names() if n.startswith("sparsecc_cpu::")}
    tensor_ops = {n for n in kernels if not n.endswith(("_info", "_activations"))}
    assert tensor_ops == set(NATIVE_SAMPLES)
    for args in NATIVE_SAMPLES[name]():
        torch.library.opcheck(_op(name), args, test_utils=("test_schema", "test_faketensor",
                                                           "test_aot_dispatch_static"))


@pytest.mark.parametrize("causal,gqa,mask", [(False, False, "float"), (True, True, None), (False, False, "bool")])
def test_attention_matches_its_reference(causal, gqa, mask):
    g = _g(6)
    q = torch.randn(2, 4, 6, 8, generator=g, dtype=torch.float64)
    k, v = (torch.randn(2, 2 if gqa else 4, 9, 8, generator=g, dtype=torch.float64) for _ in range(2))
    m = {"float": torch.randn(2, 1, 6, 9, generator=g, dtype=torch.float64), None: None,
         "bool": torch.rand(6, 9, generator=g) > 0.3}[mask]
    got = torch.ops.sparsecc.attention(q, k, v, m, 0.0, causal, None, gqa)
    ref = attention_reference(q, k, v, m, causal, None, gqa)
    torch.testing.assert_close(got, ref, atol=1e-12, rtol=0)
    # and against the written-out formula
    kk, vv = (t.repeat_interleave(2, 1) if gqa else t for t in (k, v))
    s = q @ kk.transpose(-1, -2) / math.sqrt(8)
    if causal:
        s = s.masked_fill(~torch.ones(6, 9, dtype=torch.bool).tril(), float("-inf"))
    if m is not None:
        s = s.masked_fill(~m, float("-inf")) if m.dtype == torch.bool else s + m
    torch.testing.assert_close(got, torch.softmax(s, -1) @ vv, atol=1e-12, rtol=0)


_TORCH_ACTIVATIONS = {"relu": torch.nn.ReLU(), "gelu": torch.nn.GELU(), "gelu_tanh": torch.nn.GELU("tanh"),
                      "silu": torch.nn.SiLU(), "quick_gelu": lambda x: x * torch.sigmoid(1.702 * x),
                      "relu2": lambda x: torch.relu(x) ** 2}


@pytest.mark.parametrize("act", sorted(activations.ACTIVATIONS))
@pytest.mark.parametrize("gated", [False, True], ids=["plain", "gated"])
def test_ffn_matches_torch_modules_for_every_activation(act, gated):
    g = _g(7)
    x = torch.randn(3, 5, 8, generator=g, dtype=torch.float64)
    up, down, gate = (torch.nn.Linear(*s, dtype=torch.float64) for s in ((8, 16), (16, 8), (8, 16)))
    fn = _TORCH_ACTIVATIONS[act]
    ref = down(fn(gate(x)) * up(x) if gated else fn(up(x)))
    got = torch.ops.sparsecc.ffn(x, up.weight, up.bias, down.weight, down.bias, act,
                                 gate.weight if gated else None, gate.bias if gated else None)
    torch.testing.assert_close(got, ref, atol=1e-12, rtol=0)


def test_every_backend_covers_the_activation_table():
    """The table's entries, in each place that implements them (C++ and Triton: test_native.py, test_triton.py)."""
    assert set(_TORCH_ACTIVATIONS) == set(activations.ACTIVATIONS)
    assert set(onnx_lowering.ACTIVATIONS) == set(activations.ACTIVATIONS)
    with pytest.raises(sparsecc.errors.UnsupportedError, match="expected one of"):
        onnx_lowering.apply_activation(None, "swish")


_SAVE = r"""
import sys, torch, sparsecc
from sparsecc import testing as T
model, (x,) = T.hand_written()
recipe = sparsecc.Recipe(attention=sparsecc.Fixed(pattern="bigbird", block=4, density=0.5))
sm = sparsecc.compile(model, (x,), recipe=recipe, check=False)
ep = torch.export.export(sm.graph_module, (x,))
assert any(n.target == torch.ops.sparsecc.block_sparse_attention.default for n in ep.graph.nodes)
torch.export.save(ep, sys.argv[1])
torch.save({"x": x, "out": sm(x).detach()}, sys.argv[2])
"""

_LOAD = r"""
import sys, torch
if sys.argv[3] == "import":
    import sparsecc  # noqa: F401  (registers every sparsecc op)
try:
    ep = torch.export.load(sys.argv[1])
except Exception as exc:
    print("LOAD FAILED:", type(exc).__name__, str(exc).splitlines()[0])
    sys.exit(3)
data = torch.load(sys.argv[2])
assert any(n.target == torch.ops.sparsecc.block_sparse_attention.default for n in ep.graph.nodes)
err = (ep.module()(data["x"]) - data["out"]).abs().max().item()
print("max abs error", err)
sys.exit(0 if err < 1e-5 else 4)
"""


def test_pt2_of_a_compiled_model_loads_in_a_fresh_process_after_import_sparsecc(tmp_path):
    """A .pt2 saved from a compiled model (block-sparse attention) loads and runs in a new process once
    `import sparsecc` has registered the ops; without the import the op is unknown."""
    pt2, data = str(tmp_path / "model.pt2"), str(tmp_path / "data.pt")
    saved = subprocess.run([sys.executable, "-c", _SAVE, pt2, data], capture_output=True, text=True, timeout=600,
                           env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert saved.returncode == 0, saved.stderr[-3000:]
    for mode, expected in (("import", 0), ("no-import", 3)):
        loaded = subprocess.run([sys.executable, "-c", _LOAD, pt2, data, mode], capture_output=True, text=True,
                                timeout=600, env={**os.environ, "PYTHONPATH": str(ROOT)})
        assert loaded.returncode == expected, (mode, loaded.stdout[-2000:], loaded.stderr[-3000:])
    assert "LOAD FAILED" in loaded.stdout and "block_sparse_attention" in loaded.stderr  # the loader names the op


def test_family_packages_export_their_ops():
    """Each family's package exports its op and the names other layers import."""
    import sparsecc.ops.block_sparse_attention as bsa
    import sparsecc.ops.sparse_ffn as sffn
    import sparsecc.ops.token_flow as flow
    from sparsecc.ops.sparse_ffn import ACTIVATIONS, activation_fn, controller_logits, sparse_ffn
    from sparsecc.ops.token_flow import helpers

    assert bsa.block_sparse_attention is bsa.op.block_sparse_attention
    assert sparse_ffn is sffn.op.sparse_ffn and ACTIVATIONS == tuple(activations.ACTIVATIONS)
    assert (activation_fn, controller_logits) == (sffn.op.activation_fn, sffn.op.controller_logits)
    assert flow.flow_route is flow.op.flow_route
    assert {"gather_tokens", "valid_tokens", "flow_attention_mask"} <= set(helpers.__all__)

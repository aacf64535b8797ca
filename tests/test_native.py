"""The C++ kernels (sparsecc.ops.native): build, cache, fallback, and equality with the PyTorch path.

Loading a kernel library registers its ops for the life of the process, so the scenarios that
build into other cache folders (or must fail to build) run in fresh processes.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sparsecc.ops import activations, native
from sparsecc.ops.sparse_ffn import ACTIVATIONS, cpu as sparse_ffn_cpu, pack_sparse_ffn_weights, sparse_ffn_reference

ROOT = Path(__file__).resolve().parents[1]
needs_cxx = pytest.mark.skipif(shutil.which("c++") is None, reason="no C++ compiler on this machine")


def _weights(d_model: int, d_ff: int, n: int, act: str, gated: bool, bias: bool, seed: int = 0):
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape: int):
        return torch.randn(*shape, generator=g) / shape[-1] ** 0.5

    maybe = (lambda *s: rnd(*s)) if bias else (lambda *s: None)
    return pack_sparse_ffn_weights(rnd(d_ff, d_model), maybe(d_ff), rnd(d_model, d_ff), maybe(d_model),
                                   rnd(d_model, 16), rnd(16, d_ff), maybe(d_ff), n, act,
                                   rnd(d_ff, d_model) if gated else None, maybe(d_ff) if gated else None)


def _pytorch_path(packed, x, monkeypatch):
    with monkeypatch.context() as m:
        m.setenv("SPARSECC_NATIVE", "0")
        return packed(x)


@needs_cxx
@pytest.mark.parametrize("act", ACTIVATIONS)
@pytest.mark.parametrize("gated", [False, True], ids=["plain", "gated"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_native_sparse_ffn_equals_pytorch_path_and_reference(act, gated, bias, monkeypatch):
    assert sparse_ffn_cpu.native_kernel(), "the C++ sparse_ffn kernel did not build (see the warning)"
    packed = _weights(96, 512, 32, act, gated, bias)
    w_out = packed.w_out_t.t()
    for tokens in (1, 2, 8):  # 8 * 16 * 2 = 256 <= 512: still the few-token (native) path
        x = torch.randn(tokens, 96, generator=torch.Generator().manual_seed(tokens))
        args = (x, packed.w_in, packed.b_in, packed.w_out_t, packed.b_out, packed.c1, packed.c2, packed.c_bias, 32,
                act, packed.w_gate, packed.b_gate)
        assert sparse_ffn_cpu.decode_native(*args) is not None  # the C++ kernel runs for this activation
        native_out = packed(x)
        torch_out = _pytorch_path(packed, x, monkeypatch)
        reference = sparse_ffn_reference(x, packed.w_in, packed.b_in, w_out, packed.b_out, packed.c1, packed.c2,
                                         packed.c_bias, 32, act, packed.w_gate, packed.b_gate)
        torch.testing.assert_close(native_out, torch_out, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(native_out, reference, atol=1e-5, rtol=1e-5)
        assert not torch.equal(native_out, _weights(96, 512, 32, act, gated, bias, seed=1)(x))


@needs_cxx
def test_native_kernel_covers_the_activation_table():
    assert sparse_ffn_cpu.native_kernel()
    assert sparse_ffn_cpu.kernel_activations() == set(activations.ACTIVATIONS)
    with pytest.raises(RuntimeError, match="expected one of relu, gelu"):
        torch.ops.sparsecc_cpu.sparse_ffn_decode(torch.randn(1, 8), torch.randn(8, 2), torch.randn(2, 16), None,
                                                 torch.randn(16, 8), None, None, None, torch.randn(16, 8), None, 4,
                                                 "swish")


def test_an_activation_without_a_kernel_takes_the_pytorch_path(monkeypatch):
    """A table entry the loaded kernel lacks (e.g. a kernel built before the entry existed) is not a
    KeyError: decode_native declines and the op's PyTorch path computes it."""
    packed = _weights(32, 128, 8, "relu2", False, True)
    x = torch.randn(1, 32)
    args = (x, packed.w_in, packed.b_in, packed.w_out_t, packed.b_out, packed.c1, packed.c2, packed.c_bias, 8,
            "relu2", None, None)
    monkeypatch.setattr(sparse_ffn_cpu, "kernel_activations", lambda: frozenset({"relu", "gelu"}))
    assert sparse_ffn_cpu.decode_native(*args) is None
    reference = sparse_ffn_reference(x, packed.w_in, packed.b_in, packed.w_out_t.t(), packed.b_out, packed.c1,
                                     packed.c2, packed.c_bias, 8, "relu2")
    torch.testing.assert_close(packed(x), reference, atol=1e-5, rtol=1e-5)


@needs_cxx
def test_native_arg_max_breaks_ties_and_nans_like_torch(monkeypatch):
    packed = _weights(32, 128, 8, "relu", False, True)
    c_bias = torch.zeros(128)
    c_bias[3] = float("nan")       # block 0: the NaN wins (torch.argmax treats NaN as the maximum)
    c_bias[9] = c_bias[12] = 5.0   # block 1: a tie, the first one wins
    packed = type(packed)(**{**packed.__dict__, "c2": torch.zeros_like(packed.c2), "c_bias": c_bias})
    x = torch.randn(1, 32)
    native_out = packed(x)
    torch.testing.assert_close(native_out, _pytorch_path(packed, x, monkeypatch), atol=1e-6, rtol=1e-6)
    hidden = torch.relu(packed.w_in[[3, 9] + list(range(16, 128, 8))] @ x[0] + packed.b_in[[3, 9] + list(range(16, 128, 8))])
    expected = hidden @ packed.w_out_t[[3, 9] + list(range(16, 128, 8))] + packed.b_out
    torch.testing.assert_close(native_out[0], expected, atol=1e-5, rtol=1e-5)


@needs_cxx
def test_native_op_opcheck():
    assert sparse_ffn_cpu.native_kernel()
    packed = _weights(24, 64, 8, "gelu", True, True)
    args = (torch.randn(2, 24), packed.c1, packed.c2, packed.c_bias, packed.w_in, packed.b_in, packed.w_gate,
            packed.b_gate, packed.w_out_t, packed.b_out, 8, "gelu")
    torch.library.opcheck(torch.ops.sparsecc_cpu.sparse_ffn_decode, args,
                          test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_static"))


def test_native_disabled_never_loads(monkeypatch):
    monkeypatch.setenv("SPARSECC_NATIVE", "0")
    assert not native.enabled() and not native.load("sparse_ffn") and not native.required()
    monkeypatch.setenv("SPARSECC_NATIVE", "require")
    assert native.enabled() and native.required()
    with pytest.raises(ValueError, match="has no C\\+\\+ kernel"):
        native.source("token_flow")


# --- build, cache and fallback, each in a fresh process ------------------------------------------

_SCENARIO = r"""
import json, logging, os, sys
import torch
from sparsecc.ops import native
from sparsecc.ops.sparse_ffn import pack_sparse_ffn_weights, sparse_ffn_reference

records = []
handler = logging.Handler(logging.INFO)
handler.emit = records.append
logging.getLogger("sparsecc.ops.native").addHandler(handler)
logging.getLogger("sparsecc.ops.native").setLevel(logging.INFO)

g = torch.Generator().manual_seed(0)
r = lambda *s: torch.randn(*s, generator=g) / 4
w = pack_sparse_ffn_weights(r(64, 16), r(64), r(16, 64), r(16), r(16, 4), r(4, 64), r(64), 8, "silu")
x = r(1, 16)
result = {}
try:
    first = native.load("sparse_ffn")
    second = native.load("sparse_ffn")  # no second warning, no second build
    out = w(x)
    ref = sparse_ffn_reference(x, w.w_in, w.b_in, w.w_out_t.t(), w.b_out, w.c1, w.c2, w.c_bias, 8, "silu")
    result.update(loaded=[first, second], close=bool(torch.allclose(out, ref, atol=1e-5)))
except Exception as exc:
    result["raised"] = f"{type(exc).__name__}: {exc}"
result.update(warnings=[r.getMessage() for r in records if r.levelno >= logging.WARNING],
              info=[r.getMessage() for r in records if r.levelno < logging.WARNING])
print(json.dumps(result))
"""


def _run_scenario(tmp_path: Path, **env: str) -> dict:
    full_env = {k: v for k, v in os.environ.items() if k not in ("SPARSECC_NATIVE", "CXX", "SPARSECC_CACHE_DIR")}
    paths = [env.pop("PYTHONPATH", None), str(ROOT), os.environ.get("PYTHONPATH")]
    full_env.update(env, PYTHONPATH=os.pathsep.join(p for p in paths if p))
    proc = subprocess.run([sys.executable, "-c", _SCENARIO], env=full_env, cwd=tmp_path, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@needs_cxx
def test_built_kernel_is_reused_from_the_cache(tmp_path):
    """A cache folder holding the built library is loaded as it is (not rebuilt)."""
    assert sparse_ffn_cpu.native_kernel()
    built = native.build_directory("sparse_ffn")
    cache = tmp_path / "cache"
    shutil.copytree(built, cache / "extensions" / built.name, symlinks=True)  # copy2 keeps the times ninja reads
    library = cache / "extensions" / built.name / f"{native.extension_name('sparse_ffn')}.so"
    stamp = library.stat().st_mtime_ns
    result = _run_scenario(tmp_path, SPARSECC_CACHE_DIR=str(cache))
    assert result["loaded"] == [True, True] and result["close"] and not result["warnings"], result
    assert any(m.startswith("sparsecc: loaded the sparse_ffn kernel") for m in result["info"]), result["info"]
    assert library.stat().st_mtime_ns == stamp  # not rebuilt
    assert not (cache / "extensions" / built.name / "lock").exists()


@pytest.mark.parametrize("case", ["no-compiler", "broken-compiler", "unwritable-cache", "no-ninja"])
def test_unbuildable_kernel_warns_once_and_the_op_runs_its_pytorch_path(tmp_path, case):
    env = {"SPARSECC_CACHE_DIR": str(tmp_path / "cache")}
    expected = {"no-compiler": "no C++ compiler 'no-such-compiler-xyz'", "broken-compiler": "the build failed",
                "unwritable-cache": "SPARSECC_CACHE_DIR", "no-ninja": "ninja was not found"}[case]
    if case == "no-compiler":
        env["CXX"] = "no-such-compiler-xyz"
    elif case == "broken-compiler":
        env["CXX"] = "false"  # a "compiler" that always fails
    elif case == "unwritable-cache":
        blocked = tmp_path / "file"
        blocked.write_text("not a directory")
        env["SPARSECC_CACHE_DIR"] = str(blocked / "cache")  # cannot be created
    else:  # a PATH with the compiler but no ninja, and no ninja package (the interpreter by its full path)
        bin_dir = tmp_path / "bin"
        bin_dir.mkdir()
        compiler = shutil.which("c++") or "/usr/bin/c++"
        (bin_dir / "c++").symlink_to(compiler)
        env["PATH"] = str(bin_dir)
        shadow = tmp_path / "shadow" / "ninja"
        shadow.mkdir(parents=True)
        (shadow / "__init__.py").write_text("raise ImportError('the ninja package is hidden by the test')\n")
        env["PYTHONPATH"] = str(shadow.parent)
    result = _run_scenario(tmp_path, **env)
    assert result["loaded"] == [False, False] and result["close"], result
    assert len(result["warnings"]) == 1, result["warnings"]  # one warning, however many calls
    message = result["warnings"][0]
    assert expected in message and "PyTorch path" in message and "sparse_ffn" in message, message
    if case != "unwritable-cache":
        assert not list((tmp_path / "cache").rglob("*.so"))

    required = _run_scenario(tmp_path, SPARSECC_NATIVE="require", **env)
    assert required["raised"].startswith("NativeUnavailable") and expected in required["raised"], required
    assert "SPARSECC_NATIVE=require" in required["raised"]

"""The C kernels in sparsecc/ops/native: build, cache, fallback, and equality with the PyTorch path."""

from __future__ import annotations

import contextlib
import logging
import shutil

import pytest
import torch

from sparsecc.ops import native
from sparsecc.ops.sparse_ffn import ACTIVATIONS, _native_kernel, pack_sparse_ffn_weights, sparse_ffn_reference

needs_cc = pytest.mark.skipif(shutil.which("cc") is None, reason="no C compiler on this machine")


def _weights(d_model: int, d_ff: int, n: int, act: str, gated: bool, bias: bool, seed: int = 0):
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape: int):
        return torch.randn(*shape, generator=g) / shape[-1] ** 0.5

    maybe = (lambda *s: rnd(*s)) if bias else (lambda *s: None)
    return pack_sparse_ffn_weights(rnd(d_ff, d_model), maybe(d_ff), rnd(d_model, d_ff), maybe(d_model),
                                   rnd(d_model, 16), rnd(16, d_ff), maybe(d_ff), n, act,
                                   rnd(d_ff, d_model) if gated else None, maybe(d_ff) if gated else None)


@contextlib.contextmanager
def _warnings():
    """Messages logged at WARNING by sparsecc.ops.native inside the block (pytest's logging plugin is off)."""
    said: list[str] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = lambda record: said.append(record.getMessage())
    logger = logging.getLogger("sparsecc.ops.native")
    logger.addHandler(handler)
    try:
        yield said
    finally:
        logger.removeHandler(handler)


def _pytorch_path(packed, x, monkeypatch):
    with monkeypatch.context() as m:
        m.setenv("SPARSECC_NATIVE", "0")
        return packed(x)


@needs_cc
@pytest.mark.parametrize("act", ACTIVATIONS)
@pytest.mark.parametrize("gated", [False, True], ids=["plain", "gated"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_native_sparse_ffn_equals_pytorch_path_and_reference(act, gated, bias, monkeypatch):
    assert _native_kernel() is not None, "the native sparse_ffn kernel did not build (see the log)"
    packed = _weights(96, 512, 32, act, gated, bias)
    w_out = packed.w_out_t.t()
    for tokens in (1, 2, 8):  # 8 * 16 * 2 = 256 <= 512: still the few-token (native) path
        x = torch.randn(tokens, 96, generator=torch.Generator().manual_seed(tokens))
        native_out = packed(x)
        torch_out = _pytorch_path(packed, x, monkeypatch)
        reference = sparse_ffn_reference(x, packed.w_in, packed.b_in, w_out, packed.b_out, packed.c1, packed.c2,
                                         packed.c_bias, 32, act, packed.w_gate, packed.b_gate)
        torch.testing.assert_close(native_out, torch_out, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(native_out, reference, atol=1e-5, rtol=1e-5)
        assert not torch.equal(native_out, _weights(96, 512, 32, act, gated, bias, seed=1)(x))


@needs_cc
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


@needs_cc
def test_build_is_cached_and_a_broken_compiler_falls_back_with_a_warning(tmp_path, monkeypatch):
    monkeypatch.setenv("SPARSECC_CACHE_DIR", str(tmp_path / "cache"))
    build = native.load.__wrapped__  # bypass the per-process cache
    assert build("sparse_ffn") is not None
    (built,) = (tmp_path / "cache" / "native").glob("sparse_ffn-*.so")
    stamp = built.stat().st_mtime_ns
    assert build("sparse_ffn") is not None and built.stat().st_mtime_ns == stamp  # not rebuilt
    assert not list((tmp_path / "cache" / "native").glob("*.tmp"))  # no half-written file left

    monkeypatch.setenv("SPARSECC_CACHE_DIR", str(tmp_path / "other"))
    monkeypatch.setenv("CC", "false")  # a "compiler" that always fails
    with _warnings() as said:
        assert build("sparse_ffn") is None
    assert "PyTorch path" in said[0] and not list((tmp_path / "other" / "native").glob("*"))

    monkeypatch.setenv("CC", "no-such-compiler-xyz")
    with _warnings() as said:
        assert build("sparse_ffn") is None
    assert "no C compiler" in said[0]

    monkeypatch.setenv("CC", "cc")
    blocked = tmp_path / "file"
    blocked.write_text("not a directory")
    monkeypatch.setenv("SPARSECC_CACHE_DIR", str(blocked / "cache"))  # cannot be created
    with _warnings() as said:
        assert build("sparse_ffn") is None
    assert "SPARSECC_CACHE_DIR" in said[0]

    monkeypatch.setenv("SPARSECC_NATIVE", "0")
    assert not native.enabled() and build("sparse_ffn") is None

"""Tests of `sparsecc::block_sparse_attention` against a float64 dense reference."""

from __future__ import annotations

import contextlib
import math
import shutil
from typing import Optional

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st

from sparsecc.errors import LayoutError
from sparsecc.layouts.indexing import block_mask_to_ell
from sparsecc.ops.block_sparse_attention import (block_sparse_attention, block_sparse_attention_backward_op,
                                                 block_sparse_attention_op, clean_layout, cpu, reference as op_reference)
from sparsecc.ops.block_sparse_attention.layout import clean_block_mask, column_layout

PATHS = ["native", "pytorch"]  # fp32 forward and backward: the C++ kernels (when they build) or the flash path
needs_cxx = pytest.mark.skipif(shutil.which("c++") is None, reason="no C++ compiler on this machine")


@contextlib.contextmanager
def kernel_path(path: str):
    """Run the block with the native kernels on ("native") or off ("pytorch", SPARSECC_NATIVE=0).
    (A context manager, not the monkeypatch fixture: hypothesis tests cannot take function fixtures.)"""
    with pytest.MonkeyPatch.context() as m:
        m.setenv("SPARSECC_NATIVE", "1" if path == "native" else "0")
        yield


def reference(q, k, v, block_mask, b: int, scale: float, causal: bool, kpm: Optional[torch.Tensor]):
    """Dense softmax attention, -inf outside the expanded block mask / causal / key padding; empty rows -> 0."""
    B, H, L, _ = q.shape
    S, g = k.shape[2], H // k.shape[1]
    k, v = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
    allowed = block_mask.repeat_interleave(b, 0).repeat_interleave(b, 1)[:L, :S]
    if causal:
        allowed = allowed & torch.ones(L, S, dtype=torch.bool).tril()
    allowed = allowed.expand(B, 1, L, S)
    if kpm is not None:
        allowed = allowed & kpm[:, None, None, :]
    s = (q @ k.transpose(-1, -2) * scale).masked_fill(~allowed, float("-inf"))
    mx = s.amax(-1, keepdim=True).detach().nan_to_num(0.0, neginf=0.0)
    p = (s - mx).exp()
    p = p / p.sum(-1, keepdim=True).clamp_min(1e-300)
    return p @ v


def make_case(B=1, H=2, Hkv=2, L=40, S=40, D=8, b=8, density=0.5, causal=False, padding=False, seed=0,
              block_mask=None):
    g = torch.Generator().manual_seed(seed)
    nq, nk = -(-L // b), -(-S // b)
    if block_mask is None:
        block_mask = torch.rand(nq, nk, generator=g) < density
    kpm = (torch.rand(B, S, generator=g) < 0.75) if padding else None
    q = torch.randn(B, H, L, D, generator=g, dtype=torch.float64)
    k = torch.randn(B, Hkv, S, D, generator=g, dtype=torch.float64)
    v = torch.randn(B, Hkv, S, D, generator=g, dtype=torch.float64)
    return q, k, v, block_mask, kpm


def check_against_reference(q, k, v, block_mask, b, causal, kpm, scale=None, atol=1e-5):
    """Forward and dq/dk/dv of the fp32 op equal the float64 reference within atol."""
    scale = 1 / math.sqrt(q.shape[-1]) if scale is None else scale
    idx, cnt = block_mask_to_ell(block_mask)
    ours = [t.float().requires_grad_() for t in (q, k, v)]
    refs = [t.clone().requires_grad_() for t in (q, k, v)]
    out = block_sparse_attention(*ours, idx, cnt, b, scale, causal, kpm)
    ref = reference(*refs, block_mask, b, scale, causal, kpm)
    grad = torch.randn_like(ref)
    out.backward(grad.float())
    ref.backward(grad)
    assert out.dtype == torch.float32 and out.shape == ref.shape
    torch.testing.assert_close(out.double(), ref, atol=atol, rtol=0)
    for a, r in zip(ours, refs):
        assert not torch.isnan(a.grad).any()
        torch.testing.assert_close(a.grad.double(), r.grad, atol=atol, rtol=0)
    return out


@settings(max_examples=15, deadline=None)
@given(B=st.integers(1, 2), Hkv=st.integers(1, 2), G=st.integers(1, 3), L=st.integers(1, 70),
       S=st.integers(1, 70), D=st.sampled_from([4, 8, 16]), b=st.sampled_from([4, 8, 16]),
       density=st.floats(0.0, 1.0), causal=st.booleans(), padding=st.booleans(), seed=st.integers(0, 2**16))
def test_random_layouts_match_dense_reference(B, Hkv, G, L, S, D, b, density, causal, padding, seed):
    case = make_case(B, Hkv * G, Hkv, L, S, D, b, density, causal, padding, seed)
    for path in PATHS:
        with kernel_path(path):
            check_against_reference(*case[:4], b, causal, case[4])


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("padding", [False, True])
@pytest.mark.parametrize("L,S,H,Hkv", [(64, 64, 4, 4), (50, 50, 4, 2), (37, 90, 6, 2), (90, 37, 3, 1)])
def test_cases(causal, padding, L, S, H, Hkv, path):
    """Causal, key padding, GQA, L not a multiple of the block, cross attention (L != S)."""
    q, k, v, bm, kpm = make_case(2, H, Hkv, L, S, 16, 16, 0.4, causal, padding, seed=L + S)
    with kernel_path(path):
        check_against_reference(q, k, v, bm, 16, causal, kpm, scale=0.3)


@needs_cxx
def test_native_kernels_run_and_equal_pytorch_path():
    """fp32 forward and backward run the C++ kernels (BLAS on the blocks in place) and equal the chunked
    flash path, logsumexp and gradients included (-inf / zero on rows with no allowed key), with runs
    of consecutive blocks, a partial last block, causal + padding, GQA, and a query block that keeps
    nothing."""
    B, H, Hkv, L, D, b = 2, 6, 3, 200, 16, 32
    nq = -(-L // b)
    bm = torch.zeros(nq, nq, dtype=torch.bool)
    bm[:, :3] = True  # a run of 3 consecutive blocks in every row
    bm[4, 5:] = True  # a run ending in the partial last block
    bm[2] = False  # a query block with no kept key block
    kpm = torch.rand(B, L, generator=torch.Generator().manual_seed(1)) < 0.8
    kpm[1, :100] = False  # batch 1: the first rows' keys are all padding
    q, k, v = (torch.randn(B, h, L, D, generator=torch.Generator().manual_seed(i)) for i, h in
               enumerate((H, Hkv, Hkv)))
    idx, cnt = block_mask_to_ell(bm)
    args = (q, k, v, idx, cnt, b, 0.25, True, kpm)
    assert cpu.native_kernels(), "the C++ kernels did not build (see the warning)"
    grad = torch.randn(B, H, L, D, generator=torch.Generator().manual_seed(7))
    results = {}
    for path in PATHS:
        with kernel_path(path):
            assert (cpu.forward_native(*args) is not None) == (path == "native")  # which kernel runs
            leaves = [t.clone().requires_grad_() for t in (q, k, v)]
            out, lse = block_sparse_attention_op(*leaves, *args[3:])
            backward_args = (grad, *args[:3], out.detach(), lse, *args[3:])
            assert (cpu.backward_native(*backward_args) is not None) == (path == "native")
            out.backward(grad)
            results[path] = (out.detach(), lse, [t.grad for t in leaves])
    (out, lse, grads), (ref_out, ref_lse, ref_grads) = results["native"], results["pytorch"]
    for got, expected in zip(grads, ref_grads):
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    assert bool((grads[0][:, :, 2 * b:3 * b] == 0).all())  # no kept block: no gradient
    torch.testing.assert_close(out, ref_out, atol=2e-6, rtol=1e-5)
    assert torch.equal(torch.isinf(lse), torch.isinf(ref_lse)) and bool(torch.isinf(lse[:, :, 2 * b:3 * b]).all())
    finite = ~torch.isinf(ref_lse)
    torch.testing.assert_close(lse[finite], ref_lse[finite], atol=2e-6, rtol=1e-6)
    assert bool((out[:, :, 2 * b:3 * b] == 0).all())


@pytest.mark.parametrize("workers,chunk", [(1, 1 << 18), (0, 1), (1, 1), (2, 1 << 12)])
def test_chunking_and_workers_do_not_change_results(workers, chunk):
    q, k, v, bm, kpm = make_case(2, 4, 2, 100, 100, 8, 8, 0.3, True, True, seed=3)
    with kernel_path("pytorch"), cpu.use_options(workers=workers, chunk_elements=chunk) as opts:
        assert cpu.options() == opts == cpu.CpuOptions(chunk_elements=chunk, workers=workers)
        check_against_reference(q, k, v, bm, 8, True, kpm)
    assert cpu.options() == cpu.CpuOptions()  # restored
    assert torch.get_num_threads() >= 1
    with pytest.raises(ValueError, match="chunk_elements"):
        cpu.CpuOptions(chunk_elements=0)


@pytest.mark.parametrize("workers", [1, 2])
def test_runs_under_inference_mode_with_worker_threads(workers):
    """Worker threads run in the caller's grad / inference mode (they are thread-local)."""
    q, k, v, bm, _ = make_case(1, 4, 4, 96, 96, 8, 16, 0.5, False, False, seed=5)
    idx, cnt = block_mask_to_ell(bm)
    expected = block_sparse_attention(q, k, v, idx, cnt, 16)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:  # several chunks, so the pool is used
        with torch.inference_mode(), cpu.use_options(workers=workers, chunk_elements=1 << 10):
            got = block_sparse_attention(q, k, v, idx, cnt, 16)
    finally:
        torch.set_num_threads(threads)
    assert got.is_inference()
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-6)


def test_fully_masked_rows_are_zero_with_zero_grads():
    B, H, L, D, b = 2, 2, 40, 8, 8
    bm = torch.rand(5, 5, generator=torch.Generator().manual_seed(1)) < 0.5
    bm[:, 0] = True
    bm[2] = False  # query block 2 keeps nothing
    kpm = torch.ones(B, L, dtype=torch.bool)
    kpm[1] = False  # batch item 1: every key is padding
    kpm[0, :8] = False  # with causal, batch 0's first query block sees no key
    q, k, v, _, _ = make_case(B, H, H, L, L, D, b)
    out = check_against_reference(q, k, v, bm, b, True, kpm)
    assert not torch.isnan(out).any()
    assert (out[1] == 0).all() and (out[0, :, :8] == 0).all() and (out[:, :, 16:24] == 0).all()
    idx, cnt = block_mask_to_ell(bm)
    leaves = [t.float().requires_grad_() for t in (q, k, v)]
    out, lse = block_sparse_attention_op(*leaves, idx, cnt, b, 0.3, True, kpm)
    assert torch.isneginf(lse[1]).all() and torch.isneginf(lse[0, :, :8]).all()
    assert torch.isfinite(lse[0, :, 8:16][(out[0, :, 8:16] != 0).any(-1)]).all()
    out.sum().backward()
    assert (leaves[0].grad[1] == 0).all() and (leaves[0].grad[:, :, 16:24] == 0).all()
    assert (leaves[1].grad[1] == 0).all() and (leaves[2].grad[1] == 0).all()


def test_empty_layout_gives_zeros():
    q, k, v, _, _ = make_case(1, 2, 2, 20, 20, 8, 8)
    bm = torch.zeros(3, 3, dtype=torch.bool)
    out = check_against_reference(q, k, v, bm, 8, False, None)
    assert (out == 0).all()


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("H,Hkv", [(4, 4), (4, 2)])
def test_full_mask_equals_dense_sdpa(causal, H, Hkv):
    L, b = 72, 16
    q, k, v = (torch.randn(2, h, L, 32) for h in (H, Hkv, Hkv))
    idx, cnt = block_mask_to_ell(torch.ones(5, 5, dtype=torch.bool))
    ours = block_sparse_attention(q, k, v, idx, cnt, b, causal=causal)
    dense = F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=H != Hkv)
    torch.testing.assert_close(ours, dense, atol=1e-5, rtol=0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision(dtype):
    q, k, v, bm, kpm = make_case(1, 4, 2, 48, 48, 16, 16, 0.5, True, True, seed=5)
    idx, cnt = block_mask_to_ell(bm)
    leaves = [t.to(dtype).requires_grad_() for t in (q, k, v)]
    out = block_sparse_attention(*leaves, idx, cnt, 16, None, True, kpm)
    out.float().sum().backward()
    assert out.dtype == dtype and all(t.grad.dtype == dtype for t in leaves)
    ref = reference(*(t.detach().double() for t in leaves), bm, 16, 0.25, True, kpm)
    torch.testing.assert_close(out.double(), ref, atol=3e-2, rtol=3e-2)


def _sample_args(causal: bool, padding: bool, requires_grad: bool = True):
    q, k, v, bm, kpm = make_case(2, 4, 2, 40, 24, 8, 8, 0.6, causal, padding, seed=11)
    idx, cnt = block_mask_to_ell(bm)
    q, k, v = (t.float().requires_grad_(requires_grad) for t in (q, k, v))
    return (q, k, v, idx, cnt, 8, 0.35, causal, kpm)


@pytest.mark.parametrize("causal,padding", [(False, False), (True, True)])
def test_opcheck(causal, padding):
    torch.library.opcheck(block_sparse_attention_op, _sample_args(causal, padding))
    q, k, v, idx, cnt, b, scale, c, kpm = _sample_args(causal, padding, requires_grad=False)
    out, lse = block_sparse_attention_op(q, k, v, idx, cnt, b, scale, c, kpm)
    torch.library.opcheck(block_sparse_attention_backward_op,
                          (torch.randn_like(out), q, k, v, out, lse, idx, cnt, b, scale, c, kpm))


class _Attn(torch.nn.Module):
    def __init__(self, block_mask: torch.Tensor, b: int, causal: bool):
        super().__init__()
        idx, cnt = block_mask_to_ell(block_mask)
        self.register_buffer("idx", idx)
        self.register_buffer("cnt", cnt)
        self.b, self.causal = b, causal

    def forward(self, q, k, v, kpm):
        return block_sparse_attention(q, k, v, self.idx, self.cnt, self.b, None, self.causal, kpm) * 2.0


def test_torch_export():
    q, k, v, bm, kpm = make_case(1, 4, 2, 40, 40, 8, 8, 0.5, True, True)
    q, k, v = q.float(), k.float(), v.float()
    mod = _Attn(bm, 8, True)
    ep = torch.export.export(mod, (q, k, v, kpm))
    targets = {n.target for n in ep.graph.nodes if n.op == "call_function"}
    assert torch.ops.sparsecc.block_sparse_attention.default in targets
    torch.testing.assert_close(ep.module()(q, k, v, kpm), mod(q, k, v, kpm))


def test_torch_compile_fullgraph_forward_and_backward():
    q, k, v, bm, kpm = make_case(2, 4, 2, 40, 40, 8, 8, 0.5, True, True)
    mod = _Attn(bm, 8, True)
    # aot_eager: dynamo + AOT autograd through the fake and autograd registrations, without the
    # minutes of C++ compilation Inductor needs on a busy 2-core machine
    compiled = torch.compile(mod, fullgraph=True, backend="aot_eager")
    eager_in = [t.float().requires_grad_() for t in (q, k, v)]
    comp_in = [t.float().requires_grad_() for t in (q, k, v)]
    out_e, out_c = mod(*eager_in, kpm), compiled(*comp_in, kpm)
    torch.testing.assert_close(out_c, out_e)
    out_e.sum().backward()
    out_c.sum().backward()
    for a, c in zip(eager_in, comp_in):
        torch.testing.assert_close(c.grad, a.grad)


def test_bad_layouts_raise_layout_error():
    q, k, v = (torch.randn(1, 2, 40, 8) for _ in range(3))
    idx, cnt = block_mask_to_ell(torch.ones(4, 5, dtype=torch.bool))  # 4 query blocks, 5 needed
    with pytest.raises(LayoutError, match="block_mask_to_ell"):
        block_sparse_attention(q, k, v, idx, cnt, 8)
    idx, cnt = block_mask_to_ell(torch.ones(5, 5, dtype=torch.bool))
    with pytest.raises(LayoutError, match=r"\[0, 5\)"):
        block_sparse_attention(q, k, v, idx + 1, cnt, 8)
    with pytest.raises(ValueError, match="key_padding_mask"):
        block_sparse_attention(q, k, v, idx, cnt, 8, key_padding_mask=torch.ones(1, 40))


def test_clean_layout_hand_computed():
    """The one ELL clean-up every kernel starts from, on a case worked out by hand.

    A layout made for 4 query blocks x 4 key blocks runs at L = S = 20 with b = 8: 3 query blocks,
    3 key blocks (crop). Rows (kv_indices / kv_counts):
      0: [2, 0, 0] count 2  -> blocks {0, 2}; causal drops 2 (above the diagonal)   -> [0]
      1: [1, 1, 3] count 3  -> duplicate 1 merged, 3 cropped (past S)               -> [1]
      2: [2, 0, 1] count 1  -> only the first entry counts (padding after it)       -> [2]
      3: [0, 1, 2] count 3  -> cropped away (past L)
    """
    idx = torch.tensor([[2, 0, 0], [1, 1, 3], [2, 0, 1], [0, 1, 2]])
    cnt = torch.tensor([2, 3, 1, 3])
    keep = clean_block_mask(idx, cnt, 20, 20, 8, causal=True)
    assert keep.tolist() == [[True, False, False], [False, True, False], [False, False, True]]
    rows, counts = clean_layout(idx, cnt, 20, 20, 8, causal=True)
    assert rows.tolist() == [[0], [1], [2]] and counts.tolist() == [1, 1, 1]
    keep = clean_block_mask(idx, cnt, 20, 20, 8, causal=False)
    assert keep.tolist() == [[True, False, True], [False, True, False], [False, False, True]]
    rows, counts = clean_layout(idx, cnt, 20, 20, 8, causal=False)
    assert rows.tolist() == [[0, 2], [1, 1], [2, 2]] and counts.tolist() == [2, 1, 1]  # padded with the last
    cols, col_counts = column_layout(keep)  # per key block the query blocks that keep it
    assert cols.tolist() == [[0, 0], [1, 1], [0, 2]] and col_counts.tolist() == [1, 1, 2]
    with pytest.raises(LayoutError, match=r"\[0, 3\)"):  # an index past S in a layout made for this L
        clean_layout(torch.tensor([[3], [0], [0]]), torch.tensor([1, 1, 1]), 20, 20, 8, causal=False)
    with pytest.raises(LayoutError, match="kv_counts"):
        clean_layout(torch.tensor([[0], [0], [0]]), torch.tensor([2, 1, 1]), 20, 20, 8, causal=False)


@pytest.mark.parametrize("causal,padding", [(False, False), (True, True)])
def test_op_reference_equals_the_dense_definition(causal, padding):
    """`op.reference` (the family's own dense definition) against this file's reference, logsumexp included."""
    q, k, v, bm, kpm = make_case(2, 4, 2, 37, 45, 8, 8, 0.5, causal, padding, seed=9)
    bm[1] = False  # a query block that keeps nothing
    idx, cnt = block_mask_to_ell(bm)
    out, lse = op_reference(q, k, v, idx, cnt, 8, 0.3, causal, kpm)
    torch.testing.assert_close(out, reference(q, k, v, bm, 8, 0.3, causal, kpm), atol=1e-10, rtol=0)
    assert lse.dtype == torch.float64 and bool(torch.isneginf(lse[:, :, 8:16]).all())
    got_out, got_lse = block_sparse_attention_op(q, k, v, idx, cnt, 8, 0.3, causal, kpm)
    torch.testing.assert_close(got_out, out, atol=1e-10, rtol=0)
    torch.testing.assert_close(got_lse, lse, atol=1e-10, rtol=0)


@needs_cxx
@pytest.mark.parametrize("causal,padding", [(False, False), (True, True)])
def test_native_ops_opcheck(causal, padding):
    """The C++ kernels are ops of their own (sparsecc_cpu::*): schema, fake kernel, dispatch."""
    assert cpu.native_kernels()
    q, k, v, idx, cnt, b, scale, c, kpm = _sample_args(causal, padding, requires_grad=False)
    idx, cnt = clean_layout(idx, cnt, q.shape[2], k.shape[2], b, c)
    utils = ("test_schema", "test_faketensor", "test_aot_dispatch_static")
    fwd = torch.ops.sparsecc_cpu.block_sparse_attention_forward
    torch.library.opcheck(fwd, (q, k, v, idx, cnt, kpm, b, scale, c), test_utils=utils)
    out, lse = fwd(q, k, v, idx, cnt, kpm, b, scale, c)
    torch.library.opcheck(torch.ops.sparsecc_cpu.block_sparse_attention_backward,
                          (torch.randn_like(out), q, k, v, out, lse, idx, cnt, kpm, b, scale, c), test_utils=utils)
    assert "blas=sgemm_" in torch.ops.sparsecc_cpu.block_sparse_attention_info()
    with pytest.raises(RuntimeError, match="fp32"):
        fwd(q.double(), k.double(), v.double(), idx, cnt, kpm, b, scale, c)


def _window_bias(B: int, H: int, L: int, S: int, window: int, dtype=torch.float64, seed: int = 0) -> torch.Tensor:
    """A random score bias (ALiBi-like terms) that is -inf outside a causal sliding window of `window` keys."""
    g = torch.Generator().manual_seed(seed)
    bias = torch.randn(B, H, L, S, generator=g, dtype=dtype)
    return bias.masked_fill(torch.arange(S)[None] <= torch.arange(L)[:, None] - window, float("-inf"))


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("causal,padding,bias_heads", [(False, False, 1), (True, True, 4), (True, False, 1),
                                                       (False, True, 4)])
def test_score_bias_matches_the_dense_definition_with_gradients(path, causal, padding, bias_heads):
    """An additive bias (per head or shared, -inf outside a window) equals dense attention with the bias on
    the kept entries; q, k, v and the bias get the dense gradients (dbias zero off the kept entries)."""
    B, H, Hkv, L, S, b = 2, 4, 2, 37, 37, 8
    q, k, v, bm, kpm = make_case(B, H, Hkv, L, S, 16, b, 0.6, causal, padding)
    q, k, v = (t.float().requires_grad_(True) for t in (q, k, v))
    idx, cnt = block_mask_to_ell(bm)
    bias = _window_bias(B if bias_heads > 1 else 1, bias_heads, L, S, 11, torch.float32).requires_grad_(True)
    with kernel_path(path):
        out, lse = block_sparse_attention_op(q, k, v, idx, cnt, b, 0.3, causal, kpm, bias)
        want, want_lse = op_reference(q, k, v, idx, cnt, b, 0.3, causal, kpm, bias)
        grad = torch.randn_like(out)
        got = torch.autograd.grad(out, (q, k, v, bias), grad)
        ref = torch.autograd.grad(want, (q, k, v, bias), grad)
    assert (out - want).abs().max() <= 2e-6
    finite = want_lse.isfinite()
    assert torch.equal(lse.isfinite(), finite) and (lse - want_lse)[finite].abs().max() <= 2e-6
    for name, a, r in zip(("dq", "dk", "dv", "dbias"), got, ref):
        assert (a - r).abs().max() <= 5e-6, f"{name} differs by {(a - r).abs().max():.3g}"
    kept = clean_block_mask(idx, cnt, L, S, b, causal).repeat_interleave(b, 0).repeat_interleave(b, 1)[:L, :S]
    assert float(got[3][..., ~kept].abs().max()) == 0.0  # no gradient where the layout computes nothing


def test_score_bias_opcheck_and_export():
    q, k, v, idx, cnt, b, scale, causal, kpm = _sample_args(True, True)
    bias = _window_bias(1, q.shape[1], q.shape[2], k.shape[2], 9, torch.float32).requires_grad_(True)
    torch.library.opcheck(block_sparse_attention_op, (q, k, v, idx, cnt, b, scale, causal, kpm, bias))
    ep = torch.export.export(_BiasedAttn(idx, cnt, b), (q.detach(), k.detach(), v.detach(), bias.detach()))
    targets = {n.target for n in ep.graph.nodes if n.op == "call_function"}
    assert torch.ops.sparsecc.block_sparse_attention.default in targets
    torch.testing.assert_close(ep.module()(q, k, v, bias), _BiasedAttn(idx, cnt, b)(q, k, v, bias))


class _BiasedAttn(torch.nn.Module):
    def __init__(self, idx, cnt, b):
        super().__init__()
        self.register_buffer("idx", idx)
        self.register_buffer("cnt", cnt)
        self.b = b

    def forward(self, q, k, v, bias):
        return block_sparse_attention(q, k, v, self.idx, self.cnt, self.b, None, True, None, bias)


def test_bias_with_the_wrong_shape_says_what_it_expected():
    q, k, v, idx, cnt, b, scale, causal, kpm = _sample_args(True, False, requires_grad=False)
    with pytest.raises(ValueError, match=r"bias must be a floating \(B or 1, H or 1, L, S\)"):
        block_sparse_attention_op(q, k, v, idx, cnt, b, scale, causal, kpm, torch.zeros(1, 1, 3, 3))

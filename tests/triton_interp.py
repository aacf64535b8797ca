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

TOL = {torch.float32: 2e-5, torch.float16: 4e-3}

CASES: dict[str, Callable[[], dict]] = {}


def case(name: str):
    def deco(fn):
        CASES[name] = fn
        return fn
    return deco


def _max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max()) if a.numel() else 0.0


# ---------------------------------------------------------------------------------------------
# block-sparse attention


def _attention_case(dtype: torch.dtype, B=1, H=2, Hkv=2, L=32, S=32, D=16, b=16, causal=False, padding=False,
                    density=0.6, empty_row: Optional[int] = None, layout_len: Optional[int] = None,
                    pad_block: bool = False, seed=0) -> dict:
    """Max abs errors of the Triton forward/backward vs the CPU op on the same (upcast) inputs."""
    from sparsecc.backends.triton.attention import block_sparse_attention_backward, block_sparse_attention_forward
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
    scale = 1.0 / math.sqrt(D)
    out, lse = block_sparse_attention_forward(q, k, v, idx, cnt, b, scale, causal, kpm)
    q32, k32, v32 = q.float(), k.float(), v.float()
    ref_out, ref_lse = block_sparse_attention_op(q32, k32, v32, idx, cnt, b, scale, causal, kpm)
    grad = torch.randn(ref_out.shape, generator=g)
    dq, dk, dv = block_sparse_attention_backward(grad.to(dtype), q, k, v, out, lse, idx, cnt, b, scale, causal, kpm)
    rdq, rdk, rdv = block_sparse_attention_backward_op(grad, q32, k32, v32, ref_out, ref_lse, idx, cnt, b, scale,
                                                       causal, kpm)
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
}
for _name, _kw in ATTENTION.items():
    for _dt, _tag in ((torch.float32, "fp32"), (torch.float16, "fp16")):
        CASES[f"attention/{_name}/{_tag}"] = (lambda kw=_kw, dt=_dt: _attention_case(dt, **kw))


@case("attention/cpu_tensors_report")
def _attention_checks() -> dict:
    """Layout errors are reported like the CPU op's; fp64 is refused with a clear message."""
    from sparsecc.backends.triton.attention import block_sparse_attention_forward
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


@case("registration")
def _registration() -> dict:
    """register() adds the CUDA kernels of every sparsecc op that has one."""
    import sparsecc.backends.triton as tb
    ops = tb.register()
    has = {name: torch._C._dispatch_has_kernel_for_dispatch_key(name, "CUDA") for name in ops}
    return {"ops": sorted(ops), "cuda_kernels": has}


def run(names: list[str]) -> dict:
    results = {}
    for name in names:
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

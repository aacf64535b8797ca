"""Benchmark `sparsecc::block_sparse_attention` against dense SDPA and compiled FlexAttention (CPU).

For each sequence length L and block density, a random-but-structured layout is built (the block
diagonal plus random blocks up to the density) and shared by all heads. Timed, B=1, H=8, D=64,
block 64, fp32: our op, dense `F.scaled_dot_product_attention`, and `torch.compile(flex_attention)`
with a `BlockMask.from_kv_blocks` built from the same ELL indices (as full blocks, so Flex runs no
mask_mod). Forward and forward+backward (Flex's backward is not implemented on CPU: "n/a").
The candidates are timed round-robin (so a busy machine slows all of them alike); the table gives
medians after warm-up, and Flex's compile time separately.

Our fp32 forward runs the C++ kernel when it builds; `SPARSECC_NATIVE=0` times the PyTorch path
(`SPARSECC_NATIVE=require` refuses to fall back, so a missing compiler cannot pass unnoticed).

`--bias` adds an ALiBi score bias (per head, slope_h * (j - i), as BLOOM's) to every candidate: our
op's `bias` input (the PyTorch path: the C++ kernel takes no bias), dense SDPA's additive mask, and
Flex's `score_mod`.

    python tools/bench_block_sparse_attention.py [--quick] [--bias] [--repeats 5] [--out results.md]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from sparsecc.layouts.indexing import block_mask_to_ell
from sparsecc.ops.block_sparse_attention import block_sparse_attention, cpu as bsa_cpu

try:
    from tqdm import tqdm
except ImportError:  # progress bars are optional
    tqdm = None

H, D, BLOCK = 8, 64, 64


def structured_layout(n: int, density: float, seed: int) -> torch.Tensor:
    """Bool block mask [n, n]: the diagonal plus random off-diagonal blocks, round(density*n*n) in all."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.eye(n, dtype=torch.bool)
    extra = max(0, round(density * n * n) - n)
    off = (~mask).flatten().nonzero().flatten()
    mask.view(-1)[off[torch.randperm(len(off), generator=g)[:extra]]] = True
    return mask


def flex_block_mask(mask: torch.Tensor):
    """A FlexAttention BlockMask holding `mask`'s kept blocks as full blocks (no mask_mod needed)."""
    from torch.nn.attention.flex_attention import BlockMask
    kv_indices, kv_counts = block_mask_to_ell(mask)
    n = mask.shape[1]
    full = torch.zeros(mask.shape[0], n, dtype=torch.int32)  # ELL rows padded to all key blocks
    full[:, :kv_indices.shape[1]] = kv_indices.to(torch.int32)
    none = torch.zeros(1, 1, mask.shape[0], dtype=torch.int32)
    return BlockMask.from_kv_blocks(none, full[None, None].clone(), kv_counts.to(torch.int32)[None, None],
                                    full[None, None], BLOCK_SIZE=BLOCK)


def time_round_robin(fns: dict[str, Callable[[], object]], repeats: int, warmup: int) -> dict[str, float]:
    """Median seconds of each function, calling them in turn `repeats` times after `warmup` rounds."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t)
    return {name: statistics.median(ts) for name, ts in times.items()}


def alibi(L: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(slopes [H], bias [1, H, L, L] = slope_h * (j - i)): the ALiBi score bias."""
    slopes = 2.0 ** (-8.0 * torch.arange(1, H + 1) / H)
    pos = torch.arange(L, dtype=torch.float32)
    return slopes, slopes[None, :, None, None] * (pos[None, :] - pos[:, None])


def bench_case(L: int, density: float, repeats: int, warmup: int, seed: int, flex: Optional[Callable],
               backward: bool, bias: bool = False) -> dict:
    """Timings (seconds) of one (L, density) case."""
    torch.manual_seed(seed)
    q, k, v = (torch.randn(1, H, L, D) for _ in range(3))
    mask = structured_layout(L // BLOCK, density, seed)
    kv_indices, kv_counts = block_mask_to_ell(mask)
    row = {"L": L, "density": density, "kept": int(mask.sum()), "blocks": mask.numel()}
    slopes, b = alibi(L) if bias else (None, None)

    def score_mod(score, batch, head, q_idx, kv_idx):
        return score + slopes[head] * (kv_idx - q_idx)

    fwd: dict[str, Callable[[], object]] = {
        "ours": lambda: block_sparse_attention(q, k, v, kv_indices, kv_counts, BLOCK, bias=b),
        "dense": lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=b),
    }
    if flex is not None:
        bm = flex_block_mask(mask)
        mod = score_mod if bias else None
        t = time.perf_counter()
        out_flex = flex(q, k, v, score_mod=mod, block_mask=bm)
        row["flex_compile"] = time.perf_counter() - t
        ours = block_sparse_attention(q, k, v, kv_indices, kv_counts, BLOCK, bias=b)
        row["max_diff_vs_flex"] = float((ours - out_flex).abs().max())
        fwd["flex"] = lambda: flex(q, k, v, score_mod=mod, block_mask=bm)
    row.update({f"fwd_{name}": t for name, t in time_round_robin(fwd, repeats, warmup).items()})

    if backward:
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        grad = torch.randn_like(q)

        def run(fn: Callable[..., torch.Tensor]) -> Callable[[], None]:
            def step() -> None:
                for t in leaves:
                    t.grad = None
                fn(*leaves).backward(grad)
            return step

        fb = {"ours": run(lambda x, y, z: block_sparse_attention(x, y, z, kv_indices, kv_counts, BLOCK, bias=b)),
              "dense": run(lambda x, y, z: F.scaled_dot_product_attention(x, y, z, attn_mask=b))}
        row.update({f"fb_{name}": t for name, t in time_round_robin(fb, repeats, warmup).items()})
    return row


def machine_line() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((l.split(":", 1)[1].strip() for l in f if l.startswith("model name")), cpu)
    except OSError:
        pass
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return (f"Machine: {cpu}, {os.cpu_count()} CPUs, torch {torch.__version__} ({torch.get_num_threads()} "
            f"threads), Python {platform.python_version()}, {platform.system()}; load average {load:.2f} at start")


def our_forward_path() -> str:
    """Which implementation our fp32 forward ran: the C++ kernel or the PyTorch path (SPARSECC_NATIVE=0)."""
    native = bsa_cpu.native_kernels()
    return ("Our forward: the C++ kernel (sparsecc/ops/block_sparse_attention/cpu.cpp)." if native else
            "Our forward: the PyTorch path (gathered blocks through the fused flash kernel).")


def fmt_ms(t: Optional[float]) -> str:
    return "n/a" if t is None else f"{t * 1e3:.1f}"


def fmt_x(a: Optional[float], b: Optional[float]) -> str:
    return "n/a" if a is None or b is None else f"{a / b:.1f}x"


def table(rows: list[dict], repeats: int, bias: bool = False) -> str:
    lines = [
        "| L | density | kept blocks | ours fwd (ms) | dense fwd (ms) | flex fwd (ms) | vs dense | vs flex "
        "| ours fwd+bwd (ms) | dense fwd+bwd (ms) | flex fwd+bwd | vs dense (f+b) | flex compile (s) | max abs diff vs flex |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        g = r.get
        lines.append(
            f"| {r['L']} | 1/{round(1 / r['density'])} | {r['kept']}/{r['blocks']} | {fmt_ms(g('fwd_ours'))} "
            f"| {fmt_ms(g('fwd_dense'))} | {fmt_ms(g('fwd_flex'))} | {fmt_x(g('fwd_dense'), g('fwd_ours'))} "
            f"| {fmt_x(g('fwd_flex'), g('fwd_ours'))} | {fmt_ms(g('fb_ours'))} | {fmt_ms(g('fb_dense'))} | n/a "
            f"| {fmt_x(g('fb_dense'), g('fb_ours'))} "
            f"| {'n/a' if g('flex_compile') is None else format(g('flex_compile'), '.1f')} "
            f"| {'n/a' if g('max_diff_vs_flex') is None else format(g('max_diff_vs_flex'), '.1e')} |")
    path = ("Every candidate adds an ALiBi score bias [1, H, L, L] (ours: the op's bias input on the PyTorch "
            "path; dense: SDPA's additive mask; Flex: score_mod)." if bias else our_forward_path())
    lines += ["", f"Median of {repeats} round-robin runs after warm-up; B=1, H={H}, D={D}, block {BLOCK}, fp32. "
              "Flex backward raises NotImplementedError on CPU. " + path, machine_line()]
    return "\n".join(lines)


def write_atomic(path: str, text: str) -> None:
    """Write `text` to `path` through a temporary file in the same folder and os.replace."""
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".bench-", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096, 8192])
    p.add_argument("--densities", type=float, nargs="+", default=[1 / 4, 1 / 8, 1 / 16])
    p.add_argument("--repeats", type=int, default=5, help="timed runs per candidate (median)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="L in (1024, 2048), density 1/8, 3 repeats")
    p.add_argument("--no-flex", action="store_true", help="skip FlexAttention (no compile)")
    p.add_argument("--no-backward", action="store_true", help="skip forward+backward")
    p.add_argument("--bias", action="store_true", help="add an ALiBi score bias to every candidate")
    p.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's)")
    p.add_argument("--out", help="also write the table to this file")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.quick:
        args.lengths, args.densities, args.repeats = [1024, 2048], [1 / 8], min(args.repeats, 3)
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)

    flex = None
    if not args.no_flex:
        from torch.nn.attention.flex_attention import flex_attention
        flex = torch.compile(flex_attention, dynamic=False)
    cases = [(L, d) for L in args.lengths for d in args.densities]
    it = tqdm(cases, desc="cases", file=sys.stderr) if tqdm is not None else cases
    rows = []
    for L, d in it:
        if tqdm is not None:
            it.set_postfix(L=L, density=f"1/{round(1 / d)}")
        rows.append(bench_case(L, d, args.repeats, args.warmup, args.seed, flex, not args.no_backward, args.bias))
    text = table(rows, args.repeats, args.bias)
    print(text)
    if args.out:
        write_atomic(args.out, text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

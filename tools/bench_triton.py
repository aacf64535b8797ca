"""GPU benchmark of the Triton backend (issue 7): needs an NVIDIA GPU, triton, and a CUDA build of torch.

Three tables, side by side in one run, timed with `triton.testing.do_bench` (CUDA events, L2
flushed between calls, median):

1. block-sparse attention: our kernels (`sparsecc::block_sparse_attention` on CUDA) vs dense
   `F.scaled_dot_product_attention` vs `torch.compile(flex_attention)` with a BlockMask holding the
   same kept blocks (full blocks: no mask_mod), bf16, B=1, H=16, D=128, block 64, L = 4096..32768,
   densities 1/4..1/32 (block diagonal + random blocks), forward and forward+backward. Goals (L=16384):
   at least Flex's speed, and at least 0.8/density times dense SDPA.
2. sparse FFN decode: batch 1, bf16, d_model 4096, d_ff 16384, N 32 (ReLU and SwiGLU): the op's
   Triton kernel (controller included) vs the dense FFN (two cuBLAS GEMVs, bound by reading the
   weights); --layers weight sets are cycled. Goal: 8x faster than dense.
3. end to end: a BERT-base-shaped encoder and a Llama-style decoder, dense (`torch.compile`) vs
   `sparsecc.compile(..., backend="triton")` with each recipe (fixed BigBird-style layouts at
   density 1/8, sparse FFN N=32 with random controllers, both, token flow keeping half), forward.

    python tools/bench_triton.py [--quick] [--out results.md] [--skip-e2e]

Without CUDA it says so and exits with status 2 (nothing to measure on a CPU).
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sparsecc.layouts.indexing import block_mask_to_ell  # noqa: E402


def refuse_without_gpu() -> Optional[str]:
    """The reason this machine cannot run the benchmark, or None."""
    if not torch.cuda.is_available():
        cuda = "a CPU-only build" if torch.version.cuda is None else f"CUDA {torch.version.cuda}, but no device"
        return (f"bench_triton measures GPU kernels, and this machine has no CUDA device (torch {torch.__version__}"
                f", {cuda}). Run it on a machine with an NVIDIA GPU (Hopper-class for the BENCHMARKS.md goals): "
                "pip install 'sparsecc[triton]' with a CUDA build of torch, then python tools/bench_triton.py. "
                "The kernels' correctness is checked on CPU by the test suite (Triton interpreter).")
    try:
        import triton  # noqa: F401
    except ImportError:
        return "bench_triton needs triton: pip install 'sparsecc[triton]'"
    return None


def bench_ms(fn: Callable[[], object]) -> float:
    from triton.testing import do_bench
    return float(do_bench(fn, warmup=25, rep=100, return_mode="median"))


def machine_line() -> str:
    import triton
    props = torch.cuda.get_device_properties(0)
    return (f"{props.name} ({props.total_memory / 2**30:.0f} GiB, sm_{props.major}{props.minor}), "
            f"torch {torch.__version__} (CUDA {torch.version.cuda}), triton {triton.__version__}, "
            f"Python {platform.python_version()}, {platform.machine()}")


# ------------------------------------------------------------------------------------------ attention
def structured_layout(n: int, density: float, seed: int = 0) -> torch.Tensor:
    """Bool block mask [n, n]: the block diagonal plus random blocks, round(density * n * n) in all."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.eye(n, dtype=torch.bool)
    extra = max(0, round(density * n * n) - n)
    off = (~mask).flatten().nonzero().flatten()
    mask.view(-1)[off[torch.randperm(len(off), generator=g)[:extra]]] = True
    return mask


def flex_block_mask(mask: torch.Tensor, block: int, device: str):
    """A FlexAttention BlockMask with `mask`'s kept blocks as full blocks (no mask_mod)."""
    from torch.nn.attention.flex_attention import BlockMask
    kv_indices, kv_counts = block_mask_to_ell(mask)
    full = torch.zeros(mask.shape[0], mask.shape[1], dtype=torch.int32)
    full[:, :kv_indices.shape[1]] = kv_indices.to(torch.int32)
    none = torch.zeros(1, 1, mask.shape[0], dtype=torch.int32)
    return BlockMask.from_kv_blocks(none.to(device), full[None, None].clone().to(device),
                                    kv_counts.to(torch.int32)[None, None].to(device), full[None, None].to(device),
                                    BLOCK_SIZE=block)


def attention_table(lengths: list[int], densities: list[float], heads: int, head_dim: int, block: int) -> str:
    from torch.nn.attention.flex_attention import flex_attention

    from sparsecc.ops.block_sparse_attention import block_sparse_attention

    flex = torch.compile(flex_attention, dynamic=False)
    dev, dt = "cuda", torch.bfloat16
    rows = ["| L | density | kept blocks | ours fwd (ms) | SDPA fwd (ms) | Flex fwd (ms) | vs SDPA | goal 0.8/d "
            "| vs Flex | ours f+b (ms) | SDPA f+b (ms) | Flex f+b (ms) | vs SDPA (f+b) | vs Flex (f+b) "
            "| max diff vs Flex |",
            "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for L in lengths:
        g = torch.Generator(device=dev).manual_seed(0)
        q, k, v = (torch.randn(1, heads, L, head_dim, device=dev, dtype=dt, generator=g).requires_grad_()
                   for _ in range(3))
        grad = torch.randn(1, heads, L, head_dim, device=dev, dtype=dt, generator=g)
        n = L // block
        sdpa_f = bench_ms(lambda: F.scaled_dot_product_attention(q, k, v))
        sdpa_b = bench_ms(lambda: torch.autograd.grad(F.scaled_dot_product_attention(q, k, v), (q, k, v), grad))
        for density in densities:
            mask = structured_layout(n, density)
            idx, cnt = (t.to(dev) for t in block_mask_to_ell(mask))
            bm = flex_block_mask(mask, block, dev)

            def ours():
                return block_sparse_attention(q, k, v, idx, cnt, block)

            def theirs():
                return flex(q, k, v, block_mask=bm)

            with torch.no_grad():
                diff = float((ours().float() - theirs().float()).abs().max())
            of, ff = bench_ms(ours), bench_ms(theirs)
            ob = bench_ms(lambda: torch.autograd.grad(ours(), (q, k, v), grad))
            fb = bench_ms(lambda: torch.autograd.grad(theirs(), (q, k, v), grad))
            rows.append(f"| {L} | 1/{round(1 / density)} | {int(mask.sum())}/{n * n} | {of:.3f} | {sdpa_f:.3f} | "
                        f"{ff:.3f} | {sdpa_f / of:.1f}x | {0.8 / density:.1f}x | {ff / of:.2f}x | {ob:.3f} | "
                        f"{sdpa_b:.3f} | {fb:.3f} | {sdpa_b / ob:.1f}x | {fb / ob:.2f}x | {diff:.1e} |")
            print(rows[-1], flush=True)
        del q, k, v, grad
        torch.cuda.empty_cache()
    return "\n".join(rows)


# ------------------------------------------------------------------------------------------ sparse FFN
def ffn_table(d_model: int, d_ff: int, n: int, rank: int, layers: int) -> str:
    from sparsecc.ops.sparse_ffn import pack_sparse_ffn_weights, sparse_ffn_reference

    dev, dt = "cuda", torch.bfloat16
    rows = ["| FFN | dense (ms) | sparse, Triton (ms) | speed-up | goal | weights read, dense / sparse (MB) "
            "| max diff vs fp32 reference |", "|---|---:|---:|---:|---:|---:|---:|"]
    for act, gated in (("relu", False), ("silu", True)):
        g = torch.Generator(device=dev).manual_seed(0)

        def w(*shape, s=1.0):
            return (torch.randn(*shape, device=dev, generator=g) * s).to(dt)

        sets = []
        for _ in range(layers):
            dense = dict(w_in=w(d_ff, d_model, s=d_model ** -0.5), w_out=w(d_model, d_ff, s=(d_ff // n) ** -0.5),
                         w_gate=w(d_ff, d_model, s=d_model ** -0.5) if gated else None,
                         c1=w(d_model, rank, s=d_model ** -0.5), c2=w(rank, d_ff, s=rank ** -0.5))
            packed = pack_sparse_ffn_weights(dense["w_in"], None, dense["w_out"], None, dense["c1"], dense["c2"],
                                             None, n, act, dense["w_gate"], None)
            sets.append((dense, packed))
        xs = [w(1, d_model) for _ in range(16)]
        step = [0]

        def dense_ffn():
            d = sets[step[0] % layers][0]
            x = xs[step[0] % len(xs)]
            step[0] += 1
            h = F.linear(x, d["w_in"])
            h = F.silu(F.linear(x, d["w_gate"])) * h if gated else F.relu(h)
            return F.linear(h, d["w_out"])

        def sparse():
            p = sets[step[0] % layers][1]
            x = xs[step[0] % len(xs)]
            step[0] += 1
            return p(x)

        td, ts = bench_ms(dense_ffn), bench_ms(sparse)
        d, p = sets[0]
        ref = sparse_ffn_reference(xs[0].float(), d["w_in"].float(), None, d["w_out"].float(), None, d["c1"].float(),
                                   d["c2"].float(), None, n, act,
                                   d["w_gate"].float() if gated else None, None)
        diff = float((p(xs[0]).float() - ref).abs().max())
        mats = 3 if gated else 2
        mb_dense = mats * d_ff * d_model * 2 / 1e6
        mb_sparse = mats * (d_ff // n) * d_model * 2 / 1e6 + (d_model * rank + rank * d_ff) * 2 / 1e6
        name = "SwiGLU" if gated else "ReLU"
        rows.append(f"| {name} d_model {d_model}, d_ff {d_ff}, N {n} | {td:.3f} | {ts:.3f} | {td / ts:.1f}x | 8x | "
                    f"{mb_dense:.0f} / {mb_sparse:.1f} | {diff:.1e} |")
        print(rows[-1], flush=True)
    return "\n".join(rows)


# ------------------------------------------------------------------------------------------ end to end
def e2e_table(seq: int, quick: bool) -> str:
    import sparsecc
    from transformers import BertConfig, BertModel, LlamaConfig, LlamaModel

    dev = "cuda"
    models = {
        "BERT-base": lambda: BertModel(BertConfig(hidden_size=768, num_hidden_layers=2 if quick else 12,
                                                  num_attention_heads=12, intermediate_size=3072,
                                                  max_position_embeddings=seq, attn_implementation="sdpa")),
        "Llama-style (d 2048, 16 heads, 8 kv heads)": lambda: LlamaModel(LlamaConfig(
            hidden_size=2048, num_hidden_layers=2 if quick else 8, num_attention_heads=16, num_key_value_heads=8,
            intermediate_size=8192, max_position_embeddings=seq, attn_implementation="sdpa",
            bos_token_id=0, eos_token_id=0, pad_token_id=0)),
    }
    recipes = {
        "block-sparse attention (1/8)": sparsecc.Recipe(attention=sparsecc.Fixed(pattern="bigbird", density=1 / 8)),
        "sparse FFN (N=32)": sparsecc.Recipe(ffn=sparsecc.SparseFFN(n=32, init="random")),
        "both": sparsecc.Recipe(attention=sparsecc.Fixed(pattern="bigbird", density=1 / 8),
                                ffn=sparsecc.SparseFFN(n=32, init="random")),
        "token flow (keep 1/2, random gates)": sparsecc.Recipe(flow=sparsecc.TokenFlow(gate="random", keep=0.5)),
    }
    rows = ["| model | L | recipe | dense torch.compile (ms) | sparsecc triton (ms) | speed-up | compile (s) |",
            "|---|---:|---|---:|---:|---:|---:|"]
    for name, make in models.items():
        model = make().eval().to(dev, torch.bfloat16)
        ids = torch.randint(0, 1000, (1, seq), device=dev)
        with torch.no_grad():
            dense = torch.compile(model)
            td = bench_ms(lambda: dense(input_ids=ids))
        for rname, recipe in recipes.items():
            try:
                start = time.perf_counter()
                sm = sparsecc.compile(model, {"input_ids": ids}, recipe=recipe, backend="triton", check=False).eval()
                with torch.no_grad():
                    sm(input_ids=ids)
                    secs = time.perf_counter() - start
                    ts = bench_ms(lambda: sm(input_ids=ids))
                rows.append(f"| {name} | {seq} | {rname} | {td:.2f} | {ts:.2f} | {td / ts:.2f}x | {secs:.0f} |")
            except Exception as e:  # one failing recipe should not hide the others' figures
                rows.append(f"| {name} | {seq} | {rname} | {td:.2f} | failed: {type(e).__name__}: "
                            f"{str(e)[:120].replace('|', '/')} | | |")
            print(rows[-1], flush=True)
        del model
        torch.cuda.empty_cache()
    return "\n".join(rows)


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="L 4096 and 16384, densities 1/4 and 1/16, 2-layer models")
    ap.add_argument("--lengths", type=int, nargs="*", default=[4096, 8192, 16384, 32768])
    ap.add_argument("--densities", type=int, nargs="*", default=[4, 8, 16, 32], help="1/density values")
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--block", type=int, default=64)
    ap.add_argument("--d-model", type=int, default=4096)
    ap.add_argument("--d-ff", type=int, default=16384)
    ap.add_argument("--n", type=int, default=32)
    ap.add_argument("--rank", type=int, default=64)
    ap.add_argument("--layers", type=int, default=4, help="FFN weight sets cycled in the decode benchmark")
    ap.add_argument("--e2e-seq", type=int, default=4096)
    ap.add_argument("--skip-e2e", action="store_true")
    ap.add_argument("--out", help="also write the tables (markdown) to this file")
    args = ap.parse_args(argv)
    reason = refuse_without_gpu()
    if reason:
        print(reason, file=sys.stderr)
        return 2
    import sparsecc.backends.triton as tb
    tb.register()
    lengths = [4096, 16384] if args.quick else args.lengths
    densities = [1 / d for d in ([4, 16] if args.quick else args.densities)]
    parts = [f"Machine: {machine_line()}\n", "### Block-sparse attention (bf16, B=1, "
             f"H={args.heads}, D={args.head_dim}, block {args.block})\n",
             attention_table(lengths, densities, args.heads, args.head_dim, args.block),
             f"\n### Sparse FFN decode (batch 1, bf16, {args.layers} weight sets cycled)\n",
             ffn_table(args.d_model, args.d_ff, args.n, args.rank, args.layers)]
    if not args.skip_e2e:
        parts += [f"\n### End to end, forward, batch 1, L={args.e2e_seq}, bf16\n", e2e_table(args.e2e_seq, args.quick)]
    text = "\n".join(parts) + f"\n\nCommand: python tools/bench_triton.py {' '.join(argv or sys.argv[1:])}\n"
    print(text)
    if args.out:
        Path(args.out).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Table 1 of Scaling Transformers on this machine: seconds per decoded token, unbatched.

Four decoder LMs with random weights at the paper's 800M shape (d_model 1024,
d_ff 4096, 16 heads, 24 layers; vocabulary 32000): dense, +sparse FF, +sparse
QKV, +both. Each model's decode step (`DecodeStep`, static KV cache) goes
through `sparsecc.compile`; the sparse FF variants get `sparsecc::sparse_ffn`
from the recipe slot `sparsecc.SparseFFN(n, d_lowrank, init="random")` when the
package has it (random controllers: with random weights there is nothing to
distil, and the op's speed does not depend on which unit wins), otherwise from
`SparseFFN` modules. Sparse QKV is an architecture option (its model is built
with it; --qkv-output picks its attention output layer, none as released).
Harness as the paper: batch 1, a 1-token prompt, 2 warm-up tokens, then 10
timed tokens. The four variants are built first, then the harness runs
--repeats times per variant, interleaved (dense, sparse FF, ..., dense, ...)
so that load drift on a shared machine hits every variant alike; the figure is
the median over all timed tokens. One intra-op thread by default (--threads).
--sparse-loss S adds a fifth row: +both with the paper's sparse loss layer (a
multiplicative vocabulary projection with S modules).

Example:
    python tools/bench_decode.py --out /tmp/decode.md          # 24 layers
    python tools/bench_decode.py --quick                        # 4 layers, a smoke run
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import sparsecc  # noqa: E402
from common import add_table1_shape, machine_line, write_atomic  # noqa: E402
from sparsecc.decode import compile_decoder, decode_tokens  # noqa: E402
from sparsecc.nn import QKV_OUTPUTS, CausalLM, DecoderConfig, count_parameters, with_sparse_ffn  # noqa: E402

WARMUP, TIMED = 2, 10
VARIANTS = (("dense", False, False), ("+sparse FF", True, False), ("+sparse QKV", False, True),
            ("+both", True, True))


def build(args: argparse.Namespace, sparse_ffn: bool, sparse_qkv: bool, sparse_loss: int = 0):
    """The compiled decode step of one variant and its parameter count."""
    torch.manual_seed(0)
    cfg = DecoderConfig(vocab_size=args.vocab, d_model=args.d_model, n_layers=args.layers, n_heads=args.heads,
                        d_ff=args.d_ff, max_len=WARMUP + TIMED, style=args.style, sparse_qkv=sparse_qkv,
                        qkv_modules=args.modules if sparse_qkv else 0, qkv_output=args.qkv_output,
                        sparse_loss=sparse_loss)
    with torch.no_grad():
        model = CausalLM(cfg).eval()
    recipe = sparsecc.Recipe.dense()
    if sparse_ffn and hasattr(sparsecc, "SparseFFN") and not args.ffn_modules:
        recipe = sparsecc.Recipe(attention=None, ffn=sparsecc.SparseFFN(n=args.n, d_lowrank=args.d_lowrank,
                                                                        init="random"))
    elif sparse_ffn:
        model = with_sparse_ffn(model, n=args.n, d_lowrank=args.d_lowrank)
    dec = compile_decoder(model, max_len=WARMUP + TIMED, recipe=recipe, check=False, backend=args.backend)
    params = count_parameters(dec.module)
    ops = [n.target for n in dec.module.graph_module.graph.nodes if n.op == "call_function"]
    assert ops.count(torch.ops.sparsecc.sparse_ffn.default) == (args.layers if sparse_ffn else 0)
    return dec, params


def run_once(dec) -> list[float]:
    """One run of the harness: seconds of the 10 timed tokens after 2 warm-up tokens."""
    return decode_tokens(dec, torch.zeros(1, dtype=torch.long), n_new=WARMUP + TIMED).seconds[WARMUP:]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_table1_shape(p)
    p.add_argument("--modules", type=int, default=16, help="sparse QKV modules S (paper: 16 at d_model 1024)")
    p.add_argument("--qkv-output", choices=QKV_OUTPUTS, default="none",
                   help="sparse QKV attention's output layer (default none, as trax releases it)")
    p.add_argument("--sparse-loss", type=int, default=0, metavar="S",
                   help="also time +both with the sparse loss layer (multiplicative vocabulary projection, S modules)")
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--style", choices=("gpt2", "llama"), default="gpt2")
    p.add_argument("--n", type=int, default=32)
    p.add_argument("--d-lowrank", type=int, default=64)
    p.add_argument("--repeats", type=int, default=5, help="runs of the harness per variant, interleaved")
    p.add_argument("--threads", type=int, default=1,
                   help="torch intra-op threads (default 1: on a shared, oversubscribed CPU two threads wait on "
                        "each other at every op; 0 leaves torch's default)")
    p.add_argument("--backend", choices=("eager", "inductor"), default="eager", help="sparsecc.compile backend")
    p.add_argument("--ffn-modules", action="store_true", help="sparse FF from SparseFFN modules, not the recipe")
    p.add_argument("--quick", action="store_true", help="4 layers (smoke run)")
    p.add_argument("--out", help="write the markdown table here")
    args = p.parse_args()
    if args.quick:
        args.layers = min(args.layers, 4)
    if args.threads:
        torch.set_num_threads(args.threads)

    variants = [(name, ffn, qkv, 0) for name, ffn, qkv in VARIANTS]
    if args.sparse_loss:
        variants.append((f"+both +sparse loss (S={args.sparse_loss})", True, True, args.sparse_loss))
    built = {}
    for name, sparse_ffn, sparse_qkv, sparse_loss in variants:
        start = time.perf_counter()
        built[name] = build(args, sparse_ffn, sparse_qkv, sparse_loss)
        gc.collect()
        print(f"built {name} ({built[name][1] / 1e6:.1f}M parameters) in {time.perf_counter() - start:.0f}s",
              flush=True)
    timed: dict[str, list[float]] = {name: [] for name in built}
    for r in range(args.repeats):  # interleaved, so load drift on a shared machine hits every variant alike
        for name, (dec, _) in built.items():
            timed[name] += run_once(dec)
        print(f"run {r + 1}/{args.repeats}: " + ", ".join(f"{n} {statistics.median(t):.4f}s"
                                                          for n, t in timed.items()), flush=True)
    rows = [(name, built[name][1], statistics.median(t), statistics.fmean(t)) for name, t in timed.items()]

    dense = rows[0][2]
    how = ("recipe `sparsecc.SparseFFN(init='random')`" if hasattr(sparsecc, "SparseFFN") and not args.ffn_modules
           else "`SparseFFN` modules")
    lines = [
        f"Decode seconds per token, batch 1 (Scaling Transformers Table 1 harness: 1-token prompt, {WARMUP} "
        f"warm-up + {TIMED} timed tokens; median of {TIMED * args.repeats} timed tokens from {args.repeats} interleaved "
        f"runs). "
        f"Shape d_model {args.d_model}, d_ff {args.d_ff}, {args.heads} heads, {args.layers} layers, vocab "
        f"{args.vocab}, {args.style} style, random weights, fp32; sparse FF n={args.n}, d_lowrank={args.d_lowrank} "
        f"via {how}; sparse QKV S={args.modules}, output layer {args.qkv_output!r}. Every variant runs its "
        f"`sparsecc.compile`d decode step "
        f"(backend {args.backend}).",
        "",
        "| model | params | s/token (median) | s/token (mean) | speedup |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, params, med, mean in rows:
        lines.append(f"| {name} | {params / 1e6:.1f}M | {med:.4f} | {mean:.4f} | {dense / med:.2f}x |")
    lines += ["", f"Machine: {machine_line()}.",
              f"Command: `python tools/bench_decode.py {' '.join(sys.argv[1:])}`"]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        write_atomic(args.out, text)


if __name__ == "__main__":
    main()

"""Decode micro-benchmark of the sparse FFN (Scaling Transformers): one token, CPU.

Times, per token and layer (median over all calls), side by side in one run:
  dense       F.linear -> act -> F.linear over the full weights,
  naive       controller arg-max, then row copies w_in[idx], w_out.T[idx] and two mat-vecs,
  kernel      the sparse_ffn implementation called directly (no sparsecc::sparse_ffn dispatch; the
              C++ kernel it calls is itself one op call, sparsecc_cpu::sparse_ffn_decode),
  sparse_ffn  torch.ops.sparsecc.sparse_ffn on packed weights (what models run):
              its C++ kernel, and its PyTorch path (SPARSECC_NATIVE=0).

To keep the numbers honest for decoding, every call gets a new token (so the
controller picks different units) and calls cycle through --layers independent
weight sets (default 8, ~400 MB at the default shape), so weights mostly come
from DRAM as in a deep model, not from a warm cache. --layers 1 shows the
cache-hot case. One intra-op thread by default (see --threads).

Example:
    python tools/bench_sparse_ffn_decode.py --d-model 1024 --d-ff 4096 --n 32 --out bench.md
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sparsecc.ops.sparse_ffn import (  # noqa: E402
    ACTIVATIONS,
    activation_fn,
    controller_select,
    pack_sparse_ffn_weights,
    sparse_ffn,
    sparse_ffn_reference,
)


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _make_layer(d_model: int, d_ff: int, n: int, d_lowrank: int, activation: str, gen: torch.Generator) -> dict:
    def rnd(*shape: int, scale: float) -> torch.Tensor:
        return torch.randn(*shape, generator=gen) * scale

    w = dict(
        w_in=rnd(d_ff, d_model, scale=d_model**-0.5), b_in=rnd(d_ff, scale=0.1),
        w_out=rnd(d_model, d_ff, scale=d_ff**-0.5), b_out=rnd(d_model, scale=0.1),
        c1=rnd(d_model, d_lowrank, scale=d_model**-0.5), c2=rnd(d_lowrank, d_ff, scale=d_lowrank**-0.5),
        c_bias=rnd(d_ff, scale=0.1),
    )
    w["packed"] = pack_sparse_ffn_weights(w["w_in"], w["b_in"], w["w_out"], w["b_out"], w["c1"], w["c2"],
                                          w["c_bias"], n, activation)
    return w


def _methods(n: int, activation: str) -> dict[str, Callable[[torch.Tensor, dict], torch.Tensor]]:
    def dense(x: torch.Tensor, w: dict) -> torch.Tensor:
        return F.linear(activation_fn(F.linear(x, w["w_in"], w["b_in"]), activation), w["w_out"], w["b_out"])

    def naive(x: torch.Tensor, w: dict) -> torch.Tensor:
        idx = controller_select(x, w["c1"], w["c2"], w["c_bias"], n)[0]
        h = activation_fn(F.linear(x, w["w_in"][idx], w["b_in"][idx]), activation)
        return h @ w["packed"].w_out_t[idx] + w["b_out"]  # row copies of the pre-transposed w_out

    def kernel(x: torch.Tensor, w: dict) -> torch.Tensor:
        p = w["packed"]
        return sparse_ffn._init_fn(x, p.w_in, p.b_in, p.w_out_t, p.b_out, p.c1, p.c2, p.c_bias, n, activation,
                                   None, None)

    def op(x: torch.Tensor, w: dict) -> torch.Tensor:
        p = w["packed"]
        return torch.ops.sparsecc.sparse_ffn(x, p.w_in, p.b_in, p.w_out_t, p.b_out, p.c1, p.c2, p.c_bias, n,
                                             activation, None, None)

    def op_pytorch_path(x: torch.Tensor, w: dict) -> torch.Tensor:
        return op(x, w)  # run with SPARSECC_NATIVE=0, see _ENV

    return {"dense FFN (F.linear x2 + act)": dense, "naive sparse (W[idx] copies)": naive,
            "sparse_ffn kernel, no op dispatch": kernel, "sparse_ffn op (packed weights)": op,
            _PYTORCH_PATH: op_pytorch_path}


_PYTORCH_PATH = "sparse_ffn op, PyTorch path (SPARSECC_NATIVE=0)"
_ENV = {_PYTORCH_PATH: "0"}  # SPARSECC_NATIVE while a method runs (set outside the timed call)


def _native_env(name: str) -> None:
    os.environ["SPARSECC_NATIVE"] = _ENV.get(name, "1")


def run(args: argparse.Namespace) -> str:
    """Run the benchmark and return the markdown report."""
    torch.set_num_threads(args.threads or torch.get_num_threads())
    gen = torch.Generator().manual_seed(args.seed)
    layers = [_make_layer(args.d_model, args.d_ff, args.n, args.d_lowrank, args.activation, gen)
              for _ in range(args.layers)]
    tokens = torch.randn(args.tokens, 1, args.d_model, generator=gen)
    methods = _methods(args.n, args.activation)
    times: dict[str, list[float]] = {name: [] for name in methods}
    with torch.inference_mode():
        w, x = layers[0], tokens[0]
        ref = sparse_ffn_reference(x, w["w_in"], w["b_in"], w["w_out"], w["b_out"], w["c1"], w["c2"],
                                   w["c_bias"], args.n, args.activation)
        errors = {}
        for name, fn in methods.items():
            _native_env(name)
            if "dense" not in name:
                errors[name] = (fn(x, w) - ref).abs().max().item()
        for name, fn in methods.items():  # warm-up
            _native_env(name)
            for i in range(args.warmup):
                fn(tokens[i % args.tokens], layers[i % args.layers])
        step = 0
        # Interleave methods in short rounds so background load hits them alike.
        for _ in range(args.repeats):
            for name, fn in methods.items():
                _native_env(name)
                for i in range(args.round):
                    x, w = tokens[(step + i) % args.tokens], layers[(step + i) % args.layers]
                    t0 = time.perf_counter()
                    fn(x, w)
                    times[name].append(time.perf_counter() - t0)
            step += args.round
    os.environ.pop("SPARSECC_NATIVE", None)
    med = {name: statistics.median(t) * 1e6 for name, t in times.items()}
    p10 = {name: sorted(t)[len(t) // 10] * 1e6 for name, t in times.items()}
    dense_us = med[next(iter(methods))]
    lines = [
        f"Sparse FFN decode, batch 1, fp32, d_model {args.d_model}, d_ff {args.d_ff}, N {args.n}, "
        f"d_lowrank {args.d_lowrank}, {args.activation}, {args.layers} layer weight sets cycled, "
        f"{len(next(iter(times.values())))} calls per method",
        "",
        "| method | median us/token | p10 us | speedup vs dense (median) | max abs err vs masked dense |",
        "|---|---:|---:|---:|---:|",
    ]
    for name in methods:
        err = f"{errors[name]:.1e}" if name in errors else "-"
        lines.append(f"| {name} | {med[name]:.1f} | {p10[name]:.1f} | {dense_us / med[name]:.2f}x | {err} |")
    lines += [
        "",
        f"Machine: {_cpu_name()}, {os.cpu_count()} CPUs, torch {torch.__version__} with "
        f"{torch.get_num_threads()} threads, Python {platform.python_version()}, {platform.system()}",
        f"Command: python tools/bench_sparse_ffn_decode.py {' '.join(sys.argv[1:])}",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--d-model", type=int, default=1024)
    ap.add_argument("--d-ff", type=int, default=4096)
    ap.add_argument("--n", type=int, default=32, help="block size N (one active unit per N)")
    ap.add_argument("--d-lowrank", type=int, default=64)
    ap.add_argument("--activation", default="relu", choices=sorted(ACTIVATIONS))
    ap.add_argument("--layers", type=int, default=8, help="independent weight sets cycled (defeats the cache)")
    ap.add_argument("--tokens", type=int, default=64, help="distinct random tokens cycled")
    ap.add_argument("--repeats", type=int, default=40, help="rounds per method")
    ap.add_argument("--round", type=int, default=16, help="calls per method per round")
    ap.add_argument("--warmup", type=int, default=20)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch intra-op threads (0: torch's default). Default 1: one-token decode is memory-bound "
                         "(dense gets no faster with 2 threads here), and on a shared machine each small parallel "
                         "op can stall for a scheduler tick (~8 ms) when another process holds a core")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=None, help="also write the markdown table to this file")
    args = ap.parse_args(argv)
    report = run(args)
    print(report, end="")
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=args.out.parent, prefix=args.out.name, suffix=".tmp")
        with os.fdopen(fd, "w") as fh:
            fh.write(report)
        os.chmod(tmp, 0o644)
        os.replace(tmp, args.out)


if __name__ == "__main__":
    main()

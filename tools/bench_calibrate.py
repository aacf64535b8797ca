"""Calibration cost of SPION + sparse FFN on the pretrained MiniLM: passes over the data and seconds.

    python tools/bench_calibrate.py [--batches 16] [--batch-size 8] [--seq-len 128] [--steps 300 0] [--repeats 3]

Compiles all-MiniLM-L6-v2 with Recipe(attention=Spion(spion_cf, block 32), ffn=SparseFFN(n=32,
d_lowrank 64)) on standard-library text and reports, per controller-distillation budget (`--steps`),
how many forward passes read the calibration data (embedding lookups of its token ids / batches) and
the compile's "calibrate" stage (observing the data, making the layouts, distilling the controllers)
and the whole compile (medians of `--repeats`). It uses only the public
`sparsecc.compile`, so the same file measures an older checkout for a before/after comparison: copy it
into that checkout's tools/ and run it there (tools/common.py puts its own checkout first on sys.path).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

sys.path.insert(0, __import__("os").path.dirname(__file__))
from common import emit, machine_line  # noqa: E402


class CountedIds(torch.Tensor):
    """Token ids that count the embedding lookups reading them: one per forward pass over a batch, however
    the checkout iterates, copies or re-wraps the batch list (any sparsecc version)."""

    reads = 0

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        if "embedding" in str(func):
            CountedIds.reads += 1
        with torch._C.DisableTorchFunctionSubclass():
            return func(*args, **(kwargs or {}))


def counted(batches: list) -> list:
    return [{k: v.as_subclass(CountedIds) if k == "input_ids" else v for k, v in b.items()} for b in batches]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--steps", type=int, nargs="+", default=[300, 0], help="controller distillation steps")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--label", default="", help="names the checkout in the table (e.g. before / after)")
    parser.add_argument("--out", help="also write the markdown table to this file")
    args = parser.parse_args()

    import sparsecc
    from sparsecc.models import load_model, text_batches

    loaded = load_model("minilm", batch=args.batch_size, seq_len=args.seq_len)
    batches = text_batches(loaded, args.batches, args.seq_len, batch_size=args.batch_size)
    lines = [f"all-MiniLM-L6-v2, {args.batches} calibration batches of {args.batch_size} x {args.seq_len} tokens, "
             f"SPION-CF (block 32) + sparse FFN (n 32, d_lowrank 64); median of {args.repeats} "
             f"{args.label}".rstrip(), "",
             "| controller steps | forward passes over the data | calibrate stage s (median) | runs s | compile s (median) |",
             "|---:|---:|---:|---|---:|"]
    for steps in args.steps:
        recipe = sparsecc.Recipe(attention=sparsecc.Spion(method="spion_cf", block=32, quantile=0.98),
                                 ffn=sparsecc.SparseFFN(n=32, d_lowrank=64, steps=steps))
        seconds, totals, passes = [], [], None
        for _ in range(args.repeats):
            data = counted(batches)
            CountedIds.reads = 0
            start = time.perf_counter()
            sm = sparsecc.compile(loaded.model, loaded.inputs, recipe=recipe, calibration=data, check=False)
            totals.append(time.perf_counter() - start)
            seconds.append(sm.report().stage_seconds.get("calibrate", totals[-1]))
            passes = CountedIds.reads / len(batches)
        lines.append(f"| {steps} | {passes:g} | {statistics.median(seconds):.2f} | "
                     f"{', '.join(f'{s:.2f}' for s in seconds)} | {statistics.median(totals):.2f} |")
    lines += ["", f"machine: {machine_line()}; torch {torch.__version__}"]
    emit(lines, args.out)


if __name__ == "__main__":
    main()

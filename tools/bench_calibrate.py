"""Calibration cost of SPION + sparse FFN on the pretrained MiniLM: passes over the data and seconds.

    python tools/bench_calibrate.py [--batches 16] [--batch-size 8] [--seq-len 128] [--steps 300 0] [--repeats 3]

Compiles all-MiniLM-L6-v2 with Recipe(attention=Spion(spion_cf, block 32), ffn=SparseFFN(n=32,
d_lowrank 64)) on standard-library text and reports, per controller-distillation budget (`--steps`),
how many times the calibration data was iterated and the compile's "calibrate" stage (observing the
data, making the layouts, distilling the controllers; median of `--repeats`). It uses only the public
`sparsecc.compile`, so the same file measures an older checkout (run it with that checkout's package
first on sys.path) for a before/after comparison.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

sys.path.insert(0, __import__("os").path.dirname(__file__))
from common import machine_line, write_atomic  # noqa: E402


class CountingBatches:
    """The calibration batches, counting how often they are iterated."""

    def __init__(self, batches: list):
        self.batches, self.iterations = batches, 0

    def __iter__(self):
        self.iterations += 1
        return iter(self.batches)


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
             "| controller steps | passes over the data | calibrate stage s (median) | runs s |", "|---:|---:|---:|---|"]
    for steps in args.steps:
        recipe = sparsecc.Recipe(attention=sparsecc.Spion(method="spion_cf", block=32, quantile=0.98),
                                 ffn=sparsecc.SparseFFN(n=32, d_lowrank=64, steps=steps))
        seconds, passes = [], None
        for _ in range(args.repeats):
            data = CountingBatches(batches)
            start = time.perf_counter()
            sm = sparsecc.compile(loaded.model, loaded.inputs, recipe=recipe, calibration=data, check=False)
            total = time.perf_counter() - start
            seconds.append(sm.report().stage_seconds.get("calibrate", total))
            passes = data.iterations
        lines.append(f"| {steps} | {passes} | {statistics.median(seconds):.2f} | "
                     f"{', '.join(f'{s:.2f}' for s in seconds)} |")
    lines += ["", f"machine: {machine_line()}; torch {torch.__version__}"]
    text = "\n".join(lines)
    print(text)
    if args.out:
        write_atomic(args.out, text + "\n")


if __name__ == "__main__":
    main()

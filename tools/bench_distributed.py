"""Calibration on several processes: all-MiniLM-L6-v2 with SPION-CF + sparse FFN, one process against 2
ranks (torch.distributed, gloo, a FileStore) on the same standard-library text.

    python tools/bench_distributed.py [--batches 16 32] [--batch-size 8] [--seq-len 128] [--steps 300]
                                      [--threads 1] [--out FILE]

Every process runs `sparsecc.compile` with `calibration=sparsecc.distributed.shard(batches)` (one process:
all of them). Reported per run: the compile's "calibrate" stage (observing, reducing, planning: layouts
and controller distillation) and the whole compile, medians over the ranks; the bytes each rank sent
(statistics, plans and the checks); whether every rank's plans equal, digest for digest, those of the
one process on all the batches. The bytes should not grow with the number of batches.
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import sys
import tempfile

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, os.path.dirname(__file__))
from common import machine_line, write_atomic  # noqa: E402


def _rank(rank: int, world: int, store: str, out_dir: str, args: argparse.Namespace, n_batches: int) -> None:
    torch.set_num_threads(args.threads)
    if world > 1:
        dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world,
                                timeout=datetime.timedelta(minutes=30))
    import time

    import sparsecc
    from sparsecc import distributed
    from sparsecc.models import load_model, text_batches
    loaded = load_model("minilm", batch=args.batch_size, seq_len=args.seq_len)
    batches = text_batches(loaded, n_batches, args.seq_len, batch_size=args.batch_size)
    recipe = sparsecc.Recipe(attention=sparsecc.Spion(method="spion_cf", block=32, quantile=0.98),
                             ffn=sparsecc.SparseFFN(n=32, d_lowrank=64, steps=args.steps))
    start = time.perf_counter()
    sm = sparsecc.compile(loaded.model, loaded.inputs, recipe=recipe, calibration=distributed.shard(batches),
                          check=False, progress=False)
    total = time.perf_counter() - start
    report = sm.report()
    torch.save({"digests": {k: p.digest() for k, p in sm.plans.items()}, "compile": total,
                "calibrate": report.stage_seconds["calibrate"], "bytes": report.distributed.get("bytes_sent", 0),
                "tokens": sum(int(b["attention_mask"].sum()) for b in distributed.shard(batches))},
               os.path.join(out_dir, f"{rank}.pt"))
    if world > 1:
        dist.destroy_process_group()


def run(world: int, args: argparse.Namespace, n_batches: int) -> list:
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_rank, args=(world, os.path.join(tmp, "store"), tmp, args, n_batches), nprocs=world)
        return [torch.load(os.path.join(tmp, f"{r}.pt")) for r in range(world)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, nargs="+", default=[16, 32])
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--steps", type=int, default=300, help="controller distillation steps")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process")
    parser.add_argument("--out", help="also write the markdown table to this file")
    args = parser.parse_args()
    lines = [f"all-MiniLM-L6-v2, batches of {args.batch_size} x {args.seq_len} tokens, SPION-CF (block 32) + "
             f"sparse FFN (n 32, d_lowrank 64, {args.steps} controller steps); {args.threads} thread(s) per "
             "process; gloo", "",
             "| batches | processes | tokens per rank | calibrate stage s | compile s | bytes sent per rank | "
             "plans equal to 1 process |", "|---:|---:|---|---:|---:|---|---|"]
    for n in args.batches:
        single = run(1, args, n)[0]
        for world, results in ((1, [single]), (2, run(2, args, n))):
            same = all(r["digests"] == single["digests"] for r in results)
            sent = " / ".join(f"{r['bytes'] / 1e6:.2f} MB" for r in results) if world > 1 else "-"
            lines.append(f"| {n} | {world} | {' / '.join(str(r['tokens']) for r in results)} | "
                         f"{statistics.median(r['calibrate'] for r in results):.2f} | "
                         f"{statistics.median(r['compile'] for r in results):.2f} | "
                         f"{sent} | "
                         f"{'yes' if same else 'NO'} ({len(single['digests'])} plans) |")
            print(lines[-1], flush=True)
    lines += ["", f"machine: {machine_line()}; torch {torch.__version__}"]
    text = "\n".join(lines)
    print(text)
    if args.out:
        write_atomic(args.out, text + "\n")


if __name__ == "__main__":
    main()

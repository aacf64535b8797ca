"""Calibration on several processes: all-MiniLM-L6-v2 with SPION-CF + sparse FFN, one process against 2
ranks (torch.distributed, gloo, a FileStore) on the same standard-library text.

    python tools/bench_distributed.py [--batches 16 32] [--batch-size 8] [--seq-len 128] [--steps 300]
                                      [--fit-steps 200] [--fit-batch 32] [--finetune-steps 0] [--threads 1]
                                      [--out FILE]

Every process runs `sparsecc.compile` with `calibration=sparsecc.distributed.shard(batches)` (one process:
all of them). Reported per run: the compile's "calibrate" stage (observing, reducing, planning: layouts
and controller distillation) and the whole compile, medians over the ranks; the bytes each rank sent
(statistics, plans and the checks); whether every rank's plans equal, digest for digest, those of the
one process on all the batches. The bytes should not grow with the number of batches.

Then (--fit-steps) SPION training under DDP: the loss curve of 2 ranks, each on half of every batch,
against one process on the whole batches and one process accumulating the gradients of the same halves
(the same arithmetic as DDP's averaged gradients: equal bit for bit when every kernel is deterministic),
the switch step and the layouts at the switch.

Then (--finetune-steps) `sparsecc.finetune` of all-MiniLM-L6-v2 (a local block layout, distilled from the
dense model) on the same global batches: 1 process, 2 ranks under DDP and 2 ranks under FSDP2 (one group
per block, `fsdp={}`): the loss curves against the one process, the median step time and each rank's
peak resident memory.
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
from common import emit, machine_line  # noqa: E402


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


def _fit_rank(rank: int, world: int, store: str, out_dir: str, args: argparse.Namespace, micro: int) -> None:
    """SPION training of sparsecc.testing's counting classifier, every rank on its share of each batch;
    micro > 1 (one process): the loss is the mean over `micro` equal micro-batches (gradient accumulation)."""
    torch.set_num_threads(args.threads)
    if world > 1:
        dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world,
                                timeout=datetime.timedelta(minutes=30))
    import warnings

    import sparsecc
    from sparsecc import testing as T
    from sparsecc.train.spion import SpionSchedule, fit
    share = args.fit_batch // world
    batches = [(ids[rank * share:(rank + 1) * share], labels[rank * share:(rank + 1) * share])
               for ids, labels in T.counting_batches(50, batch=args.fit_batch)]
    torch.manual_seed(0)
    schedule = SpionSchedule(sparsecc.Spion(method="spion_cf", block=8, quantile=0.5, kernel_size=3),
                             check_every=args.fit_steps // 20, max_dense_steps=args.fit_steps // 2,
                             calibration_batches=2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        optimizer = (lambda params: torch.optim.SGD(params, lr=0.1)) if args.fit_optimizer == "sgd" else None
        def loss_fn(model, batch):
            parts = zip(batch[0].chunk(max(micro, 1)), batch[1].chunk(max(micro, 1)))
            return sum(torch.nn.functional.cross_entropy(model(x), y) for x, y in parts) / max(micro, 1)
        out = fit(T.CountingClassifier(), batches, loss_fn, steps=args.fit_steps, lr=1e-3, schedule=schedule,
                  optimizer=optimizer, progress=False)
    torch.save({"losses": out.losses, "switched_at": out.switched_at, "reason": out.switch_reason,
                "layouts": {k: v.mask for k, v in out.model.layouts.items()},
                "state": out.model.state_dict()}, os.path.join(out_dir, f"{rank}.pt"))
    if world > 1:
        dist.destroy_process_group()


def _finetune_rank(rank: int, world: int, store: str, out_dir: str, args: argparse.Namespace, mode: str) -> None:
    """sparsecc.finetune of MiniLM on this rank's share of every batch; mode "ddp" or "fsdp" (world 2) or
    "one" (world 1)."""
    torch.set_num_threads(args.threads)
    if world > 1:
        dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world,
                                timeout=datetime.timedelta(minutes=30))
    import resource
    import time
    import warnings

    import sparsecc
    from sparsecc import distributed
    from sparsecc.models import load_model, text_batches
    loaded = load_model("minilm", batch=args.batch_size, seq_len=args.seq_len)
    # packed rows (the docstrings' real tokens one after another, no padding): each rank's mean loss over its
    # tokens then averages to the whole batch's, as DDP's averaged gradients assume
    text = text_batches(loaded, 32, args.seq_len, batch_size=args.batch_size)
    tokens = torch.cat([b["input_ids"][b["attention_mask"].bool()] for b in text])
    rows = tokens[:tokens.numel() // (args.batch_size * args.seq_len) * args.batch_size * args.seq_len]
    rows = rows.view(-1, args.batch_size, args.seq_len)[:4]
    batches = [{"input_ids": r, "attention_mask": torch.ones_like(r)} for r in rows]
    share = args.batch_size // world
    mine = [{k: v[rank * share:(rank + 1) * share] for k, v in b.items()} for b in batches]
    recipe = sparsecc.Recipe(attention=sparsecc.Fixed(pattern="local", block=32, density=0.5), ffn=None)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sm = sparsecc.compile(loaded.model, loaded.inputs, recipe=recipe, check=False, progress=False)
    if world > 1:
        distributed.current().barrier()
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    start = time.perf_counter()
    result = sparsecc.finetune(sm, mine, teacher=loaded.model, steps=args.finetune_steps, lr=1e-4,
                               fsdp={} if mode == "fsdp" else None, progress=False)
    seconds = time.perf_counter() - start
    torch.save({"losses": result.losses, "seconds": seconds, "rss_before_mb": rss_before,
                "rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                "params": sum(p.numel() for p in sm.parameters()),
                "state": {k: v.detach().clone() for k, v in sm.state_dict().items()}},
               os.path.join(out_dir, f"{rank}.pt"))
    if world > 1:
        dist.destroy_process_group()


def finetune_lines(args: argparse.Namespace) -> list:
    """finetune on 1 process against 2 ranks under DDP and under FSDP2, the same global batches."""
    one = run(1, args, "one", _finetune_rank)[0]
    n = len(one["losses"])
    lines = ["", f"`sparsecc.finetune` of all-MiniLM-L6-v2 ({one['params'] / 1e6:.1f} M parameters, a local block "
             f"layout of density 0.5, block 32, distilled from the dense model), 4 global batches of {args.batch_size} "
             f"x {args.seq_len} tokens of packed standard-library text, {n} steps, AdamW lr 1e-4; 2 ranks each on half of every batch", "",
             "| run | loss at steps 1 / mid / end | max abs loss difference to 1 process | steps within 1e-5 | "
             "max abs weight difference | seconds per step (median over ranks) | peak RSS per rank (before training) |",
             "|---|---|---:|---|---:|---:|---|"]
    for label, results in (("1 process", [one]), ("2 ranks, DDP", run(2, args, "ddp", _finetune_rank)),
                           ("2 ranks, FSDP2 per block", run(2, args, "fsdp", _finetune_rank))):
        losses = results[0]["losses"]
        diffs = [abs(a - b) for a, b in zip(losses, one["losses"], strict=True)]
        weights = max(float((results[0]["state"][k] - v).abs().max()) for k, v in one["state"].items()
                      if v.is_floating_point())
        lines.append(f"| {label} | " + " / ".join(f"{losses[i]:.6f}" for i in (0, n // 2 - 1, -1))
                     + f" | {max(diffs):.2e} | {sum(d <= 1e-5 for d in diffs)} of {n} | {weights:.2e} | "
                     f"{statistics.median(r['seconds'] for r in results) / n:.3f} | "
                     + " / ".join(f"{r['rss_mb']:.0f} MB ({r['rss_before_mb']:.0f})" for r in results) + " |")
        print(lines[-1], flush=True)
    return lines


def run(world: int, args: argparse.Namespace, n_batches, target=_rank) -> list:
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(target, args=(world, os.path.join(tmp, "store"), tmp, args, n_batches), nprocs=world)
        return [torch.load(os.path.join(tmp, f"{r}.pt")) for r in range(world)]


def fit_lines(args: argparse.Namespace) -> list:
    """The loss curve of 2-rank DDP against 1 process on the same global batches, whole and as 2 micro-batches."""
    two = run(2, args, 0, _fit_rank)[0]
    optimizer = "SGD lr 0.1" if args.fit_optimizer == "sgd" else "AdamW lr 1e-3"
    lines = ["", f"SPION training (`sparsecc.train.fit`) of sparsecc.testing.CountingClassifier, global batch "
             f"{args.fit_batch}, {args.fit_steps} steps, {optimizer}; 2 ranks under DDP each on half of every "
             f"batch (switch: {two['reason']}), against 1 process on the same batches", "",
             "| 1 process | switch step | layouts at the switch | loss at steps 1 / mid / end (2 ranks: "
             + " / ".join(f"{two['losses'][i]:.6f}" for i in (0, len(two["losses"]) // 2 - 1, -1))
             + ") | max abs loss difference | steps within 1e-5 | max abs parameter difference (key biases) |",
             "|---|---|---|---|---:|---|---|"]
    for label, micro in (("whole batches", 1), ("2 micro-batches (the ranks' halves), gradients accumulated", 2)):
        one = run(1, args, micro, _fit_rank)[0]
        diffs = [abs(a - b) for a, b in zip(one["losses"], two["losses"], strict=True)]
        key_bias = slice(32, 64)  # nn.MultiheadAttention's in_proj_bias holds q, k, v biases of width 32
        params = {"other": 0.0, "key bias": 0.0}
        for name, value in one["state"].items():
            if value.is_floating_point():
                d = (two["state"][name] - value).abs()
                if name.endswith("in_proj_bias"):
                    params["key bias"] = max(params["key bias"], float(d[key_bias].max()))
                    d = torch.cat([d[:32], d[64:]])
                params["other"] = max(params["other"], float(d.max()))
        first_over = next((i + 1 for i, d in enumerate(diffs) if d > 1e-5), None)
        same_layouts = all(torch.equal(m, two["layouts"][k]) for k, m in one["layouts"].items())
        lines.append(f"| {label} | {one['switched_at']} (2 ranks: {two['switched_at']}) | "
                     f"{'equal' if same_layouts else 'DIFFERENT'} | "
                     + " / ".join(f"{one['losses'][i]:.6f}" for i in (0, len(diffs) // 2 - 1, -1))
                     + f" | {max(diffs):.2e} | {sum(d <= 1e-5 for d in diffs)} of {len(diffs)}"
                     + (f" (the first above: step {first_over})" if first_over else "")
                     + f" | {params['other']:.2e} ({params['key bias']:.2e}) |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, nargs="*", default=[16, 32], help="calibration runs (none: only the training comparison)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--steps", type=int, default=300, help="controller distillation steps")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process")
    parser.add_argument("--fit-steps", type=int, default=200, help="steps of the DDP training comparison (0: none)")
    parser.add_argument("--fit-optimizer", choices=["adamw", "sgd"], default="adamw",
                        help="optimizer of the DDP training comparison")
    parser.add_argument("--fit-batch", type=int, default=32, help="global batch of the DDP training comparison")
    parser.add_argument("--finetune-steps", type=int, default=0,
                        help="steps of the finetune comparison (1 process, DDP, FSDP2; 0: none)")
    parser.add_argument("--out", help="also write the markdown table to this file")
    args = parser.parse_args()
    lines = [f"all-MiniLM-L6-v2, batches of {args.batch_size} x {args.seq_len} tokens, SPION-CF (block 32) + "
             f"sparse FFN (n 32, d_lowrank 64, {args.steps} controller steps); {args.threads} thread(s) per "
             "process; gloo", "",
             "| batches | processes | tokens per rank | calibrate stage s | compile s | bytes sent per rank | "
             "plans equal to 1 process |", "|---:|---:|---|---:|---:|---|---|"] if args.batches else []
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
    if args.fit_steps:
        lines += fit_lines(args)
        print("\n".join(lines[-4:]), flush=True)
    if args.finetune_steps:
        lines += finetune_lines(args)
    lines += ["", f"machine: {machine_line()}; torch {torch.__version__}"]
    emit(lines, args.out)


if __name__ == "__main__":
    main()

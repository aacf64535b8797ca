"""`sparsecc.tune` on the pretrained all-MiniLM-L6-v2 (issue 21): the tuned front against the uniform settings,
the tuned recipe's measured speed-up over the dense model on the backend, and the tuning time.

    python tools/bench_tune_minilm.py [--lengths 128 256 512] [--backends onnxruntime eager]
        [--budgets "top10>=0.9" "cosine>=0.98"] [--finetune-steps 40] [--methods flow] [--flow-steps 100]
        [--out-dir out/bench_tune]

For each length L, backend and budget, `sparsecc.tune` runs with its default levels (SPION-C at
densities 1/2 .. 1/8; sparse FFN n = 4 .. 32; with --methods flow, token flow with content gates at keep
0.9 .. 0.5, the gates trained once for --flow-steps) on batch 8 at L tokens:
- calibration: --calibration-batches batches of training paragraphs of the standard-library docstrings
  (the fixed 70 / 30 split of tools/bench_flow_minilm.py), packed to exactly L tokens;
- quality: --eval-batches batches of the held-out paragraphs (none calibrated or trained on), against
  the dense model;
- with --finetune-steps N, the first budget is tuned again with finetune={"steps": N} on further training
  paragraphs (the global shift measures after fine-tuning; the model returned is fine-tuned).
On onnxruntime, the dense model is sparsecc's dense graph with onnxscript's ORT fusions (fused Attention,
SkipLayerNorm, BiasGelu): ORT's fused dense graph. Levels' plans and latency tables are cached in
--cache-dir, so the second budget calibrates and times nothing again (its tuning time is the search).
Each tune's recipe.toml, front.json, summary.txt and front.png go to <out-dir>/L<L>-<backend>-<budget>/;
a picture per length and backend puts the fronts of both metrics beside the uniform settings; a Markdown
table is printed (and written to --out).
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import time
import warnings

import torch

sys.path.insert(0, os.path.dirname(__file__))
from bench_flow_minilm import packed_batches, split_paragraphs  # noqa: E402
from common import emit, load_minilm, machine_line  # noqa: E402


def slug(budget: str) -> str:
    return budget.replace(">=", "-ge-").replace("<=", "-le-")


def fronts_png(results: list, path: str, title: str) -> None:
    """One panel per budget metric: the tuned front, the uniform settings, the tuned recipe."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from sparsecc.io import atomic_write
    from sparsecc.tune.plot import _UNIFORM_STYLE

    fig, axes = plt.subplots(1, len(results), figsize=(6.5 * len(results), 4.8), layout="constrained",
                             squeeze=False)
    for ax, (label, r) in zip(axes[0], results):
        ms = 1e3
        front = r.front
        ax.plot([p["latency"] * ms for p in front], [p["quality"] for p in front], "-o", color="tab:red", ms=4,
                label="tuned front")
        for slot, (marker, color, name) in _UNIFORM_STYLE.items():
            us = [u for u in r.uniform if u["slot"] == slot]
            if not us:
                continue
            ax.scatter([u["latency"] * ms for u in us], [u["quality"] for u in us], marker=marker, color=color,
                       s=30, label=name)
        ax.axvline(r.table["dense_seconds"] * ms, color="black", lw=1, ls=":", label="dense")
        ax.axhline(r.budget.bound, color="tab:red", lw=1, ls="--", label=f"budget {r.budget}")
        ax.scatter([r.chosen["latency"] * ms], [r.quality], marker="*", s=160, color="tab:red", edgecolor="black",
                   zorder=5, label=f"{label}: {r.speedup:.2f}x measured")
        ax.set_xlabel(f"latency, ms ({r.backend}, latency table)")
        ax.set_ylabel(f"{r.budget.name} vs dense (held-out)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(title)
    try:
        atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    finally:
        plt.close(fig)


def compact(levels: str) -> str:
    """'0.attention=spion(..., density=0.25) 0.ffn=sparse_ffn(n=8) 1.attention=dense ...' ->
    'attention .25 - ..., ffn n8 - ...' (one entry per layer, '-' for dense)."""
    import re

    per_slot: dict = {}
    for _, slot, level in re.findall(r"(\d+)\.(\w+)=(dense|\w+\([^)]*\))", levels):
        density, n = re.search(r"density=([\d.]+)", level), re.search(r"\bn=(\d+)", level)
        if slot == "flow":  # keep 0.5 is the config's default, not written
            keep = re.search(r"keep=([\d.]+)", level)
            level = level if level == "dense" else f"k{keep.group(1) if keep else '0.5'}"
        per_slot.setdefault(slot, []).append("-" if level == "dense" else f"{density.group(1)}" if density
                                             else f"n{n.group(1)}" if n else level)
    return "; ".join(f"{slot} {' '.join(v)}" for slot, v in per_slot.items())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[128, 256, 512])
    parser.add_argument("--backends", nargs="+", default=["onnxruntime"], choices=["onnxruntime", "eager"])
    parser.add_argument("--budgets", nargs="+", default=["top10>=0.9", "cosine>=0.98"])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--calibration-batches", type=int, default=4)
    parser.add_argument("--eval-batches", type=int, default=8)
    parser.add_argument("--finetune-steps", type=int, default=0)
    parser.add_argument("--finetune-lr", type=float, default=5e-5)
    parser.add_argument("--methods", nargs="+", default=["attention", "ffn"], choices=["attention", "ffn", "flow"],
                        help="the slots tune varies (flow: searched alone)")
    parser.add_argument("--flow-steps", type=int, default=100, help="steps of the one training of the flow gates")
    parser.add_argument("--generations", type=int, default=30)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--out-dir", default="out/bench_tune")
    parser.add_argument("--cache-dir", default=None, help="default: <out-dir>/cache")
    parser.add_argument("--out", help="also write the table to this file")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    torch.manual_seed(0)

    import sparsecc
    from sparsecc.errors import TuneError

    tokenizer, model = load_minilm()
    train_text, held_text = split_paragraphs()
    random.Random(1).shuffle(train_text)
    cache_dir = args.cache_dir or os.path.join(args.out_dir, "cache")

    rows = []
    for L in args.lengths:
        calibration = packed_batches(tokenizer, train_text, args.batch, L, args.calibration_batches)
        held = packed_batches(tokenizer, held_text, args.batch, L, args.eval_batches)
        finetune_batches = packed_batches(tokenizer, train_text, args.batch, L, 16, offset=len(train_text) // 2)
        example = calibration[0]
        for backend in args.backends:
            runs = [(b, None) for b in args.budgets]
            if args.finetune_steps:
                runs.append((args.budgets[0], {"steps": args.finetune_steps, "lr": args.finetune_lr,
                                               "batches": finetune_batches}))
            panels = []
            for budget, ft in runs:
                name = (f"L{L}-{backend}-{slug(budget)}" + ("-finetuned" if ft else "")
                        + ("" if args.methods == ["attention", "ffn"] else "-" + "-".join(args.methods)))
                print(f"== {name}", flush=True)
                start = time.perf_counter()
                try:
                    result = sparsecc.tune(model, example, calibration, budget=budget, backend=backend,
                                           eval_batches=held, finetune=ft, generations=args.generations,
                                           methods=args.methods, flow_fit={"steps": args.flow_steps},
                                           repeats=args.repeats, cache_dir=cache_dir, seed=0)
                except TuneError as err:  # a row saying so, with the best point measured
                    print(err, flush=True)
                    best = err.best or {}
                    rows.append([str(L), backend, budget, "no sparse setting within the budget; best measured: "
                                 + compact(best.get("levels", "")), f"{best.get('quality', float('nan')):.4f}",
                                 "-", "-", "-", "-", f"{(time.perf_counter() - start) / 60:.1f} min"])
                    continue
                seconds = time.perf_counter() - start
                result.save(os.path.join(args.out_dir, name))
                print(result.summary(), flush=True)
                if ft is None:
                    panels.append((budget, result))
                best_uniform = max((u for u in result.uniform if result.budget.met(u["quality"])),
                                   key=lambda u: result.table["dense_seconds"] / u["latency"], default=None)
                rows.append([str(L), backend, budget + (f" (finetune {ft['steps']} steps)" if ft else ""),
                             compact(result.chosen["levels"]),
                             f"{result.quality:.4f}", f"{result.dense_latency * 1e3:.1f}",
                             f"{result.latency * 1e3:.1f}", f"{result.speedup:.2f}x",
                             (f"{best_uniform['name']} {result.table['dense_seconds'] / best_uniform['latency']:.2f}x"
                              if best_uniform else "none within budget"),
                             f"{seconds / 60:.1f} min ({result.evaluations} candidates, "
                             f"{result.plans_cached} levels' plans cached)"])
            if panels:
                fronts_png(panels, os.path.join(args.out_dir, f"fronts-L{L}-{backend}.png"),
                           f"sparsecc tune, all-MiniLM-L6-v2, batch {args.batch}, L = {L}, {backend}")
    lines = [f"Machine: {machine_line()}", "",
             "| L | backend | budget | tuned levels (layers 0-5; - dense) | quality | dense ms | tuned ms | speed-up "
             "(measured) | best uniform within budget (table) | tuning time |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    emit(lines, args.out)


if __name__ == "__main__":
    main()

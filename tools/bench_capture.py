"""Front-end cost: capture + canonicalize + find regions + identity rewrite of a BERT-base-shaped model.

    python tools/bench_capture.py [--layers 12] [--seq-len 512] [--repeats 3] [--out FILE]

Each stage is timed separately (median over repeats, fresh model capture each
time); numeric checks are off, as in a production compile (`check=False`), and
measured separately as the cost of `check=True`.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

sys.path.insert(0, __import__("os").path.dirname(__file__))
from common import emit, machine_line  # noqa: E402


def build(layers: int, seq_len: int):
    from transformers import BertConfig, BertModel
    torch.manual_seed(0)
    cfg = BertConfig(hidden_size=768, num_hidden_layers=layers, num_attention_heads=12, intermediate_size=3072,
                     max_position_embeddings=max(512, seq_len), attn_implementation="sdpa")
    model = BertModel(cfg).eval()
    ids = torch.randint(1000, 30000, (1, seq_len))
    return model, {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def one_run(model, inputs) -> dict:
    from sparsecc.capture import capture
    from sparsecc.graph.canonicalize import CANONICALIZE
    from sparsecc.graph.regions import find_regions
    from sparsecc.methods.identity import attention_to_op, ffn_to_op
    from sparsecc.passes.manager import Pass, PassContext, PassManager

    t = {}
    start = time.perf_counter()
    captured = capture(model, inputs)
    t["capture (torch.export + run_decompositions)"] = time.perf_counter() - start
    ctx = PassContext(captured=captured)
    start = time.perf_counter()
    PassManager([Pass(n, f) for n, f in CANONICALIZE], check="none").run(captured.gm, ctx)
    t["canonicalize"] = time.perf_counter() - start
    start = time.perf_counter()
    regions = find_regions(captured.gm, captured)
    t["find regions"] = time.perf_counter() - start
    start = time.perf_counter()
    PassManager([Pass("attention_identity", attention_to_op), Pass("ffn_identity", ffn_to_op)],
                check="none").run(captured.gm, ctx)
    t["identity rewrite"] = time.perf_counter() - start
    t["total"] = sum(t.values())
    t["_regions"] = len(regions)
    return t


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", help="also write the markdown table to this file")
    args = parser.parse_args()

    import sparsecc
    model, inputs = build(args.layers, args.seq_len)
    runs = [one_run(model, inputs) for _ in range(args.repeats)]
    stages = [k for k in runs[0] if not k.startswith("_")]
    start = time.perf_counter()
    sparsecc.compile(model, inputs, check=True)
    checked = time.perf_counter() - start
    with torch.no_grad():
        start = time.perf_counter()
        model(**inputs)
        forward = time.perf_counter() - start

    lines = [f"BERT-base shape ({args.layers} layers, hidden 768, 12 heads, FFN 3072), batch 1, L={args.seq_len}, "
             f"{runs[0]['_regions']} regions; median of {args.repeats}",
             "", "| stage | seconds |", "|---|---:|"]
    lines += [f"| {s} | {statistics.median(r[s] for r in runs):.2f} |" for s in stages]
    lines += [f"| (for scale) one dense forward | {forward:.2f} |",
              f"| `sparsecc.compile(..., check=True)` end to end, numerics checked after every pass | {checked:.2f} |",
              "", f"machine: {machine_line()}"]
    emit(lines, args.out)


if __name__ == "__main__":
    main()

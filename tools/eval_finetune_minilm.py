"""How much quality `sparsecc.finetune` recovers on the real all-MiniLM-L6-v2 (issue 21, item 1).

    python tools/eval_finetune_minilm.py [--recipes spion sparse_ffn both] [--steps 200] [--length 128]
                                         [--lr 5e-5] [--out FILE]

Each recipe of tools/bench_minilm.py (SPION-CF block 16 q 0.9; sparse FFN n 32; both) is compiled at
`--length` tokens, calibrated on training paragraphs, then fine-tuned by distillation to the dense
model (`sparsecc.finetune`, loss: embedding_distill, the pooled-embedding cosine plus half the
token-state cosine) on standard-library docstrings. Held-out paragraphs (the fixed 70 / 30 split of
tools/bench_flow_minilm.py, none trained on) measure, before and after: cosine of the mean-pooled
sentence embeddings to the dense model and the top-10 nearest-neighbour overlap with the dense model
(queries: first halves of held-out paragraphs). The evaluation during training uses 4 held-out batches;
the weights of its best step are kept. Prints a Markdown table; the machine line says where it ran.
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
from bench_flow_minilm import _hidden, embed, natural_batches, overlap_at_10, split_paragraphs  # noqa: E402
from common import emit, load_minilm, machine_line  # noqa: E402


def recipes(names: list[str]) -> dict:
    import sparsecc
    spion = sparsecc.Spion(block=16, quantile=0.9)
    ffn = sparsecc.SparseFFN(n=32)
    table = {"spion": ("SPION-CF (block 16, q 0.9)", sparsecc.Recipe(attention=spion, ffn=None)),
             "sparse_ffn": ("sparse FFN (n 32)", sparsecc.Recipe(attention=None, ffn=ffn)),
             "both": ("SPION-CF + sparse FFN", sparsecc.Recipe(attention=spion, ffn=ffn))}
    return {k: table[k] for k in names}


def quality(model, eval_batches, query_batches, ref_c, ref_q) -> tuple[float, float]:
    c, q = embed(model, eval_batches), embed(model, query_batches)
    return float((c * ref_c).sum(-1).mean()), overlap_at_10(ref_q, ref_c, q, c)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipes", nargs="+", choices=["spion", "sparse_ffn", "both"],
                        default=["spion", "sparse_ffn", "both"])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--lr", type=float, default=5e-5)
    parser.add_argument("--eval-paragraphs", type=int, default=240)
    parser.add_argument("--queries", type=int, default=120)
    parser.add_argument("--threads", type=int)
    parser.add_argument("--out", help="also write the table to this file")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    torch.manual_seed(0)

    import sparsecc
    from sparsecc.train.losses import embedding_distill

    tokenizer, model = load_minilm()
    train_text, held_text = split_paragraphs()
    train = natural_batches(tokenizer, train_text, args.batch, max_length=args.length)
    random.Random(1).shuffle(train)
    held = held_text[: args.eval_paragraphs]
    eval_batches = natural_batches(tokenizer, held, 16, max_length=args.length)
    queries = [" ".join(p.split()[: max(4, len(p.split()) // 2)]) for p in held[: args.queries]]
    query_batches = natural_batches(tokenizer, queries, 16, max_length=args.length)
    ref_c, ref_q = embed(model, eval_batches), embed(model, query_batches)
    example = tokenizer(train_text[: args.batch], padding="max_length", truncation=True, max_length=args.length,
                        return_tensors="pt")
    example = {"input_ids": example["input_ids"], "attention_mask": example["attention_mask"]}
    monitor = natural_batches(tokenizer, held_text[-64:], 16, max_length=args.length)

    def distance(student_out, teacher_out, inputs):
        return embedding_distill(_hidden(student_out), _hidden(teacher_out), inputs["attention_mask"], 0.5)

    lines = ["| recipe | cosine before | cosine after | top-10 before | top-10 after | best step | minutes |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for key, (label, recipe) in recipes(args.recipes).items():
        start = time.time()
        sm = sparsecc.compile(model, example, recipe=recipe, calibration=train[:8], progress=False)
        cos0, top0 = quality(sm, eval_batches, query_batches, ref_c, ref_q)
        result = sparsecc.finetune(sm, train, teacher=model, steps=args.steps, lr=args.lr, loss=distance,
                                   eval_batches=monitor, eval_every=max(1, args.steps // 5), progress=True)
        cos1, top1 = quality(sm, eval_batches, query_batches, ref_c, ref_q)
        minutes = (time.time() - start) / 60
        lines.append(f"| {label} | {cos0:.4f} | {cos1:.4f} | {top0:.3f} | {top1:.3f} | {result.best_step} "
                     f"| {minutes:.1f} |")
        print(lines[-1], flush=True)
    lines += ["", f"all-MiniLM-L6-v2, L <= {args.length} (natural paragraphs, padded), train batch {args.batch}, "
              f"{args.steps} steps at lr {args.lr} (AdamW, cosine), held-out: {len(held)} paragraphs, "
              f"{len(queries)} queries.", machine_line()]
    emit(lines, args.out)


if __name__ == "__main__":
    main()

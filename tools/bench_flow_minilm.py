"""SparseFlow on the real all-MiniLM-L6-v2: gates distilled on stdlib docstrings, then FLOPs, quality, latency.

    python tools/bench_flow_minilm.py [--keep 0.5] [--steps 300] [--lengths 128 256] [--batch 8]
                                      [--repeats 5] [--variants released content mod random] [--write]

No labels are available offline, so every variant is trained by distillation to the dense model's
token states and mean-pooled sentence embeddings (sparsecc.train.flow.fit_flow: the flowed
model's weights at 2e-5, its gates at 0.1, sparsity penalty and mixture balance, last 10 % of the
steps without them, thresholds calibrated to the target on the training batches) on standard-library
docstrings; a fixed random 70 / 30 split of the curated modules' paragraphs keeps held-out text for
evaluation; with --corpus stdlib the other modules' docstrings add training text.
Training batches mix natural paragraphs (padded, up to 128 tokens) and packed text of the benchmark
lengths. Variants, all at the same target kept fraction and training budget:

- released: SparseFlow gates as released (per-position tables mixed by a router), K/V of all tokens;
- released-kvkept: the same gates, kept tokens attend to kept tokens only;
- content: a linear score per token and layer, threshold;
- mod: Mixture-of-Depths-style top-k routing (content scores, capacity ceil(keep * tokens));
- random: fixed random gates at the same budget (top-k of a random table), weights still fine-tuned.

Measured on held-out text: FLOPs of the encoder (per example, non-padding tokens, dense vs flowed,
next to the limit of each semantics at exactly `keep`), cosine of the sentence embeddings to the
dense model, top-10 nearest-neighbour overlap with the dense model on a retrieval set (queries: the
first half of held-out paragraphs; corpus: held-out paragraphs), and CPU latency at batch 8 for
packed held-out text of each length (PyTorch eager, dense Hugging Face model vs the flowed
SparseModel, measured round-robin in one process). `--layouts packed padded` also times the same
trained model compiled with TokenFlow(layout="padded"), so the two inference layouts are compared
on identical gates and weights.
"""

from __future__ import annotations

import argparse
import os
import random
import re
import statistics
import sys
import time
import warnings
from dataclasses import replace

import torch

sys.path.insert(0, os.path.dirname(__file__))
from common import machine_line, write_atomic  # noqa: E402

VARIANTS = {
    "released": ("SparseFlow gates as released, K/V of all tokens", dict(gate="released")),
    "released-kvkept": ("SparseFlow gates as released, K/V of kept tokens only", dict(gate="released", kv="kept")),
    "content": ("content gates (linear score per token), threshold", dict(gate="content")),
    "mod": ("Mixture-of-Depths-style top-k (content scores)", dict(gate="content", select="topk")),
    "random": ("random gates, same budget (top-k of a random table)", dict(gate="random", select="topk")),
}


def _hidden(out):
    return out[0] if isinstance(out, (tuple, list)) else out.last_hidden_state


def _pooled(hidden, mask):
    w = mask.unsqueeze(-1).to(hidden.dtype)
    return torch.nn.functional.normalize((hidden * w).sum(1) / w.sum(1).clamp_min(1.0), dim=-1)


# ------------------------------------------------------------------ data
def split_paragraphs(seed: int = 0, train_fraction: float = 0.7, corpus: str = "curated"):
    """(train, held-out) paragraphs: a fixed random split of `stdlib_paragraphs()`; with corpus="stdlib"
    the training part also gets every other paragraph of `stdlib_corpus()` (the held-out part is the
    same either way, and none of its paragraphs is trained on)."""
    from sparsecc.data import stdlib_corpus, stdlib_paragraphs
    paras = stdlib_paragraphs()
    order = list(range(len(paras)))
    random.Random(seed).shuffle(order)
    cut = int(train_fraction * len(order))
    train, held = [paras[i] for i in order[:cut]], [paras[i] for i in order[cut:]]
    if corpus == "stdlib":
        train += stdlib_corpus()[len(paras):]
    return train, held


def natural_batches(tokenizer, texts, batch, max_length=128):
    out = []
    for i in range(0, len(texts) - batch + 1, batch):
        enc = tokenizer(texts[i:i + batch], padding=True, truncation=True, max_length=max_length, return_tensors="pt")
        out.append({"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]})
    return out


def packed_batches(tokenizer, texts, batch, length, count, offset=0):
    """`count` batches of `batch` rows of exactly `length` tokens: [CLS] text text ... [SEP], no padding."""
    ids = []
    for t in texts[offset:] + texts[:offset]:
        ids += tokenizer(t, add_special_tokens=False)["input_ids"]
    rows, pos = [], 0
    body = length - 2
    while len(rows) < batch * count:
        if pos + body > len(ids):
            pos = 0
        rows.append([tokenizer.cls_token_id] + ids[pos:pos + body] + [tokenizer.sep_token_id])
        pos += body
    t = torch.tensor(rows)
    return [{"input_ids": t[i * batch:(i + 1) * batch], "attention_mask": torch.ones_like(t[i * batch:(i + 1) * batch])}
            for i in range(count)]


# ------------------------------------------------------------------ measurements
def embed(model, batches):
    outs = []
    with torch.no_grad():
        for b in batches:
            outs.append(_pooled(_hidden(model(**b)), b["attention_mask"]))
    return torch.cat(outs)


def decisions(sm, batches):
    """Per batch: {segment: keep [B, L]} from the inference graph's gate module."""
    result, seen = [], {}

    def hook(module, args, kwargs, out):
        seen[kwargs["segment"]] = out.clone()
    handle = sm.flow_gates.register_forward_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad():
            for b in batches:
                seen.clear()
                sm(**b)
                result.append(dict(seen))
    finally:
        handle.remove()
    return result


def layer_flops(n: float, k: float, d: int, f: int, kv: str) -> tuple[float, float]:
    """(dense, flowed) FLOPs of one encoder layer for n tokens of which k are kept."""
    dense = 8 * n * d * d + 4 * n * d * f + 4 * n * n * d
    if kv == "all":
        flowed = 4 * k * d * d + 4 * n * d * d + 4 * k * d * f + 4 * k * n * d
    else:
        flowed = 8 * k * d * d + 4 * k * d * f + 4 * k * k * d
    return dense, flowed


def flops(sm, batches, cfg, d: int, f: int, n_mix: int = 3) -> dict:
    """Encoder FLOPs over the non-padding tokens of each example: dense, flowed (gates included), the
    limit at exactly `keep`, and the kept fraction per layer."""
    dense = flowed = limit = 0.0
    kept_per_layer: dict = {}
    for b, keep in zip(batches, decisions(sm, batches)):
        valid = b["attention_mask"].bool()
        n = valid.sum(1).double()
        for seg, k in sorted(keep.items()):
            kk = (k & valid).sum(1).double()
            target = cfg.keep[seg] if isinstance(cfg.keep, tuple) else cfg.keep
            for ni, ki in zip(n.tolist(), kk.tolist()):
                dl, fl = layer_flops(ni, ki, d, f, cfg.kv)
                _, lim = layer_flops(ni, target * ni, d, f, cfg.kv)
                gate = 2 * ni * d if cfg.gate == "content" else (2 * ni * n_mix + ni * d if cfg.gate == "released" else 0)
                dense, flowed, limit = dense + dl, flowed + fl + gate, limit + lim
            kk_sum, n_sum = kept_per_layer.get(seg, (0.0, 0.0))
            kept_per_layer[seg] = (kk_sum + float(kk.sum()), n_sum + float(n.sum()))
    return {"dense": dense, "flowed": flowed, "limit": limit,
            "kept": [k / max(n, 1.0) for _, (k, n) in sorted(kept_per_layer.items())]}


def overlap_at_10(ref_q, ref_c, q, c) -> float:
    top_ref = (ref_q @ ref_c.T).topk(10, dim=1).indices
    top = (q @ c.T).topk(10, dim=1).indices
    return statistics.mean(len(set(a.tolist()) & set(b.tolist())) / 10 for a, b in zip(top_ref, top))


def latency(models: dict, inputs: dict, repeats: int) -> dict:
    """Median seconds per model, measured round-robin (one call of each model per round)."""
    times = {name: [] for name in models}
    with torch.no_grad():
        for name, m in models.items():  # warm-up
            m(**inputs)
        for _ in range(repeats):
            for name, m in models.items():
                start = time.perf_counter()
                m(**inputs)
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


class _WithHiddenStates(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, **kw):
        return self.model(**kw, output_hidden_states=True)


def layer_distillation(sm, model, distill, weight: float):
    """(teacher, distill, hook handle) adding `weight` x the mean token-state cosine loss at the input of every
    flowed layer but the first: the student's states are read off the gate module (it gets each segment's input
    stream). Remove the handle after training."""
    from sparsecc.train.losses import hidden_distill
    states: dict = {}

    def hook(module, args, kwargs, out):
        states[kwargs["segment"]] = args[0]
    handle = sm.flow_gates.register_forward_hook(hook, with_kwargs=True)

    def layered(s, t, b):
        layers = [hidden_distill(states[i], t.hidden_states[i], b["attention_mask"]) for i in sorted(states) if i > 0]
        states.clear()
        return distill(s, t, b) + weight * sum(layers) / max(1, len(layers))
    return _WithHiddenStates(model), layered, handle


# ------------------------------------------------------------------ main
# fit_flow options of each way to train the gates (the figures before 2026-12-05 are sparsecc-0.1)
TRAINING = {
    "released": {},
    "sparsecc-0.1": {"router_lr": 0.1, "schedule": "constant", "penalty_form": "pooled", "balance_form": "squares",
                     "balance": 0.1, "final_fraction": 0.1},
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keep", type=float, nargs="+", default=[0.5],
                        help="target kept fraction: one for every layer, or one per layer "
                             "(e.g. 0.3 0.4 0.4 0.5 0.6 0.8)")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--train-batch", type=int, default=16)
    parser.add_argument("--lr", type=float, default=2e-5, help="model weights' learning rate (released: 2e-5)")
    parser.add_argument("--gate-lr", type=float, default=0.1, help="gates' learning rate (released: 0.1)")
    parser.add_argument("--hard-final", action="store_true",
                        help="train the final phase on the calibrated hard decisions (fit_flow hard_final)")
    parser.add_argument("--track-keep", type=float, default=0.1,
                        help="with --hard-final: how far each step moves the thresholds to the target (fit_flow "
                             "track_keep; 0 fixes them, as before 2026-12-03)")
    parser.add_argument("--training", choices=sorted(TRAINING), default="released",
                        help="released: the authors' losses, router lr and cosine schedule; sparsecc-0.1: "
                             "pooled penalty, squares balance (0.1), router at the gate lr, constant lr")
    parser.add_argument("--final-fraction", type=float, default=None,
                        help="fraction of the steps in the final, penalty-free phase (default: the --training's, "
                             "0.05 released = the last of 20 epochs, 0.1 sparsecc-0.1)")
    parser.add_argument("--token-weight", type=float, default=0.5,
                        help="weight of the token-state cosine next to the sentence-embedding cosine in the "
                             "distillation loss (embedding_distill)")
    parser.add_argument("--layer-weight", type=float, default=0.0,
                        help="weight of a layer-wise term: token-state cosine to the dense model's state entering "
                             "each flowed layer but the first (0: off)")
    parser.add_argument("--corpus", choices=["curated", "stdlib"], default="curated",
                        help="training text: every stdlib module's docstrings (stdlib_corpus) or only the curated "
                             "modules' (stdlib_paragraphs); the held-out text is the same")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    parser.add_argument("--layouts", nargs="+", choices=["packed", "padded"], default=["packed"],
                        help="TokenFlow layout(s) timed: the first is trained; each other one is the same trained "
                             "model compiled with that layout (its latency rows say so)")
    parser.add_argument("--lengths", type=int, nargs="+", default=[128, 256])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--eval-paragraphs", type=int, default=400)
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--write", action="store_true", help="replace the SparseFlow section of BENCHMARKS.md")
    parser.add_argument("--out", help="also write the section to this file")
    args = parser.parse_args()
    if args.final_fraction is None:  # the training's own (fit_flow's default for "released")
        args.final_fraction = TRAINING[args.training].get("final_fraction", 0.05)
    if not 0.0 <= args.final_fraction < 1.0:
        parser.error(f"--final-fraction must be in [0, 1), got {args.final_fraction}")
    if args.threads:
        torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    torch.manual_seed(0)

    from transformers import AutoModel, AutoTokenizer

    import sparsecc
    from sparsecc.models import minilm_dir
    from sparsecc.train.flow import fit_flow
    from sparsecc.train.losses import embedding_distill

    started = time.time()
    path = minilm_dir()
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModel.from_pretrained(path).eval()
    d, f = model.config.hidden_size, model.config.intermediate_size
    train_text, held_text = split_paragraphs(corpus=args.corpus)

    # training mix: natural paragraphs, and packed text of every benchmark length (positions up to max L)
    train = natural_batches(tokenizer, train_text, args.train_batch)
    for L in args.lengths:
        n = max(2, len(train) // (2 * len(args.lengths)))
        train += packed_batches(tokenizer, train_text, max(2, args.train_batch * 128 // L), L, n, offset=len(train))
    random.Random(1).shuffle(train)
    held = held_text[: args.eval_paragraphs]
    eval_batches = natural_batches(tokenizer, held, 16)
    queries = [" ".join(p.split()[: max(4, len(p.split()) // 2)]) for p in held[: args.queries]]
    query_batches = natural_batches(tokenizer, queries, 16)
    latency_inputs = {L: packed_batches(tokenizer, held_text, args.batch, L, 1)[0] for L in args.lengths}
    flops_batches = {L: packed_batches(tokenizer, held_text, args.batch, L, 2, offset=7) for L in args.lengths}

    ref_c, ref_q = embed(model, eval_batches), embed(model, query_batches)
    example = eval_batches[0]
    rows, lat_rows, models = [], [], {"dense (Hugging Face, eager)": model}
    for key in args.variants:
        label, kw = VARIANTS[key]
        cfg = sparsecc.TokenFlow(keep=args.keep[0] if len(args.keep) == 1 else tuple(args.keep),
                                 layout=args.layouts[0], **kw)
        torch.manual_seed(0)
        sm = sparsecc.compile(model, example, recipe=sparsecc.Recipe(flow=cfg), check=False)
        t0 = time.time()
        teacher, distill = model, (lambda s, t, b: embedding_distill(_hidden(s), _hidden(t), b["attention_mask"],
                                                                       args.token_weight))
        handle = None
        if args.layer_weight:
            teacher, distill, handle = layer_distillation(sm, model, distill, args.layer_weight)
        fit = fit_flow(sm, train, teacher=teacher, steps=args.steps, progress=True, lr=args.lr,
                       gate_lr=args.gate_lr, hard_final=args.hard_final, track_keep=args.track_keep,
                       distill=distill, **{**TRAINING[args.training], "final_fraction": args.final_fraction})
        penalised = [h for h in fit.history if "penalty" in h]
        print(f"{key}: training {args.training}; the gates kept {fit.history[-1]['kept']:.3f} at the last step "
              f"and {penalised[-1]['kept'] if penalised else float('nan'):.3f} at the last step with the penalty "
              "(mean over layers; soft gates unless --hard-final)", flush=True)
        if handle is not None:
            handle.remove()
        train_s = time.time() - t0
        cos = torch.nn.functional.cosine_similarity(ref_c, embed(sm, eval_batches), dim=-1)
        ov = overlap_at_10(ref_q, ref_c, embed(sm, query_batches), embed(sm, eval_batches))
        fl = flops(sm, eval_batches, cfg, d, f)
        per_l = {L: flops(sm, flops_batches[L], cfg, d, f) for L in args.lengths}
        rows.append((key, label, cfg, fl, per_l, float(cos.mean()), float(cos.min()), ov, train_s))
        print(f"{key}: cos {cos.mean():.4f} (min {cos.min():.4f}), overlap@10 {ov:.3f}, kept/layer "
              f"{[round(k, 3) for k in fl['kept']]}, FLOPs {fl['flowed'] / fl['dense']:.3f} of dense "
              f"(limit {fl['limit'] / fl['dense']:.3f}), trained {train_s:.0f} s", flush=True)
        models[key] = sm
        for layout in args.layouts[1:]:  # the same trained weights and gates, another inference layout
            twin = sparsecc.compile(model, example, recipe=sparsecc.Recipe(flow=replace(cfg, layout=layout)),
                                    check=False)
            twin.load_state_dict(sm.state_dict())
            twin.eval()
            models[f"{key} ({layout} layout)"] = twin
    for L in args.lengths:
        t = latency(models, latency_inputs[L], args.repeats)
        lat_rows.append((L, t))
        print(f"L={L}: " + ", ".join(f"{k} {v * 1e3:.0f} ms" for k, v in t.items()), flush=True)

    text = render(args, rows, lat_rows, machine_line(), time.time() - started, train_text)
    print(text)
    if args.out:
        write_atomic(args.out, text + "\n")
    if args.write:
        write_section(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "BENCHMARKS.md"),
                      text)


def render(args, rows, lat_rows, machine: str, seconds: float, train_text: list) -> str:
    cmd = "python tools/bench_flow_minilm.py " + " ".join(sys.argv[1:])
    lines = [HEADER, "", f"Command: `{cmd.strip()}` ({seconds / 60:.0f} min in all).", "",
             f"all-MiniLM-L6-v2 (pretrained), target keep {' / '.join(f'{k:g}' for k in args.keep)}, "
             f"{args.steps} distillation steps per variant "
             f"on {len(train_text)} training paragraphs ({args.corpus}) "
             f"(model lr {args.lr:g}, gate lr {args.gate_lr:g}, token weight {args.token_weight:g}, "
             f"{f'layer weight {args.layer_weight:g}, ' if args.layer_weight else ''}"
             f"final phase {args.final_fraction:g} of the steps, training {args.training}"
             f"{f', on hard decisions, track_keep {args.track_keep:g}' if args.hard_final else ''}). "
             "Held-out text: "
             f"{args.eval_paragraphs} paragraphs (cosine, FLOPs), {args.queries} queries (first half of a paragraph) "
             "against them (top-10 overlap).", "",
             "| variant | kept per layer (held-out) | FLOPs flowed / dense (held-out) | limit at keep | "
             "FLOPs vs limit | cosine mean / min | top-10 overlap | train (s) |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    for key, label, cfg, fl, per_l, cos, cos_min, ov, train_s in rows:
        kept = " ".join(f"{k:.2f}" for k in fl["kept"])
        lines.append(f"| {key}: {label} | {kept} | {fl['flowed'] / fl['dense']:.3f} | {fl['limit'] / fl['dense']:.3f} "
                     f"| {fl['flowed'] / fl['limit']:.3f} | {cos:.4f} / {cos_min:.4f} | {ov:.3f} | {train_s:.0f} |")
    lines += ["", f"CPU latency, batch {args.batch}, packed held-out text (no padding), PyTorch eager, median of "
              f"{args.repeats} round-robin runs; FLOPs ratio = dense / flowed FLOPs on these inputs.", "",
              "| L | model | latency | speedup vs dense | FLOPs ratio | speedup / FLOPs ratio | kept (mean of layers) |",
              "|---:|---|---:|---:|---:|---:|---:|"]
    by_key = {r[0]: r for r in rows}
    for L, t in lat_rows:
        base = t["dense (Hugging Face, eager)"]
        lines.append(f"| {L} | dense (Hugging Face, eager) | {base * 1e3:.0f} ms | 1.00x | 1.00 | - | 1.00 |")
        for key, sec in t.items():
            variant = key.split(" (")[0]  # "content (padded layout)": the content variant's FLOPs
            if variant not in by_key:
                continue
            fl = by_key[variant][4][L]
            ratio = fl["dense"] / fl["flowed"]
            lines.append(f"| {L} | {key} | {sec * 1e3:.0f} ms | {base / sec:.2f}x | {ratio:.2f} | "
                         f"{base / sec / ratio:.2f} | {statistics.mean(fl['kept']):.3f} |")
    lines += ["", f"machine: {machine}"]
    return "\n".join(lines)


HEADER = "## SparseFlow: token flow on the real MiniLM (issue 5)"


def write_section(path: str, text: str) -> None:
    """Replace (or append) this tool's section of BENCHMARKS.md; other sections stay as they are."""
    with open(path) as fh:
        doc = fh.read()
    start = doc.find(HEADER)
    if start < 0:
        doc = doc.rstrip("\n") + "\n\n" + text + "\n"
    else:
        nxt = re.search(r"^## ", doc[start + len(HEADER):], flags=re.M)
        end = start + len(HEADER) + nxt.start() if nxt else len(doc)
        doc = doc[:start] + text + "\n\n" + doc[end:].lstrip("\n") if nxt else doc[:start] + text + "\n"
    write_atomic(path, doc)


if __name__ == "__main__":
    main()

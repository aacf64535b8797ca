"""Quality of Scaling Transformers' sparse FF and sparse QKV on a small byte-level LM trained on CPU.

Three decoder LMs (`sparsecc.nn.CausalLM`, vocabulary 256 bytes) are trained
from scratch on real English text (standard-library docstrings,
`sparsecc.data.stdlib_corpus`; the last --val-fraction of the text is held
out) and compared by validation perplexity per byte:

  dense            dense Q/K/V, dense FFN
  sparse FF        FFN = SparseFFN (controller N, d_lowrank): trained with the controller's training
                   behaviour (per-block softmax mask, or w.p. 0.3 the straight-through Gumbel one-hot),
                   after a dense-to-sparse warm-up over the first --dense-warmup of the steps
                   (`anneal_dense_mix`; 0 trains as the paper does from step 0), evaluated with the
                   arg-max controller through `sparsecc::sparse_ffn`
  sparse FF + QKV  the same, plus sparse QKV (S modules)

Equal parameter count: every model has the dense model's d_model, layers and
heads; the sparse models' d_ff is the multiple of N whose total parameter count
is closest to the dense model's (the controller adds parameters, sparse QKV
removes most of the Q/K/V weights, so d_ff goes down for sparse FF and up for
sparse FF + QKV). Equal training budget: the same number of optimizer steps on
the same batches, the number being what the dense model does in
--budget-minutes on this machine (measured over a few steps first), or --steps.

Example:
    python tools/eval_lm.py --budget-minutes 5 --out /tmp/lm.md
    python tools/eval_lm.py --quick
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import machine_line, write_atomic  # noqa: E402
from sparsecc.data import stdlib_corpus  # noqa: E402
from sparsecc.nn import QKV_OUTPUTS, CausalLM, DecoderConfig, count_parameters  # noqa: E402
from sparsecc.nn.sparse_ffn import SparseFFNController, anneal_dense_mix  # noqa: E402


def load_bytes(val_fraction: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(train, validation) byte tensors: the corpus joined by newlines, the last val_fraction held out."""
    data = torch.frombuffer(bytearray("\n".join(stdlib_corpus()).encode()), dtype=torch.uint8)
    cut = int(len(data) * (1 - val_fraction))
    return data[:cut].long(), data[cut:].long()


def params_of(cfg: DecoderConfig) -> int:
    with torch.device("meta"):
        return count_parameters(CausalLM(cfg))


def match_d_ff(base: DecoderConfig, target: int, **changes) -> DecoderConfig:
    """`base` with `changes` and the d_ff (a multiple of ffn_n) whose parameter count is closest to target."""
    cfg = dataclasses.replace(base, **changes)
    step = cfg.ffn_n if cfg.sparse_ffn else 1
    candidates = range(step, 4 * base.d_ff + step, step)
    best = min(candidates, key=lambda d_ff: abs(params_of(dataclasses.replace(cfg, d_ff=d_ff)) - target))
    return dataclasses.replace(cfg, d_ff=best)


def batches(train: torch.Tensor, batch: int, seq: int, seed: int):
    """Endless random windows (inputs, targets) of seq bytes; the same sequence for every model."""
    gen = torch.Generator().manual_seed(seed)
    while True:
        start = torch.randint(0, len(train) - seq - 1, (batch,), generator=gen)
        window = torch.stack([train[s: s + seq + 1] for s in start.tolist()])
        yield window[:, :-1], window[:, 1:]


def lr_at(step: int, steps: int, lr: float, warmup: int) -> float:
    if step < warmup:
        return lr * (step + 1) / warmup
    return 0.5 * lr * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, steps - warmup))))


def train_step(model: CausalLM, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor) -> float:
    loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    return loss.item()


@torch.no_grad()
def validation_loss(model: CausalLM, val: torch.Tensor, seq: int, max_tokens: int, batch: int = 32) -> float:
    """Mean cross-entropy (nats per byte) over non-overlapping windows of the held-out text (eval mode)."""
    model.eval()
    n = min(len(val) - 1, max_tokens) // seq
    xs = val[: n * seq].view(n, seq)
    ys = val[1: n * seq + 1].view(n, seq)
    total = 0.0
    for i in range(0, n, batch):
        logits = model(xs[i: i + batch])
        total += F.cross_entropy(logits.flatten(0, 1), ys[i: i + batch].flatten(), reduction="sum").item()
    model.train()
    return total / (n * seq)


def make_optimizer(model: CausalLM, lr: float) -> torch.optim.Optimizer:
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                             lr=lr, betas=(0.9, 0.95))


def dense_step_seconds(cfg: DecoderConfig, train: torch.Tensor, args: argparse.Namespace) -> float:
    """Median seconds per training step of the dense model (3 warm-up steps, then 8)."""
    torch.manual_seed(args.seed)
    model = CausalLM(cfg).train()
    opt = make_optimizer(model, args.lr)
    data = batches(train, args.batch, args.seq, args.seed + 1)
    times = []
    for i in range(11):
        x, y = next(data)
        start = time.perf_counter()
        train_step(model, opt, x, y)
        if i >= 3:
            times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def train(cfg: DecoderConfig, steps: int, train_data: torch.Tensor, val: torch.Tensor,
          args: argparse.Namespace) -> dict:
    torch.manual_seed(args.seed)
    model = CausalLM(cfg).train()
    for module in model.modules():
        if isinstance(module, SparseFFNController):
            module.st_prob = args.st_prob
    opt = make_optimizer(model, args.lr)
    data = batches(train_data, args.batch, args.seq, args.seed + 1)
    start = time.perf_counter()
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, steps, args.lr, args.warmup)
        anneal_dense_mix(model, step, round(args.dense_warmup * steps))
        loss = train_step(model, opt, *next(data))
        if step % max(1, steps // 10) == 0 or step == steps - 1:
            print(f"  step {step:5d}/{steps} loss {loss:.3f} ({time.perf_counter() - start:.0f}s)", flush=True)
    seconds = time.perf_counter() - start
    val_loss = validation_loss(model, val, args.seq, args.eval_tokens)
    return {"params": count_parameters(model), "train_seconds": seconds, "val_loss": val_loss}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--budget-minutes", type=float, default=5.0, help="dense model's training time; sets the steps")
    p.add_argument("--steps", type=int, default=0, help="train every model this many steps (overrides the budget)")
    p.add_argument("--style", choices=("gpt2", "llama"), default="gpt2")
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--d-ff", type=int, default=1024)
    p.add_argument("--n", type=int, default=32, help="sparse FF block size N (one active unit per N)")
    p.add_argument("--d-lowrank", type=int, default=64)
    p.add_argument("--st-prob", type=float, default=0.3,
                   help="controller training: probability of the straight-through one-hot per batch (paper 0.3)")
    p.add_argument("--dense-warmup", type=float, default=0.5,
                   help="fraction of the steps over which sparse FF training anneals from all units on to the "
                        "paper's mask (0: the paper's training from step 0)")
    p.add_argument("--mask-at", choices=["pre_activation", "post_activation"], default="pre_activation",
                   help="where sparse FF training multiplies the controller's mask: before the activation "
                        "(trax: only the selected unit passes a gradient) or after it (sparsecc 0.1)")
    p.add_argument("--variants", default="dense,ff,ffqkv",
                   help="comma list of the models to train: dense, ff (sparse FF), ffqkv (sparse FF + QKV)")
    p.add_argument("--modules", type=int, default=0, help="sparse QKV modules S (0: d_model // 64)")
    p.add_argument("--qkv-output", choices=QKV_OUTPUTS, default="none",
                   help="sparse QKV attention's output layer (default none, as trax releases it)")
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--warmup", type=int, default=50)
    p.add_argument("--val-fraction", type=float, default=0.1)
    p.add_argument("--eval-tokens", type=int, default=65536, help="held-out bytes evaluated")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (0: torch's default)")
    p.add_argument("--quick", action="store_true", help="a tiny model for 40 steps (smoke run)")
    p.add_argument("--out", help="write the markdown table here")
    args = p.parse_args()
    if args.quick:
        args.d_model, args.layers, args.d_ff, args.steps, args.seq, args.eval_tokens = 64, 2, 256, 40, 64, 8192
        args.warmup = 5
    if not 0.0 <= args.dense_warmup <= 1.0:
        p.error(f"--dense-warmup: got {args.dense_warmup}; expected a fraction of the steps in [0, 1]")
    if args.threads:
        torch.set_num_threads(args.threads)

    train_data, val = load_bytes(args.val_fraction)
    base = DecoderConfig(vocab_size=256, d_model=args.d_model, n_layers=args.layers, n_heads=args.heads,
                         d_ff=args.d_ff, max_len=args.seq, style=args.style, ffn_n=args.n,
                         ffn_d_lowrank=args.d_lowrank, ffn_mask_at=args.mask_at)
    target = params_of(base)
    all_variants = {
        "dense": ("dense", base),
        "ff": ("sparse FF", match_d_ff(base, target, sparse_ffn=True)),
        "ffqkv": ("sparse FF + sparse QKV", match_d_ff(base, target, sparse_ffn=True, sparse_qkv=True,
                                                       qkv_modules=args.modules, qkv_output=args.qkv_output)),
    }
    chosen = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in chosen if v not in all_variants]
    if unknown or not chosen:
        p.error(f"--variants: unknown {unknown or chosen}; choose from {', '.join(all_variants)}")
    variants = [all_variants[v] for v in chosen]
    steps = args.steps
    if not steps:
        step_s = dense_step_seconds(base, train_data, args)
        steps = max(1, int(args.budget_minutes * 60 / step_s))
        print(f"dense step {step_s:.3f}s -> {steps} steps for {args.budget_minutes} min", flush=True)
    print(f"text: {len(train_data)} training bytes, {len(val)} held-out bytes", flush=True)

    results = []
    for name, cfg in variants:
        print(f"{name}: d_ff {cfg.d_ff}, {params_of(cfg)} parameters", flush=True)
        results.append((name, cfg, train(cfg, steps, train_data, val, args)))

    dense_loss = next((r["val_loss"] for name, _, r in results if name == "dense"), None)
    s = all_variants["ffqkv"][1].qkv_modules
    lines = [
        f"Byte-level causal LM on Python standard-library docstrings ({len(train_data) / 1e6:.2f} MB train, "
        f"{min(len(val), args.eval_tokens) / 1e3:.0f} kB of the held-out {len(val) / 1e3:.0f} kB evaluated). "
        f"{args.style} style, d_model {args.d_model}, {args.layers} layers, {args.heads} heads, context {args.seq}; "
        f"{steps} steps of batch {args.batch} for every model (AdamW lr {args.lr}, cosine, seed {args.seed}); "
        f"sparse FF N={args.n}, d_lowrank={args.d_lowrank} (trained with the controller's Gumbel / "
        f"straight-through-w.p.-{args.st_prob:g} mask after a dense-to-sparse warm-up over "
        f"{args.dense_warmup:.0%} of the steps, evaluated with arg-max via `sparsecc::sparse_ffn`); "
        f"sparse QKV S={s}, "
        f"output layer {args.qkv_output!r}. "
        "Parameter counts matched through d_ff.",
        "",
        "| model | d_ff | params | train time | val loss (nats/byte) | val ppl | bits/byte | ppl vs dense |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, cfg, r in results:
        ppl = math.exp(r["val_loss"])
        rel = "" if name == "dense" or dense_loss is None else f"{(ppl / math.exp(dense_loss) - 1) * 100:+.1f}%"
        lines.append(f"| {name} | {cfg.d_ff} | {r['params'] / 1e6:.3f}M | {r['train_seconds'] / 60:.1f} min | "
                     f"{r['val_loss']:.4f} | {ppl:.3f} | {r['val_loss'] / math.log(2):.3f} | {rel} |")
    lines += ["", f"Machine: {machine_line()}.", f"Command: `python tools/eval_lm.py {' '.join(sys.argv[1:])}`"]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        write_atomic(args.out, text)


if __name__ == "__main__":
    main()

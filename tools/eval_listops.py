"""ListOps quality benchmark of SPION (issue 3): dense vs SPION-CF vs SPION-C vs BigBird, trained on CPU.

Data: `listops_data.py` beside this file (the LRA generator's rules; lengths 501..1999 padded to 2048 by
default). Model: the paper's ListOps encoder (4 layers, d_model 64, 2 heads x 32, FFN 128, pre-LN,
learned positions, mean pooling). AdamW, gradient clipping by value 1 (as released), linear
warm-up then linear decay.

Variants, all for the same number of optimizer steps S on the same batch sequence:
  dense     dense attention for S steps.
  spion_cf  dense warm-up, then sparse. Every --check-every steps each layer's attention map
            (softmax probabilities averaged over batch and heads, on --calib-batches fixed
            training batches padded to --seq-len) feeds `SwitchCriterion` (switch when the
            relative change of ||A_t - A_{t-1}||_F is < 15 % in every layer), or the switch is
            forced after --max-dense-frac * S dense steps. At the switch, per-layer layouts come
            from `spion_cf` on those maps; training continues block-sparse and the LR schedule
            restarts (warm-up + decay over the remaining steps), as released.
  spion_c   the same dense warm-up (shared: the dense warm-up is computed once and the run is
            branched at the switch), layouts from `spion_c` at SPION-CF's mean density.
  bigbird   block-sparse from step 0, one BigBird layout (window + global + random blocks) at
            SPION-CF's mean density (or --bigbird-density) for every layer. Where window 3 and a
            global block do not fit that density at --block (short sequences: 8 % of 16 x 16
            blocks leaves only the diagonal), BigBird uses the largest finer block at which they
            do (--bigbird-block to choose), so the baseline keeps BigBird's structure.
The dense variant is also branched from the shared warm-up (it is its own first W steps), so
the dense, SPION-CF and SPION-C runs are identical up to the switch.

Batches are bucketed by length (sorted, cut into batches, batch order shuffled per epoch) and
cropped to their longest example rounded up to the block size; layouts calibrated at --seq-len
are cropped with BlockLayout.fit (exact: the cropped tiles only hold padding).

Layouts (--engine): with sparsecc.compile available (sparsecc.Spion exists) the SPION-CF, SPION-C
and BigBird layouts come from `sparsecc.compile(model, example, recipe=Recipe(attention=Spion(...)),
calibration=batches)` on the warmed-up model, and the compiled model is checked against the direct
path; otherwise from the model's own attention maps and the sparsecc.layouts generators. Training of
the sparse variants calls `torch.ops.sparsecc.block_sparse_attention` directly through the
model's per-layer layouts (`ListOpsTransformer.set_layouts`).

Examples:
    python tools/eval_listops.py --quick --out /tmp/listops_quick.md
    python tools/eval_listops.py --budget-minutes 30 --out /tmp/listops.md --png-dir /tmp/listops_png
"""

from __future__ import annotations

import argparse
import copy
import math
import os
import shlex
import sys
import time
import warnings
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from common import machine_line, write_atomic  # noqa: E402

from listops_data import LRA_MAX_LEN, LRA_MIN_LEN, ListOpsTransformer, listops_dataset  # noqa: E402
from sparsecc.errors import LayoutError  # noqa: E402
from sparsecc.layouts import LayoutSet, save_layout_png  # noqa: E402
from sparsecc.methods.fixed.layouts import layout_at_density  # noqa: E402
from sparsecc.methods.spion.layouts import SwitchCriterion, spion_c, spion_cf  # noqa: E402

VARIANTS = ("dense", "spion_cf", "spion_c", "bigbird")


# ----------------------------------------------------------------------------- data
class Batches:
    """Length-bucketed batches; batch(step) is a deterministic function of the step index."""

    def __init__(self, ids, labels, lengths, batch_size, block, seed):
        self.ids, self.labels, self.lengths = ids, labels, lengths
        self.block, self.seed = block, seed
        order = torch.argsort(lengths, stable=True)
        self.groups = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
        self._epochs: dict[int, list[int]] = {}

    def __len__(self):
        return len(self.groups)

    def get(self, group) -> tuple[torch.Tensor, torch.Tensor]:
        crop = min(self.ids.shape[1], -(-int(self.lengths[group].max()) // self.block) * self.block)
        return self.ids[group, :crop], self.labels[group]

    def batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        epoch, i = divmod(step, len(self.groups))
        if epoch not in self._epochs:
            g = torch.Generator().manual_seed(self.seed * 1000 + epoch)
            self._epochs[epoch] = torch.randperm(len(self.groups), generator=g).tolist()
        return self.get(self.groups[self._epochs[epoch][i]])

    def all(self):
        for group in self.groups:
            yield self.get(group)


# ----------------------------------------------------------------------------- training
def lr_factor(step: int, total: int, warmup: int) -> float:
    """Linear warm-up to 1 over `warmup` steps, then linear decay to 0 at `total`."""
    if step < warmup:
        return (step + 1) / warmup
    return max(0.0, (total - step) / max(1, total - warmup))


@dataclass
class Run:
    name: str
    model: ListOpsTransformer
    opt: torch.optim.Optimizer
    step: int = 0  # global step (batch index)
    sched_start: int = 0  # step at which the current LR schedule started
    sched_total: int = 0
    seconds: float = 0.0  # training time (forward, backward, optimizer), this run's own steps
    dense_steps: int = 0
    sparse_steps: int = 0
    dense_seconds: float = 0.0
    sparse_seconds: float = 0.0
    losses: list = field(default_factory=list)
    stopped_early: bool = False


def train_steps(run: Run, batches: Batches, until: int, args, warmup_steps: int, deadline: float | None = None,
                on_step=None) -> None:
    """Train `run` up to global step `until` (exclusive). on_step(run) -> True stops early."""
    run.model.train()
    sparse = bool(run.model.layouts)
    while run.step < until:
        if deadline is not None and time.perf_counter() > deadline:
            run.stopped_early = True
            return
        ids, labels = batches.batch(run.step)
        f = lr_factor(run.step - run.sched_start, run.sched_total, warmup_steps)
        for group in run.opt.param_groups:
            group["lr"] = args.lr * f
        t0 = time.perf_counter()
        loss = F.cross_entropy(run.model(ids), labels)
        run.opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_value_(run.model.parameters(), 1.0)
        run.opt.step()
        dt = time.perf_counter() - t0
        run.seconds += dt
        if sparse:
            run.sparse_steps += 1
            run.sparse_seconds += dt
        else:
            run.dense_steps += 1
            run.dense_seconds += dt
        run.losses.append(loss.item())
        run.step += 1
        if args.verbose and (run.step % max(1, args.log_every) == 0):
            print(f"  [{run.name}] step {run.step}/{until} loss {run.losses[-1]:.4f} lr {args.lr * f:.2e} "
                  f"L={ids.shape[1]} {dt:.2f}s", flush=True)
        if on_step is not None and on_step(run):
            return


@torch.no_grad()
def evaluate(model: ListOpsTransformer, batches: Batches) -> tuple[float, float, float]:
    """(accuracy, mean cross-entropy, seconds) on all test batches."""
    model.eval()
    t0 = time.perf_counter()
    correct, loss, n = 0, 0.0, 0
    for ids, labels in batches.all():
        logits = model(ids)
        correct += int((logits.argmax(-1) == labels).sum())
        loss += float(F.cross_entropy(logits, labels, reduction="sum"))
        n += len(labels)
    return correct / n, loss / n, time.perf_counter() - t0


def new_run(name: str, args, seed_offset: int = 0) -> Run:
    torch.manual_seed(args.seed + seed_offset)
    model = ListOpsTransformer(max_len=args.seq_len, dropout=args.dropout)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    return Run(name, model, opt)


def branch(run: Run, name: str) -> Run:
    """A deep copy of a run (model, optimizer state, counters) under a new name."""
    model = copy.deepcopy(run.model)
    opt = torch.optim.AdamW(model.parameters(), lr=run.opt.defaults["lr"],
                            weight_decay=run.opt.defaults["weight_decay"])
    opt.load_state_dict(copy.deepcopy(run.opt.state_dict()))
    return Run(name, model, opt, run.step, run.sched_start, run.sched_total, run.seconds, run.dense_steps,
               run.sparse_steps, run.dense_seconds, run.sparse_seconds, list(run.losses))


# ----------------------------------------------------------------------------- timing estimate
def estimate_step_seconds(args, batches: Batches) -> tuple[float, float]:
    """(dense, sparse) seconds per training step, measured on a throwaway model (median of 3)."""
    probe = new_run("probe", args, seed_offset=99)
    steps = [len(batches) // 2, len(batches) // 3, (2 * len(batches)) // 3, len(batches) // 4]
    out = []
    for layouts in (None, "sparse"):
        if layouts:
            with warnings.catch_warnings():  # a timing probe: its layout's shape does not matter
                warnings.simplefilter("ignore")
                lay = layout_at_density("bigbird", args.seq_len, args.block,
                                        min(1.0, max(0.08, 3.0 / (args.seq_len // args.block))))
            probe.model.set_layouts(LayoutSet((n, lay.with_name(n)) for n in probe.model.attention_names()))
        times = []
        for i, s in enumerate(steps):
            ids, labels = batches.batch(s)
            t0 = time.perf_counter()
            loss = F.cross_entropy(probe.model(ids), labels)
            probe.opt.zero_grad()
            loss.backward()
            probe.opt.step()
            if i:
                times.append(time.perf_counter() - t0)
        out.append(sorted(times)[len(times) // 2])
    return out[0], out[1]


# ----------------------------------------------------------------------------- report
def fmt_densities(layouts) -> str:
    if not layouts:
        return "1.000 (dense)"
    return " / ".join(f"{lay.density:.3f}" for lay in layouts.values())


def mean_density(layouts) -> float:
    return sum(lay.density for lay in layouts.values()) / len(layouts) if layouts else 1.0


def write_report(args, results: list[dict], info: dict, final: bool) -> None:
    lines = ["# ListOps (LRA rules), SPION quality benchmark", ""]
    lines.append(f"Machine: {machine_line()}")
    lines.append("")
    lines.append("Command: `" + " ".join(shlex.quote(a) for a in info["argv"]) + "`")
    lines.append("")
    lines.append(
        f"Data: {args.train_size} train / {args.test_size} test expressions, lengths {args.min_len}..{args.max_len} "
        f"tokens (mean {info['mean_len']:.0f}), padded to {args.seq_len}; max depth 10, max args 10. "
        f"Majority-class test accuracy: {info['majority']:.3f}.")
    lines.append(
        f"Model: 4 layers, d_model 64, 2 heads x 32, FFN 128, pre-LN, learned positions, mean pooling, dropout "
        f"{args.dropout}. AdamW lr {args.lr} (wd {args.weight_decay}), batch {args.batch_size}, "
        f"{info['steps']} steps per variant, warm-up {args.warmup_frac:.0%} of each schedule, grad clip 1 (value).")
    sw = info.get("switch")
    if sw:
        lines.append(
            f"SPION switch: step {sw['step']} of {info['steps']} ({sw['reason']}); checks every {info['check_every']} "
            f"steps on {args.calib_batches} x {args.batch_size} training examples at length {args.seq_len}; "
            f"last deltas {sw['deltas']}. Block {args.block}, quantile {args.quantile}, 31x31 diagonal kernel.")
    if "step_estimate" in info:
        d, s = info["step_estimate"]
        lines.append(f"Step-time probe (used to size --steps from --budget-minutes {args.budget_minutes}): "
                     f"dense {d:.2f} s, sparse ~{s:.2f} s.")
    lines.append("")
    lines.append("| variant | test acc | test loss | train loss (last 10%) | density per layer | mean density | "
                 "steps dense+sparse | train time (s) | s/step sparse | eval time (s) |")
    lines.append("|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        sps = f"{r['sparse_seconds'] / r['sparse_steps']:.2f}" if r["sparse_steps"] else "-"
        dps = f" (dense {r['dense_seconds'] / r['dense_steps']:.2f} s/step)" if r["dense_steps"] and not r["sparse_steps"] else ""
        flag = " (stopped early: time)" if r["stopped_early"] else ""
        lines.append(
            f"| {r['name']}{flag} | {r['acc']:.3f} | {r['loss']:.3f} | {r['train_loss']:.3f} | {r['densities']} | "
            f"{r['mean_density']:.3f} | {r['dense_steps']}+{r['sparse_steps']} | {r['seconds']:.0f}{dps} | {sps} | "
            f"{r['eval_seconds']:.0f} |")
    lines.append("")
    lines.append("Train time counts forward+backward+optimizer of every step a variant took, the shared dense "
                 "warm-up included for dense / SPION-CF / SPION-C (it is computed once and branched); calibration "
                 "checks, layout generation and evaluation are not included. The CPU is shared with other work, so "
                 "times are noisy. Reference (LRA paper, vanilla Transformer, 5k steps x batch 32 on TPU): 36.4 %.")
    if info.get("notes"):
        lines.append("")
        lines.extend(f"- {n}" for n in info["notes"])
    if not final:
        lines.append("")
        lines.append("_(partial: run in progress)_")
    text = "\n".join(lines) + "\n"
    if args.out:
        write_atomic(args.out, text)
    print(text if final else f"[partial report written to {args.out}]", flush=True)


# ----------------------------------------------------------------------------- main
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small smoke run: seq-len 512, few steps (~3-5 min)")
    p.add_argument("--seq-len", type=int, default=None, help="padded length (default 2048; 512 with --quick)")
    p.add_argument("--min-len", type=int, default=None, help="shortest expression (default 501, or seq-len/4)")
    p.add_argument("--max-len", type=int, default=None, help="longest expression (default 1999, or seq-len - 1)")
    p.add_argument("--train-size", type=int, default=None, help="training expressions (default 2048; 256 quick)")
    p.add_argument("--test-size", type=int, default=None, help="test expressions (default 256; 64 quick)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--steps", type=int, default=None, help="steps per variant (default: sized to --budget-minutes)")
    p.add_argument("--budget-minutes", type=float, default=None, help="total time for all variants (default 30; 4 quick)")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--dropout", type=float, default=0.1)
    p.add_argument("--warmup-frac", type=float, default=0.1, help="LR warm-up fraction of each schedule")
    p.add_argument("--block", type=int, default=None, help="block size (default 64; 32 with --quick)")
    p.add_argument("--quantile", type=float, default=0.98, help="SPION-CF quantile (ListOps as released: 0.98)")
    p.add_argument("--switch-threshold", type=float, default=15.0, help="SwitchCriterion threshold in %%")
    p.add_argument("--switch-rule", choices=["released", "consecutive"], default="released",
                   help="SwitchCriterion rule: released (the third map against the first, then consecutive, "
                        "int(delta)) or consecutive (the paper's text; sparsecc 0.1)")
    p.add_argument("--check-every", type=int, default=None, help="steps between switch checks (default steps/20)")
    p.add_argument("--max-dense-frac", type=float, default=0.3, help="force the switch after this fraction of steps")
    p.add_argument("--bigbird-block", type=int, default=None,
                   help="BigBird's block size (default: the largest of block, block/2, ... at which window 3 + a "
                        "global block fit the target density)")
    p.add_argument("--bigbird-density", type=float, default=None,
                   help="BigBird's target density (default: SPION-CF's mean density; set it to rerun BigBird alone "
                        "at the density of an earlier SPION-CF run)")
    p.add_argument("--calib-batches", type=int, default=2, help="batches for the attention maps")
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"comma list of {VARIANTS}")
    p.add_argument("--engine", choices=("auto", "compile", "direct"), default="auto",
                   help="where the sparse layouts come from: 'compile' = sparsecc.compile with Recipe(attention="
                        "Spion(...)) and calibration batches; 'direct' = the model's own attention maps and the "
                        "sparsecc.layouts generators; auto = compile when sparsecc.Spion exists. Training always "
                        "runs the model's direct block-sparse path (see the module doc)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    p.add_argument("--out", default=None, help="markdown report file")
    p.add_argument("--png-dir", default=None, help="directory for the layout PNGs (default: next to --out)")
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--verbose", action="store_true")
    args = p.parse_args(argv)
    q = args.quick
    args.seq_len = args.seq_len or (512 if q else 2048)
    if args.min_len is None or args.max_len is None:
        if args.seq_len >= 2048:
            lo, hi = LRA_MIN_LEN, LRA_MAX_LEN
        else:
            lo, hi = args.seq_len // 4, args.seq_len - 1
        args.min_len = args.min_len if args.min_len is not None else lo
        args.max_len = args.max_len if args.max_len is not None else hi
    args.train_size = args.train_size or (256 if q else 2048)
    args.test_size = args.test_size or (64 if q else 256)
    args.budget_minutes = args.budget_minutes if args.budget_minutes is not None else (4.0 if q else 30.0)
    args.block = args.block or (32 if q else 64)
    args.variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    bad = [v for v in args.variants if v not in VARIANTS]
    if bad:
        p.error(f"unknown variants {bad}; choose from {VARIANTS}")
    if args.bigbird_density is not None and not 0.0 < args.bigbird_density <= 1.0:
        p.error(f"--bigbird-density {args.bigbird_density} must be in (0, 1]")
    if args.bigbird_block is not None and args.bigbird_block < 1:
        p.error(f"--bigbird-block {args.bigbird_block} must be a positive int")
    if args.max_len > args.seq_len:
        p.error(f"--max-len {args.max_len} exceeds --seq-len {args.seq_len}")
    if args.engine == "auto":
        import sparsecc
        args.engine = "compile" if hasattr(sparsecc, "Spion") else "direct"
    if args.png_dir is None:
        args.png_dir = (os.path.splitext(args.out)[0] + "_layouts") if args.out else "listops_layouts"
    return args


def bigbird_block_for(seq_len: int, block: int, density: float) -> int:
    """The largest block size (block, block/2, ... down to 4) at which BigBird keeps its structure.

    At SPION's densities on short sequences (e.g. 8 % of 16 x 16 blocks) a BigBird layout with
    window 3 and a global block does not fit, and `layout_at_density` falls back to the bare block
    diagonal: a local-attention baseline, not BigBird. Finer blocks keep window + global + random.
    """
    b = block
    while b >= 4:
        with warnings.catch_warnings():
            warnings.simplefilter("error", UserWarning)
            try:
                layout_at_density("bigbird", seq_len, b, density)
                return b
            except (UserWarning, LayoutError):
                pass
        if b % 2:
            break
        b //= 2
    return block


def compiled_layouts(model: ListOpsTransformer, calib: list, args, method: str, info: dict, block: int | None = None,
                     **spion_kw) -> LayoutSet:
    """Layouts through sparsecc.compile(model, ..., recipe=Recipe(attention=Spion(...)), calibration=calib).

    Also checks the compiled (rewritten) model against the model's direct block-sparse path with the
    same layouts on the first calibration batch and records the largest logit difference.
    """
    import sparsecc

    src = copy.deepcopy(model).eval()
    src.set_layouts(None)
    recipe = sparsecc.Recipe(attention=sparsecc.Spion(method=method, block=block or args.block, **spion_kw), ffn=None)
    t = time.perf_counter()
    sm = sparsecc.compile(src, (calib[0],), recipe=recipe, calibration=[(b,) for b in calib])
    seconds = time.perf_counter() - t
    layouts = LayoutSet((name, sm.layouts[name]) for name in src.attention_names())
    with torch.no_grad():
        src.set_layouts(layouts)
        diff = float((sm(calib[0]) - src(calib[0])).abs().max())
    calibrated = f"calibration on {len(calib)} batches, " if recipe.attention.needs_calibration else ""
    info["notes"].append(f"{method}: layouts from sparsecc.compile in {seconds:.0f} s (capture, {calibrated}rewrite); "
                         f"compiled model vs direct path with the same layouts, max |logit diff| {diff:.1e}.")
    return layouts


def main(argv=None) -> int:
    args = parse_args(argv)
    t_start = time.perf_counter()
    if args.threads:
        torch.set_num_threads(args.threads)
    info: dict = {"argv": [os.path.basename(sys.executable), "tools/eval_listops.py"] + list(sys.argv[1:] if argv is None else argv),
                  "notes": []}
    # --- data
    t0 = time.perf_counter()
    ids, labels, lengths = listops_dataset(args.train_size + args.test_size, args.min_len, args.max_len, args.seed,
                                           seq_len=args.seq_len)
    print(f"data: {len(ids)} expressions in {time.perf_counter() - t0:.1f}s, mean length "
          f"{lengths.float().mean():.0f}", flush=True)
    n = args.train_size
    train = Batches(ids[:n], labels[:n], lengths[:n], args.batch_size, args.block, args.seed)
    test = Batches(ids[n:], labels[n:], lengths[n:], args.batch_size, args.block, args.seed)
    info["mean_len"] = float(lengths.float().mean())
    info["majority"] = float(torch.bincount(labels[n:], minlength=10).max()) / args.test_size
    g = torch.Generator().manual_seed(args.seed + 7)
    calib_idx = torch.randperm(n, generator=g)[: args.calib_batches * args.batch_size]
    calib = [ids[calib_idx[i:i + args.batch_size]] for i in range(0, len(calib_idx), args.batch_size)]

    # --- steps from the budget
    if args.steps is None:
        d, s = estimate_step_seconds(args, train)
        info["step_estimate"] = (d, s)
        f = args.max_dense_frac
        per_step = 0.0
        if any(v in args.variants for v in ("dense", "spion_cf", "spion_c")):
            per_step += f * d  # shared warm-up (worst case: forced switch)
        per_step += ((1 - f) * d if "dense" in args.variants else 0.0)
        per_step += sum((1 - f) * s for v in ("spion_cf", "spion_c") if v in args.variants)
        per_step += s if "bigbird" in args.variants else 0.0
        # evaluation (~1/3 of a training step per batch) and calibration checks
        eval_s = len(args.variants) * len(test) * max(d, s) / 3
        n_checks = math.ceil(args.max_dense_frac * 20) + 1  # checks until the (latest) switch
        calib_s = n_checks * args.calib_batches * d * (args.seq_len / max(1.0, info["mean_len"])) ** 2 / 2
        usable = max(60.0, 0.85 * args.budget_minutes * 60 - (time.perf_counter() - t_start) - eval_s - calib_s)
        args.steps = max(10, int(usable / per_step))
        print(f"probe: dense {d:.2f}s/step, sparse ~{s:.2f}s/step -> {args.steps} steps per variant", flush=True)
    S = args.steps
    info["steps"] = S
    check_every = args.check_every or max(1, S // 20)
    info["check_every"] = check_every
    max_dense = max(1, int(round(args.max_dense_frac * S)))
    warm = lambda total: max(1, int(args.warmup_frac * total))  # noqa: E731
    budget_s = args.budget_minutes * 60
    deadline = t_start + 1.5 * budget_s  # hard stop per variant beyond this (flagged in the table)

    results: list[dict] = []

    def finish(run: Run, layouts) -> None:
        acc, loss, ev_s = evaluate(run.model, test)
        tail = run.losses[-max(1, len(run.losses) // 10):]
        results.append({"name": run.name, "acc": acc, "loss": loss, "train_loss": sum(tail) / len(tail),
                        "densities": fmt_densities(layouts), "mean_density": mean_density(layouts),
                        "dense_steps": run.dense_steps, "sparse_steps": run.sparse_steps, "seconds": run.seconds,
                        "dense_seconds": run.dense_seconds, "sparse_seconds": run.sparse_seconds,
                        "eval_seconds": ev_s, "stopped_early": run.stopped_early})
        print(f"{run.name}: acc {acc:.3f} loss {loss:.3f} ({run.dense_steps}+{run.sparse_steps} steps, "
              f"{run.seconds:.0f}s train, {ev_s:.0f}s eval, {time.perf_counter() - t_start:.0f}s elapsed)", flush=True)
        write_report(args, results, info, final=False)

    need_warmup = any(v in args.variants for v in ("dense", "spion_cf", "spion_c"))
    layouts: dict[str, LayoutSet] = {}
    if need_warmup:
        base = new_run("warm-up", args)
        base.sched_total = S
        need_switch = any(v in args.variants for v in ("spion_cf", "spion_c", "bigbird"))
        state = {"maps": None, "reason": None, "deltas": {}}
        crit = SwitchCriterion(args.switch_threshold, rule=args.switch_rule)

        def on_step(run: Run) -> bool:
            if run.step % check_every and run.step < max_dense:
                return False
            t = time.perf_counter()
            maps = run.model.attention_maps(calib)
            run.model.train()
            switched = crit.update(maps)
            state["maps"] = maps
            state["deltas"] = {k.split(".")[1]: round(v, 1) for k, v in crit.deltas.items()}
            if args.verbose:
                print(f"  check at step {run.step}: deltas {state['deltas']} ({time.perf_counter() - t:.1f}s)",
                      flush=True)
            if switched:
                state["reason"] = (f"SwitchCriterion ({args.switch_rule}) < {args.switch_threshold:g} % in every "
                                   f"layer at step {run.step}")
                return True
            if run.step >= max_dense:
                state["reason"] = f"forced after {max_dense} dense steps (max-dense-frac {args.max_dense_frac})"
                return True
            return False

        print(f"dense warm-up: up to {max_dense} of {S} steps, checks every {check_every}", flush=True)
        train_steps(base, train, S if not need_switch else max_dense, args, warm(S),
                    on_step=on_step if need_switch else None)
        W = base.step
        if need_switch:
            if state["maps"] is None:
                state["maps"] = base.model.attention_maps(calib)
                state["reason"] = state["reason"] or "end of warm-up"
            info["switch"] = {"step": W, "reason": state["reason"], "deltas": state["deltas"]}
            maps = state["maps"]
            t = time.perf_counter()
            if args.engine == "compile":
                layouts["spion_cf"] = compiled_layouts(base.model, calib, args, "spion_cf", info,
                                                       quantile=args.quantile)
                density = layouts["spion_cf"].mean_density()
                if "spion_c" in args.variants:
                    layouts["spion_c"] = compiled_layouts(base.model, calib, args, "spion_c", info, density=density)
            else:
                layouts["spion_cf"] = LayoutSet(
                    (nm, spion_cf(A, block_size=args.block, quantile=args.quantile, name=nm)) for nm, A in maps.items())
                density = layouts["spion_cf"].mean_density()
                layouts["spion_c"] = LayoutSet(
                    (nm, spion_c(A, block_size=args.block, density=density, name=nm)) for nm, A in maps.items())
            print(f"switch at step {W} ({state['reason']}); SPION-CF densities "
                  f"{fmt_densities(layouts['spion_cf'])} (layouts in {time.perf_counter() - t:.1f}s)", flush=True)
    else:
        W = 0
        density = None

    if "bigbird" in args.variants:
        bb_density = args.bigbird_density if args.bigbird_density is not None else density
        if bb_density is None:  # bigbird alone: calibrate a SPION-CF density on an untrained model
            probe = new_run("probe", args)
            maps = probe.model.attention_maps(calib)
            bb_density = LayoutSet((nm, spion_cf(A, block_size=args.block, quantile=args.quantile, name=nm))
                                   for nm, A in maps.items()).mean_density()
            info["notes"].append("BigBird density taken from SPION-CF layouts of the untrained model.")
        bb_block = args.bigbird_block or bigbird_block_for(args.seq_len, args.block, bb_density)
        if args.engine == "compile":
            layouts["bigbird"] = compiled_layouts(new_run("BigBird", args).model, calib, args, "bigbird", info,
                                                  block=bb_block, density=bb_density, seed=args.seed)
        else:
            bb = layout_at_density("bigbird", args.seq_len, bb_block, bb_density)
            layouts["bigbird"] = LayoutSet((nm, bb.with_name(nm)) for nm in ListOpsTransformer().attention_names())
        m = next(iter(layouts["bigbird"].values())).meta
        info["notes"].append(
            f"BigBird layout: window {m['window']}, {m['global_blocks']} global and {m['random_blocks']} random "
            f"blocks per row, block {bb_block} (target density {bb_density:.3f}"
            f"{', --bigbird-density' if args.bigbird_density is not None else ''}), the same for every layer.")

    os.makedirs(args.png_dir, exist_ok=True)
    for name, ls in layouts.items():
        path = os.path.join(args.png_dir, f"{name}.png")
        save_layout_png(ls, path, title=f"ListOps {name} (L={args.seq_len}, block {next(iter(ls.values())).block_size})")
        ls.save_dir(os.path.join(args.png_dir, name))
    if layouts:
        info["notes"].append(f"Layout PNGs and LayoutSet directories: {args.png_dir}/")

    # --- variants
    for v in args.variants:
        if v == "dense":
            run = branch(base, "dense")
            train_steps(run, train, S, args, warm(S), deadline=deadline)
            finish(run, None)
        elif v in ("spion_cf", "spion_c"):
            run = branch(base, {"spion_cf": "SPION-CF", "spion_c": "SPION-C"}[v])
            run.model.set_layouts(layouts[v])
            run.sched_start, run.sched_total = W, S - W  # the LR schedule restarts at the switch
            train_steps(run, train, S, args, warm(S - W), deadline=deadline)
            finish(run, layouts[v])
        elif v == "bigbird":
            run = new_run("BigBird", args)
            run.model.set_layouts(layouts["bigbird"])
            run.sched_total = S
            train_steps(run, train, S, args, warm(S), deadline=deadline)
            finish(run, layouts["bigbird"])
    info["notes"].append(f"Total wall time {time.perf_counter() - t_start:.0f} s (budget {args.budget_minutes:g} min).")
    info["notes"].append(
        f"Layouts: engine '{args.engine}'. Sparse training runs torch.ops.sparsecc.block_sparse_attention "
        "directly through the model's per-layer layouts (key padding via the model's exact 'bias' mode, see "
        "ListOpsAttention): the compiled SparseModel is an exported graph that cannot switch to train mode "
        "(dropout) and is fixed to the calibrated length, while batches here are cropped to their longest example.")
    write_report(args, results, info, final=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

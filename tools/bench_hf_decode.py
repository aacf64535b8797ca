"""Per-token decode latency of a Hugging Face Llama through `sparsecc.compile_decoder`, against the
model's own `generate` with its caches, in one run.

A LlamaForCausalLM with random weights at the Scaling Transformers Table 1 shape (d_model 1024,
d_ff 4096, 16 heads, 24 layers, vocab 32000; fp32). Rows, all greedy, batch 1 (--batch):
  HF generate, DynamicCache      the model's own generate (its default cache)
  HF generate, StaticCache       cache_implementation="static" (the cache compile_decoder also uses)
  sparsecc identity              compile_decoder with no recipe
  sparsecc sparse FFN            SparseFFN(n, d_lowrank, init="random") on every layer (random
                                 controllers: with random weights nothing can be distilled, and the
                                 op's speed does not depend on which unit wins)
  sparsecc token flow (--flow K) TokenFlow(gate="content", pin_first=False, keep=K): random gate
                                 scorers whose thresholds are set (calibrate_keep) to keep K of the
                                 tokens of random prompts; a skipped token runs no output projection
                                 and no FFN in that layer. The fraction the timed tokens kept is
                                 measured afterwards and printed with the table.
Each row is timed by a streamer that stamps every generated token: the gaps between consecutive
tokens are decode steps (the prompt's prefill is not in them). Harness as Table 1: a prompt of
--prompt tokens, 2 warm-up tokens, then 10 timed ones; --repeats runs per row, interleaved, so drift
on a shared machine hits every row alike; the figure is the median of all timed tokens.
--prefill L,... also times the prompt's forward at those lengths: HF's forward with a DynamicCache
against the sparsecc prefill graph. --spion-prefill L,... times the prefill of decoders compiled
with max_len = L (identity, and SPION-C at --spion-density, block --spion-block, calibrated on one
random prompt of L tokens) against HF's forward; only the prefill is timed, so --spion-prefill alone
(with --repeats 0 for the decode rows) is a prefill-only run.

Example:
    python tools/bench_hf_decode.py --out /tmp/hf_decode.md
    python tools/bench_hf_decode.py --layers 4 --repeats 2        # a smoke run
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import sparsecc  # noqa: E402
from common import add_table1_shape, emit, machine_line  # noqa: E402

WARMUP, TIMED = 2, 10


class Stamps:
    """HF's streamer interface: records the time of every put after the prompt's."""

    def __init__(self):
        self.times: list[float] = []
        self.prompt_seen = False

    def put(self, value) -> None:
        if not self.prompt_seen:
            self.prompt_seen = True
            return
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass

    def steps(self) -> list[float]:
        """Seconds of each timed decode step (after the warm-up ones)."""
        gaps = [b - a for a, b in zip(self.times, self.times[1:])]
        return gaps[WARMUP - 1:]


def build_model(args):
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=args.vocab, hidden_size=args.d_model, intermediate_size=args.d_ff,
                      num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.heads,
                      max_position_embeddings=max(4096, args.max_len), attn_implementation="sdpa")
    with torch.no_grad():
        model = LlamaForCausalLM(cfg).eval()
    model.generation_config.eos_token_id = None  # random weights: never stop early
    model.generation_config.pad_token_id = 0
    return model


def hf_runner(model, static: bool):
    def run(ids):
        stamps = Stamps()
        extra = {"cache_implementation": "static"} if static else {}
        model.generate(ids, max_new_tokens=WARMUP + TIMED, do_sample=False, streamer=stamps, **extra)
        return stamps.steps()
    return run


def sparsecc_runner(dec):
    def run(ids):
        stamps = Stamps()
        dec.generate(ids, max_new_tokens=WARMUP + TIMED, streamer=stamps)
        return stamps.steps()
    return run


def time_prefill(model, decs: dict, length: int, repeats: int, vocab: int) -> dict:
    """Median seconds of one prompt forward of `length` tokens: HF (DynamicCache) and each compiled prefill."""
    from sparsecc.causal_lm.generate import prefill_inputs
    ids = torch.randint(1, vocab, (1, length), generator=torch.Generator().manual_seed(length))
    out: dict = {"HF forward, DynamicCache": []}
    out.update({name: [] for name in decs})
    with torch.no_grad():
        for _ in range(repeats):
            start = time.perf_counter()
            model(ids, use_cache=True)
            out["HF forward, DynamicCache"].append(time.perf_counter() - start)
            for name, dec in decs.items():
                inputs = prefill_inputs(ids, torch.ones_like(ids), dec.empty_cache(1), dec.max_len)
                start = time.perf_counter()
                dec.prefill(*inputs)
                out[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in out.items()}


def spion_prefill(model, args, length: int) -> list[str]:
    """Markdown rows: the prefill of `length` tokens, HF against decoders compiled with max_len = length."""
    ids = torch.randint(1, args.vocab, (1, length), generator=torch.Generator().manual_seed(1))
    spion = sparsecc.Spion(method="spion_c", density=args.spion_density, block=args.spion_block)
    decs = {}
    for name, recipe in (("sparsecc identity prefill", None),
                         (f"sparsecc SPION-C prefill (density {args.spion_density}, block {args.spion_block})",
                          sparsecc.Recipe(attention=spion, ffn=None))):
        start = time.perf_counter()
        decs[name] = sparsecc.compile_decoder(model, max_len=length, recipe=recipe, check=False,
                                              calibration=None if recipe is None else [ids])
        print(f"compiled {name} at L = {length} in {time.perf_counter() - start:.0f}s", flush=True)
        gc.collect()
    # the layouts cover the model's whole position range; the prompt uses their top-left blocks
    blocks = -(-length // args.spion_block)
    masks = [p.tensors["mask"][:blocks, :blocks].float() for p in decs[list(decs)[1]].plans.values()
             if "mask" in p.tensors]
    causal_tiles = torch.ones(blocks, blocks).tril()
    density = float(sum((m * causal_tiles).sum() for m in masks) / (len(masks) * causal_tiles.sum()))
    repeats = max(2, args.repeats // 2)
    result = time_prefill(model, decs, length, repeats, args.vocab)
    first = result["HF forward, DynamicCache"]
    lines = ["", f"Prefill of {length} tokens, batch 1, decoders compiled with max_len = {length} (median of "
             f"{repeats}); the SPION layouts keep {density:.3f} of the {int(causal_tiles.sum())} causal "
             f"{args.spion_block}x{args.spion_block} tiles of the prompt (mean over layers):", "",
             "| prefill | seconds | vs HF |", "|---|---:|---:|"]
    return lines + [f"| {name} | {s:.3f} | {first / s:.2f}x |" for name, s in result.items()]


def flow_decoder(model, args):
    """An eager token-flow decoder whose random gate scorers keep about args.flow of the tokens."""
    from sparsecc.causal_lm.generate import prefill_inputs
    from sparsecc.methods.token_flow.fit import calibrate_keep
    recipe = sparsecc.Recipe(attention=None, ffn=None,
                             flow=sparsecc.TokenFlow(gate="content", pin_first=False, keep=args.flow))
    dec = sparsecc.compile_decoder(model, max_len=args.max_len, recipe=recipe, check=False)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for scorer in dec.prefill.flow_gates.scorers:
            scorer.weight.copy_(torch.randn(scorer.weight.shape, generator=g) / scorer.weight.shape[1] ** 0.5)
            scorer.bias.zero_()
    # calibrate_keep runs the prompts once per layer: 256 random tokens set the thresholds
    prompts = [torch.randint(1, args.vocab, (2, min(args.max_len, 128)), generator=g)]
    calibrate_keep(dec.prefill, [prefill_inputs(ids, torch.ones_like(ids), dec.empty_cache(2), dec.max_len)
                                 for ids in prompts])
    return dec


def kept_while_decoding(dec, ids) -> float:
    """Mean over layers of the fraction of the generated tokens that a flow decoder kept (the prefill graph
    routes every token as the decode step did)."""
    from sparsecc.causal_lm.generate import prefill_inputs
    tokens = dec.generate(ids, max_new_tokens=WARMUP + TIMED)[:, ids.shape[1]:]
    kept = dec.prefill.measure_flow([prefill_inputs(tokens, torch.ones_like(tokens), dec.empty_cache(tokens.shape[0]),
                                                    dec.max_len)])
    return statistics.fmean(kept.values())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_table1_shape(p)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--n", type=int, default=32, help="sparse FFN: one unit kept per block of n")
    p.add_argument("--d-lowrank", type=int, default=64)
    p.add_argument("--prompt", type=int, default=1, help="prompt tokens before the timed decode")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--prefill", default="", help="comma-separated prompt lengths to time the prefill at")
    p.add_argument("--repeats", type=int, default=5, help="runs per row, interleaved")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (0: torch's default)")
    p.add_argument("--backend", choices=("eager", "inductor"), default="eager")
    p.add_argument("--spion-prefill", default="", help="comma-separated prompt lengths: identity vs SPION prefill")
    p.add_argument("--spion-density", type=float, default=0.25)
    p.add_argument("--spion-block", type=int, default=64)
    p.add_argument("--ort", action="store_true",
                   help="also the sparsecc decoders on ONNX Runtime (past in, present out)")
    p.add_argument("--flow", type=float, default=0.0,
                   help="also a token-flow decoder keeping about this fraction of tokens per layer (0: none)")
    p.add_argument("--no-sparse-ffn", action="store_true", help="leave out the sparse FFN rows (memory: each "
                   "compiled decoder holds a copy of the weights, each ONNX Runtime one two)")
    p.add_argument("--out", help="write the markdown table here")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    lengths = [int(x) for x in args.prefill.split(",") if x]
    args.max_len = max([args.prompt + WARMUP + TIMED] + lengths)

    start = time.perf_counter()
    model = build_model(args)
    params = sum(p.numel() for p in model.parameters())
    print(f"built LlamaForCausalLM ({params / 1e6:.1f}M parameters) in {time.perf_counter() - start:.0f}s", flush=True)
    if args.repeats == 0:  # prefill rows only
        lines = [line for length in [int(x) for x in args.spion_prefill.split(",") if x]
                 for line in spion_prefill(model, args, length)]
        emit(lines + _footer(), args.out)
        return
    decs = {}
    sparse = sparsecc.Recipe(attention=None, ffn=sparsecc.SparseFFN(n=args.n, d_lowrank=args.d_lowrank, init="random"))
    builds = [("sparsecc identity", None, args.backend), (f"sparsecc sparse FFN (n={args.n})", sparse, args.backend)]
    if args.ort:
        builds += [("sparsecc identity, ORT", None, "onnxruntime"),
                   (f"sparsecc sparse FFN (n={args.n}), ORT", sparse, "onnxruntime")]
    if args.no_sparse_ffn:
        builds = [b for b in builds if b[1] is None]
    flow_name = f"sparsecc token flow (keep {args.flow})"
    if args.flow:
        start = time.perf_counter()
        flow = flow_decoder(model, args)
        print(f"compiled and calibrated the eager token-flow decoder in {time.perf_counter() - start:.0f}s", flush=True)
        builds.insert(1 if args.no_sparse_ffn else 2, (flow_name, flow, args.backend))
        if args.ort:
            builds.append((flow_name + ", ORT", flow, "onnxruntime"))
    for name, recipe, backend in builds:
        start = time.perf_counter()
        options = {"intra_op_num_threads": args.threads} if backend == "onnxruntime" and args.threads else None
        if isinstance(recipe, sparsecc.CompiledCausalLM):  # the calibrated flow decoder, moved to `backend`
            decs[name] = recipe if backend == "eager" else sparsecc.compile_decoder(
                model, max_len=args.max_len, check=False, backend=backend, backend_options=options, trained=recipe)
        else:
            decs[name] = sparsecc.compile_decoder(model, max_len=args.max_len, recipe=recipe, check=False,
                                                  backend=backend, backend_options=options)
        gc.collect()
        print(f"compiled {name} in {time.perf_counter() - start:.0f}s", flush=True)
    dec = next(iter(decs.values()))
    for name, recipe, _ in builds:
        if recipe is sparse:
            assert sum("sparse_ffn" in str(n.target) for n in decs[name].decode.graph_module.graph.nodes) == args.layers

    ids = torch.randint(1, args.vocab, (args.batch, args.prompt), generator=torch.Generator().manual_seed(0))
    # the compiled identity generates the model's own tokens (checked once, outside the timing)
    assert torch.equal(dec.generate(ids, max_new_tokens=4),
                       model.generate(ids, max_new_tokens=4, do_sample=False)), "identity tokens differ from HF"
    rows = {"HF generate, DynamicCache": hf_runner(model, False),
            "HF generate, StaticCache": hf_runner(model, True)}
    rows.update({name: sparsecc_runner(d) for name, d in decs.items()})
    timed: dict = {name: [] for name in rows}
    with torch.no_grad():
        for r in range(args.repeats):
            for name, run in rows.items():
                timed[name] += run(ids)
            print(f"run {r + 1}/{args.repeats}: " + ", ".join(f"{n} {statistics.median(t) * 1e3:.1f} ms"
                                                              for n, t in timed.items()), flush=True)
    base = statistics.median(timed["HF generate, DynamicCache"])
    lines = [
        f"Decode seconds per token, batch {args.batch}, greedy, fp32: LlamaForCausalLM (random weights) d_model "
        f"{args.d_model}, d_ff {args.d_ff}, {args.heads} heads, {args.layers} layers, vocab {args.vocab} "
        f"({params / 1e6:.1f}M parameters); prompt {args.prompt} token(s), {WARMUP} warm-up + {TIMED} timed tokens, "
        f"median of {TIMED * args.repeats} from {args.repeats} interleaved runs; sparsecc backend {args.backend}, "
        f"cache max_len {args.max_len}; {args.threads or torch.get_num_threads()} thread(s).",
        "",
        "| decoder | s/token (median) | s/token (mean) | vs HF DynamicCache |",
        "|---|---:|---:|---:|",
    ]
    for name, t in timed.items():
        med = statistics.median(t)
        lines.append(f"| {name} | {med:.4f} | {statistics.fmean(t):.4f} | {base / med:.2f}x |")
    if args.flow:
        lines += ["", f"The token-flow decoder kept {kept_while_decoding(decs[flow_name], ids):.3f} of the timed "
                  "tokens per layer (mean over layers)."]
    for length in lengths:
        prefills = {"sparsecc identity prefill": dec}
        if args.flow:
            prefills[f"sparsecc token flow prefill (keep {args.flow})"] = decs[flow_name]
        result = time_prefill(model, prefills, length, max(2, args.repeats // 2), args.vocab)
        first = result["HF forward, DynamicCache"]
        lines += ["", f"Prefill of {length} tokens, batch 1 (median of {max(2, args.repeats // 2)}):", "",
                  "| prefill | seconds | vs HF |", "|---|---:|---:|"]
        lines += [f"| {name} | {s:.3f} | {first / s:.2f}x |" for name, s in result.items()]
    for length in [int(x) for x in args.spion_prefill.split(",") if x]:
        lines += spion_prefill(model, args, length)
    emit(lines + _footer(), args.out)


def _footer() -> list[str]:
    return ["", f"Machine: {machine_line()}.", f"Command: `python tools/bench_hf_decode.py {' '.join(sys.argv[1:])}`"]


if __name__ == "__main__":
    main()

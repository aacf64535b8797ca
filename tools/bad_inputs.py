"""Run every bad-input case of TESTING.md and print what the user gets: a markdown table.

    python tools/bad_inputs.py [--tree DIR] [--only ID ...] [--json]

Each case runs in a fresh interpreter (the `sparsecc` command through `python -m sparsecc.cli`, or a
Python snippet) with DIR first on PYTHONPATH (default: this checkout), in a scratch directory holding
the inputs the cases name (a malformed TOML / JSON recipe, a corrupt .pt2, a directory, ...). The
outcome column is the exit code and the last line on stderr for the command line (and whether a
traceback was printed), or the result / exception of the snippet. Point --tree at an older checkout
(`git archive <commit> sparsecc | tar -x -C DIR`) for the "before" column. The long-sequence case
runs under a 12 GB address-space limit, so a version that builds the L x L mask fails fast instead
of taking the machine's memory.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

SETUP = r'''
import torch, sparsecc
from sparsecc import testing as T
from pathlib import Path
Path("bad.toml").write_text('[attention\nkind = "spion"\n')
Path("bad.json").write_text('{"attention": {"kind": "spion", "block": }')
Path("sparse.toml").write_text('[attention]\nkind = "fixed"\npattern = "local"\nblock = 4\ndensity = 0.4375\n'
                               '[ffn]\nkind = "sparse_ffn"\nn = 4\nd_lowrank = 2\nsteps = 5\n')
Path("spion.toml").write_text('[attention]\nkind = "spion"\nblock = 8\nquantile = 0.9\n')
Path("adir").mkdir(exist_ok=True)
Path("corrupt.pt2").write_bytes(b"PK\x03\x04 not a zip archive" * 50)
model, inputs = T.bert("sdpa", seq=32)
model.save_pretrained("bert")
sm = sparsecc.compile(model, inputs, recipe=sparsecc.Recipe.load("sparse.toml"), calibration=[inputs], progress=False)
args, kwargs = sm.example_inputs
torch.export.save(torch.export.export(sm.graph_module, tuple(args), {**sm.call_defaults, **kwargs}), "compiled.pt2")
model, (x,) = T.hand_written()
sm = sparsecc.compile(model, (x,), recipe=sparsecc.Recipe.load("sparse.toml"), calibration=[(x,)], progress=False)
torch.export.save(torch.export.export(sm.graph_module, (x,)), "plain.pt2")
'''

PY = "py"
CLI = "cli"

# (id, what is tried, kind, argv or snippet, for a command that succeeds: the output line to show)
CASES = [
    ("pt2-load", "torch.export.load, in a fresh interpreter after `import sparsecc` only, of the .pt2 of a compiled "
     "model (block-sparse attention + sparse FFN)", PY, """
        ep = torch.export.load("plain.pt2")
        print("loads;", sum("sparsecc" in str(n.target) for n in ep.graph.nodes), "sparsecc op calls")"""),
    ("pt2-inspect", "`sparsecc inspect compiled.pt2` (a compiled Hugging Face BERT)", CLI, ["inspect", "compiled.pt2"],
     "compiled by sparsecc"),
    ("pickle", "pickle.dumps / copy.deepcopy of a compiled model", PY, """
        import pickle
        m, i = T.bert()
        pickle.dumps(sparsecc.compile(m, i, progress=False))"""),
    ("compile-out", "`sparsecc compile --out DIR`: is the whole model (sparse FFN controllers) saved?", CLI,
     ["compile", "sparsecc.testing:bert", "--recipe", "sparse.toml", "--out", "o"], "written"),
    ("compile-out-load", "... and does DIR/model load (sparsecc.load)?", PY, """
        sm = sparsecc.load("o/model")
        print("loads; plan tensors", sorted({n for p in sm.plans.values() for n in p.tensors}))"""),
    ("fp16-ffn", "SparseFFN on an fp16 model", PY, """
        m, i = T.bert()
        sparsecc.compile(m.half(), i, recipe=sparsecc.Recipe(ffn=sparsecc.SparseFFN(n=4, d_lowrank=2)), progress=False)"""),
    ("fp16-fixed", "Fixed(pattern='local') on an fp16 model (eager attention, additive mask at finfo(fp16).min)", PY, """
        m, i = T.bert()
        sm = sparsecc.compile(m.half(), i, progress=False, recipe=sparsecc.Recipe(
            attention=sparsecc.Fixed(pattern="local", block=4, density=0.4375), ffn=None))
        print("compiles;", [r.sparse["method"] for r in sm.report().attention])"""),
    ("calib-empty", "calibration=[]", PY, """
        m, i = T.bert()
        sparsecc.compile(m, i, recipe=sparsecc.Recipe(attention=sparsecc.Spion(block=4)), calibration=[], progress=False)"""),
    ("max-tokens-0", "SparseFFN(max_tokens=0)", PY, "sparsecc.SparseFFN(max_tokens=0)"),
    ("calib-tensor", "calibration=[tensor] for a model compiled with keyword inputs", PY, """
        m, i = T.bert()
        sparsecc.compile(m, i, recipe=sparsecc.Recipe(attention=sparsecc.Spion(block=4)), calibration=[i["input_ids"]],
                         progress=False)"""),
    ("meta", "a model on the meta device", PY, """
        m, i = T.bert()
        sparsecc.compile(m.to("meta"), i)"""),
    ("calib-longer", "calibration batches longer than the example inputs (SPION)", PY, """
        m, i = T.bert(seq=16)
        longer = T.bert(seq=32)[1]
        sm = sparsecc.compile(m, i, recipe=sparsecc.Recipe(attention=sparsecc.Spion(block=4)), calibration=[longer],
                              progress=False)
        print("runs;", tuple(sm(**longer).last_hidden_state.shape))"""),
    ("long-65536", "tiny BERT at L = 65536, Fixed(pattern='local', density=0.01): compile (check=False) and run", PY, """
        import resource, time
        from transformers import BertConfig, BertModel
        L = 65536
        m = BertModel(BertConfig(vocab_size=128, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                                 intermediate_size=64, max_position_embeddings=L, attn_implementation="sdpa")).eval()
        ids = torch.randint(0, 128, (1, L))
        i = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        t = time.time()
        sm = sparsecc.compile(m, i, check=False, progress=False,
                              recipe=sparsecc.Recipe(attention=sparsecc.Fixed(pattern="local", density=0.01), ffn=None))
        c = time.time() - t
        sm(**i)
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
        print(f"compiles in {c:.0f} s and runs; peak RSS {rss:.1f} GB")"""),
    ("config-types", "Spion(block=True) (also SparseFFN(steps=-5), TokenFlow(init=nan))", PY,
     "sparsecc.Spion(block=True)"),
    ("seq-len", "`--seq-len -5` (a Hugging Face directory)", CLI, ["inspect", "bert", "--seq-len", "-5"]),
    ("bad-toml", "a malformed TOML recipe", CLI,
     ["compile", "sparsecc.testing:bert", "--recipe", "bad.toml", "--out", "o2"]),
    ("bad-json", "a malformed JSON recipe", CLI, ["export", "sparsecc.testing:bert", "--recipe", "bad.json", "-o",
                                                  "m.onnx"]),
    ("corrupt-pt2", "a corrupt .pt2", CLI, ["inspect", "corrupt.pt2"]),
    ("out-proc", "`compile --out /proc/x`", CLI, ["compile", "sparsecc.testing:bert", "--out", "/proc/x"]),
    ("o-readonly", "`export -o` at a read-only path (/sys)", CLI, ["export", "sparsecc.testing:bert", "-o",
                                                                    "/sys/m.onnx"]),
    ("o-dir", "`export -o` at a directory", CLI, ["export", "sparsecc.testing:bert", "-o", "adir"]),
    ("costlier", "a sparse FFN rewrite that costs more than the dense FFN (d_lowrank too large)", PY, """
        m, i = T.bert()
        sparsecc.compile(m, i, recipe=sparsecc.Recipe(attention=None, ffn=sparsecc.SparseFFN(n=2, d_lowrank=64)),
                         progress=False)"""),
    ("spion-c-density", "Spion(method='spion_c', density=1.0): the density used, and does compile warn?", PY, """
        import warnings
        m, i = T.bert(seq=64)
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            sm = sparsecc.compile(m, i, calibration=[i], progress=False, recipe=sparsecc.Recipe(
                attention=sparsecc.Spion(method="spion_c", block=16, density=1.0), ffn=None))
        r = sm.report().attention[0].sparse
        print("density", r["density"], "requested", r.get("density_requested"), "; warned:",
              any("density" in str(x.message) for x in w))"""),
    ("bigbird-density", "Fixed(pattern='bigbird', density=0.3): the density used, and does compile warn?", PY, """
        import warnings
        m, i = T.bert(seq=64)
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            sm = sparsecc.compile(m, i, progress=False, recipe=sparsecc.Recipe(
                attention=sparsecc.Fixed(pattern="bigbird", block=16, density=0.3), ffn=None))
        r = sm.report().attention[0].sparse
        print("density", r["density"], "requested", r.get("density_requested"), "; warned:",
              any("asked for density" in str(x.message) for x in w))"""),
    ("flow-untrained", "an untrained TokenFlow: does the report say so?", PY, """
        m, i = T.bert()
        sm = sparsecc.compile(m, i, recipe=sparsecc.Recipe(flow=sparsecc.TokenFlow()), progress=False)
        kept = sorted({r.sparse["kept_fraction"] for r in sm.regions if r.sparse})
        print("kept fractions", kept, ";", "the report points to fit_flow" if "fit_flow" in sm.report().table()
              else "the report gives no hint")"""),
    ("t5-bigbird", "T5 with Fixed(pattern='bigbird', density=0.3)", PY, """
        m, i = T.t5()
        sparsecc.compile(m, i, recipe=sparsecc.Recipe(attention=sparsecc.Fixed(pattern="bigbird", density=0.3),
                                                      ffn=None), progress=False)"""),
    ("no-matplotlib", "`sparsecc compile` with block layouts when matplotlib is missing", CLI,
     ["compile", "sparsecc.testing:bert", "--recipe", "sparse.toml", "--out", "o3"], "written"),
    ("export-text", "`sparsecc export minilm --calibration-batches 2` with SPION: calibrated on real text?", CLI,
     ["export", "minilm", "--recipe", "spion.toml", "--seq-len", "32", "--calibration-batches", "2", "-o", "m2.onnx"],
     "written"),
    ("capture-message", "`sparsecc inspect`: anything on stderr while capturing?", CLI,
     ["inspect", "sparsecc.testing:bert"], "regions"),
    ("demo-seq-len", "`sparsecc demo --seq-len 32 --batch 4`: the SPION half's length", CLI,
     ["demo", "--seq-len", "32", "--batch", "4", "--out", "demo"], "SPION-CF: calibrating"),
    ("methods", "`sparsecc methods`", CLI, ["methods"], "methods"),
    ("onnx-mode", "the file mode of an exported .onnx (umask 022)", PY, """
        import os, stat
        os.umask(0o022)
        m, i = T.bert()
        sparsecc.compile(m, i, progress=False).export_onnx("mode.onnx")
        print("mode", oct(stat.S_IMODE(os.stat("mode.onnx").st_mode)))"""),
    ("onnx-names", "the input and output names of an exported BERT", PY, """
        import onnx
        m, i = T.bert()
        sparsecc.compile(m, i, progress=False).export_onnx("names.onnx")
        g = onnx.load("names.onnx").graph
        print("inputs", [v.name for v in g.input], "outputs", [v.name for v in g.output])"""),
    ("onnx-lm", "the input and output names of an exported GPT-2 LM head model (use_cache on by default)", PY, """
        import onnx
        from transformers import GPT2Config, GPT2LMHeadModel
        m = GPT2LMHeadModel(GPT2Config(vocab_size=128, n_embd=32, n_layer=2, n_head=4, n_positions=64)).eval()
        ids = torch.randint(0, 128, (2, 16))
        sparsecc.compile(m, {"input_ids": ids, "attention_mask": torch.ones_like(ids)}).export_onnx("lm.onnx")
        g = onnx.load("lm.onnx").graph
        print("inputs", [v.name for v in g.input], "outputs", [v.name for v in g.output])"""),
    ("ort-past-len", "onnxruntime backend run at L = 32 with block layouts made for L = 16", PY, """
        m, i = T.bert()
        sm = sparsecc.compile(m, i, backend="onnxruntime", progress=False, recipe=sparsecc.Recipe(
            attention=sparsecc.Fixed(pattern="local", block=4, density=0.4375)))
        sm(input_ids=torch.ones(2, 32, dtype=torch.long), attention_mask=torch.ones(2, 32, dtype=torch.long))"""),
]


def _env(tree: Path, no_matplotlib: Path | None = None) -> dict:
    path = ([str(no_matplotlib)] if no_matplotlib else []) + [str(tree)]  # the fake matplotlib shadows the real one
    return {**os.environ, "PYTHONPATH": os.pathsep.join(path), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def run_case(case: tuple, tree: Path, scratch: Path, timeout: int) -> str:
    cid, _, kind, payload, *show = case
    fake = None
    if cid == "no-matplotlib":
        fake = scratch / "no_matplotlib"
        (fake / "matplotlib").mkdir(parents=True, exist_ok=True)
        (fake / "matplotlib" / "__init__.py").write_text("raise ModuleNotFoundError(\"No module named 'matplotlib'\")\n")
    if kind == CLI:
        cmd = [sys.executable, "-m", "sparsecc.cli", *payload]
    else:
        limit = "import resource\nresource.setrlimit(resource.RLIMIT_AS, (12 << 30, 12 << 30))\n" \
            if cid == "long-65536" else ""
        body = textwrap.indent(textwrap.dedent(payload).strip(), "    ")
        cmd = [sys.executable, "-c", f"{limit}import torch, sparsecc\nfrom sparsecc import testing as T\n"
               f"try:\n{body}\n    print('returns normally')\n"
               "except BaseException as e:\n"
               "    print(f'{type(e).__module__}.{type(e).__name__}: ' + ' '.join(str(e).split())[:400])\n"]
    start = time.perf_counter()
    try:
        out = subprocess.run(cmd, cwd=scratch, env=_env(tree, fake), capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return f"no answer after {timeout} s"
    seconds = time.perf_counter() - start
    if kind == PY:
        if out.returncode != 0:
            return f"process died (exit {out.returncode}): {_last(out.stderr)}"
        result = [x for x in out.stdout.splitlines() if x.strip()]
        return result[-2] if len(result) >= 2 and result[-1] == "returns normally" else (result[-1] if result else "")
    lines = [x for x in out.stderr.splitlines() if x.strip() and "Warning" not in x and "warnings.warn" not in x]
    shown = f"exit {out.returncode} after {seconds:.0f} s"
    if "Traceback" in out.stderr:
        shown += f", a traceback ({len(out.stderr.splitlines())} lines on stderr)"
    if out.returncode != 0:
        return f"{shown}: {_last(out.stderr)}"
    ours = [" ".join(x.split())[:200] for x in lines if x.startswith("sparsecc")]
    batches = re.search(r"calibrating:[^\n\r]*? 0/(\d+)", out.stderr)
    if batches:
        ours.append(f"calibrating on {batches.group(1)} batches")
    found = [x for x in out.stdout.splitlines() if show and show[0] in x]
    return "; ".join([shown] + ours + [" ".join(found[0].split())[:200]] if found else [shown] + ours)


def _last(text: str) -> str:
    lines = [x for x in text.splitlines() if x.strip()]
    return " ".join(lines[-1].split())[:300] if lines else ""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tree", type=Path, default=ROOT, help="the checkout whose sparsecc is run (default: this)")
    parser.add_argument("--only", nargs="*", help="case ids to run (default: all)")
    parser.add_argument("--timeout", type=int, default=600)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    cases = [c for c in CASES if not args.only or c[0] in args.only]
    results = {}
    with tempfile.TemporaryDirectory(prefix="sparsecc-bad-inputs-") as tmp:
        scratch = Path(tmp)
        subprocess.run([sys.executable, "-c", SETUP], cwd=scratch, env=_env(ROOT), check=True, capture_output=True)
        for case in cases:
            results[case[0]] = run_case(case, args.tree.resolve(), scratch, args.timeout)
            print(f"{case[0]}: {results[case[0]]}", file=sys.stderr, flush=True)
    if args.json:
        print(json.dumps(results, indent=2))
        return
    print("| id | case | outcome |\n|---|---|---|")
    for cid, what, *_ in cases:
        print(f"| {cid} | {what} | {results[cid].replace('|', '/')} |")
    print(f"\n{len(cases)} cases")


if __name__ == "__main__":
    main()

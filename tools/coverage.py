"""The architecture coverage matrix: every test architecture x attention implementation x recipe.

    python tools/coverage.py [--arch NAME ...] [--out FILE] [--json FILE]

For each tiny model of `sparsecc.testing` (random weights, nothing downloaded) and each attention
implementation it supports (eager, sdpa), `sparsecc.inspect` counts the attention / FFN regions
against the model's layers and lists the rules of the candidates it left alone; then each recipe
is compiled at (or near) full density, calibrated on the example inputs:

    identity     Recipe()                                   (attention and FFN -> sparsecc ops)
    SPION        Spion(method="spion_c", density=1.0, block=64), FFN dense (one block >= every length here)
    sparse FFN   SparseFFN(n=4, d_lowrank=8, steps=50), attention dense (n=4 is not exact: error is information)
    token flow   TokenFlow(keep=1.0) (gate="content" when the default gate refuses), attention / FFN dense
    Fixed local  Fixed(pattern="local", block=8, density=full), FFN dense (the densest layout: 1.0, or
                 (n + 1) / 2n for causal models with n blocks)

Each cell: "OK <max abs error vs the dense model> / ORT <max abs error of the same recipe under
backend="onnxruntime" vs the eager compiled model>", "refused: ..." (a sparsecc error that says why),
"ERROR: <class>: ..." (anything else). "SILENT" marks a recipe that compiled but rewrote no region of
its slot, or whose error at full density exceeds 1e-4 (not for the sparse FFN, which is never exact).
"ORT MISMATCH" marks an ORT difference above 1e-4. Every exception is caught per cell.
"""

from __future__ import annotations

import argparse
import inspect as pyinspect
import json
import os
import sys
import time
import traceback
import warnings

import torch

sys.path.insert(0, os.path.dirname(__file__))
from common import emit, machine_line  # noqa: E402

ARCHS = ["bert", "gpt2", "llama", "mistral", "t5", "t5_encoder", "vit", "clip_text", "clip_vision", "bloom", "falcon",
         "torch_encoder", "opt", "phi", "qwen2", "gemma", "gpt_neox", "distilbert", "roberta", "albert",
         "deberta_v2", "whisper_encoder"]
IMPLS = ("eager", "sdpa")
RECIPES = ["identity", "spion", "sparse_ffn", "token_flow", "fixed_local"]
TITLES = {"identity": "identity", "spion": "SPION (full)", "sparse_ffn": "sparse FFN n=4",
          "token_flow": "token flow keep=1", "fixed_local": "Fixed local (full)"}
SLOTS = {"identity": ("attention", "ffn"), "spion": ("attention",), "sparse_ffn": ("ffn",),
         "token_flow": ("flow",), "fixed_local": ("attention",)}
EXACT_TOL = 1e-4
FIXED_BLOCK = 8


def first_line(err: BaseException, limit: int = 600) -> str:
    text = str(err).strip().splitlines()
    line = text[0] if text else ""
    return line if len(line) <= limit else line[:limit] + "..."


def leaves(out) -> list:
    """The output tensors in order (ModelOutput, tuple, dict or tensor)."""
    if isinstance(out, torch.Tensor):
        return [out]
    if hasattr(out, "to_tuple"):
        out = out.to_tuple()
    if isinstance(out, dict):
        out = list(out.values())
    if isinstance(out, (tuple, list)):
        return [t for o in out for t in leaves(o)]
    return []


def max_diff(a, b, mask=None) -> float:
    """Max abs difference over every output tensor. With `mask` ([B, S] attention mask), positions it marks as
    padding are left out of tensors shaped [B, S, ...] (what a model computes there is not defined; token
    flow leaves padding tokens as they entered a block)."""
    la, lb = leaves(a), leaves(b)
    if not la or len(la) != len(lb):
        raise RuntimeError(f"outputs differ in structure: {len(la)} vs {len(lb)} tensors")
    worst = 0.0
    for x, y in zip(la, lb):
        if x.shape != y.shape:
            raise RuntimeError(f"output shapes differ: {tuple(x.shape)} vs {tuple(y.shape)}")
        d = (x.double() - y.double()).abs()
        if mask is not None and d.dim() >= 2 and tuple(d.shape[:2]) == tuple(mask.shape):
            d = d[mask.bool()]
        worst = max(worst, float("inf") if not torch.isfinite(d).all() else float(d.max()) if d.numel() else 0.0)
    return worst


def padding_mask(inputs):
    """The [B, S] attention mask of the example inputs when it marks padding, else None."""
    mask = inputs.get("attention_mask") if isinstance(inputs, dict) else None
    return mask if mask is not None and mask.dim() == 2 and not bool(mask.bool().all()) else None


def call(model, inputs):
    with torch.no_grad():
        if isinstance(inputs, dict):
            return model(**inputs)
        if isinstance(inputs, tuple):
            return model(*inputs)
        return model(inputs)


def expected_layers(name: str, model) -> tuple[int, int, str]:
    """(attention regions, FFN regions) the model should have, and how they were counted."""
    if name == "torch_encoder":
        n = len(model.layers)
        return n, n, f"{n} layers"
    cfg = model.config
    if name == "t5":
        enc, dec = cfg.num_layers, cfg.num_decoder_layers
        return enc + 2 * dec, enc + dec, f"{enc} enc + {dec} dec layers (self + cross)"
    if name == "t5_encoder":
        return cfg.num_layers, cfg.num_layers, f"{cfg.num_layers} layers"
    if name == "whisper_encoder":
        return cfg.encoder_layers, cfg.encoder_layers, f"{cfg.encoder_layers} layers"
    n = cfg.num_hidden_layers
    return n, n, f"{n} layers"


def is_causal(report) -> bool:
    return any(r.causal for r in report.attention if not getattr(r, "cross", False))


def rewritten(sm, slot: str) -> int:
    """How many regions the recipe's pass(es) for `slot` rewrote (the pass is named f"{slot}_{kind}")."""
    if slot == "flow":
        return sum(1 for r in sm.report().regions if (r.sparse or {}).get("method") == "token_flow")
    return sum(len(p.changes) for p in sm.report().passes if p.name.startswith(f"{slot}_"))


def slot_regions(report, slot: str) -> int:
    return len(report.regions) if slot == "flow" else sum(1 for r in report.regions if r.kind == slot)


def fixed_layout(report) -> tuple[int, float]:
    """(block, density) of the densest local layout: block 8 with density 1.0, or (n + 1) / 2n for causal
    regions of n blocks (the most a causal layout keeps). Where regions disagree on that density (T5: a
    non-causal encoder of 2 blocks, a causal decoder of 1), one block covering the longest sequence, 1.0."""
    from sparsecc.graph.fx_utils import hint
    full = set()
    longest = 16
    for r in report.attention:
        if getattr(r, "cross", False):
            continue
        L = int(hint(r.q_len))
        longest = max(longest, L)
        n = -(-L // FIXED_BLOCK)
        full.add(1.0 if not r.causal or n == 1 else (n + 1) / (2 * n))
    if len(full) <= 1:
        return FIXED_BLOCK, (full.pop() if full else 1.0)
    return -(-longest // FIXED_BLOCK) * FIXED_BLOCK, 1.0


def make_recipe(kind: str, report, inputs, gate: str = "released"):
    import sparsecc
    if kind == "identity":
        return sparsecc.Recipe()
    if kind == "spion":
        return sparsecc.Recipe(attention=sparsecc.Spion(method="spion_c", density=1.0, block=64), ffn=None)
    if kind == "sparse_ffn":
        return sparsecc.Recipe(attention=None, ffn=sparsecc.SparseFFN(n=4, d_lowrank=8, steps=50))
    if kind == "token_flow":
        return sparsecc.Recipe(attention=None, ffn=None, flow=sparsecc.TokenFlow(keep=1.0, gate=gate))
    if kind == "fixed_local":
        block, density = fixed_layout(report)
        return sparsecc.Recipe(attention=sparsecc.Fixed(pattern="local", block=block, density=density), ffn=None)
    raise ValueError(kind)


def classify(err: BaseException) -> str:
    from sparsecc.errors import SparseccError
    return "refused" if isinstance(err, SparseccError) else "ERROR"


def run_cell(kind: str, model, inputs, dense_out, report) -> dict:
    """Compile one recipe (and again under ONNX Runtime with the same plans); never raises."""
    import sparsecc
    cell = {"recipe": kind, "status": None, "notes": []}
    start = time.perf_counter()
    caught = []
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            gate = "released"
            recipe = make_recipe(kind, report, inputs)
            try:
                sm = sparsecc.compile(model, inputs, recipe=recipe, calibration=[inputs], progress=False)
            except Exception as err:
                if kind != "token_flow" or classify(err) != "refused" or "gate='content'" not in str(err):
                    raise
                cell["notes"].append(f"default gate refused: {type(err).__name__}: {first_line(err)}")
                gate = "content"
                recipe = make_recipe(kind, report, inputs, gate=gate)
                sm = sparsecc.compile(model, inputs, recipe=recipe, calibration=[inputs], progress=False)
            if gate != "released":
                cell["gate"] = gate
            sm.eval()
            counts = {slot: (rewritten(sm, slot), slot_regions(sm.report(), slot)) for slot in SLOTS[kind]}
            cell["rewritten"] = counts
            out = call(sm, inputs)
            cell["err"] = max_diff(out, dense_out, padding_mask(inputs))
            if padding_mask(inputs) is not None:
                cell["err_with_padding"] = max_diff(out, dense_out)
            dens = sorted({round(r.sparse["density"], 4) for r in sm.report().regions
                           if r.sparse and "density" in r.sparse and kind in ("spion", "fixed_local")})
            if dens:
                cell["density"] = dens
            cell["not_rewritten"] = [f"{getattr(m, 'rule', '')}: {getattr(m, 'reason', m)}"
                                     for m in sm.report().unmatched
                                     if getattr(m, "rule", "").split(":")[0] in (recipe_kinds(kind))]
            cell["status"] = "OK"
            try:
                ort = sparsecc.compile(model, inputs, recipe=recipe, calibration=[inputs], plans=sm.plans,
                                       backend="onnxruntime", check=False, progress=False)
                cell["ort"] = max_diff(call(ort, inputs), out, padding_mask(inputs))
            except Exception as err:
                cell["ort_error"] = f"{type(err).__name__}: {first_line(err)}"
                cell["ort_trace"] = traceback.format_exc(limit=-3)
    except Exception as err:
        cell["status"] = classify(err)
        cell["error"] = f"{type(err).__name__}: {first_line(err)}"
        cell["trace"] = traceback.format_exc(limit=-3)
    cell["warnings"] = sorted({first_line(w.message) for w in caught if "sparsecc" in (w.filename or "")})
    cell["seconds"] = round(time.perf_counter() - start, 1)
    return cell


def recipe_kinds(kind: str) -> tuple:
    return {"identity": ("identity",), "spion": ("spion",), "sparse_ffn": ("sparse_ffn",),
            "token_flow": ("token_flow",), "fixed_local": ("fixed",)}[kind]


def silent_reasons(cell: dict) -> list[str]:
    if cell["status"] != "OK":
        return []
    out = [f"no {slot} region rewritten ({total} found)" for slot, (done, total) in cell["rewritten"].items()
           if done == 0]
    if cell["recipe"] != "sparse_ffn" and cell["err"] > EXACT_TOL:
        out.append(f"error {cell['err']:.1e} at full density")
    return out


def short_reason(message: str, limit: int = 110) -> str:
    """The reason of a "fits none of the N regions it was given: region: reason; ..." refusal (the first
    region's), else the message; cut to `limit` characters."""
    marker = "it was given: "
    if marker in message:
        cls = message.split(":", 1)[0]
        first = message.split(marker, 1)[1].split("; ")[0]
        message = f"{cls}: " + (first.split(": ", 1)[1] if ": " in first else first)
    return message if len(message) <= limit else message[:limit] + "..."


def cell_text(cell: dict) -> str:
    if cell["status"] != "OK":
        return f"{cell['status']}: {short_reason(cell['error'])}"
    silent = silent_reasons(cell)
    text = f"OK {cell['err']:.0e}"
    if cell["recipe"] == "sparse_ffn":
        text = f"OK (err {cell['err']:.0e})"
    partial = [f"{done}/{total}" for slot, (done, total) in cell["rewritten"].items() if 0 < done < total]
    if partial:
        text += f" [{', '.join(partial)} rewritten]"
    if cell.get("gate"):
        text += f" gate={cell['gate']}"
    if "ort" in cell:
        text += f" / ORT {cell['ort']:.0e}" + (" ORT MISMATCH" if cell["ort"] > EXACT_TOL else "")
    else:
        text += f" / ORT ERROR: {short_reason(cell['ort_error'])}"
    if silent:
        text = "SILENT (" + "; ".join(silent) + "): " + text
    return text


def run_arch(name: str) -> list[dict]:
    import sparsecc
    from sparsecc import testing
    factory = getattr(testing, name)
    inner = factory.__closure__[0].cell_contents if factory.__closure__ else factory  # under @_seeded
    impls = IMPLS if "attn_implementation" in pyinspect.signature(inner).parameters else ("-",)
    rows = []
    for impl in impls:
        row = {"arch": name, "impl": impl, "cells": {}}
        rows.append(row)
        start = time.perf_counter()
        print(f"== {name} {impl}", file=sys.stderr, flush=True)
        try:
            model, inputs = factory(attn_implementation=impl) if impl != "-" else factory()
        except Exception as err:
            if "does not support an attention implementation" in str(err):  # transformers' refusal, not ours
                row["not_supported"] = first_line(err, 120)
            else:
                row["factory_error"] = f"{type(err).__name__}: {first_line(err)}"
            continue
        try:
            dense_out = call(model, inputs)
            n_att, n_ffn, how = expected_layers(name, model)
            row["expected"] = {"attention": n_att, "ffn": n_ffn, "how": how}
            report = sparsecc.inspect(model, inputs)
            row["attention"], row["ffn"] = len(report.attention), len(report.ffn)
            row["ffn_no_activation"] = sum(1 for r in report.ffn if r.activation is None)
            row["causal"] = is_causal(report)
            row["unmatched"] = [{"kind": m.kind, "rule": m.rule, "reason": m.reason} for m in report.misses()]
        except Exception as err:
            row["inspect_error"] = f"{type(err).__name__}: {first_line(err)}"
            row["trace"] = traceback.format_exc(limit=-3)
            continue
        for kind in RECIPES:
            cell = run_cell(kind, model, inputs, dense_out, report)
            row["cells"][kind] = cell
            print(f"   {kind}: {cell_text(cell)} ({cell['seconds']} s)", file=sys.stderr, flush=True)
        row["seconds"] = round(time.perf_counter() - start, 1)
    return rows


def unmatched_text(row: dict) -> str:
    rules: dict = {}
    for m in row.get("unmatched", []):
        key = f"{m['kind']}:{m['rule']}"
        rules[key] = rules.get(key, 0) + 1
    return ", ".join(f"{k} x{v}" for k, v in rules.items()) or "-"


def table(rows: list[dict]) -> list[str]:
    head = ["arch", "impl", "attention / expected", "FFN / expected", "inspect: unmatched rules"] + \
        [TITLES[k] for k in RECIPES]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        if "not_supported" in row:
            lines.append(f"| {row['arch']} | {row['impl']} | n/a: transformers has no {row['impl']} attention for this "
                         "model |" + " |" * (len(head) - 3))
            continue
        if "factory_error" in row or "inspect_error" in row:
            what = row.get("factory_error") and f"factory: {row['factory_error']}" or f"inspect: {row['inspect_error']}"
            lines.append(f"| {row['arch']} | {row['impl']} | ERROR: {what} |" + " |" * (len(head) - 3))
            continue
        exp = row["expected"]
        att = f"{row['attention']} / {exp['attention']}" + ("" if row["attention"] == exp["attention"] else " MISSING")
        ffn = f"{row['ffn']} / {exp['ffn']}" + ("" if row["ffn"] == exp["ffn"] else " MISSING")
        if row.get("ffn_no_activation"):
            ffn += f" ({row['ffn_no_activation']} with unknown activation)"
        cells = [cell_text(row["cells"][k]).replace("|", "\\|") for k in RECIPES]
        lines.append(f"| {row['arch']} | {row['impl']} | {att} | {ffn} | {unmatched_text(row)} | " + " | ".join(cells)
                     + " |")
    return lines


def details(rows: list[dict]) -> list[str]:
    """Every non-OK cell (refused, error, silent, partial, ORT problem), grouped by its message."""
    groups: dict = {}
    for row in rows:
        where = f"{row['arch']}/{row['impl']}"
        if "not_supported" in row:
            continue
        if "factory_error" in row or "inspect_error" in row:
            groups.setdefault(row.get("factory_error") or row.get("inspect_error"), []).append(f"{where} (row)")
            continue
        for kind in RECIPES:
            cell = row["cells"][kind]
            keys = []
            if cell["status"] != "OK":
                keys.append(f"{cell['status']}: {short_reason(cell['error'], 400)}")
            else:
                keys += [f"SILENT: {s.split(' at ')[0] if 'error' in s else s}" for s in silent_reasons(cell)]
                if any(0 < d < t for d, t in cell["rewritten"].values()):
                    keys += [f"partial: {n}" for n in sorted(set(cell["not_rewritten"]))] or ["partial (no note)"]
                if cell.get("err_with_padding", 0.0) > EXACT_TOL and cell["recipe"] != "sparse_ffn":
                    keys.append("info (not counted): outputs at padding positions differ from dense")
                if "ort_error" in cell:
                    keys.append(f"ORT ERROR: {short_reason(cell['ort_error'], 400)}")
                elif cell["ort"] > EXACT_TOL:
                    keys.append("ORT MISMATCH > 1e-4")
            for key in keys:
                groups.setdefault(key, []).append(f"{where} {TITLES[kind]}")
    lines = []
    for key, cells in sorted(groups.items(), key=lambda kv: (-len(kv[1]), kv[0])):
        lines.append(f"- {key}")
        lines.append(f"  - {len(cells)} cell(s): {', '.join(cells)}")
    return lines


def code_version() -> str:
    """The commit the matrix ran on, and whether the working tree differed from it (sparsecc, tools)."""
    import subprocess
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True,
                              check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "sparsecc"], cwd=root, capture_output=True,
                               text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown (not a git checkout)"
    return head + (" with uncommitted changes to sparsecc/" if dirty else "")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", action="append", choices=ARCHS, help="restrict to this architecture (repeatable)")
    parser.add_argument("--out", help="write the Markdown matrix here (default: print only)")
    parser.add_argument("--json", help="also write every cell's raw result (errors with tracebacks) here")
    args = parser.parse_args()
    logging_quiet()
    start = time.perf_counter()
    code = code_version()
    rows = []
    for name in args.arch or ARCHS:
        try:
            rows += run_arch(name)
        except Exception as err:  # never stop the matrix
            rows.append({"arch": name, "impl": "?", "factory_error": f"{type(err).__name__}: {first_line(err)}"})
    seconds = time.perf_counter() - start
    lines = [f"Architecture coverage matrix ({len(rows)} rows, {seconds / 60:.1f} min)", ""] + table(rows) + \
        ["", "Cells not OK, grouped by message:", ""] + details(rows) + \
        ["", f"machine: {machine_line()}", f"code: {code} at the start, {code_version()} at the end"]
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1, default=str)
    emit(lines, args.out)


def logging_quiet() -> None:
    import logging
    logging.getLogger("sparsecc").setLevel(logging.ERROR)
    logging.getLogger("torch").setLevel(logging.ERROR)  # "torchvision is not installed" per export, graph dumps
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        import transformers
        transformers.logging.set_verbosity_error()
    except ImportError:
        pass


if __name__ == "__main__":
    main()

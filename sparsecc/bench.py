"""Dense vs sparse, side by side in one process: `sparsecc bench MODEL --recipe r.toml`.

    from sparsecc.bench import compare
    result = compare(model, example_inputs, recipe, calibration=batches, backend="eager")
    print(result.table())

Both rows are `sparsecc.compile`d from the same capture settings and run on the same inputs
with the same backend: "dense" with `Recipe.dense()` (capture + canonicalize only) and the
recipe's row. Latency is the median of `repeats` runs after `warmup`, the runs of the two rows
interleaved so load drift on a shared machine hits both alike. Agreement is measured on the
first floating-point output (e.g. `last_hidden_state`, logits): max abs error and the mean
cosine similarity of its rows to dense. FLOPs are the regions' dense and sparse FLOPs from the
compile report. Nothing here is a test: the figures are measurements of this machine now.
"""

from __future__ import annotations

import os
import platform
import statistics
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch
from torch.utils import _pytree as pytree

from sparsecc.progress import progress
from sparsecc.report import format_table, human


def median_seconds(fn: Callable[[], object], repeats: int = 5, warmup: int = 1) -> float:
    """Median wall time of `fn()` over `repeats` calls after `warmup` calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def machine_line() -> str:
    """Architecture, cores, Python, torch (and its thread count), transformers and onnxruntime versions."""
    parts = [f"{platform.machine()} {os.cpu_count()} cores", f"Python {platform.python_version()}",
             f"torch {torch.__version__}", f"{torch.get_num_threads()} threads"]
    for name in ("transformers", "onnxruntime"):
        try:
            parts.append(f"{name} {__import__(name).__version__}")
        except ImportError:
            pass
    return ", ".join(parts)


@dataclass
class BenchRow:
    name: str
    seconds: float  # median latency
    region_flops: int  # FLOPs of the attention / FFN regions after the recipe
    max_abs_error: Optional[float] = None  # vs the dense row's output; None for the dense row
    cosine: Optional[float] = None  # mean row cosine similarity to dense


@dataclass
class BenchResult:
    model: str
    backend: str
    recipe: dict
    repeats: int
    rows: list = field(default_factory=list)  # [dense BenchRow, recipe BenchRow]
    machine: str = ""

    @property
    def speedup(self) -> float:
        return self.rows[0].seconds / self.rows[1].seconds

    def to_dict(self) -> dict:
        return {"model": self.model, "backend": self.backend, "recipe": self.recipe, "repeats": self.repeats,
                "machine": self.machine, "speedup": self.speedup, "rows": [dict(r.__dict__) for r in self.rows]}

    def table(self) -> str:
        dense = self.rows[0]
        rows = [[r.name, f"{r.seconds * 1e3:,.2f}", f"{dense.seconds / r.seconds:.2f}x", human(r.region_flops),
                 f"{dense.region_flops / max(r.region_flops, 1):.2f}x",
                 "-" if r.max_abs_error is None else f"{r.max_abs_error:.2e}",
                 "-" if r.cosine is None else f"{r.cosine:.4f}"] for r in self.rows]
        headers = ["model", "median ms", "speedup", "region FLOPs", "FLOPs ratio", "max abs err", "cosine"]
        return "\n".join([f"{self.model}: dense vs recipe, backend {self.backend}, median of {self.repeats} "
                          "interleaved runs", format_table(headers, rows, align="lrrrrrr"), self.machine])


def first_float_output(out: Any) -> torch.Tensor:
    """The first floating-point tensor among a model's outputs (tensor, tuple, dict or ModelOutput)."""
    for leaf in pytree.tree_leaves(dict(out) if isinstance(out, dict) else out):
        if isinstance(leaf, torch.Tensor) and leaf.is_floating_point():
            return leaf
    raise TypeError(f"the model returned no floating-point tensor (got {type(out).__name__})")


def _call(module: Callable, inputs: Any) -> Any:
    from sparsecc.capture import normalize_inputs
    args, kwargs = normalize_inputs(inputs)
    return module(*args, **kwargs)


def _region_flops(sm: Any) -> int:
    return sum((r.sparse or {"flops": r.flops})["flops"] for r in sm.report().regions)


def compare(model: torch.nn.Module, example_inputs: Any, recipe: Any, calibration: Any = None,
            backend: str = "eager", repeats: int = 5, warmup: int = 1, name: Optional[str] = None,
            show_progress: bool = True) -> BenchResult:
    """Compile `model` dense and with `recipe`, then time both side by side on `example_inputs`."""
    import sparsecc

    if repeats < 1 or warmup < 0:
        raise ValueError(f"repeats must be >= 1 and warmup >= 0; got repeats={repeats}, warmup={warmup}")
    dense = sparsecc.compile(model, example_inputs, recipe=sparsecc.Recipe.dense(), backend=backend, check=False)
    sparse = sparsecc.compile(model, example_inputs, recipe=recipe, calibration=calibration, backend=backend)
    runners = {"dense": dense, "sparse": sparse}
    times: dict[str, list[float]] = {key: [] for key in runners}
    with torch.no_grad():
        outputs = {key: first_float_output(_call(sm, example_inputs)) for key, sm in runners.items()}
        for _ in range(warmup):
            for sm in runners.values():
                _call(sm, example_inputs)
        for _ in progress(range(repeats), desc="bench", unit="run", enabled=show_progress):
            for key, sm in runners.items():  # interleaved
                start = time.perf_counter()
                _call(sm, example_inputs)
                times[key].append(time.perf_counter() - start)
    ref, out = outputs["dense"].float(), outputs["sparse"].float()
    flat_ref, flat_out = ref.reshape(-1, ref.shape[-1]), out.reshape(-1, out.shape[-1])
    cosine = torch.nn.functional.cosine_similarity(flat_ref, flat_out, dim=-1).mean().item()
    rows = [BenchRow("dense", statistics.median(times["dense"]), _region_flops(dense)),
            BenchRow(_recipe_label(recipe), statistics.median(times["sparse"]), _region_flops(sparse),
                     (out - ref).abs().max().item(), cosine)]
    return BenchResult(model=name or type(model).__name__, backend=backend, recipe=recipe.to_dict(),
                       repeats=repeats, rows=rows, machine=machine_line())


def _recipe_label(recipe: Any) -> str:
    """'attention=spion, ffn=sparse_ffn' for the slots a recipe fills."""
    parts = [f"{slot}={value.get('kind', 'per-layer')}" for slot, value in recipe.to_dict().items() if value]
    return ", ".join(parts) or "dense"

"""Shared bits of the benchmark tools: machine/version line, medians, atomic writes."""

from __future__ import annotations

import os
import platform
import statistics
import time
from typing import Callable


def machine_line() -> str:
    import torch
    parts = [f"{platform.machine()} {os.cpu_count()} cores", f"Python {platform.python_version()}",
             f"torch {torch.__version__}", f"{torch.get_num_threads()} threads"]
    for name in ("transformers", "onnxruntime"):
        try:
            parts.append(f"{name} {__import__(name).__version__}")
        except ImportError:
            pass
    return ", ".join(parts)


def median_seconds(fn: Callable[[], object], repeats: int = 5, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def write_atomic(path: str, text: str) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)

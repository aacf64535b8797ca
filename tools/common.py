"""Shared bits of the benchmark tools: machine/version line, medians, atomic writes (one definition each,
in the package), and printing a result table."""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from sparsecc.bench import machine_line, median_seconds  # noqa: E402,F401
from sparsecc.io import write_text as write_atomic  # noqa: E402,F401


def emit(lines: list, out: str | None = None) -> str:
    """Print a result table and, with `out`, also write it there (atomically). Returns the text."""
    text = "\n".join(lines)
    print(text)
    if out:
        write_atomic(out, text + "\n")
    return text


def add_table1_shape(parser) -> None:
    """--layers --d-model --d-ff --heads: the model shape of Scaling Transformers' Table 1 by default."""
    parser.add_argument("--layers", type=int, default=24)
    parser.add_argument("--d-model", type=int, default=1024)
    parser.add_argument("--d-ff", type=int, default=4096)
    parser.add_argument("--heads", type=int, default=16)


def load_minilm():
    """(tokenizer, model in eval mode) of the embedded all-MiniLM-L6-v2."""
    from transformers import AutoModel, AutoTokenizer

    from sparsecc.models import minilm_dir
    path = minilm_dir()
    return AutoTokenizer.from_pretrained(path), AutoModel.from_pretrained(path).eval()

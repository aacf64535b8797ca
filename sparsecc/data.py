"""Real English text that ships with Python: the docstrings of the standard library.

Deterministic for a given Python version, needs no download, and long enough
for calibration and held-out evaluation.
"""

from __future__ import annotations

import importlib
import inspect
import re

MODULES = ("json", "os", "os.path", "collections", "itertools", "functools", "textwrap", "string", "re",
           "pathlib", "shutil", "subprocess", "argparse", "logging", "datetime", "calendar", "heapq",
           "bisect", "random", "statistics", "fractions", "decimal", "csv", "configparser", "tempfile",
           "glob", "fnmatch", "difflib", "pprint", "enum", "dataclasses", "typing", "contextlib", "abc",
           "copy", "pickle", "shelve", "zipfile", "tarfile", "gzip", "hashlib", "hmac", "secrets", "uuid",
           "urllib.parse", "http.client", "email.message", "mimetypes", "base64", "binascii", "struct",
           "codecs", "unicodedata", "locale", "gettext", "threading", "queue", "sched", "asyncio",
           "socket", "selectors", "signal", "inspect", "ast", "dis", "tokenize", "traceback", "warnings",
           "unittest", "doctest", "timeit", "trace", "sqlite3", "xml.dom.minidom", "html.parser", "turtle")


def _docstrings():
    for name in MODULES:
        try:
            module = importlib.import_module(name)
        except Exception:  # noqa: BLE001 - a module missing on this platform is skipped
            continue
        yield inspect.getdoc(module) or ""
        for attr in sorted(vars(module)):
            if attr.startswith("_"):
                continue
            obj = getattr(module, attr, None)
            if (inspect.isfunction(obj) or inspect.isclass(obj)) and getattr(obj, "__module__", "") == name:
                yield inspect.getdoc(obj) or ""


def stdlib_paragraphs(min_words: int = 8) -> list[str]:
    """Docstring paragraphs of prose (code examples and signatures left out), in a fixed order."""
    out, seen = [], set()
    for doc in _docstrings():
        for para in re.split(r"\n\s*\n", doc):
            text = " ".join(para.split())
            words = text.split()
            if len(words) < min_words or text in seen or ">>>" in text or text.count("(") > 3:
                continue
            letters = sum(c.isalpha() or c == " " for c in text)
            if letters < 0.85 * len(text):
                continue
            seen.add(text)
            out.append(text)
    return out


def stdlib_sentences(n: int = 64, offset: int = 0) -> list[str]:
    """`n` paragraphs starting at `offset` (use disjoint ranges for calibration and held-out text)."""
    paras = stdlib_paragraphs()
    if offset + n > len(paras):
        raise ValueError(f"only {len(paras)} docstring paragraphs available; asked for {offset}..{offset + n}")
    return paras[offset: offset + n]

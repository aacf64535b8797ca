"""Real English text that ships with Python: the docstrings of the standard library.

Deterministic for a given Python version, needs no download, and long enough
for calibration and held-out evaluation.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import inspect
import io
import re
import sys
import warnings

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


def _prose(doc: str, min_words: int = 8) -> list[str]:
    """Prose paragraphs of a docstring: code examples, signatures and symbol-heavy text left out."""
    out = []
    for para in re.split(r"\n\s*\n", doc):
        text = " ".join(para.split())
        if (len(text.split()) >= min_words and ">>>" not in text and text.count("(") <= 3
                and sum(c.isalpha() or c == " " for c in text) >= 0.85 * len(text)):
            out.append(text)
    return out


def stdlib_paragraphs(min_words: int = 8) -> list[str]:
    """Docstring paragraphs of prose of `MODULES` (module, public functions and classes), in a fixed order."""
    out, seen = [], set()
    for doc in _docstrings():
        for text in _prose(doc, min_words):
            if text not in seen:
                seen.add(text)
                out.append(text)
    return out


_SKIP = {"antigravity", "this", "idlelib", "tkinter", "turtle", "turtledemo", "lib2to3", "ensurepip", "venv",
         "pydoc_data", "test"}  # side effects on import, GUI, or test data


@functools.lru_cache(maxsize=1)
def _stdlib_corpus() -> tuple[str, ...]:
    paras = stdlib_paragraphs()
    seen = set(paras)
    for name in sorted(sys.stdlib_module_names):
        if name.startswith("_") or name in _SKIP:
            continue
        try:
            with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()), \
                    warnings.catch_warnings():
                warnings.simplefilter("ignore")
                module = importlib.import_module(name)
        except Exception:  # noqa: BLE001 - missing on this platform
            continue
        docs = [inspect.getdoc(module) or ""]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for attr in sorted(vars(module)):
                obj = getattr(module, attr, None)
                if attr.startswith("_") or getattr(obj, "__module__", "") != name:
                    continue
                if inspect.isfunction(obj) or inspect.isclass(obj):
                    docs.append(inspect.getdoc(obj) or "")
                if inspect.isclass(obj):
                    docs += [inspect.getdoc(getattr(obj, m)) or "" for m in sorted(vars(obj))
                             if not m.startswith("_") and inspect.isfunction(getattr(obj, m, None))]
        for doc in docs:
            for text in _prose(doc):
                if text not in seen:
                    seen.add(text)
                    paras.append(text)
    return tuple(paras)


def stdlib_corpus() -> list[str]:
    """`stdlib_paragraphs()` followed by the other prose paragraphs of every importable standard-library
    module (module, public functions, classes and their methods; sorted by module name): about twice
    the curated set, deterministic for a Python version. Imports those modules (once per process)."""
    return list(_stdlib_corpus())


def stdlib_sentences(n: int = 64, offset: int = 0) -> list[str]:
    """`n` paragraphs starting at `offset` (use disjoint ranges for calibration and held-out text)."""
    paras = stdlib_paragraphs()
    if offset + n > len(paras):
        raise ValueError(f"only {len(paras)} docstring paragraphs available; asked for {offset}..{offset + n}")
    return paras[offset: offset + n]

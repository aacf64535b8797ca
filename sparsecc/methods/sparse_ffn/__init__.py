"""Scaling Transformers' sparse FFN: a low-rank controller keeps one unit in every block of n."""

from sparsecc.methods.sparse_ffn import handler  # noqa: F401  (registers the method)
from sparsecc.methods.sparse_ffn.config import SparseFFN

__all__ = ["SparseFFN"]


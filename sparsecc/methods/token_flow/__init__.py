"""SparseFlow (Kim & Lee, ACL 2024): learned gates let only salient tokens flow into each block."""

from sparsecc.methods.token_flow import handler  # noqa: F401  (registers the method)
from sparsecc.methods.token_flow.config import TokenFlow

__all__ = ["TokenFlow"]

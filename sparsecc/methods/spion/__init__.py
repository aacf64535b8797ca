"""SPION (Yoon et al.): per-layer block-sparse attention layouts by convolutional flood filling."""

from sparsecc.methods.spion import handler  # noqa: F401  (registers the method)
from sparsecc.methods.spion.config import Spion

__all__ = ["Spion"]

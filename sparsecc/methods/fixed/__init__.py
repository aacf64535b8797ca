"""Fixed block-sparse attention layouts (BigBird, Longformer, local window, strided, random): no calibration."""

from sparsecc.methods.fixed import handler  # noqa: F401  (registers the method)
from sparsecc.methods.fixed.config import Fixed

__all__ = ["Fixed"]

"""Errors a user can act on: each message says what was found, what was expected, and what to do."""

from __future__ import annotations


class SparseccError(Exception):
    """Base class of every error sparsecc raises on purpose."""


class CaptureError(SparseccError):
    """torch.export could not capture the model."""


class InputError(SparseccError, ValueError):
    """Example inputs or calibration batches that do not fit the model (or each other)."""


class RecipeError(SparseccError, ValueError):
    """A recipe field has a bad value."""


class PassError(SparseccError):
    """A graph pass broke the graph or changed its numerics."""


class ModelSpecError(SparseccError, ValueError):
    """A MODEL argument of the command line could not be loaded."""


class LayoutError(SparseccError, ValueError):
    """A block layout does not fit the attention it is applied to."""


class UnsupportedError(SparseccError):
    """An input the current version cannot handle (says what would be needed)."""


class DistributedError(SparseccError):
    """Processes of one torch.distributed run disagree, or one of them failed or stopped answering."""


class TuneError(SparseccError):
    """`sparsecc.tune` found no sparse setting within the budget; `best` is the best point it measured."""

    def __init__(self, message: str, best: dict | None = None):
        super().__init__(message)
        self.best = best

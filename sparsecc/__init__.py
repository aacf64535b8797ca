"""sparsecc: make Transformers cheaper by rewriting their graphs into sparse operators.

    import sparsecc
    report = sparsecc.inspect(model, example_inputs)
    sm = sparsecc.compile(model, example_inputs, recipe=sparsecc.Recipe())
"""

from sparsecc import errors
from sparsecc.api import Report, SparseModel, compile, inspect
from sparsecc.capture import capture
from sparsecc.recipe import Identity, Recipe, SparseFFN, Spion, TokenFlow

__version__ = "0.1.0"

__all__ = ["compile", "inspect", "capture", "Recipe", "Identity", "Spion", "SparseFFN", "TokenFlow", "SparseModel", "Report", "errors",
           "__version__"]

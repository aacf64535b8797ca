"""sparsecc: make Transformers cheaper by rewriting their graphs into sparse operators.

    import sparsecc
    report = sparsecc.inspect(model, example_inputs)
    sm = sparsecc.compile(model, example_inputs, recipe=sparsecc.Recipe(attention=sparsecc.Spion()),
                          calibration=batches)
    sparsecc.save(sm, "out/model"); sm2 = sparsecc.load("out/model")
    dec = sparsecc.compile_decoder(hf_causal_lm, max_len=256); dec.generate(input_ids, max_new_tokens=20)
"""

from sparsecc import errors
from sparsecc.api import compile, inspect
from sparsecc.capture import capture
from sparsecc.causal_lm import CompiledCausalLM, compile_decoder
from sparsecc.methods import Plan, register
from sparsecc.methods.fixed import Fixed
from sparsecc.methods.identity import Identity
from sparsecc.methods.sparse_ffn import SparseFFN
from sparsecc.methods.spion import Spion
from sparsecc.methods.token_flow import TokenFlow
from sparsecc.model import SparseModel
from sparsecc.recipe import Recipe
from sparsecc.report import Report
from sparsecc.saving import load, save
from sparsecc.train.finetune import finetune
from sparsecc.tune import Budget, TuneResult, tune
from sparsecc.version import __version__

__all__ = ["compile", "compile_decoder", "CompiledCausalLM", "finetune", "tune", "Budget", "TuneResult", "inspect", "capture", "Recipe", "Identity", "Spion", "Fixed", "SparseFFN", "TokenFlow",
           "SparseModel", "Report", "Plan", "register", "save", "load", "errors", "__version__"]

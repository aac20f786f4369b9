"""Safe persistence of fitted estimators: :func:`save` and :func:`load`.

The file is a zip archive holding

* ``manifest.json`` -- format version, the versions of the library, Python,
  scikit-learn, torch, numpy and skops that wrote it, and a description of the
  estimator (class, aggregator, base models, classes, features);
* ``estimator.skops`` -- the estimator in skops' format, which rebuilds objects
  from their recorded state and refuses any type it is not told to trust, so
  loading runs no code chosen by the file's author (unlike ``pickle``);
* ``tensors/<key>.pt`` -- the weights of each ``torch.nn.Module`` base model,
  written with ``torch.save`` and read back with ``torch.load(weights_only=True)``,
  which accepts tensors and plain containers only.

skops knows neither torch nor pandas objects, so before writing, every torch
module, tensor, device and dtype and every pandas object in the estimator is
replaced by a plain description (a dict of strings and numpy arrays) and rebuilt
from it on load. A module's *code* is never stored: the user hands the loader
an instance of the architecture (``modules={"net": Net()}``) and the saved
weights are loaded into it.
"""

from __future__ import annotations

import copy
import io
import json
import os
import platform
import tempfile
import warnings
import zipfile
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from sklearn.utils.validation import check_is_fitted

from base_models import CallableModel, TorchModel, resolve_device

__all__ = [
    "DeployVersionWarning", "UnsafeModelError", "load", "place_on_device", "read_manifest", "save",
]

FORMAT = 1
_MARK = "__hyperagg_object__"  # key of the dicts that stand in for torch / pandas objects
_TRUSTED_ROOTS = ("aggregators", "base_models", "sklearn", "numpy")
_VERSIONED = ("hyperagg", "scikit-learn", "torch", "numpy", "skops")


class UnsafeModelError(TypeError):
    """The model holds something that cannot be saved or loaded safely."""


class DeployVersionWarning(UserWarning):
    """A saved model is loaded with other library versions than it was saved with."""


def _versions() -> dict:
    out = {"python": platform.python_version()}
    for dist in _VERSIONED:
        try:
            out[dist] = version(dist)
        except PackageNotFoundError:  # a source checkout that was never installed
            out[dist] = "unknown"
    return out


def _qualname(obj) -> str:
    cls = obj if isinstance(obj, type) else type(obj)
    return f"{cls.__module__}.{cls.__qualname__}"


# -- walking an object graph ------------------------------------------------------
def _children(obj):
    """The objects directly held by ``obj`` (containers and instance attributes)."""
    if isinstance(obj, dict):
        return list(obj.values())
    if isinstance(obj, (list, tuple, set, frozenset)):
        return list(obj)
    if isinstance(obj, (str, bytes, np.ndarray, type)) or not hasattr(obj, "__dict__"):
        return []
    return list(vars(obj).values())


def _find(root, stop) -> list:
    """Every object under ``root`` (depth first, each once) for which ``stop`` is true.

    The walk does not descend into such objects.
    """
    found, seen, stack = [], set(), [root]
    while stack:
        obj = stack.pop()
        if id(obj) in seen:
            continue
        seen.add(id(obj))
        if stop(obj):
            found.append(obj)
            continue
        stack.extend(reversed(_children(obj)))
    return found


def _is_special(obj) -> bool:
    return isinstance(
        obj,
        (torch.nn.Module, torch.Tensor, torch.device, torch.dtype,
         pd.DataFrame, pd.Series, pd.Index),
    ) or isinstance(obj, CallableModel)


# -- torch and pandas objects as plain descriptions -------------------------------
def _describe_index(index: pd.Index) -> dict:
    if isinstance(index, pd.RangeIndex):
        return {_MARK: "range_index", "start": index.start, "stop": index.stop,
                "step": index.step, "name": index.name}
    if isinstance(index, pd.MultiIndex):
        raise UnsafeModelError("a pandas MultiIndex inside the model cannot be saved.")
    return {_MARK: "index", "values": _plain_array(index.to_numpy()),
            "dtype": str(index.dtype), "name": index.name}


def _plain_array(a: np.ndarray) -> np.ndarray:
    a = np.asarray(a)
    if a.dtype == object:
        # skops stores object arrays element by element; strings and numbers
        # are kept, anything else would need trusting, so it is refused here.
        for v in a.ravel()[:1000]:
            if not isinstance(v, (str, int, float, bool, np.generic, type(None))):
                raise UnsafeModelError(
                    f"an object array in the model holds a {type(v).__name__}, "
                    "which cannot be saved safely."
                )
    return a


def _describe(obj, module_keys: dict):
    if isinstance(obj, torch.nn.Module):
        return {_MARK: "torch_module", "key": module_keys[id(obj)], "class": _qualname(obj)}
    if isinstance(obj, torch.Tensor):
        t = obj.detach().cpu()
        # numpy has no bfloat16: such a tensor travels as float32 (exactly).
        data = t.float().numpy() if t.dtype == torch.bfloat16 else t.numpy()
        return {_MARK: "tensor", "dtype": str(t.dtype).removeprefix("torch."), "data": data}
    if isinstance(obj, torch.device):
        return {_MARK: "device", "value": str(obj)}
    if isinstance(obj, torch.dtype):
        return {_MARK: "dtype", "value": str(obj).removeprefix("torch.")}
    if isinstance(obj, pd.DataFrame):
        return {_MARK: "frame", "index": _describe_index(obj.index),
                "columns": _describe_index(obj.columns),
                "data": [_plain_array(obj.iloc[:, j].to_numpy()) for j in range(obj.shape[1])],
                "dtypes": [str(d) for d in obj.dtypes]}
    if isinstance(obj, pd.Series):
        return {_MARK: "series", "index": _describe_index(obj.index),
                "data": _plain_array(obj.to_numpy()), "dtype": str(obj.dtype),
                "name": obj.name}
    if isinstance(obj, pd.Index):
        return _describe_index(obj)
    raise UnsafeModelError(
        f"{type(obj).__name__} runs arbitrary code, which cannot be saved safely: "
        "a CallableModel (a plain function) cannot be saved. Store its predictions "
        "(PrecomputedModel), or wrap the logic in a scikit-learn estimator or a "
        "torch.nn.Module, and save that."
    )


def _rebuild(desc: dict, modules: dict):
    kind = desc[_MARK]
    if kind == "torch_module":
        return modules[desc["key"]]
    if kind == "tensor":
        return torch.as_tensor(desc["data"]).to(getattr(torch, desc["dtype"]))
    if kind == "device":
        return torch.device(desc["value"])
    if kind == "dtype":
        return getattr(torch, desc["value"])
    if kind == "range_index":
        return pd.RangeIndex(desc["start"], desc["stop"], desc["step"], name=desc["name"])
    if kind == "index":
        return pd.Index(desc["values"], dtype=desc["dtype"], name=desc["name"])
    if kind == "series":
        return pd.Series(desc["data"], index=_rebuild(desc["index"], modules),
                         dtype=desc["dtype"], name=desc["name"])
    if kind == "frame":
        columns = _rebuild(desc["columns"], modules)
        index = _rebuild(desc["index"], modules)
        data = {
            j: pd.Series(col, index=index, dtype=dtype)
            for j, (col, dtype) in enumerate(zip(desc["data"], desc["dtypes"]))
        }
        frame = pd.DataFrame(data, index=index)
        frame.columns = columns
        return frame
    raise ValueError(f"the model file describes an unknown object kind {kind!r}.")


def _restore(root, rebuild):
    """Replace, in place, every description under ``root`` by the object it describes."""
    done: dict[int, object] = {}

    def visit(obj):
        if id(obj) in done:
            return done[id(obj)]
        if isinstance(obj, dict) and _MARK in obj:
            new = rebuild(obj)
            done[id(obj)] = new
            return new
        done[id(obj)] = obj
        if isinstance(obj, dict):
            for k, v in obj.items():
                obj[k] = visit(v)
        elif isinstance(obj, list):
            obj[:] = [visit(v) for v in obj]
        elif isinstance(obj, tuple):
            new = tuple(visit(v) for v in obj)
            if any(a is not b for a, b in zip(new, obj)):
                new = type(obj)(*new) if hasattr(obj, "_fields") else type(obj)(new)
                done[id(obj)] = new
                return new
        elif hasattr(obj, "__dict__") and not isinstance(obj, (type, np.ndarray)):
            state = vars(obj)
            for k, v in list(state.items()):
                state[k] = visit(v)
        return obj

    return visit(root)


# -- describing the estimator -----------------------------------------------------
def estimator_summary(est) -> dict:
    """A JSON-able description of a fitted estimator (the manifest's summary)."""
    agg = getattr(est, "aggregator_", None)
    out = {
        "estimator": _qualname(est),
        "aggregator": None if agg is None else type(agg).__name__,
        "base_models": {
            name: type(getattr(m, "estimator", getattr(m, "module", m))).__name__
            for name, m in getattr(est, "base_models_", {}).items()
        },
        "n_features_in": int(getattr(est, "n_features_in_", 0)),
        "feature_names_in": [str(c) for c in getattr(est, "feature_names_in_", [])] or None,
    }
    if hasattr(est, "classes_"):
        out["classes"] = [c.item() if isinstance(c, np.generic) else c for c in est.classes_]
    if hasattr(est, "n_outputs_") and not hasattr(est, "classes_"):
        out["n_outputs"] = int(est.n_outputs_)
    hyper = getattr(est, "hyperparams_", None)
    if isinstance(hyper, dict):
        out["hyperparams"] = {
            k: (v.to_dict() if isinstance(v, pd.Series) else np.asarray(v).tolist())
            for k, v in hyper.items()
        }
    return json.loads(json.dumps(out, default=str))


def _module_keys(est, modules: list) -> dict:
    """A stable, readable key per torch module: its base model's name where it is one."""
    keys = {}
    for name, model in getattr(est, "base_models_", {}).items():
        mod = getattr(model, "module", None)
        if isinstance(mod, torch.nn.Module) and id(mod) not in keys:
            keys[id(mod)] = str(name)
    extra = 0
    for mod in modules:
        if id(mod) not in keys:
            keys[id(mod)] = f"module{extra}"
            extra += 1
    return keys


def save(estimator, path) -> Path:
    """Save a fitted estimator to ``path`` in a format that loads without running code.

    Parameters
    ----------
    estimator : AggregatedClassifier or AggregatedRegressor
        A fitted estimator (for a search, its ``best_estimator_``). Base models
        may be fitted scikit-learn estimators and pipelines,
        :class:`~base_models.PrecomputedModel` and torch modules; a
        :class:`~base_models.CallableModel` cannot be saved safely.
    path : str or path-like
        Where to write. The file appears complete or not at all: it is written
        next to ``path`` under a temporary name and moved into place.

    Returns
    -------
    pathlib.Path
        The path written.

    Raises
    ------
    UnsafeModelError
        If the model holds a plain function or another object whose saving
        would mean storing code.

    Examples
    --------
    >>> from aggregators import save, load  # doctest: +SKIP
    >>> save(clf, "ensemble.hyperagg"); clf2 = load("ensemble.hyperagg")  # doctest: +SKIP
    """
    import skops.io as sio  # noqa: PLC0415 (imported when used)

    if hasattr(estimator, "best_estimator_") and not hasattr(estimator, "aggregator_"):
        estimator = estimator.best_estimator_
    check_is_fitted(estimator)
    special = _find(estimator, _is_special)
    modules = [o for o in special if isinstance(o, torch.nn.Module)]
    keys = _module_keys(estimator, modules)
    # deepcopy with a pre-seeded memo swaps each special object for its
    # description wherever it is referenced, and copies nothing else twice.
    memo = {id(o): _describe(o, keys) for o in special}
    safe = copy.deepcopy(estimator, memo)
    tensors = {}
    for mod in modules:
        buf = io.BytesIO()
        state = {k: v.detach().cpu() for k, v in mod.state_dict().items()}
        torch.save(state, buf)
        tensors[keys[id(mod)]] = (buf.getvalue(), _qualname(mod))
    manifest = {
        "format": FORMAT,
        "versions": _versions(),
        "summary": estimator_summary(estimator),
        "torch_modules": {k: cls for k, (_, cls) in tensors.items()},
    }
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent or ".")
    try:
        with os.fdopen(fd, "wb") as fh, zipfile.ZipFile(fh, "w", zipfile.ZIP_DEFLATED) as zf:
            zf.writestr("manifest.json", json.dumps(manifest, indent=1))
            zf.writestr("estimator.skops", sio.dumps(safe))
            for key, (blob, _) in tensors.items():
                zf.writestr(f"tensors/{key}.pt", blob)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def read_manifest(path) -> dict:
    """The manifest of a saved model (versions and a summary), without loading it."""
    try:
        with zipfile.ZipFile(path) as zf:
            return json.loads(zf.read("manifest.json"))
    except (zipfile.BadZipFile, KeyError) as e:
        raise ValueError(f"{path} is not a model saved by aggregators.save.") from e


def _check_versions(saved: dict) -> None:
    now = _versions()
    diff = [
        f"{k} {saved[k]} -> {now.get(k)}"
        for k in _VERSIONED
        if k in saved and saved[k] != now.get(k)
    ]
    if diff:
        warnings.warn(
            "this model was saved with other versions than are installed here ("
            + ", ".join(diff)
            + "); its predictions may differ. Refit, or install the saved versions.",
            DeployVersionWarning,
            stacklevel=3,
        )


def _allowed(type_name: str) -> bool:
    return type_name.split(".", 1)[0] in _TRUSTED_ROOTS


def load(path, trusted=None, *, modules=None, device="auto"):
    """Load an estimator written by :func:`save`, running no code from the file.

    Parameters
    ----------
    path : str or path-like
        A file written by :func:`save`.
    trusted : list of str, default=None
        Further types to allow, by their full name (``"mypackage.MyAggregator"``).
        The library's own types, scikit-learn's and numpy's are allowed; any
        other type in the file is refused with an error that lists it.
    modules : dict of str to torch.nn.Module, default=None
        For each torch base model (by its name in ``estimators``), a module of
        the same architecture: the saved weights are loaded into it. A
        zero-argument callable returning one (e.g. the class) also works. The
        file stores weights, never code, so the architecture must come from you.
    device : {"auto", "cpu", "cuda"} or torch.device, default="auto"
        Where the aggregator's tensors go at predict time. ``"auto"`` keeps the
        device the model was fitted on when it is available here and uses the
        CPU otherwise, so a model fitted on a GPU predicts on a CPU-only machine.

    Returns
    -------
    estimator
        The fitted estimator.

    Raises
    ------
    UnsafeModelError
        If the file holds types that are not trusted (they are listed), or a
        torch base model whose module was not given.
    """
    import skops.io as sio  # noqa: PLC0415

    manifest = read_manifest(path)
    if manifest.get("format") != FORMAT:
        raise ValueError(
            f"{path} has format {manifest.get('format')!r}; this version reads format {FORMAT}."
        )
    with zipfile.ZipFile(path) as zf:
        blob = zf.read("estimator.skops")
        weights = {
            n.removeprefix("tensors/").removesuffix(".pt"): zf.read(n)
            for n in zf.namelist() if n.startswith("tensors/")
        }
    _check_versions(manifest.get("versions", {}))
    untrusted = sio.get_untrusted_types(data=blob)
    extra = set(trusted or ())
    refused = sorted(t for t in untrusted if not _allowed(t) and t not in extra)
    if refused:
        raise UnsafeModelError(
            f"{path} holds types that are not trusted: {refused}. Loading them could "
            "run their code; if you trust this file, pass trusted="
            f"{refused!r} to load."
        )
    est = sio.loads(blob, trusted=list(untrusted))

    wanted = manifest.get("torch_modules", {})
    given = dict(modules or {})
    missing = sorted(set(wanted) - set(given))
    if missing:
        raise UnsafeModelError(
            "the model has torch base models whose architecture must be supplied: "
            + ", ".join(f"{k!r} ({wanted[k]})" for k in missing)
            + ". The file holds their weights, not their code: pass modules={"
            + ", ".join(f"{k!r}: {wanted[k].rsplit('.', 1)[-1]}(...)" for k in missing)
            + "} to load."
        )
    built = {}
    for key, cls in wanted.items():
        mod = given[key]
        if not isinstance(mod, torch.nn.Module) and callable(mod):
            mod = mod()
        if not isinstance(mod, torch.nn.Module):
            raise TypeError(f"modules[{key!r}] must be a torch.nn.Module; got {type(mod).__name__}.")
        state = torch.load(io.BytesIO(weights[key]), map_location="cpu", weights_only=True)
        try:
            mod.load_state_dict(state)
        except RuntimeError as e:
            raise ValueError(
                f"the module given for {key!r} does not match the saved weights of a {cls}: {e}"
            ) from e
        built[key] = mod.eval()
    est = _restore(est, lambda d: _rebuild(d, built))

    return place_on_device(est, device)


def place_on_device(est, device="auto"):
    """Point a fitted estimator's predictions at ``device``; returns ``est``.

    ``"auto"`` keeps the device it was fitted on where that exists here and
    takes the CPU otherwise (a model fitted on a GPU, loaded on a laptop).
    """
    target = resolve_device(device)
    fitted_on = getattr(est, "device_", None)
    if isinstance(fitted_on, torch.device):
        if device == "auto" and (fitted_on.type != "cuda" or torch.cuda.is_available()):
            target = fitted_on
        est.device_ = target
    for model in getattr(est, "base_models_", {}).values():
        # A torch base model pinned to a GPU that this machine lacks runs on the CPU.
        if (isinstance(model, TorchModel) and model.device != "auto"
                and torch.device(model.device).type == "cuda" and not torch.cuda.is_available()):
            model.device = str(target)
    return est

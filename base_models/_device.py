"""Numpy at the boundary, torch inside: the one place that converts between them."""

from __future__ import annotations

from contextlib import contextmanager

import numpy as np
import torch

__all__ = ["resolve_device", "resolve_dtype", "small_problem_threads", "to_numpy", "to_tensor"]

_DTYPES = {"float32": torch.float32, "float64": torch.float64}


def resolve_device(device) -> torch.device:
    """Turn ``"auto"`` into CUDA when available, else CPU; pass others to torch.

    Parameters
    ----------
    device : str or torch.device
        ``"auto"``, ``"cpu"``, ``"cuda"``, ``"cuda:1"``, ...

    Returns
    -------
    torch.device

    Raises
    ------
    ValueError
        For a string torch cannot parse, or a CUDA device without CUDA.

    Examples
    --------
    >>> import torch
    >>> from base_models import resolve_device
    >>> resolve_device("cpu")
    device(type='cpu')
    """
    if isinstance(device, torch.device):
        return device
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(
            f"device must be 'auto', 'cpu', 'cuda' or a torch.device; got {device!r}."
        ) from e
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(
            f"device={device!r} was asked for but CUDA is not available; "
            "use device='auto' to fall back to the CPU."
        )
    return dev


def resolve_dtype(dtype) -> torch.dtype:
    """Map ``"float32"`` / ``"float64"`` (or a torch / numpy float dtype) to torch.

    Parameters
    ----------
    dtype : {"float32", "float64"}, torch.dtype or numpy float dtype
        Integer and other non-floating dtypes are refused: parameters and
        hypergradients need a floating-point type.

    Returns
    -------
    torch.dtype

    Examples
    --------
    >>> from base_models import resolve_dtype
    >>> resolve_dtype("float64")
    torch.float64
    """
    if isinstance(dtype, torch.dtype):
        if not dtype.is_floating_point:
            raise ValueError(f"dtype must be a floating-point type; got {dtype!r}.")
        return dtype
    try:
        # np.dtype(None) would quietly mean float64.
        if dtype is None:
            raise TypeError
        key = dtype if isinstance(dtype, str) else np.dtype(dtype).name
        return _DTYPES[key]
    except (KeyError, TypeError) as e:
        raise ValueError(f"dtype must be 'float32' or 'float64'; got {dtype!r}.") from e


def to_tensor(a, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """Copy an array-like to ``device`` once, as ``dtype``."""
    if isinstance(a, torch.Tensor):
        return a.to(device=device, dtype=dtype)
    arr = np.asarray(a)
    if not arr.flags.writeable:
        # torch cannot share read-only memory (pandas' values, memory maps):
        # it would warn and share it anyway; one explicit copy is what it needs.
        arr = arr.copy()
    return torch.as_tensor(arr, dtype=dtype, device=device)


def to_numpy(t) -> np.ndarray:
    """Detach a tensor and bring it to host memory as a numpy array."""
    if isinstance(t, torch.Tensor):
        return t.detach().cpu().numpy()
    return np.asarray(t)


#: Below this many elements per tensor, intra-op threads cost more than they save.
SMALL_PROBLEM = 1_000_000


@contextmanager
def small_problem_threads(numel: int, device: torch.device):
    """Run a block of many tiny CPU tensor ops on one thread, then restore.

    On tensors of a few thousand elements, torch's intra-op thread pool only
    adds synchronisation; when another process holds a core (a parallel grid
    search, a second job) it can make each op orders of magnitude slower. Large
    problems and GPU work keep the user's setting.
    """
    if device.type != "cpu" or numel >= SMALL_PROBLEM:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)

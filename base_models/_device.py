"""Numpy at the boundary, torch inside: the one place that converts between them."""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["resolve_device", "resolve_dtype", "to_numpy", "to_tensor"]

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
    """Map ``"float32"`` / ``"float64"`` (or a torch dtype) to a torch dtype."""
    if isinstance(dtype, torch.dtype):
        return dtype
    try:
        return _DTYPES[dtype]
    except (KeyError, TypeError) as e:
        raise ValueError(f"dtype must be 'float32' or 'float64'; got {dtype!r}.") from e


def to_tensor(a, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """Copy an array-like to ``device`` once, as ``dtype``."""
    if isinstance(a, torch.Tensor):
        return a.to(device=device, dtype=dtype)
    return torch.as_tensor(np.asarray(a), dtype=dtype, device=device)


def to_numpy(t) -> np.ndarray:
    """Detach a tensor and bring it to host memory as a numpy array."""
    if isinstance(t, torch.Tensor):
        return t.detach().cpu().numpy()
    return np.asarray(t)

"""Trained ``torch.nn.Module`` instances as frozen base models."""

from __future__ import annotations

from numbers import Integral

import numpy as np
import torch
from torch.nn.parameter import is_lazy

from ._base import BaseModel, UnfittedBaseModelError, task_of_output
from ._device import resolve_device, resolve_dtype

__all__ = ["TorchModel"]

_OUTPUTS = ("logits", "proba", "value")


class TorchModel(BaseModel):
    """A trained torch module used as a frozen base model.

    The module is called in eval mode, without gradients, on batches of rows
    moved to ``device``; its training mode is restored afterwards.

    Parameters
    ----------
    module : torch.nn.Module
        A trained module mapping a float tensor ``(batch, n_features)`` to
        ``(batch, n_outputs)`` (or ``(batch,)``).
    output : {"logits", "proba", "value"}, default="logits"
        What the module returns: class logits, class probabilities, or
        regression values.
    classes : array-like, default=None
        Class labels of the output columns; ``0 .. n_outputs-1`` when omitted.
    batch_size : int, default=8192
        Rows per forward pass.
    device : str, default="auto"
        Where the module runs; ``"auto"`` picks CUDA when available.
    dtype : {"float32", "float64"} or torch.dtype, default=None
        dtype the input rows are cast to; ``None`` takes the dtype of the
        module's floating-point parameters (float32 for a module without any).

    Examples
    --------
    >>> import numpy as np, torch
    >>> from base_models import TorchModel
    >>> net = torch.nn.Linear(4, 3)
    >>> TorchModel(net, output="logits").predict_raw(np.zeros((5, 4))).shape
    (5, 3)
    """

    def __init__(
        self,
        module,
        *,
        output: str = "logits",
        classes=None,
        batch_size: int = 8192,
        device="auto",
        dtype=None,
    ):
        if isinstance(module, type):
            raise TypeError(
                f"TorchModel got the class {module.__name__}, not a trained "
                "instance of it: build and train the module, then pass it."
            )
        if not isinstance(module, torch.nn.Module):
            raise TypeError(f"TorchModel needs a torch.nn.Module; got {type(module)}.")
        if output not in _OUTPUTS:
            raise ValueError(f"output must be one of {_OUTPUTS}; got {output!r}.")
        self.module = module
        self.output = output
        self.task = task_of_output(output)
        self.classes_ = None if classes is None else np.asarray(classes)
        if isinstance(batch_size, bool) or not isinstance(batch_size, Integral) or (
            batch_size < 1
        ):
            raise ValueError(
                f"batch_size must be a positive integer; got {batch_size!r}."
            )
        self.batch_size = int(batch_size)
        self.device = device
        self.dtype = None if dtype is None else resolve_dtype(dtype)

    def check_fitted(self) -> None:
        for name, p in list(self.module.named_parameters()) + list(
            self.module.named_buffers()
        ):
            if is_lazy(p):
                raise UnfittedBaseModelError(
                    f"torch module {type(self.module).__name__} is not fitted: its "
                    f"parameter {name!r} is still uninitialised (lazy). Train it "
                    "before passing it as a base model."
                )
            if p.is_floating_point() and not torch.isfinite(p).all():
                raise UnfittedBaseModelError(
                    f"torch module {type(self.module).__name__} has non-finite "
                    f"values in {name!r}: it cannot be used as a base model."
                )

    def predict_raw(self, X) -> np.ndarray:
        self.check_fitted()
        if hasattr(X, "to_numpy"):
            X = X.to_numpy()
        X = np.asarray(X)
        device = resolve_device(self.device)
        dtype = self._input_dtype()
        # Each submodule's own flag, not just the top one: a user may keep
        # e.g. a frozen BatchNorm in eval mode inside a module in train mode.
        modes = [(m, m.training) for m in self.module.modules()]
        # Move the module for the call; it goes back where it was after.
        first = next(self.module.parameters(), None)
        home = first.device if first is not None else device
        self.module.to(device).eval()
        outs = []
        try:
            with torch.no_grad():
                for start in range(0, len(X), self.batch_size):
                    # torch.tensor copies: X may be a read-only view (pandas
                    # copy-on-write), which torch.as_tensor warns about.
                    xb = torch.tensor(X[start : start + self.batch_size], dtype=dtype)
                    xb = xb.to(device, non_blocking=True)
                    outs.append(self.module(xb).reshape(len(xb), -1).double())
        finally:
            self.module.to(home)
            for m, training in modes:
                m.training = training
        if not outs:
            return np.zeros((0, 1))
        return torch.cat(outs).cpu().numpy()

    @property
    def method_called(self) -> str:
        """``"<ModuleClass>.forward"``, as error messages name it."""
        return f"{type(self.module).__name__}.forward"

    def _input_dtype(self) -> torch.dtype:
        if self.dtype is not None:
            return self.dtype
        for p in self.module.parameters():
            if p.is_floating_point():
                return p.dtype
        return torch.float32

    def _describe(self) -> str:
        return f"{type(self.module).__name__}, output={self.output!r}"

"""Short names of aggregation functions (``aggregator="stacking"``)."""

from __future__ import annotations

from sklearn.base import clone

from ._base import Aggregator

__all__ = ["available_aggregators", "resolve_aggregator"]


def available_aggregators() -> dict[str, type]:
    """Every :class:`Aggregator` subclass that declares a ``short_name``."""
    found: dict[str, type] = {}
    stack = list(Aggregator.__subclasses__())
    while stack:
        cls = stack.pop()
        stack.extend(cls.__subclasses__())
        name = cls.__dict__.get("short_name")
        if name:
            found[name] = cls
    return found


def resolve_aggregator(spec) -> Aggregator:
    """A fresh (cloned) aggregation function from a short name or an instance."""
    if isinstance(spec, str):
        if spec == "auto":
            raise ValueError(
                "aggregator='auto' is a choice the estimators make among aggregation "
                "functions (AggregatedClassifier / AggregatedRegressor), not one of them; "
                f"here, name one of {sorted(available_aggregators())}."
            )
        table = available_aggregators()
        if spec not in table:
            raise ValueError(
                f"unknown aggregator {spec!r}; choose 'auto' (the estimators' default) "
                f"or one of {sorted(table)}, or pass an Aggregator instance."
            )
        return table[spec]()
    if isinstance(spec, Aggregator):
        return clone(spec)
    raise TypeError(
        f"aggregator must be a short name or an Aggregator instance; got {type(spec).__name__}."
    )

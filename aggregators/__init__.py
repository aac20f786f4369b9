"""Learnable ensemble aggregation with hypergradient-tuned hyperparameters.

Estimators
----------
AggregatedClassifier, AggregatedRegressor
    scikit-learn estimators over a pool of base models.

Aggregation functions
---------------------
Stacking, LearnedWeights, Choquet, Sugeno, Uninorm, LAF, SparseMoE, GreedySelection
    (and ModelSelection, which learns a subset of models around any of them)
    Each declares its parameters, hyperparameters and forward pass
    (see :class:`Aggregator` and the README's "Write your own aggregator").

Search
------
HypergradSearchCV
    ``GridSearchCV``'s interface; continuous dimensions solved by hypergradient.

Deploy
------
save, load, score_file, score_dask
    Safe model files, batch scoring of Parquet/CSV files, Dask past one machine
    (:mod:`aggregators.deploy`; the ``hyperagg`` command).

The hypergradient engine lives in :mod:`aggregators.hypergrad`.
"""

from ._base import AggregationContext, Aggregator, Hyperparameter
from ._estimators import AggregatedClassifier, AggregatedRegressor, HypergradientWarning
from ._registry import available_aggregators
from .search import HypergradSearchCV
from .choquet import Choquet
from .greedy import GreedySelection
from .laf import LAF
from .moe import SparseMoE
from .selection import ModelSelection
from .sugeno import Sugeno
from .uninorm import Uninorm
from .stacking import Stacking
from .weights import LearnedWeights
from .deploy import load, save, score_dask, score_file

__version__ = "0.1.0"

__all__ = [
    "AggregatedClassifier",
    "AggregatedRegressor",
    "AggregationContext",
    "Choquet",
    "Aggregator",
    "GreedySelection",
    "HypergradSearchCV",
    "HypergradientWarning",
    "LAF",
    "Hyperparameter",
    "LearnedWeights",
    "ModelSelection",
    "SparseMoE",
    "Stacking",
    "Sugeno",
    "Uninorm",
    "available_aggregators",
    "load",
    "save",
    "score_dask",
    "score_file",
]

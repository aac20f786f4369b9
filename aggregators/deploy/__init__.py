"""Deploy a fitted estimator: safe files, batch scoring, and Dask past one machine.

This package uses a fitted estimator through its public surface (``predict``,
``predict_proba``, ``classes_``, ``feature_names_in_``, ``n_features_in_``,
``base_models_``, ``device_``) and never its private helpers.

* :func:`save` / :func:`load` -- a zip of a skops file, torch weights and a manifest;
* :func:`score_file` -- Parquet/CSV in, Parquet/CSV out, chunked, atomic, resumable;
* :func:`score_dask` -- the same over a ``dask.dataframe``;
* :mod:`aggregators.deploy.cli` -- the ``hyperagg`` command.
"""

from ._dask import score_dask
from ._persist import DeployVersionWarning, UnsafeModelError, load, read_manifest, save
from ._score import ScoreReport, score_file

__all__ = [
    "DeployVersionWarning",
    "ScoreReport",
    "UnsafeModelError",
    "load",
    "read_manifest",
    "save",
    "score_dask",
    "score_file",
]

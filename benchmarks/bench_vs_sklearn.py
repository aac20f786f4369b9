"""hyperagg's default and stacking against scikit-learn's tuned stacking and other peers.

Issue 20 (item 3) and issue 14 (item 7). Per dataset and seed: a 40 / 30 /
30 split (stratified for classification); the first 40 % trains a pool of
frozen models, the next 30 % (the *aggregation rows*) is all any method
sees, the last 30 % is the test set. Every method runs side by side in this
one process, on the same frozen pool, with one torch thread by default.

================================  ============================================
dataset                           task, pool
================================  ============================================
breast_cancer, wine, digits       classification (log-loss), six classifiers
synth5                            ``make_classification``, 5 classes, 4 000
                                  rows (1 200 aggregation rows;
                                  ``--synth5-rows 20000`` gives issue 20's
                                  6 000, too slow for 5 seeds on a loaded
                                  2-core machine), eight classifiers cheap
                                  to predict
diabetes, friedman1               regression (RMSE), six regressors;
                                  friedman1 has 2 000 rows (600 aggregation)
================================  ============================================

Methods (classification / regression):

=============================  ===============================================
ours: default                  ``AggregatedClassifier(pool, random_state=seed)``
                               (``AggregatedRegressor``): no ``aggregator``
                               argument, whatever the library's default is
ours: stacking                 ``aggregator="stacking"``, tuned (its defaults)
ours: stacking untuned         the same with ``hyperparams="fixed"``
ours: weights                  ``aggregator="weights"``
ours: choquet                  with ``--choquet`` (classification only)
best single                    lowest loss on the aggregation rows
Caruana (50 rounds)            greedy selection with replacement
convex weights (L-BFGS)        softmax weights, untuned
LRCV / RidgeCV stacking        ``StackingClassifier(pool, cv="prefit",
                               final_estimator=LogisticRegressionCV(Cs=20,
                               cv=5, scoring="neg_log_loss"))`` /
                               ``StackingRegressor`` with ``RidgeCV`` over 20
                               alphas in [1e-4, 1e4] (closed-form LOO)
bbai stacking                  the same with bbai's ``LogisticRegression`` /
                               ``RidgeRegression`` (approximate / exact LOO,
                               Burn 2020); skipped with a note without bbai
GridSearchCV (prefit)          ``GridSearchCV`` over the final estimator's C
                               (alpha): 20 values in [1e-4, 1e4], 5 folds,
                               ``cv="prefit"`` stacking: 100 fits + refit
GridSearchCV (cv=5)            the same around a stacking with its default
                               ``cv`` (5-fold ``cross_val_predict`` of the
                               pool in every fit)
Optuna                         seeded TPE over C (alpha), 5-fold CV + refit
=============================  ===============================================

BLAS, OpenMP and torch run one thread each (``threadpoolctl``), as in issue
20's protocol. Every fit time runs from the raw aggregation rows to a fitted ensemble, so it
includes the pool's predictions on those rows (the peers on stored
probabilities predict with the pool inside their timing too). Fits under 1 s
are repeated (``--repeats``, median reported). The two costliest peers,
GridSearchCV (cv=5) and Optuna, run on the first ``--costly-seeds`` seeds
only (default 1): their losses equal the prefit grid's up to the search, and
one run gives their time; the tables say on how many seeds each row ran.

Output: per dataset the mean test loss and mean fit time over the seeds (with
their standard deviation), the ratios issue 20 asks for (our stacking's time
over LRCV's / RidgeCV's and its loss against it, GridSearchCV (cv=5)'s time
over ours, tuned over untuned, weights over Caruana) and issue 14's summary:
is the default at or below the best single model, Caruana and the grid-tuned
stacking (1 % tolerance), and is its fit no slower than the grid.

Run: ``python benchmarks/bench_vs_sklearn.py [--quick] [--seeds 0 1 2 3 4]
[--datasets wine digits ...] [--out results.md] [--choquet]``. The default
(5 seeds, all six datasets) used about 6 minutes of CPU; it took 46 minutes
of wall time on a 2-core machine at load 12-16 (other jobs), so run it on a quiet one;
``--quick`` (2 seeds, smaller synth5 and friedman1, fewer Optuna trials) a few.
Before the closing-note run, check the total it prints.
The header records the library commit and the load average: timings on a
shared machine compare only within one run.

The names ``DATASETS``, ``load``, ``split``, ``pretrained_pool``,
``pool_proba``, ``library_version`` and ``warm_up`` are imported by the other
benchmarks and keep their meaning (``DATASETS``: the four classification sets
they use, ``synthetic`` being a 3 000-row version of ``synth5``).
"""

from __future__ import annotations

import argparse
import importlib.util
import io
import math
import os
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn import datasets
from sklearn.base import clone
from sklearn.calibration import CalibratedClassifierCV
from sklearn.discriminant_analysis import LinearDiscriminantAnalysis
from sklearn.ensemble import (
    ExtraTreesClassifier,
    GradientBoostingRegressor,
    RandomForestClassifier,
    RandomForestRegressor,
    StackingClassifier,
    StackingRegressor,
)
from sklearn.frozen import FrozenEstimator
from sklearn.linear_model import LogisticRegression, LogisticRegressionCV, Ridge, RidgeCV
from sklearn.metrics import log_loss
from sklearn.model_selection import GridSearchCV, cross_val_score, train_test_split
from sklearn.naive_bayes import GaussianNB
from sklearn.neighbors import KNeighborsClassifier, KNeighborsRegressor
from sklearn.neural_network import MLPClassifier
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.svm import SVC, SVR
from sklearn.tree import DecisionTreeClassifier, DecisionTreeRegressor
from threadpoolctl import threadpool_limits

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _peers import (  # noqa: E402
    BbaiLogisticClassifier,
    BbaiRidgeRegressor,
    bbai_available,
    best_single,
    best_single_sq,
    blend,
    caruana_selection,
    caruana_selection_sq,
    chosen_aggregator,
    convex_weights_sq,
    library_version,
    load_average,
    rmse,
    softmax_weights_lbfgs,
    timed,
    warm_up,
)

from aggregators import AggregatedClassifier, AggregatedRegressor  # noqa: E402

#: The classification sets the other benchmarks import (keep their meaning).
DATASETS = ("breast_cancer", "wine", "digits", "synthetic")
#: This benchmark's datasets and their task.
TASKS = {
    "breast_cancer": "cls", "wine": "cls", "digits": "cls", "synth5": "cls",
    "diabetes": "reg", "friedman1": "reg",
}
#: synth5's rows (30 % are aggregation rows); --synth5-rows changes it.
SYNTH5_ROWS = 4000
GRID = np.logspace(-4, 4, 20)  # C or alpha: 20 values, as issue 20 asks
DEFAULT = "ours: default"
STACKING = "ours: stacking"
UNTUNED = "ours: stacking untuned"
WEIGHTS = "ours: weights"
SINGLE = "best single"
CARUANA = "Caruana (50 rounds)"
CONVEX = "convex weights (L-BFGS)"
CV_STACK = "LRCV / RidgeCV stacking"
BBAI = "bbai stacking"
GRID_PREFIT = "GridSearchCV (prefit)"
GRID_CV = "GridSearchCV (cv=5)"
OPTUNA = "Optuna"
__all__ = ["DATASETS", "load", "main", "pool_proba", "pretrained_pool", "split"]


# -- data and pools ------------------------------------------------------------------
def load(
    name: str, quick: bool, seed: int, synth5_rows: int = SYNTH5_ROWS
) -> tuple[np.ndarray, np.ndarray]:
    """Features and target of a bundled or generated dataset."""
    if name in ("synthetic", "synth5"):
        n = 3000 if name == "synthetic" else (3000 if quick else synth5_rows)
        return datasets.make_classification(
            n_samples=n, n_features=20, n_informative=10, n_redundant=4, n_repeated=0,
            n_classes=5, n_clusters_per_class=2, flip_y=0.05, class_sep=1.0,
            random_state=seed,
        )
    if name == "friedman1":
        return datasets.make_friedman1(1000 if quick else 2000, noise=1.0, random_state=seed)
    if name not in TASKS and name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; choose from {sorted(TASKS)}")
    return getattr(datasets, f"load_{name}")(return_X_y=True)


def split(X, y, seed: int, stratify: bool = True):
    """40 % pool / 30 % aggregation / 30 % test (stratified for classes)."""
    X_pool, X_rest, y_pool, y_rest = train_test_split(
        X, y, train_size=0.4, stratify=y if stratify else None, random_state=seed
    )
    X_agg, X_test, y_agg, y_test = train_test_split(
        X_rest, y_rest, test_size=0.5, stratify=y_rest if stratify else None,
        random_state=seed,
    )
    return X_pool, y_pool, X_agg, y_agg, X_test, y_test


def pretrained_pool(X, y, seed: int) -> dict:
    """Six diverse classifiers, trained once on the pool rows."""
    pool = {
        "logreg": make_pipeline(StandardScaler(), LogisticRegression(max_iter=5000)),
        "naive_bayes": GaussianNB(),
        "knn": make_pipeline(StandardScaler(), KNeighborsClassifier(n_neighbors=10)),
        "tree": DecisionTreeClassifier(max_depth=5, random_state=seed),
        "forest": RandomForestClassifier(n_estimators=100, random_state=seed),
        # SVC(probability=True) is deprecated in scikit-learn 1.9; this is its
        # documented replacement (Platt scaling fitted on internal CV folds).
        "svc": make_pipeline(
            StandardScaler(), CalibratedClassifierCV(SVC(random_state=seed), ensemble=False)
        ),
    }
    return {name: model.fit(X, y) for name, model in pool.items()}


def large_pool(X, y, seed: int) -> dict:
    """Eight classifiers for synth5's pool rows, cheap to train and to predict.
    No SVC and no gradient boosting: their prediction on thousands of rows,
    repeated in each of the grid's 101 fits, would make the grid's time a
    measure of one model (a 5-class HistGradientBoosting took 43 s to train
    and 0.45 s to predict 6 000 rows here, under load). The k-NN is trained
    on a 2 000-row subsample: its prediction cost grows with its training rows."""
    pool = {
        "logreg": make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000)),
        "naive_bayes": GaussianNB(),
        "lda": LinearDiscriminantAnalysis(),
        "tree": DecisionTreeClassifier(max_depth=8, random_state=seed),
        "forest": RandomForestClassifier(n_estimators=50, max_depth=12, random_state=seed),
        "extra_trees": ExtraTreesClassifier(n_estimators=50, max_depth=12, random_state=seed),
        "knn_2k": make_pipeline(StandardScaler(), KNeighborsClassifier(n_neighbors=25)),
        "mlp": make_pipeline(
            StandardScaler(),
            MLPClassifier((64,), max_iter=300, early_stopping=True, random_state=seed),
        ),
    }
    sub = np.random.default_rng(seed).permutation(len(X))[:2000]
    return {
        name: model.fit(X[sub], y[sub]) if name == "knn_2k" else model.fit(X, y)
        for name, model in pool.items()
    }


def regressor_pool(X, y, seed: int) -> dict:
    """Six diverse regressors, trained once on the pool rows."""
    pool = {
        "ridge": make_pipeline(StandardScaler(), Ridge()),
        "knn": make_pipeline(StandardScaler(), KNeighborsRegressor(10)),
        "tree": DecisionTreeRegressor(max_depth=5, random_state=seed),
        "forest": RandomForestRegressor(100, random_state=seed),
        "gb": GradientBoostingRegressor(n_estimators=100, random_state=seed),
        "svr": make_pipeline(StandardScaler(), SVR(C=10.0)),
    }
    return {name: model.fit(X, y) for name, model in pool.items()}


def pool_proba(pool: dict, X, classes: np.ndarray) -> np.ndarray:
    """``(n_models, n_rows, n_classes)`` probabilities, columns in ``classes`` order."""
    out = np.zeros((len(pool), len(X), len(classes)))
    for k, model in enumerate(pool.values()):
        cols = np.searchsorted(classes, model.classes_)
        out[k][:, cols] = model.predict_proba(X)
    return out


def pool_predict(pool: dict, X) -> np.ndarray:
    """``(n_models, n_rows)`` regression predictions."""
    return np.stack([m.predict(X) for m in pool.values()])


# -- methods -------------------------------------------------------------------------
@dataclass
class Method:
    """``fit(X_agg, y_agg)`` returns a function from rows to ``predict_proba``
    (classification) or ``predict`` (regression)."""

    name: str
    kind: str  # "ours" or "peer"
    fit: Callable
    costly: bool = False  # run on the first --costly-seeds seeds only
    info: dict = field(default_factory=dict)


def stored_peers(task: str, pool: dict, classes) -> list[Method]:
    """Best single, Caruana and convex weights on the pool's stored outputs;
    each fit predicts with the pool on the aggregation rows first."""
    if task == "cls":
        rules = {SINGLE: best_single, CARUANA: caruana_selection, CONVEX: softmax_weights_lbfgs}
    else:
        rules = {SINGLE: best_single_sq, CARUANA: caruana_selection_sq, CONVEX: convex_weights_sq}

    def peer(name, rule):
        def fit(X, y):
            if task == "cls":
                w = rule(pool_proba(pool, X, classes), np.searchsorted(classes, y))
                predict = lambda Xn: blend(pool_proba(pool, Xn, classes), w)  # noqa: E731
            else:
                w = rule(pool_predict(pool, X), y)
                predict = lambda Xn: w @ pool_predict(pool, Xn)  # noqa: E731
            kept = {k: round(float(v), 3) for k, v in zip(pool, w)}
            method.info["weights"] = {k: v for k, v in kept.items() if v > 0}
            return predict

        method = Method(name, "peer", fit)
        return method

    return [peer(name, rule) for name, rule in rules.items()]


def sklearn_peers(task: str, frozen, seed: int, n_trials: int, bbai_note) -> list[Method]:
    """scikit-learn's stacking with a CV-tuned final estimator, bbai's, a
    GridSearchCV around it (prefit and default cv) and Optuna."""
    if task == "cls":
        Stack, param, scoring, out = StackingClassifier, "C", "neg_log_loss", "predict_proba"
        base = LogisticRegression(max_iter=1000)
        cv_final = LogisticRegressionCV(Cs=20, cv=5, scoring="neg_log_loss", max_iter=1000)
        bbai_final = BbaiLogisticClassifier()
    else:
        Stack, param, scoring, out = (
            StackingRegressor, "alpha", "neg_mean_squared_error", "predict"
        )
        base = Ridge()
        cv_final = RidgeCV(alphas=GRID)  # cv=None: closed-form leave-one-out
        bbai_final = BbaiRidgeRegressor()
    prefit = Stack(frozen, final_estimator=base, cv="prefit")
    default_cv = Stack(frozen, final_estimator=base)  # cv=None: 5-fold cross_val_predict

    def stacking_with(final, attr):
        def fit(X, y):
            est = clone(prefit).set_params(final_estimator=final).fit(X, y)
            chosen = getattr(est.final_estimator_, attr, None)
            if chosen is not None:
                method.info[attr] = float(np.ravel(chosen)[0])
            return getattr(est, out)

        method = Method(CV_STACK if final is cv_final else BBAI, "peer", fit)
        return method

    def grid(stack, name, costly):
        def fit(X, y):
            gs = GridSearchCV(
                clone(stack), {f"final_estimator__{param}": GRID}, cv=5, scoring=scoring
            ).fit(X, y)
            method.info[param] = float(gs.best_params_[f"final_estimator__{param}"])
            return getattr(gs, out)

        method = Method(name, "peer", fit, costly=costly)
        return method

    def fit_optuna(X, y):
        import optuna

        optuna.logging.set_verbosity(optuna.logging.WARNING)

        def objective(trial):
            value = trial.suggest_float(param, 1e-4, 1e4, log=True)
            est = clone(prefit).set_params(**{f"final_estimator__{param}": value})
            return cross_val_score(est, X, y, cv=5, scoring=scoring).mean()

        study = optuna.create_study(
            direction="maximize", sampler=optuna.samplers.TPESampler(seed=seed)
        )
        study.optimize(objective, n_trials=n_trials)
        value = study.best_params[param]
        optuna_method.info[param] = float(value)
        est = clone(prefit).set_params(**{f"final_estimator__{param}": value}).fit(X, y)
        return getattr(est, out)

    optuna_method = Method(f"{OPTUNA}", "peer", fit_optuna, costly=True)
    methods = [stacking_with(cv_final, "C_" if task == "cls" else "alpha_")]
    if bbai_note is None:
        methods.append(stacking_with(bbai_final, "C_" if task == "cls" else "alpha_"))
    methods += [grid(prefit, GRID_PREFIT, False), grid(default_cv, GRID_CV, True)]
    if importlib.util.find_spec("optuna") is not None:
        methods.append(optuna_method)
    return methods


def ours(name: str, task: str, frozen, seed: int, **params) -> Method:
    """Our estimator; no ``aggregator`` in ``params`` means the library's default."""
    Est = AggregatedClassifier if task == "cls" else AggregatedRegressor

    def fit(X, y):
        est = Est(frozen, random_state=seed, **params).fit(X, y)
        method.info["aggregator"] = chosen_aggregator(est)
        method.info["outer steps"] = int(getattr(est, "n_iter_", 0) or 0)
        return est.predict_proba if task == "cls" else est.predict

    method = Method(name, "ours", fit)
    return method


def our_methods(task: str, frozen, seed: int, choquet: bool) -> list[Method]:
    methods = [
        ours(DEFAULT, task, frozen, seed),
        ours(STACKING, task, frozen, seed, aggregator="stacking"),
        ours(UNTUNED, task, frozen, seed, aggregator="stacking", hyperparams="fixed"),
        ours(WEIGHTS, task, frozen, seed, aggregator="weights"),
    ]
    if choquet and task == "cls":
        methods.append(ours("ours: choquet", task, frozen, seed, aggregator="choquet"))
    return methods


# -- running -------------------------------------------------------------------------
def run_dataset(name: str, seed: int, args, costly: bool, bbai_note) -> list[dict]:
    task = TASKS[name]
    X, y = load(name, args.quick, seed, args.synth5_rows)
    X_pool, y_pool, X_agg, y_agg, X_test, y_test = split(X, y, seed, stratify=task == "cls")
    t0 = time.perf_counter()
    if task == "reg":
        pool = regressor_pool(X_pool, y_pool, seed)
    elif name == "synth5":
        pool = large_pool(X_pool, y_pool, seed)
    else:
        pool = pretrained_pool(X_pool, y_pool, seed)
    pool_s = time.perf_counter() - t0
    classes = np.unique(y) if task == "cls" else None
    frozen = [(n, FrozenEstimator(m)) for n, m in pool.items()]
    n_trials = args.optuna_trials or (10 if args.quick else 20)
    methods = (
        our_methods(task, frozen, seed, args.choquet)
        + stored_peers(task, pool, classes)
        + sklearn_peers(task, frozen, seed, n_trials, bbai_note)
    )
    if args.methods:
        wanted = [w.lower() for w in args.methods]
        methods = [m for m in methods if any(w in m.name.lower() for w in wanted)]
    print(
        f"\n=== {name} (seed {seed}): {X.shape[1]} features, "
        f"{'%d classes' % len(classes) if task == 'cls' else 'regression'}, "
        f"{len(pool)} models trained on {len(X_pool)} rows ({pool_s:.1f} s, not timed); "
        f"aggregation on {len(X_agg)} rows, test on {len(X_test)}",
        flush=True,
    )
    rows = []
    for method in methods:
        if method.costly and not costly:
            continue
        row = {"dataset": name, "task": task, "seed": seed, "method": method.name,
               "kind": method.kind}
        try:
            predict, seconds, runs, kinds = timed(
                lambda m=method: m.fit(X_agg, y_agg), repeats=args.repeats
            )
            pred = predict(X_test)
        except Exception as e:  # noqa: BLE001 - reported, the run goes on
            print(f"  {method.name:28s} FAILED {type(e).__name__}: {e}", flush=True)
            rows.append({**row, "loss": math.nan, "fit_s": math.nan, "runs": 0,
                         "warnings": "failed", "info": f"{type(e).__name__}: {e}"})
            continue
        loss = (
            log_loss(y_test, pred, labels=classes) if task == "cls" else rmse(pred, y_test)
        )
        info = "; ".join(f"{k}={v}" for k, v in method.info.items())
        rows.append({**row, "loss": loss, "fit_s": seconds, "runs": runs,
                     "warnings": ",".join(kinds), "info": info})
        print(f"  {method.name:28s} loss {loss:.4f}  fit {seconds:7.3f} s  {info[:90]}",
              flush=True)
    return rows


# -- summaries -----------------------------------------------------------------------
def per_method(table: pd.DataFrame) -> pd.DataFrame:
    """Per dataset and method: mean and std over the seeds of loss and fit time."""
    g = table.groupby(["dataset", "method"], sort=False)
    out = g.agg(
        kind=("kind", "first"), seeds=("loss", "count"),
        loss_mean=("loss", "mean"), loss_std=("loss", "std"),
        fit_s_mean=("fit_s", "mean"), fit_s_std=("fit_s", "std"),
    ).reset_index()
    return out


def _mean_ratio(table, dataset, num, den, col="fit_s"):
    """Ratio of means of ``col`` of two methods over the seeds both ran."""
    t = table[table.dataset == dataset].pivot_table(index="seed", columns="method", values=col)
    if num not in t or den not in t:
        return math.nan
    both = t[[num, den]].dropna()
    return both[num].mean() / both[den].mean() if len(both) else math.nan


def ratios(table: pd.DataFrame) -> pd.DataFrame:
    """Issue 20's ratios per dataset (ratios of means over common seeds)."""
    rows = []
    for name in table.dataset.unique():
        loss_vs = _mean_ratio(table, name, STACKING, CV_STACK, "loss")
        rows.append({
            "dataset": name,
            "stacking / LRCV-RidgeCV time": _mean_ratio(table, name, STACKING, CV_STACK),
            "stacking vs LRCV-RidgeCV loss": (loss_vs - 1) * 100,
            "default / LRCV-RidgeCV time": _mean_ratio(table, name, DEFAULT, CV_STACK),
            "GridCV(cv=5) / stacking time": _mean_ratio(table, name, GRID_CV, STACKING),
            "GridCV(prefit) / stacking time": _mean_ratio(table, name, GRID_PREFIT, STACKING),
            "tuned / untuned time": _mean_ratio(table, name, STACKING, UNTUNED),
            "weights / Caruana time": _mean_ratio(table, name, WEIGHTS, CARUANA),
            "default / stacking time": _mean_ratio(table, name, DEFAULT, STACKING),
        })
    return pd.DataFrame(rows)


def issue14_summary(table: pd.DataFrame, tol: float = 0.01) -> pd.DataFrame:
    """Is the default at or below (within ``tol``) the best single model,
    Caruana and the grid-tuned stacking on the mean over seeds, and its fit
    no slower than the grid's?"""
    rows = []
    for name, t in table.groupby("dataset", sort=False):
        m = t.groupby("method").loss.mean()
        s = t.groupby("method").fit_s.mean()
        d = m.get(DEFAULT, math.nan)
        chosen = t[t.method == DEFAULT]["info"].str.extract(r"aggregator=([^;]+)")[0]

        def at_or_below(peer):
            p = m.get(peer, math.nan)
            return bool(d <= p * (1 + tol)) if np.isfinite(d) and np.isfinite(p) else None

        rows.append({
            "dataset": name,
            "default": d,
            SINGLE: m.get(SINGLE, math.nan),
            CARUANA: m.get(CARUANA, math.nan),
            CONVEX: m.get(CONVEX, math.nan),
            GRID_PREFIT: m.get(GRID_PREFIT, math.nan),
            f"{OPTUNA} ({int(t[t.method == OPTUNA].loss.count())} seeds)":
                m.get(OPTUNA, math.nan),
            "<= single": at_or_below(SINGLE),
            "<= Caruana": at_or_below(CARUANA),
            "<= grid": at_or_below(GRID_PREFIT),
            "default s": s.get(DEFAULT, math.nan),
            "grid s": s.get(GRID_PREFIT, math.nan),
            "not slower than grid": bool(
                s.get(DEFAULT, math.inf) <= s.get(GRID_PREFIT, math.nan)
            ),
            "chosen": ", ".join(f"{k}×{v}" for k, v in chosen.value_counts().items()),
        })
    return pd.DataFrame(rows)


def fmt_methods(pm: pd.DataFrame) -> pd.DataFrame:
    """``mean ± std`` strings, for printing and markdown."""
    return pd.DataFrame({
        "dataset": pm.dataset,
        "method": pm.method,
        "seeds": pm.seeds,
        "test loss (mean ± std)": [
            f"{m:.4f} ± {s:.4f}" if np.isfinite(s) else f"{m:.4f}"
            for m, s in zip(pm.loss_mean, pm.loss_std)
        ],
        "fit s (mean ± std)": [
            f"{m:.3f} ± {s:.3f}" if np.isfinite(s) else f"{m:.3f}"
            for m, s in zip(pm.fit_s_mean, pm.fit_s_std)
        ],
    })


def to_markdown(df: pd.DataFrame) -> str:
    """A GitHub table (pandas' ``to_markdown`` needs ``tabulate``, not a dependency)."""

    def cell(col, v):
        if v is None:
            return "-"
        if isinstance(v, (bool, np.bool_)):
            return "yes" if v else "**no**"
        if isinstance(v, float):
            if not np.isfinite(v):
                return "-"
            if "time" in col:
                return f"{v:.2f}×"
            if "loss" in col and "vs" in col:
                return f"{v:+.1f} %"
            return f"{v:.3f}" if col.endswith(" s") else f"{v:.4f}"
        return str(v)

    lines = ["| " + " | ".join(df.columns) + " |", "|" + "---|" * len(df.columns)]
    lines += [
        "| " + " | ".join(cell(c, v) for c, v in zip(df.columns, row)) + " |"
        for row in df.itertuples(index=False)
    ]
    return "\n".join(lines)


def report(table: pd.DataFrame, header: str, notes: list[str], seconds: float) -> str:
    """The markdown report: per-method table, ratios, issue 14's summary."""
    buf = io.StringIO()
    buf.write(f"{header}\n\n")
    for note in notes:
        buf.write(f"- note: {note}\n")
    pm = fmt_methods(per_method(table))
    for name, t in pm.groupby("dataset", sort=False):
        metric = "log-loss" if TASKS[name] == "cls" else "RMSE"
        buf.write(f"\n### {name} (test {metric})\n\n{to_markdown(t.drop(columns='dataset'))}\n")
    buf.write("\n### ratios (issue 20; ratio of the means over the seeds both ran)\n\n")
    buf.write(to_markdown(ratios(table)) + "\n")
    buf.write("\n### the default against the obvious alternatives (issue 14; mean over seeds, "
              "1 % tolerance)\n\n")
    buf.write(to_markdown(issue14_summary(table)) + "\n")
    if np.isfinite(seconds):
        buf.write(f"\ntotal run time {seconds / 60:.1f} min; load average at the end "
                  f"{load_average()}\n")
    return buf.getvalue()


def main(argv=None) -> pd.DataFrame:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="2 seeds, synth5 of 3 000 rows, friedman1 of 1 000, "
                             "10 Optuna trials")
    parser.add_argument("--datasets", nargs="+", choices=list(TASKS), default=list(TASKS))
    parser.add_argument("--seeds", type=int, nargs="+", metavar="SEED",
                        help="split, pool and Optuna seeds (default 0-4; --quick: 0 1)")
    parser.add_argument("--costly-seeds", type=int, default=1,
                        help="run GridSearchCV (cv=5) and Optuna on this many of the "
                             "first seeds (default 1)")
    parser.add_argument("--optuna-trials", type=int, default=None,
                        help="default 20 (--quick: 10)")
    parser.add_argument("--synth5-rows", type=int, default=SYNTH5_ROWS,
                        help=f"synth5's rows (default {SYNTH5_ROWS}: 1 200 aggregation rows; "
                             "20000 gives issue 20's 6 000, too slow for 5 seeds under load)")
    parser.add_argument("--repeats", type=int, default=3,
                        help="runs of each fit faster than 1 s (median time reported)")
    parser.add_argument("--torch-threads", type=int, default=1)
    parser.add_argument("--choquet", action="store_true",
                        help="also our choquet aggregator (classification)")
    parser.add_argument("--methods", nargs="+", metavar="TEXT",
                        help="run only the methods whose name contains one of these "
                             "(case-insensitive)")
    parser.add_argument("--out", type=Path,
                        help="write the report (.md; the per-seed rows go to the same "
                             "name with .csv, after each dataset) or only the rows (.csv)")
    parser.add_argument("--report", type=Path, metavar="CSV",
                        help="only print the tables of the rows in CSV (written by an "
                             "earlier run's --out, possibly cut short) and exit")
    args = parser.parse_args(argv)
    if args.report:
        table = pd.read_csv(args.report, keep_default_na=False, na_values=[""])
        table["info"] = table["info"].astype(str)
        print(report(table, f"bench_vs_sklearn: rows of {args.report}", [], math.nan))
        return table
    seeds = args.seeds or ([0, 1] if args.quick else [0, 1, 2, 3, 4])

    import torch

    torch.set_num_threads(args.torch_threads)
    start = time.perf_counter()
    header = (
        f"bench_vs_sklearn: seeds {' '.join(map(str, seeds))}, "
        f"{'quick' if args.quick else 'full'} run, torch {torch.__version__} "
        f"threads={torch.get_num_threads()}, python {sys.version.split()[0]}, "
        f"{os.cpu_count()} CPUs, load average {load_average()} at start, "
        f"library {library_version()}"
    )
    print(header)
    notes = []
    bbai_note = bbai_available()
    if bbai_note:
        notes.append(bbai_note)
    notes.append(f"{GRID_CV} and {OPTUNA} ran on seed(s) "
                 f"{' '.join(map(str, seeds[:args.costly_seeds])) or 'none'}")
    for note in notes:
        print(f"note: {note}")
    print(f"torch warm-up: {warm_up(seeds[0]):.2f} s (not timed)")
    rows = []
    # The rows so far, after each dataset: a run cut short still leaves its
    # figures (``--report`` turns them into the tables).
    partial = args.out.with_suffix(".csv") if args.out else None
    # One thread everywhere (BLAS, OpenMP, torch): the comparison is per core.
    with warnings.catch_warnings(), threadpool_limits(1):
        warnings.simplefilter("ignore")  # counted per fit by timed(), not printed
        for i, seed in enumerate(seeds):
            for name in args.datasets:
                rows += run_dataset(name, seed, args, i < args.costly_seeds, bbai_note)
                if partial is not None:
                    pd.DataFrame(rows).to_csv(partial, index=False)
    table = pd.DataFrame(rows)
    seconds = time.perf_counter() - start
    text = report(table, header, notes, seconds)
    print("\n" + text)
    if args.out:
        if args.out.suffix.lower() == ".csv":
            table.to_csv(args.out, index=False)
        else:
            args.out.write_text(text)
        print(f"wrote {args.out}")
    return table


if __name__ == "__main__":
    main()

"""hyperagg against scikit-learn stacking (plain, GridSearchCV-, Optuna-tuned) and ensembling peers.

Protocol, per dataset (``breast_cancer``, ``wine``, ``digits`` — bundled with
scikit-learn — and ``synthetic``, a seeded 5-class ``make_classification``
set): a stratified 40 / 30 / 30 split (fixed seed). The first 40 % trains a
pool of six diverse classifiers once; they are then frozen. The next 30 % is
all that any aggregation method sees; the last 30 % is the test set. Every
method runs in this one process on the same frozen pool:

=========================  ===================================================
best single                the model with the lowest log-loss on the
                           aggregation rows
uniform average            mean of the models' probabilities (nothing fitted)
Caruana selection          greedy ensemble selection with replacement,
                           50 rounds, on the aggregation rows' log-loss
                           (Caruana et al. 2004; AutoGluon's method)
L-BFGS softmax weights     convex weights fitted by SciPy's L-BFGS-B on the
                           aggregation rows' log-loss, untuned
sklearn stacking           ``StackingClassifier`` over ``FrozenEstimator`` s,
                           default final estimator (LogisticRegression, C=1)
sklearn stacking + GridCV  the same in ``GridSearchCV`` over
                           ``final_estimator__C`` (20 log-spaced values in
                           [1e-4, 1e4], 5 folds, log-loss): 100 fits + refit
sklearn stacking + Optuna  the same tuned by Optuna's seeded TPE (50 trials of
                           the 5-fold CV log-loss) + refit
hyperagg <name>            ``AggregatedClassifier(frozen pool, aggregator=...,
                           random_state=0)``: ``"stacking"``, ``"weights"``
                           and, when importable, issue 3's Choquet, Sugeno,
                           Uninorm and LAF (each with its defaults);
                           with ``--variants`` also stacking / weights with
                           ``cv=None`` (one validation split instead of 5
                           cross-fitted folds), left out of the summary
=========================  ===================================================

``cv="prefit"`` for scikit-learn's stacking. In scikit-learn 1.9 a
``StackingClassifier`` with an integer ``cv`` still runs
``cross_val_predict`` over its estimators; ``FrozenEstimator`` makes each
``fit`` there a no-op (``clone`` returns the frozen model itself), so the
out-of-fold meta-features equal the in-sample ones: the pool never saw the
aggregation rows. ``cv="prefit"`` gives the very same meta-features with one
prediction pass per model instead of five fold passes and the clone
bookkeeping, so it is the fair (cheapest correct) way to use it. Each fit of
the stacking — every one of GridSearchCV's 101 and Optuna's 5 x 50 + 1 —
recomputes every base model's predictions on its rows; that is how
scikit-learn's tuning works and is part of the comparison.

Timings (``time.perf_counter``) are of the aggregation step only, from the
raw aggregation rows to a fitted ensemble: the pool is trained once, outside
them. For the peers working on stored probabilities (best single, Caruana,
L-BFGS weights) the timing includes the one prediction pass of the pool over
the aggregation rows, as ``AggregatedClassifier.fit`` includes its own; the
uniform average fits nothing (time 0). One small untimed hyperagg fit
warms torch up first (its one-time start-up cost, about 1 s, would
otherwise be charged to the first hyperagg method). Methods faster than 1 s are run
``--repeats`` times and the median time is reported (the first fit is the one
evaluated; the fits are deterministic). "ratio" is GridSearchCV's time
divided by the method's time.

Run: ``python benchmarks/bench_vs_sklearn.py [--quick] [--datasets wine digits]
[--out results.md|results.csv] [--details] [--variants] [--methods TEXT ...]
[--seed N | --seeds 0 1 2 3 4]``. One split of a few hundred rows decides little
(which method is best on a dataset changes from seed to seed), so ``--seeds``
repeats everything (split, pool, Optuna) per seed and adds a summary of the
mean test log-loss over the seeds. The header line records the library
commit and the load average: timings on a shared machine are only comparable
within one run.
"""

from __future__ import annotations

import argparse
import importlib
import io
import math
import os
import statistics
import subprocess
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
from sklearn.ensemble import RandomForestClassifier, StackingClassifier
from sklearn.frozen import FrozenEstimator
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import accuracy_score, log_loss
from sklearn.model_selection import GridSearchCV, cross_val_score, train_test_split
from sklearn.naive_bayes import GaussianNB
from sklearn.neighbors import KNeighborsClassifier
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.svm import SVC
from sklearn.tree import DecisionTreeClassifier

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _peers import (  # noqa: E402
    best_single,
    blend,
    caruana_selection,
    softmax_weights_lbfgs,
    uniform,
)

from aggregators import AggregatedClassifier, Aggregator  # noqa: E402

DATASETS = ("breast_cancer", "wine", "digits", "synthetic")
GRID_NAME = "sklearn stacking + GridSearchCV"
#: issue 3's aggregation functions: (module, class). Other sessions write
#: them; a missing one is skipped with a note.
FUZZY = (
    ("aggregators.choquet", "Choquet"),
    ("aggregators.sugeno", "Sugeno"),
    ("aggregators.uninorm", "Uninorm"),
    ("aggregators.laf", "LAF"),
)


# -- data and pool -------------------------------------------------------------------
def load(name: str, quick: bool, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Features and labels of a bundled or generated dataset."""
    if name == "synthetic":
        return datasets.make_classification(
            n_samples=1000 if quick else 3000, n_features=20, n_informative=10,
            n_redundant=4, n_repeated=0, n_classes=5, n_clusters_per_class=2,
            flip_y=0.05, class_sep=1.0, random_state=seed,
        )
    return getattr(datasets, f"load_{name}")(return_X_y=True)


def split(X, y, seed: int):
    """Stratified 40 % pool / 30 % aggregation / 30 % test."""
    X_pool, X_rest, y_pool, y_rest = train_test_split(
        X, y, train_size=0.4, stratify=y, random_state=seed
    )
    X_agg, X_test, y_agg, y_test = train_test_split(
        X_rest, y_rest, test_size=0.5, stratify=y_rest, random_state=seed
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


def pool_proba(pool: dict, X, classes: np.ndarray) -> np.ndarray:
    """``(n_models, n_rows, n_classes)`` probabilities, columns in ``classes`` order."""
    out = np.zeros((len(pool), len(X), len(classes)))
    for k, model in enumerate(pool.values()):
        cols = np.searchsorted(classes, model.classes_)
        out[k][:, cols] = model.predict_proba(X)
    return out


# -- methods -------------------------------------------------------------------------
@dataclass
class Method:
    """``fit(X_agg, y_agg)`` returns ``predict_proba(X)`` (columns in ``classes``)."""

    name: str
    group: str  # "peer" or "ours"
    fit: Callable
    info: dict = field(default_factory=dict)


def weight_peer(name, rule, pool, classes, info_key="weights") -> Method:
    """A peer that learns a weight vector on the stored probabilities."""

    def fit(X, y):
        yk = np.searchsorted(classes, y)
        w = rule(pool_proba(pool, X, classes), yk)
        method.info[info_key] = pd.Series(w, index=list(pool)).round(3).to_dict()
        return lambda Xn: blend(pool_proba(pool, Xn, classes), w)

    method = Method(name, "peer", fit)
    return method


def sklearn_methods(frozen, n_trials: int, seed: int) -> list[Method]:
    """Stacking: default C, GridSearchCV over C, Optuna over C."""
    # final_estimator=None would mean this default, but set_params on a None
    # final estimator fails, so it is spelled out.
    stack = StackingClassifier(frozen, final_estimator=LogisticRegression(), cv="prefit")
    grid = np.logspace(-4, 4, 20)

    def fit_default(X, y):
        return clone(stack).fit(X, y).predict_proba

    def fit_grid(X, y):
        gs = GridSearchCV(
            clone(stack), {"final_estimator__C": grid}, cv=5, scoring="neg_log_loss"
        ).fit(X, y)
        m_grid.info["best C"] = float(gs.best_params_["final_estimator__C"])
        return gs.predict_proba

    def fit_optuna(X, y):
        import optuna

        optuna.logging.set_verbosity(optuna.logging.WARNING)

        def objective(trial):
            C = trial.suggest_float("C", 1e-4, 1e4, log=True)
            est = clone(stack).set_params(final_estimator__C=C)
            return cross_val_score(est, X, y, cv=5, scoring="neg_log_loss").mean()

        study = optuna.create_study(
            direction="maximize", sampler=optuna.samplers.TPESampler(seed=seed)
        )
        study.optimize(objective, n_trials=n_trials)
        C = study.best_params["C"]
        m_optuna.info["best C"] = float(C)
        return clone(stack).set_params(final_estimator__C=C).fit(X, y).predict_proba

    m_grid = Method(GRID_NAME, "peer", fit_grid)
    m_optuna = Method(f"sklearn stacking + Optuna ({n_trials} TPE)", "peer", fit_optuna)
    return [Method("sklearn stacking (C=1)", "peer", fit_default), m_grid, m_optuna]


def _summarise_hyper(value):
    if hasattr(value, "to_dict"):
        return {k: float(f"{v:.3g}") for k, v in value.to_dict().items()}
    arr = np.atleast_1d(np.asarray(value, dtype=float))
    return float(f"{arr[0]:.3g}") if arr.size == 1 else [float(f"{v:.3g}") for v in arr]


def ours(name: str, frozen, aggregator, seed: int, group: str = "ours", **options) -> Method:
    """``AggregatedClassifier`` with ``aggregator`` (a short name or an instance)."""

    def fit(X, y):
        est = AggregatedClassifier(
            frozen, aggregator=aggregator, random_state=seed, **options
        )
        est.fit(X, y)
        method.info["hyperparams"] = {
            k: _summarise_hyper(v) for k, v in est.hyperparams_.items()
        }
        method.info["validation loss"] = round(float(est.validation_loss_), 4)
        method.info["outer steps"] = int(est.n_iter_)
        weights = getattr(est.aggregator_, "weights_", None)
        if isinstance(weights, pd.Series):
            method.info["weights"] = weights.round(3).to_dict()
        return est.predict_proba

    method = Method(f"hyperagg {name}", group, fit)
    return method


def fuzzy_aggregators() -> tuple[list[tuple[str, Aggregator]], list[str]]:
    """Issue 3's aggregation functions that import, and notes on the others."""
    found, notes = [], []
    for module_name, class_name in FUZZY:
        try:
            module = importlib.import_module(module_name)
        except ImportError as e:
            notes.append(f"{module_name}.{class_name} skipped: {e}")
            continue
        cls = getattr(module, class_name, None)
        if cls is None:  # a differently named class: take the module's registered one
            cands = [
                c for c in vars(module).values()
                if isinstance(c, type) and issubclass(c, Aggregator)
                and c.__module__ == module.__name__ and c.__dict__.get("short_name")
            ]
            if len(cands) != 1:
                notes.append(f"{module_name}.{class_name} skipped: no such class")
                continue
            cls = cands[0]
        try:
            found.append((cls.__dict__.get("short_name") or cls.__name__.lower(), cls()))
        except Exception as e:  # noqa: BLE001 - work in progress elsewhere
            notes.append(f"{module_name}.{cls.__name__}() skipped: {type(e).__name__}: {e}")
    return found, notes


# -- running -------------------------------------------------------------------------
def timed_fit(method: Method, X, y, repeats: int):
    """Fit once (the fit evaluated), repeat fast fits for a stable median time."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        t0 = time.perf_counter()
        predict = method.fit(X, y)
        times = [time.perf_counter() - t0]
        if times[0] < 1.0:
            for _ in range(repeats - 1):
                t0 = time.perf_counter()
                method.fit(X, y)
                times.append(time.perf_counter() - t0)
    kinds = sorted({f"{w.category.__name__}" for w in caught})
    return predict, statistics.median(times), len(times), kinds


def warm_up(seed: int) -> float:
    """One small untimed fit, so that torch's one-time start-up cost (first
    autograd / L-BFGS calls, about 1 s here) is not charged to the first
    hyperagg method timed; scikit-learn's code paths are warm by the time
    GridSearchCV runs too (the peers before it use them)."""
    X, y = datasets.make_classification(
        150, 5, n_informative=3, n_redundant=0, n_classes=3, random_state=seed
    )
    pool = [
        ("lr", FrozenEstimator(LogisticRegression().fit(X, y))),
        ("nb", FrozenEstimator(GaussianNB().fit(X, y))),
    ]
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for agg in ("stacking", "weights"):
            AggregatedClassifier(pool, aggregator=agg, random_state=seed).fit(X, y)
    return time.perf_counter() - t0


def library_version() -> str:
    """Commit of the checkout, and whether the library has uncommitted changes."""
    root = Path(__file__).resolve().parents[1]
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True,
            text=True, check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "aggregators", "base_models"], cwd=root,
            capture_output=True, text=True, check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + (" + uncommitted library changes" if dirty else "")


def run_dataset(name: str, args, seed: int) -> tuple[pd.DataFrame, dict]:
    X, y = load(name, args.quick, seed)
    X_pool, y_pool, X_agg, y_agg, X_test, y_test = split(X, y, seed)
    classes = np.unique(y)
    t0 = time.perf_counter()
    pool = pretrained_pool(X_pool, y_pool, seed)
    pool_seconds = time.perf_counter() - t0
    frozen = [(n, FrozenEstimator(m)) for n, m in pool.items()]
    n_trials = args.optuna_trials or (15 if args.quick else 50)

    methods = [
        weight_peer("best single", best_single, pool, classes, info_key="chosen"),
        Method("uniform average", "peer", None),
        weight_peer("Caruana selection (50 rounds)", caruana_selection, pool, classes),
        weight_peer("L-BFGS softmax weights", softmax_weights_lbfgs, pool, classes),
        *sklearn_methods(frozen, n_trials, seed),
        ours("stacking", frozen, "stacking", 0),
        ours("weights", frozen, "weights", 0),
    ]
    fuzzy, notes = fuzzy_aggregators()
    methods += [ours(short, frozen, agg, 0) for short, agg in fuzzy]
    if args.variants:  # shown, but left out of the summary (not the defaults)
        methods += [
            ours(f"{agg} (cv=None)", frozen, agg, 0, group="variant", cv=None)
            for agg in ("stacking", "weights")
        ]
    if args.methods:  # a subset, to save time; the uniform average is always kept
        wanted = [w.lower() for w in args.methods]
        methods = [
            m for m in methods
            if m.fit is None or any(w in m.name.lower() for w in wanted)
        ]

    print(
        f"\n=== {name} (seed {seed}): {X.shape[1]} features, {len(classes)} classes; pool trained on "
        f"{len(X_pool)} rows ({pool_seconds:.1f}s, outside the timings), "
        f"aggregation on {len(X_agg)}, test on {len(X_test)}",
        flush=True,
    )
    for note in notes:
        print(f"  note: {note}")
    rows = []
    for method in methods:
        row = {"dataset": name, "seed": seed, "method": method.name, "group": method.group}
        if method.fit is None:  # uniform average: nothing to fit
            proba = blend(pool_proba(pool, X_test, classes), uniform(pool))
            seconds, runs, kinds = 0.0, 0, []
        else:
            try:
                predict, seconds, runs, kinds = timed_fit(method, X_agg, y_agg, args.repeats)
                proba = predict(X_test)
            except Exception as e:  # noqa: BLE001 - report and go on
                print(f"  {method.name}: FAILED {type(e).__name__}: {e}", flush=True)
                rows.append({**row, "test_log_loss": math.nan, "test_accuracy": math.nan,
                             "fit_s": math.nan, "runs": 0, "warnings": "failed"})
                continue
        rows.append({
            **row,
            "test_log_loss": log_loss(y_test, proba, labels=classes),
            "test_accuracy": accuracy_score(y_test, classes[np.argmax(proba, axis=1)]),
            "fit_s": seconds,
            "runs": runs,
            "warnings": ",".join(kinds),
        })
        print(f"  {method.name}: done in {seconds:.3f}s", flush=True)
    table = pd.DataFrame(rows)
    grid = table.loc[table.method == GRID_NAME, "fit_s"]
    grid_s = grid.iloc[0] if len(grid) else math.nan  # NaN if it failed or was not run
    print(f"  (load average {os.getloadavg()[0]:.2f})")
    table["ratio_vs_grid"] = np.where(table.fit_s > 0, grid_s / table.fit_s, np.nan)
    infos = {m.name: m.info for m in methods if m.info}
    return table, infos


def format_table(table: pd.DataFrame) -> str:
    shown = table[["method", "test_log_loss", "test_accuracy", "fit_s", "ratio_vs_grid", "warnings"]]
    return shown.to_string(
        index=False,
        formatters={
            "test_log_loss": "{:.4f}".format,
            "test_accuracy": "{:.4f}".format,
            "fit_s": "{:.3f}".format,
            "ratio_vs_grid": lambda v: "-" if not np.isfinite(v) else f"{v:.1f}x",
        },
    )


def summarise(table: pd.DataFrame) -> pd.DataFrame:
    """Per dataset: our best against the peers' best, and the stacking speed-up."""
    out = []
    for name, t in table.groupby("dataset", sort=False):
        t = t.dropna(subset=["test_log_loss"])
        ours_t, peers_t = t[t.group == "ours"], t[t.group == "peer"]
        if ours_t.empty or peers_t.empty:
            continue
        best_ours = ours_t.loc[ours_t.test_log_loss.idxmin()]
        best_peer = peers_t.loc[peers_t.test_log_loss.idxmin()]
        grid = t[t.method == GRID_NAME]
        stack = t[t.method == "hyperagg stacking"]
        single = t[t.method == "best single"]
        both = len(grid) and len(stack)
        out.append({
            "dataset": name,
            "our best": best_ours.method.removeprefix("hyperagg "),
            "our ll": best_ours.test_log_loss,
            "best peer": best_peer.method,
            "peer ll": best_peer.test_log_loss,
            "ours <= peer": bool(best_ours.test_log_loss <= best_peer.test_log_loss),
            "stacking ll": stack.test_log_loss.iloc[0] if len(stack) else math.nan,
            "GridCV ll": grid.test_log_loss.iloc[0] if len(grid) else math.nan,
            "stacking <= GridCV": bool(
                both and stack.test_log_loss.iloc[0] <= grid.test_log_loss.iloc[0]
            ),
            "speed-up vs GridCV": (
                grid.fit_s.iloc[0] / stack.fit_s.iloc[0] if both else math.nan
            ),
            # What any method that predicts with the pool once could reach:
            # "best single" is one prediction pass and an argmin.
            "ceiling": (
                grid.fit_s.iloc[0] / single.fit_s.iloc[0]
                if len(grid) and len(single) and single.fit_s.iloc[0] > 0 else math.nan
            ),
        })
    return pd.DataFrame(out)


def summarise_seeds(table: pd.DataFrame) -> pd.DataFrame:
    """Per dataset, over the seeds: mean test log-loss of our best and of the
    peers' best (each chosen by its mean), in how many seeds our best of that
    seed was at or below the peers' best of that seed, and the median speed-up."""
    out = []
    for name, t in table.groupby("dataset", sort=False):
        # summarise() groups by its "dataset" column: here, one group per seed.
        per_seed = summarise(t.assign(dataset=t.seed))
        means = t.groupby(["method", "group"]).test_log_loss.mean().reset_index()
        ours_t, peers_t = means[means.group == "ours"], means[means.group == "peer"]
        if ours_t.empty or peers_t.empty:
            continue
        best_ours = ours_t.loc[ours_t.test_log_loss.idxmin()]
        best_peer = peers_t.loc[peers_t.test_log_loss.idxmin()]
        mean_of = dict(zip(means.method, means.test_log_loss))
        out.append({
            "dataset": name,
            "seeds": t.seed.nunique(),
            "our best (mean)": best_ours.method.removeprefix("hyperagg "),
            "our ll": best_ours.test_log_loss,
            "best peer (mean)": best_peer.method,
            "peer ll": best_peer.test_log_loss,
            "ours <= peer": bool(best_ours.test_log_loss <= best_peer.test_log_loss),
            "seeds ours <= peer": int(per_seed["ours <= peer"].sum()),
            "stacking ll": mean_of.get("hyperagg stacking", math.nan),
            "GridCV ll": mean_of.get(GRID_NAME, math.nan),
            "median speed-up vs GridCV": per_seed["speed-up vs GridCV"].median(),
        })
    return pd.DataFrame(out)


def to_markdown(df: pd.DataFrame) -> str:
    """A GitHub table (pandas' ``to_markdown`` needs ``tabulate``, not a dependency)."""
    fmt = {"fit_s": "{:.3f}", "ratio_vs_grid": "{:.1f}x", "speed-up vs GridCV": "{:.1f}x",
           "median speed-up vs GridCV": "{:.1f}x", "ceiling": "{:.0f}x"}

    def cell(col, v):
        if isinstance(v, float):
            return "-" if not np.isfinite(v) else fmt.get(col, "{:.4f}").format(v)
        return str(v)

    lines = ["| " + " | ".join(df.columns) + " |", "|" + "---|" * len(df.columns)]
    lines += [
        "| " + " | ".join(cell(c, v) for c, v in zip(df.columns, row)) + " |"
        for row in df.itertuples(index=False)
    ]
    return "\n".join(lines)


def write_out(path: Path, table: pd.DataFrame, summary: pd.DataFrame, header: str) -> None:
    if path.suffix.lower() in (".md", ".markdown"):
        buf = io.StringIO()
        buf.write(f"{header}\n")
        for (name, seed), t in table.groupby(["dataset", "seed"], sort=False):
            buf.write(f"\n### {name} (seed {seed})\n\n")
            shown = t[["method", "test_log_loss", "test_accuracy", "fit_s", "ratio_vs_grid", "warnings"]]
            buf.write(to_markdown(shown) + "\n")
        buf.write("\n### summary\n\n" + to_markdown(summary) + "\n")
        path.write_text(buf.getvalue())
    else:
        table.to_csv(path, index=False)
    print(f"\nwrote {path}")


def main(argv=None) -> tuple[pd.DataFrame, pd.DataFrame]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: 15 Optuna trials, 1000-row synthetic set")
    parser.add_argument("--datasets", nargs="+", choices=DATASETS, default=list(DATASETS))
    parser.add_argument("--out", type=Path, help="also write the table (.md or .csv)")
    parser.add_argument("--seed", type=int, default=0, help="split, pool and Optuna seed")
    parser.add_argument("--seeds", type=int, nargs="+", metavar="SEED",
                        help="run every dataset with each of these seeds (instead of "
                             "--seed) and add a summary over them")
    parser.add_argument("--optuna-trials", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=3,
                        help="runs of each fit faster than 1 s (median time reported)")
    parser.add_argument("--torch-threads", type=int, default=None,
                        help="torch.set_num_threads for hyperagg (default: torch's own)")
    parser.add_argument("--variants", action="store_true",
                        help="also hyperagg stacking / weights with cv=None (one "
                             "validation split); not part of the summary")
    parser.add_argument("--methods", nargs="+", metavar="TEXT",
                        help="run only the methods whose name contains one of these "
                             "(case-insensitive), e.g. --methods single Caruana GridSearch "
                             "hyperagg; the uniform average always runs")
    parser.add_argument("--details", action="store_true",
                        help="print learned weights and tuned hyperparameters")
    args = parser.parse_args(argv)

    import torch

    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    seeds = args.seeds or [args.seed]
    header = (
        f"bench_vs_sklearn: seed{'s' if len(seeds) > 1 else ''} "
        f"{' '.join(map(str, seeds))}, {'quick' if args.quick else 'full'} run, "
        f"torch {torch.__version__} threads={torch.get_num_threads()}, "
        f"python {sys.version.split()[0]}, {os.cpu_count()} CPUs, load average "
        f"{os.getloadavg()[0]:.2f} at start, library {library_version()}"
    )
    print(header)
    print(f"torch warm-up: {warm_up(seeds[0]):.2f}s (not timed)")
    tables = []
    for seed in seeds:
        for name in args.datasets:
            table, infos = run_dataset(name, args, seed)
            tables.append(table)
            with pd.option_context("display.width", 160, "display.max_colwidth", 60):
                print()
                print(format_table(table))
            if args.details:
                for method, info in infos.items():
                    print(f"  [{method}]")
                    for k, v in info.items():
                        print(f"    {k}: {v}")
    table = pd.concat(tables, ignore_index=True)
    print("\nsummary (test log-loss; speed-up = GridSearchCV time / hyperagg stacking time; "
          "ceiling = GridSearchCV time / one prediction pass of the pool (best single))")
    for seed in seeds:
        summary = summarise(table[table.seed == seed])
        if len(seeds) > 1:
            print(f"seed {seed}")
        with pd.option_context("display.width", 200, "display.float_format", "{:.4f}".format):
            print(summary.to_string(index=False))
    if len(seeds) > 1:
        summary = summarise_seeds(table)
        print(f"\nover seeds {' '.join(map(str, seeds))} (mean test log-loss; our best and "
              "the best peer each chosen by its mean; 'seeds ours <= peer' compares the "
              "bests of each seed)")
        with pd.option_context("display.width", 200, "display.float_format", "{:.4f}".format):
            print(summary.to_string(index=False))
    if args.out:
        write_out(args.out, table, summary, header)
    return table, summary


if __name__ == "__main__":
    main()

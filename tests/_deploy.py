"""Helpers for the deploy tests that a fresh Python process imports too.

A saved torch base model needs its architecture at load time; a subprocess
finds it here (the tests put this folder on its ``PYTHONPATH``).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from sklearn.datasets import make_classification
from sklearn.ensemble import RandomForestClassifier
from sklearn.frozen import FrozenEstimator
from sklearn.linear_model import LogisticRegression
from sklearn.naive_bayes import GaussianNB
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from base_models import PrecomputedModel, TorchModel

N_FEATURES = 8
FEATURES = [f"f{i}" for i in range(N_FEATURES)]
TESTS = Path(__file__).resolve().parent


def make_net() -> torch.nn.Module:
    """The torch base model's architecture (its weights come from the file)."""
    return torch.nn.Sequential(
        torch.nn.Linear(N_FEATURES, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3)
    ).double()


def data(n=900, seed=0):
    X, y = make_classification(
        n, N_FEATURES, n_informative=5, n_classes=3, random_state=seed
    )
    # String row keys: the stored predictions are matched to rows by them.
    index = pd.Index([f"r{i}" for i in range(n)], name="key")
    return pd.DataFrame(X, columns=FEATURES, index=index), y


def pool(X, y, X_all):
    """Fitted sklearn models, an unfitted pipeline, a torch module, stored predictions.

    The stored predictions cover every row of ``X_all``, keyed by its index.
    """
    torch.manual_seed(0)
    net = make_net()
    opt = torch.optim.Adam(net.parameters(), lr=0.05)
    Xt, yt = torch.tensor(X.to_numpy()), torch.tensor(y)
    for _ in range(60):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(net(Xt), yt).backward()
        opt.step()
    forest = RandomForestClassifier(20, max_depth=5, random_state=0).fit(X, y)
    stored = pd.DataFrame(
        GaussianNB().fit(X, y).predict_proba(X_all), index=X_all.index, columns=[0, 1, 2]
    )
    return [
        ("forest", FrozenEstimator(forest)),
        ("lr", make_pipeline(StandardScaler(), LogisticRegression(max_iter=500))),
        ("net", TorchModel(net, output="logits")),
        ("stored", PrecomputedModel(stored)),
    ]


def subprocess_env() -> dict:
    """The environment of a fresh interpreter that imports the project and these helpers."""
    env = dict(os.environ)
    paths = [str(TESTS), str(TESTS.parent)] + [p for p in sys.path if p]
    env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(paths))
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


def proba_equal(a, b, atol=0.0):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=0, atol=atol)

"""Rank statistics for certification on a station that has numpy only (no scikit-learn).

:func:`auroc` is the Mann-Whitney form of the ROC area, with ties counted half, which is what
``sklearn.metrics.roc_auc_score`` computes (tests check the two agree).
"""

from __future__ import annotations

import math

import numpy as np


def ranks(x: np.ndarray) -> np.ndarray:
    """0-based ranks of ``x`` with ties given their average rank."""
    x = np.asarray(x).ravel()
    order = np.argsort(x, kind="mergesort")
    ranked = np.empty(len(x), dtype=np.float64)
    ranked[order] = np.arange(len(x), dtype=np.float64)
    _, inverse, counts = np.unique(x, return_inverse=True, return_counts=True)
    return (np.bincount(inverse, weights=ranked) / counts)[inverse]


def pearson(a: np.ndarray, b: np.ndarray) -> float:
    """Pearson r of two arrays (flattened); 1.0 for two equal constants, NaN for one constant."""
    a, b = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
    if a.std() == 0 or b.std() == 0:
        return 1.0 if np.array_equal(a, b) else math.nan
    return float(np.corrcoef(a, b)[0, 1])


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    return pearson(ranks(a), ranks(b))


def auroc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Area under the ROC curve of ``scores`` for binary ``labels``; NaN without both classes."""
    labels = np.asarray(labels).ravel().astype(bool)
    scores = np.asarray(scores, np.float64).ravel()
    n_pos, n_neg = int(labels.sum()), int((~labels).sum())
    if n_pos == 0 or n_neg == 0:
        return math.nan
    positive_rank_sum = ranks(scores)[labels].sum() + n_pos  # 1-based
    return float((positive_rank_sum - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))

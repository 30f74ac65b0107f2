"""Evaluation metrics (seed-spec, "Metrics report"), as pure functions over arrays.

``y_true`` [N, C] of 0/1, ``y_prob`` [N, C] probabilities, ``y_pred`` [N, C] 0/1. A class
with only one label value has no AUC: it is NaN (with a warning) and means skip it.
"""

from __future__ import annotations

import warnings

import numpy as np
from sklearn.metrics import (
    accuracy_score,
    brier_score_loss,
    f1_score,
    hamming_loss,
    label_ranking_average_precision_score,
    multilabel_confusion_matrix,
    precision_score,
    recall_score,
    roc_auc_score,
)


def auc_per_class(y_true: np.ndarray, y_prob: np.ndarray) -> np.ndarray:
    out = np.full(y_true.shape[1], np.nan)
    for c in range(y_true.shape[1]):
        if len(np.unique(y_true[:, c])) == 2:
            out[c] = roc_auc_score(y_true[:, c], y_prob[:, c])
        else:
            warnings.warn(f"class {c} has a single label value: AUC undefined (NaN)", stacklevel=2)
    return out


def mean_auc(y_true: np.ndarray, y_prob: np.ndarray) -> float:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        aucs = auc_per_class(y_true, y_prob)
    return float(np.nanmean(aucs)) if np.isfinite(aucs).any() else float("nan")


def lrap(y_true: np.ndarray, y_prob: np.ndarray) -> float:
    """Label ranking average precision over the samples that have at least one label."""
    has = y_true.sum(axis=1) > 0
    return float(label_ranking_average_precision_score(y_true[has], y_prob[has])) if has.any() else float("nan")


def summary(y_true: np.ndarray, y_prob: np.ndarray, y_pred: np.ndarray) -> dict:
    """Every scalar metric of the spec, plus per-class lists, in one dict."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        aucs = auc_per_class(y_true, y_prob)
    return {
        "n": int(len(y_true)),
        "exact_match": float(accuracy_score(y_true, y_pred)),
        "hamming_loss": float(hamming_loss(y_true, y_pred)),
        "accuracy": float((y_true == y_pred).mean()),
        "recall_micro": float(recall_score(y_true, y_pred, average="micro", zero_division=0.0)),
        "recall_macro": float(recall_score(y_true, y_pred, average="macro", zero_division=0.0)),
        "precision_micro": float(precision_score(y_true, y_pred, average="micro", zero_division=0.0)),
        "precision_macro": float(precision_score(y_true, y_pred, average="macro", zero_division=0.0)),
        "f1_micro": float(f1_score(y_true, y_pred, average="micro", zero_division=0.0)),
        "f1_macro": float(f1_score(y_true, y_pred, average="macro", zero_division=0.0)),
        "lrap": lrap(y_true, y_prob),
        "mean_auc": float(np.nanmean(aucs)) if np.isfinite(aucs).any() else float("nan"),
        "auc": aucs.tolist(),
        "f1": f1_score(y_true, y_pred, average=None, zero_division=0.0).tolist(),
        "brier": [float(brier_score_loss(y_true[:, c], y_prob[:, c])) for c in range(y_true.shape[1])],
        "confusion": multilabel_confusion_matrix(y_true, y_pred).tolist(),  # per class [[tn, fp], [fn, tp]]
    }


def bootstrap_ci(y_true: np.ndarray, y_prob: np.ndarray, y_pred: np.ndarray, n: int = 1000,
                 seed: int = 0, level: float = 0.95) -> dict:
    """Percentile bootstrap (resampling images) of mean AUC and macro F1: {metric: (lo, hi)}."""
    rng = np.random.default_rng(seed)
    aucs, f1s = [], []
    for _ in range(n):
        idx = rng.integers(0, len(y_true), len(y_true))
        aucs.append(mean_auc(y_true[idx], y_prob[idx]))
        f1s.append(f1_score(y_true[idx], y_pred[idx], average="macro", zero_division=0.0))
    q = [(1 - level) / 2 * 100, (1 + level) / 2 * 100]
    aucs = np.asarray(aucs)
    # no resample with a defined AUC (no finding with both labels): NaN, not numpy's All-NaN warning
    auc_ci = np.nanpercentile(aucs, q) if np.isfinite(aucs).any() else (np.nan, np.nan)
    return {"mean_auc": tuple(float(v) for v in auc_ci),
            "f1_macro": tuple(float(v) for v in np.percentile(f1s, q))}

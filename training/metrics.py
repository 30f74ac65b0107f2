"""Evaluation metrics of a training run (seed-spec, "Metrics report"), as pure functions over arrays.

``y_true`` [N, C] of 0/1, ``y_prob`` [N, C] probabilities, ``y_pred`` [N, C] 0/1. A class
with only one label value has no AUC: it is NaN (with a warning) and means skip it. AUROC and
the bootstrap by patient are :mod:`cxr_batch.metrics`, the implementation ``cxr-batch
evaluate`` uses, so a model card's numbers and a site's are computed the same way.
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
)

from cxr_batch import metrics as shared


def auc_per_class(y_true: np.ndarray, y_prob: np.ndarray) -> np.ndarray:
    out = shared.auroc_per_finding(y_true, y_prob)
    for c in np.flatnonzero(np.isnan(out)):
        warnings.warn(f"class {c} has a single label value: AUC undefined (NaN)", stacklevel=2)
    return out


mean_auc = shared.mean_auroc  # over the classes with both labels


def lrap(y_true: np.ndarray, y_prob: np.ndarray) -> float:
    """Label ranking average precision exactly as scikit-learn defines it: over every sample,
    a sample without any label (No Finding) counting 1 (the study's metric; an earlier version
    dropped those samples)."""
    return float(label_ranking_average_precision_score(y_true, y_prob)) if len(y_true) else float("nan")


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


def bootstrap_ci(y_true: np.ndarray, y_prob: np.ndarray, y_pred: np.ndarray, groups: np.ndarray, n: int = 1000,
                 seed: int = 0, level: float = shared.LEVEL) -> dict:
    """Bootstrap by patient (``groups`` [N]) of mean AUC, macro F1 and each class's AUC, as
    :mod:`cxr_batch.metrics` defines it: resamples keep every class that has both labels in
    the data with both labels, so a mean never averages over fewer classes. Returns
    {"mean_auc": (lo, hi) or None, "f1_macro": (lo, hi) or None, "auc": [(lo, hi) or None per
    class], "notes": {what: why there is no interval or how many resamples were redrawn}}."""
    present = [c for c in range(y_true.shape[1]) if shared.has_both_labels(y_true[:, c])]

    def macro_f1(weights):
        return [f1_score(y_true, y_pred, average="macro", sample_weight=w, zero_division=0.0) for w in weights]

    def pair(interval):
        return None if interval.low is None else (interval.low, interval.high)

    auc = shared.mean_auroc_interval(y_true, y_prob, groups, n, seed, level)
    f1 = shared.bootstrap_interval(macro_f1, groups, lambda w: shared.both_labels_present(y_true[:, present], w), n,
                                   seed, level)
    per_class = [shared.auroc_interval(y_true[:, c], y_prob[:, c], groups, n, seed, level)
                 for c in range(y_true.shape[1])]
    notes = {"mean_auc": auc.note, "f1_macro": f1.note, **{f"auc[{c}]": i.note for c, i in enumerate(per_class) if i.note}}
    return {"mean_auc": pair(auc), "f1_macro": pair(f1), "auc": [pair(i) for i in per_class], "notes": notes}

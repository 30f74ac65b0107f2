"""Evaluation metrics as pure functions (arrays in, numbers out), shared by ``cxr-batch evaluate``
and the training evaluation so that a site's numbers and a model card's come from one
implementation. Only numpy and scikit-learn; tests/test_metrics.py checks them against
scikit-learn on small hand cases.

Conventions: ``y`` [N] or [N, C] of 0/1, ``p`` probabilities of the same shape, ``groups`` [N]
the patient of each image (the unit a bootstrap resamples), ``weights`` [B, N] how many times
each image is drawn in each of B resamples.

Definitions (written into every evaluation so a reader need not guess):

- AUROC of a finding: scikit-learn's ``roc_auc_score``; undefined (NaN) when the finding has only
  one label value. Mean AUROC: the mean over the findings that have both labels.
- Bootstrap: patients are drawn with replacement and bring all their images (a cluster
  bootstrap: a patient's images are not independent); a resample in which a finding of the
  statistic lacks positives or negatives is drawn again, so every resample averages over the
  same findings. Percentile interval. A finding with fewer than ``MIN_CI_PATIENTS`` positive
  (or negative) patients gets no interval and a note saying why.
- ECE: over all image-finding pairs pooled (or one finding's), ``ECE_BINS`` equal-width bins
  of the predicted probability, the same bins as ``sklearn.calibration.calibration_curve``
  (``strategy="uniform"``): sum over bins of (pairs in bin / pairs) x |observed frequency -
  mean predicted probability|.
- Brier: mean squared difference between probability and label over the pairs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

ECE_BINS = 15
MIN_CI_PATIENTS = 5  # positive and negative patients a finding needs for a bootstrap interval
LEVEL = 0.95
# the fewest resamples a 95% percentile interval may come from (0: no interval): with fewer, each
# tail rests on a handful of resamples ('--bootstrap 1' printed "95% CI 0.583-0.583" beside a
# mean AUROC of 0.574). `cxr-batch evaluate --bootstrap` and `cxr-batch train`'s bootstrap both hold to it.
MIN_RESAMPLES = 200


# ---------------------------------------------------------------- ranking
def has_both_labels(y: np.ndarray) -> bool:
    y = np.asarray(y)
    return bool(y.size) and bool((y == 1).any() and (y == 0).any())


def auroc(y: np.ndarray, p: np.ndarray) -> float:
    """AUROC of one finding, y, p [N]; NaN when y has one label value."""
    from sklearn.metrics import roc_auc_score  # here: the CLI reads MIN_RESAMPLES, and --help stays fast

    return float(roc_auc_score(y, p)) if has_both_labels(y) else float("nan")


def auroc_per_finding(y: np.ndarray, p: np.ndarray) -> np.ndarray:
    """[C] AUROC per column of y, p [N, C]; NaN for a column with one label value."""
    return np.array([auroc(y[:, c], p[:, c]) for c in range(y.shape[1])])


def mean_auroc(y: np.ndarray, p: np.ndarray) -> float:
    """Mean AUROC over the columns that have both labels; NaN when none has."""
    aucs = auroc_per_finding(y, p)
    return float(np.nanmean(aucs)) if np.isfinite(aucs).any() else float("nan")


def resampled_auroc(y: np.ndarray, p: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """AUROC of y, p [N] under each row of ``weights`` [B, N] at once: the weighted Mann-Whitney
    statistic with ties counted half, which is what ``roc_auc_score(y, p, sample_weight=w)``
    computes for each row w. NaN where a row has no positive or no negative weight."""
    order = np.argsort(p, kind="mergesort")
    ps, ys = np.asarray(p)[order], np.asarray(y)[order].astype(float)
    w = np.asarray(weights, dtype=float)[:, order]
    starts = np.flatnonzero(np.r_[True, ps[1:] != ps[:-1]])  # one group per tied score
    pos = np.add.reduceat(w * ys, starts, axis=1)
    neg = np.add.reduceat(w * (1.0 - ys), starts, axis=1)
    below = np.cumsum(neg, axis=1) - neg  # negative weight strictly below each group's score
    n_pos, n_neg = pos.sum(axis=1), neg.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        out = (pos * (below + 0.5 * neg)).sum(axis=1) / (n_pos * n_neg)
    out[(n_pos == 0) | (n_neg == 0)] = np.nan
    return out


# ---------------------------------------------------------------- bootstrap by patient
def patient_weights(groups: np.ndarray, n_resamples: int, rng: np.random.Generator) -> np.ndarray:
    """[n_resamples, N]: patients drawn with replacement (as many as there are), each image
    weighted by how many times its patient was drawn."""
    _, inverse = np.unique(np.asarray(groups, dtype=str), return_inverse=True)
    g = int(inverse.max()) + 1 if len(inverse) else 0
    draws = rng.integers(0, g, (n_resamples, g)) + g * np.arange(n_resamples)[:, None]
    counts = np.bincount(draws.ravel(), minlength=n_resamples * g).reshape(n_resamples, g)
    return counts[:, inverse].astype(float)


def both_labels_present(y: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """[B] True where every column of y [N, C] has positive and negative weight."""
    y = np.asarray(y, dtype=float).reshape(len(y), -1)
    return ((weights @ y > 0) & (weights @ (1.0 - y) > 0)).all(axis=1)


@dataclass
class Interval:
    """A bootstrap interval, or why there is none (``low``/``high`` None and ``note`` says why)."""

    low: float | None
    high: float | None
    resamples: int  # resamples kept
    drawn: int  # resamples drawn (kept + drawn again because a label was missing)
    note: str = ""

    def to_dict(self) -> dict:
        return {"ci": None if self.low is None else [self.low, self.high], "resamples": self.resamples,
                "drawn": self.drawn, "note": self.note}


def bootstrap_interval(statistic: Callable[[np.ndarray], np.ndarray], groups: np.ndarray,
                       valid: Callable[[np.ndarray], np.ndarray] | None = None, n_resamples: int = 1000,
                       seed: int = 0, level: float = LEVEL, max_draw_factor: int = 50) -> Interval:
    """Percentile interval of ``statistic(weights [b, N]) -> [b]`` over patient resamples.
    Resamples where ``valid(weights)`` is False are drawn again, at most
    ``max_draw_factor x n_resamples`` draws in all; with fewer than half the resamples kept
    there is no interval."""
    if n_resamples <= 0:
        return Interval(None, None, 0, 0, "bootstrap off")
    rng = np.random.default_rng(seed)
    values, masks, kept = [], [], 0
    while kept < n_resamples and sum(len(m) for m in masks) < max_draw_factor * n_resamples:
        weights = patient_weights(groups, max(50, min(n_resamples, 250)), rng)
        mask = valid(weights) if valid is not None else np.ones(len(weights), dtype=bool)
        masks.append(mask)
        if mask.any():
            values.append(np.asarray(statistic(weights[mask]), dtype=float))
            kept += int(mask.sum())
    mask = np.concatenate(masks)
    if kept < n_resamples / 2:
        return Interval(None, None, kept, len(mask),
                        f"only {kept} of {len(mask)} resamples had both labels for every finding: no CI")
    kept = min(kept, n_resamples)
    drawn = int(np.flatnonzero(mask)[kept - 1]) + 1  # draws up to the last resample kept
    values = np.concatenate(values)[:kept]
    q = 100 * np.array([(1 - level) / 2, (1 + level) / 2])
    low, high = np.nanpercentile(values, q)
    return Interval(float(low), float(high), kept, drawn)


def patients_per_label(y: np.ndarray, groups: np.ndarray) -> tuple[int, int]:
    """(patients with a positive image, patients with a negative image) for one finding."""
    y, groups = np.asarray(y), np.asarray(groups, dtype=str)
    return len(set(groups[y == 1])), len(set(groups[y == 0]))


def auroc_interval(y: np.ndarray, p: np.ndarray, groups: np.ndarray, n_resamples: int = 1000, seed: int = 0,
                   level: float = LEVEL) -> Interval:
    """Bootstrap-by-patient interval of one finding's AUROC (y, p [N]); none, with the reason,
    when it has fewer than MIN_CI_PATIENTS positive or negative patients."""
    pos, neg = patients_per_label(y, groups)
    if min(pos, neg) < MIN_CI_PATIENTS:
        which = f"{pos} positive" if pos < MIN_CI_PATIENTS else f"{neg} negative"
        return Interval(None, None, 0, 0, f"{which} patient(s): no CI (needs {MIN_CI_PATIENTS})")
    return bootstrap_interval(lambda w: resampled_auroc(y, p, w), groups, lambda w: both_labels_present(y, w),
                              n_resamples, seed, level)


def mean_auroc_interval(y: np.ndarray, p: np.ndarray, groups: np.ndarray, n_resamples: int = 1000, seed: int = 0,
                        level: float = LEVEL) -> Interval:
    """Bootstrap-by-patient interval of the mean AUROC over the columns of y, p [N, C] that have
    both labels; every kept resample has both labels in each of those columns."""
    cols = [c for c in range(y.shape[1]) if has_both_labels(y[:, c])]
    if not cols:
        return Interval(None, None, 0, 0, "no finding has both labels: no AUROC")

    def statistic(w):
        return np.mean([resampled_auroc(y[:, c], p[:, c], w) for c in cols], axis=0)

    interval = bootstrap_interval(statistic, groups, lambda w: both_labels_present(y[:, cols], w), n_resamples,
                                  seed, level)
    if interval.low is not None and interval.drawn > interval.resamples:
        interval.note = (f"{interval.drawn - interval.resamples} of {interval.drawn} resamples lacked positives or "
                         f"negatives of a finding and were drawn again")
    return interval


# ---------------------------------------------------------------- calibration
def reliability(y: np.ndarray, p: np.ndarray, n_bins: int = ECE_BINS) -> dict:
    """Equal-width bins of p over [0, 1] (all values pooled): per bin the number of pairs, the
    mean predicted probability and the observed frequency (None in an empty bin)."""
    y, p = np.ravel(y).astype(float), np.ravel(p).astype(float)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    ids = np.searchsorted(edges[1:-1], p)  # as sklearn.calibration.calibration_curve
    count = np.bincount(ids, minlength=n_bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_p = np.bincount(ids, weights=p, minlength=n_bins) / count
        observed = np.bincount(ids, weights=y, minlength=n_bins) / count
    return {"edges": edges.tolist(), "count": count.tolist(),
            "mean_predicted": [None if c == 0 else float(v) for c, v in zip(count, mean_p)],
            "observed": [None if c == 0 else float(v) for c, v in zip(count, observed)]}


def ece(y: np.ndarray, p: np.ndarray, n_bins: int = ECE_BINS) -> float:
    """Expected calibration error over all pairs of y, p (any shape, pooled)."""
    r = reliability(y, p, n_bins)
    total = sum(r["count"])
    if total == 0:
        return float("nan")
    return float(sum(c / total * abs(o - m) for c, o, m in zip(r["count"], r["observed"], r["mean_predicted"]) if c))


def brier(y: np.ndarray, p: np.ndarray) -> float:
    """Mean squared error of probabilities over all pairs (any shape, pooled)."""
    y, p = np.asarray(y, dtype=float), np.asarray(p, dtype=float)
    return float(np.mean((p - y) ** 2)) if y.size else float("nan")


def brier_of_constant(y: np.ndarray, prevalence: np.ndarray) -> float:
    """Brier score of predicting ``prevalence`` [C] for every image, y [N, C]: the bar a model's
    probabilities must beat to carry information beyond how common each finding is."""
    y = np.asarray(y, dtype=float)
    return brier(y, np.broadcast_to(np.asarray(prevalence, dtype=float), y.shape))


# ---------------------------------------------------------------- operating point
def _ratio(a: int, b: int) -> float | None:
    return a / b if b else None


def operating_point(y: np.ndarray, flag: np.ndarray) -> dict:
    """Counts and rates of one finding's flags (y, flag [N] of 0/1); a rate whose denominator
    is zero is None."""
    y, flag = np.asarray(y).astype(bool), np.asarray(flag).astype(bool)
    tp, fp = int((y & flag).sum()), int((~y & flag).sum())
    fn, tn = int((y & ~flag).sum()), int((~y & ~flag).sum())
    return {"tp": tp, "fp": fp, "fn": fn, "tn": tn, "sensitivity": _ratio(tp, tp + fn),
            "specificity": _ratio(tn, tn + fp), "ppv": _ratio(tp, tp + fp), "npv": _ratio(tn, tn + fn)}

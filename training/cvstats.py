"""Pure functions for patient-level cross-validation: folds, calibration metrics, patient
bootstrap, combination of image and patient-data evidence, and threshold grids.

Everything here takes and returns NumPy arrays (or small dicts) so each rule is checked on
hand cases and against scikit-learn in ``tests/test_crossval.py``. Arrays follow the training
module's layout: ``y`` [N, C] of 0/1, probabilities or logits [N, C], C = 14 findings.
"""

from __future__ import annotations

import warnings

import numpy as np
from sklearn.metrics import roc_auc_score

# ---------------------------------------------------------------- folds


def rarest_finding_strata(y: np.ndarray) -> np.ndarray:
    """One stratum per row for multi-label data: the index of the row's rarest positive finding
    (rarest by count over all rows), or -1 for a row without findings. Stratifying on it spreads
    every finding's positives over the folds far better than the full label string does."""
    counts = y.sum(axis=0)
    order = np.where(y > 0, counts[None, :], np.inf)
    rarest = np.argmin(order, axis=1)
    return np.where(y.sum(axis=1) > 0, rarest, -1)


def assign_folds(y: np.ndarray, patients: np.ndarray, k: int, seed: int) -> np.ndarray:
    """Fold number (0..k-1) per row: every image of a patient in one fold, stratified on
    :func:`rarest_finding_strata` (``StratifiedGroupKFold``, shuffled with ``seed``)."""
    from sklearn.model_selection import StratifiedGroupKFold

    fold = np.full(len(y), -1, dtype=int)
    sgkf = StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=seed)
    with warnings.catch_warnings():  # strata smaller than k: expected for the rarest findings
        warnings.simplefilter("ignore", UserWarning)
        for f, (_, held) in enumerate(sgkf.split(np.zeros(len(y)), rarest_finding_strata(y), patients)):
            fold[held] = f
    return fold


# ---------------------------------------------------------------- ranking and calibration


def logit(p: np.ndarray, eps: float = 1e-6) -> np.ndarray:
    p = np.clip(p, eps, 1 - eps)
    return np.log(p / (1 - p))


def sigmoid(z: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-z))


def auc_per_class(y: np.ndarray, score: np.ndarray) -> np.ndarray:
    """AUROC per column; NaN where a column has a single label value."""
    out = np.full(y.shape[1], np.nan)
    for c in range(y.shape[1]):
        if 0 < y[:, c].sum() < len(y):
            out[c] = roc_auc_score(y[:, c], score[:, c])
    return out


def mean_auc(y: np.ndarray, score: np.ndarray) -> float:
    a = auc_per_class(y, score)
    return float(np.nanmean(a)) if np.isfinite(a).any() else float("nan")


def fast_auc(y: np.ndarray, score: np.ndarray) -> np.ndarray:
    """AUROC per column by the rank-sum (Mann-Whitney) formula with average ranks for ties;
    equal to ``roc_auc_score`` and about 20x faster (the bootstrap calls it thousands of times)."""
    from scipy.stats import rankdata

    ranks = rankdata(score, axis=0)
    pos = y.sum(axis=0)
    neg = len(y) - pos
    with np.errstate(invalid="ignore", divide="ignore"):
        auc = ((ranks * y).sum(axis=0) - pos * (pos + 1) / 2) / (pos * neg)
    return np.where((pos > 0) & (neg > 0), auc, np.nan)


def brier(y: np.ndarray, p: np.ndarray) -> float:
    """Pooled Brier score: mean squared error over every image-finding pair."""
    return float(np.mean((p - y) ** 2))


def brier_reference(y: np.ndarray, prevalence: np.ndarray) -> float:
    """Brier score of predicting ``prevalence`` (per finding [C], or per row [N, C]) for everyone."""
    return brier(y, np.broadcast_to(prevalence, y.shape))


def ece(y: np.ndarray, p: np.ndarray, bins: int = 10) -> float:
    """Expected calibration error over all values of ``p`` pooled (every image-finding pair):
    :func:`cxr_batch.metrics.ece`, the definition ``cxr-batch evaluate`` uses (``bins``
    equal-width bins of [0, 1] as ``sklearn.calibration.calibration_curve`` makes them), so a
    model card's out-of-fold figure and a site's are the same measure."""
    from cxr_batch import metrics

    return metrics.ece(y, p, bins)


def reliability_table(y: np.ndarray, p: np.ndarray, bins: int = 10) -> list[dict]:
    """Per equal-width bin (those of :func:`ece`): range, count, mean predicted probability,
    observed frequency."""
    from cxr_batch import metrics

    r = metrics.reliability(y, p, bins)
    return [{"lo": b / bins, "hi": (b + 1) / bins, "n": n, "mean_predicted": m, "observed": o}
            for b, (n, m, o) in enumerate(zip(r["count"], r["mean_predicted"], r["observed"]))]


# ---------------------------------------------------------------- patient bootstrap


def patient_bootstrap_indices(patients: np.ndarray, y: np.ndarray, n: int, seed: int,
                              max_tries: int = 100) -> tuple[list[np.ndarray], int]:
    """``n`` bootstrap resamples of *patients* (each drawn patient brings all its images), each
    keeping every finding present with both label values; a resample that loses one is redrawn.
    Returns (row indices per resample, number of redrawn resamples)."""
    rng = np.random.default_rng(seed)
    uniq, inverse = np.unique(patients, return_inverse=True)
    rows_of = [np.flatnonzero(inverse == g) for g in range(len(uniq))]
    single = all(len(r) == 1 for r in rows_of)
    order = np.array([r[0] for r in rows_of]) if single else None
    out, redrawn = [], 0
    for _ in range(n):
        for _try in range(max_tries):
            pick = rng.integers(0, len(uniq), len(uniq))
            idx = order[pick] if single else np.concatenate([rows_of[g] for g in pick])
            pos = y[idx].sum(axis=0)
            if ((pos > 0) & (pos < len(idx))).all():
                break
            redrawn += 1
        else:
            raise ValueError("cannot draw a resample with every finding present; too few positives")
        out.append(idx)
    return out, redrawn


def percentile_ci(values, level: float = 0.95) -> tuple[float, float]:
    v = np.asarray(values, dtype=float)
    v = v[np.isfinite(v)]
    q = [(1 - level) / 2 * 100, (1 + level) / 2 * 100]
    return float(np.percentile(v, q[0])), float(np.percentile(v, q[1]))


def bootstrap_mean_auc(y: np.ndarray, scores: dict[str, np.ndarray], resamples: list[np.ndarray]) -> dict:
    """Mean AUROC of each named score on each resample: {name: array [B]}."""
    return {k: np.array([np.nanmean(fast_auc(y[i], s[i])) for i in resamples]) for k, s in scores.items()}


def paired_difference(y: np.ndarray, a: np.ndarray, b: np.ndarray, resamples: list[np.ndarray]) -> dict:
    """Mean AUROC of ``a`` minus that of ``b`` on the same patients, with a paired percentile CI
    and the share of resamples in which ``a`` is not better."""
    diff = np.array([np.nanmean(fast_auc(y[i], a[i])) - np.nanmean(fast_auc(y[i], b[i])) for i in resamples])
    point = mean_auc(y, a) - mean_auc(y, b)
    lo, hi = percentile_ci(diff)
    return {"difference": float(point), "ci95": [lo, hi], "share_not_better": float(np.mean(diff <= 0))}


def paired_metric_difference(y: np.ndarray, a: np.ndarray, b: np.ndarray, resamples: list[np.ndarray], metric) -> dict:
    """As :func:`paired_difference` for any metric(y, p) -> float (e.g. Brier)."""
    diff = np.array([metric(y[i], a[i]) - metric(y[i], b[i]) for i in resamples])
    lo, hi = percentile_ci(diff)
    return {"difference": float(metric(y, a) - metric(y, b)), "ci95": [lo, hi]}


# ---------------------------------------------------------------- combination / calibration


# method -> (image weights, prior weights): None (input unused), "shared" (one weight for all
# findings) or "per_finding"; "sum" fixes both weights at 1.
COMBINATIONS = {
    "prior_only": (None, "shared"),
    "image_only": ("per_finding", None),
    "shared": ("shared", "shared"),
    "image_per_finding": ("per_finding", "shared"),
    "per_finding": ("per_finding", "per_finding"),
}
UNPENALISED = 10.0  # column scale that makes the L2 penalty on a coefficient 100x weaker


def fit_combination(z_image: np.ndarray, z_prior: np.ndarray, y: np.ndarray, method: str, C: float = 1.0) -> dict:
    """Fit how image logits [N, K] and patient-prior logits [N, K] combine into calibrated
    log-odds, per finding k: ``a_k * z_image_k + c_k * z_prior_k + b_k``. Methods:

    - "sum": a = c = 1, only the intercepts b fitted (weight 1 + intercept recalibration);
    - "prior_only": a = 0, one c for all findings (the metadata-only model, calibrated; its
      ranking within each finding is the full-table regression's);
    - "image_only": c = 0, a per finding;
    - "shared": one a and one c for all findings;
    - "image_per_finding": a per finding, one c;
    - "per_finding": a and c per finding.

    One logistic regression on the stacked (image, finding) pairs, with an own intercept per
    finding. The image weights carry an L2 penalty 1/C (shrinkage towards "no image evidence");
    intercepts and prior weights are in effect unpenalised (columns scaled by 10). Weights are
    kept >= 0: evidence that ranks the wrong way on the development images is dropped, not
    flipped (the prior's direction comes from ~10^5 patients). Returns {"a", "c", "b": [K], "method"}.
    """
    N, K = y.shape
    if method == "sum":
        b = [_fit_offset(z_image[:, k] + z_prior[:, k], y[:, k]) for k in range(K)]
        return {"a": [1.0] * K, "c": [1.0] * K, "b": b, "method": method}
    if method not in COMBINATIONS:
        raise ValueError(f"unknown combination method {method!r}: sum or one of {sorted(COMBINATIONS)}")
    image_mode, prior_mode = COMBINATIONS[method]
    eye = np.repeat(np.eye(K)[None], N, axis=0).reshape(N * K, K)
    blocks, names = [], []  # names: ("a"|"c", finding or None), one per weight column

    def add(z, mode, name, scale):
        if mode == "shared":
            blocks.append(z.reshape(-1, 1) * scale)
            names.append((name, None, scale))
        elif mode == "per_finding":
            blocks.append(eye * z.reshape(-1, 1) * scale)
            names.extend((name, k, scale) for k in range(K))

    add(z_image, image_mode, "a", 1.0)
    add(z_prior, prior_mode, "c", UNPENALISED)
    n_w = len(names)
    x = np.column_stack(blocks + [eye * UNPENALISED])
    yy = y.reshape(-1)
    keep = list(range(x.shape[1]))
    while True:
        w = np.zeros(x.shape[1])
        w[keep] = _stacked_logreg(x[:, keep], yy, C)
        negative = [i for i in range(n_w) if i in keep and w[i] < 0]
        if not negative:
            break
        keep.remove(min(negative, key=lambda i: w[i]))  # drop the most negative, refit
    a, c = np.zeros(K), np.zeros(K)
    for i, (name, k, scale) in enumerate(names):
        target = a if name == "a" else c
        if k is None:
            target[:] = w[i] * scale
        else:
            target[k] = w[i] * scale
    b = w[n_w:] * UNPENALISED
    return {"a": a.tolist(), "c": c.tolist(), "b": b.tolist(), "method": method}


def apply_combination(params: dict, z_image: np.ndarray, z_prior: np.ndarray) -> np.ndarray:
    """Calibrated log-odds [N, K] from fitted parameters."""
    return np.asarray(params["a"]) * z_image + np.asarray(params["c"]) * z_prior + np.asarray(params["b"])


def _stacked_logreg(x: np.ndarray, y: np.ndarray, C: float) -> np.ndarray:
    from sklearn.linear_model import LogisticRegression

    return LogisticRegression(C=C, max_iter=10000, fit_intercept=False, tol=1e-8).fit(x, y).coef_[0].astype(float)


def _fit_offset(z: np.ndarray, y: np.ndarray) -> float:
    """The intercept b maximising the likelihood of y under sigmoid(z + b) (Newton steps)."""
    b = float(logit(np.array([np.clip(y.mean(), 1e-3, 1 - 1e-3)]))[0] - np.mean(z))
    for _ in range(100):
        p = sigmoid(z + b)
        step = np.sum(p - y) / (np.sum(p * (1 - p)) + 1e-12)
        b -= step
        if abs(step) < 1e-12:
            break
    return float(b)


def cross_fit(z_image: np.ndarray, z_prior: np.ndarray, y: np.ndarray, folds: np.ndarray, method: str,
              C: float = 1.0) -> np.ndarray:
    """Out-of-fold calibrated probabilities: for each fold, the combination fitted on the other
    folds' rows is applied to this fold's rows."""
    p = np.zeros(y.shape)
    for f in np.unique(folds):
        tr, te = folds != f, folds == f
        params = fit_combination(z_image[tr], z_prior[tr], y[tr], method, C)
        p[te] = sigmoid(apply_combination(params, z_image[te], z_prior[te]))
    return p


# ---------------------------------------------------------------- thresholds


GRID_001 = np.round(np.arange(0.01, 0.99 + 1e-9, 0.01), 2)


def grid_thresholds(y: np.ndarray, p: np.ndarray, method: str, grid: np.ndarray = GRID_001,
                    precision_min: float = 0.30) -> np.ndarray:
    """Per finding, a threshold from ``grid`` (predict positive when p >= t):

    - "youden": maximise TPR - FPR;
    - "f1": maximise F1;
    - "precision_f1": among thresholds with precision >= ``precision_min`` the best F1, else the
      best F1 overall (as ``training.thresholds.precision_constrained``, on a finer grid).

    Ties go to the highest threshold (fewer flags)."""
    K = y.shape[1]
    out = np.full(K, 0.5)
    for k in range(K):
        yk = y[:, k].astype(bool)
        pred = p[:, k][:, None] >= grid[None, :]  # [N, G]
        tp = (pred & yk[:, None]).sum(0)
        fp = (pred & ~yk[:, None]).sum(0)
        pos, neg = yk.sum(), (~yk).sum()
        if pos == 0 or neg == 0:
            continue
        with np.errstate(invalid="ignore", divide="ignore"):
            precision = np.where(tp + fp > 0, tp / (tp + fp), 0.0)
            f1 = np.where(tp > 0, 2 * tp / (2 * tp + fp + (pos - tp)), 0.0)
        if method == "youden":
            score = tp / pos - fp / neg
        elif method == "f1":
            score = f1
        elif method == "precision_f1":
            ok = precision >= precision_min
            score = np.where(ok, f1, -1.0) if ok.any() else f1
        else:
            raise ValueError(f"unknown threshold method {method!r}")
        best = np.flatnonzero(score == score.max())
        out[k] = grid[best[-1]]
    return out


def cross_fit_thresholds(y: np.ndarray, p: np.ndarray, folds: np.ndarray, method: str, **kw) -> np.ndarray:
    """Out-of-fold flags [N, K]: thresholds chosen on the other folds, applied to this fold."""
    flags = np.zeros(y.shape, dtype=int)
    for f in np.unique(folds):
        tr, te = folds != f, folds == f
        flags[te] = (p[te] >= grid_thresholds(y[tr], p[tr], method, **kw)).astype(int)
    return flags


# ---------------------------------------------------------------- fold models -> final model


def alignment(reference_mean: np.ndarray, reference_sd: np.ndarray, z: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-finding (scale, shift) with ``scale * z + shift`` having the reference mean and sd.

    The combination is fitted on the fold models' logits; the exported model is another model
    (trained on all images). Matching its logits on its own training images to the fold models'
    logits on *their* training images (both in-sample, same epoch and weights) puts its logits on
    the scale the combination was fitted for."""
    mean, sd = z.mean(axis=0), z.std(axis=0)
    scale = np.where(sd > 0, reference_sd / np.where(sd > 0, sd, 1.0), 1.0)
    return scale, reference_mean - scale * mean

"""Per-class threshold searches (seed-spec, "Per-class thresholds"), as pure functions, shared
by training (on validation) and ``cxr-batch calibrate`` (on a site's labelled studies).

Each takes ``y_true`` [N, C] (0/1) and ``y_prob`` [N, C] and returns C thresholds.
"""

from __future__ import annotations

import math

import numpy as np
from sklearn.metrics import roc_curve

GRID = np.round(np.arange(0.10, 0.85 + 1e-9, 0.05), 2)  # the study's grid
# For calibrated probabilities: a rare finding's well-calibrated probabilities sit far below 0.10.
FINE_GRID = np.round(np.arange(0.01, 0.99 + 1e-9, 0.01), 2)


def youden(y_true: np.ndarray, y_prob: np.ndarray) -> np.ndarray:
    """Per class, the threshold maximising TPR - FPR; 0.5 where a class has one label value."""
    out = np.full(y_true.shape[1], 0.5)
    for c in range(y_true.shape[1]):
        if len(np.unique(y_true[:, c])) < 2:
            continue
        fpr, tpr, thr = roc_curve(y_true[:, c], y_prob[:, c])
        best = np.argmax(tpr - fpr)
        out[c] = float(np.clip(thr[best], 0.0, 1.0))  # roc_curve's first threshold is inf
    return out


def _scores(y: np.ndarray, p: np.ndarray, grid: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Precision and F1 of the flags ``p >= t`` for every t of ``grid`` (0 where undefined, as
    scikit-learn's ``zero_division=0``), one class: y, p [N]."""
    y = np.asarray(y).astype(bool)
    pred = np.asarray(p)[:, None] >= np.asarray(grid)[None, :]
    tp = (pred & y[:, None]).sum(axis=0)
    fp = (pred & ~y[:, None]).sum(axis=0)
    fn = y.sum() - tp
    with np.errstate(invalid="ignore", divide="ignore"):
        precision = np.where(tp + fp > 0, tp / np.maximum(tp + fp, 1), 0.0)
        f1 = np.where(2 * tp + fp + fn > 0, 2 * tp / np.maximum(2 * tp + fp + fn, 1), 0.0)
    return precision, f1


def precision_constrained(y_true: np.ndarray, y_prob: np.ndarray, precision_min: float = 0.30,
                          grid: np.ndarray = GRID) -> tuple[np.ndarray, np.ndarray]:
    """Per class, scan ``grid`` and pick, among thresholds with precision >= precision_min,
    the one with the best F1 (the lowest such threshold on ties). When no threshold reaches
    the precision, the best-F1 threshold of the grid is taken. Returns (thresholds, best F1)."""
    C = y_true.shape[1]
    thresholds, best_f1 = np.full(C, 0.5), np.zeros(C)
    for c in range(C):
        precision, f1 = _scores(y_true[:, c], y_prob[:, c], grid)
        ok = precision >= precision_min
        pool = np.flatnonzero(ok) if ok.any() else np.arange(len(grid))
        best = pool[np.argmax(f1[pool])]  # argmax takes the first: the lowest threshold on ties
        thresholds[c], best_f1[c] = grid[best], f1[best]
    return thresholds, best_f1


def dynamic(y_true: np.ndarray, y_prob: np.ndarray, precision_min: float = 0.40, f1_floor: float = 0.30,
            step: float = 0.05, grid: np.ndarray = GRID) -> np.ndarray:
    """The study's choice: precision-constrained F1 with precision_min 0.40; where the best F1
    is still below ``f1_floor``, lower that threshold by ``step`` to favour recall."""
    thresholds, best_f1 = precision_constrained(y_true, y_prob, precision_min, grid)
    lowered = np.where(best_f1 < f1_floor, thresholds - step, thresholds)
    return np.round(np.clip(lowered, grid.min() - step, 1.0), 4)


def floor_significant(x: float, digits: int = 4) -> float:
    """``x`` > 0 rounded down to ``digits`` significant digits, never above ``x``. A rare finding
    at NIH's prevalence (Hernia: 0.2%) has probabilities of 0.001 and less: a fixed number of
    decimals would move its threshold by a large share of itself, or to 0."""
    if not x > 0:
        return float(x)
    unit = 10.0 ** (math.floor(math.log10(x)) - digits + 1)
    return min(math.floor(x / unit) * unit, float(x))  # min: x / unit * unit may round up by a bit


def at_sensitivity(y_true: np.ndarray, y_prob: np.ndarray, target: float = 0.90) -> np.ndarray:
    """Per class, the highest threshold (floored to 4 significant digits) whose flags ``p >= t``
    catch at least ``target`` of the positives; 0.5 where a class has no positives. Clipped into
    (0, 1), as :func:`at_specificity` (a threshold of 0 would flag every study). A positive at
    probability 0 is flagged by no threshold in (0, 1) (calibrate gives that to one whose flag the
    normal bucket never writes): a target beyond the others gets the lowest of them, not a
    threshold that flags every study (unless no positive is above 0)."""
    out = np.full(y_true.shape[1], 0.5)
    for c in range(y_true.shape[1]):
        positives = np.sort(y_prob[y_true[:, c] == 1, c])[::-1]
        if len(positives):
            k = min(max(1, int(np.ceil(target * len(positives) - 1e-9))), max(1, int((positives > 0).sum())))
            out[c] = floor_significant(float(positives[k - 1]))
    return np.clip(out, 1e-6, 1 - 1e-6)


def at_specificity(y_true: np.ndarray, y_prob: np.ndarray, target: float = 0.90) -> np.ndarray:
    """Per class, the lowest threshold whose flags ``p >= t`` leave at least ``target`` of the
    negatives unflagged (ties at the boundary stay unflagged, so the specificity is never below
    the target); 0.5 where a class has no negatives. Clipped into (0, 1)."""
    out = np.full(y_true.shape[1], 0.5)
    for c in range(y_true.shape[1]):
        negatives = np.sort(y_prob[y_true[:, c] == 0, c])[::-1]
        if len(negatives):
            allowed = int(np.floor((1 - target) * len(negatives) + 1e-9))  # false positives it may make
            boundary = negatives[min(allowed, len(negatives) - 1)]
            out[c] = float(np.nextafter(boundary, np.inf)) if allowed < len(negatives) else float(negatives[-1])
    return np.clip(out, 1e-6, 1 - 1e-6)


def parse_rule(text: str) -> tuple[str, float | None]:
    """A threshold rule as written on a command line: 'keep' (the bundle's operating points,
    moved with the calibration so that the same studies are flagged), 'precision_f1'
    (precision >= 0.30), 'precision_f1:P', 'youden', 'sensitivity:S' or 'specificity:S' ->
    (name, parameter). Raises ValueError."""
    name, _, value = text.strip().partition(":")
    name = name.strip().lower()  # 'Specificity:0.9' is no other rule than 'specificity:0.9'
    defaults = {"keep": None, "precision_f1": 0.30, "youden": None, "sensitivity": None, "specificity": None}
    if name not in defaults:
        import difflib

        from .findings import resolve_finding

        close = difflib.get_close_matches(name, list(defaults), n=1, cutoff=0.6)
        try:  # 'Pneumothorax:0.9': a newcomer expecting a threshold per finding
            resolve_finding(name)
            hint = " (a rule is one rule for every finding, not a finding's threshold)"
        except ValueError:
            hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ValueError(f"{text!r}{hint}: expected keep, precision_f1[:P], youden, sensitivity:S or specificity:S")
    if name in ("youden", "keep"):
        if value:
            raise ValueError(f"{text!r}: {name} takes no parameter")
        return name, None
    if not value and defaults[name] is None:
        raise ValueError(f"{text!r}: give the target, e.g. {name}:0.90")
    try:
        number = float(value) if value else defaults[name]
    except ValueError:
        raise ValueError(f"{text!r}: {value!r} is not a number") from None
    if not 0.0 < number < 1.0:
        raise ValueError(f"{text!r}: the parameter must be between 0 and 1")
    return name, number


def by_rule(rule: str, y_true: np.ndarray, y_prob: np.ndarray) -> np.ndarray:
    """Thresholds by a rule of :func:`parse_rule` on calibrated probabilities (fine grid)."""
    name, value = parse_rule(rule)
    if name == "keep":
        raise ValueError("'keep' chooses no threshold from data: the caller moves the bundle's own")
    if name == "youden":
        return youden(y_true, y_prob)
    if name == "sensitivity":
        return at_sensitivity(y_true, y_prob, value)
    if name == "specificity":
        return at_specificity(y_true, y_prob, value)
    return precision_constrained(y_true, y_prob, value, FINE_GRID)[0]

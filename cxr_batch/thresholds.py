"""Per-class threshold searches (seed-spec, "Per-class thresholds"), as pure functions, shared
by training (on validation) and ``cxr-batch calibrate`` (on a site's labelled studies).

Each takes ``y_true`` [N, C] (0/1) and ``y_prob`` [N, C] and returns C thresholds.
"""

from __future__ import annotations

import numpy as np
from sklearn.metrics import f1_score, precision_score, roc_curve

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


def _scores(y: np.ndarray, p: np.ndarray, t: float) -> tuple[float, float]:
    pred = (p >= t).astype(int)
    return (precision_score(y, pred, zero_division=0.0), f1_score(y, pred, zero_division=0.0))


def precision_constrained(y_true: np.ndarray, y_prob: np.ndarray, precision_min: float = 0.30,
                          grid: np.ndarray = GRID) -> tuple[np.ndarray, np.ndarray]:
    """Per class, scan ``grid`` and pick, among thresholds with precision >= precision_min,
    the one with the best F1 (the lowest such threshold on ties). When no threshold reaches
    the precision, the best-F1 threshold of the grid is taken. Returns (thresholds, best F1)."""
    C = y_true.shape[1]
    thresholds, best_f1 = np.full(C, 0.5), np.zeros(C)
    for c in range(C):
        scored = [(t, *_scores(y_true[:, c], y_prob[:, c], t)) for t in grid]
        ok = [s for s in scored if s[1] >= precision_min]
        pool = ok or scored
        t, _, f1 = max(pool, key=lambda s: (s[2], -s[0]))
        thresholds[c], best_f1[c] = t, f1
    return thresholds, best_f1


def dynamic(y_true: np.ndarray, y_prob: np.ndarray, precision_min: float = 0.40, f1_floor: float = 0.30,
            step: float = 0.05, grid: np.ndarray = GRID) -> np.ndarray:
    """The study's choice: precision-constrained F1 with precision_min 0.40; where the best F1
    is still below ``f1_floor``, lower that threshold by ``step`` to favour recall."""
    thresholds, best_f1 = precision_constrained(y_true, y_prob, precision_min, grid)
    lowered = np.where(best_f1 < f1_floor, thresholds - step, thresholds)
    return np.round(np.clip(lowered, grid.min() - step, 1.0), 4)


def at_sensitivity(y_true: np.ndarray, y_prob: np.ndarray, target: float = 0.90) -> np.ndarray:
    """Per class, the highest threshold (floored to 4 decimals) whose flags ``p >= t`` catch at
    least ``target`` of the positives; 0.5 where a class has no positives."""
    out = np.full(y_true.shape[1], 0.5)
    for c in range(y_true.shape[1]):
        positives = np.sort(y_prob[y_true[:, c] == 1, c])[::-1]
        if len(positives):
            k = max(1, int(np.ceil(target * len(positives) - 1e-9)))
            out[c] = max(np.floor(positives[k - 1] * 1e4) / 1e4, 1e-4)
    return out


def parse_rule(text: str) -> tuple[str, float | None]:
    """A threshold rule as written on a command line: 'precision_f1' (precision >= 0.30),
    'precision_f1:P', 'youden' or 'sensitivity:S' -> (name, parameter). Raises ValueError."""
    name, _, value = text.strip().partition(":")
    defaults = {"precision_f1": 0.30, "youden": None, "sensitivity": None}
    if name not in defaults:
        raise ValueError(f"{text!r}: expected precision_f1[:P], youden or sensitivity:S")
    if name == "youden":
        if value:
            raise ValueError(f"{text!r}: youden takes no parameter")
        return name, None
    if not value and defaults[name] is None:
        raise ValueError(f"{text!r}: give the target, e.g. sensitivity:0.90")
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
    if name == "youden":
        return youden(y_true, y_prob)
    if name == "sensitivity":
        return at_sensitivity(y_true, y_prob, value)
    return precision_constrained(y_true, y_prob, value, FINE_GRID)[0]

"""Per-finding calibration of the model's logits: how a bundle stores it, how inference applies
it, and how ``cxr-batch calibrate`` fits it on a site's labelled studies.

For each finding, calibrated logit = slope x logit + intercept, probability = sigmoid(that):

- prevalence (the default): slope 1 and an intercept per finding: a finding more or less common
  at the site than in the training data (pneumonia in a pneumonia clinic) moves alone, and only
  where the site has ``MIN_POSITIVES`` positives and the gates below accept it; 14 parameters
  at most, no change in ranking or spread. On v3's held-out studies calibrated on half of the
  patients, this lowered the pooled ECE on the other half in 6 of 6 splits, where one shared
  offset made it worse (the findings' shifts differ in sign);
- offset: slope 1 and ONE intercept shared by every finding: all probabilities move up or down
  together, as when a site's patients have more or fewer findings overall. One parameter
  fitted on every image-finding pair: the lowest variance;
- temperature T: slope 1/T, intercept 0 (one parameter per finding: more or less confident);
- Platt: slope and intercept per finding.

The slope is always positive, so calibration never changes how a finding ranks studies (its
AUROC) and only thresholds decide flags. In the manifest (``calibration``)::

    {"method": "temperature", "per_finding": {"Atelectasis": {"temperature": 1.4, ...}, ...}}
    {"method": "platt", "per_finding": {"Atelectasis": {"slope": 0.8, "intercept": -0.3, ...}, ...}}

Every finding has an entry; other keys of an entry (n, positives, status) are records.

Fitting is conservative because a site has few labelled studies and what matters is its *next*
studies: a finding needs ``MIN_POSITIVES`` positive and negative images; the fit is pulled
towards "no change" (an L2 penalty of ``PULL`` on log-slope and intercept, as if a few extra
studies agreed with the model as it is); and, in a cross-validation by patient on the site's
own studies, the held-out log-loss gain summed over all findings must exceed ``MARGIN_SE``
standard errors, and each finding's own gain ``FINDING_MARGIN_SE`` of its own. Otherwise a
finding keeps the base bundle's parameters and the command says why. Pooling the first gate
over findings gives it the power one finding's few positives lack: the miscalibrated v1 bundle
still moves, while an already calibrated model stays as it is (without the margins,
re-calibrating one on 120 studies made the ECE on 120 others worse in 6 of 10 splits; with
them, in none: ``benchmarks/calibration_split.py --repeats 10``).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import numpy as np

from .display import plural
from .findings import FINDINGS

METHODS = ("offset", "prevalence", "temperature", "platt")
MIN_POSITIVES = 10  # positive (and negative) images a finding needs before its calibration moves
PULL = 1.0  # L2 penalty on (log slope, intercept), in units of summed log-loss
FOLDS = 5
MARGIN_SE = 3.0  # the gain over all findings must exceed this many standard errors of held-out log-loss
FINDING_MARGIN_SE = 1.0  # and each finding's own gain this many of its own
MAX_LOG_SLOPE = 5.0  # slope within [e^-5, e^5]: a fit outside is a sign of broken data, not calibration


class CalibrationError(ValueError):
    """A calibration record that inference must not apply."""


def _number(value, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise CalibrationError(f"{where} = {value!r}: expected a finite number")
    return float(value)


@dataclass(frozen=True)
class Calibration:
    method: str
    slope: np.ndarray  # [14] float64, > 0
    intercept: np.ndarray  # [14] float64

    @classmethod
    def identity(cls, method: str = "temperature") -> "Calibration":
        return cls(method, np.ones(len(FINDINGS)), np.zeros(len(FINDINGS)))

    def apply(self, logits):
        """logits [..., 14], a numpy array or a torch tensor -> calibrated logits, same type."""
        if isinstance(logits, np.ndarray):
            return logits * self.slope + self.intercept
        return logits * logits.new_tensor(self.slope) + logits.new_tensor(self.intercept)

    def then(self, other: "Calibration") -> "Calibration":
        """This calibration followed by ``other`` (fitted on this one's output), as one."""
        return Calibration(other.method, other.slope * self.slope, other.slope * self.intercept + other.intercept)

    def entry(self, k: int) -> dict:
        """Finding k's parameters as the manifest writes them."""
        if self.method == "temperature" and self.intercept[k] == 0.0:
            return {"temperature": float(1.0 / self.slope[k])}
        return {"slope": float(self.slope[k]), "intercept": float(self.intercept[k])}

    @classmethod
    def from_manifest(cls, record) -> "Calibration":
        """Parse and check a manifest's ``calibration``. Raises CalibrationError."""
        if not isinstance(record, dict):
            raise CalibrationError("calibration: expected a table")
        method = record.get("method")
        if method not in METHODS:
            raise CalibrationError(f"calibration.method = {method!r}: expected one of {METHODS}")
        per = record.get("per_finding")
        if not isinstance(per, dict):
            raise CalibrationError("calibration.per_finding: expected a table with every finding")
        missing = [f for f in FINDINGS if f not in per]
        if missing:
            raise CalibrationError(f"calibration.per_finding lacks {missing}")
        slope, intercept = np.ones(len(FINDINGS)), np.zeros(len(FINDINGS))
        for k, f in enumerate(FINDINGS):
            entry, where = per[f], f"calibration.per_finding.{f}"
            if not isinstance(entry, dict) or ("temperature" in entry) == ("slope" in entry or "intercept" in entry):
                raise CalibrationError(f"{where}: expected either 'temperature' or 'slope' and 'intercept'")
            if "temperature" in entry:
                t = _number(entry["temperature"], f"{where}.temperature")
                if t <= 0:
                    raise CalibrationError(f"{where}.temperature = {t}: must be positive")
                slope[k] = 1.0 / t
            else:
                slope[k] = _number(entry.get("slope"), f"{where}.slope")
                intercept[k] = _number(entry.get("intercept"), f"{where}.intercept")
                if slope[k] <= 0:
                    raise CalibrationError(f"{where}.slope = {slope[k]}: must be positive (a slope <= 0 would "
                                           "reverse or erase the ranking)")
        return cls(method, slope, intercept)


# ---------------------------------------------------------------- fitting
def log_loss_sum(z: np.ndarray, y: np.ndarray) -> float:
    """Summed binary log-loss of logits z against labels y (numerically stable)."""
    return float(np.sum(np.logaddexp(0.0, z) - y * z))


def fit_affine(z: np.ndarray, y: np.ndarray, method: str, pull: float = PULL) -> tuple[float, float]:
    """(slope, intercept) minimising log-loss(slope * z + intercept, y) + pull * (log(slope)^2
    + intercept^2); temperature fits the slope alone, prevalence the intercept alone. z, y [N]
    for one finding."""
    from scipy.optimize import minimize
    from scipy.special import expit

    z, y = np.asarray(z, dtype=float), np.asarray(y, dtype=float)
    if method == "prevalence":  # the intercept alone: the finding is more or less common here
        return 1.0, _offset(z, y, pull)
    platt = method == "platt"

    def objective(theta):
        s, b = theta[0], (theta[1] if platt else 0.0)
        a = math.exp(s)
        u = a * z + b
        residual = expit(u) - y  # d loss / d u
        value = log_loss_sum(u, y) + pull * (s * s + b * b)
        grad = [float(residual @ (a * z)) + 2 * pull * s]
        if platt:
            grad.append(float(residual.sum()) + 2 * pull * b)
        return value, np.array(grad)

    start = np.zeros(2 if platt else 1)
    bounds = [(-MAX_LOG_SLOPE, MAX_LOG_SLOPE)] + ([(None, None)] if platt else [])
    result = minimize(objective, start, jac=True, method="L-BFGS-B", bounds=bounds)
    return math.exp(result.x[0]), float(result.x[1]) if platt else 0.0


def cross_validated_gain(z: np.ndarray, y: np.ndarray, groups: np.ndarray, method: str, pull: float = PULL,
                         folds: int = FOLDS, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Per image, the held-out log-loss of the logits unchanged and how much a fit on the other
    folds lowers it (folds by patient, stratified on the label so each fold has positives).
    z, y, groups [N] for one finding. Returns (loss unchanged [N], gain [N])."""
    from sklearn.model_selection import StratifiedGroupKFold

    splitter = StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=seed)
    base, gain = np.zeros(len(z)), np.zeros(len(z))
    with warnings.catch_warnings():  # a class with fewer patients than folds: expected, still usable
        warnings.simplefilter("ignore", UserWarning)
        splits = list(splitter.split(z, y, groups))
    for train, held in splits:
        a, b = fit_affine(z[train], y[train], method, pull)
        u = a * z[held] + b
        base[held] = np.logaddexp(0.0, z[held]) - y[held] * z[held]
        gain[held] = base[held] - (np.logaddexp(0.0, u) - y[held] * u)
    return base, gain


def mean_and_se(values: np.ndarray, groups: np.ndarray) -> tuple[float, float]:
    """Mean per image of ``values`` [N] and its standard error, with a patient's images summed
    first (they are not independent)."""
    _, patient = np.unique(np.asarray(groups, dtype=str), return_inverse=True)
    per_patient = np.bincount(patient, weights=values)
    if len(per_patient) < 2:
        return float(values.mean()), float("inf")
    return float(values.mean()), float(np.std(per_patient, ddof=1) * np.sqrt(len(per_patient)) / len(values))


@dataclass
class FindingFit:
    finding: str
    n: int
    positives: int
    slope: float = 1.0  # on top of the base bundle's calibration; 1, 0: unchanged
    intercept: float = 0.0
    changed: bool = False
    reason: str = ""  # why not changed
    cv_log_loss: tuple[float, float] | None = None  # (unchanged, fitted), held out

    def record(self) -> dict:
        out = {"n": self.n, "positives": self.positives, "status": "fitted" if self.changed else f"kept: {self.reason}"}
        if self.cv_log_loss is not None:
            out["cv_log_loss"] = {"unchanged": round(self.cv_log_loss[0], 6), "fitted": round(self.cv_log_loss[1], 6)}
        return out


@dataclass
class FitReport:
    fits: list[FindingFit]  # in FINDINGS order
    pooled_gain: float  # held-out log-loss gain per image, all eligible findings summed
    pooled_se: float
    accepted: bool  # the pooled gain passed: findings may move

    def record(self) -> dict:
        # no finding qualified -> no standard error: null, not Infinity (which strict JSON parsers refuse)
        se = round(self.pooled_se, 6) if np.isfinite(self.pooled_se) else None
        return {"pooled_cv_gain": round(self.pooled_gain, 6), "pooled_cv_gain_se": se,
                "pooled_gain_clear": self.accepted}


def fit_findings(z: np.ndarray, y: np.ndarray, groups: np.ndarray, method: str, min_positives: int = MIN_POSITIVES,
                 pull: float = PULL, folds: int = FOLDS, seed: int = 0, margin_se: float = MARGIN_SE,
                 finding_margin_se: float = FINDING_MARGIN_SE) -> FitReport:
    """Per finding, a calibration on top of the logits z [N, 14] (the base bundle's calibrated
    logits) against labels y [N, 14], or the reason it stays as it is. Two gates, both on
    held-out log-loss in a cross-validation by patient: the gain summed over every finding with
    enough positives must exceed ``margin_se`` standard errors (a model that is calibrated
    already stays as it is), then each finding's own gain ``finding_margin_se`` of its own."""
    if method not in METHODS:
        raise ValueError(f"method {method!r}: expected one of {METHODS}")
    if method == "offset":
        return fit_offset(z, y, groups, pull, folds, seed, margin_se)
    # no cross-validation by patient is possible (sklearn would raise): findings keep their parameters
    few_patients = len(np.unique(np.asarray(groups, dtype=str))) < folds
    fits, gains = [], {}
    for k, name in enumerate(FINDINGS):
        yk = y[:, k].astype(float)
        fit = FindingFit(name, len(yk), int(yk.sum()))
        negatives = fit.n - fit.positives
        if min(fit.positives, negatives) < min_positives:
            which = plural(fit.positives, "positive") if fit.positives < min_positives else plural(negatives, "negative")
            fit.reason = f"{which} (needs {min_positives})"
        elif few_patients:
            fit.reason = f"fewer than {folds} patients"
        else:
            base, gains[k] = cross_validated_gain(z[:, k].astype(float), yk, groups, method, pull, folds, seed)
            fit.cv_log_loss = (float(base.mean()), float((base - gains[k]).mean()))
        fits.append(fit)
    if not gains:
        return FitReport(fits, 0.0, float("inf"), False)
    pooled, pooled_se = mean_and_se(sum(gains.values()), groups)
    accepted = pooled > margin_se * pooled_se
    for k, gain in gains.items():
        fit = fits[k]
        mean, se = mean_and_se(gain, groups)
        if not accepted:
            fit.reason = "no clear gain over all findings together"
        elif mean <= finding_margin_se * se:
            se_words = "1 standard error" if finding_margin_se == 1 else f"{finding_margin_se:g} standard errors"
            fit.reason = (f"no clear gain for this finding (held-out log-loss {fit.cv_log_loss[0]:.4f} -> "
                          f"{fit.cv_log_loss[1]:.4f}, less than {se_words} better)")
        else:
            fit.slope, fit.intercept = fit_affine(z[:, k].astype(float), y[:, k].astype(float), method, pull)
            fit.changed = True
    return FitReport(fits, pooled, pooled_se, accepted)


def _offset(z: np.ndarray, y: np.ndarray, pull: float) -> float:
    """The one intercept c minimising log-loss(z + c, y) over every pair + pull * c^2. The
    objective is convex, so c is the root of its derivative, which increases with c: found by
    bracketing (a Newton step from 0 overshoots when the shift is large, e.g. a finding 30 times
    as common at the site as in the model, and then diverges)."""
    from scipy.optimize import brentq
    from scipy.special import expit

    z, y = np.ravel(z).astype(float), np.ravel(y).astype(float)

    def slope(c):
        return float(np.sum(expit(z + c) - y) + 2 * pull * c)

    lo, hi = -1.0, 1.0
    while slope(lo) > 0:
        lo *= 2
    while slope(hi) < 0:
        hi *= 2
    return float(brentq(slope, lo, hi, xtol=1e-10))


def too_few_patients(y: np.ndarray, groups: np.ndarray, folds: int = FOLDS) -> FitReport | None:
    """The report that keeps every finding as it is when the studies come from fewer patients
    than the cross-validation has folds (e.g. an export that writes one anonymised Patient ID
    on every study); None when there are enough."""
    if len(np.unique(np.asarray(groups, dtype=str))) >= folds:
        return None
    y = np.asarray(y)
    fits = [FindingFit(f, len(y), int(y[:, k].sum()), reason=f"fewer than {folds} patients")
            for k, f in enumerate(FINDINGS)]
    return FitReport(fits, 0.0, float("inf"), False)


def fit_offset(z: np.ndarray, y: np.ndarray, groups: np.ndarray, pull: float = PULL, folds: int = FOLDS,
               seed: int = 0, margin_se: float = MARGIN_SE) -> FitReport:
    """One logit offset for every finding, kept only if, in a cross-validation by patient, it
    lowers the held-out log-loss summed over all findings by more than ``margin_se`` standard
    errors (the same pooled gate as the per-finding methods; with one parameter there is no
    per-finding gate). Every finding's fit then carries the same intercept."""
    from sklearn.model_selection import GroupKFold

    z, y = np.asarray(z, dtype=float), np.asarray(y, dtype=float)
    too_few = too_few_patients(y, groups, folds)
    if too_few is not None:  # a leave-one-out over 3 patients is no evidence (it passed the gate)
        return too_few
    fits = [FindingFit(f, len(y), int(y[:, k].sum())) for k, f in enumerate(FINDINGS)]
    _, patient = np.unique(np.asarray(groups, dtype=str), return_inverse=True)
    k = folds
    base, gain = np.zeros(len(z)), np.zeros(len(z))
    for train, held in GroupKFold(n_splits=k).split(z, groups=patient):
        c = _offset(z[train], y[train], pull)
        b = (np.logaddexp(0.0, z[held]) - y[held] * z[held]).sum(axis=1)
        u = z[held] + c
        base[held], gain[held] = b, b - (np.logaddexp(0.0, u) - y[held] * u).sum(axis=1)
    pooled, pooled_se = mean_and_se(gain, groups)
    accepted = pooled > margin_se * pooled_se
    c = _offset(z, y, pull) if accepted else 0.0
    for j, fit in enumerate(fits):
        fit.cv_log_loss = (float(base.mean() / len(FINDINGS)), float((base - gain).mean() / len(FINDINGS)))
        if accepted:
            fit.intercept, fit.changed = c, True
        else:
            fit.reason = "no clear gain over all findings together"
    return FitReport(fits, pooled, pooled_se, accepted)


def from_fits(report: FitReport, method: str) -> Calibration:
    """The per-finding fits as one calibration (of the base bundle's calibrated logits)."""
    return Calibration(method, np.array([f.slope for f in report.fits]), np.array([f.intercept for f in report.fits]))

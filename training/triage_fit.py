"""A bundle's triage table, chosen out of fold (issue 20; rules 5-7 of training/configs/v3.toml).

From the out-of-fold calibrated probabilities of the development images (``oof.csv`` of the
cross-validation) this module makes, as pure functions:

- the label-shift correction: per finding, the logit offset that moves probabilities fitted on
  the development images' prevalence to the NIH table's (:func:`label_shift`);
- operating points: per finding the threshold at a target out-of-fold specificity, with its
  sensitivity, specificity and flag rate measured on folds the threshold was not chosen on, its
  PPV at the NIH prevalence, and whether it is flagged at all (its AUROC's 95% CI must stay above
  0.5) (:func:`operating_points`);
- P(any finding): a logistic regression on -log(1 - p) of the 14 calibrated probabilities (a
  weighted noisy-OR; non-negative weights, so a higher probability of any finding never lowers
  it), fitted with weights that give the
  development images the NIH table's finding prevalences, its intercept moved to NIH's share of
  studies with a finding (:func:`fit_any_finding`), and the normal bucket's cutoff with the same
  weights (:func:`normal_cutoff`): studies below it are "normal" and carry no finding flag
  unless an urgent finding is flagged (:mod:`cxr_batch.triage`);
- what the buckets and the worklist order did, every choice cross-fitted (fitted on the other
  folds, applied to this one) (:func:`cross_fitted_triage`).

Arrays: ``y`` [N, 14] 0/1, probabilities ``p`` [N, 14], ``folds`` [N] (fold of each image).
"""

from __future__ import annotations

import numpy as np

from cxr_batch.findings import FINDINGS
from cxr_batch.thresholds import at_sensitivity, at_specificity
from cxr_batch.triage import FEATURES, TriagePolicy, any_features, triage, worklist_key

from . import cvstats

URGENT = FINDINGS.index("Pneumothorax")
# Sensitivities at which each finding's out-of-fold threshold is stored: a site that asks for
# sensitivity:S but has too few positives of a finding to choose its own gets this one.
SENSITIVITY_LADDER = tuple(round(0.50 + 0.05 * i, 2) for i in range(10))


def logit(p):
    return cvstats.logit(np.asarray(p, dtype=float))


# ---------------------------------------------------------------- prevalence
def table_prevalence(labels) -> tuple[np.ndarray, float]:
    """(per-finding prevalence [14], share of images with any finding) of an NIH table's
    'labels' column (``training.table_prior.read_table``)."""
    from .prepare import multi_hot

    y = multi_hot(labels)
    return y.mean(axis=0), float((y.sum(axis=1) > 0).mean())


def label_shift(dev_prevalence: np.ndarray, target_prevalence: np.ndarray) -> np.ndarray:
    """Per-finding logit offsets: probabilities calibrated where finding k has prevalence
    ``dev`` become calibrated where it has ``target`` (Bayes' rule under label shift: the images
    of a finding look the same, only how common it is changes)."""
    return logit(target_prevalence) - logit(dev_prevalence)


def raking_weights(y: np.ndarray, target: np.ndarray, iterations: int = 200) -> np.ndarray:
    """Per-image weights (mean 1) under which each finding's prevalence matches ``target`` [14]
    (iterative proportional fitting over the 14 binary margins)."""
    w = np.ones(len(y))
    for _ in range(iterations):
        for k in range(y.shape[1]):
            pos = y[:, k] == 1
            have = w[pos].sum() / w.sum()
            if 0 < have < 1:
                w[pos] *= target[k] / have
                w[~pos] *= (1 - target[k]) / (1 - have)
    return w / w.mean()


# ---------------------------------------------------------------- operating points
def ppv_at(prevalence: float, sensitivity: float, specificity: float) -> float | None:
    denominator = sensitivity * prevalence + (1 - specificity) * (1 - prevalence)
    return float(sensitivity * prevalence / denominator) if denominator > 0 else None


def cross_fitted_thresholds(y: np.ndarray, p: np.ndarray, folds: np.ndarray, specificity: float) -> np.ndarray:
    """[N, 14] flags: each fold's images flagged at thresholds chosen on the other folds."""
    flags = np.zeros(y.shape, dtype=int)
    for f in np.unique(folds):
        held = folds == f
        flags[held] = (p[held] >= at_specificity(y[~held], p[~held], specificity)).astype(int)
    return flags


def operating_points(y: np.ndarray, p: np.ndarray, folds: np.ndarray, patients: np.ndarray, prevalence: np.ndarray,
                     specificity: float = 0.90, n_bootstrap: int = 2000, seed: int = 7) -> dict:
    """Per finding: the threshold at ``specificity`` on all out-of-fold probabilities, what it
    does on folds it was not chosen on, the AUROC with its patient-bootstrap 95% CI, and
    ``flagged``: False when that CI reaches 0.5 (a ranking no better than chance is never
    flagged)."""
    thresholds = at_specificity(y, p, specificity)
    ladder = {f"{s:.2f}": at_sensitivity(y, p, s) for s in SENSITIVITY_LADDER}
    flags = cross_fitted_thresholds(y, p, folds, specificity)
    resamples, _ = cvstats.patient_bootstrap_indices(patients, y, n_bootstrap, seed)
    boot = np.array([cvstats.fast_auc(y[i], p[i]) for i in resamples])
    auc = cvstats.auc_per_class(y, p)
    out = {}
    for k, f in enumerate(FINDINGS):
        pos = y[:, k] == 1
        sens = float(flags[pos, k].mean()) if pos.any() else None
        spec = float(1 - flags[~pos, k].mean()) if (~pos).any() else None
        lo, hi = cvstats.percentile_ci(boot[:, k])
        flagged = bool(lo > 0.5)
        out[f] = {
            "flagged": flagged, "threshold": float(thresholds[k]), "auc": float(auc[k]), "auc_ci95": [lo, hi],
            "positives": int(pos.sum()), "sensitivity": sens, "specificity": spec,
            "flag_rate": float(flags[:, k].mean()), "nih_prevalence": float(prevalence[k]),
            "ppv_at_nih_prevalence": ppv_at(float(prevalence[k]), sens, spec) if sens is not None else None,
            "thresholds_at_sensitivity": {s: float(t[k]) for s, t in ladder.items()},
            "why": "" if flagged else (f"out-of-fold AUROC {auc[k]:.2f} (95% CI {lo:.2f}-{hi:.2f}) reaches 0.5: "
                                       "its ranking was no better than chance"),
        }
    return out


# ---------------------------------------------------------------- P(any finding)
def fit_any_finding(p: np.ndarray, any_finding: np.ndarray, weights: np.ndarray, target_rate: float,
                    C: float = 1.0) -> tuple[np.ndarray, float]:
    """(weights [14], bias): P(any) = sigmoid(bias + -log(1 - p) . weights) from calibrated
    probabilities p [N, 14], fitted by weighted logistic regression with every weight >= 0 (a
    negative one is dropped and the fit repeated), then the bias moved so that the weighted mean
    of P(any) is ``target_rate``."""
    from sklearn.linear_model import LogisticRegression

    z = any_features(p)
    keep = list(range(z.shape[1]))
    while True:
        lr = LogisticRegression(C=C, max_iter=5000).fit(z[:, keep], any_finding, sample_weight=weights)
        coef = lr.coef_[0]
        if (coef >= 0).all() or len(keep) == 1:
            break
        keep.pop(int(np.argmin(coef)))
    w = np.zeros(z.shape[1])
    w[keep] = np.clip(coef, 0, None)
    # the level: the weighted mean of P(any) becomes the target rate (the regression's intercept
    # fits the development images' share of studies with a finding, not NIH's): the weighted mean of P(any) becomes the target rate
    s = z @ w
    lo, hi = -30.0, 30.0
    for _ in range(100):
        mid = (lo + hi) / 2
        rate = np.average(cvstats.sigmoid(s + mid), weights=weights)
        lo, hi = (mid, hi) if rate < target_rate else (lo, mid)
    return w, (lo + hi) / 2


def p_any(p: np.ndarray, w: np.ndarray, bias: float) -> np.ndarray:
    return cvstats.sigmoid(bias + any_features(p) @ w)


def normal_cutoff(p_any_values: np.ndarray, any_finding: np.ndarray, max_missed: float = 0.15,
                  weights: np.ndarray | None = None) -> float:
    """The highest cutoff c such that at most ``max_missed`` of the studies with a finding
    (weighted by ``weights``, e.g. to the NIH mix of findings) have P(any) < c: the normal bucket
    may hold at most that share of them."""
    pos = any_finding == 1
    order = np.argsort(p_any_values[pos])
    values = p_any_values[pos][order]
    w = (np.ones(pos.sum()) if weights is None else np.asarray(weights, dtype=float)[pos])[order]
    below = np.concatenate([[0.0], np.cumsum(w)]) / w.sum()  # share strictly below values[i]
    allowed = np.flatnonzero(below[:-1] <= max_missed + 1e-12)
    i = allowed[-1]  # the highest candidate whose share below stays within the bound
    return float(values[i])


# ---------------------------------------------------------------- what the buckets do
def bucket_outcomes(y: np.ndarray, probs: np.ndarray, policy: TriagePolicy) -> dict:
    """Buckets, flags and the worklist order of a set of studies under ``policy``."""
    return _outcomes(y, [triage(probs[i], policy) for i in range(len(y))])


def _outcomes(y: np.ndarray, results: list) -> dict:
    """What the buckets, the flags and the worklist order did on studies triaged as ``results``."""
    priority = np.array([r.priority for r in results])
    flags = np.array([r.flags for r in results])
    any_finding = (y.sum(axis=1) > 0).astype(int)
    order = sorted(range(len(y)), key=lambda i: worklist_key(results[i].priority, results[i].score, f"{i:08d}"))
    rank = np.empty(len(y))
    rank[order] = np.arange(1, len(y) + 1)

    def share(mask, bucket):
        return float((priority[mask] == bucket).mean()) if mask.any() else None

    return {
        "n": int(len(y)),
        "buckets": {b: share(np.ones(len(y), dtype=bool), b) for b in ("urgent", "abnormal", "normal")},
        "normal_share_of_no_finding": share(any_finding == 0, "normal"),
        "normal_share_of_abnormal": share(any_finding == 1, "normal"),
        "flagged_share": float(flags.any(axis=1).mean()), "flags_per_study": float(flags.sum(axis=1).mean()),
        "worklist_auroc_any_finding": float(cvstats.auc_per_class(any_finding[:, None], -rank[:, None])[0]),
        "worklist_auroc_pneumothorax": float(cvstats.auc_per_class(y[:, [URGENT]], -rank[:, None])[0]),
        "p_any_auroc": float(cvstats.auc_per_class(any_finding[:, None], np.array([r.p_any for r in results])[:, None])[0]),
        "urgent_sensitivity": float(flags[y[:, URGENT] == 1, URGENT].mean()) if y[:, URGENT].any() else None,
    }


def fit_policy(y: np.ndarray, p: np.ndarray, folds: np.ndarray, weights: np.ndarray, any_rate: float,
               specificity: float, max_missed: float, flaggable: np.ndarray) -> tuple[TriagePolicy, dict]:
    """The triage policy fitted on these (out-of-fold) probabilities: thresholds at
    ``specificity``, P(any) and its normal cutoff. Returns (policy, its parameters)."""
    any_finding = (y.sum(axis=1) > 0).astype(int)
    w, bias = fit_any_finding(p, any_finding, weights, any_rate)
    # the cutoff is a rule on out-of-fold P(any): the P(any) model cross-fitted on the folds
    if len(np.unique(folds)) < 2:  # one fold left (a 2-fold cross-fit's inner fit): halves instead
        folds = np.arange(len(y)) % 2
    oof_any = np.zeros(len(y))
    for f in np.unique(folds):
        held = folds == f
        wf, bf = fit_any_finding(p[~held], any_finding[~held], weights[~held], any_rate)
        oof_any[held] = p_any(p[held], wf, bf)
    cut = normal_cutoff(oof_any, any_finding, max_missed, weights)
    policy = TriagePolicy(at_specificity(y, p, specificity), flaggable, w, bias, cut)
    return policy, {"features": FEATURES, "weights": w.tolist(), "bias": bias, "normal_below": cut}


def cross_fitted_triage(y: np.ndarray, p: np.ndarray, folds: np.ndarray, weights: np.ndarray, any_rate: float,
                        specificity: float, max_missed: float, flaggable: np.ndarray) -> dict:
    """Every triage choice fitted on the other folds and applied to this one: what the buckets
    and the worklist order do on studies their parameters were not chosen on."""
    results = [None] * len(y)
    for f in np.unique(folds):
        held = folds == f
        policy, _ = fit_policy(y[~held], p[~held], folds[~held], weights[~held], any_rate, specificity, max_missed,
                               flaggable)
        for i in np.flatnonzero(held):
            results[i] = triage(p[i], policy)
    return {"how": "each fold's studies triaged by thresholds, P(any) model and normal cutoff fitted on the other folds",
            **_outcomes(y, results)}

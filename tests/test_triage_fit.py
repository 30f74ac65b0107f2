"""The choices behind a bundle's triage table (training/triage_fit.py), on hand cases and
synthetic scores with known truth: label shift, raking weights, operating points, P(any
finding), the normal cutoff and the cross-fitted bucket outcomes."""

import numpy as np
import pytest
from scipy.special import expit, logit

from cxr_batch.findings import FINDINGS
from cxr_batch.triage import TriagePolicy
from training import triage_fit


def test_label_shift_moves_calibrated_probabilities_to_the_target_prevalence():
    """Scores with known class-conditional densities (N(+1, 1) and N(-1, 1): log LR = 2z): the
    calibrated probability where 30% have the finding, shifted, is calibrated where 5% have it."""
    rng = np.random.default_rng(0)
    shift = triage_fit.label_shift(np.array([0.30]), np.array([0.05]))
    assert shift[0] == pytest.approx(logit(0.05) - logit(0.30))
    y = (rng.random(200000) < 0.05).astype(int)  # a site with 5%
    z = np.where(y == 1, 1.0, -1.0) + rng.normal(0, 1, len(y))
    p = expit(logit(0.30) + 2 * z + shift[0])
    assert p.mean() == pytest.approx(y.mean(), abs=0.003)
    high = p > 0.5
    assert p[high].mean() == pytest.approx(y[high].mean(), abs=0.03)


def test_raking_weights_match_every_target_prevalence():
    rng = np.random.default_rng(1)
    y = (rng.random((800, 14)) < rng.uniform(0.05, 0.4, 14)).astype(int)
    target = np.linspace(0.01, 0.2, 14)
    w = triage_fit.raking_weights(y, target)
    assert w.mean() == pytest.approx(1.0)
    assert np.average(y, axis=0, weights=w) == pytest.approx(target, abs=2e-3)


def test_operating_points_at_the_target_specificity_and_chance_findings_never_flagged():
    rng = np.random.default_rng(2)
    n = 600
    y = (rng.random((n, 14)) < 0.2).astype(int)
    p = rng.random((n, 14)) * 0.3
    p[:, 0] += 0.4 * y[:, 0]  # Atelectasis separates well; the others are noise
    folds, patients = np.arange(n) % 5, np.arange(n).astype(str)
    points = triage_fit.operating_points(y, p, folds, patients, np.full(14, 0.05), 0.90, n_bootstrap=200)
    a = points["Atelectasis"]
    assert a["flagged"] and a["specificity"] == pytest.approx(0.90, abs=0.03) and a["sensitivity"] > 0.8
    assert a["ppv_at_nih_prevalence"] == pytest.approx(triage_fit.ppv_at(0.05, a["sensitivity"], a["specificity"]))
    chance = [f for f in FINDINGS[1:] if not points[f]["flagged"]]
    assert len(chance) >= 10 and all("no better than chance" in points[f]["why"] for f in chance)


def test_normal_cutoff_leaves_at_most_the_allowed_share_of_positives_below_it():
    p_any = np.array([0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95])
    any_finding = np.array([0, 0, 1, 0, 1, 1, 1, 1, 1, 1])  # 7 positives
    cut = triage_fit.normal_cutoff(p_any, any_finding, max_missed=0.15)  # 1 of 7 = 0.143 may fall below
    assert cut == 0.5 and ((p_any < cut) & (any_finding == 1)).sum() == 1
    assert triage_fit.normal_cutoff(p_any, any_finding, 0.0) == 0.3  # none below: the lowest positive
    # weighted: the positive at 0.3 weighs a third of all positives, so nothing may fall below it
    w = np.where(p_any == 0.3, 3.0, 1.0)
    assert triage_fit.normal_cutoff(p_any, any_finding, 0.15, w) == 0.3


def test_p_any_weights_are_never_negative_and_its_level_is_the_target_rate():
    rng = np.random.default_rng(3)
    n = 1500
    y = (rng.random((n, 14)) < 0.12).astype(int)
    z = -2 + 1.5 * y + rng.normal(0, 1, (n, 14))
    z[:, 5] = -z[:, 5]  # a finding that ranks the wrong way: dropped, not given a negative weight
    p = expit(z)
    any_finding = (y.sum(axis=1) > 0).astype(int)
    w, bias = triage_fit.fit_any_finding(p, any_finding, np.ones(n), 0.46)
    assert (w >= 0).all() and w[5] == 0 and (w > 0).sum() >= 10
    assert triage_fit.p_any(p, w, bias).mean() == pytest.approx(0.46, abs=1e-3)
    policy = TriagePolicy(np.full(14, 0.5), np.ones(14, dtype=bool), w, bias)
    assert policy.p_any(p[:5]) == pytest.approx(triage_fit.p_any(p[:5], w, bias))  # inference computes the same


def test_cross_fitted_triage_on_a_model_that_ranks_well():
    rng = np.random.default_rng(4)
    n = 1000
    y = (rng.random((n, 14)) < 0.06).astype(int)
    p = expit(-3 + 2.5 * y + rng.normal(0, 1, (n, 14)))
    folds = np.arange(n) % 5
    out = triage_fit.cross_fitted_triage(y, p, folds, np.ones(n), 0.46, 0.90, 0.15, np.ones(14, dtype=bool))
    assert out["normal_share_of_abnormal"] <= 0.25 and out["normal_share_of_no_finding"] >= 0.3
    assert out["flags_per_study"] < 3 and out["p_any_auroc"] > 0.8 and out["worklist_auroc_any_finding"] > 0.75
    assert out["worklist_auroc_pneumothorax"] > 0.8  # urgent studies are read first
    policy, params = triage_fit.fit_policy(y, p, folds, np.ones(n), 0.46, 0.90, 0.15, np.ones(14, dtype=bool))
    assert isinstance(policy, TriagePolicy) and 0 < params["normal_below"] < 1

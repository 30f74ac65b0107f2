"""The shared evaluation metrics against scikit-learn and hand-computed cases."""

import numpy as np
import pytest
from sklearn.calibration import calibration_curve
from sklearn.metrics import brier_score_loss, roc_auc_score

from cxr_batch import metrics


def test_resampled_auroc_is_sklearn_with_sample_weights_ties_included():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 200)
    p = np.round(rng.random(200), 1)  # many ties
    weights = metrics.patient_weights(np.arange(200) // 3, 30, rng)
    got = metrics.resampled_auroc(y, p, weights)
    want = [roc_auc_score(y, p, sample_weight=w) for w in weights]
    assert got == pytest.approx(want, abs=1e-12)


def test_resampled_auroc_is_nan_without_both_labels():
    w = np.array([[1.0, 1.0, 0.0, 0.0], [0.0, 1.0, 1.0, 1.0]])
    out = metrics.resampled_auroc(np.array([1, 1, 0, 0]), np.array([0.9, 0.8, 0.1, 0.2]), w)
    assert np.isnan(out[0]) and out[1] == 1.0


def test_mean_auroc_skips_findings_with_one_label_value():
    y = np.array([[0, 1, 1], [0, 0, 1], [0, 1, 0], [0, 0, 0]])
    p = np.array([[0.1, 0.9, 0.3], [0.2, 0.4, 0.8], [0.3, 0.7, 0.6], [0.4, 0.5, 0.2]])
    assert np.isnan(metrics.auroc(y[:, 0], p[:, 0]))
    want = np.mean([roc_auc_score(y[:, 1], p[:, 1]), roc_auc_score(y[:, 2], p[:, 2])])
    assert metrics.mean_auroc(y, p) == pytest.approx(want)


def test_patient_weights_move_a_patients_images_together():
    groups = np.array(["a", "a", "b", "c", "c", "c"])
    w = metrics.patient_weights(groups, 500, np.random.default_rng(1))
    assert (w[:, 0] == w[:, 1]).all() and (w[:, 3] == w[:, 5]).all()
    assert (w[:, [0, 2, 3]].sum(axis=1) == 3).all()  # 3 patients drawn per resample


def test_bootstrap_by_patient_ignores_how_many_images_a_patient_has():
    """Ten copies of every patient's image must not narrow the interval: the unit is the patient."""
    rng = np.random.default_rng(2)
    y = rng.integers(0, 2, (40, 3))
    p = np.clip(0.3 * y + 0.7 * rng.random((40, 3)), 0, 1)
    once = metrics.mean_auroc_interval(y, p, np.arange(40), 300, seed=5)
    tenfold = metrics.mean_auroc_interval(np.repeat(y, 10, 0), np.repeat(p, 10, 0), np.repeat(np.arange(40), 10),
                                          300, seed=5)
    assert (once.low, once.high) == pytest.approx((tenfold.low, tenfold.high))
    by_image = metrics.mean_auroc_interval(np.repeat(y, 10, 0), np.repeat(p, 10, 0), np.arange(400), 300, seed=5)
    assert by_image.high - by_image.low < 0.6 * (once.high - once.low)


def test_every_kept_resample_has_both_labels_and_the_rare_finding_stays_in_the_mean():
    rng = np.random.default_rng(3)
    y = rng.integers(0, 2, (60, 2))
    y[:, 1] = 0
    y[7, 1] = 1  # one positive patient: missing from about 37% of resamples
    p = rng.random((60, 2))
    p[7, 1] = 0.99  # ranked first: its AUROC is 1 whenever it is present
    seen = []

    def statistic(w):
        seen.append(metrics.both_labels_present(y, w))
        return np.mean([metrics.resampled_auroc(y[:, c], p[:, c], w) for c in range(2)], axis=0)

    interval = metrics.bootstrap_interval(statistic, np.arange(60), lambda w: metrics.both_labels_present(y, w), 400)
    assert np.concatenate(seen).all() and interval.resamples == 400 and interval.drawn > 400
    mean = metrics.mean_auroc_interval(y, p, np.arange(60), 400)
    assert mean.low <= metrics.mean_auroc(y, p) <= mean.high and "drawn again" in mean.note
    assert mean.low > 0.5  # averaging a finding with AUROC 1 in every resample, never over fewer findings


def test_too_few_positive_patients_give_no_interval_and_say_why():
    y = np.zeros(50, dtype=int)
    y[[3, 9]] = 1
    interval = metrics.auroc_interval(y, np.linspace(0, 1, 50), np.arange(50), 200)
    assert interval.low is None and interval.note.startswith("2 positive patient(s): no CI")
    same_patient = metrics.auroc_interval(np.r_[y, np.ones(5, dtype=int)], np.linspace(0, 1, 55),
                                          np.r_[np.arange(50), [3] * 5], 200)
    assert same_patient.low is None  # 7 positive images, but of 2 patients


def test_ece_hand_case_and_sklearn_bins():
    y, p = np.array([0, 1, 1, 1]), np.array([0.1, 0.1, 0.9, 0.9])
    assert metrics.ece(y, p) == pytest.approx(0.5 * 0.4 + 0.5 * 0.1)
    rng = np.random.default_rng(4)
    p = rng.random(2000) ** 2
    p[:15] = np.arange(15) / 15  # values on bin edges go where sklearn puts them
    y = (rng.random(2000) < p * 0.8).astype(int)
    observed, predicted = calibration_curve(y, p, n_bins=15, strategy="uniform")
    edges = np.linspace(0, 1, 16)
    counts = np.bincount(np.searchsorted(edges[1:-1], p), minlength=15)
    want = np.sum(counts[counts > 0] / len(p) * np.abs(observed - predicted))
    assert metrics.ece(y, p) == pytest.approx(want)
    assert metrics.ece(y.reshape(100, 20), p.reshape(100, 20)) == pytest.approx(want)  # pooled over pairs


def test_brier_and_the_prevalence_baseline():
    rng = np.random.default_rng(5)
    y = rng.integers(0, 2, (30, 2))
    p = rng.random((30, 2))
    assert metrics.brier(y, p) == pytest.approx(np.mean([brier_score_loss(y[:, c], p[:, c]) for c in range(2)]))
    prevalence = y.mean(axis=0)
    assert metrics.brier_of_constant(y, prevalence) == pytest.approx(np.mean(prevalence * (1 - prevalence)))


def test_operating_point_hand_case():
    r = metrics.operating_point(np.array([1, 1, 0, 0, 0]), np.array([1, 0, 1, 0, 0]))
    assert (r["tp"], r["fp"], r["fn"], r["tn"]) == (1, 1, 1, 2)
    assert r["sensitivity"] == 0.5 and r["specificity"] == pytest.approx(2 / 3)
    assert r["ppv"] == 0.5 and r["npv"] == pytest.approx(2 / 3)
    none = metrics.operating_point(np.zeros(3), np.zeros(3))
    assert none["sensitivity"] is None and none["ppv"] is None and none["specificity"] == 1.0

"""Calibration that cannot hurt: the global offset, operating points moved with the calibration,
the safeguard against a rule that would silently drop a finding, and sensitivity targets
checked out of fold. Pure functions on synthetic scores with known truth."""

import numpy as np
import pytest
from scipy.special import expit, logit

from cxr_batch.calibrate import (LabelledScores, ThresholdChoice, calibrated_triage, choose_thresholds,
                                 cross_validated_flags, moved_operating_points, sensitivity_of)
from cxr_batch.calibration import Calibration, fit_findings, from_fits
from cxr_batch.findings import FINDINGS
from cxr_batch.labels import Matching
from cxr_batch.thresholds import at_specificity
from cxr_batch.triage import TriagePolicy, triage


def synthetic(n, shift, seed, spread=1.5):
    """Logits of a model whose true log-odds are logit + shift (the same for every finding)."""
    rng = np.random.default_rng(seed)
    z = rng.normal(-2.5, spread, (n, 14))
    y = (rng.random((n, 14)) < expit(z + shift)).astype(int)
    return z, y, np.arange(n).astype(str)


def scores(y, groups):
    return LabelledScores([f"{g}.png" for g in groups], np.zeros(y.shape), y, np.asarray(groups), Matching([], [], [], [], [], []))


def test_offset_corrects_a_site_with_more_findings_and_leaves_a_calibrated_model_alone():
    z, y, groups = synthetic(240, -0.6, seed=1)  # the site has fewer findings than the model predicts
    report = fit_findings(z[:120], y[:120], groups[:120], "offset")
    assert report.accepted and all(f.changed for f in report.fits)
    cal = from_fits(report, "offset")
    assert np.all(cal.slope == 1.0) and np.ptp(cal.intercept) == 0 and cal.intercept[0] == pytest.approx(-0.6, abs=0.2)
    held_z, held_y = z[120:], y[120:]
    loss = lambda u: np.mean(np.logaddexp(0, u) - held_y * u)  # noqa: E731
    assert loss(cal.apply(held_z)) < loss(held_z)
    z, y, groups = synthetic(240, 0.0, seed=2)
    report = fit_findings(z, y, groups, "offset")
    assert not report.accepted and not any(f.changed for f in report.fits)


def test_prevalence_moves_only_the_finding_that_is_more_common_here():
    """The default calibration: pneumonia 20 times as common at the site, every other finding as
    the model says. Only pneumonia moves, by about the true shift, and the other half of the
    site's studies gets better probabilities for it."""
    from cxr_batch.calibrate import CalibrateOptions

    assert CalibrateOptions().method == "prevalence"
    rng = np.random.default_rng(3)
    z = rng.normal(-3.0, 1.0, (600, 14))
    shift = np.zeros(14)
    shift[FINDINGS.index("Pneumonia")] = 3.0
    y = (rng.random(z.shape) < expit(z + shift)).astype(int)
    groups = np.arange(600).astype(str)
    report = fit_findings(z[:300], y[:300], groups[:300], "prevalence")
    cal = from_fits(report, "prevalence")
    k = FINDINGS.index("Pneumonia")
    assert report.fits[k].changed and np.all(cal.slope == 1.0) and cal.intercept[k] == pytest.approx(3.0, abs=0.4)
    others = np.delete(cal.intercept, k)  # a finding's own gate at 1 SE lets a small chance move through
    assert np.abs(others).max() < 0.5 and (others == 0).sum() >= 10
    loss = lambda u: np.mean(np.logaddexp(0, u) - y[300:, k] * u)  # noqa: E731
    assert loss(cal.apply(z[300:])[:, k]) < loss(z[300:, k])


def test_offset_reaches_a_large_shift_instead_of_diverging():
    """A site where one finding is 30 times as common as the model says (pneumonia in a
    pneumonia clinic): the offset is the true minimiser of the penalised log-loss, not a Newton
    step thrown across the axis."""
    from scipy.optimize import minimize_scalar

    from cxr_batch.calibration import _offset

    rng = np.random.default_rng(0)
    z = rng.normal(-4.3, 0.5, (313, 1))
    y = (rng.random((313, 1)) < expit(z + 3.7)).astype(float)
    c = _offset(z, y, 1.0)
    best = minimize_scalar(lambda u: np.sum(np.logaddexp(0, z + u) - y * (z + u)) + u * u, bounds=(-20, 20),
                           method="bounded").x
    assert c == pytest.approx(best, abs=1e-3) and 3.0 < c < 4.5


def test_keep_moves_the_operating_points_so_the_same_studies_flag_and_bucket():
    class Base:
        thresholds = {f: 0.1 + 0.02 * k for k, f in enumerate(FINDINGS)}
    rng = np.random.default_rng(3)
    cal = Calibration("platt", rng.uniform(0.5, 1.5, 14), rng.normal(0, 0.7, 14))
    moved = moved_operating_points(Base, cal)
    z = rng.normal(-2, 1.5, (500, 14))
    before = expit(z) >= np.array(list(Base.thresholds.values()))
    after = expit(cal.apply(z)) >= np.array([moved[f] for f in FINDINGS])
    assert (before == after).mean() > 0.999  # equal but for floating-point ties at a threshold
    table = {"any_finding": {"weights": rng.uniform(0, 2.0, 14).tolist(), "bias": -1.5, "normal_below": 0.35}}
    manifest = {"thresholds": Base.thresholds, "triage": table}
    p_before = expit(z)
    any_finding = (rng.random(len(z)) < expit(-1 + z.max(axis=1) + 2)).astype(int)
    base_any = TriagePolicy.from_manifest(manifest).p_any(p_before)
    new = {"thresholds": moved, "triage": calibrated_triage(table, cal, ThresholdChoice(moved, []), "keep", 100,
                                                            base_any, any_finding)}
    assert new["triage"]["any_finding"]["site_offset"]["fitted_on"] == 100
    old_policy, new_policy = TriagePolicy.from_manifest(manifest), TriagePolicy.from_manifest(new)
    buckets = [(triage(expit(z[i]), old_policy).priority, triage(expit(cal.apply(z[i])), new_policy).priority)
               for i in range(len(z))]
    assert sum(a != b for a, b in buckets) <= 1 and {a for a, _ in buckets} >= {"normal", "abnormal"}


def test_a_rule_that_would_leave_a_caught_finding_near_zero_keeps_the_base_point_and_says_so():
    rng = np.random.default_rng(4)
    n = 200
    y = (rng.random((n, 14)) < 0.15).astype(int)
    p = np.clip(0.1 + 0.1 * y + rng.normal(0, 0.05, (n, 14)), 0.01, 0.99)  # a weak ranker
    moved = {f: 0.15 for f in FINDINGS}  # the base catches most positives
    enough = np.ones(14, dtype=bool)
    choice = choose_thresholds("precision_f1:0.95", scores(y, np.arange(n).astype(str)), p, moved, enough)
    kept = [line for line in choice.lines if "kept the bundle's operating point" in line]
    assert kept, choice.lines
    for k, f in enumerate(FINDINGS):
        if any(line.startswith(f + ":") for line in kept):
            assert choice.thresholds[f] == pytest.approx(0.15)
    # whatever was chosen, no finding the base catches is left below a quarter out of fold
    base_sens = sensitivity_of(y, (p >= 0.15).astype(int))
    assert np.all((sensitivity_of(y, choice.cv_flags) >= 0.25) | (base_sens < 0.5))


def test_sensitivity_target_is_reached_on_studies_the_thresholds_did_not_see():
    rng = np.random.default_rng(5)
    n = 400
    y = (rng.random((n, 14)) < 0.12).astype(int)
    p = expit(-2 + 1.2 * y + rng.normal(0, 1, (n, 14)))
    groups = np.arange(n).astype(str)
    half = np.arange(n) < n // 2
    choice = choose_thresholds("sensitivity:0.9", scores(y[half], groups[half]), p[half], {f: 0.5 for f in FINDINGS},
                               np.ones(14, dtype=bool))
    t = np.array([choice.thresholds[f] for f in FINDINGS])
    other = sensitivity_of(y[~half], (p[~half] >= t).astype(int))
    assert np.nanmean(other) >= 0.85  # the in-sample rule alone lands near 0.8-0.85 on unseen studies
    assert np.nanmean(sensitivity_of(y[half], choice.cv_flags)) >= 0.89


def test_sensitivity_for_a_finding_with_few_positives_here_comes_from_the_bundles_own_evidence():
    """sensitivity:0.9 at a site with 4 hernias: their threshold cannot be chosen on 4 positives,
    so it is the bundle's out-of-fold threshold at sensitivity 0.9 (interpolated on its ladder,
    moved through the site's calibration), and the output says so. Without a ladder, the
    bundle's operating point is kept, as before."""
    from cxr_batch.calibrate import ladder_thresholds

    class Base:
        thresholds = {f: 0.2 for f in FINDINGS}
        manifest = {"triage": {"findings": {f: {"thresholds_at_sensitivity": {"0.85": 0.04, "0.90": 0.02, "0.95": 0.01}}
                                            for f in FINDINGS if f != "Mass"}}}

    shift = Calibration("prevalence", np.ones(14), np.full(14, 0.5))
    ladder = ladder_thresholds(Base, shift, 0.9)
    assert "Mass" not in ladder and ladder["Hernia"] == pytest.approx(expit(logit(0.02) + 0.5))
    assert ladder_thresholds(Base, Calibration.identity("prevalence"), 0.875)["Hernia"] == pytest.approx(
        expit((logit(0.04) + logit(0.02)) / 2))
    rng = np.random.default_rng(8)
    n = 200
    y = (rng.random((n, 14)) < 0.15).astype(int)
    p = expit(-2 + 1.2 * y + rng.normal(0, 1, (n, 14)))
    enough = np.ones(14, dtype=bool)
    enough[[FINDINGS.index("Hernia"), FINDINGS.index("Mass")]] = False
    choice = choose_thresholds("sensitivity:0.9", scores(y, np.arange(n).astype(str)), p, {f: 0.5 for f in FINDINGS},
                               enough, fallback=ladder)
    assert choice.thresholds["Hernia"] == pytest.approx(ladder["Hernia"]) and choice.thresholds["Mass"] == 0.5
    assert any(line.startswith("Hernia:") and "out-of-fold" in line for line in choice.lines)
    assert any(line.startswith("Mass:") and "kept the bundle's operating point" in line for line in choice.lines)


def test_at_specificity_never_flags_more_negatives_than_the_target_allows():
    rng = np.random.default_rng(6)
    y = (rng.random((300, 14)) < 0.2).astype(int)
    p = np.round(rng.random((300, 14)), 2)  # many ties
    t = at_specificity(y, p, 0.9)
    for k in range(14):
        neg = p[y[:, k] == 0, k]
        assert (neg < t[k]).mean() >= 0.9
        assert (neg < np.nextafter(t[k], 0)).mean() < 0.9 + 2 / len(neg) or t[k] <= neg.min()


def test_cross_validated_flags_never_use_the_study_they_flag():
    y = np.zeros((10, 1), dtype=int)
    y[::2] = 1
    p = np.linspace(0.1, 0.9, 10)[:, None]
    seen = []

    def rule(yy, pp):
        seen.append(set(np.round(pp[:, 0], 6)))
        return np.array([0.5])
    cross_validated_flags(y, p, np.arange(10).astype(str), rule, folds=5)
    assert len(seen) == 5 and all(len(s) == 8 for s in seen)


def test_sensitivity_ladder_of_a_bundle_calibrated_before_goes_through_both_calibrations():
    """Chain: v3 calibrated at site A (hernia shifted +2.2 there: its probabilities went up),
    then that bundle at site B with too few hernias and sensitivity:0.9. The ladder was measured
    on v3's probabilities; site A's shift is recorded as triage.input_calibration. The rung must
    go through site A's calibration and then site B's, or bundle B's hernia threshold sits far
    below its own probabilities (it would flag most studies, at no measured sensitivity)."""
    from cxr_batch.calibrate import ladder_thresholds

    site_a = np.zeros(14)
    site_a[FINDINGS.index("Hernia")] = 2.2

    class CalibratedAtA:
        thresholds = {f: 0.2 for f in FINDINGS}
        manifest = {"triage": {"input_calibration": {"slope": [1.0] * 14, "intercept": site_a.tolist()},
                               "findings": {"Hernia": {"thresholds_at_sensitivity": {"0.85": 0.04, "0.90": 0.02}}}}}

    site_b = Calibration("prevalence", np.ones(14), np.full(14, -0.3))
    assert ladder_thresholds(CalibratedAtA, site_b, 0.9)["Hernia"] == pytest.approx(expit(logit(0.02) + 2.2 - 0.3))


def test_sensitivity_beyond_the_bundles_ladder_says_which_rung_it_used():
    """The ladder runs from 0.50 to 0.95: sensitivity:0.99 gets the 0.95 rung's threshold and
    sensitivity:0.3 the 0.50 one's. The output must say which, not claim the target."""
    from cxr_batch.calibrate import ladder_sensitivities, ladder_thresholds

    class Base:
        thresholds = {f: 0.2 for f in FINDINGS}
        manifest = {"triage": {"findings": {"Hernia": {"thresholds_at_sensitivity": {"0.50": 0.1, "0.95": 0.01}}}}}

    same = Calibration.identity("prevalence")
    assert ladder_thresholds(Base, same, 0.99)["Hernia"] == pytest.approx(0.01)
    assert ladder_sensitivities(Base, 0.99) == {"Hernia": 0.95} and ladder_sensitivities(Base, 0.3) == {"Hernia": 0.5}
    assert ladder_sensitivities(Base, 0.7) == {"Hernia": 0.7}
    rng = np.random.default_rng(8)
    y = (rng.random((200, 14)) < 0.15).astype(int)
    p = expit(-2 + 1.2 * y + rng.normal(0, 1, (200, 14)))
    enough = np.array([f != "Hernia" for f in FINDINGS])
    choice = choose_thresholds("sensitivity:0.99", scores(y, np.arange(200).astype(str)), p, {f: 0.5 for f in FINDINGS},
                               enough, fallback=ladder_thresholds(Base, same, 0.99),
                               fallback_at=ladder_sensitivities(Base, 0.99))
    line = next(line for line in choice.lines if line.startswith("Hernia:"))
    assert "0.95" in line and "highest" in line and "sensitivity 0.99 on its development" not in line


def test_the_summary_says_too_few_patients_rather_than_too_few_positives():
    from cxr_batch.bundle import load_bundle
    from cxr_batch.calibrate import summary_lines
    from cxr_batch.calibration import too_few_patients

    rng = np.random.default_rng(3)
    y = (rng.random((200, 14)) < 0.3).astype(int)  # plenty of positives, all of one patient
    report = too_few_patients(y, np.array(["ANONYMOUS"] * 200))
    base = load_bundle()
    lines = summary_lines(report, Calibration.identity("prevalence"), base, dict(base.thresholds))
    assert lines[0].startswith("the studies come from fewer than 5 patients") and "no calibration changes" in lines[0]


@pytest.mark.parametrize("rule", ["sensitivity:0.9", "specificity:0.9", "youden"])
def test_a_rule_on_studies_of_fewer_than_5_patients_keeps_the_operating_points_and_says_why(rule):
    """With one Patient ID on every study there is no fold to check a threshold on: the rule
    would be chosen in sample and recorded as 'cross-validated'. The bundle's operating points
    (moved with the calibration) stay, and the output says why."""
    rng = np.random.default_rng(9)
    y = (rng.random((200, 14)) < 0.2).astype(int)
    p = expit(-2 + 1.2 * y + rng.normal(0, 1, (200, 14)))
    moved = {f: 0.3 for f in FINDINGS}
    choice = choose_thresholds(rule, scores(y, np.array(["ANONYMOUS"] * 200)), p, moved, np.ones(14, dtype=bool))
    assert choice.thresholds == moved and choice.cv_flags is None
    assert any("fewer than 5 patients" in line and "kept the bundle's operating points" in line
               for line in choice.lines)


def test_a_rule_that_flags_most_studies_says_so():
    """sensitivity:0.9 on a weak ranker (v3 at a second site: pneumothorax flagged on 90% of the
    studies out of fold, 7.4 flags per study on held-out images, 70% of them urgent) is what was
    asked for, but the operator must read what it costs before installing the bundle."""
    rng = np.random.default_rng(11)
    n = 300
    y = (rng.random((n, 14)) < 0.15).astype(int)
    p = expit(-2 + 0.3 * y + rng.normal(0, 1, (n, 14)))  # barely better than chance
    choice = choose_thresholds("sensitivity:0.9", scores(y, np.arange(n).astype(str)), p,
                               {f: 0.5 for f in FINDINGS}, np.ones(14, dtype=bool))
    per_study = choice.cv_flags.sum(axis=1).mean()
    line = next(line for line in choice.lines if "findings per study" in line)
    assert f"{per_study:.1f} findings per study" in line and "Pneumothorax" in line and "half" in line
    keep_like = choose_thresholds("specificity:0.95", scores(y, np.arange(n).astype(str)), p,
                                  {f: 0.5 for f in FINDINGS}, np.ones(14, dtype=bool))
    assert not any("half the studies" in line for line in keep_like.lines)


def test_evidence_of_a_finding_whose_threshold_the_site_could_not_choose_is_not_its_few_positives():
    """sensitivity:0.9 at a site with 1 edema: its threshold is the bundle's ladder rung at 0.9,
    so every report of the new bundle must not print 'sens. 1.00' measured on that 1 positive:
    its evidence is the rung's development sensitivity, nothing else claimed. A finding with too
    few positives under another rule keeps the base operating point, and so the base's evidence.
    Findings with enough positives get the site's cross-validated figures, as before."""
    from cxr_batch.calibrate import ladder_sensitivities, ladder_thresholds

    rng = np.random.default_rng(12)
    n = 200
    y = (rng.random((n, 14)) < 0.2).astype(int)
    edema, mass = FINDINGS.index("Edema"), FINDINGS.index("Mass")
    y[:, edema] = 0
    y[0, edema] = 1
    y[:, mass] = 0
    y[:3, mass] = 1
    p = expit(-2 + 1.2 * y + rng.normal(0, 1, (n, 14)))
    enough = np.array([k not in (edema, mass) for k in range(14)])
    table = {"measured_on": "out of fold on development images",
             "findings": {f: {"flagged": True, "sensitivity": 0.3, "specificity": 0.9, "ppv_at_nih_prevalence": 0.1,
                              "flag_rate": 0.1, "positives": 40} for f in FINDINGS}}
    table["findings"]["Edema"]["thresholds_at_sensitivity"] = {"0.85": 0.04, "0.95": 0.01}

    class Base:
        thresholds = {f: 0.2 for f in FINDINGS}
        manifest = {"triage": table}

    same = Calibration.identity("prevalence")
    choice = choose_thresholds("sensitivity:0.9", scores(y, np.arange(n).astype(str)), p, {f: 0.2 for f in FINDINGS},
                               enough, fallback=ladder_thresholds(Base, same, 0.9),
                               fallback_at=ladder_sensitivities(Base, 0.9))
    new = calibrated_triage(table, same, choice, "sensitivity:0.9", n)["findings"]
    assert new["Edema"]["sensitivity"] == pytest.approx(0.9) and new["Edema"]["specificity"] is None
    assert new["Edema"]["ppv_at_site"] is None and "ladder" in new["Edema"]["measured_on"]
    kept = dict(new["Mass"])  # the base point kept: the base's evidence, which says whose it is
    assert kept.pop("measured_on").startswith("the base bundle's figures") and kept == table["findings"]["Mass"]
    assert new["Atelectasis"]["positives"] == int(y[:, 0].sum()) and new["Atelectasis"]["ppv_at_nih_prevalence"] is None


def test_a_finding_whose_positives_are_all_in_the_normal_bucket_keeps_its_operating_point():
    """Every Nodule positive of a site in the normal bucket, which carries no Nodule flag: no
    threshold catches one. sensitivity:0.9 chose 1e-06, so Nodule was flagged on every study
    outside the normal bucket, catching nothing."""
    rng = np.random.default_rng(3)
    n = 200
    y = (rng.random((n, 14)) < 0.15).astype(int)
    p = expit(-2 + 1.2 * y + rng.normal(0, 1, (n, 14)))
    k = FINDINGS.index("Nodule")
    normal = rng.random(n) < 0.5
    y[:, k] = 0
    y[np.flatnonzero(normal)[:12], k] = 1
    written = np.ones((n, 14), dtype=bool)
    written[normal, k] = False  # Nodule is not urgent: no flag of it in the normal bucket
    choice = choose_thresholds("sensitivity:0.9", scores(y, np.arange(n).astype(str)), p, {f: 0.5 for f in FINDINGS},
                               np.ones(14, dtype=bool), written=written)
    assert choice.thresholds["Nodule"] == 0.5, choice.thresholds["Nodule"]
    assert choice.cv_flags[:, k].mean() < 0.5

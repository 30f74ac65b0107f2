"""Threshold searches (cxr_batch.thresholds) on small hand cases: what each promises about the
studies it flags."""

import numpy as np
import pytest

from cxr_batch.thresholds import at_sensitivity


@pytest.mark.parametrize("scale", [1.0, 1e-3, 1e-4])
def test_a_sensitivity_threshold_catches_its_share_of_positives_however_small_the_probabilities(scale):
    # a rare finding moved to NIH's prevalence (Hernia: 0.2%) has positives far below 0.01; the
    # threshold must still flag the share of them it was asked for, and not many more studies
    rng = np.random.default_rng(0)
    p = (rng.random((200, 1)) * 0.5 + 0.01) * scale
    y = (rng.random((200, 1)) < 0.2).astype(int)
    for target in (0.5, 0.8, 0.9, 0.95):
        t = at_sensitivity(y, p, target)
        caught = (p[y[:, 0] == 1, 0] >= t[0]).mean()
        assert caught >= target
        # at most one positive more than asked for: the threshold sits at the k-th positive, to a
        # fraction of its own size, not to a fixed number of decimals
        positives = np.sort(p[y[:, 0] == 1, 0])[::-1]
        k = int(np.ceil(target * len(positives)))
        assert t[0] > positives[k] if k < len(positives) else True
        assert t[0] >= positives[k - 1] * (1 - 1e-3)


def test_a_sensitivity_threshold_stays_strictly_between_0_and_1():
    # a bundle refuses a ladder rung of 0 or 1 (cxr_batch.triage.sensitivity_ladder), and a
    # threshold of 0 would flag every study
    y = np.array([[1], [1], [0]])
    assert 0 < at_sensitivity(y, np.array([[0.0], [0.0], [0.5]]), 0.9)[0] < 1e-5
    assert 0.99 < at_sensitivity(y, np.array([[1.0], [1.0], [0.5]]), 0.9)[0] < 1


def test_a_positive_no_threshold_can_flag_does_not_pull_the_threshold_to_zero():
    """calibrate gives a positive in the normal bucket probability 0 (its flag is never written).
    sensitivity:0.8 on 759 real NIH studies raised Nodule's goal to 1.0 and, aiming at those
    positives too, set its threshold to 1e-06: a nodule flag on every study out of the normal
    bucket (in sample 0.957 of nodules, 7.4 flags per study). The most a threshold can catch is
    every positive it can flag: the lowest of those is the threshold."""
    y = np.array([[1], [1], [1], [0], [0], [0]])
    p = np.array([[0.9], [0.6], [0.0], [0.5], [0.1], [0.0]])
    for target, expected in ((1.0, 0.6), (0.5, 0.6), (0.3, 0.9)):  # 0.5: 2 of 3, the second positive
        assert at_sensitivity(y, p, target)[0] == pytest.approx(expected, rel=1e-3)
    assert (p[:, 0] >= at_sensitivity(y, p, 1.0)[0]).tolist() == [True, True, False, False, False, False]


@pytest.mark.parametrize("typed, said", [
    ("specifity:0.9", "(did you mean 'specificity'?)"),
    ("youdin", "(did you mean 'youden'?)"),
    # a newcomer who expects one threshold per finding: say the rule is for every finding
    ("Pneumothorax:0.9", "one rule for every finding, not a finding's threshold"),
])
def test_a_misspelt_threshold_rule_names_the_one_meant(typed, said):
    from cxr_batch.thresholds import parse_rule

    with pytest.raises(ValueError) as raised:
        parse_rule(typed)
    assert said in str(raised.value)
    assert "expected keep, precision_f1[:P], youden, sensitivity:S or specificity:S" in str(raised.value)


def test_a_threshold_rule_is_read_in_any_case():
    from cxr_batch.thresholds import parse_rule

    assert parse_rule("Specificity:0.9") == ("specificity", 0.9)
    assert parse_rule(" YOUDEN ") == ("youden", None)


def test_a_threshold_rule_in_capitals_is_recorded_as_the_rule_it_is():
    from cxr_batch.calibrate import CalibrateOptions

    # the manifest's calibration.rules.thresholds is compared with 'keep' (cxr_batch/evidence.py)
    assert CalibrateOptions(thresholds=" KEEP ").thresholds == "keep"
    assert CalibrateOptions(thresholds="Specificity: 0.8").thresholds == "specificity:0.8"


def test_a_threshold_rule_with_an_empty_parameter_is_recorded_as_the_rule_it_is():
    """`calibrate --thresholds keep:` was read as keep but recorded as 'keep:', which
    cxr_batch/evidence.py, looking for 'keep', took for a rule that chose new operating points:
    every report of the bundle then said each finding's figures were the base's 'too few
    positives at this site', though every threshold was the base's moved with the calibration."""
    from cxr_batch.calibrate import CalibrateOptions
    from cxr_batch.evidence import bundle_evidence
    from cxr_batch.findings import FINDINGS

    assert CalibrateOptions(thresholds="keep:").thresholds == "keep"
    assert CalibrateOptions(thresholds="Youden : ").thresholds == "youden"
    assert CalibrateOptions(thresholds="precision_f1:").thresholds == "precision_f1"
    manifest = {"calibration": {"rules": {"thresholds": CalibrateOptions(thresholds="keep:").thresholds}},
                "provenance": {"base": {"name": "cxr-fpn", "version": "3.0"}},
                "triage": {"measured_on": "its validation",
                           "findings": {f: {"sensitivity": 0.5, "ppv_at_nih_prevalence": 0.2} for f in FINDINGS}}}
    assert "too few positives" not in (bundle_evidence(manifest).measured("Pneumothorax") or "")

"""Flags, buckets, P(any finding) and the worklist order on hand cases."""

import numpy as np
import pytest

from cxr_batch.findings import FINDINGS
from cxr_batch.results import rank_rows
from cxr_batch.triage import TriageError, TriagePolicy, triage, worklist_key


def vec(**values):
    v = np.full(len(FINDINGS), 0.1)
    for name, value in values.items():
        v[FINDINGS.index(name)] = value
    return v


def policy(normal_below=0.3, never=(), weights=None, bias=-1.0, thresholds=0.5):
    manifest = {"thresholds": {f: thresholds for f in FINDINGS},
                "triage": {"findings": {f: {"flagged": f not in never} for f in FINDINGS},
                           "any_finding": {"weights": list(weights if weights is not None else [0.2] * 14),
                                           "bias": bias, "normal_below": normal_below}}}
    return TriagePolicy.from_manifest(manifest)


def test_thresholds_only_nothing_flagged_is_normal_ordered_by_p_any():
    t = triage(vec(), np.full(len(FINDINGS), 0.5))
    assert t.priority == "normal" and t.findings == []
    # without a study-level model, P(any) takes the findings as independent
    assert t.p_any == pytest.approx(1 - 0.9 ** 14) and t.score == t.p_any


def test_flag_at_exactly_the_threshold():
    t = triage(vec(Effusion=0.5), np.full(len(FINDINGS), 0.5))
    assert t.findings == ["Effusion"] and t.priority == "abnormal"


def test_urgent_finding_orders_by_its_own_probability_and_custom_urgent_set():
    thr = np.full(len(FINDINGS), 0.5)
    t = triage(vec(Pneumothorax=0.6, Mass=0.99), thr)
    assert t.priority == "urgent" and t.score == pytest.approx(0.6)
    assert triage(vec(Pneumothorax=0.6), thr, urgent=("Edema",)).priority == "abnormal"
    assert triage(vec(Edema=0.9, Mass=0.7), thr, urgent=("Edema",)).findings == ["Mass", "Edema"]


def test_p_any_is_the_bundles_weighted_noisy_or():
    w = np.linspace(0.1, 0.5, 14)
    p = vec(Effusion=0.3)
    t = triage(p, policy(weights=w, bias=-0.7))
    z = -0.7 + -np.log(1 - p) @ w  # a weighted noisy-OR
    assert t.p_any == pytest.approx(1 / (1 + np.exp(-z)))


def test_the_study_level_model_gates_the_findings_but_never_an_urgent_one():
    pol = policy(normal_below=0.3, weights=[0.0] * 14, bias=np.log(0.2 / 0.8))  # P(any) = 0.2 for everyone
    assert triage(vec(), pol).priority == "normal"
    t = triage(vec(Mass=0.6), pol)  # over Mass's threshold, but the study is low-probability: no contradiction
    assert t.priority == "normal" and t.findings == [] and not t.flags.any()
    t = triage(vec(Pneumothorax=0.6), pol)  # an urgent finding is never hidden by the gate
    assert t.priority == "urgent" and t.findings == ["Pneumothorax"]
    high = policy(normal_below=0.3, weights=[0.0] * 14, bias=np.log(0.4 / 0.6))  # P(any) 0.4: above the cutoff
    t = triage(vec(), high)
    assert t.priority == "abnormal" and t.findings == [] and t.score == pytest.approx(0.4)
    assert triage(vec(Mass=0.6), high).findings == ["Mass"]


def test_a_finding_marked_never_flagged_is_not_flagged_however_high():
    t = triage(vec(Hernia=0.99), policy(never=("Hernia",)))
    assert t.findings == [] and t.flags[FINDINGS.index("Hernia")] == 0


def test_malformed_triage_tables_are_refused():
    base = {"thresholds": {f: 0.5 for f in FINDINGS}}
    for bad in ({"findings": {"Mass": {"flagged": "no"}}}, {"any_finding": {"weights": [1.0] * 13, "bias": 0}},
                {"any_finding": {"weights": [1.0] * 14, "bias": float("nan")}},
                {"any_finding": {"weights": [1.0] * 14, "bias": 0, "normal_below": 1.5}}, []):
        with pytest.raises(TriageError):
            TriagePolicy.from_manifest({**base, "triage": bad})


def test_worklist_order_urgent_then_abnormal_then_normal_each_by_score():
    rows = [{"file": "n_hi", "status": "ok", "priority": "normal", "triage_score": "0.29"},
            {"file": "a_lo", "status": "ok", "priority": "abnormal", "triage_score": "0.31"},
            {"file": "bad", "status": "error", "priority": "", "triage_score": ""},
            {"file": "u_lo", "status": "ok", "priority": "urgent", "triage_score": "0.2"},
            {"file": "a_hi", "status": "ok", "priority": "abnormal", "triage_score": "0.9"},
            {"file": "u_hi", "status": "ok", "priority": "urgent", "triage_score": "0.7"}]
    assert rank_rows(rows) == 5
    ranks = {r["file"]: r["worklist_rank"] for r in rows}
    assert ranks == {"u_hi": "1", "u_lo": "2", "a_hi": "3", "a_lo": "4", "n_hi": "5", "bad": ""}
    assert worklist_key("abnormal", 0.5, "a") < worklist_key("abnormal", 0.5, "b") < worklist_key("normal", 0.9, "a")


def test_p_any_undoes_a_site_calibration_so_the_buckets_stay_as_validated():
    base = policy(normal_below=0.3)
    site = TriagePolicy.from_manifest({"thresholds": {f: 0.5 for f in FINDINGS}, "triage": {
        "any_finding": {"weights": [0.2] * 14, "bias": -1.0, "normal_below": 0.3},
        "input_calibration": {"slope": [1.0] * 14, "intercept": [-0.4] * 14}}})
    p = vec(Effusion=0.3)
    shifted = 1 / (1 + np.exp(-(np.log(p / (1 - p)) - 0.4)))  # what the site-calibrated bundle outputs
    assert site.p_any(shifted) == pytest.approx(base.p_any(p))


@pytest.mark.parametrize("ladder", [{"0.90": "abc"}, {"0.90": -0.1}, {"0.90": 1.5}, {"0.90": float("nan")},
                                    {"0.90": 0.0}, {"0.90": 1.0}, {"0.90": None}, {"0.90": True},
                                    {"abc": 0.1}, {"nan": 0.1}, {"5": 0.1}, {"0.9": 0.1, "0.90": 0.2}, [0.1],
                                    {"0.50": 0.01, "0.90": 0.5}])  # last: a higher sensitivity, a higher threshold
def test_a_garbage_sensitivity_ladder_is_refused_naming_the_finding(ladder):
    """calibrate's sensitivity:S takes a finding with few site positives from this ladder: a
    tampered rung must stop the bundle loading (as any malformed triage table does), never
    become a traceback in calibrate or a NaN / wrong threshold in a new bundle."""
    manifest = {"thresholds": {f: 0.5 for f in FINDINGS},
                "triage": {"findings": {"Hernia": {"flagged": True, "thresholds_at_sensitivity": ladder}}}}
    with pytest.raises(TriageError, match=r"triage\.findings\.Hernia\.thresholds_at_sensitivity"):
        TriagePolicy.from_manifest(manifest)


def test_an_empty_or_absent_sensitivity_ladder_means_none():
    from cxr_batch.triage import sensitivity_ladder

    assert sensitivity_ladder({}, "Hernia") is None
    assert sensitivity_ladder({"thresholds_at_sensitivity": {}}, "Hernia") is None
    assert sensitivity_ladder({"thresholds_at_sensitivity": {"0.95": 0.01, "0.50": 0.05, "0.90": 0.01}}, "Hernia") == [
        (0.5, 0.05), (0.9, 0.01), (0.95, 0.01)]

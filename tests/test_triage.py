"""Flags, priority and the triage score on hand cases."""

import numpy as np
import pytest

from cxr_batch.findings import FINDINGS
from cxr_batch.triage import triage


def vec(**values):
    v = np.full(len(FINDINGS), 0.1)
    for name, value in values.items():
        v[FINDINGS.index(name)] = value
    return v


def test_nothing_flagged_is_normal_with_a_negative_score():
    t = triage(vec(), np.full(len(FINDINGS), 0.5))
    assert t.priority == "normal" and t.findings == [] and t.score == pytest.approx((0.1 - 0.5) / 0.5)


def test_flag_at_exactly_the_threshold():
    t = triage(vec(Effusion=0.5), np.full(len(FINDINGS), 0.5))
    assert t.findings == ["Effusion"] and t.priority == "abnormal" and t.score == 0.0


def test_urgent_finding_and_custom_urgent_set():
    thr = np.full(len(FINDINGS), 0.5)
    assert triage(vec(Pneumothorax=0.6), thr).priority == "urgent"
    assert triage(vec(Pneumothorax=0.6), thr, urgent=("Edema",)).priority == "abnormal"
    assert triage(vec(Edema=0.9, Mass=0.7), thr, urgent=("Edema",)).findings == ["Mass", "Edema"]


def test_score_is_comparable_across_thresholds():
    thr = np.full(len(FINDINGS), 0.5)
    thr[FINDINGS.index("Hernia")] = 0.9
    # 0.95 on a 0.9 threshold is halfway to certainty, as 0.75 is on a 0.5 threshold
    a = triage(vec(Hernia=0.95), thr).score
    b = triage(vec(Mass=0.75), thr).score
    assert a == pytest.approx(0.5) and b == pytest.approx(0.5)
    assert triage(vec(Mass=1.0), thr).score == pytest.approx(1.0)

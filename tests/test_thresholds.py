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

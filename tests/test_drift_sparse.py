"""A categorical quantity with a rare category in a small window: chi-square's p-value is an
approximation that fails when expected counts are small, and it failed in the direction that
raises false alarms. 2% of a reference's studies urgent, a window of 20 with 4 urgent ones: that
happens by chance in about 1 window of 800, and chi-square gave p = 5.5e-6, below alpha / 53
(what Holm's first step over the 53 quantities at alpha 0.001 compares with): an alarm."""

from __future__ import annotations

from scipy.stats import hypergeom

from cxr_batch.drift import DEFAULT_ALPHA, SPARSE_TEST, _categorical


def priority_reference(urgent=10, abnormal=200, normal=290) -> dict:
    counts = {"urgent": urgent, "abnormal": abnormal, "normal": normal}
    return {"kind": "categorical", "n": sum(counts.values()), "counts": counts}


def test_a_rare_category_in_a_small_window_gets_a_p_value_no_smaller_than_its_chance():
    ref = priority_reference()
    window = ["urgent"] * 4 + ["abnormal"] * 8 + ["normal"] * 8
    out = _categorical(ref, window)
    # the chance, with nothing drifted, that a window of 20 holds 4 or more of the 14 urgent studies
    chance = hypergeom(ref["n"] + len(window), 14, len(window)).sf(3)
    assert 1 / 1000 < chance < 1 / 700
    assert out["p_value"] >= chance, out
    assert out["p_value"] > DEFAULT_ALPHA / 53
    assert out["test"] == SPARSE_TEST and out["grew"] == "urgent" and out["effect"] > 0.15


def test_a_table_with_enough_studies_in_every_cell_keeps_chi_square():
    out = _categorical(priority_reference(urgent=100), ["urgent"] * 80 + ["abnormal"] * 60 + ["normal"] * 60)
    assert "test" not in out and out["p_value"] < 1e-9  # 17% -> 40% urgent: found as before


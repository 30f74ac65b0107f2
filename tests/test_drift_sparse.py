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


def test_monitor_pdf_says_beside_the_alarms_how_many_false_ones_the_windows_tested_may_hold():
    """Holm bounds each window's chance of a false alarm at alpha, and monitor tests every window
    since the first: a year of 196 windows may hold 0.2 false alarms. monitor.pdf put "1 ALARM:
    check what changed" over a year of windows without saying so."""
    from cxr_batch.monitor import METHOD
    from cxr_batch.monitor_report import summary_page

    alarm = {"model": "m@1", "label": "image intensity: median", "quantity": "intensity_p50", "group": "image",
             "shift": "median 0.5 -> 0.6", "effect_name": "KS distance", "effect": 0.35, "p_holm": 2e-4,
             "window": {"index": 17, "n": 500, "rows": [8501, 9000]}}
    windows = [{"too_small": False}] * 196 + [{"too_small": True}]
    report = {"results": "/srv/results", "studies": {"scored": 98020, "rows": 98020}, "window": "500",
              "generated": "2026-12-07T05:00:00+00:00", "alarms": [alarm], "alpha": 0.001, "min_studies": 20,
              "method": METHOD, "notes": [],
              "models": [{"model": "m@1", "weights_sha256": "a" * 64, "n": 98020, "notes": [], "windows": windows,
                          "reference": {"source": "bundle m@1", "n_studies": 480, "outputs_compared": True}}]}
    text = " ".join(" ".join(t.get_text().split()) for t in summary_page(report).texts)
    assert "1 ALARM" in text
    assert "over the 196 windows tested here, at most 0.2 false alarms are expected if nothing changed" in text


def test_a_window_too_small_for_a_verdict_is_not_drawn_as_one_like_the_reference():
    """monitor.pdf's trends drew a window of 3 studies (no verdict: under --min-studies) in the
    blue of a window tested and found like the reference, however far it lay from it."""
    from matplotlib.colors import to_hex
    from matplotlib.figure import Figure

    from cxr_batch.monitor_report import ALARM, OK_COLOUR, _panel

    def entry(median, too_small=False, alarm=False):
        return {"kind": "continuous", "reference_iqr": [0.4, 0.6], "reference_median": 0.5,
                "window_iqr": [median - 0.05, median + 0.05], "window_median": median, "alarm": alarm,
                "too_small": too_small}

    ax = Figure().add_subplot()
    _panel(ax, "intensity_p50", [(0, entry(0.5)), (1, entry(0.9, alarm=True)), (2, entry(0.95, too_small=True))])
    dots = [to_hex(c) for c in ax.collections[-1].get_facecolors()]
    assert dots[0] == OK_COLOUR and dots[1] == ALARM and dots[2] not in (OK_COLOUR, ALARM)


def test_a_p_value_at_the_floor_of_floating_point_is_said_as_a_bound():
    """Images resized from 1,024 to 64 px move every value: the alarm said "p (Holm) 5.0e-292", a
    precision no test has (the digits are those of the approximation and of float rounding)."""
    import numpy as np
    from scipy.stats import ks_2samp

    from cxr_batch.monitor import alarm_line

    p = ks_2samp(np.full(480, 1024.0), np.full(500, 64.0)).pvalue * 53
    line = alarm_line({"label": "image size: rows (pixels)", "quantity": "image_rows", "shift": "median 1024 -> 64",
                       "effect_name": "KS distance", "effect": 1.0, "p_holm": p,
                       "window": {"index": 3, "n": 500, "rows": [1501, 2000]}})
    assert "p (Holm) < 1e-15;" in line and "e-292" not in line, line
    assert "p (Holm) 2.0e-04;" in alarm_line({"label": "x", "quantity": "x", "shift": "", "effect_name": "d",
                                              "effect": 0.4, "p_holm": 2e-4, "window": {"index": 0, "n": 20}})

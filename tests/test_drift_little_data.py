"""``cxr-batch monitor`` on too little data: a window or a reference with fewer scored studies
than ``--min-studies`` cannot tell drift from chance, so it must never end in "no alarm" (exit
0); and what it writes holds no NaN. Real NIH radiographs scored by the bundled weights (which
carry a reference), in fp32."""

from __future__ import annotations

import csv
import json
import shutil

import pytest

from cxr_batch import exit_codes
from cxr_batch.scan import ScanConfig, run_scan

from .test_evaluate_calibrate import cli_here as here


@pytest.fixture(scope="module")
def scored(tmp_path_factory, nih, nih_images):
    """25 real radiographs scored by the default bundle: the results folder."""
    root = tmp_path_factory.mktemp("little")
    images = root / "images"
    images.mkdir()
    for p in nih_images[::19][:25]:
        shutil.copy(p, images / p.name)
    out = root / "results"
    run_scan(images, out, ScanConfig(metadata=str(nih / "labels.csv"), precision="fp32", pdf=False, progress=False,
                                     workers=0))
    return out


def first_rows(results, folder, n):
    """A results folder holding the first ``n`` studies of ``results``."""
    folder.mkdir()
    shutil.copy(results / "run.json", folder / "run.json")
    lines = (results / "results.csv").read_text().splitlines(keepends=True)
    (folder / "results.csv").write_text("".join(lines[:n + 1]))
    return folder


def report_of(out):
    text = (out / "monitor.json").read_text()
    report = json.loads(text, parse_constant=lambda c: pytest.fail(f"monitor.json holds {c}"))
    return report


@pytest.mark.parametrize("n", [1, 5])
def test_a_window_smaller_than_min_studies_is_no_verdict(scored, tmp_path, n):
    few = first_rows(scored, tmp_path / "few", n)
    code, stderr = here("monitor", few, "--out", tmp_path / "m")
    assert code == exit_codes.FATAL, stderr
    assert "too few" in stderr and "--min-studies" in stderr, stderr
    assert "0 windows tested" in stderr and "1 too small" in stderr, stderr
    assert "longer --window" not in stderr, stderr  # the window holds every study: only more studies help
    report = report_of(tmp_path / "m")
    assert report["exit_code"] == exit_codes.FATAL and report["alarms"] == []
    assert report["models"][0]["windows"][0]["too_small"]


def test_windows_too_short_for_enough_studies_suggest_a_longer_window(scored, tmp_path):
    """25 scored studies in windows of 10: a longer --window would hold the 20 a verdict needs."""
    code, stderr = here("monitor", scored, "--out", tmp_path / "m", "--window", "10")
    assert code == exit_codes.FATAL and "no verdict" in stderr and "longer --window" in stderr, stderr


def test_a_last_window_too_small_is_said_and_the_others_decide(scored, tmp_path):
    code, stderr = here("monitor", scored, "--out", tmp_path / "m", "--window", "10", "--min-studies", "10")  # 10, 10, 5
    assert code in (exit_codes.OK, exit_codes.DRIFT_ALARM), stderr
    assert "2 windows tested" in stderr and "1 too small" in stderr, stderr
    report = report_of(tmp_path / "m")
    assert [w["window"]["n"] for w in report["models"][0]["windows"]] == [10, 10, 5]


def test_a_site_baseline_smaller_than_min_studies_is_refused(scored, tmp_path):
    tiny = first_rows(scored, tmp_path / "tiny", 3)
    code, stderr = here("monitor", scored, "--out", tmp_path / "m", "--reference", tiny)
    assert code == exit_codes.FATAL, stderr
    assert "3 scored studies" in stderr and "--min-studies" in stderr, stderr


def test_results_given_as_their_own_reference_are_refused(scored, tmp_path):
    # `monitor RESULTS --reference RESULTS` compared every window with the studies it holds and
    # reported "0 alarm(s)", exit 0: a check that cannot alarm, read as "no drift"
    code, stderr = here("monitor", scored, "--out", tmp_path / "m", "--reference", scored / ".")
    assert code == exit_codes.FATAL and "is RESULTS itself" in stderr, stderr
    assert not (tmp_path / "m").exists()


def test_only_failed_studies_say_how_many_failed(scored, tmp_path):
    failed = tmp_path / "failed"
    failed.mkdir()
    shutil.copy(scored / "run.json", failed / "run.json")
    with open(scored / "results.csv", newline="") as f:
        reader = csv.DictReader(f)
        rows = [{**row, "status": "error"} for row, _ in zip(reader, range(3))]
    with open(failed / "results.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    code, stderr = here("monitor", failed, "--out", tmp_path / "m")
    assert code == exit_codes.FATAL, stderr
    assert "no scored study" in stderr and "3 rows are errors" in stderr, stderr
    assert not (tmp_path / "m" / "monitor.json").exists()


def test_a_baseline_window_smaller_than_min_studies_compares_nothing(scored, tmp_path):
    """Without a reference, the first window is the baseline: a first day of 3 studies cannot be
    one, whatever the later windows hold; monitor.json and the PDF say so."""
    from cxr_batch.drift import MIN_EFFECT
    from cxr_batch.monitor import (METHOD, MonitorOptions, WindowSpec, evaluate_windows, readable_records,
                                   split_windows, write_outputs)

    rows = readable_records(scored / "results.csv")[0]
    records, numbers = [r for _, r in rows], [i for i, _ in rows]
    windows, _ = split_windows(records, numbers, WindowSpec(count=22))  # 22, then 3
    windows.reverse()  # the 3 first: the baseline
    results, reference, notes = evaluate_windows(windows, None, records[0].weights_sha256, None,
                                                 MonitorOptions(window=WindowSpec(count=22)))
    assert results == [] and reference["too_small"] and not reference["outputs_compared"]
    assert any("holds 3 scored studies, fewer than --min-studies (20)" in n for n in notes), notes
    report = {"results": str(scored), "generated": "2026-12-07T05:00:00+00:00", "window": "22", "alpha": 0.001, "min_studies": 20,
              "method": METHOD, "min_effect": MIN_EFFECT,
              "studies": {"rows": 25, "scored": 25}, "alarms": [], "notes": [], "problem": "nothing was compared",
              "models": [{"model": records[0].model, "weights_sha256": records[0].weights_sha256, "n": 25,
                          "bundle": None, "reference": reference, "windows": results, "notes": notes}]}
    write_outputs(report, tmp_path / "m")
    assert (tmp_path / "m" / "monitor.pdf").stat().st_size > 1000


def test_a_daemon_refuses_a_drift_reference_smaller_than_its_min_studies(scored, tmp_path):
    """``drift_reference`` in watch/listen/pull: a site baseline of 3 studies would let every
    window read "ok"; the daemon does not start (a configuration error, exit 2)."""
    from types import SimpleNamespace

    from cxr_batch.config import ConfigError
    from cxr_batch.drift_watch import DriftWatch

    tiny = first_rows(scored, tmp_path / "tiny", 3)
    bundle = SimpleNamespace(sha256="0" * 64, manifest={}, path=tmp_path, label="test")
    with pytest.raises(ConfigError, match=r"drift_reference.*3 scored studies.*drift_min_studies \(20\)"):
        DriftWatch(None, bundle, tmp_path, every=100, window=500, min_studies=20, alpha=0.001, reference=str(tiny))


@pytest.mark.parametrize("option, value", [("--alpha", "nan"), ("--alpha", "inf"), ("--window", "9999999999d"),
                                           ("--window", "99999999999h")])
def test_an_option_no_test_can_use_is_a_usage_error(scored, tmp_path, option, value):
    """alpha NaN would never alarm (every comparison with it is false) and be written as NaN; a
    period beyond what a date can hold is no window."""
    code, stderr = here("monitor", scored, "--out", tmp_path / "m", option, value)
    assert code == exit_codes.USAGE and option in stderr and "Traceback" not in stderr, stderr
    assert not (tmp_path / "m" / "monitor.json").exists()


def test_outbound_send_refuses_a_wait_that_is_not_a_number(tmp_path):
    """--wait nan: click's range lets NaN through (every comparison with it is false), and a loop
    'until the wait has passed' would never end."""
    code, stderr = here("outbound", "send", tmp_path, "--wait", "nan")
    assert code == exit_codes.USAGE and "--wait" in stderr and "Traceback" not in stderr, stderr


def test_a_waiting_daemon_says_when_it_counted_and_when_it_counts_again(scored, tmp_path):
    """status.json's drift in watch/listen/pull is evaluated every ``drift_every`` studies: the
    count of a "waiting" reason is the one of that evaluation (0 at the start). An operator who
    reads "0 of the 20 studies a window needs" beside 6 studies reported must be told that this
    was counted then, how many were scored since and after how many more it is counted again."""
    from cxr_batch.bundle import load_bundle
    from cxr_batch.drift_watch import DriftWatch
    from cxr_batch.ledger import Ledger
    from cxr_batch.record import StudyRecord

    with (scored / "results.csv").open(newline="") as f:
        records = [StudyRecord.from_row(row) for row in csv.DictReader(f)][:6]
    ledger = Ledger(tmp_path / "ledger.sqlite")
    try:
        watch = DriftWatch(ledger, load_bundle(), tmp_path, every=100, window=500, min_studies=20, alpha=0.001)
        watch.evaluate()  # as the daemon does at its start
        ledger.commit([(f"uid:{i}", f"c{i}", r) for i, r in enumerate(records)], [])
        watch.added(len(records))  # 6 < drift_every: no evaluation
        drift = watch.status()
        assert drift["state"] == "waiting"
        assert "0 of the 20 studies a window needs at the last evaluation" in drift["reason"]
        assert drift["scored_since_evaluation"] == 6 and drift["next_evaluation_in"] == 94
    finally:
        ledger.close()

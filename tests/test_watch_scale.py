"""The watch daemon over a long-running results folder: what a restart rewrites, and that a
kill at any step of publishing loses no row (benchmarks/ledger_scale.py measures the costs)."""

import sqlite3
import time
from collections import Counter

import pytest

from .test_watch_faults import good_dicoms, ok_rows
from .watchkit import rows_now, start_daemon, status, stop, wait_for, watch_config

pytestmark = pytest.mark.slow


def _run_until_running(incoming, out, bundle, config, settle=1.0):
    daemon = start_daemon(incoming, out, bundle, config)
    try:
        assert wait_for(lambda: status(out).get("state") == "running" and status(out)["pid"] == daemon.pid), \
            daemon.stderr.read() if daemon.poll() is not None else ""
        time.sleep(settle)  # a rescan or two
    finally:
        assert stop(daemon) == 0


def test_a_restart_keeps_results_csv_as_it_is_and_makes_a_changed_one_whole_again(tmp_path, nih_images,
                                                                                    small_bundle):
    """results.csv was rewritten from the ledger at every start: a year's file (100,000 rows)
    kept a restarted daemon from scoring for a minute or more. Now a file that is as the ledger
    last wrote it is kept; one changed since (a row cut off by hand) is made whole again."""
    incoming, out = tmp_path / "in", tmp_path / "out"
    incoming.mkdir()
    good_dicoms(incoming, nih_images, 2)
    config = watch_config(tmp_path / "w.toml")
    first = start_daemon(incoming, out, small_bundle, config)
    try:
        assert wait_for(lambda: len(ok_rows(out)) == 2), first.stderr.read() if first.poll() is not None else ""
    finally:
        assert stop(first) == 0
    csv = out / "results.csv"
    before = csv.stat()
    _run_until_running(incoming, out, small_bundle, config)
    after = csv.stat()
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns), "results.csv was rewritten"
    data = csv.read_bytes()
    csv.write_bytes(data[:data.rstrip(b"\r\n").rfind(b"\n") + 1])  # the last row cut off
    assert len(ok_rows(out)) == 1
    _run_until_running(incoming, out, small_bundle, config)
    assert Counter(r["patient_id"] for r in rows_now(out)) == {"G00": 1, "G01": 1}


def test_a_kill_between_appending_rows_and_marking_them_published_loses_none_and_adds_none_twice(
        tmp_path, nih_images, small_bundle):
    """SIGKILL after a batch's rows were appended to results.csv, before the ledger marked them
    published: the restart (which keeps a results.csv it last wrote whole) rewrites it, each
    study once; then a kill after the next batch's append, with results.csv already there."""
    incoming, out = tmp_path / "in", tmp_path / "out"
    incoming.mkdir()
    config = watch_config(tmp_path / "w.toml", batch_size=8, max_wait=1.0)
    for start, n in ((0, 2), (2, 2)):  # the first append makes results.csv, the second appends to it
        good_dicoms(incoming, nih_images, n, start=start)
        killed = start_daemon(incoming, out, small_bundle, config, env={"CXR_BATCH_KILL_AT": "append"})
        assert killed.wait(timeout=180) == -9
        assert len(ok_rows(out)) == start + n  # appended, not marked
        _run_until_running(incoming, out, small_bundle, config, settle=3.0)
        rows = rows_now(out)
        assert Counter(r["patient_id"] for r in rows) == {f"G{i:02d}": 1 for i in range(start + n)}
    with sqlite3.connect(out / ".cxr-batch" / "ledger.sqlite") as db:
        assert db.execute("SELECT COUNT(*), SUM(published) FROM studies").fetchone() == (4, 4)


def test_a_kill_after_a_report_is_made_again_still_puts_its_note_in_results_csv(tmp_path, nih_images,
                                                                                small_bundle):
    """A report missing at a start is made again (here without the image: its file is gone) and
    its row gets a note saying so; the daemon is killed before results.csv is rewritten. The
    next start keeps a results.csv the ledger last wrote, but this row changed since: rewritten,
    the note in it."""
    incoming, out = tmp_path / "in", tmp_path / "out"
    incoming.mkdir()
    (source,) = good_dicoms(incoming, nih_images, 1)
    config = watch_config(tmp_path / "w.toml")
    first = start_daemon(incoming, out, small_bundle, config)
    try:
        assert wait_for(lambda: len(ok_rows(out)) == 1), first.stderr.read() if first.poll() is not None else ""
    finally:
        assert stop(first) == 0
    (row,) = ok_rows(out)
    (out / "reports" / row["report"]).unlink()
    source.unlink()
    killed = start_daemon(incoming, out, small_bundle, config, env={"CXR_BATCH_KILL_AT": "report remade"})
    assert killed.wait(timeout=180) == -9
    assert (out / "reports" / row["report"]).is_file()
    _run_until_running(incoming, out, small_bundle, config)
    (row,) = ok_rows(out)
    assert "without the image" in row["notes"], row["notes"]


def test_results_csv_replaced_while_the_daemon_runs_is_made_whole_by_its_next_rows(tmp_path, nih_images,
                                                                                  small_bundle):
    """results.csv put back from a backup while the daemon runs (an operator's cp -p, a sync
    client): the daemon appended its next rows to that file and recorded it as the file it last
    wrote, so every later start kept it, the rows since the backup missing for good (before, the
    next start rewrote it). Now rows are appended only to the file the ledger last wrote: another
    is made whole again."""
    incoming, out = tmp_path / "in", tmp_path / "out"
    incoming.mkdir()
    good_dicoms(incoming, nih_images, 1)
    config = watch_config(tmp_path / "w.toml")
    daemon = start_daemon(incoming, out, small_bundle, config)
    try:
        assert wait_for(lambda: len(ok_rows(out)) == 1), daemon.stderr.read() if daemon.poll() is not None else ""
        csv = out / "results.csv"
        backup = tmp_path / "results.backup.csv"
        backup.write_bytes(csv.read_bytes())
        good_dicoms(incoming, nih_images, 1, start=1)
        assert wait_for(lambda: len(ok_rows(out)) == 2)
        tmp = out / "results.csv.restored"  # rsync -t: a copy renamed over it
        tmp.write_bytes(backup.read_bytes())
        tmp.replace(csv)
        good_dicoms(incoming, nih_images, 1, start=2)
        assert wait_for(lambda: any(r["patient_id"] == "G02" for r in ok_rows(out)))
        time.sleep(1.0)
    finally:
        assert stop(daemon) == 0
    _run_until_running(incoming, out, small_bundle, config)
    assert Counter(r["patient_id"] for r in ok_rows(out)) == {"G00": 1, "G01": 1, "G02": 1}

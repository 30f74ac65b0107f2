"""The watch ledger: one current record per study, provisional errors, superseded results,
file memory, migration of the first release's ledgers, and a clear error for a corrupt one."""

import json
import os
import sqlite3
import stat
import time
from pathlib import Path

import pytest

from cxr_batch.findings import FINDINGS
from cxr_batch.ledger import Ledger, LedgerError
from cxr_batch.record import Scores, StudyRecord
from cxr_batch.study import Identifiers


def ok(file, **ids):
    probs = tuple(0.1 for _ in FINDINGS)
    return StudyRecord(file=file, ids=Identifiers(**ids), scores=Scores(probs, (0,) * 14, "normal", -0.5), model="m@1")


def error(file, reason="truncated"):
    return StudyRecord(file=file, status="error", reason=reason, model="m@1")


def test_new_studies_and_files_survive_reopening(tmp_path):
    path = tmp_path / "ledger.sqlite"
    ledger = Ledger(path)
    a = ok("a.dcm", patient_id="P1", patient_name="DOE^JANE")
    out = ledger.commit([("uid:1", "c1", a)], [("a.dcm", 10, 111, 5, "uid:1", "ok")])
    assert [o.action for o in out] == ["new"]
    assert ledger.file_handled("a.dcm", (10, 111, 5)) and not ledger.file_handled("a.dcm", (10, 112, 5))
    # the same size and mtime, another ctime: another file put there (a correction renamed over it)
    assert not ledger.file_handled("a.dcm", (10, 111, 6))
    ledger.close()
    again = Ledger(path)
    (back,) = again.records()
    assert back == a and back.ids.patient_name == "DOE^JANE" and again.count() == 1
    again.close()


def test_error_is_provisional_and_an_intact_copy_replaces_it(tmp_path):
    ledger = Ledger(tmp_path / "l.sqlite")
    ledger.commit([("uid:1", "truncated", error("IM1"))], [])
    out = ledger.commit([("uid:1", "intact", ok("IM1_resent"))], [])
    assert [o.action for o in out] == ["replaced"]
    (only,) = ledger.records()
    assert only.ok and only.file == "IM1_resent" and ledger.superseded_count() == 0  # an error is not kept


def test_a_result_is_never_replaced_by_an_error_or_the_same_bytes(tmp_path):
    ledger = Ledger(tmp_path / "l.sqlite")
    ledger.commit([("uid:1", "c1", ok("IM1"))], [])
    assert ledger.commit([("uid:1", "broken", error("IM1_copy"))], [])[0].action == "kept"
    assert ledger.commit([("uid:1", "c1", ok("IM1_again"))], [])[0].action == "kept"
    (only,) = ledger.records()
    assert only.ok and only.file == "IM1"


def test_changed_file_with_the_same_uid_supersedes(tmp_path):
    ledger = Ledger(tmp_path / "l.sqlite")
    ledger.commit([("uid:1", "c1", ok("IM1", patient_id="P1"))], [])
    out = ledger.commit([("uid:1", "c2", ok("IM1", patient_id="P1-corrected"))], [])
    assert out[0].action == "replaced" and ledger.superseded_count() == 1
    assert [r.ids.patient_id for r in ledger.records()] == ["P1-corrected"]
    assert ledger.known("uid:1").content == "c2"


def test_publishing_marks_and_recent_window(tmp_path):
    ledger = Ledger(tmp_path / "l.sqlite")
    ledger.commit([(f"uid:{i}", f"c{i}", ok(f"IM{i}")) for i in range(5)], [])
    assert len(ledger.unpublished()) == 5
    ledger.mark_published(["uid:0", "uid:1"])
    assert [k for k, _ in ledger.unpublished()] == ["uid:2", "uid:3", "uid:4"]
    assert [r.file for r in ledger.recent(0, 2)] == ["IM3", "IM4"]
    assert ledger.recent(9e12, 10) == []


def test_first_release_ledger_is_migrated(tmp_path):
    path = tmp_path / "l.sqlite"
    db = sqlite3.connect(path)
    db.executescript("CREATE TABLE studies (key TEXT PRIMARY KEY, seq INTEGER NOT NULL, file TEXT NOT NULL, "
                     "row TEXT NOT NULL, reported_at REAL NOT NULL); CREATE TABLE files (path TEXT PRIMARY KEY, "
                     "size INTEGER NOT NULL, mtime_ns INTEGER NOT NULL, key TEXT NOT NULL, outcome TEXT NOT NULL, "
                     "handled_at REAL NOT NULL);")
    row = {"file": "a.png", "status": "ok", "reason": "", "patient_id": "P9", "age": 57.0, "age_source": "metadata",
           **{f"p_{f}": 0.25 for f in FINDINGS}, **{f"flag_{f}": 0 for f in FINDINGS}, "findings": "",
           "priority": "normal", "triage_score": -0.5, "model": "m@1"}
    db.execute("INSERT INTO studies VALUES ('sha256:x', 1, 'a.png', ?, 1.0)", (json.dumps(row),))
    db.commit()
    db.close()
    ledger = Ledger(path)
    (record,) = ledger.records()
    assert record.ids.patient_id == "P9" and record.patient.age == 57.0 and record.scores.probs[0] == 0.25
    assert ledger.known("sha256:x").status == "ok"


def test_files_handled_before_schema_7_are_known_by_size_and_mtime_as_then(tmp_path):
    """A ledger of schema 6 recorded no ctime: opened by this release, its files gain the column
    empty and are matched by size and mtime as before (a restart after the upgrade reads none
    of them again); files handled from then on are matched by their ctime too."""
    path = tmp_path / "ledger.sqlite"
    Ledger(path).close()
    db = sqlite3.connect(path, isolation_level=None)
    db.execute("ALTER TABLE files DROP COLUMN ctime_ns")  # the files table as schema 6 left it
    db.execute("INSERT INTO files VALUES ('old.dcm', 10, 111, 'uid:1', 'ok', 1.0)")
    db.execute("INSERT OR REPLACE INTO meta VALUES ('schema', '6')")
    db.close()
    ledger = Ledger(path)
    assert ledger.db.execute("SELECT value FROM meta WHERE name = 'schema'").fetchone() == ("7",)
    assert ledger.file_outcome("old.dcm", (10, 111, 987654321)) == ("uid:1", "ok")
    assert not ledger.file_handled("old.dcm", (10, 112, 987654321))
    ledger.commit([], [("new.dcm", 20, 222, 333, "uid:2", "ok")])
    assert ledger.file_handled("new.dcm", (20, 222, 333)) and not ledger.file_handled("new.dcm", (20, 222, 334))
    ledger.close()


def test_a_file_handled_before_schema_7_keeps_the_ctime_it_is_first_seen_with(tmp_path):
    """Upgraded from schema 6, a handled file was matched by size and mtime for ever: a
    correction renamed over it later with the same size and mtime (``cp -p``, ``rsync -t``) was
    never read. The file as first seen after the upgrade is the one handled (as schema 6 held
    it); its ctime is kept from then on, and it is still not read again."""
    path = tmp_path / "ledger.sqlite"
    Ledger(path).close()
    db = sqlite3.connect(path, isolation_level=None)
    db.execute("ALTER TABLE files DROP COLUMN ctime_ns")
    db.execute("INSERT INTO files VALUES ('old.dcm', 10, 111, 'uid:1', 'ok', 1.0)")
    db.execute("INSERT OR REPLACE INTO meta VALUES ('schema', '6')")
    db.close()
    ledger = Ledger(path)
    assert ledger.file_outcome("old.dcm", (10, 111, 500)) == ("uid:1", "ok")  # the first look after the upgrade
    ledger.close()
    ledger = Ledger(path)  # a restart: still handled
    assert ledger.file_handled("old.dcm", (10, 111, 500))
    assert not ledger.file_handled("old.dcm", (10, 111, 501))  # a correction renamed over it
    ledger.close()


def test_a_ledger_of_a_newer_release_is_refused_and_left_as_it_is(tmp_path):
    """A results folder a newer cxr-batch wrote (the daemon rolled back after an upgrade): its
    ledger was opened, stamped with this release's schema number and read with this release's
    columns; it is refused, naming both schemas, and not written."""
    path = tmp_path / "ledger.sqlite"
    Ledger(path).close()
    db = sqlite3.connect(path, isolation_level=None)
    db.execute("INSERT OR REPLACE INTO meta VALUES ('schema', '99')")
    db.execute("CREATE TABLE later_release (x TEXT)")
    db.close()
    before = path.read_bytes()
    with pytest.raises(LedgerError, match="newer cxr-batch.*schema 99.*schema 7"):
        Ledger(path)
    db = sqlite3.connect(path)
    assert db.execute("SELECT value FROM meta WHERE name = 'schema'").fetchone() == ("99",)
    db.close()
    assert path.read_bytes() == before


def test_a_scan_queue_of_a_newer_release_is_not_called_unreadable(tmp_path):
    """A scan's queue (outbound.sqlite) a newer cxr-batch wrote was 'not a readable queue ... move
    it aside', advice that throws the newer release's queue away; it is said to be newer."""
    from cxr_batch.integration.outbox import SCAN_QUEUE, open_queue

    path = tmp_path / SCAN_QUEUE
    Ledger(path).close()
    db = sqlite3.connect(path, isolation_level=None)
    db.execute("INSERT OR REPLACE INTO meta VALUES ('schema', '8')")
    db.close()
    with pytest.raises(LedgerError) as raised:
        open_queue(path)
    assert "newer cxr-batch" in str(raised.value) and "aside" not in str(raised.value), raised.value


def test_corrupt_ledger_is_a_clear_error(tmp_path):
    path = tmp_path / "l.sqlite"
    path.write_bytes(b"SQLite format 3\x00" + os.urandom(4000))
    with pytest.raises(LedgerError, match="not a readable ledger"):
        Ledger(path)


def test_ledger_files_are_private_whatever_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        ledger = Ledger(tmp_path / "l.sqlite")
        ledger.commit([("uid:1", "c", ok("a"))], [])
        ledger.close()
        reopened = Ledger(tmp_path / "l.sqlite")
    finally:
        os.umask(old)
    for p in tmp_path.iterdir():
        assert stat.S_IMODE(p.stat().st_mode) == 0o640, p.name
    reopened.close()


def test_outbound_objects_are_queued_with_their_study_and_delivered_once(tmp_path):
    ledger = Ledger(tmp_path / "l.sqlite")
    sr = {"uid:1": [("2.25.1", "dicom/a.sr.dcm"), ("2.25.2", "reports/a.dcm")]}
    ledger.commit([("uid:1", "c1", ok("IM1"))], [], sr)
    assert ledger.commit([("uid:1", "c1", ok("IM1_again"))], [], sr)[0].action == "kept"  # no second queueing
    due = ledger.due_outbound(time.time())
    assert [(i.uid, i.key, i.path, i.attempts) for i in due] == [("2.25.1", "uid:1", "dicom/a.sr.dcm", 0),
                                                                ("2.25.2", "uid:1", "reports/a.dcm", 0)]
    ledger.outbound_retry("2.25.1", time.time() + 60, "peer down")
    ledger.outbound_delivered("2.25.2", "PACS@h:104")
    assert ledger.due_outbound(time.time()) == []  # one waits for its back-off, one is delivered
    assert [i.uid for i in ledger.due_outbound(time.time() + 61)] == ["2.25.1"]
    stats = ledger.outbound_stats(time.time())
    assert (stats["queued"], stats["retrying"], stats["delivered"], stats["refused"]) == (1, 1, 1, 0)
    assert stats["oldest_queued_s"] >= 0 and stats["waiting_because"] == {"peer down": 1}
    ledger.outbound_refused("2.25.1", "PACS@h:104", "refused: 0xC000", time.time() + 900)
    assert ledger.due_outbound(time.time() + 60) == [] and ledger.outbound_stats(time.time())["refused"] == 1
    assert [i.uid for i in ledger.due_outbound(time.time() + 901)] == ["2.25.1"]  # refused: offered again later
    # a changed instance is scored again: its objects (same derived UIDs) are queued afresh
    ledger.commit([("uid:1", "c2", ok("IM1_changed"))], [], sr)
    assert [(i.uid, i.attempts) for i in ledger.due_outbound(time.time())] == [("2.25.1", 0), ("2.25.2", 0)]
    ledger.close()
    reopened = Ledger(tmp_path / "l.sqlite")  # the queue is durable
    assert len(reopened.due_outbound(time.time())) == 2


def test_a_failed_commit_queues_nothing(tmp_path):
    ledger = Ledger(tmp_path / "l.sqlite")
    queued = {"uid:2": [("2.25.9", "dicom/b.sr.dcm")]}
    with pytest.raises(sqlite3.IntegrityError):  # the second study breaks the transaction half-way
        ledger.commit([("uid:2", "c", ok("IM2")), ("uid:3", None, ok("IM3"))], [], queued)
    assert ledger.due_outbound(time.time()) == [] and ledger.count() == 0


def test_failed_corrections_leave_one_note_on_the_result_that_stands(tmp_path):
    """A correction cut short and sent again, cut short again (a flaky link: each copy fails at
    another byte): each failure added its own note to the standing row, which grew by ~130
    characters at every resend without end. Now the row carries one such note, of the latest
    failure, on one line; a good version after them carries none."""
    ledger = Ledger(tmp_path / "l.sqlite")
    ledger.commit([("uid:1", "c1", ok("IM1", patient_id="P1"))], [])
    for i in range(20):
        out = ledger.commit([("uid:1", f"cut{i}", error("IM1_fix", f"truncated: ends at byte {1000 + i}"))], [])
        assert out[0].action == "kept" and out[0].annotated
    ledger.commit([("uid:1", "cut-odd", error("IM1_fix", "line one\nline; two " + "x" * 10_000))], [])
    (row,) = [r.to_row() for r in ledger.records()]
    notes = row["notes"]
    assert notes.count("could not be read") == 1, notes
    assert "line one line, two" in notes and "\n" not in notes and len(notes) < 400, notes
    assert row["status"] == "ok" and row["patient_id"] == "P1"
    out = ledger.commit([("uid:1", "c2", ok("IM1_fixed", patient_id="P1-corrected"))], [])
    assert out[0].action == "replaced"
    (row,) = [r.to_row() for r in ledger.records()]
    assert row["patient_id"] == "P1-corrected" and "could not be read" not in row["notes"]


def test_a_ledger_on_a_full_disk_is_not_called_unreadable(small_disk):
    """SQLite cannot open its WAL on a full disk: that was 'not a readable ledger ... move the
    ledger aside and the daemon rebuilds one', advice that throws away a whole ledger (and the
    results waiting in its outbound queue) for want of free space."""
    from cxr_batch.integration.outbox import SCAN_QUEUE, open_queue

    from .test_watch_faults import fill

    for name in ("ledger.sqlite", SCAN_QUEUE):  # a daemon's ledger, a scan's queue
        Ledger(small_disk / name).close()
    filler = fill(small_disk)
    for opening in (Ledger, open_queue):
        for name in ("ledger.sqlite", SCAN_QUEUE):
            with pytest.raises(LedgerError) as raised:
                opening(small_disk / name)
            assert "full disk" in str(raised.value) and "aside" not in str(raised.value), raised.value
    filler.unlink()
    Ledger(small_disk / "ledger.sqlite").close()


def test_two_processes_upgrading_a_schema_5_ledger_at_once_both_open_it(tmp_path, monkeypatch):
    """The sha256 column (schema 6) was added after a check made outside any transaction: a
    process that saw a schema-5 ledger while another (the daemon restarting after an upgrade,
    an operator's `outbound list`) added the column between its check and its ALTER failed with
    'duplicate column name: sha256' and could not open the ledger."""
    path = tmp_path / "ledger.sqlite"
    Ledger(path).close()
    db = sqlite3.connect(path, isolation_level=None, timeout=0)  # the other process
    db.execute("ALTER TABLE outbound DROP COLUMN sha256")  # the ledger as schema 5 left it
    db.execute("INSERT OR REPLACE INTO meta VALUES ('schema', '5')")

    connect = sqlite3.connect

    def other_process_upgrades_first(*args, **kwargs):
        conn = connect(*args, **kwargs)

        def trace(statement):  # just before this process adds the column, the other one tries to
            if statement.startswith("ALTER TABLE outbound ADD COLUMN sha256"):
                conn.set_trace_callback(None)
                try:
                    db.execute("ALTER TABLE outbound ADD COLUMN sha256 TEXT NOT NULL DEFAULT ''")
                except sqlite3.OperationalError:  # locked: this process holds the upgrade's transaction
                    pass
        conn.set_trace_callback(trace)
        return conn

    monkeypatch.setattr(sqlite3, "connect", other_process_upgrades_first)
    ledger = Ledger(path)
    monkeypatch.setattr(sqlite3, "connect", connect)
    assert "sha256" in {r[1] for r in ledger.db.execute("PRAGMA table_info(outbound)")}
    ledger.close()
    db.close()


def test_studies_stamped_by_a_clock_a_day_slow_stay_in_the_window_once_it_is_corrected(tmp_path, monkeypatch):
    """The worklist's window (the studies of the last N hours) went by the wall-clock time each
    study was recorded at: a clock a day slow, then corrected, stamped minutes-old studies a
    day old and the next worklist dropped them. A study recorded after (in the ledger's order)
    one in the window is in the window, whatever its stamp; and so is every study recorded after
    ``after_seq`` (the daemon's: the last one recorded before the window began, by its
    monotonic clock), so one before which no study is in the window stays there too."""
    import types

    import cxr_batch.ledger as ledger_module

    now = 1_800_000_000.0
    clock = [now - 3 * 86400]
    fake_time = types.SimpleNamespace(**{k: getattr(time, k) for k in dir(time) if not k.startswith("_")})
    fake_time.time = lambda: clock[0]
    monkeypatch.setattr(ledger_module, "time", fake_time)
    ledger = Ledger(tmp_path / "l.sqlite")
    ledger.commit([("uid:0", "c0", ok("OLD"))], [])  # three days ago: out of the window
    clock[0] = now - 2 * 3600
    ledger.commit([("uid:1", "c1", ok("A"))], [])  # two hours ago, the clock right
    last_before = ledger.last_seq()
    for k, late in ((2, 86400 + 600), (3, 86400 + 300)):  # minutes ago, the clock a day slow
        clock[0] = now - late
        ledger.commit([(f"uid:{k}", f"c{k}", ok("BC"[k - 2]))], [])
    clock[0] = now  # corrected
    ledger.commit([("uid:4", "c4", ok("D"))], [])
    since = now - 8 * 3600
    assert [r.file for r in ledger.recent(since, 100)] == ["A", "B", "C", "D"]
    assert [r.file for r in ledger.recent(since, 3)] == ["B", "C", "D"]  # the newest, as before
    # no study before them in the window: those recorded after the daemon's mark stay
    assert [r.file for r in ledger.recent(since, 100, after_seq=last_before)] == ["A", "B", "C", "D"]
    ledger.db.execute("DELETE FROM studies WHERE key IN ('uid:0', 'uid:1')")
    assert [r.file for r in ledger.recent(since, 100)] == ["D"]
    assert [r.file for r in ledger.recent(since, 100, after_seq=last_before)] == ["B", "C", "D"]


def test_a_study_stamped_by_a_clock_a_year_fast_does_not_keep_days_of_studies_in_the_window(tmp_path, monkeypatch):
    """A clock set a year fast (a mistyped date), then corrected: the study recorded meanwhile
    is stamped a year ahead, and a window that kept every study recorded after the first one
    stamped in it kept, for a year, every study since (days of them, up to ``worklist_max``) on
    a worklist of the "last N hours". A stamp in the future is no evidence of when a study
    arrived: the studies of days ago stay out."""
    import types

    import cxr_batch.ledger as ledger_module

    now = 1_800_000_000.0
    clock = [now - 4 * 86400 + 365 * 86400]
    fake_time = types.SimpleNamespace(**{k: getattr(time, k) for k in dir(time) if not k.startswith("_")})
    fake_time.time = lambda: clock[0]
    monkeypatch.setattr(ledger_module, "time", fake_time)
    ledger = Ledger(tmp_path / "l.sqlite")
    ledger.commit([("uid:0", "c0", ok("FAST"))], [])  # four days ago, the clock a year fast
    for k, (name, ago) in enumerate((("OLD1", 3 * 86400), ("OLD2", 2 * 86400), ("NEW", 3600)), start=1):
        clock[0] = now - ago  # corrected
        ledger.commit([(f"uid:{k}", f"c{k}", ok(name))], [])
    clock[0] = now
    assert [r.file for r in ledger.recent(now - 24 * 3600, 500)] == ["NEW"]


def _sqlite_steps(ledger, action) -> int:
    """SQLite virtual-machine steps (in thousands) that ``action`` costs on ``ledger``."""
    steps = [0]

    def count():
        steps[0] += 1
        return 0

    ledger.db.set_progress_handler(count, 1000)
    try:
        action()
    finally:
        ledger.db.set_progress_handler(None, 0)
    return steps[0]


def test_finding_the_held_studies_costs_the_same_in_a_ledger_of_a_year(tmp_path):
    """Every rescan of the watch daemon asks the ledger for its held studies (release_held).
    It read every record to find them: a year's ledger (100,000 studies, 215 MiB) was read
    whole every 30 s to find a few dozen. Now the held ones are indexed: the same cost for a
    ledger 20 times as long, and the same studies found."""
    from cxr_batch.record import HELD_BACK

    def held(study, image):
        return StudyRecord(file=f"{study}/{image}.dcm", status="skipped", reason=f"{HELD_BACK}two patients",
                           ids=Identifiers(study_uid=f"1.2.9.{study}", patient_id=f"P{image}"))

    costs = []
    for scored in (200, 4000):
        ledger = Ledger(tmp_path / f"l{scored}.sqlite")
        ledger.commit([(f"uid:{i}", f"c{i}", ok(f"s{i}.dcm", study_uid=f"1.2.1.{i}")) for i in range(scored)], [])
        ledger.commit([(f"uid:h{s}.{k}", f"h{s}.{k}", held(s, k)) for s in range(3) for k in range(2)], [])
        assert sorted(ledger.held_studies()) == ["1.2.9.0", "1.2.9.1", "1.2.9.2"]
        costs.append(_sqlite_steps(ledger, ledger.held_studies))
        ledger.close()
    assert costs[1] <= costs[0] + 1, costs  # thousands of steps: not 20 times as many


def test_a_kill_while_an_upgrade_indexes_a_long_ledger_keeps_every_row(tmp_path):
    """The first start after an upgrade indexes the held and unpublished studies of the ledger
    (seconds for a year's). SIGKILL at any moment of it, then a start: every row is there, the
    held studies found, the indexes made."""
    import subprocess
    import sys

    from cxr_batch.record import HELD_BACK

    path = tmp_path / "l.sqlite"
    ledger = Ledger(path)
    for start in range(0, 20000, 5000):
        ledger.commit([(f"uid:{i}", f"c{i}", ok(f"s{i}.dcm", study_uid=f"1.2.1.{i}"))
                       for i in range(start, start + 5000)], [])
    held = StudyRecord(file="h.dcm", status="skipped", reason=f"{HELD_BACK}two patients",
                       ids=Identifiers(study_uid="1.2.9"))
    ledger.commit([("uid:h", "h", held)], [])
    ledger.mark_published()
    ledger.close()
    opening = f"import sys; sys.path.insert(0, {str(Path(__file__).resolve().parent.parent)!r}); " \
              f"from cxr_batch.ledger import Ledger; Ledger({str(path)!r}).close()"
    for delay in (0.0, 0.05, 0.1, 0.2, 0.4, 0.8):
        with sqlite3.connect(path) as db:  # the ledger as the release before left it
            db.execute("DROP INDEX IF EXISTS studies_held")
            db.execute("DROP INDEX IF EXISTS studies_unpublished")
        child = subprocess.Popen([sys.executable, "-c", opening])
        time.sleep(delay)
        child.kill()
        child.wait()
        again = Ledger(path)
        assert again.count() == 20001 and again.held_studies() == ["1.2.9"]
        assert again.csv_current(None) is False and not again.unpublished()
        indexes = {r[0] for r in again.db.execute("SELECT name FROM sqlite_master WHERE type = 'index'")}
        assert {"studies_held", "studies_unpublished"} <= indexes
        again.close()


def test_results_csv_edited_in_place_on_a_file_system_with_coarse_times_is_not_taken_as_the_ledger_s(
        tmp_path, monkeypatch):
    """On a file system that keeps times to the second (ext4 with 128-byte inodes, as mkfs makes
    for small or old file systems; vfat, HFS+, many NFS and SMB shares), results.csv edited in
    place within the second the daemon last wrote it (`systemctl stop; fix.py; systemctl start`),
    to the same size, has the same inode, size, mtime and ctime: the daemon kept the edited
    file. Times that coarse cannot tell the two apart: such a results.csv is rewritten at every
    start, as it always was."""
    import cxr_batch.ledger as ledger_module
    from cxr_batch.ledger import results_stamp

    real_stat = os.stat

    def to_the_second(path, *args, **kwargs):  # what such a file system keeps
        st = real_stat(path, *args, **kwargs)
        fields = list(st)
        fields[stat.ST_MTIME], fields[stat.ST_CTIME] = st.st_mtime_ns // 10**9, st.st_ctime_ns // 10**9
        return os.stat_result(fields, {"st_mtime_ns": st.st_mtime_ns // 10**9 * 10**9,
                                       "st_ctime_ns": st.st_ctime_ns // 10**9 * 10**9})

    monkeypatch.setattr(ledger_module.os, "stat", to_the_second)
    csv = tmp_path / "results.csv"
    ledger = Ledger(tmp_path / "ledger.sqlite")
    ledger.commit([("uid:1", "c1", ok("a.dcm", patient_id="P1"))], [])
    csv.write_text("file,patient_id\na.dcm,P1\n")
    ledger.mark_published(csv_stamp=results_stamp(csv))
    before = real_stat(csv)
    with open(csv, "r+b") as f:  # P1 -> P9, in place, the same second
        f.seek(len("file,patient_id\na.dcm,P"))
        f.write(b"9")
    if real_stat(csv).st_ctime_ns // 10**9 != before.st_ctime_ns // 10**9:
        pytest.skip("the edit fell in the next second")
    assert not ledger.csv_current(results_stamp(csv)), "the edited results.csv would be kept"
    # on a file system with finer times (ext4, XFS, btrfs, tmpfs) the file is still kept
    monkeypatch.setattr(ledger_module.os, "stat", real_stat)
    ledger.mark_published(csv_stamp=results_stamp(csv))
    assert ledger.csv_current(results_stamp(csv))

"""The watch daemon with a real DICOM sender: storescp writes into the watched folder, storescu
sends; SIGKILL mid-stream and restart; slow writers, duplicates and malformed files."""

import signal
import subprocess
import time
from collections import Counter

import numpy as np
import pytest

from .dicomgen import grey, have, write
from .watchkit import free_port, rows_now, start_daemon, status, wait_for


@pytest.mark.slow
@pytest.mark.skipif(not have("storescp", "storescu"), reason="dcmtk not installed")
def test_storescp_stream_with_sigkill_restart_is_exactly_once(tmp_path, nih_images, small_bundle):
    incoming, out, send = tmp_path / "incoming", tmp_path / "out", tmp_path / "send"
    incoming.mkdir()
    config = tmp_path / "watch.toml"
    config.write_text("[watch]\nbatch_size = 4\nmax_wait = 0.3\nsettle = 0.5\nbroken_deadline = 4.0\n"
                      "rescan_interval = 2.0\nworkers = 0\n")
    files = [write(send / f"{i:02d}.dcm", grey(p), PatientID=f"P{i:02d}") for i, p in enumerate(nih_images[:12])]
    port = free_port()
    scp = subprocess.Popen(["storescp", "--output-directory", str(incoming), "-aet", "CXR", str(port)],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    daemon = start_daemon(incoming, out, small_bundle, config)
    try:
        time.sleep(0.5)
        subprocess.run(["storescu", "-aec", "CXR", "127.0.0.1", str(port), *map(str, files[:6])], check=True,
                       capture_output=True, timeout=60)
        assert wait_for(lambda: len(rows_now(out)) >= 2), daemon.stderr.read() if daemon.poll() is not None else ""
        sender = subprocess.Popen(["storescu", "-aec", "CXR", "127.0.0.1", str(port), *map(str, files[6:])],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        daemon.send_signal(signal.SIGKILL)  # mid-stream: some sent, some being received
        daemon.wait()
        sender.wait(timeout=60)
        # a re-sent instance, a malformed file, and a slow writer while the daemon is down and after
        subprocess.run(["storescu", "-aec", "CXR", "127.0.0.1", str(port), str(files[0])], check=True,
                       capture_output=True, timeout=60)
        (incoming / "garbage.dcm").write_bytes(np.random.default_rng(0).bytes(3000))
        slow_src = write(send / "slow.dcm", grey(nih_images[12]), PatientID="SLOW").read_bytes()
        daemon = start_daemon(incoming, out, small_bundle, config)
        with open(incoming / "slow.dcm", "wb") as f:
            for i in range(0, len(slow_src), len(slow_src) // 6):
                f.write(slow_src[i:i + len(slow_src) // 6])
                f.flush()
                time.sleep(0.4)  # written in chunks over about 2.5 s
        assert wait_for(lambda: len(rows_now(out)) >= 14), [r["file"] for r in rows_now(out)]
        time.sleep(2.5)  # a rescan or two more: nothing may be added twice
        daemon.send_signal(signal.SIGTERM)
        assert daemon.wait(timeout=60) == 0
    finally:
        for proc in (daemon, scp):
            if proc.poll() is None:
                proc.kill()
    rows = rows_now(out)
    ok = [r for r in rows if r["status"] == "ok"]
    counts = Counter(r["sop_uid"] for r in ok)
    assert len(ok) == 13 and all(c == 1 for c in counts.values())  # 12 sent + the slow one, each once
    assert {r["patient_id"] for r in ok} == {f"P{i:02d}" for i in range(12)} | {"SLOW"}
    errors = [r for r in rows if r["status"] == "error"]
    assert [r["file"] for r in errors] == ["garbage.dcm"]
    for r in ok:
        pdf = out / "reports" / r["report"]
        assert pdf.exists() and pdf.read_bytes().rstrip().endswith(b"%%EOF")
    leftovers = [p for p in out.rglob("*") if p.name.endswith(".tmp") or p.name.startswith(".results")]
    assert leftovers == []
    assert (out / "reports" / "worklist.pdf").exists() and status(out)["state"] == "stopped"


def test_the_worklist_keeps_this_run_s_studies_of_the_last_hours_whatever_the_wall_clock_did(tmp_path):
    """A daemon started with the clock a day slow (a dead RTC battery, NTP not yet synced)
    stamped its studies a day old; once the clock was corrected, the next worklist went by
    those stamps and dropped them, minutes old. The daemon knows, by its monotonic clock,
    which of the ledger's studies (by order) arrived in the last ``worklist_hours``: those stay,
    those that arrived earlier go, whatever their stamps."""
    import types

    from cxr_batch.ledger import Ledger
    from cxr_batch.watch import ArrivalWindow, Watcher

    from .test_ledger import ok

    hours = 8.0
    window = ArrivalWindow(first_seq=0, now=1000.0)  # the run starts; no study in the ledger
    assert window.after(hours, now=1000.0) == 0
    window.mark(1100.0, 3)  # a worklist written: 3 studies recorded by then
    window.mark(1200.0, 5)
    assert window.after(hours, now=1300.0) == 0  # the run is younger than the window: all of it
    assert window.after(hours, now=1100.0 + hours * 3600) == 3  # arrived by 1100: older than the window
    assert window.after(hours, now=1150.0 + hours * 3600) == 3  # at most one mark's studies too many, never fewer
    assert window.after(hours, now=1200.0 + hours * 3600 + 1) == 5
    window.mark(1200.0 + hours * 3600 + 2, 9)
    assert len(window.marks) == 2  # the marks older than the window's start, but the last, are let go

    ledger = Ledger(tmp_path / "l.sqlite")
    written = []
    daemon = types.SimpleNamespace(
        ledger=ledger, cfg=types.SimpleNamespace(worklist_hours=hours, worklist_max=500),
        reports=types.SimpleNamespace(write_worklist=lambda records, alarm: written.append([r.file for r in records])),
        drift=types.SimpleNamespace(worklist_line=lambda: None), worklist_due=True, worklist_built=0.0,
        arrivals=ArrivalWindow(first_seq=ledger.last_seq()))
    slow = time.time() - 86400
    ledger.commit([("uid:1", "c1", ok("A"))], [])
    ledger.db.execute("UPDATE studies SET reported_at = ?", (slow,))  # recorded with the clock a day slow
    ledger.db.commit()
    ledger.commit([("uid:2", "c2", ok("B"))], [])  # the clock corrected
    Watcher.write_worklist(daemon)
    assert written == [["A", "B"]]
    Watcher.write_worklist(daemon)
    assert written[-1] == ["A", "B"] and len(daemon.arrivals.marks) == 3


_SHIFTED_CLOCK = '''
import os, time
_real, _offset_file, _read = time.time, os.environ["CXR_TEST_CLOCK_OFFSET"], [0.0, -1e9]


def _shifted():  # the wall clock, off by the seconds the test's file says (re-read every 0.2 s)
    if time.monotonic() - _read[1] > 0.2:
        try:
            _read[0] = float(open(_offset_file).read())
        except (OSError, ValueError):
            pass
        _read[1] = time.monotonic()
    return _real() + _read[0]


time.time = _shifted
'''


def test_studies_stamped_while_the_clock_was_a_day_slow_stay_on_the_worklist_once_it_is_corrected(
        tmp_path, nih_images, small_bundle):
    """The daemon ran with the wall clock a day slow (a dead RTC battery, NTP not yet synced),
    then the clock was corrected: the next study's worklist, built over the last 8 hours by the
    stamps, dropped the two studies of minutes before. The worklist keeps them (the daemon's
    time.time is a day slow, then right: a sitecustomize sets it)."""
    import os

    from .test_drift import pdf_text
    from .watchkit import stop, watch_config

    incoming, out, shim = tmp_path / "in", tmp_path / "out", tmp_path / "shim"
    incoming.mkdir()
    shim.mkdir()
    (shim / "sitecustomize.py").write_text(_SHIFTED_CLOCK)
    offset = tmp_path / "offset"
    offset.write_text("-86400")
    env = {"CXR_TEST_CLOCK_OFFSET": str(offset),
           "PYTHONPATH": os.pathsep.join([str(shim)] + [p for p in [os.environ.get("PYTHONPATH")] if p])}
    daemon = start_daemon(incoming, out, small_bundle, watch_config(tmp_path / "w.toml", worklist_hours=8.0), env=env)
    worklist = out / "reports" / "worklist.pdf"
    try:
        for k in range(2):
            write(incoming / f"{k}.dcm", grey(nih_images[k]), PatientID=f"SLOW{k}")
        assert wait_for(lambda: "SLOW0" in pdf_text(worklist) and "SLOW1" in pdf_text(worklist)), \
            daemon.stderr.read() if daemon.poll() is not None else pdf_text(worklist)
        offset.write_text("0")
        time.sleep(1)  # the daemon reads the corrected clock
        write(incoming / "2.dcm", grey(nih_images[2]), PatientID="RIGHT2")
        assert wait_for(lambda: "RIGHT2" in pdf_text(worklist)), pdf_text(worklist)
        text = pdf_text(worklist)
        assert "SLOW0" in text and "SLOW1" in text, text
    finally:
        assert stop(daemon) == 0


def test_a_workstation_that_slept_overnight_lets_yesterday_s_studies_go(tmp_path, monkeypatch):
    """The arrival window went by time.monotonic(), which stops while the machine is suspended:
    a reading workstation asleep overnight (its daemon with it) woke with the night not counted,
    and yesterday's studies stayed on the worklist as if minutes old. The window goes by a clock
    that counts the suspend (CLOCK_BOOTTIME on Linux, else the monotonic clock), and
    write_worklist reads the window's own clock."""
    import types

    import cxr_batch.watch as watch
    from cxr_batch.ledger import Ledger
    from cxr_batch.watch import ArrivalWindow, Watcher

    from .test_ledger import ok

    if hasattr(time, "CLOCK_BOOTTIME"):
        real = time.clock_gettime
        monkeypatch.setattr(time, "clock_gettime",
                            lambda which: 5e6 if which == time.CLOCK_BOOTTIME else real(which))
        assert watch.uptime() == 5e6
        monkeypatch.undo()
    monkeypatch.delattr(time, "CLOCK_BOOTTIME", raising=False)  # macOS, Windows: the monotonic clock
    assert abs(watch.uptime() - time.monotonic()) < 1.0
    monkeypatch.undo()

    hours, awake = 8.0, [1000.0]  # the clock that counts the suspend
    ledger = Ledger(tmp_path / "l.sqlite")
    written = []
    daemon = types.SimpleNamespace(
        ledger=ledger, cfg=types.SimpleNamespace(worklist_hours=hours, worklist_max=500),
        reports=types.SimpleNamespace(write_worklist=lambda records, alarm: written.append([r.file for r in records])),
        drift=types.SimpleNamespace(worklist_line=lambda: None), worklist_due=True, worklist_built=0.0,
        arrivals=ArrivalWindow(first_seq=ledger.last_seq(), now=awake[0], clock=lambda: awake[0]))
    ledger.commit([("uid:1", "c1", ok("YESTERDAY"))], [])
    Watcher.write_worklist(daemon)
    assert written[-1] == ["YESTERDAY"]
    awake[0] += 14 * 3600  # the night asleep; time.monotonic() did not move
    ledger.db.execute("UPDATE studies SET reported_at = ?", (time.time() - 14 * 3600,))  # the wall clock ran on
    ledger.db.commit()
    ledger.commit([("uid:2", "c2", ok("TODAY"))], [])
    Watcher.write_worklist(daemon)
    assert written[-1] == ["TODAY"]

"""The daemon never stops and never loses a study: poison first, broken-then-intact re-sends,
changed instances, a kill between any two steps, a full disk, a second daemon, a lost or
corrupt ledger, and operator mistakes in the configuration."""

import os
import shutil
import sqlite3
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pydicom
import pytest

from cxr_batch.findings import FINDINGS

from .dicomgen import grey, write
from .test_drift import pdf_text
from .watchkit import rows_now, start_daemon, status, stop, wait_for, watch_config

pytestmark = pytest.mark.slow
EXAMPLES = Path(__file__).resolve().parent.parent / "examples" / "studies"


def ok_rows(out):
    return [r for r in rows_now(out) if r["status"] == "ok"]


def good_dicoms(folder, nih_images, n, start=0):
    return [write(folder / f"g{i:02d}.dcm", grey(p), PatientID=f"G{i:02d}")
            for i, p in enumerate(nih_images[start:start + n], start=start)]


def fill(volume):
    """A file that fills ``volume`` to its last block; its path."""
    filler = volume / "filler"
    # unbuffered: a buffered file kept the bytes the disk had no room for, and raised ENOSPC again
    # when closed, as the free space left a part of the buffer over (one ledger page more did it)
    with open(filler, "wb", buffering=0) as f:
        try:
            while True:
                f.write(b"\0" * 65536)
                f.flush()
        except OSError:
            pass
    return filler


def test_poison_first_then_good_studies_and_a_second_daemon_is_refused(tmp_path, nih_images, small_bundle):
    incoming, out = tmp_path / "in", tmp_path / "out"
    incoming.mkdir()
    poison = "P" * 10_000
    write(incoming / "poison.dcm", grey(nih_images[0]), PatientID=poison, PatientName="X^" + "Y" * 10_000,
          AccessionNumber="A" * 5000, InstitutionName="I" * 5000, StudyDate="2" * 300)
    good_dicoms(incoming, nih_images, 3, start=1)
    config = watch_config(tmp_path / "w.toml")
    daemon = start_daemon(incoming, out, small_bundle, config)
    try:
        assert wait_for(lambda: len(ok_rows(out)) == 4), daemon.stderr.read() if daemon.poll() is not None else ""
        second = subprocess.run([sys.executable, "-m", "cxr_batch", "watch", str(incoming), "--out", str(out),
                                 "--weights", str(small_bundle), "--device", "cpu"], capture_output=True, text=True,
                                timeout=120)
        assert second.returncode != 0 and f"PID {daemon.pid}" in second.stderr
        assert daemon.poll() is None  # the first one is still running
        assert wait_for(lambda: status(out).get("state") == "running")
    finally:
        assert stop(daemon) == 0
    assert status(out)["state"] == "stopped"
    rows = {r["file"]: r for r in rows_now(out)}
    # an accession number is left out rather than cut (cut, it could be another order's)
    assert rows["poison.dcm"]["patient_id"] == "P" * 64 and rows["poison.dcm"]["accession_number"] == ""
    for r in rows.values():
        assert (out / "reports" / r["report"]).is_file()
    assert (out / "reports" / "worklist.pdf").is_file()


def test_truncated_copy_then_intact_resend_gives_one_ok_row(tmp_path, nih_images, small_bundle):
    incoming, out, src = tmp_path / "in", tmp_path / "out", tmp_path / "src"
    incoming.mkdir()
    intact = write(src / "IM1.dcm", grey(nih_images[0]), PatientID="RESENT").read_bytes()
    (incoming / "IM1.dcm").write_bytes(intact[: len(intact) // 3])  # a transfer cut short
    config = watch_config(tmp_path / "w.toml", broken_deadline=1.0)
    daemon = start_daemon(incoming, out, small_bundle, config)
    try:
        assert wait_for(lambda: [r["status"] for r in rows_now(out)] == ["error"])
        (incoming / "later").mkdir()
        (incoming / "later" / "IM1_again.dcm").write_bytes(intact)  # the re-send, under another name
        assert wait_for(lambda: [r["status"] for r in rows_now(out)] == ["ok"])
        (incoming / "IM1.dcm").write_bytes(intact)  # and the cut copy completed in place: a duplicate
        time.sleep(4)
    finally:
        assert stop(daemon) == 0
    rows = rows_now(out)
    assert len(rows) == 1 and rows[0]["status"] == "ok" and rows[0]["patient_id"] == "RESENT"
    assert (out / "reports" / rows[0]["report"]).is_file()


def test_changed_instance_with_the_same_uid_supersedes_the_old_result(tmp_path, nih_images, small_bundle):
    incoming, out = tmp_path / "in", tmp_path / "out"
    incoming.mkdir()
    first = write(incoming / "IM1.dcm", grey(nih_images[0]), PatientID="WRONG")
    uid = pydicom.dcmread(first).SOPInstanceUID
    daemon = start_daemon(incoming, out, small_bundle, watch_config(tmp_path / "w.toml"))
    try:
        assert wait_for(lambda: len(ok_rows(out)) == 1)
        old_report = ok_rows(out)[0]["report"]
        ds = pydicom.dcmread(first)
        ds.PatientID = "CORRECTED"
        ds.save_as(incoming / "IM1_corrected.dcm")
        assert wait_for(lambda: [r["patient_id"] for r in ok_rows(out)] == ["CORRECTED"])
    finally:
        assert stop(daemon) == 0
    rows = rows_now(out)
    assert len(rows) == 1 and rows[0]["sop_uid"] == uid
    assert rows[0]["report"] != old_report and (out / "reports" / old_report).is_file()
    assert status(out)["superseded"] == 1


def test_a_correction_with_the_same_size_and_times_renamed_over_the_study_is_read(tmp_path, small_bundle):
    """A corrected export renamed over a file already handled, with the same size and
    modification time (``cp -p``, ``rsync -t``, an export tool that keeps times) was never read:
    'handled' was decided from size and mtime, so the old patient's result stood. Its ctime (a
    rename or a write sets it; no copy carries it over) tells it from the file handled, also
    when it is copied into the file in place (the same inode). A restart with nothing changed
    reads nothing again."""
    incoming, out = tmp_path / "in", tmp_path / "out"
    incoming.mkdir()
    study = incoming / "IM0001.dcm"
    shutil.copy2(EXAMPLES / "dicom" / "NIH00100" / "STUDY1" / "SERIES1" / "IM0001.dcm", study)
    config = watch_config(tmp_path / "w.toml")
    daemon = start_daemon(incoming, out, small_bundle, config)
    try:
        assert wait_for(lambda: [r["patient_id"] for r in ok_rows(out)] == ["NIH00100"])
        ds = pydicom.dcmread(study)
        ds.PatientID = "NIH00999"  # another patient, an ID of the same length: the same size
        ds.save_as(incoming / "IM0001.dcm.part")
        before = study.stat()
        os.utime(incoming / "IM0001.dcm.part", ns=(before.st_atime_ns, before.st_mtime_ns))
        after = (incoming / "IM0001.dcm.part").stat()
        assert (after.st_size, after.st_mtime_ns) == (before.st_size, before.st_mtime_ns)
        os.replace(incoming / "IM0001.dcm.part", study)
        assert wait_for(lambda: [r["patient_id"] for r in ok_rows(out)] == ["NIH00999"], timeout=30), rows_now(out)
        ds.PatientID = "NIH00777"  # and one copied into it in place, by `cp -p`: the same inode too
        ds.save_as(tmp_path / "IM0001.dcm")
        os.utime(tmp_path / "IM0001.dcm", ns=(before.st_atime_ns, before.st_mtime_ns))
        subprocess.run(["cp", "-p", tmp_path / "IM0001.dcm", study], check=True)
        now = study.stat()
        assert (now.st_ino, now.st_size, now.st_mtime_ns) == (after.st_ino, after.st_size, after.st_mtime_ns)
        assert wait_for(lambda: [r["patient_id"] for r in ok_rows(out)] == ["NIH00777"], timeout=30), rows_now(out)
    finally:
        assert stop(daemon) == 0
    assert status(out)["superseded"] == 2
    again = start_daemon(incoming, out, small_bundle, config)
    try:
        assert wait_for(lambda: status(out).get("state") == "running" and status(out)["pid"] == again.pid)
        time.sleep(3)  # a rescan or two
    finally:
        assert stop(again) == 0
    log = again.stderr.read()
    assert "IM0001" not in log, log[-2000:]  # not read again: neither scored nor a duplicate
    assert [r["patient_id"] for r in rows_now(out)] == ["NIH00777"]


def test_a_schema_6_ledger_upgraded_reads_nothing_again_and_then_reads_a_correction(tmp_path, small_bundle):
    """A results folder of the release before ctimes (schema 6): the daemon of this release
    reads none of its handled files again, and a correction renamed over one of them later
    with the same size and modification time is read (its schema-6 row, matched by size and
    mtime alone for ever, hid every such correction)."""
    import sqlite3

    incoming, out = tmp_path / "in", tmp_path / "out"
    incoming.mkdir()
    study = incoming / "IM0001.dcm"
    shutil.copy2(EXAMPLES / "dicom" / "NIH00100" / "STUDY1" / "SERIES1" / "IM0001.dcm", study)
    shutil.copy2(EXAMPLES / "dicom" / "NIH00574" / "STUDY1" / "SERIES1" / "IM0001", incoming / "other.dcm")
    config = watch_config(tmp_path / "w.toml")
    daemon = start_daemon(incoming, out, small_bundle, config)
    try:
        assert wait_for(lambda: len(ok_rows(out)) == 2), rows_now(out)
    finally:
        assert stop(daemon) == 0
    db = sqlite3.connect(out / ".cxr-batch" / "ledger.sqlite", isolation_level=None)
    db.execute("ALTER TABLE files DROP COLUMN ctime_ns")  # the ledger as schema 6 wrote it
    db.execute("INSERT OR REPLACE INTO meta VALUES ('schema', '6')")
    db.close()
    upgraded = start_daemon(incoming, out, small_bundle, config)
    try:
        assert wait_for(lambda: status(out).get("state") == "running" and status(out)["pid"] == upgraded.pid)
        time.sleep(3)  # a rescan or two: nothing read again
        ds = pydicom.dcmread(study)
        ds.PatientID = "NIH00999"  # a correction of the same size, its mtime kept, renamed over the study
        ds.save_as(incoming / "IM0001.dcm.part")
        before = study.stat()
        os.utime(incoming / "IM0001.dcm.part", ns=(before.st_atime_ns, before.st_mtime_ns))
        os.replace(incoming / "IM0001.dcm.part", study)
        assert wait_for(lambda: "NIH00999" in [r["patient_id"] for r in ok_rows(out)], timeout=30), rows_now(out)
    finally:
        assert stop(upgraded) == 0
    log = upgraded.stderr.read()
    assert "other.dcm" not in log, log[-2000:]  # the unchanged study was not scored again
    assert sorted(r["patient_id"] for r in ok_rows(out)) == ["NIH00574", "NIH00999"]
    assert status(out)["superseded"] == 1


@pytest.mark.parametrize("step", ["reports", "commit", "publish"])
def test_kill_between_steps_then_restart_is_exactly_once(tmp_path, nih_images, small_bundle, step):
    incoming, out = tmp_path / "in", tmp_path / "out"
    incoming.mkdir()
    good_dicoms(incoming, nih_images, 3)
    config = watch_config(tmp_path / "w.toml", batch_size=8, max_wait=1.0)
    killed = start_daemon(incoming, out, small_bundle, config, env={"CXR_BATCH_KILL_AT": step})
    assert killed.wait(timeout=180) == -9
    daemon = start_daemon(incoming, out, small_bundle, config)
    try:
        assert wait_for(lambda: len(ok_rows(out)) == 3), daemon.stderr.read() if daemon.poll() is not None else ""
        assert wait_for(lambda: status(out).get("state") == "running" and status(out)["pid"] == daemon.pid)
        time.sleep(3)  # a rescan or two: nothing may be added twice
    finally:
        assert stop(daemon) == 0
    rows = rows_now(out)
    assert Counter(r["patient_id"] for r in rows) == {"G00": 1, "G01": 1, "G02": 1}
    for r in rows:
        assert (out / "reports" / r["report"]).is_file()
    assert not [p for p in out.rglob("*") if p.name.endswith(".tmp")]


def test_kill_between_publish_and_archive_archives_at_the_next_start(tmp_path, nih_images, small_bundle):
    """Files published but not yet moved to --archive-dir when the daemon died are archived at
    the next start, not left in the export folder for ever (the ledger knows they are done)."""
    incoming, out, archive = tmp_path / "in", tmp_path / "out", tmp_path / "archive"
    incoming.mkdir()
    good_dicoms(incoming, nih_images, 3)
    config = watch_config(tmp_path / "w.toml", batch_size=8, max_wait=1.0)
    killed = start_daemon(incoming, out, small_bundle, config, "--archive-dir", archive,
                          env={"CXR_BATCH_KILL_AT": "publish"})
    assert killed.wait(timeout=180) == -9
    assert len(ok_rows(out)) == 3 and len(list(incoming.iterdir())) == 3  # published, not archived
    daemon = start_daemon(incoming, out, small_bundle, config, "--archive-dir", archive)
    try:
        assert wait_for(lambda: not list(incoming.iterdir()), timeout=120), list(incoming.iterdir())
        assert wait_for(lambda: status(out).get("state") == "running" and status(out)["pid"] == daemon.pid)
    finally:
        assert stop(daemon) == 0
    assert sorted(p.name.split(".")[0] for p in archive.iterdir()) == ["g00", "g01", "g02"]
    assert len(rows_now(out)) == 3  # archived, not scored again


def test_full_disk_degrades_then_catches_up(tmp_path, nih_images, small_bundle, small_disk):
    incoming, out = tmp_path / "in", small_disk / "out"
    incoming.mkdir()
    daemon = start_daemon(incoming, out, small_bundle, watch_config(tmp_path / "w.toml"))
    try:
        assert wait_for(lambda: status(out).get("state") == "running")
        filler = fill(small_disk)
        good_dicoms(incoming, nih_images, 2)
        assert wait_for(lambda: status(out).get("state") == "degraded", timeout=60)
        assert daemon.poll() is None
        filler.unlink()
        assert wait_for(lambda: len(ok_rows(out)) == 2, timeout=180)
        assert wait_for(lambda: status(out).get("state") == "running", timeout=60)
    finally:
        assert stop(daemon) == 0
    for r in ok_rows(out):
        assert (out / "reports" / r["report"]).is_file()


def test_lost_ledger_keeps_results_and_a_corrupt_one_is_a_clear_error(tmp_path, nih_images, small_bundle):
    incoming, out = tmp_path / "in", tmp_path / "out"
    incoming.mkdir()
    good_dicoms(incoming, nih_images, 2)
    config = watch_config(tmp_path / "w.toml")
    daemon = start_daemon(incoming, out, small_bundle, config)
    assert wait_for(lambda: len(ok_rows(out)) == 2)
    assert stop(daemon) == 0
    ledger = out / ".cxr-batch" / "ledger.sqlite"
    for p in ledger.parent.glob("ledger.sqlite*"):
        p.unlink()
    daemon = start_daemon(incoming, out, small_bundle, config)
    try:
        assert wait_for(lambda: status(out).get("state") == "running")
        time.sleep(3)  # rescans happen: the two studies are known again, not scored twice
        assert len(rows_now(out)) == 2
    finally:
        assert stop(daemon) == 0
    before = (out / "results.csv").read_bytes()
    for p in ledger.parent.glob("ledger.sqlite*"):
        p.unlink()
    ledger.write_bytes(b"SQLite format 3\x00" + os.urandom(8192))
    broken = start_daemon(incoming, out, small_bundle, config)
    assert broken.wait(timeout=120) == 1
    err = broken.stderr.read()
    assert "not a readable ledger" in err and "Traceback" not in err
    assert (out / "results.csv").read_bytes() == before


def test_a_results_folder_of_a_newer_release_is_refused_and_not_rewritten(tmp_path, small_bundle):
    """cxr-batch rolled back after an upgrade: the daemon stamped the newer ledger with its own
    schema and rewrote results.csv from it with its own columns. It stops, saying why."""
    from cxr_batch.ledger import Ledger

    incoming, out = tmp_path / "in", tmp_path / "out"
    incoming.mkdir()
    ledger = out / ".cxr-batch" / "ledger.sqlite"
    Ledger(ledger).close()
    db = sqlite3.connect(ledger, isolation_level=None)
    db.execute("INSERT OR REPLACE INTO meta VALUES ('schema', '8')")
    db.close()
    (out / "results.csv").write_text("file,status,a_later_column\r\na.dcm,ok,x\r\n")
    before = {p: p.read_bytes() for p in (ledger, out / "results.csv")}
    daemon = start_daemon(incoming, out, small_bundle, watch_config(tmp_path / "w.toml"))
    assert daemon.wait(timeout=120) == 1
    err = daemon.stderr.read()
    assert "written by a newer cxr-batch (ledger schema 8" in err and "Traceback" not in err
    assert {p: p.read_bytes() for p in before} == before


def test_zero_filled_giant_and_operator_mistakes(tmp_path, nih_images, small_bundle):
    incoming, out = tmp_path / "in", tmp_path / "out"
    incoming.mkdir()
    with open(incoming / "zeros.dcm", "wb") as f:
        f.truncate(200 << 20)  # 200 MB of zeros
    good_dicoms(incoming, nih_images, 1)
    inside = watch_config(tmp_path / "bad.toml", archive_dir=str(incoming / "archive"))
    refused = start_daemon(incoming, out, small_bundle, inside)
    assert refused.wait(timeout=120) == 2 and "inside the watched folder" in refused.stderr.read()
    zero_batch = watch_config(tmp_path / "zero.toml", batch_size=0)
    refused = start_daemon(incoming, out, small_bundle, zero_batch)
    assert refused.wait(timeout=120) == 2 and "batch_size" in refused.stderr.read()
    daemon = start_daemon(incoming, out, small_bundle, watch_config(tmp_path / "w.toml"),
                          "--archive-dir", tmp_path / "archive")
    try:
        assert wait_for(lambda: len(rows_now(out)) == 2)
    finally:
        assert stop(daemon) == 0
    rows = {r["file"]: r for r in rows_now(out)}
    assert rows["zeros.dcm"]["status"] == "error" and rows["g00.dcm"]["status"] == "ok"
    assert len(FINDINGS) == 14 and list((tmp_path / "archive").glob("g00.*.dcm"))


def test_stop_while_loading_is_a_clean_stop(tmp_path, small_bundle):
    incoming, out = tmp_path / "in", tmp_path / "out"
    incoming.mkdir()
    daemon = start_daemon(incoming, out, small_bundle, watch_config(tmp_path / "w.toml"))
    assert "starting" in daemon.stderr.readline()  # its signal handlers are in place
    time.sleep(0.3)  # still importing torch and loading the model
    assert stop(daemon) == 0
    assert status(out).get("state") in ("stopped", None)  # stopped, or stopped before it wrote anything


@pytest.mark.parametrize("kill_at", [None, "publish", "sigterm"])
def test_three_versions_of_an_instance_in_one_batch_end_with_the_last_sent(tmp_path, nih_images, small_bundle,
                                                                          kill_at):
    """One SOPInstanceUID stored three times before a batch closes: the image, a correction, then
    the original again (the correction withdrawn), plus a resend of the original. Versions are
    scored in the order they were written, one per batch, so the last one written stands: the
    withdrawn correction was left current, the later original dropped as a 'duplicate' of the
    first. A daemon killed after the first batch (SIGKILL) or stopped (SIGTERM) finishes the
    rest at its restart."""
    incoming, out = tmp_path / "in", tmp_path / "out"
    incoming.mkdir()
    original = write(incoming / "a_first.dcm", grey(nih_images[0]), PatientID="ORIGINAL")
    ds = pydicom.dcmread(original)
    ds.PatientID = "CORRECTION"
    ds.save_as(incoming / "b_correction.dcm")
    (incoming / "c_resend.dcm").write_bytes(original.read_bytes())  # a resend: the same bytes
    (incoming / "d_original_again.dcm").write_bytes(original.read_bytes())
    t = time.time() - 60
    for i, name in enumerate(["a_first.dcm", "c_resend.dcm", "b_correction.dcm", "d_original_again.dcm"]):
        os.utime(incoming / name, (t + i, t + i))  # written in this order
    config = watch_config(tmp_path / "w.toml", batch_size=8, max_wait=1.0)
    if kill_at == "publish":
        killed = start_daemon(incoming, out, small_bundle, config, env={"CXR_BATCH_KILL_AT": kill_at})
        assert killed.wait(timeout=180) == -9
        assert [r["patient_id"] for r in ok_rows(out)] == ["ORIGINAL"]  # the first batch: the oldest version
    elif kill_at == "sigterm":  # stopped once the first result is out, wherever the rest then is
        stopped = start_daemon(incoming, out, small_bundle, config)
        assert wait_for(lambda: ok_rows(out), timeout=150)
        assert stop(stopped) == 0
    daemon = start_daemon(incoming, out, small_bundle, config)
    try:
        assert wait_for(lambda: status(out).get("superseded") == 2 and status(out).get("pending") == 0,
                        timeout=150), (status(out), daemon.stderr.read() if daemon.poll() is not None else "")
        time.sleep(2)  # a rescan: nothing more happens
    finally:
        assert stop(daemon) == 0
    rows = rows_now(out)
    assert [(r["patient_id"], r["status"]) for r in rows] == [("ORIGINAL", "ok")]
    assert rows[0]["file"] == "d_original_again.dcm" and status(out)["superseded"] == 2



@pytest.mark.parametrize("source_mtimes", ["older", "equal"])
def test_versions_copied_with_cp_p_in_one_batch_are_ordered_by_arrival(tmp_path, nih_images, small_bundle,
                                                                        source_mtimes):
    """``cp -p`` keeps the source's mtimes. A correction came, then the original was restored from
    the archive (its mtime "older": a day before the correction's; or "equal": both exported in
    one second), both in one batch: the versions were ordered by mtime (or, on a tie, by name),
    so the correction stood, where the same two files in two batches leave the original standing.
    The order is now the order of arrival in the folder (ctime, which no copy carries over): the
    same result wherever the batch boundary falls."""
    incoming, out, source = tmp_path / "in", tmp_path / "out", tmp_path / "archive"
    incoming.mkdir()
    source.mkdir()
    original = write(source / "a_original.dcm", grey(nih_images[0]), PatientID="ORIGINAL")
    ds = pydicom.dcmread(original)
    ds.PatientID = "CORRECTION"
    ds.save_as(source / "b_correction.dcm")
    day_ago = time.time() - 86400
    os.utime(source / "b_correction.dcm", (day_ago + 3600, day_ago + 3600))
    os.utime(original, (day_ago + 3600 * (source_mtimes == "equal"),) * 2)
    subprocess.run(["cp", "-p", source / "b_correction.dcm", incoming], check=True)
    time.sleep(0.05)  # past the file system's clock tick
    subprocess.run(["cp", "-p", original, incoming], check=True)  # the original, restored after it
    arrived = lambda name: (incoming / name).stat().st_ctime_ns  # noqa: E731
    assert arrived("b_correction.dcm") < arrived("a_original.dcm")  # in neither name nor mtime order
    daemon = start_daemon(incoming, out, small_bundle, watch_config(tmp_path / "w.toml", batch_size=8, max_wait=1.0))
    try:
        assert wait_for(lambda: status(out).get("superseded") == 1 and status(out).get("pending") == 0,
                        timeout=150), status(out)
    finally:
        assert stop(daemon) == 0
    assert [(r["file"], r["patient_id"]) for r in ok_rows(out)] == [("a_original.dcm", "ORIGINAL")]


def test_a_correction_that_cannot_be_read_leaves_the_result_it_corrects_and_says_so(tmp_path, nih_images,
                                                                                   small_bundle):
    """A corrected version of an instance cut short in transfer (its header, so its UID, is
    readable) is an error, and an error never replaces a result: the first result stays the one
    row, nothing is superseded, and the log says the later version failed and what stands. The
    row says so too (it said nothing: a reader of results.csv could not know a correction came)."""
    incoming, out = tmp_path / "in", tmp_path / "out"
    incoming.mkdir()
    first = write(incoming / "IM1.dcm", grey(nih_images[0]), PatientID="FIRST")
    daemon = start_daemon(incoming, out, small_bundle, watch_config(tmp_path / "w.toml", broken_deadline=1.0))
    try:
        assert wait_for(lambda: len(ok_rows(out)) == 1)
        ds = pydicom.dcmread(first)
        ds.PatientID = "CORRECTION"
        ds.save_as(tmp_path / "whole.dcm")
        data = (tmp_path / "whole.dcm").read_bytes()
        (incoming / "IM1_corrected.dcm").write_bytes(data[: len(data) * 2 // 3])
        time.sleep(8)  # settled, past broken_deadline: committed as an error behind the result
    finally:
        assert stop(daemon) == 0
    log = daemon.stderr.read()
    (row,) = rows_now(out)
    assert (row["patient_id"], row["status"]) == ("FIRST", "ok")
    assert "a later version of this instance could not be read" in row["notes"], row["notes"]
    assert "this result is of the earlier version" in row["notes"]
    assert "a later version could not be read" in " ".join(pdf_text(out / "reports" / "worklist.pdf").split())
    assert status(out)["superseded"] == 0
    kept = [line for line in log.splitlines() if "status=error" in line and "an earlier result is kept" in line]
    assert len(kept) == 1 and "CORRECTION" not in log, log[-2000:]


def test_a_watched_folder_that_vanishes_is_said_and_watched_again_when_it_is_back(tmp_path, nih_images,
                                                                                 small_bundle):
    """An export share unmounted or its folder removed: the daemon said nothing and status.json
    read "running" while it could see no study. Now the log and status.json say the folder is
    missing within a heartbeat, and once it is back its new studies are seen at once (its
    file-system watch is made again: not left to the full rescan, here ten minutes away)."""
    import shutil

    incoming, out = tmp_path / "in", tmp_path / "out"
    incoming.mkdir()
    good_dicoms(incoming, nih_images, 1)
    daemon = start_daemon(incoming, out, small_bundle, watch_config(tmp_path / "w.toml", rescan_interval=600.0))
    try:
        assert wait_for(lambda: len(ok_rows(out)) == 1)
        shutil.rmtree(incoming)
        assert wait_for(lambda: status(out).get("state") == "degraded", timeout=30), status(out)
        assert "watched folder is missing" in status(out)["reason"]
        incoming.mkdir()
        assert wait_for(lambda: status(out).get("state") == "running", timeout=30), status(out)
        good_dicoms(incoming, nih_images, 1, start=1)  # after it is back: seen by the watch made again
        assert wait_for(lambda: len(ok_rows(out)) == 2, timeout=30), status(out)
    finally:
        assert stop(daemon) == 0
    log = daemon.stderr.read()
    assert log.count("is missing") == 1 and "is back" in log, log[-2000:]


@pytest.mark.parametrize("polling", [False, True])
def test_a_watched_folder_replaced_between_heartbeats_is_watched_again(tmp_path, nih_images, small_bundle, polling):
    """The watched folder removed and made again (an export tool that recreates it, a share
    remounted) faster than a heartbeat, once and again: it was never
    seen missing, so its file-system watch (gone with the old folder) was not made again and new
    studies waited for the full rescan (30 s by default, here ten minutes). Now a folder whose
    watch ended, or that is another folder than was watched, is watched again at the next
    heartbeat."""
    import shutil

    incoming, out = tmp_path / "in", tmp_path / "out"
    incoming.mkdir()
    good_dicoms(incoming, nih_images, 1)
    daemon = start_daemon(incoming, out, small_bundle, watch_config(tmp_path / "w.toml", rescan_interval=600.0,
                                                                    heartbeat_interval=1.0, polling=polling))
    try:
        assert wait_for(lambda: len(ok_rows(out)) == 1)
        shutil.rmtree(incoming)
        incoming.mkdir()
        time.sleep(3)  # a heartbeat or two
        good_dicoms(incoming, nih_images, 1, start=1)
        assert wait_for(lambda: len(ok_rows(out)) == 2, timeout=40), status(out)
        shutil.rmtree(incoming)  # and again: each time
        incoming.mkdir()
        time.sleep(3)
        good_dicoms(incoming, nih_images, 1, start=2)
        assert wait_for(lambda: len(ok_rows(out)) == 3, timeout=40), status(out)
        assert status(out)["state"] == "running"
    finally:
        assert stop(daemon) == 0
    log = daemon.stderr.read()
    # polling compares listings of the path, so it goes on by itself unless a poll fell in the gap
    assert log.count("was replaced") == 2 or polling, log[-2000:]


def test_a_full_disk_and_a_missing_watched_folder_are_both_said(tmp_path, nih_images, small_bundle, small_disk):
    """The results volume full and the watched folder gone at the same time: status.json said
    only the missing folder (the disk error was overwritten at each heartbeat), and once the
    folder was back it read "running" while nothing could be written. Now its reason names both,
    and "running" comes back only when both are over."""
    import shutil

    incoming, out = tmp_path / "in", small_disk / "out"
    incoming.mkdir()
    daemon = start_daemon(incoming, out, small_bundle, watch_config(tmp_path / "w.toml", retry_max=2.0))
    try:
        assert wait_for(lambda: status(out).get("state") == "running")
        filler = fill(small_disk)
        good_dicoms(incoming, nih_images, 2)
        assert wait_for(lambda: status(out).get("state") == "degraded", timeout=60)
        disk = "No space left on device"
        assert disk in status(out)["reason"], status(out)
        shutil.rmtree(incoming)
        assert wait_for(lambda: "watched folder is missing" in status(out)["reason"], timeout=30), status(out)
        time.sleep(3)  # heartbeats and retries: both stay said
        both = status(out)["reason"]
        assert "watched folder is missing" in both and disk in both, (disk, both)
        incoming.mkdir()  # the two studies went with it; one more comes
        good_dicoms(incoming, nih_images, 1, start=2)
        assert wait_for(lambda: "missing" not in status(out)["reason"], timeout=30), status(out)
        time.sleep(3)
        assert status(out)["state"] == "degraded" and disk in status(out)["reason"], status(out)
        filler.unlink()
        assert wait_for(lambda: status(out).get("state") == "running", timeout=60), status(out)
        assert wait_for(lambda: len(ok_rows(out)) >= 1, timeout=120)
    finally:
        assert stop(daemon) == 0


def test_a_watch_on_a_link_follows_the_link_when_it_is_pointed_elsewhere(tmp_path, nih_images, small_bundle):
    """An operator re-points the link the daemon watches (``incoming -> /mnt/pacs-export-new``)
    while it runs: the daemon had resolved the link once at start and went on watching the old
    export, so no study of the new one was ever scored. Now the link is watched as it is: the
    folder it points to is another folder, watched (and rescanned) at the next heartbeat. A link
    whose folder vanishes is a missing watched folder, like the folder itself."""
    import shutil

    old, new, out = tmp_path / "export-old", tmp_path / "export-new", tmp_path / "out"
    old.mkdir()
    new.mkdir()
    incoming = tmp_path / "incoming"
    incoming.symlink_to(old)
    good_dicoms(old, nih_images, 1)
    daemon = start_daemon(incoming, out, small_bundle, watch_config(tmp_path / "w.toml", rescan_interval=600.0,
                                                                    heartbeat_interval=1.0))
    try:
        assert wait_for(lambda: len(ok_rows(out)) == 1)
        relink = tmp_path / "incoming.new"
        relink.symlink_to(new)
        os.replace(relink, incoming)  # as `ln -sfn` does it: the link is never missing
        time.sleep(3)  # a heartbeat or two
        good_dicoms(new, nih_images, 1, start=1)
        good_dicoms(old, nih_images, 1, start=2)  # the old export is no longer watched
        assert wait_for(lambda: len(ok_rows(out)) == 2, timeout=40), status(out)
        time.sleep(3)
        assert {r["file"] for r in ok_rows(out)} == {"g00.dcm", "g01.dcm"}
        assert status(out)["state"] == "running"
        shutil.rmtree(new)  # the link now points nowhere
        assert wait_for(lambda: "watched folder is missing" in status(out).get("reason", ""), timeout=30), status(out)
    finally:
        assert stop(daemon) == 0
    log = daemon.stderr.read()
    assert "was replaced" in log and str(incoming) in log, log[-2000:]


def test_a_link_to_a_file_outside_the_watched_folder_is_not_read(tmp_path, nih_images, small_bundle):
    """A symbolic link made in the watched folder to a file outside it (another patient's
    export, /etc): scan leaves it unread (``--follow-links`` allows it) and so did the daemon's
    rescan, but the file-system event of its creation put it straight into the next batch, and
    the file outside was scored. Now an event is held to the same rule as the rescan."""
    incoming, outside, out = tmp_path / "in", tmp_path / "outside", tmp_path / "out"
    incoming.mkdir()
    outside.mkdir()
    good_dicoms(incoming, nih_images, 1)
    good_dicoms(outside, nih_images, 1, start=1)
    daemon = start_daemon(incoming, out, small_bundle, watch_config(tmp_path / "w.toml", rescan_interval=600.0))
    try:
        assert wait_for(lambda: len(ok_rows(out)) == 1)
        (incoming / "elsewhere.dcm").symlink_to(outside / "g01.dcm")
        good_dicoms(incoming, nih_images, 1, start=2)  # a study after it: the link's batch has gone by
        assert wait_for(lambda: len(ok_rows(out)) >= 2, timeout=40), status(out)
        time.sleep(2)
        assert sorted(r["file"] for r in rows_now(out)) == ["g00.dcm", "g02.dcm"]
    finally:
        assert stop(daemon) == 0


def test_file_names_that_are_not_utf8_are_scored_and_the_daemon_goes_on(tmp_path, nih_images, small_bundle):
    """A study whose name is not UTF-8 (Latin-1 from an old export: a storescp folder named
    after Mr Müller) killed the daemon with a traceback: the ledger cannot store such a name as
    it is. A name with a line break in it is odd too. Now both are scored, archived, and logged
    by their hash; results.csv shows the odd bytes as U+FFFD."""
    incoming, out, archive = tmp_path / "in", tmp_path / "out", tmp_path / "archive"
    incoming.mkdir()
    latin1 = os.fsdecode(os.fsencode(incoming) + b"/M\xfcller")
    os.mkdir(latin1)
    write(Path(latin1) / "IM1.dcm", grey(nih_images[0]), PatientID="L1")
    (incoming / "two\nlines").mkdir()
    write(incoming / "two\nlines" / "IM2.dcm", grey(nih_images[1]), PatientID="L2")
    daemon = start_daemon(incoming, out, small_bundle, watch_config(tmp_path / "w.toml"), "--archive-dir", archive)
    try:
        assert wait_for(lambda: len(ok_rows(out)) == 2 or daemon.poll() is not None, timeout=60), status(out)
        write(incoming / "after.dcm", grey(nih_images[2]), PatientID="L3")  # and it goes on
        assert wait_for(lambda: len(ok_rows(out)) == 3 or daemon.poll() is not None, timeout=60), status(out)
    finally:
        code = stop(daemon)
    log = daemon.stderr.read()
    assert code == 0 and "Traceback" not in log, log[-2000:]
    assert sorted(r["file"] for r in ok_rows(out)) == ["M\ufffdller/IM1.dcm", "after.dcm", "twolines/IM2.dcm"]
    assert len(list(archive.rglob("*.dcm"))) == 3
    assert not [p for p in incoming.rglob("*") if p.is_file()]


@pytest.mark.parametrize("step", ["reports", "commit"])
def test_a_file_rewritten_while_its_batch_is_processed_is_read_again(tmp_path, nih_images, small_bundle, step):
    """A PACS re-sends a corrected instance over the same path while the daemon is processing
    the first version (its batch read, scored, reported, not yet committed or archived). The
    ledger recorded the file as handled with the size and time the file had *after* the
    rewrite, so the correction was never read; with --archive-dir it was even moved to the
    archive unread. Now the file is recorded as it was when taken, a changed one is left in
    place, and the correction is read and replaces the first result."""
    incoming, out, archive = tmp_path / "in", tmp_path / "out", tmp_path / "archive"
    incoming.mkdir()
    pause = tmp_path / "pause"  # the daemon waits at `step` while this file exists
    pause.touch()
    first = write(tmp_path / "first.dcm", grey(nih_images[0]), PatientID="A", SOPInstanceUID="1.2.826.0.1.99.1")
    correction = write(tmp_path / "correction.dcm", grey(nih_images[1]), PatientID="A",
                       SOPInstanceUID="1.2.826.0.1.99.1")
    (incoming / "a.dcm").write_bytes(first.read_bytes())
    daemon = start_daemon(incoming, out, small_bundle, watch_config(tmp_path / "w.toml", rescan_interval=2.0),
                          "--archive-dir", archive, env={"CXR_BATCH_PAUSE_AT": step, "CXR_BATCH_PAUSE_FILE": pause})
    try:
        assert wait_for(lambda: list((out / "reports").glob("cxr_*.pdf")), timeout=60)  # the first version's
        time.sleep(0.5)  # (at the pause by now)
        (incoming / "a.dcm").write_bytes(correction.read_bytes())  # in place, over the same path
        pause.unlink()
        assert wait_for(lambda: status(out).get("superseded") == 1, timeout=40), status(out)
    finally:
        assert stop(daemon) == 0
    assert len(ok_rows(out)) == 1
    # the first version's bytes were overwritten in place: what is archived is the correction, once read
    assert [p.read_bytes() == correction.read_bytes() for p in archive.rglob("*.dcm")] == [True]
    assert not (incoming / "a.dcm").exists()


@pytest.mark.parametrize("archive_on", ["the same file system", "another file system"])
def test_a_file_with_the_longest_name_is_archived(tmp_path, nih_images, small_bundle, request, archive_on):
    """A file name of 255 bytes (the most a Linux file system takes): archived under its name
    with its tag added was too long to be made ('File name too long'), so the study
    stayed in the watched folder for ever. Now the name is shortened to fit, keeping its tag
    and extension (and a copy to another file system goes through a temp name that fits too)."""
    volume = tmp_path if archive_on == "the same file system" else request.getfixturevalue("small_disk")
    incoming, out, archive = tmp_path / "in", tmp_path / "out", volume / "archive"
    incoming.mkdir()
    long_name = "L" * 251 + ".dcm"
    write(incoming / long_name, grey(nih_images[0]), PatientID="LONG")
    odd = os.fsdecode(b"\xc3\xa9" * 125 + b"\xfc.dcm")  # 255 bytes, characters of two bytes and one not UTF-8
    write(incoming / odd, grey(nih_images[1]), PatientID="ODD")
    daemon = start_daemon(incoming, out, small_bundle, watch_config(tmp_path / "w.toml"), "--archive-dir", archive)
    try:
        assert wait_for(lambda: len(ok_rows(out)) == 2 and not os.listdir(incoming), timeout=60), \
            (rows_now(out), os.listdir(incoming))
    finally:
        assert stop(daemon) == 0
    archived = sorted(os.fsencode(p.name) for p in archive.iterdir())
    assert len(archived) == 2 and all(len(n) <= 255 and n.endswith(b".dcm") for n in archived), archived
    assert archived[0].startswith(b"LLLL") and archived[1].startswith(b"\xc3\xa9" * 100)


def test_what_the_daemon_cannot_read_is_said_once(tmp_path, nih_images, small_bundle):
    """A folder of the export the daemon may not list (made by another user, mode 0700), a
    FIFO, a link out of the folder: a scan gives each a row, but the daemon's rescan passed
    over them without a word, so studies in an unreadable folder were never scored and nobody
    was told. Now each is said in the log, once (not at every rescan)."""
    incoming, out = tmp_path / "in", tmp_path / "out"
    incoming.mkdir()
    good_dicoms(incoming, nih_images, 1)
    os.mkfifo(incoming / "pipe.dcm")
    (incoming / "elsewhere").symlink_to(tmp_path)
    daemon = start_daemon(incoming, out, small_bundle, watch_config(tmp_path / "w.toml", rescan_interval=0.5))
    try:
        assert wait_for(lambda: len(ok_rows(out)) == 1)
        time.sleep(3)  # several rescans
    finally:
        assert stop(daemon) == 0
    log = daemon.stderr.read()
    said = [line for line in log.splitlines() if "not read" in line or "not followed" in line]
    assert len(said) == 2 and "pipe.dcm" not in log, log[-2000:]
    assert any("not a regular file" in line for line in said) and any("outside" in line for line in said)


def test_a_correction_is_archived_beside_the_version_it_corrects(tmp_path, nih_images, small_bundle):
    """A changed instance (the same SOPInstanceUID, other pixels) arriving after the first
    version was archived: the archive name is made from the study key alone, so the correction
    found "the very same study already kept there" and was deleted: the image of the result
    that stands was kept nowhere. Now each version is archived under a name of its own, and only
    the very same bytes again are removed as kept already."""
    incoming, out, archive = tmp_path / "in", tmp_path / "out", tmp_path / "archive"
    incoming.mkdir()
    first = write(tmp_path / "first.dcm", grey(nih_images[0]), PatientID="A", SOPInstanceUID="1.2.826.0.1.99.2")
    correction = write(tmp_path / "correction.dcm", grey(nih_images[1]), PatientID="A",
                       SOPInstanceUID="1.2.826.0.1.99.2")
    daemon = start_daemon(incoming, out, small_bundle, watch_config(tmp_path / "w.toml"), "--archive-dir", archive)
    try:
        (incoming / "a.dcm").write_bytes(first.read_bytes())
        assert wait_for(lambda: len(ok_rows(out)) == 1 and not (incoming / "a.dcm").exists(), timeout=60)
        (incoming / "a.dcm").write_bytes(correction.read_bytes())
        assert wait_for(lambda: status(out).get("superseded") == 1 and not (incoming / "a.dcm").exists(), timeout=60)
        kept = sorted(p.read_bytes() == correction.read_bytes() for p in archive.rglob("*.dcm"))
        assert kept == [False, True], [p.name for p in archive.rglob("*")]
        (incoming / "a.dcm").write_bytes(correction.read_bytes())  # the same bytes again: a duplicate
        assert wait_for(lambda: not (incoming / "a.dcm").exists(), timeout=60)
    finally:
        assert stop(daemon) == 0
    assert len(list(archive.rglob("*.dcm"))) == 2, [p.name for p in archive.rglob("*")]  # kept once


def test_a_move_to_a_full_archive_never_leaves_half_a_file_nor_loses_the_study(tmp_path, nih_images, small_bundle,
                                                                             small_disk):
    """The archive on another file system (a NAS) runs full while a study is moved there: the
    copy stopped half-way and stayed under the study's archive name; at the next start the
    daemon found that name taken, took it for the study and deleted the source. The only
    whole copy of the image was gone. Now the copy goes to a temp name first, and what is in
    the archive under the study's name is whole."""
    incoming, out, archive = tmp_path / "in", tmp_path / "out", small_disk / "archive"
    incoming.mkdir()
    study = good_dicoms(incoming, nih_images, 1)[0]
    original = study.read_bytes()
    filler = small_disk / "filler"
    filler.write_bytes(b"\0" * (4 * 1024 * 1024 - len(original) // 2 - 64 * 1024))  # room for about half of it
    config = watch_config(tmp_path / "w.toml")
    daemon = start_daemon(incoming, out, small_bundle, config, "--archive-dir", archive)
    try:
        assert wait_for(lambda: len(ok_rows(out)) == 1)
        time.sleep(2)
    finally:
        assert stop(daemon) == 0
    assert "could not move" in daemon.stderr.read()
    assert study.read_bytes() == original  # still in the watched folder
    filler.unlink()
    daemon = start_daemon(incoming, out, small_bundle, config, "--archive-dir", archive)
    try:
        assert wait_for(lambda: not study.exists(), timeout=60)  # moved at the next start
    finally:
        assert stop(daemon) == 0
    assert [p.read_bytes() == original for p in archive.rglob("*.dcm")] == [True]
    assert not [p for p in archive.rglob("*") if p.is_file() and p.suffix != ".dcm"]


def test_a_file_the_daemon_may_not_read_is_quarantined(tmp_path, nih_images, small_bundle):
    """A study file the daemon's user may not read (mode 000, another user's): its error row,
    then it is moved to the quarantine folder, where someone can look at it. (As root every file
    reads: the daemon runs here without the capabilities that let root read anything.)"""
    import shutil

    if os.geteuid() != 0 or not shutil.which("setpriv"):
        pytest.skip("needs root and setpriv to run the daemon without root's right to read every file")
    incoming, out, quarantine = tmp_path / "in", tmp_path / "out", tmp_path / "quarantine"
    incoming.mkdir()
    good_dicoms(incoming, nih_images, 1)
    closed = write(incoming / "closed.dcm", grey(nih_images[1]), PatientID="CLOSED")
    closed.chmod(0)
    caps = "-dac_override,-dac_read_search"
    daemon = subprocess.Popen(["setpriv", f"--bounding-set={caps}", f"--inh-caps={caps}", sys.executable, "-m",
                               "cxr_batch", "watch", incoming, "--out", out, "--weights", small_bundle, "--device",
                               "cpu", "--no-pdf", "--config", watch_config(tmp_path / "w.toml", broken_deadline=1.0),
                               "--quarantine-dir", quarantine],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        assert wait_for(lambda: len(rows_now(out)) == 2 and not closed.exists(), timeout=60), rows_now(out)
    finally:
        assert stop(daemon) == 0
    rows = {r["file"]: r for r in rows_now(out)}
    assert rows["closed.dcm"]["status"] == "error" and "Permission denied" in rows["closed.dcm"]["reason"]
    assert [p.name.startswith("closed.") for p in quarantine.iterdir()] == [True]


@pytest.mark.parametrize("how", ["removed", "moved"])
def test_a_results_folder_removed_or_moved_under_the_daemon_is_made_again_with_every_study(tmp_path, nih_images,
                                                                                            small_bundle, how):
    """`rm -rf OUT` or `mv OUT OUT.old` while the daemon runs: it stayed degraded until restarted
    ('results.csv cannot be written') while it went on committing studies to a ledger no path
    named any more (gone at the restart with every study it held), without a lock on OUT (a
    second daemon could take it). Now OUT is made again from the ledger the daemon holds open:
    every row, every report, the ledger and the lock, and the daemon runs on."""
    import sqlite3

    incoming, out = tmp_path / "in", tmp_path / "out"
    incoming.mkdir()
    good_dicoms(incoming, nih_images, 2)
    daemon = start_daemon(incoming, out, small_bundle, watch_config(tmp_path / "w.toml"))
    try:
        assert wait_for(lambda: len(ok_rows(out)) == 2)
        if how == "removed":
            import shutil

            while out.exists():  # the daemon may write a file into it as it goes
                shutil.rmtree(out, ignore_errors=True)
        else:
            out.rename(tmp_path / "out.old")
        good_dicoms(incoming, nih_images, 2, start=2)
        assert wait_for(lambda: len(ok_rows(out)) == 4 and status(out).get("state") == "running", timeout=60), \
            status(out)
        rows = ok_rows(out)
        assert sorted(r["file"] for r in rows) == [f"g{i:02d}.dcm" for i in range(4)]
        assert all((out / "reports" / r["report"]).is_file() for r in rows)
        assert wait_for(lambda: (out / "reports" / "worklist.pdf").is_file(), timeout=30)
        ledger = sqlite3.connect(out / ".cxr-batch" / "ledger.sqlite")
        assert ledger.execute("SELECT COUNT(*) FROM studies").fetchone()[0] == 4
        ledger.close()
        second = subprocess.run([sys.executable, "-m", "cxr_batch", "watch", str(incoming), "--out", str(out),
                                 "--weights", str(small_bundle), "--device", "cpu"], capture_output=True, text=True,
                                timeout=120)
        assert second.returncode != 0 and f"PID {daemon.pid}" in second.stderr  # OUT is locked again
    finally:
        assert stop(daemon) == 0
    log = daemon.stderr.read()
    assert "made again" in log, log[-2000:]
    assert len(ok_rows(out)) == 4 and status(out)["state"] == "stopped"


def test_a_results_folder_removed_again_while_it_was_made_again_is_made_again(tmp_path):
    """`rm -rf OUT` run again while the daemon made OUT again (a clean-up script in a loop): the
    remade folder's identity was taken after it had gone, None, and a folder that is gone has
    that identity too, so the daemon never saw it missing again: degraded for ever, committing
    studies to a ledger no path named (found with OUT removed every 50 ms for 10 s during a
    batch). A results folder that is not there is always made again."""
    import types

    from cxr_batch.watch import Watcher

    made = []
    daemon = types.SimpleNamespace(out=tmp_path / "out", out_mount=False, out_away=False, results_id=None,
                                   results_lost=False,
                                   results_identity=lambda: None, contained=lambda action: action(),
                                   remake_results_dir=lambda: made.append(1))
    Watcher.check_results_dir(daemon)
    assert made == [1] and daemon.results_lost


def test_a_results_share_unmounted_under_the_daemon_is_not_made_again_on_the_disk_below(tmp_path, nih_images,
                                                                                      small_bundle):
    """OUT is a share's mount point (NFS at /mnt/results) and the share is unmounted while the
    daemon runs: the folder it was mounted on is still there, so the daemon took it for a
    results folder removed and made OUT again on the root disk (lock, ledger, results.csv,
    reports), hidden once the share came back. It writes nothing there now, says why, and
    scores what arrived meanwhile into the share once it is back. The share is a tmpfs mounted
    at OUT in a mount namespace of the daemon's own (the test sees the folder below it)."""
    from .watchkit import can_mount_a_share, in_namespace, seen_by, start_on_a_share

    if not can_mount_a_share():
        pytest.skip("needs root, unshare and nsenter to mount a share at OUT for the daemon alone")
    incoming, out, kept, log = tmp_path / "in", tmp_path / "out", tmp_path / "kept", tmp_path / "log"
    for folder in (incoming, out, kept):
        folder.mkdir()
    good_dicoms(incoming, nih_images, 1)
    daemon = start_on_a_share(out, ["watch", incoming, "--out", out, "--weights", small_bundle, "--device", "cpu",
                                    "--no-pdf", "--config", watch_config(tmp_path / "w.toml", retry_max=1.0)], log)
    share = seen_by(daemon, out)
    try:
        assert wait_for(lambda: len(ok_rows(share)) == 1), log.read_text()[-2000:]
        assert not list(out.iterdir())  # everything went to the share
        in_namespace(daemon, "mount", "--bind", out, kept)  # the share held elsewhere, to come back
        in_namespace(daemon, "umount", "-l", out)
        good_dicoms(incoming, nih_images, 2, start=1)
        assert wait_for(lambda: "no longer a mount point" in log.read_text(), timeout=30), log.read_text()[-2000:]
        time.sleep(3)  # heartbeats and retries after the daemon saw it
        assert not list(out.iterdir()), log.read_text()[-2000:]  # nothing on the disk below the share
        in_namespace(daemon, "mount", "--bind", kept, out)  # the share is back
        assert wait_for(lambda: len(ok_rows(share)) == 3 and status(share).get("state") == "running", timeout=60), \
            log.read_text()[-2000:]
    finally:
        assert stop(daemon) == 0
    assert not list(out.iterdir())
    assert "Traceback" not in log.read_text()


def test_results_waiting_for_the_ris_when_the_results_folder_is_removed_still_reach_it(tmp_path, nih_images,
                                                                                      small_bundle):
    """The RIS down, then OUT removed: the queued ORUs went with OUT/hl7, so each was refused as
    'object file missing' and offered again every refused_retry for ever: never delivered. They
    are made again (the same MSH-10) with the folder, and reach the RIS once it is back."""
    import shutil

    from .ris import RIS
    from .watchkit import free_port

    incoming, out, port = tmp_path / "in", tmp_path / "out", free_port()
    incoming.mkdir()
    good_dicoms(incoming, nih_images, 2)
    daemon = start_daemon(incoming, out, small_bundle, watch_config(tmp_path / "w.toml", retry_max=1.0),
                          "--hl7-to", f"127.0.0.1:{port}")
    try:
        assert wait_for(lambda: len(ok_rows(out)) == 2 and len(list((out / "hl7").glob("*.hl7"))) == 2)
        queued = sorted(p.stem for p in (out / "hl7").glob("*.hl7"))
        while out.exists():
            shutil.rmtree(out, ignore_errors=True)
        assert wait_for(lambda: status(out).get("state") == "running", timeout=60), status(out)
        with RIS(port=port) as ris:
            assert wait_for(lambda: len(ris.received) >= 2, timeout=30), status(out)
            assert sorted(str(m).split("|")[9] for m in ris.received) == queued
    finally:
        assert stop(daemon) == 0


def test_rows_appended_on_a_full_disk_are_written_whole_or_not_at_all(studies, tmp_path, small_bundle, small_disk):
    """The daemon appends each batch's rows in one write: on a disk with room for part of them
    the write took part and returned without an error, so results.csv ended in half a row (its
    numbers cut short, read back as a row) and the studies were marked published. Now the
    append is undone and raised: the daemon degrades and rewrites results.csv once it can."""
    from cxr_batch.results import append_rows, read_records
    from cxr_batch.scan import run_scan

    from .test_operator import quick

    run_scan(studies, tmp_path / "scan", quick(small_bundle, pdf=False))
    records = read_records(tmp_path / "scan" / "results.csv")
    results = small_disk / "results.csv"
    append_rows(results, records[:1])
    before = results.read_bytes()
    with open(small_disk / "filler", "wb", buffering=0) as f:  # every free block taken; the last
        try:                                                  # of results.csv has room for part of a row
            while f.write(b"\0" * 4096):
                pass
        except OSError:
            pass
    with pytest.raises(OSError):
        append_rows(results, records * 3)  # more than the last block holds
    assert results.read_bytes() == before


def test_a_queued_message_cut_short_before_a_restart_is_made_again_and_reaches_the_ris_whole(tmp_path, nih_images,
                                                                                             small_bundle):
    """The RIS down, the daemon killed, then a queued ORU file cut short (a failed disk): at the
    next start it is kept aside and made again under the same MSH-10, and the RIS gets both
    results whole, instead of half a result (or, kept aside by the sender alone, none until
    another restart)."""
    from cxr_batch.integration.hl7 import whole_message

    from .ris import RIS
    from .watchkit import free_port

    incoming, out, port = tmp_path / "in", tmp_path / "out", free_port()
    incoming.mkdir()
    good_dicoms(incoming, nih_images, 2)
    config = watch_config(tmp_path / "w.toml", retry_max=1.0)
    daemon = start_daemon(incoming, out, small_bundle, config, "--hl7-to", f"127.0.0.1:{port}")
    try:
        assert wait_for(lambda: len(ok_rows(out)) == 2 and len(list((out / "hl7").glob("*.hl7"))) == 2)
    finally:
        daemon.kill()
        daemon.wait(timeout=30)
    cut = sorted((out / "hl7").glob("*.hl7"))[0]
    cut_short = cut.read_bytes()[:-200]
    cut.write_bytes(cut_short)
    with RIS(port=port) as ris:
        daemon = start_daemon(incoming, out, small_bundle, config, "--hl7-to", f"127.0.0.1:{port}")
        try:
            assert wait_for(lambda: len(ris.received) >= 2, timeout=60), status(out)
        finally:
            assert stop(daemon) == 0
        received = {m.split("\r")[0].split("|")[9]: m for m in ris.received}
    assert sorted(received) == sorted(p.stem for p in (out / "hl7").glob("*.hl7"))
    assert all(whole_message(m + "\r" * (not m.endswith("\r")), control) for control, m in received.items())
    assert (out / "hl7" / (cut.name + ".damaged")).read_bytes() == cut_short


def test_a_second_daemon_on_a_folder_another_empties_is_refused_and_two_that_only_read_it_run(
        tmp_path, nih_images, small_bundle):
    """Two daemons on one export folder (a second results site, a new model run in its shadow)
    where one archives what it scored: the other silently got the studies the first had not yet
    moved away (4 of 12, no log line). Refused at start (exit 1, before its results folder is
    made), whichever starts first; two that leave the files in place both score every study."""
    incoming = tmp_path / "in"
    incoming.mkdir()
    config = watch_config(tmp_path / "w.toml")

    def refused(out, *extra):
        proc = start_daemon(incoming, out, small_bundle, config, *extra)
        try:
            code = proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            stop(proc)
            return False, "still running"
        return code == 1 and not out.exists(), proc.stderr.read()

    mover = start_daemon(incoming, tmp_path / "a", small_bundle, config, "--archive-dir", tmp_path / "archive")
    try:
        assert wait_for(lambda: status(tmp_path / "a").get("state") == "running")
        ok, err = refused(tmp_path / "b")
        assert ok and "moves the files it scored out of it" in err, err
        ok, err = refused(tmp_path / "b", "--quarantine-dir", tmp_path / "q")
        assert ok, err
    finally:
        assert stop(mover) == 0
    readers = [start_daemon(incoming, tmp_path / name, small_bundle, config) for name in ("c", "d")]
    try:
        assert all(wait_for(lambda: status(tmp_path / name).get("state") == "running") for name in ("c", "d"))
        ok, err = refused(tmp_path / "e", "--archive-dir", tmp_path / "archive")
        assert ok and "another cxr-batch daemon watches" in err, err
        good_dicoms(incoming, nih_images, 2)
        assert all(wait_for(lambda: len(ok_rows(tmp_path / name)) == 2) for name in ("c", "d"))
    finally:
        assert all(stop(proc) == 0 for proc in readers)


def test_a_reading_worker_killed_while_the_daemon_waits_costs_no_study(tmp_path, nih_images, small_bundle):
    """The OOM killer (or an operator) killing an idle reading worker of a running daemon: every
    study after it got an error row, "internal error while processing (BrokenProcessPool)", and
    was marked handled, never read again."""
    from .test_sandbox import descendants

    incoming, out = tmp_path / "in", tmp_path / "out"
    incoming.mkdir()
    good_dicoms(incoming, nih_images, 1)
    daemon = start_daemon(incoming, out, small_bundle, watch_config(tmp_path / "w.toml"))
    try:
        assert wait_for(lambda: len(ok_rows(out)) == 1)
        # the workers: the fork server's children (it and the resource tracker are the daemon's)
        children = {pid for pid in descendants(daemon.pid)}
        workers = children - {p for p in children if int(open(f"/proc/{p}/stat").read().split()[3]) == daemon.pid}
        assert workers
        for pid in workers:
            os.kill(pid, 9)
        good_dicoms(incoming, nih_images, 3, start=1)
        assert wait_for(lambda: len(rows_now(out)) == 4)
    finally:
        assert stop(daemon) == 0
    assert [r["status"] for r in rows_now(out)] == ["ok"] * 4, [r["reason"] for r in rows_now(out)]


HOG_INOTIFY = """
import ctypes, sys, time
libc = ctypes.CDLL(None, use_errno=True)
held = 0
while libc.inotify_init1(0) >= 0:
    held += 1
print(held, flush=True)
time.sleep(600)
"""


def test_a_daemon_the_kernel_gives_no_file_system_watch_finds_studies_by_its_rescan(tmp_path, nih_images,
                                                                                   small_bundle):
    """Every inotify instance of the daemon's user taken (fs.inotify.max_user_instances, 128 by
    default, shared by all its programs; max_user_watches is met the same way by a tree of many
    folders): the daemon died at start with a traceback, status.json saying "stopped". Run as a
    user of its own, so the instances of no other program are taken."""
    import tempfile

    if os.geteuid() != 0 or not shutil.which("setpriv"):
        pytest.skip("needs root and setpriv, to run the daemon as another user")
    user = ["setpriv", "--reuid=54321", "--regid=54321", "--clear-groups"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    if subprocess.run([*user, sys.executable, "-c", "import torch, cxr_batch.watch"], env=env,
                      capture_output=True, timeout=300).returncode != 0:
        # a virtual environment in a folder only its owner may enter (mktemp -d: 0700)
        pytest.skip("this Python's packages cannot be read by another user, to run the daemon as one")
    base = Path(tempfile.mkdtemp(prefix="cxr-inotify-", dir="/tmp"))
    try:
        base.chmod(0o777)
        incoming, out = base / "in", base / "out"
        incoming.mkdir(mode=0o777)
        incoming.chmod(0o777)
        bundle = shutil.copytree(small_bundle, base / "bundle")
        config = watch_config(base / "w.toml", workers=0, rescan_interval=1.0)
        for p in [bundle, *bundle.rglob("*"), Path(config)]:
            p.chmod(0o755 if p.is_dir() else 0o644)
        hog = subprocess.Popen([*user, sys.executable, "-c", HOG_INOTIFY], stdout=subprocess.PIPE, text=True)
        try:
            assert int(hog.stdout.readline()) > 0
            env = {**os.environ, "HOME": str(base), "PYTHONPATH": os.pathsep.join(sys.path)}
            daemon = subprocess.Popen([*user, sys.executable, "-m", "cxr_batch", "watch", str(incoming), "--out",
                                       str(out), "--weights", str(bundle), "--device", "cpu", "--config", config,
                                       "--no-heatmaps"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                      text=True, env=env)
            try:
                assert wait_for(lambda: status(out).get("state") in ("running", "stopped")), "never started"
                for i, image in enumerate(good_dicoms(base, nih_images, 2)):
                    image.chmod(0o644)
                    shutil.move(image, incoming / image.name)
                ok = wait_for(lambda: len(ok_rows(out)) == 2 or daemon.poll() is not None, timeout=90)
                assert ok and daemon.poll() is None, daemon.stderr.read() if daemon.poll() is not None else "no rows"
            finally:
                code = stop(daemon)
            err = daemon.stderr.read()
            assert code == 0 and "Traceback" not in err, err
            assert "max_user_instances" in err  # what to raise, said once
        finally:
            hog.kill()
            hog.wait()
    finally:
        shutil.rmtree(base, ignore_errors=True)


def test_a_daemon_holds_no_open_file_on_the_folder_it_watches_so_its_share_can_be_unmounted(tmp_path, small_bundle):
    """The claim on the watched folder was an open descriptor of the folder itself: with it an
    export share mounted there could no longer be unmounted while the daemon ran (``umount``:
    "target is busy"), though the daemon is made to wait for a share unmounted and back. Nothing
    the daemon keeps open may lie in the watched folder, whether it leaves the files or moves them."""
    incoming = tmp_path / "in"
    incoming.mkdir()
    config = watch_config(tmp_path / "w.toml")
    for out, extra in ((tmp_path / "a", ()), (tmp_path / "b", ("--archive-dir", tmp_path / "archive"))):
        proc = start_daemon(incoming, out, small_bundle, config, *extra)
        try:
            assert wait_for(lambda: status(out).get("state") == "running")
            held = []
            for fd in Path(f"/proc/{proc.pid}/fd").iterdir():
                try:
                    target = os.readlink(fd)
                except OSError:
                    continue
                if target == str(incoming.resolve()) or target.startswith(f"{incoming.resolve()}/"):
                    held.append(target)
            assert held == []
        finally:
            assert stop(proc) == 0


def test_a_daemon_whose_folder_was_replaced_claims_the_new_one(tmp_path, small_bundle):
    """The claim stayed on the folder watched at the start: once another was mounted over it
    (the export share mounted after the daemon started) or it was made again, a daemon started
    later beside it with --archive-dir ran too, and the first got only the studies not yet moved
    away. The claim follows the folder watched now."""
    incoming, other = tmp_path / "in", tmp_path / "other"
    incoming.mkdir()
    other.mkdir()
    config = watch_config(tmp_path / "w.toml")
    first = start_daemon(incoming, tmp_path / "a", small_bundle, config)
    try:
        assert wait_for(lambda: status(tmp_path / "a").get("state") == "running")
        incoming.rmdir()
        other.rename(incoming)  # another folder (inode) at the watched path
        time.sleep(3)  # a few heartbeats
        assert status(tmp_path / "a").get("state") == "running"
        mover = start_daemon(incoming, tmp_path / "b", small_bundle, config, "--archive-dir", tmp_path / "archive")
        try:
            code = mover.wait(timeout=120)
        except subprocess.TimeoutExpired:
            code = stop(mover)
        assert code == 1 and "another cxr-batch daemon watches" in mover.stderr.read()
    finally:
        assert stop(first) == 0


def test_a_daemon_that_moves_files_keeps_its_folder_moved_away_and_back_without_a_false_alarm(tmp_path, small_bundle):
    """The watched folder moved away and back (the same folder, the same claim): a daemon with
    --archive-dir must not take its own claim for another daemon's."""
    incoming = tmp_path / "in"
    incoming.mkdir()
    config = watch_config(tmp_path / "w.toml")
    mover = start_daemon(incoming, tmp_path / "a", small_bundle, config, "--archive-dir", tmp_path / "archive")
    try:
        assert wait_for(lambda: status(tmp_path / "a").get("state") == "running")
        incoming.rename(tmp_path / "away")
        assert wait_for(lambda: status(tmp_path / "a").get("state") == "degraded")
        (tmp_path / "away").rename(incoming)
        assert wait_for(lambda: status(tmp_path / "a").get("state") == "running")
        reader = start_daemon(incoming, tmp_path / "b", small_bundle, config)
        try:
            code = reader.wait(timeout=120)
        except subprocess.TimeoutExpired:
            code = stop(reader)
        assert code == 1  # the claim is still held
    finally:
        assert stop(mover) == 0
    assert "another cxr-batch daemon watches" not in mover.stderr.read()


def test_a_copy_that_pauses_after_its_pixel_data_is_scored_once_not_corrected(tmp_path, nih_images, small_bundle):
    """A copy into the watched folder written in two steps: up to the end of its pixel data, a
    pause past ``settle``, then the rest (the elements a file may hold after its pixel data:
    trailing padding, digital signatures). Its beginning reads as a whole radiograph and is
    scored; the rest made it another file of the same instance, scored again as a correction:
    a second result and report, the first superseded (and, with --send-to or --hl7-to, a
    second SR and ORU). The file grew from what was scored: its result stands, and a copy of
    the whole file sent later is a duplicate, not a third version."""
    incoming, out, source = tmp_path / "in", tmp_path / "out", tmp_path / "source"
    daemon = copy_pausing_after_pixel_data(tmp_path, nih_images[0], small_bundle, padding=4096)
    try:
        time.sleep(4)  # settle, a batch
        shutil.copy(source / "IM1.dcm", incoming / "IM1_again.dcm")  # the whole file sent again
        time.sleep(3)
        assert wait_for(lambda: status(out).get("pending") == 0, timeout=30)
    finally:
        assert stop(daemon) == 0
    rows = rows_now(out)
    assert len(rows) == 1 and rows[0]["status"] == "ok", rows
    assert status(out)["superseded"] == 0
    assert len(list((out / "reports").glob("cxr_*.pdf"))) == 1
    said = daemon.stderr.read()
    assert "grew after it was scored" in said, said


def test_a_scored_file_grown_by_elements_that_change_its_image_or_patient_is_scored_again(tmp_path, nih_images,
                                                                                           small_bundle):
    """A file that grows after it was scored is the rest of the same copy only when what was
    read from it is unchanged. pydicom takes the last of two elements with one tag: a sender who
    appends, after a scored radiograph's pixel data, a second Pixel Data (another patient's
    radiograph) and a Patient ID makes the whole file read as another image of another patient.
    It was kept as a duplicate: the first image's result stood for the file, under its patient,
    and nothing was scored from what the file now shows."""
    incoming, out, source = tmp_path / "in", tmp_path / "out", tmp_path / "source"
    incoming.mkdir()
    first = write(source / "IM1.dcm", grey(nih_images[0]), PatientID="P001")
    other = pydicom.dcmread(write(source / "other.dcm", grey(nih_images[1]), PatientID="P002"))
    pixels = other.PixelData
    appended = (b"\xe0\x7f\x10\x00OW\x00\x00" + len(pixels).to_bytes(4, "little") + pixels
                + b"\x10\x00\x20\x00LO\x04\x00P002")
    daemon = start_daemon(incoming, out, small_bundle, watch_config(tmp_path / "w.toml", settle=0.3))
    try:
        with open(incoming / "IM1.dcm", "wb") as f:
            f.write(first.read_bytes())
            f.flush()
            assert wait_for(lambda: len(ok_rows(out)) == 1, timeout=60)
            f.write(appended)
        assert wait_for(lambda: [r["patient_id"] for r in ok_rows(out)] == ["P002"], timeout=60), rows_now(out)
    finally:
        assert stop(daemon) == 0
    assert status(out)["superseded"] == 1
    assert "grew after it was scored" not in daemon.stderr.read()


def test_a_png_copy_that_pauses_before_its_end_chunk_is_scored_once(tmp_path, nih_images, small_bundle):
    """A PNG copied into the watched folder that paused past ``settle`` before its last 12 bytes
    (the IEND chunk): Pillow decodes a PNG without IEND, so its beginning was scored, and the
    whole file, other bytes and so another study (a PNG is known by its content), was scored
    again: two results and two reports for one radiograph. A PNG without its end is refused
    as truncated, retried while the copy may still be going on."""
    incoming, out = tmp_path / "in", tmp_path / "out"
    incoming.mkdir()
    shutil.copy(nih_images[1], incoming / "warm.png")
    data = Path(nih_images[0]).read_bytes()
    assert data.endswith(b"IEND\xaeB`\x82")
    daemon = start_daemon(incoming, out, small_bundle, watch_config(tmp_path / "w.toml", settle=0.3,
                                                                     broken_deadline=30.0))
    try:
        assert wait_for(lambda: len(ok_rows(out)) == 1, timeout=60)  # the daemon is up and scoring
        with open(incoming / "IM1.png", "wb") as f:
            f.write(data[:-12])
            f.flush()
            time.sleep(4)  # the pause: settle, a batch
            f.write(data[-12:])
        time.sleep(2)
        assert wait_for(lambda: status(out).get("pending") == 0, timeout=30)
    finally:
        assert stop(daemon) == 0
    rows = rows_now(out)
    assert sorted((r["file"], r["status"]) for r in rows) == [("IM1.png", "ok"), ("warm.png", "ok")], rows
    assert len(list((out / "reports").glob("cxr_*.pdf"))) == 2


def test_a_scored_file_that_grows_by_more_than_trailing_bytes_is_scored_again_unparsed(tmp_path, nih_images,
                                                                                      small_bundle):
    """What follows the pixel data of a copy that paused is a few bytes of padding or a
    signature. Growth past a mebibyte is taken as another version and scored again (in the
    sandbox), never parsed whole by the daemon itself: a sender growing a scored file towards
    the size limit made the daemon read and parse all of it, twice."""
    out = tmp_path / "out"
    daemon = copy_pausing_after_pixel_data(tmp_path, nih_images[0], small_bundle, padding=2 << 20)
    try:
        assert wait_for(lambda: status(out).get("superseded") == 1, timeout=60), rows_now(out)
    finally:
        assert stop(daemon) == 0
    assert [r["status"] for r in rows_now(out)] == ["ok"]
    assert "grew after it was scored" not in daemon.stderr.read()


def copy_pausing_after_pixel_data(tmp_path, image, small_bundle, padding: int):
    """A daemon on tmp_path/in, and a DICOM copy into it written up to the end of its pixel
    data, scored, then the rest written (``padding`` bytes of data set trailing padding)."""
    incoming, out, source = tmp_path / "in", tmp_path / "out", tmp_path / "source"
    incoming.mkdir()
    ds = pydicom.dcmread(write(source / "IM1.dcm", grey(image)))
    ds.add_new(0xFFFCFFFC, "OB", b"\x00" * padding)  # data set trailing padding, after the pixel data
    ds.save_as(source / "IM1.dcm", enforce_file_format=True)
    data = (source / "IM1.dcm").read_bytes()
    cut = data.index(b"\xfc\xff\xfc\xff")
    daemon = start_daemon(incoming, out, small_bundle, watch_config(tmp_path / "w.toml", settle=0.3))
    try:
        with open(incoming / "IM1.dcm", "wb") as f:
            f.write(data[:cut])
            f.flush()
            assert wait_for(lambda: len(ok_rows(out)) == 1, timeout=60)  # the pause: its beginning is scored
            f.write(data[cut:])
    except BaseException:
        stop(daemon)
        raise
    return daemon

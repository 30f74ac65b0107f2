"""The outbound queue never gives a result up silently: a PACS that rejects the association (even
"permanently": a configuration error fixed later) or refuses an object leaves it waiting with its
reason, retried at a slow pace; `cxr-batch outbound list|retry|drop` shows, re-sends and drops
them; status.json counts them. The PACS is pynetdicom in this process; the node's sender too."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
import time

import pydicom
import pytest

from cxr_batch.bundle import load_bundle
from cxr_batch.dicom import identifiers
from cxr_batch.integration.dicom_send import Destination
from cxr_batch.integration.outbound import Sender
from cxr_batch.ledger import Ledger, outbound_entry
from cxr_batch.record import Scores, StudyRecord
from cxr_batch.sr import build_sr, sr_bytes

from .test_node import objects, queue_srs  # noqa: F401 (fixture)
from .watchkit import free_port, wait_for


@pytest.fixture()
def results(tmp_path, objects, small_bundle):  # noqa: F811
    """A node's results folder whose ledger queues the SRs of two scored images."""
    out = tmp_path / "out"
    ledger = Ledger(out / ".cxr-batch" / "ledger.sqlite")
    yield out, ledger, queue_srs(out, ledger, objects[0], small_bundle)
    ledger.close()


class Pacs:
    """A pynetdicom storage SCP; ``calling`` lists the AE titles it accepts (empty: any);
    ``sop_classes`` what it stores."""

    def __init__(self, calling=(), sr=True):
        from pynetdicom import AE, evt
        from pynetdicom.sop_class import Comprehensive3DSRStorage, CTImageStorage

        self.stored: dict[str, pydicom.Dataset] = {}
        self.ae = AE(ae_title="PACS")
        self.ae.require_calling_aet = list(calling)
        self.ae.add_supported_context(Comprehensive3DSRStorage if sr else CTImageStorage)
        self.port = free_port()
        self.server = self.ae.start_server(("127.0.0.1", self.port), block=False,
                                           evt_handlers=[(evt.EVT_C_STORE, self._store)])

    def _store(self, event):
        self.stored[event.request.AffectedSOPInstanceUID] = event.dataset
        return 0x0000

    def stop(self):
        self.server.shutdown()


def outbound(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cxr_batch", "outbound", *map(str, args)], capture_output=True,
                          text=True, timeout=120)


def start_sender(out, pacs, **options) -> Sender:
    values = dict(calling_ae="CXRBATCH", timeout=5, retry_max=1.0, refused_retry=3600.0) | options
    return Sender(out / ".cxr-batch" / "ledger.sqlite", out, Destination("PACS", "127.0.0.1", pacs.port),
                  **values).start()


def test_a_permanent_association_rejection_keeps_results_queued_until_the_pacs_is_fixed(results):
    out, ledger, uids = results
    pacs = Pacs(calling=["SOMEONE"])  # a configuration error at the PACS: our AE title is not known
    sender = start_sender(out, pacs, retry_max=30.0)
    try:
        assert wait_for(lambda: ledger.outbound_stats(time.time())["retrying"] >= 1, timeout=30)
        time.sleep(3)  # back-off: no hammering, and nothing given up
        stats = ledger.outbound_stats(time.time())
        assert stats["queued"] == 2 and stats["delivered"] == 0 and stats["dropped"] == 0
        (reason,) = stats["waiting_because"]
        assert "association rejected" in reason and "Permanent" in reason
        attempts = sum(r["attempts"] for r in ledger.outbound_rows())
        assert 1 <= attempts <= 3
        listed = outbound("list", "--out", out)
        assert listed.returncode == 0 and all(uid in listed.stdout for uid in uids)
        assert "association rejected" in listed.stdout and "2 waiting" in listed.stderr
        pacs.ae.require_calling_aet = []  # the PACS administrator adds us
        again = outbound("retry", "--out", out)  # cuts the 30 s back-off short
        assert again.returncode == 0, again.stderr
        assert wait_for(lambda: ledger.outbound_stats(time.time())["delivered"] == 2, timeout=20)
    finally:
        sender.stop()
        pacs.stop()
    assert sorted(pacs.stored) == sorted(uids)


def test_an_object_the_pacs_refuses_waits_with_its_reason_until_dropped_or_retried(results):
    out, ledger, uids = results
    (out / "dicom" / "rle.sr.dcm").rename(out / "dicom" / "rle.sr.dcm.lost")  # and one object file gone
    pacs = Pacs(sr=False)  # stores no SRs
    sender = start_sender(out, pacs)
    try:
        assert wait_for(lambda: ledger.outbound_stats(time.time())["refused"] == 2, timeout=30)
        assert ledger.due_outbound(time.time()) == []  # offered again at a slow pace (refused_retry)
        assert len(ledger.due_outbound(time.time() + 3601)) == 2
        stats = ledger.outbound_stats(time.time())
        assert stats["queued"] == 2 and stats["dropped"] == 0
        assert any("no presentation context accepted" in r for r in stats["waiting_because"])
        assert any("missing" in r for r in stats["waiting_because"])
        listed = outbound("list", "--out", out)
        assert listed.stdout.count("refused") == 2 and "missing" in listed.stdout
        dropped = outbound("drop", "--out", out, uids[1])
        assert dropped.returncode == 0, dropped.stderr
        assert outbound("drop", "--out", out, "1.2.3.not-queued").returncode == 1
        stats = ledger.outbound_stats(time.time())
        assert stats["queued"] == 1 and stats["dropped"] == 1
        assert "dropped" in outbound("list", "--out", out, "--all").stdout
        assert uids[1] not in outbound("list", "--out", out).stdout
        pacs.stop()
        pacs = Pacs()  # the PACS stores SRs now
        sender.stop()
        sender = start_sender(out, pacs)
        assert outbound("retry", "--out", out, uids[0]).returncode == 0
        assert wait_for(lambda: ledger.outbound_stats(time.time())["delivered"] == 1, timeout=20)
    finally:
        sender.stop()
        pacs.stop()
    assert list(pacs.stored) == [uids[0]]  # the dropped one was not sent


def test_outbound_commands_refuse_a_folder_without_a_ledger(tmp_path):
    done = outbound("list", "--out", tmp_path)
    assert done.returncode == 1 and "no ledger" in done.stderr and "Traceback" not in done.stderr


def test_results_a_schema_3_ledger_gave_up_on_are_queued_again(tmp_path):
    path = tmp_path / "ledger.sqlite"
    db = sqlite3.connect(path)
    db.executescript("""
        CREATE TABLE meta (name TEXT PRIMARY KEY, value TEXT NOT NULL);
        INSERT INTO meta VALUES ('schema', '3');
        CREATE TABLE studies (key TEXT PRIMARY KEY, seq INTEGER NOT NULL, file TEXT NOT NULL, content TEXT NOT NULL,
            status TEXT NOT NULL, record TEXT NOT NULL, reported_at REAL NOT NULL, published INTEGER NOT NULL DEFAULT 0);
        CREATE TABLE outbound (uid TEXT PRIMARY KEY, key TEXT NOT NULL, path TEXT NOT NULL, queued_at REAL NOT NULL,
            due_at REAL NOT NULL, attempts INTEGER NOT NULL DEFAULT 0, delivered_at REAL, failed_at REAL,
            destination TEXT NOT NULL DEFAULT '', last_error TEXT NOT NULL DEFAULT '');
        CREATE INDEX outbound_waiting ON outbound (due_at) WHERE delivered_at IS NULL AND failed_at IS NULL;
        INSERT INTO outbound VALUES ('2.25.1', 'uid:a', 'dicom/a.sr.dcm', 1, 1, 1, NULL, 2, 'PACS@h:104',
            'association rejected (Rejected Permanent, Calling AE title not recognised)');
        INSERT INTO outbound VALUES ('2.25.2', 'uid:b', 'dicom/b.sr.dcm', 1, 1, 1, 3, NULL, 'PACS@h:104', '');
    """)
    db.close()
    ledger = Ledger(path)
    assert [i.uid for i in ledger.due_outbound(time.time())] == ["2.25.1"]  # given up before: waiting again
    stats = ledger.outbound_stats(time.time())
    assert (stats["queued"], stats["refused"], stats["delivered"]) == (1, 1, 1)
    ledger.close()


def test_a_changed_result_gets_its_own_sr_uid_naming_the_one_it_supersedes(tmp_path, objects, small_bundle):  # noqa: F811
    scored, _ = objects
    bundle = load_bundle(small_bundle)
    ids = identifiers(pydicom.dcmread(scored["explicit"]))
    first = build_sr(StudyRecord(file="a", ids=ids, model=bundle.label, weights_sha256=bundle.sha256,
                                 scores=Scores((0.2,) * 14, (0,) * 14, "normal", -0.6)), bundle)
    changed = StudyRecord(file="a", ids=ids, model=bundle.label, weights_sha256=bundle.sha256,
                          scores=Scores((0.9,) * 14, (1,) * 14, "urgent", 0.8))
    second = build_sr(changed, bundle, revision="content-2", predecessor=first)
    assert second.SOPInstanceUID != first.SOPInstanceUID and second.SeriesInstanceUID == first.SeriesInstanceUID
    (study,) = second.PredecessorDocumentsSequence
    (referenced,) = study.ReferencedSeriesSequence[0].ReferencedSOPSequence
    assert referenced.ReferencedSOPInstanceUID == first.SOPInstanceUID
    again = build_sr(changed, bundle, revision="content-2", predecessor=first)
    assert again.SOPInstanceUID == second.SOPInstanceUID  # made again (a crash, a re-send): the same UID
    assert build_sr(changed, bundle).SOPInstanceUID == first.SOPInstanceUID  # no revision: source and model only


def test_a_schema_4_queue_becomes_the_dicom_channel_and_a_result_can_go_to_several_channels(tmp_path):
    path = tmp_path / "ledger.sqlite"
    db = sqlite3.connect(path)
    db.executescript("""
        CREATE TABLE meta (name TEXT PRIMARY KEY, value TEXT NOT NULL);
        INSERT INTO meta VALUES ('schema', '4');
        CREATE TABLE studies (key TEXT PRIMARY KEY, seq INTEGER NOT NULL, file TEXT NOT NULL, content TEXT NOT NULL,
            status TEXT NOT NULL, record TEXT NOT NULL, reported_at REAL NOT NULL, published INTEGER NOT NULL DEFAULT 0);
        CREATE TABLE outbound (uid TEXT PRIMARY KEY, key TEXT NOT NULL, path TEXT NOT NULL, queued_at REAL NOT NULL,
            due_at REAL NOT NULL, attempts INTEGER NOT NULL DEFAULT 0, delivered_at REAL, failed_at REAL,
            destination TEXT NOT NULL DEFAULT '', last_error TEXT NOT NULL DEFAULT '', dropped_at REAL);
        CREATE INDEX outbound_due ON outbound (due_at) WHERE delivered_at IS NULL AND dropped_at IS NULL;
        INSERT INTO outbound VALUES ('2.25.1', 'uid:a', 'dicom/a.sr.dcm', 1, 1, 2, NULL, NULL, '', 'peer down', NULL);
        INSERT INTO outbound VALUES ('2.25.2', 'uid:b', 'dicom/b.sr.dcm', 1, 1, 1, 3, NULL, 'PACS@h:104', '', NULL);
    """)
    db.close()
    ledger = Ledger(path)
    (item,) = ledger.due_outbound(time.time())
    assert (item.uid, item.channel, item.attempts) == ("2.25.1", "dicom", 2)
    assert ledger.outbound_stats(time.time())["delivered"] == 1
    assert {r["channel"] for r in ledger.outbound_rows(everything=True)} == {"dicom"}
    # the same SR to the archive by STOW-RS, and the study's ORU to the RIS: rows of their own
    assert ledger.queue_outbound([("uid:a", outbound_entry("2.25.1", "dicom/a.sr.dcm", "stow", "http://a/dicom-web")),
                                  ("uid:a", outbound_entry("ABC", "hl7/ABC.hl7", "hl7", "ris:2575"))]) == 2
    assert [i.uid for i in ledger.due_outbound(time.time(), channel="stow")] == ["2.25.1"]
    ledger.outbound_delivered("ABC", "ris:2575", "hl7")
    # queued again after a second scan: what was delivered from the same file to the same place is not
    assert ledger.queue_outbound([("uid:a", outbound_entry("ABC", "hl7/ABC.hl7", "hl7", "ris:2575"))]) == 0
    assert ledger.outbound_stats(time.time(), None)["queued"] == 2 and ledger.outbound_channels() == ["dicom", "stow"]
    ledger.close()
    assert not sqlite3.connect(path).execute("SELECT name FROM sqlite_master WHERE name = 'outbound_v4'").fetchall()


LAST_OBX = "OBX|16|NM|ORDER^Worklist order within the priority^99CXRBATCH||0.5||||||P\r"  # a whole ORU's end


def test_a_clock_set_back_never_holds_the_queue_for_the_time_it_went_back(tmp_path, monkeypatch):
    """The RIS down, then the system clock set back an hour (NTP correcting a clock that ran
    ahead, a VM resumed): the waiting ORU was due at a time of the old clock, so it waited an
    hour more once the RIS was back (after a refusal, an hour beyond refused_retry). The queue
    now keeps each object's wait, not the clock's jump."""
    from cxr_batch.integration.hl7 import Endpoint
    from cxr_batch.integration.outbox import HL7Channel

    from .ris import RIS

    out = tmp_path / "out"
    ledger = Ledger(out / ".cxr-batch" / "ledger.sqlite")
    (out / "hl7").mkdir()
    (out / "hl7" / "CTRL1.hl7").write_text("MSH|^~\\&|CXR-BATCH|FAC|RIS|FAC|20240101120000||ORU^R01^ORU_R01|CTRL1|P|2.5\r"
                                          "PID|1||P001\r" + LAST_OBX)
    port = free_port()
    ledger.queue_outbound([("k", outbound_entry("CTRL1", "hl7/CTRL1.hl7", "hl7", f"127.0.0.1:{port}"))])
    sender = Sender(ledger.path, out, HL7Channel(Endpoint.parse(f"127.0.0.1:{port}"), 2.0), retry_max=30.0)
    offset, real = [0.0], time.time
    monkeypatch.setattr(time, "time", lambda: real() + offset[0])
    sender.send_due(ledger, until=time.time())  # nothing listens: due again in a second
    assert ledger.outbound_stats(time.time(), "hl7")["retrying"] == 1
    offset[0] = -3600.0
    with RIS(port=port) as ris:
        sender.drain(time.time() + 10, ledger)
        assert len(ris.received) == 1
    assert ledger.outbound_stats(time.time(), "hl7")["delivered"] == 1
    ledger.close()


def one_oru_queued(out, control: str, port: int) -> Ledger:
    """A results folder whose ledger (returned open) queues one ORU, ``control``, for 127.0.0.1:``port``."""
    ledger = Ledger(out / ".cxr-batch" / "ledger.sqlite")
    (out / "hl7").mkdir()
    (out / "hl7" / f"{control}.hl7").write_text("MSH|^~\\&|CXR-BATCH|FAC|RIS|FAC|20240101120000||ORU^R01^ORU_R01|"
                                                 f"{control}|P|2.5\rPID|1||P001\r" + LAST_OBX)
    ledger.queue_outbound([("k", outbound_entry(control, f"hl7/{control}.hl7", "hl7", f"127.0.0.1:{port}"))])
    return ledger


def test_a_clock_set_back_while_a_scan_sends_never_makes_it_wait_the_jump(tmp_path, monkeypatch):
    """`scan --hl7-to` with the RIS down sends for send_wait seconds, then says what waits: with
    the system clock set back an hour during that wait (NTP), the scan went on trying for an
    hour more, its end measured on the wall clock. The wait is its length, whatever the clock."""
    import threading

    from cxr_batch.integration.hl7 import Endpoint
    from cxr_batch.integration.outbox import HL7Channel

    out = tmp_path / "out"
    port = free_port()  # nothing listens: the RIS is down
    ledger = one_oru_queued(out, "CTRL3", port)
    ledger.close()
    sender = Sender(ledger.path, out, HL7Channel(Endpoint.parse(f"127.0.0.1:{port}"), 2.0), retry_max=0.5)
    offset, real, send_one = [0.0], time.time, sender.send_one
    monkeypatch.setattr(time, "time", lambda: real() + offset[0])

    def set_back_at_the_first_try(item):
        offset[0] = -3600.0
        return send_one(item)

    sender.send_one = set_back_at_the_first_try
    drain = threading.Thread(target=sender.drain, args=(time.time() + 2.0,), daemon=True)
    drain.start()
    drain.join(timeout=120)  # a two-second wait: an hour when the clock's jump is waited out
    sender.halt.set()
    assert offset[0] == -3600.0 and not drain.is_alive()


def test_an_operators_retry_ends_a_back_off_begun_before_the_clock_was_set_back(tmp_path, monkeypatch):
    """The RIS down for long (a back-off of an hour), the clock then set back (NTP), the RIS back and
    the operator runs `outbound retry`: the sender took only a retry asked at a later wall-clock
    time than its failure for one, so it went on waiting out the hour. Any retry asked ends it."""
    import threading

    from cxr_batch.integration.hl7 import Endpoint
    from cxr_batch.integration.outbox import HL7Channel

    out = tmp_path / "out"
    port = free_port()  # nothing listens: the RIS is down
    ledger = one_oru_queued(out, "CTRL4", port)
    sender = Sender(ledger.path, out, HL7Channel(Endpoint.parse(f"127.0.0.1:{port}"), 2.0), retry_max=3600.0)
    sender.link_failures = 20  # down for long: the next back-off is retry_max
    offset, real = [0.0], time.time
    monkeypatch.setattr(time, "time", lambda: real() + offset[0])

    def send_once():
        mine = Ledger(ledger.path)
        sender.send_due(mine)
        mine.close()

    backing_off = threading.Thread(target=send_once, daemon=True)
    backing_off.start()
    assert wait_for(lambda: ledger.outbound_rows(False, "hl7")[0]["attempts"] == 1)  # failed: an hour's back-off
    offset[0] = -3600.0  # the clock set back
    ledger.outbound_send_now()  # `cxr-batch outbound retry`
    backing_off.join(timeout=60)  # the sender looks for a retry every IDLE_WAIT (5 s)
    sender.halt.set()
    assert not backing_off.is_alive()
    ledger.close()


def test_a_result_due_far_ahead_by_a_clock_that_ran_ahead_before_a_restart_waits_no_longer_than_its_back_off(
        tmp_path):
    """The clock ran a day ahead while the RIS refused a result (due again at refused_retry by
    that clock), then the machine restarted with the right time: no running sender saw the jump,
    and the result waited a day. A due time beyond the longest wait a sender sets is its longest
    wait from now."""
    from cxr_batch.integration.outbox import HL7Channel

    from .ris import RIS

    out = tmp_path / "out"
    ledger = Ledger(out / ".cxr-batch" / "ledger.sqlite")
    (out / "hl7").mkdir()
    (out / "hl7" / "CTRL2.hl7").write_text("MSH|^~\\&|CXR-BATCH|FAC|RIS|FAC|20240101120000||ORU^R01^ORU_R01|CTRL2|P|2.5\r"
                                          "PID|1||P001\r" + LAST_OBX)
    with RIS() as ris:
        where = f"127.0.0.1:{ris.endpoint.port}"
        ledger.queue_outbound([("k", outbound_entry("CTRL2", "hl7/CTRL2.hl7", "hl7", where))])
        ledger.outbound_refused("CTRL2", where, "AE: try later", time.time() + 86400 + 900, "hl7")
        sender = Sender(ledger.path, out, HL7Channel(ris.endpoint, 2.0), retry_max=1.0, refused_retry=1.0)
        sender.drain(time.time() + 10, ledger)
        assert len(ris.received) == 1
    ledger.close()


@pytest.mark.parametrize("cut", ["inside the content", "before the content"])
def test_an_object_file_cut_short_is_never_sent_and_is_kept_aside(results, cut):
    """pydicom reads a DICOM file cut anywhere without a word (a value shorter than its length,
    a sequence never closed): half an SR would reach the PACS under the result's own UID."""
    out, ledger, uids = results
    whole = out / "dicom" / "rle.sr.dcm"
    data = whole.read_bytes()
    if cut == "inside the content":
        cut_short = data[:len(data) * 2 // 3]
    else:  # at the boundary of the top-level element before the ContentSequence: a well-formed file
        ds = pydicom.dcmread(whole)
        del ds.ContentSequence
        cut_short = sr_bytes(ds)
        assert data.startswith(cut_short)
    whole.write_bytes(cut_short)
    pacs = Pacs()
    sender = start_sender(out, pacs)
    try:
        assert wait_for(lambda: ledger.outbound_stats(time.time())["delivered"] == 1, timeout=30)
        assert wait_for(lambda: ledger.outbound_stats(time.time())["refused"] == 1, timeout=30)
    finally:
        sender.stop()
        pacs.stop()
    assert list(pacs.stored) == [uids[0]]  # the whole one only
    stats = ledger.outbound_stats(time.time())
    assert any("rle.sr.dcm is cut short or damaged" in r for r in stats["waiting_because"]), stats
    aside = out / "dicom" / "rle.sr.dcm.damaged"
    assert aside.read_bytes() == cut_short and not whole.exists()  # kept for the operator, made again at a start


def test_a_receiver_down_for_a_day_still_backs_off_by_retry_max_and_says_why(tmp_path):
    """The back-off doubled without bound: after 1,024 failures in a row (17 hours of a RIS
    down, at a retry_max of 60 s) 2.0 ** 1024 raised OverflowError, and the sender logged
    'unexpected OverflowError' every 10 s in place of why the result waits."""
    from cxr_batch.integration.hl7 import Endpoint
    from cxr_batch.integration.outbox import HL7Channel

    out = tmp_path / "out"
    ledger = Ledger(out / ".cxr-batch" / "ledger.sqlite")
    (out / "hl7").mkdir()
    (out / "hl7" / "CTRL3.hl7").write_text("MSH|^~\\&|CXR-BATCH|FAC|RIS|FAC|20240101120000||ORU^R01^ORU_R01|CTRL3|P|2.5\r"
                                          "PID|1||P001\r" + LAST_OBX)
    where = f"127.0.0.1:{free_port()}"  # nothing listens
    ledger.queue_outbound([("k", outbound_entry("CTRL3", "hl7/CTRL3.hl7", "hl7", where))])
    sender = Sender(ledger.path, out, HL7Channel(Endpoint.parse(where), 2.0), retry_max=60.0)
    sender.link_failures = 24 * 60  # a day of tries a minute apart
    try:
        before = time.time()
        sender.send_due(ledger, until=before)
        due = ledger.next_due("hl7")
        assert before + 59 <= due <= time.time() + 60
        assert "cannot connect" in sender.status(ledger)["last_error"] and sender.status(ledger)["peer"] == "unreachable"
    finally:
        ledger.close()


def test_a_delivery_the_full_disk_keeps_from_recording_is_not_sent_again_and_again(small_disk):
    """The RIS acknowledged, then the ledger could not record it (the disk full): the sender's
    next look at the queue (every few seconds) found it still waiting and sent it again, so the
    RIS got the same ORU each time for as long as the disk stayed full. The delivery waits in
    memory to be recorded."""
    from cxr_batch.integration.outbox import HL7Channel

    from .ris import RIS
    from .test_watch_faults import fill

    out = small_disk / "out"
    ledger = Ledger(out / ".cxr-batch" / "ledger.sqlite")  # the sender's connection, open before the disk fills
    (out / "hl7").mkdir()
    (out / "hl7" / "CTRL4.hl7").write_text("MSH|^~\\&|CXR-BATCH|FAC|RIS|FAC|20240101120000||ORU^R01^ORU_R01|CTRL4|P|2.5\r"
                                          "PID|1||P001\r" + LAST_OBX)
    try:
        with RIS() as ris:
            ledger.queue_outbound([("k", outbound_entry("CTRL4", "hl7/CTRL4.hl7", "hl7", str(ris.endpoint)))])
            filler = fill(small_disk)
            sender = Sender(ledger.path, out, HL7Channel(ris.endpoint, 2.0), retry_max=0.2)
            for _ in range(3):  # as the sender's loop does, a few seconds apart
                with pytest.raises(sqlite3.OperationalError, match="full"):
                    sender.send_due(ledger)
            assert len(ris.received) == 1
            filler.unlink()
            sender.send_due(ledger)
            assert ledger.outbound_stats(time.time(), "hl7")["delivered"] == 1
            assert not sender.send_due(ledger)
            assert len(ris.received) == 1
    finally:
        ledger.close()


def test_a_full_disk_while_a_scan_s_results_are_sent_ends_that_channel_saying_so(small_disk, caplog):
    """Where no daemon runs (after a scan, `outbound send`), each channel drains the queue in a
    thread of its own, with a ledger connection of its own: one the full disk kept from opening
    (or from recording a delivery) raised out of the thread, a Python traceback on the user's
    terminal, and nothing said why the results were not sent."""
    import threading

    from cxr_batch.integration.hl7 import Endpoint
    from cxr_batch.integration.outbox import HL7Channel, Outbox

    from .test_watch_faults import fill

    out = small_disk / "out"
    ledger = Ledger(out / ".cxr-batch" / "ledger.sqlite")
    (out / "hl7").mkdir()
    (out / "hl7" / "CTRL5.hl7").write_text("MSH|^~\\&|CXR-BATCH|FAC|RIS|FAC|20240101120000||ORU^R01^ORU_R01|CTRL5|P|2.5\r"
                                          "PID|1||P001\r" + LAST_OBX)
    where = Endpoint("127.0.0.1", free_port())
    ledger.queue_outbound([("k", outbound_entry("CTRL5", "hl7/CTRL5.hl7", "hl7", str(where)))])
    ledger.close()
    filler = fill(small_disk)
    raised = []
    hook, threading.excepthook = threading.excepthook, raised.append
    try:
        Outbox(out, out / ".cxr-batch" / "ledger.sqlite", [HL7Channel(where, 2.0)], retry_max=0.2,
               refused_retry=60.0).drain(time.time() + 30)
    finally:
        threading.excepthook = hook
        filler.unlink()
    assert not raised, raised
    assert "hl7 results not sent" in caplog.text and "full disk" in caplog.text, caplog.text


def test_a_scan_s_sr_kept_aside_as_damaged_is_made_again_by_the_same_scan_with_resume(tmp_path, small_bundle):
    """A scan's SR cut short in its queue is kept aside as NAME.damaged and never sent; only
    watch/listen made it again (at their start). `scan --resume` kept the study's row without its
    SR, so the result never reached the archive, while the closing lines said it waited to be sent."""
    from .conftest import REPO

    out, config = tmp_path / "out", tmp_path / "scan.toml"
    config.write_text("[scan]\nsend_wait = 1.0\n")  # the archive is down: no minute of retries
    scan = [sys.executable, "-m", "cxr_batch", "scan", str(REPO / "examples" / "studies" / "dicom"), "--out", str(out),
            "--weights", str(small_bundle), "--device", "cpu", "--no-pdf", "--stow-to", f"http://127.0.0.1:{free_port()}/",
            "--config", str(config)]
    assert subprocess.run(scan, capture_output=True, text=True, timeout=300).returncode == 3  # results wait
    srs = sorted((out / "dicom").glob("*.sr.dcm"))
    whole = srs[0].read_bytes()
    srs[0].write_bytes(whole[:len(whole) // 2])
    sent = outbound("send", "--out", out, "--wait", 1)
    assert "is cut short or damaged" in sent.stderr and "--resume" in sent.stderr, sent.stderr
    assert not srs[0].exists()
    again = subprocess.run(scan + ["--resume"], capture_output=True, text=True, timeout=300)
    assert again.returncode == 3, again.stderr[-2000:]
    from cxr_batch.integration.outbound import whole_dicom_file

    assert whole_dicom_file(srs[0])  # made again under the same SOPInstanceUID, and queued
    assert pydicom.dcmread(srs[0]).SOPInstanceUID == pydicom.dcmread(srs[0].with_name(srs[0].name + ".damaged"),
                                                                     force=True).SOPInstanceUID
    listed = outbound("list", "--out", out).stdout
    assert "damaged" not in listed and "missing" not in listed, listed


def test_a_schema_5_queue_gets_a_digest_column_and_its_messages_are_checked_as_before(tmp_path):
    """Schema 6 records the sha256 of each queued ORU; a schema 5 queue's rows have none and
    their files are checked by their own structure, as they were."""
    path = tmp_path / "ledger.sqlite"
    db = sqlite3.connect(path)
    db.executescript("""
        CREATE TABLE meta (name TEXT PRIMARY KEY, value TEXT NOT NULL);
        INSERT INTO meta VALUES ('schema', '5');
        CREATE TABLE outbound (uid TEXT NOT NULL, channel TEXT NOT NULL DEFAULT 'dicom', key TEXT NOT NULL,
            path TEXT NOT NULL, queued_at REAL NOT NULL, due_at REAL NOT NULL, attempts INTEGER NOT NULL DEFAULT 0,
            delivered_at REAL, failed_at REAL, destination TEXT NOT NULL DEFAULT '', last_error TEXT NOT NULL DEFAULT '',
            dropped_at REAL, PRIMARY KEY (uid, channel));
        INSERT INTO outbound (uid, channel, key, path, queued_at, due_at) VALUES ('CTRL5', 'hl7', 'k', 'hl7/CTRL5.hl7', 1, 1);
    """)
    db.close()
    ledger = Ledger(path)
    try:
        (item,) = ledger.due_outbound(time.time(), channel="hl7")
        assert (item.uid, item.sha256) == ("CTRL5", "")
        ledger.queue_outbound([("k", outbound_entry("CTRL6", "hl7/CTRL6.hl7", "hl7", "ris:2575", "ab" * 32))])
        assert {r["uid"]: r["sha256"] for r in ledger.outbound_rows()} == {"CTRL5": "", "CTRL6": "ab" * 32}
        # delivered, then written again by the same scan run again: not queued, but an operator's
        # `outbound retry` of it sends the bytes now in its file
        ledger.outbound_delivered("CTRL6", "ris:2575", "hl7")
        again = outbound_entry("CTRL6", "hl7/CTRL6.hl7", "hl7", "ris:2575", "cd" * 32)
        assert ledger.queue_outbound([("k", again)]) == 0
        assert {r["uid"]: r["sha256"] for r in ledger.outbound_rows(everything=True)}["CTRL6"] == "cd" * 32
    finally:
        ledger.close()
    from cxr_batch.integration.outbound import whole_object_file

    message = tmp_path / "CTRL5.hl7"
    message.write_bytes(("MSH|^~\\&|CXR-BATCH|FAC|RIS|FAC|20240101120000||ORU^R01^ORU_R01|CTRL5|P|2.5\r"
                         "PID|1||P001\r" + LAST_OBX).encode())
    assert whole_object_file(message, "CTRL5") and not whole_object_file(message, "CTRL5", "ab" * 32)


def test_outbound_send_on_a_running_daemon_s_folder_says_to_use_retry(results):
    # `outbound send --out OUT` while `cxr-batch listen` runs there said "stop it first, or
    # choose another --out": stopping the node stops receiving studies, and the node sends its
    # queue itself; `outbound retry` is what makes its waiting results due now
    from cxr_batch.folderlock import FolderLock

    out, _ledger, _uids = results
    with FolderLock(out, "listen"):
        sent = outbound("send", "--out", out, "--wait", 1)
    assert sent.returncode == 1 and "is in use by cxr-batch listen" in sent.stderr, sent.stderr
    assert f"cxr-batch outbound retry --out {out}" in sent.stderr and "stop it first" not in sent.stderr, sent.stderr


def test_a_uid_mistyped_for_drop_or_retry_is_named_with_the_one_meant(tmp_path):
    # "1 of the UIDs named are not waiting in the queue" left the operator to find which of the
    # 20-64 character identifiers he had mistyped, and for drop, whether it was gone already
    out = tmp_path / "out"
    one_oru_queued(out, "1F0B0A4F8C1FAB520740", free_port()).close()
    done = outbound("drop", "--out", out, "1F0B0A4F8C1FAB52074")
    assert done.returncode == 1
    assert "'1F0B0A4F8C1FAB52074' is not in the queue (did you mean '1F0B0A4F8C1FAB520740'?)" in done.stderr
    done = outbound("retry", "--out", out, "1F0B0A4F8C1FAB520741", "NOSUCH")
    assert done.returncode == 1 and "(did you mean '1F0B0A4F8C1FAB520740'?)" in done.stderr, done.stderr
    assert "'NOSUCH' is not in the queue" in done.stderr
    assert outbound("drop", "--out", out, "1F0B0A4F8C1FAB520740").returncode == 0
    done = outbound("drop", "--out", out, "1F0B0A4F8C1FAB520740")  # twice: no longer waiting
    assert done.returncode == 1 and "'1F0B0A4F8C1FAB520740' is not waiting: dropped already" in done.stderr


def test_a_ris_that_answers_each_message_slowly_never_keeps_a_scan_past_its_send_wait(tmp_path):
    """A RIS answering every message AA, each just inside the timeout (an overloaded interface
    engine): a scan's send_wait bounded the back-off only, and the queue went on sending every
    due message, so 6 messages at 1.5 s kept a scan with send_wait = 2 s nine seconds (100 at
    29 s: 48 minutes for a 60 s send_wait). Sending stops at the deadline (the message in flight
    finished); what was not sent waits in the queue, none lost."""
    import socket
    import threading

    from cxr_batch.integration.hl7 import Endpoint
    from cxr_batch.integration.outbox import HL7Channel

    from .ris import ack

    server = socket.create_server(("127.0.0.1", 0))
    answered = []

    def slow_ris():
        server.settimeout(30)
        while True:
            try:
                conn, _ = server.accept()
            except OSError:
                return
            with conn:
                got = b""
                while b"\x1c\r" not in got and (piece := conn.recv(65536)):
                    got += piece
                control = got.split(b"\r")[0].split(b"|")[9].decode()
                time.sleep(1.5)
                conn.sendall(ack(control, "AA").encode())
                answered.append(control)

    thread = threading.Thread(target=slow_ris, daemon=True)
    thread.start()
    out = tmp_path / "out"
    (out / "hl7").mkdir(parents=True)
    ledger = Ledger(out / ".cxr-batch" / "ledger.sqlite")
    where = Endpoint("127.0.0.1", server.getsockname()[1])
    for k in range(6):
        (out / "hl7" / f"CTRL{k}.hl7").write_text(f"MSH|^~\\&|CXRBATCH||||20240101120000||ORU^R01^ORU_R01|CTRL{k}|P|"
                                                 "2.5\rPID|1||P001\r" + LAST_OBX)
        ledger.queue_outbound([(f"k{k}", outbound_entry(f"CTRL{k}", f"hl7/CTRL{k}.hl7", "hl7", str(where)))])
    sender = Sender(ledger.path, out, HL7Channel(where, 5.0), retry_max=30.0)
    started = time.monotonic()
    sender.drain(time.time() + 2.0, ledger)
    took = time.monotonic() - started
    server.close()
    stats = ledger.outbound_stats(time.time(), "hl7")
    assert took < 2.0 + 1.5 + 1.0, took  # the deadline, and the message in flight then
    assert stats["delivered"] == len(answered) < 6 and stats["queued"] == 6 - len(answered)
    ledger.close()

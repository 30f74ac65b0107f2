"""HL7 v2.5 ORU^R01 of real scored studies, sent over MLLP to a RIS in the test (hl7apy's MLLP
server) and parsed back by hl7apy; the ACK outcomes (AA/CA delivered, AR/CE retry, AE/CR
rejected, as HL7 v2.5 2.9.2.2 reads them), a RIS that says nothing, answers for another message or garbage, and none at all."""

from __future__ import annotations

import datetime as dt
import socket
import struct
import threading
import time
from dataclasses import replace

import pydicom
import pytest
from hl7apy.consts import VALIDATION_LEVEL
from hl7apy.parser import parse_message

from cxr_batch.dicom import identifiers
from cxr_batch.findings import FINDINGS
from cxr_batch.integration.hl7 import (Endpoint, HL7NotMade, control_id, escape, frame, message_control_id, oru_r01,
                                       send_message, unescape)
from cxr_batch.record import Scores, StudyRecord
from cxr_batch.results import read_results
from cxr_batch.scan import ScanConfig, run_scan
from cxr_batch.sr import FINDING_CODES
from tests.dicomgen import grey, write
from tests.ris import RIS, ack
from tests.watchkit import free_port

CREATED = dt.datetime(2026, 5, 4, 3, 2, 1, tzinfo=dt.timezone.utc)
HOSTILE = dict(PatientName="O'Brien|Smith^Ann~Marie&Co\\X", PatientID="ID|7^&~\\9", AccessionNumber="ACC^&|~1")


@pytest.fixture(scope="module")
def scored(tmp_path_factory, nih_images, small_bundle):
    """Real NIH radiographs as DICOMs (one with |^~\\& in its name, ID and accession number),
    scored by the small bundle; their records as the node keeps them (header and scores)."""
    from cxr_batch.bundle import load_bundle

    root = tmp_path_factory.mktemp("hl7")
    studies = root / "studies"
    write(studies / "plain.dcm", grey(nih_images[0]), StudyTime="101500", PatientBirthDate="19670302")
    write(studies / "hostile.dcm", grey(nih_images[1]), **HOSTILE)
    run_scan(studies, root / "out", ScanConfig(weights=str(small_bundle), device="cpu", progress=False, batch_size=4,
                                               workers=0, pdf=False))
    records = {}
    for row in read_results(root / "out" / "results.csv"):
        record = StudyRecord.from_row(row)
        record.ids = identifiers(pydicom.dcmread(studies / row["file"], stop_before_pixels=True))
        records[row["file"]] = record
    return records, load_bundle(small_bundle)


def _parse(message: str):
    parsed = parse_message(message.strip("\r"), validation_level=VALIDATION_LEVEL.STRICT)
    parsed.validate()
    return parsed


def test_every_study_reaches_the_ris_with_its_ids_priority_and_14_findings(scored):
    records, bundle = scored
    with RIS("AA") as ris:
        for record in records.values():
            message = oru_r01(record, thresholds=bundle.thresholds, created=CREATED)
            delivery = send_message(message, ris.endpoint, timeout=10)
            assert delivery.ok and delivery.outcome == "delivered" and delivery.reason == "AA"
        received = list(ris.received)
    assert len(received) == 2
    for text, record in zip(received, records.values()):
        m = _parse(text)
        msh = m.msh
        assert (msh.msh_9.value, msh.msh_11.value, msh.msh_12.value) == ("ORU^R01^ORU_R01", "P", "2.5")
        assert msh.msh_10.value == control_id(record) and len(control_id(record)) <= 20
        assert msh.msh_7.value == "20260504030201+0000" and msh.msh_18.value == "UNICODE UTF-8"
        result = m.oru_r01_patient_result
        pid = result.oru_r01_patient.pid
        assert unescape(pid.pid_3.cx_1.value) == record.ids.patient_id
        family, given = record.ids.patient_name.split("^")[:2]
        assert unescape(pid.pid_5.xpn_1.value) == family and unescape(pid.pid_5.xpn_2.value) == given
        order = result.oru_r01_order_observation
        accession = record.ids.accession_number
        assert unescape(order.orc.orc_3.value) == accession and order.orc.orc_1.value == "RE"
        obr = order.obr
        assert unescape(obr.obr_3.value) == unescape(obr.obr_18.value) == accession
        assert obr.obr_25.value == "P" and obr.obr_4.value == "399208008^Plain chest X-ray^SCT"
        notes = [n.nte_3.value for n in order.nte]
        assert notes[0] == f"cxr-batch triage model small@test, bundle sha256 {bundle.sha256}"
        observations = [g.obx for g in order.oru_r01_observation]
        n = 17 if record.scores.p_any is not None else 16
        assert len(observations) == n and [o.obx_1.value for o in observations] == [str(k) for k in range(1, n + 1)]
        priority, findings, rest = observations[0], observations[1:15], observations[15:]
        # the worklist's order inside the priority, and P(any finding): a RIS can sort as cxr-batch does
        assert rest[0].obx_3.value.startswith("ORDER^") and float(rest[0].obx_5.value) == pytest.approx(
            record.scores.triage_score, abs=5e-7)
        if record.scores.p_any is not None:
            assert rest[1].obx_3.value.startswith("PANY^") and float(rest[1].obx_5.value) == pytest.approx(
                record.scores.p_any, abs=5e-7)
        assert priority.obx_2.value == "CE" and priority.obx_3.value == "PRIORITY^Triage priority^99CXRBATCH"
        assert priority.obx_5.value.split("^")[0] == record.priority.upper()
        assert priority.obx_8.value == {"urgent": "AA", "abnormal": "A", "normal": ""}[record.priority]
        for k, (finding, obx) in enumerate(zip(FINDINGS, findings)):
            code = FINDING_CODES[finding]
            assert obx.obx_3.value == f"{code.value}^{code.meaning}^{code.scheme_designator}"
            assert obx.obx_2.value == "NM" and obx.obx_11.value == "P"
            assert float(obx.obx_5.value) == pytest.approx(record.scores.probs[k], abs=5e-7)
            assert obx.obx_7.value == f"<{bundle.thresholds[finding]:.6f}"
            expected = ("AA" if finding == "Pneumothorax" else "A") if record.scores.flags[k] else ""
            assert obx.obx_8.value == expected


def test_an_urgent_finding_is_aa_and_other_flags_a(scored):
    records, bundle = scored
    record = replace(records["plain.dcm"], scores=Scores(tuple(0.9 for _ in FINDINGS), (1,) * 14, "urgent", 2.0))
    m = _parse(oru_r01(record, thresholds=bundle.thresholds, urgent=("Pneumothorax", "Effusion")))
    flags = {finding: g.obx.obx_8.value for finding, g in
             zip(("priority",) + FINDINGS, m.oru_r01_patient_result.oru_r01_order_observation.oru_r01_observation[:15])}
    assert flags.pop("priority") == "AA"
    assert flags.pop("Pneumothorax") == flags.pop("Effusion") == "AA"
    assert set(flags.values()) == {"A"}


def test_a_record_without_a_name_says_so_and_a_changed_result_has_its_own_control_id(scored):
    records, bundle = scored
    record = records["plain.dcm"]
    nameless = replace(record, ids=replace(record.ids, patient_name=""))  # a scan's record, from results.csv
    m = _parse(oru_r01(nameless, thresholds=bundle.thresholds))  # valid: PID-5 is HL7's explicit null
    assert m.oru_r01_patient_result.oru_r01_patient.pid.pid_5.value == '""'
    first, again = oru_r01(record, revision=""), oru_r01(record)
    assert message_control_id(first) == message_control_id(again) == control_id(record)
    changed = oru_r01(record, revision="sha256-of-the-changed-file")
    assert message_control_id(changed) == control_id(record, "sha256-of-the-changed-file") != control_id(record)
    assert message_control_id(oru_r01(record, revision="sha256-of-the-changed-file")) == message_control_id(changed)


def test_delimiters_in_names_and_ids_are_escaped_not_structure(scored):
    records, bundle = scored
    record = records["hostile.dcm"]
    message = oru_r01(record, thresholds=bundle.thresholds)
    segments = message.strip("\r").split("\r")
    assert [s[:3] for s in segments][:6] == ["MSH", "PID", "ORC", "OBR", "NTE", "NTE"]
    assert {s[:3] for s in segments[6:]} == {"OBX"} and len(segments) - 6 >= 16
    pid = _parse(message.replace("\n", "\r")).oru_r01_patient_result.oru_r01_patient.pid  # as the server keeps it
    assert unescape(pid.pid_3.cx_1.value) == HOSTILE["PatientID"]
    assert unescape(pid.pid_5.xpn_1.value) == "O'Brien|Smith"  # the name's own ^ still splits family/given
    assert unescape(pid.pid_5.xpn_2.value) == "Ann~Marie&Co\\X"
    order = _parse(message).oru_r01_patient_result.oru_r01_order_observation
    assert unescape(order.obr.obr_18.value) == HOSTILE["AccessionNumber"]
    # a segment break in a value cannot start a segment of its own
    assert escape("a\rMSH|x") == "a MSH\\F\\x" and unescape(escape("\\E\\|")) == "\\E\\|"


def test_a_date_that_is_not_eight_digits_is_left_out_of_pid_7_and_obr_7(scored):
    """strptime reads '2024311' and '1950 2 3' as dates; HL7 TS does not (the RIS would get a
    malformed date or refuse the message). Only 8 digits of a real date are copied."""
    from copy import deepcopy

    records, bundle = scored
    record = deepcopy(records["plain.dcm"])
    record.ids.study_date, record.ids.patient_birth_date = "2024311", "1950 2 3"
    message = oru_r01(record, thresholds=bundle.thresholds)
    assert "2024311" not in message and "1950 2 3" not in message
    result = _parse(message).oru_r01_patient_result
    assert result.oru_r01_patient.pid.pid_7.value == ""
    assert result.oru_r01_order_observation.obr.obr_7.value == ""


def test_a_retry_carries_the_same_control_id(scored):
    records, bundle = scored
    record = records["plain.dcm"]
    first = oru_r01(record, thresholds=bundle.thresholds, created=CREATED)
    again = oru_r01(record, thresholds=bundle.thresholds, created=CREATED + dt.timedelta(hours=1))
    with RIS("AR", text="system down") as ris:
        assert send_message(first, ris.endpoint, timeout=10).outcome == "retry"
        ris.answer = "AA"
        assert send_message(again, ris.endpoint, timeout=10).ok
        ids = [_parse(t).msh.msh_10.value for t in ris.received]
    assert ids[0] == ids[1] == control_id(record)
    other = StudyRecord(file=record.file, ids=record.ids, scores=record.scores, weights_sha256="0" * 64)
    assert control_id(other) != control_id(record)  # another model's result is another message


@pytest.mark.parametrize("code, outcome", [("AA", "delivered"), ("CA", "delivered"), ("AR", "retry"),
                                           ("CE", "retry"), ("AE", "rejected"), ("CR", "rejected")])
def test_each_ack_code_decides_what_the_queue_does(scored, code, outcome):
    records, bundle = scored
    with RIS(code, text="a reason|with^delimiters") as ris:
        delivery = send_message(oru_r01(records["plain.dcm"], thresholds=bundle.thresholds), ris.endpoint, timeout=10)
    assert delivery.outcome == outcome and delivery.ok == (outcome == "delivered")
    assert delivery.transient == (outcome == "retry")
    assert "a reason|with^delimiters" in delivery.reason


@pytest.mark.parametrize("answer, says", [("silent", "no ACK from"), ("other-id", "ACK for message 'SOMEONEELSE'"),
                                          ("garbage", "unreadable ACK")])
def test_a_ris_that_does_not_acknowledge_this_message_means_retry(scored, answer, says):
    records, bundle = scored
    with RIS(answer) as ris:
        t0 = time.monotonic()
        delivery = send_message(oru_r01(records["plain.dcm"], thresholds=bundle.thresholds), ris.endpoint, timeout=1.5)
        elapsed = time.monotonic() - t0
        assert len(ris.received) == 1  # it did arrive
    assert delivery.outcome == "retry" and says in delivery.reason, delivery.reason
    assert elapsed < 5


def test_no_ris_listening_means_retry(scored):
    records, bundle = scored
    delivery = send_message(oru_r01(records["plain.dcm"], thresholds=bundle.thresholds),
                            Endpoint("127.0.0.1", free_port()), timeout=2)
    assert delivery.outcome == "retry" and "cannot connect" in delivery.reason


def test_a_ris_host_name_nothing_resolves_is_said_as_such(scored):
    records, bundle = scored
    delivery = send_message(oru_r01(records["plain.dcm"], thresholds=bundle.thresholds),
                            Endpoint("no-such-host.invalid", 2575), timeout=2)
    assert delivery.outcome == "retry" and "host 'no-such-host.invalid' not found" in delivery.reason, delivery.reason
    assert "gaierror" not in delivery.reason


def test_records_without_what_the_ris_matches_on_get_no_message(scored):
    records, _ = scored
    record = records["plain.dcm"]
    for field, says in (("accession_number", "no accession number"), ("patient_id", "no patient ID")):
        ids = identifiers(pydicom.Dataset())
        ids.fill_from(record.ids)
        setattr(ids, field, "")
        with pytest.raises(HL7NotMade, match=says):
            oru_r01(StudyRecord(file="x.dcm", ids=ids, scores=record.scores))
    with pytest.raises(HL7NotMade, match="not scored"):
        oru_r01(StudyRecord(file="x.dcm", status="error", ids=record.ids))


def test_endpoint_and_framing():
    assert Endpoint.parse("ris.example.org:2575") == Endpoint("ris.example.org", 2575)
    assert str(Endpoint.parse("[::1]:2575")) == "[::1]:2575"
    for bad in ("ris.example.org", "ris:0", "ris:70000", "a b:1"):
        with pytest.raises(ValueError):
            Endpoint.parse(bad)
    assert frame("MSH|x\r") == b"\x0bMSH|x\r\x1c\x0d"


def _raw_peer(chunks: list[bytes], received: list[bytes] | None = None):
    """A TCP peer that reads one MLLP message (kept in ``received``), sends ``chunks`` one by
    one, and closes."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)

    def serve():
        conn, _ = server.accept()
        with conn:
            conn.settimeout(10)
            data = b""
            while b"\x1c\x0d" not in data:
                piece = conn.recv(65536)
                if not piece:
                    return
                data += piece
            if received is not None:
                received.append(data)
            try:
                for chunk in chunks:
                    conn.sendall(chunk)
                    time.sleep(0.001)
            except OSError:  # the client hung up (an answer it stopped reading)
                pass

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    return server, thread


@pytest.mark.parametrize("shape", ["stray end block, then the ACK byte by byte", "closes without an answer"])
def test_an_ack_is_read_however_it_arrives(scored, shape):
    records, bundle = scored
    message = oru_r01(records["plain.dcm"], thresholds=bundle.thresholds)
    framed_ack = ack(control_id(records["plain.dcm"]), "AA").encode()
    chunks = [b"\x1c\x0d"] + [framed_ack[i:i + 1] for i in range(len(framed_ack))] if shape.startswith("stray") else []
    server, thread = _raw_peer(chunks)
    with server:
        delivery = send_message(message, Endpoint("127.0.0.1", server.getsockname()[1]), timeout=10)
        thread.join(10)
    if chunks:
        assert delivery.ok, delivery
    else:
        assert delivery.outcome == "retry" and "closed the connection without an ACK" in delivery.reason


@pytest.mark.parametrize("answer, says", [
    (b"HTTP/1.0 400 Bad request\r\nServer: SimpleHTTP\r\n\r\n", "an HTTP server"),
    (b"\x15\x03\x03\x00\x02\x02\x32", "a TLS server"),
    (b"SSH-2.0-OpenSSH_9.2\r\n", "an SSH server"),
    (b"220 mail.example.org ESMTP\r\n", "not HL7 over MLLP"),
])
def test_a_peer_that_is_not_an_mllp_listener_is_named_as_such(scored, answer, says):
    """--hl7-to at the wrong port (the PACS's web port, a TLS listener, SSH): the retry says
    what answered and to check the RIS's MLLP port, not only "no ACK" (and never echoes the bytes)."""
    records, bundle = scored
    server, thread = _raw_peer([answer])
    with server:
        delivery = send_message(oru_r01(records["plain.dcm"], thresholds=bundle.thresholds),
                                Endpoint("127.0.0.1", server.getsockname()[1]), timeout=10)
        thread.join(10)
    assert delivery.outcome == "retry"
    assert says in delivery.reason and "MLLP port" in delivery.reason, delivery.reason
    # the peer's bytes are never echoed (not "400": the port itself may hold those digits)
    assert "Bad request" not in delivery.reason and "ESMTP" not in delivery.reason and "OpenSSH" not in delivery.reason


def test_a_name_too_long_for_hl7_is_refused_without_naming_the_patient(scored):
    """A name within DICOM's 194 characters whose escaped delimiters take it past what HL7 holds
    (199): no message, and why says so without the name (it goes to the log and to results.csv)."""
    records, bundle = scored
    record = records["plain.dcm"]
    long = replace(record, ids=replace(record.ids, patient_name="SECRET&" * 28))
    assert len(long.ids.patient_name) == 194
    with pytest.raises(HL7NotMade) as refused:
        oru_r01(long, thresholds=bundle.thresholds)
    said = str(refused.value)
    assert "SECRET" not in said and "longer than" in said, said


def test_a_ris_down_then_back_gets_each_message_once_in_the_order_queued(scored, tmp_path):
    """The RIS is down when sending starts (connection refused, a back-off) and comes
    back: every message arrives once, in the order queued (a scan queues in worklist order), not
    with the oldest ones sent to the back by each failed try to connect."""
    from cxr_batch.integration.outbound import Sender
    from cxr_batch.integration.outbox import HL7Channel
    from cxr_batch.ledger import Ledger, outbound_entry

    records, bundle = scored
    record = records["plain.dcm"]
    (tmp_path / "hl7").mkdir()
    endpoint = Endpoint("127.0.0.1", free_port())
    queued = []
    for k in range(6):
        message = oru_r01(record, thresholds=bundle.thresholds, revision=f"study-{k}")
        control = message_control_id(message)
        (tmp_path / "hl7" / f"{control}.hl7").write_text(message, encoding="utf-8")
        queued.append((f"uid:{k}", outbound_entry(control, f"hl7/{control}.hl7", "hl7", str(endpoint))))
    ledger_path = tmp_path / "ledger.sqlite"
    ledger = Ledger(ledger_path)
    try:
        assert ledger.queue_outbound(queued) == 6
        sender = Sender(ledger_path, tmp_path, HL7Channel(endpoint, 5.0), retry_max=2.0)
        assert sender.send_due(ledger, until=time.time())  # refused (no time left to back off)
        assert sender.link_failures == 1 and not ledger.due_outbound(time.time(), channel="hl7")  # all wait
        with RIS("AA", port=endpoint.port) as ris:
            sender.drain(time.time() + 30)
            received = [message_control_id(m) for m in ris.received]
        assert received == [entry[0] for _, entry in queued]
        assert ledger.outbound_stats(time.time(), "hl7")["delivered"] == 6
    finally:
        ledger.close()


def test_a_scan_sends_its_results_in_worklist_order(tmp_path, nih_images, small_bundle):
    """After a scan the ORUs go out read-first first (worklist_rank), not in file order: when
    ``send_wait`` ends before the queue does, what waits is the least urgent."""
    from cxr_batch.integration.outbox import send_after_scan

    studies = tmp_path / "studies"
    for k, image in enumerate(nih_images[:8]):
        write(studies / f"{k}.dcm", grey(image), PatientID=f"P{k}", AccessionNumber=f"A{k}")
    out = tmp_path / "out"
    with RIS("AA") as ris:
        cfg = ScanConfig(weights=str(small_bundle), device="cpu", progress=False, batch_size=4, workers=0, pdf=False,
                         hl7_to=str(ris.endpoint))
        run_scan(studies, out, cfg)
        assert send_after_scan(out, cfg) == []
        received = [next(s for s in m.splitlines() if s.startswith("PID|")).split("|")[3] for m in ris.received]
    ranked = sorted(read_results(out / "results.csv"), key=lambda row: int(row["worklist_rank"]))
    assert [row["patient_id"] for row in ranked] != [f"P{k}" for k in range(8)]  # file order is not the worklist's
    assert received == [row["patient_id"] for row in ranked]


def test_the_watch_daemon_sends_a_batch_in_worklist_order(tmp_path, nih_images, small_bundle):
    """A batch of the watch daemon is queued read-first first too, not in file order (a batch
    is up to batch_size studies: the urgent one of them goes out first)."""
    from cxr_batch.triage import worklist_key
    from tests.watchkit import start_daemon, stop, wait_for, watch_config

    incoming, out = tmp_path / "incoming", tmp_path / "out"
    for k, image in enumerate(nih_images[:8]):  # there before the daemon starts: one batch of 8
        write(incoming / f"{k}.dcm", grey(image), PatientID=f"P{k}", AccessionNumber=f"A{k}")
    config = watch_config(tmp_path / "watch.toml", batch_size=8, max_wait=2.0)
    with RIS("AA") as ris:
        proc = start_daemon(incoming, out, small_bundle, config, "--hl7-to", ris.endpoint, "--no-pdf")
        try:
            assert wait_for(lambda: len(ris.received) == 8, timeout=180), proc.stderr
        finally:
            stop(proc)
        received = [next(s for s in m.splitlines() if s.startswith("PID|")).split("|")[3] for m in ris.received]
    rows = read_results(out / "results.csv")
    ranked = sorted(rows, key=lambda r: worklist_key(r["priority"], float(r["triage_score"]), r["file"]))
    assert [r["patient_id"] for r in ranked] != [f"P{k}" for k in range(8)]  # file order is not the worklist's
    assert received == [r["patient_id"] for r in ranked]


def test_a_scan_resumed_with_the_ris_at_a_new_address_finishes_and_sends_there(tmp_path, nih_images, small_bundle):
    """The RIS moved while a scan's results waited (its old address refuses): the same scan
    with --resume and the new --hl7-to keeps its rows (where results go does not change them)
    and sends every study's ORU to the new address, none left waiting for the old one."""
    from cxr_batch.integration.outbox import send_after_scan

    studies = tmp_path / "studies"
    for k, image in enumerate(nih_images[:3]):
        write(studies / f"{k}.dcm", grey(image), PatientID=f"P{k}", AccessionNumber=f"A{k}")
    out = tmp_path / "out"
    base = dict(weights=str(small_bundle), device="cpu", progress=False, batch_size=4, workers=0, pdf=False)
    # the test RIS's MSH (hl7_processing_id T) before the production one's: no row changes either
    old = ScanConfig(**base, hl7_to=f"127.0.0.1:{free_port()}", send_wait=0.0, hl7_processing_id="T",
                     hl7_receiving_application="TESTRIS")
    run_scan(studies, out, old)
    assert send_after_scan(out, old)  # nothing delivered: the old address refuses
    rows = read_results(out / "results.csv")
    with RIS("AA") as ris:
        new = ScanConfig(**base, hl7_to=str(ris.endpoint))
        summary = run_scan(studies, out, new, earlier="resume")
        assert summary.kept == 3 and summary.counts["ok"] == 3
        assert send_after_scan(out, new) == []
        received = sorted(next(s for s in m.splitlines() if s.startswith("PID|")).split("|")[3] for m in ris.received)
    assert received == ["P0", "P1", "P2"]
    assert read_results(out / "results.csv") == rows


def test_an_accession_number_longer_than_dicom_allows_is_never_cut(scored, tmp_path, nih_images):
    """An accession number over DICOM's 16 characters (a RIS issuing 19, a modality copying it
    whole) was cut to 16 when read: the ORU named another order (the RIS answers AE 'unknown
    order' for ever, or files the result under a study whose number is that prefix) and the SR
    another accession. The RIS gets the number it issued; the SR, where 16 is the limit, none
    (the PACS matches it by its Study Instance UID)."""
    from cxr_batch.sr import build_sr

    records, bundle = scored
    issued = "RIS-2026-000012345"
    path = write(tmp_path / "long.dcm", grey(nih_images[0]), AccessionNumber=issued)
    record = replace(records["plain.dcm"], ids=identifiers(pydicom.dcmread(path, stop_before_pixels=True)))
    assert record.ids.accession_number == issued
    order = _parse(oru_r01(record, thresholds=bundle.thresholds)).oru_r01_patient_result.oru_r01_order_observation
    assert order.orc.orc_3.value == order.obr.obr_3.value == order.obr.obr_18.value == issued
    assert build_sr(record, bundle).AccessionNumber == ""
    # one longer than anything kept (64) is left out, never cut: no ORU, and says why
    path = write(tmp_path / "longer.dcm", grey(nih_images[0]), AccessionNumber="RIS-" + "7" * 70)
    record = replace(record, ids=identifiers(pydicom.dcmread(path, stop_before_pixels=True)))
    assert record.ids.accession_number == ""
    with pytest.raises(HL7NotMade, match="no accession number"):
        oru_r01(record, thresholds=bundle.thresholds)


def test_an_accession_number_too_long_to_keep_is_said_in_the_row_not_read_as_missing(tmp_path, nih_images,
                                                                                   small_bundle):
    """One over 64 characters is left out (cut, it could be another order's), so the study gets
    no ORU; its row said nothing and the log said "no accession number", while the PACS shows
    the study with one: the row's notes say it was too long."""
    studies = tmp_path / "studies"
    write(studies / "longer.dcm", grey(nih_images[0]), AccessionNumber="RIS-" + "7" * 70)
    run_scan(studies, tmp_path / "out", ScanConfig(weights=str(small_bundle), device="cpu", progress=False,
                                                   workers=0, pdf=False))
    (row,) = read_results(tmp_path / "out" / "results.csv")
    assert row["status"] == "ok" and row["accession_number"] == ""
    assert "accession number is over 64 characters" in row["notes"]
    assert "7777" not in row["notes"]  # the value itself is not repeated


def test_an_order_the_ris_does_not_know_does_not_hold_up_the_others(scored, tmp_path, caplog):
    """AE is the RIS's error in processing that message (HL7 v2.5 2.9.2.2 b: an order it does
    not know, a value it refuses), AR its failure 'for reasons unrelated to content or format
    (system down, internal error)', likely to accept the same message later (c). AE was taken
    for the link failing: each one backed the whole channel off (up to retry_max) and resent
    that message at every back-off, so results of unscheduled studies (no order in the RIS)
    held up the others; AR was taken for a refusal, so messages sent while the RIS was down
    waited refused_retry (15 minutes) after it came back."""
    from cxr_batch.integration.outbound import Sender
    from cxr_batch.integration.outbox import HL7Channel
    from cxr_batch.ledger import Ledger, outbound_entry

    records, bundle = scored
    record = records["plain.dcm"]
    (tmp_path / "hl7").mkdir()
    with RIS("AA") as ris:
        queued = []
        for k in range(4):
            message = oru_r01(record, thresholds=bundle.thresholds, revision=f"study-{k}")
            control = message_control_id(message)
            (tmp_path / "hl7" / f"{control}.hl7").write_text(message, encoding="utf-8")
            queued.append((f"uid:{k}", outbound_entry(control, f"hl7/{control}.hl7", "hl7", str(ris.endpoint))))
        unknown = queued[0][1][0]
        ris.answers[unknown], ris.text = "AE", "unknown order"
        ledger = Ledger(tmp_path / "ledger.sqlite")
        try:
            assert ledger.queue_outbound(queued) == 4
            sender = Sender(tmp_path / "ledger.sqlite", tmp_path, HL7Channel(ris.endpoint, 5.0), retry_max=60.0)
            sender.send_due(ledger, until=time.time())  # one pass over the queue, no time to wait
            stats = ledger.outbound_stats(time.time(), "hl7")
            assert stats["delivered"] == 3 and stats["refused"] == 1, stats
            assert sender.link_failures == 0 and "unknown order" in stats["waiting_because"].popitem()[0]
            # the RIS's words (MSA-3 may quote the patient) go to the queue, not to the log
            assert "AE" in caplog.text and "unknown order" not in caplog.text
            # the RIS down for maintenance: AR, a failure of the link, tried again within retry_max
            ris.answer, ris.answers, ris.text = "AR", {}, "database unavailable"
            message = oru_r01(record, thresholds=bundle.thresholds, revision="study-4")
            delivery = send_message(message, ris.endpoint, timeout=5)
            assert delivery.outcome == "retry" and "database unavailable" in delivery.reason, delivery
        finally:
            ledger.close()


def test_an_ack_ended_by_0x1c_alone_then_closed_is_read(scored):
    """MLLP ends a block with 0x1C 0x0D; some RIS interfaces write the 0x1C only and hang up.
    The ACK was 'closed the connection without an ACK': the RIS, which had taken the message,
    got it again at every back-off, for ever."""
    records, bundle = scored
    message = oru_r01(records["plain.dcm"], thresholds=bundle.thresholds)
    framed = ack(control_id(records["plain.dcm"]), "AA").encode()
    server, thread = _raw_peer([framed[:-1]])  # without the final 0x0D
    with server:
        delivery = send_message(message, Endpoint("127.0.0.1", server.getsockname()[1]), timeout=10)
        thread.join(10)
    assert delivery.ok, delivery


def _scanned_to_ris(studies, out, bundle) -> list[str]:
    """The ORUs a scan of ``studies`` with --hl7-to sends a RIS (built after the scan, as a scan's
    are), as the RIS keeps them (segments ended by CR)."""
    from cxr_batch.integration.outbox import send_after_scan

    with RIS("AA") as ris:
        cfg = ScanConfig(weights=str(bundle), device="cpu", progress=False, batch_size=4, workers=0, pdf=False,
                         hl7_to=str(ris.endpoint))
        run_scan(studies, out, cfg)
        assert send_after_scan(out, cfg, studies) == []
        return [message.replace("\n", "\r") for message in ris.received]


def test_a_scan_s_oru_names_the_patient_as_the_header_does_never_the_null(tmp_path, nih_images, small_bundle):
    """A scan built its ORUs from results.csv, which keeps no names: PID-5 was HL7's explicit
    null "", which tells a receiver updating its records to delete the patient's name (HL7 v2.5
    2.5.3), and a RIS that checks the name against the order's refuses the result. The name,
    birth date and sex are read again from the scanned file's header (the same instance)."""
    studies = tmp_path / "studies"
    write(studies / "a.dcm", grey(nih_images[0]), PatientID="P1", AccessionNumber="A1", PatientName="O'Hara^Zoë",
          PatientBirthDate="19670302", PatientSex="F")
    (message,) = _scanned_to_ris(studies, tmp_path / "out", small_bundle)
    pid = _parse(message).oru_r01_patient_result.oru_r01_patient.pid
    assert (pid.pid_5.xpn_1.value, pid.pid_5.xpn_2.value) == ("O'Hara", "Zoë")
    assert (pid.pid_7.value, pid.pid_8.value) == ("19670302", "F")


@pytest.mark.parametrize("charset", ["\\ISO 2022 IR 87", "ISO_IR 192"])
@pytest.mark.parametrize("name, expected", [
    ("=山田^太郎=やまだ^たろう", [("山田", "太郎", "I"), ("やまだ", "たろう", "P")]),
    ("Yamada^Tarou=山田^太郎=やまだ^たろう", [("Yamada", "Tarou", "A"), ("山田", "太郎", "I"), ("やまだ", "たろう", "P")]),
    ("=山田^太郎", [("山田", "太郎", "I")]),
])
def test_a_name_in_ideographic_and_phonetic_groups_reaches_the_ris_as_pid_5_repetitions(scored, tmp_path, nih_images,
                                                                                           charset, name, expected):
    """A DICOM name with no alphabetic group (``=山田^太郎=やまだ^たろう``) was sent as PID-5
    ``""``, HL7's "delete the name". Each component group is a repetition of PID-5 (HL7 v2.5
    2.A.88 XPN: the name repeated in each representation), alphabetic first, with its name
    representation code (XPN-8, HL7 table 4000: A, I, P), in the UTF-8 that MSH-18 names."""
    records, bundle = scored
    path = write(tmp_path / "ja.dcm", grey(nih_images[0]), PatientName=name, SpecificCharacterSet=charset)
    record = replace(records["plain.dcm"], ids=identifiers(pydicom.dcmread(path, stop_before_pixels=True)))
    assert record.ids.patient_name == name  # as the header says, whatever its character set
    message = oru_r01(record, thresholds=bundle.thresholds)
    assert frame(message).count("山田".encode("utf-8")) == 1
    with RIS("AA") as ris:
        assert send_message(message, ris.endpoint, timeout=10).ok
        (received,) = ris.received
    m = _parse(received.replace("\n", "\r"))
    assert m.msh.msh_18.value == "UNICODE UTF-8"
    names = m.oru_r01_patient_result.oru_r01_patient.pid.pid_5
    assert [(n.xpn_1.value, n.xpn_2.value, n.xpn_8.value) for n in names] == expected
    assert '""' not in received


def test_why_hl7apy_refused_never_quotes_a_part_of_an_ideographic_name(scored):
    """The reason goes to the log and to results.csv's notes: the parts of every component group
    are taken out of it, not only those of the alphabetic one."""
    from cxr_batch.integration.hl7 import _refusal

    records, _ = scored
    ids = replace(records["plain.dcm"].ids, patient_name="Yamada^Tarou=山田^太郎=やまだ^たろう")
    said = _refusal(ValueError("invalid value '山田' in XPN_1, '太郎' in XPN_2, 'やまだ' and 'Tarou'"), ids)
    assert not any(part in said for part in ("山田", "太郎", "やまだ", "Tarou")), said

def test_a_name_with_an_alphabetic_group_only_is_one_pid_5_as_before(scored):
    records, bundle = scored
    record = records["plain.dcm"]
    pid = _parse(oru_r01(record, thresholds=bundle.thresholds)).oru_r01_patient_result.oru_r01_patient.pid
    assert [n.to_er7() for n in pid.pid_5] == ["DOE^JANE"]


def _issuer(namespace="HOSP-A", universal_id="1.2.840.99.7", kind="ISO", type_code="MR"):
    from pydicom.dataset import Dataset

    qualifiers = Dataset()
    qualifiers.UniversalEntityID, qualifiers.UniversalEntityIDType = universal_id, kind
    qualifiers.IdentifierTypeCode = type_code
    return dict(IssuerOfPatientID=namespace, IssuerOfPatientIDQualifiersSequence=[qualifiers])


def test_the_patient_id_reaches_the_ris_with_the_authority_that_issued_it(tmp_path, nih_images, small_bundle):
    """A hospital of several sites numbers patients per site: "P1" of one is another patient
    than "P1" of the next, and the header says whose (IssuerOfPatientID and its qualifiers,
    PS3.3 C.7.1.1). PID-3 carried the bare number, so a RIS matching on the identifier list could
    file the result under another site's patient. PID-3.4 is now the assigning authority
    (namespace & universal ID & its type) and PID-3.5 the identifier type, the mapping PS3.17's
    HL7 v2 annex gives; a study without them keeps the bare number; a scan's ORU, built after the
    scan, reads them again from the file as it does the name."""
    studies = tmp_path / "studies"
    write(studies / "a.dcm", grey(nih_images[0]), PatientID="P1", AccessionNumber="A1", **_issuer())
    write(studies / "b.dcm", grey(nih_images[1]), PatientID="P2", AccessionNumber="A2")
    write(studies / "c.dcm", grey(nih_images[2]), PatientID="P3", AccessionNumber="A3",
          **_issuer(namespace="SITE|B&C", universal_id="", kind="", type_code=""))
    pids = {}
    for message in _scanned_to_ris(studies, tmp_path / "out", small_bundle):
        pid = _parse(message).oru_r01_patient_result.oru_r01_patient.pid
        pids[pid.pid_3.cx_1.value] = pid.pid_3
    assert sorted(pids) == ["P1", "P2", "P3"]
    assert pids["P1"].to_er7() == "P1^^^HOSP-A&1.2.840.99.7&ISO^MR"  # CX.4 an HD: namespace & UID & type
    assert pids["P2"].to_er7() == "P2"
    assert pids["P3"].to_er7() == "P3^^^SITE\\F\\B\\T\\C"  # the delimiters escaped, not structure
    assert unescape(pids["P3"].cx_4.to_er7()) == "SITE|B&C"


def test_the_msh_header_the_ris_routes_and_checks_by_comes_from_the_configuration(tmp_path, nih_images,
                                                                                 small_bundle):
    """An interface engine routes by MSH-5/MSH-6, and a RIS checks MSH-11 against its own
    (HL7 v2.5 2.9.2.1: AR when it does not match): a hospital's test RIS expects T. They were
    fixed (empty, empty, P), so cxr-batch could not be connected to a test RIS or behind an
    engine. The [scan] (or [watch]...) table sets them (HD: namespace^OID^ISO); a processing id
    that is not P, D or T, or a | ~ \\ & in a name, is a configuration error before any scoring."""
    from cxr_batch.cli import load_config
    from cxr_batch.config import ConfigError
    from cxr_batch.integration.outbox import send_after_scan

    studies = tmp_path / "studies"
    write(studies / "a.dcm", grey(nih_images[0]), PatientID="P1", AccessionNumber="A1")
    with RIS("AA") as ris:
        config = tmp_path / "scan.toml"
        config.write_text(f'[scan]\nhl7_to = "{ris.endpoint}"\nhl7_sending_facility = "ED"\n'
                          'hl7_receiving_application = "RIS"\nhl7_receiving_facility = "RADIOLOGY^1.2.840.99^ISO"\n'
                          'hl7_processing_id = "T"\n')
        cfg = load_config(ScanConfig, config, "scan", weights=str(small_bundle), device="cpu", workers=0, pdf=False,
                          progress=False)
        run_scan(studies, tmp_path / "out", cfg)
        assert send_after_scan(tmp_path / "out", cfg) == []
        (message,) = ris.received
    msh = _parse(message.replace("\n", "\r")).msh
    assert (msh.msh_3.value, msh.msh_4.value, msh.msh_5.value, msh.msh_11.value) == ("CXRBATCH", "ED", "RIS", "T")
    assert (msh.msh_6.hd_1.value, msh.msh_6.hd_2.value, msh.msh_6.hd_3.value) == ("RADIOLOGY", "1.2.840.99", "ISO")
    for key, value in (("hl7_processing_id", "X"), ("hl7_receiving_application", "RIS|2"),
                       ("hl7_sending_facility", "A^B^C^D")):
        config.write_text(f'[scan]\nhl7_to = "ris:2575"\n{key} = "{value}"\n')
        with pytest.raises(ConfigError, match=key):
            load_config(ScanConfig, config, "scan", weights=str(small_bundle))


@pytest.mark.parametrize("key, value, says", [
    ("hl7_sending_facility", "EMERGENCY-DEPARTMENT-NORTH", "20 characters"),  # HD-1 is an IS: 20
    ("hl7_receiving_facility", "RADIOLOGY^" + "1" * 200 + "^ISO", "199 characters"),  # HD-2 is an ST: 199
    ("hl7_receiving_application", "RIS\u0007", "control characters"),
])
def test_an_msh_name_hl7_cannot_carry_is_refused_before_the_scan(tmp_path, nih_images, small_bundle, key, value,
                                                                  says):
    """A facility name over HD-1's 20 characters passed the configuration check, then hl7apy
    refused every ORU of the scan ('a value (a name or an ID) is longer than HL7 v2.5 allows',
    read as the patient's): no result reached the RIS. It is a configuration error (exit 2,
    naming the key) before the model loads."""
    from tests.test_evaluate_calibrate import cli_here

    studies = tmp_path / "studies"
    write(studies / "a.dcm", grey(nih_images[0]), PatientID="P1", AccessionNumber="A1")
    config = tmp_path / "scan.toml"
    config.write_text(f'[scan]\nhl7_to = "ris.example:2575"\n{key} = "{escape_toml(value)}"\n', encoding="utf-8")
    code, err = cli_here("scan", studies, "--out", tmp_path / "out", "--weights", small_bundle, "--device", "cpu",
                         "--config", config)
    assert code == 2 and key in err and says in err, err
    assert not (tmp_path / "out").exists()


def escape_toml(value: str) -> str:
    return "".join(c if c.isprintable() and c not in '"\\' else f"\\u{ord(c):04x}" for c in value)


def test_a_scan_s_oru_never_names_a_patient_from_a_file_changed_since_the_scan(tmp_path, nih_images, small_bundle,
                                                                               caplog):
    """Between a scan and its sending (or a later --resume) the scanned files may change: one
    turned into a FIFO (reading it for the name waited for ever: the scan never ended), one
    rewritten with the same SOP Instance UID for another patient (a merge or correction at the
    PACS: its name went out beside the scanned patient's ID), one without a SOP Instance UID
    replaced by another patient's (an empty UID matched the empty UID). Each ORU goes without a
    name, and the log says why, naming no patient."""
    import os

    from cxr_batch.integration.outbox import send_after_scan

    studies = tmp_path / "studies"
    write(studies / "a.dcm", grey(nih_images[0]), PatientID="P1", AccessionNumber="A1", PatientName="Alpha^Ann")
    b = write(studies / "b.dcm", grey(nih_images[1]), PatientID="P2", AccessionNumber="A2", PatientName="Beta^Bob")
    def without_uid(path):
        ds = pydicom.dcmread(path)
        del ds.SOPInstanceUID
        ds.save_as(path)

    without_uid(write(studies / "c.dcm", grey(nih_images[2]), PatientID="P3", AccessionNumber="A3",
                      PatientName="Gamma^Cy"))
    out = tmp_path / "out"
    with RIS("AA") as ris:
        cfg = ScanConfig(weights=str(small_bundle), device="cpu", progress=False, batch_size=4, workers=0, pdf=False,
                         hl7_to=str(ris.endpoint))
        run_scan(studies, out, cfg)
        (studies / "a.dcm").unlink()
        os.mkfifo(studies / "a.dcm")
        write(b, grey(nih_images[1]), PatientID="P9", AccessionNumber="A2", PatientName="Other^Bea",
              SOPInstanceUID=pydicom.dcmread(b).SOPInstanceUID)
        without_uid(write(studies / "c.dcm", grey(nih_images[3]), PatientID="P8", AccessionNumber="A8",
                          PatientName="Other^Cal"))
        lines = []
        with caplog.at_level("INFO", logger="cxr_batch"):
            sender = threading.Thread(target=lambda: lines.extend(send_after_scan(out, cfg, studies)), daemon=True)
            sender.start()
            sender.join(120)
            hung = sender.is_alive()
            if hung:  # release it: a writer opens the FIFO
                os.close(os.open(studies / "a.dcm", os.O_RDWR))
                sender.join(60)
        assert not hung, "reading the FIFO for the patient's name never ended"
        assert lines == [] and len(ris.received) == 3, lines
    assert not any("Other" in message for message in ris.received)
    said = [r.getMessage() for r in caplog.records if "names no patient" in r.getMessage()]
    assert len(said) == 3 and not any(n in " ".join(said) for n in ("Alpha", "Beta", "Gamma", "Other")), said


def test_a_queued_message_reaches_the_ris_with_its_segments_ended_by_cr(scored, tmp_path):
    """HL7 v2 ends every segment with CR (0x0D), and a RIS reading so sees one segment where
    they end with LF: the file the queue keeps is sent as its bytes, not read as text (Python's
    universal newlines make each CR an LF)."""
    from cxr_batch.integration.outbox import HL7Channel

    records, bundle = scored
    message = oru_r01(records["plain.dcm"], thresholds=bundle.thresholds, created=CREATED)
    path = tmp_path / f"{message_control_id(message)}.hl7"
    path.write_bytes(message.encode("utf-8"))  # as Outbox.entries writes it
    received: list[bytes] = []
    server, thread = _raw_peer([ack(message_control_id(message), "AA").encode()], received)
    with server:
        delivery = HL7Channel(Endpoint("127.0.0.1", server.getsockname()[1]), 5.0).send(path)
        thread.join(10)
    assert delivery.ok, delivery
    assert received == [frame(message)] and b"\n" not in received[0]


@pytest.mark.parametrize("cut", ["at a segment's end", "inside a field", "before the last CR"])
def test_a_queued_message_cut_short_never_reaches_the_ris_and_is_kept_aside(scored, tmp_path, cut):
    """An ORU file cut short (a failed disk or copy) is still an HL7 message: a RIS would take a
    result with findings missing and answer AA."""
    from cxr_batch.integration.outbound import Sender
    from cxr_batch.integration.outbox import HL7Channel
    from cxr_batch.ledger import Ledger, outbound_entry

    records, bundle = scored
    (tmp_path / "hl7").mkdir()
    endpoint = Endpoint("127.0.0.1", free_port())
    queued, paths = [], []
    for k in range(2):
        message = oru_r01(records["plain.dcm"], thresholds=bundle.thresholds, revision=f"study-{k}")
        control = message_control_id(message)
        paths.append(tmp_path / "hl7" / f"{control}.hl7")
        paths[-1].write_bytes(message.encode("utf-8"))
        queued.append((f"uid:{k}", outbound_entry(control, f"hl7/{control}.hl7", "hl7", str(endpoint))))
    whole = paths[1].read_bytes().decode("utf-8")
    cut_short = {"at a segment's end": whole[:whole.index("\rOBX|9|") + 1], "inside a field": whole[:len(whole) * 2 // 3],
                 "before the last CR": whole[:-1]}[cut]
    paths[1].write_bytes(cut_short.encode("utf-8"))
    ledger_path = tmp_path / "ledger.sqlite"
    ledger = Ledger(ledger_path)
    try:
        ledger.queue_outbound(queued)
        with RIS("AA", port=endpoint.port) as ris:
            Sender(ledger_path, tmp_path, HL7Channel(endpoint, 5.0), retry_max=2.0).drain(time.time() + 30)
            received = [message_control_id(m) for m in ris.received]
        assert received == [queued[0][1][0]]
        stats = ledger.outbound_stats(time.time(), "hl7")
        assert stats["delivered"] == 1 and stats["refused"] == 1
        assert any("is cut short or damaged" in r for r in stats["waiting_because"]), stats
    finally:
        ledger.close()
    aside = paths[1].with_name(paths[1].name + ".damaged")
    assert aside.read_bytes().decode("utf-8") == cut_short and not paths[1].exists()


def test_a_wrong_port_that_answers_then_resets_is_still_named(scored):
    # an SMTP or SSH server at --hl7-to greets at once and resets the connection on the HL7 bytes
    # it never reads: the reset threw away what it had said ("connection ... failed:
    # ConnectionResetError" where "not HL7 over MLLP, check the RIS's MLLP port" was meant)
    records, bundle = scored
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)

    def greet_and_reset():
        conn, _ = server.accept()
        conn.sendall(b"220 mail.example.org ESMTP\r\n")
        time.sleep(0.2)  # the HL7 bytes arrive unread: closing now resets the connection
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        conn.close()

    thread = threading.Thread(target=greet_and_reset, daemon=True)
    thread.start()
    with server:
        delivery = send_message(oru_r01(records["plain.dcm"], thresholds=bundle.thresholds),
                                Endpoint("127.0.0.1", server.getsockname()[1]), timeout=10)
        thread.join(10)
    assert delivery.outcome == "retry"
    assert "not HL7 over MLLP" in delivery.reason and "MLLP port" in delivery.reason, delivery.reason


def test_a_queued_message_cut_between_its_last_two_observations_never_reaches_the_ris(scored, tmp_path, caplog):
    """An ORU file cut right after its worklist-order OBX (P(any finding) lost) ends, as a
    message of a bundle without a triage table does, with a whole last observation: it passed
    the whole-message check and the RIS got a shorter result, silently. The queue records the
    message's sha256 when it is written and sends only those bytes."""
    from cxr_batch.integration.outbound import Sender
    from cxr_batch.integration.outbox import HL7Channel, Outbox
    from cxr_batch.ledger import Ledger

    records, bundle = scored
    out, endpoint = tmp_path / "out", Endpoint("127.0.0.1", free_port())
    ledger_path = out / ".cxr-batch" / "ledger.sqlite"
    outbox = Outbox(out, ledger_path, [HL7Channel(endpoint, 5.0)], retry_max=2.0, refused_retry=900.0, bundle=bundle)
    entries = outbox.entries([("uid:plain", "plain.dcm", records["plain.dcm"], ""),
                              ("uid:hostile", "hostile.dcm", records["hostile.dcm"], "")])
    (plain,), (hostile,) = entries["uid:plain"], entries["uid:hostile"]
    path = out / hostile[1]
    whole = path.read_bytes().decode("utf-8")
    segments = whole.split("\r")
    assert segments[-2].startswith("OBX|17|") and segments[-3].startswith("OBX|16|")  # ends with P(any finding)
    cut_short = whole[:whole.index("\rOBX|17|") + 1]
    path.write_bytes(cut_short.encode("utf-8"))
    ledger = Ledger(ledger_path)
    try:
        ledger.queue_outbound([(key, entry) for key, items in entries.items() for entry in items])
        with RIS("AA", port=endpoint.port) as ris:
            Sender(ledger_path, out, HL7Channel(endpoint, 5.0), retry_max=2.0).drain(time.time() + 30)
            received = [message_control_id(m) for m in ris.received]
        assert received == [plain[0]]
        stats = ledger.outbound_stats(time.time(), "hl7")
        assert stats["delivered"] == 1 and stats["refused"] == 1
    finally:
        ledger.close()
    aside = path.with_name(path.name + ".damaged")
    assert aside.read_bytes().decode("utf-8") == cut_short and not path.exists()
    (line,) = [r.getMessage() for r in caplog.records if hostile[0] in r.getMessage()]
    assert "is not the message queued" in line and "kept as" in line, line


def test_every_flag_the_ris_gets_says_what_it_is_worth(tmp_path, nih):
    """A RIS showed 'Pneumothorax 0.089 AA' from the ORU with nothing else, where the PDF and
    the SR of the same study say that flag has sensitivity 0.23 and PPV 0.10 out of fold and
    caught 0 of 10 held-out pneumothoraces. Each flagged finding's OBX is followed by an NTE with
    the SR's line for it (a held-out v3 radiograph, NIH 00013704_000, flags pneumothorax)."""
    from cxr_batch.bundle import DEFAULT_BUNDLE, load_bundle
    from cxr_batch.sr import trust_lines

    studies, out = tmp_path / "studies", tmp_path / "out"
    write(studies / "ptx.dcm", grey(nih / "images" / "00013704_000.png"), PatientAge="047Y", PatientSex="F",
          ViewPosition="PA", PatientID="P13704", AccessionNumber="A13704")
    from cxr_batch.integration.outbox import send_after_scan

    cfg = ScanConfig(device="cpu", progress=False, workers=0, pdf=False, hl7_to=f"127.0.0.1:{free_port()}",
                     send_wait=0.0)
    run_scan(studies, out, cfg)
    send_after_scan(out, cfg)  # writes the ORU; nothing listens there, so it waits in the queue
    (path,) = (out / "hl7").glob("*.hl7")
    order = _parse(path.read_bytes().decode("utf-8")).oru_r01_patient_result.oru_r01_order_observation
    lines = dict(zip(FINDINGS, trust_lines(load_bundle(DEFAULT_BUNDLE))))
    flagged = 0
    for finding, group in zip(FINDINGS, order.oru_r01_observation[1:15]):
        notes = [unescape(n.nte_3.value) for n in group.nte]
        if group.obx.obx_8.value in ("A", "AA"):
            flagged += 1
            assert notes == [lines[finding]]
        else:
            assert notes == []
    assert flagged and order.oru_r01_observation[8].obx.obx_8.value == "AA"  # Pneumothorax, urgent
    assert "flagged 0 of 10 held-out images" in lines["Pneumothorax"]


def test_nothing_the_model_did_not_flag_reads_normal_at_the_ris(scored):
    """OBX-8 'N' is 'Normal' in HL7 v2.5 table 0078: a RIS showed 'Pneumothorax 0.066 N' (normal)
    for a finding merely under its threshold, from a model that caught 0 of 10 held-out
    pneumothoraces, and 'N' beside the priority 'Low probability of any finding: not a normal
    result'. A finding not flagged and the low-probability priority carry no abnormal flag at all
    (table 0078: empty, normal ranges do not apply); flags stay A / AA."""
    records, bundle = scored
    probs = tuple(0.9 if f == "Effusion" else 0.1 for f in FINDINGS)
    for priority, flags in (("normal", (0,) * 14), ("abnormal", tuple(int(f == "Effusion") for f in FINDINGS))):
        record = replace(records["plain.dcm"], scores=Scores(probs, flags, priority, 0.3, 0.3))
        observations = _parse(oru_r01(record, thresholds=bundle.thresholds)) \
            .oru_r01_patient_result.oru_r01_order_observation.oru_r01_observation
        marks = {f: g.obx.obx_8.value for f, g in zip(("priority",) + FINDINGS, observations[:15])}
        assert "N" not in marks.values()
        assert marks.pop("priority") == ("" if priority == "normal" else "A")
        assert marks.pop("Effusion") == ("A" if flags[FINDINGS.index("Effusion")] else "")
        assert set(marks.values()) == {""}


def test_the_ris_names_the_bucket_as_the_sr_and_the_pdf_do(tmp_path, nih):
    """A low-probability study (held-out NIH 00004599_000 under v3) read 'LOW PROBABILITY OF ANY
    FINDING' on its PDF and 'Low probability of any finding: not a normal result' in its SR, but
    'No finding flagged: not a normal result' at the RIS: one study, two names for its bucket."""
    from cxr_batch.integration.outbox import send_after_scan

    studies, out = tmp_path / "studies", tmp_path / "out"
    write(studies / "low.dcm", grey(nih / "images" / "00004599_000.png"), PatientAge="071Y", PatientSex="F",
          ViewPosition="PA", PatientID="P4599", AccessionNumber="A4599")
    cfg = ScanConfig(device="cpu", progress=False, workers=0, pdf=False, dicom_sr=True,
                     hl7_to=f"127.0.0.1:{free_port()}", send_wait=0.0)
    run_scan(studies, out, cfg)
    send_after_scan(out, cfg)
    (row,) = read_results(out / "results.csv")
    assert row["priority"] == "normal"
    (path,) = (out / "hl7").glob("*.hl7")
    priority = _parse(path.read_bytes().decode("utf-8")).oru_r01_patient_result.oru_r01_order_observation \
        .oru_r01_observation[0].obx
    (sr_path,) = (out / "dicom").glob("*.sr.dcm")
    sr_code = pydicom.dcmread(sr_path).ContentSequence[-1].ContentSequence[0].ConceptCodeSequence[0]
    assert sr_code.CodeMeaning == "Low probability of any finding: not a normal result"
    assert priority.obx_5.value == f"NORMAL^{sr_code.CodeMeaning}^99CXRBATCH"


def test_the_ris_gets_each_time_with_its_utc_offset_the_night_the_clock_goes_back(scored, berlin, tmp_path,
                                                                                  nih_images, small_bundle):
    """MSH-7 and OBR-22 were local times without an offset: on the night the clock goes back,
    a corrected result sent at 02:15 (after the change) read as older than the original sent at
    02:30 (before). Each TS now carries the offset in force when the message was made (HL7
    v2.5 TS: YYYYMMDDHHMMSS+ZZZZ), hl7apy's strict validation passes, and a scan's ORUs (built
    by the outbox) carry it too."""
    from tests.conftest import DST_NIGHT_AFTER, DST_NIGHT_BEFORE

    records, bundle = scored
    stamps = []
    for moment, expected in ((DST_NIGHT_BEFORE, "20261025023000+0200"), (DST_NIGHT_AFTER, "20261025021500+0100")):
        berlin(moment)
        m = _parse(oru_r01(records["plain.dcm"], thresholds=bundle.thresholds))
        obr = m.oru_r01_patient_result.oru_r01_order_observation.obr
        assert m.msh.msh_7.value == obr.obr_22.value == expected
        stamps.append(dt.datetime.strptime(expected, "%Y%m%d%H%M%S%z"))
    assert stamps[1] - stamps[0] == dt.timedelta(minutes=45)  # the correction is the later one
    studies = tmp_path / "studies"
    write(studies / "a.dcm", grey(nih_images[0]), PatientID="P1", AccessionNumber="A1")
    (message,) = _scanned_to_ris(studies, tmp_path / "out", small_bundle)
    m = _parse(message)
    assert m.msh.msh_7.value == m.oru_r01_patient_result.oru_r01_order_observation.obr.obr_22.value == (
        "20261025021500+0100")


def test_obr_7_says_the_utc_offset_the_modality_gave_its_study_time(scored, berlin):
    """A modality in New York says its study time is at -0500 (Timezone Offset From UTC): OBR-7
    carried the time alone, which HL7 reads in the sender's zone (Berlin, MSH-7's +0100), six
    hours from when the study was made. It carries the modality's offset; a time without one
    (or an offset that is none) goes as before."""
    from tests.conftest import DST_NIGHT_AFTER

    records, bundle = scored
    record = replace(records["plain.dcm"], ids=replace(records["plain.dcm"].ids, timezone_offset="-0500"))
    berlin(DST_NIGHT_AFTER)
    m = _parse(oru_r01(record, thresholds=bundle.thresholds))
    obr = m.oru_r01_patient_result.oru_r01_order_observation.obr
    assert obr.obr_7.value == record.ids.study_date + "101500-0500"
    assert m.msh.msh_7.value == "20261025021500+0100"
    for offset in ("", "+2500"):
        plain = replace(record, ids=replace(record.ids, timezone_offset=offset))
        obr = _parse(oru_r01(plain, thresholds=bundle.thresholds)).oru_r01_patient_result.oru_r01_order_observation.obr
        assert obr.obr_7.value == record.ids.study_date + "101500"


def _observations(m):
    return [g.obx for g in m.oru_r01_patient_result.oru_r01_order_observation.oru_r01_observation]


def test_every_obx_says_when_the_image_was_acquired_and_when_the_result_was_made(scored, berlin, tmp_path,
                                                                                 nih_images, small_bundle):
    """OBX-14 (Date/Time of the Observation) was empty: a RIS interface engine filing results by
    it had none to file by. HL7 v2.5.1 7.4.2.14: for an observation made on the patient (an
    X-ray image) it is when the observation was performed, the image acquired; OBX-19 (Date/Time
    of the Analysis) is when the result was made. Every OBX carries both, each with a UTC
    offset: the acquisition's own, else the source's Timezone Offset From UTC, else the local
    zone's at that moment (what HL7 reads a time without one as); without an acquisition time,
    the study date/time (OBR-7, the closest approximation); without that, when the result was
    made. A scan's ORU (built from results.csv) reads them from the scanned file's header."""
    from tests.conftest import DST_NIGHT_AFTER

    records, bundle = scored
    berlin(DST_NIGHT_AFTER)
    made = "20261025021500+0100"
    record = records["plain.dcm"]
    assert record.ids.study_date == "20240301"
    cases = (({"acquisition_datetime": "20240301101233", "timezone_offset": "-0500"}, "20240301101233-0500"),
             ({"acquisition_datetime": "20240301101233.123+0900", "timezone_offset": "-0500"}, "20240301101233+0900"),
             ({"acquisition_datetime": "20240301101233"}, "20240301101233+0100"),  # Berlin in March: +0100
             ({"acquisition_datetime": "20240701101233"}, "20240701101233+0200"),  # Berlin in July: +0200
             ({"acquisition_datetime": "not a time", "timezone_offset": "-0500"}, "20240301101500-0500"),
             ({}, "20240301101500+0100"),
             ({"study_time": ""}, made))
    for changes, expected in cases:
        ids = replace(record.ids, **{"acquisition_datetime": "", "timezone_offset": "", **changes})
        m = _parse(oru_r01(replace(record, ids=ids), thresholds=bundle.thresholds))
        assert m.msh.msh_7.value == made
        observations = _observations(m)
        assert len(observations) >= 16
        assert {o.obx_14.value for o in observations} == {expected}, changes
        assert {o.obx_19.value for o in observations} == {made}
    studies = tmp_path / "studies"
    write(studies / "a.dcm", grey(nih_images[0]), PatientID="P1", AccessionNumber="A1", StudyDate="20240301",
          StudyTime="101500", AcquisitionDate="20240301", AcquisitionTime="101233", TimezoneOffsetFromUTC="-0500")
    (message,) = _scanned_to_ris(studies, tmp_path / "out", small_bundle)
    m = _parse(message)
    assert {o.obx_14.value for o in _observations(m)} == {"20240301101233-0500"}
    assert m.oru_r01_patient_result.oru_r01_order_observation.obr.obr_7.value == "20240301101500-0500"


@pytest.mark.parametrize("acquired", ["00010101000000", "99991231235959", "00010101000000+1400"])
def test_an_acquisition_time_at_the_end_of_the_calendar_is_no_obx_14_not_a_lost_result(tmp_path, nih_images,
                                                                                        small_bundle, acquired,
                                                                                        monkeypatch):
    """An acquisition time without an offset is read in the local zone: one at the first or last
    moment of the calendar (a modality's clock reset, a hostile header) is out of the range a
    local time can be converted in (ValueError 'year 0 is out of range', OverflowError west of
    UTC), raised outside what the ORU's maker catches: the scan's sending stopped at it, and the
    study reached no RIS. Such a time is none: OBX-14 falls back to the study date/time."""
    monkeypatch.setenv("TZ", "America/New_York")
    time.tzset()
    try:
        studies = tmp_path / "studies"
        write(studies / "a.dcm", grey(nih_images[0]), PatientID="P1", AccessionNumber="A1", StudyDate="20240301",
              StudyTime="101500", AcquisitionDateTime=acquired)
        (message,) = _scanned_to_ris(studies, tmp_path / "out", small_bundle)
    finally:
        monkeypatch.undo()
        time.tzset()
    m = _parse(message)
    assert {o.obx_14.value for o in _observations(m)} == {"20240301101500-0500"}


def test_an_acquisition_time_after_the_result_was_made_is_not_obx_14(scored, berlin):
    """A modality whose clock is years ahead (or a hostile header) said an image was acquired in
    2099: OBX-14 said so beside an OBX-19 of 2026, the result made 73 years before the image it
    describes, and a RIS filing by OBX-14 filed the study in 2099. No image is acquired after its
    result was made: such a time is none, the study date/time (else when the result was made)
    stands in for it."""
    from tests.conftest import DST_NIGHT_AFTER

    records, bundle = scored
    berlin(DST_NIGHT_AFTER)
    made = "20261025021500+0100"
    record = records["plain.dcm"]
    cases = (({"acquisition_datetime": "20990101120000"}, "20240301101500+0100"),
             ({"acquisition_datetime": "20261025021600+0100"}, "20240301101500+0100"),  # a minute after
             ({"acquisition_datetime": "20261025021500+0100"}, made),  # the same moment
             ({"acquisition_datetime": "20990101120000", "study_date": "20990101"}, made),
             ({"acquisition_datetime": "18000101120000"}, "20240301101500+0100"))  # before X-rays
    for changes, expected in cases:
        ids = replace(record.ids, **{"acquisition_datetime": "", "timezone_offset": "", **changes})
        m = _parse(oru_r01(replace(record, ids=ids), thresholds=bundle.thresholds))
        assert {o.obx_14.value for o in _observations(m)} == {expected}, changes


def test_a_date_in_the_first_millennium_is_left_out_not_the_result(scored):
    """A study or birth date of 00010101 (a modality's clock reset, a hostile header) is a real
    date, but hl7apy writes a year before 1000 without its leading zeros ('10101'): it refused its
    own message (HL7NotMade) and the study reached no RIS. Such a date is left out of OBR-7 and
    PID-7 (OBX-14 then says when the result was made); the rest of the message stands."""
    records, bundle = scored
    record = records["plain.dcm"]
    for changes in ({"study_date": "00010101"}, {"patient_birth_date": "00010101"},
                    {"study_date": "09991231", "study_time": ""}):
        ids = replace(record.ids, **{"acquisition_datetime": "", **changes})
        m = _parse(oru_r01(replace(record, ids=ids), thresholds=bundle.thresholds))
        order = m.oru_r01_patient_result.oru_r01_order_observation
        assert not order.obr.obr_7.value.startswith(("0", "1010", "9991")), changes
        assert not m.oru_r01_patient_result.oru_r01_patient.pid.pid_7.value.startswith(("0", "1010")), changes
        assert len(_observations(m)) >= 16


# a hostile or broken modality's acquisition times (AcquisitionDateTime, else AcquisitionDate +
# AcquisitionTime) and Timezone Offset From UTC, each with the OBX-14 it gives (the study was
# at 20240301 101500, in New York: -0500 that day)
_ACQUIRED = [
    ({"AcquisitionDateTime": ""}, "20240301101500+0100"),
    ({"AcquisitionDateTime": "0000"}, "20240301101500+0100"),
    ({"AcquisitionDateTime": "99999999"}, "20240301101500+0100"),
    ({"AcquisitionDate": "20261301", "AcquisitionTime": "101233"}, "20240301101500+0100"),
    ({"AcquisitionDateTime": "2026"}, "20240301101500+0100"),
    ({"AcquisitionDate": "20240301", "AcquisitionTime": "101233.123456"}, "20240301101233+0100"),
    ({"AcquisitionDate": "20240301", "AcquisitionTime": "24:00"}, "20240301101500+0100"),
    ({"AcquisitionDate": "20240301", "AcquisitionTime": "2400"}, "20240301101500+0100"),
    ({"AcquisitionDateTime": "20240301101233+9999"}, "20240301101233+0100"),
    ({"AcquisitionDateTime": "20240301101233-1500"}, "20240301101233+0100"),
    ({"AcquisitionDateTime": "20240301101233+0560"}, "20240301101233+0100"),
    ({"AcquisitionDateTime": "20240301101233-0330"}, "20240301101233-0330"),  # its own offset wins
    ({"AcquisitionDateTime": "2024\u00b2301101233"}, "20240301101500+0100"),  # a superscript 2
    ({"AcquisitionDateTime": ["20240301101233", "20240302101233"]}, "20240301101500+0100"),
    ({"AcquisitionDateTime": "20240301101233|OBX\rZZZ"}, "20240301101500+0100"),
    ({"AcquisitionDateTime": "21240301101233"}, "20240301101500+0100"),  # years after the study, and now
    ({"AcquisitionDate": "240301", "AcquisitionTime": "101233"}, "20240301101500+0100"),  # a 2-digit year
    ({"AcquisitionDateTime": "20240301101233", "TimezoneOffsetFromUTC": "+9999"}, "20240301101233-0500"),
    ({"AcquisitionDateTime": "20240301101233", "TimezoneOffsetFromUTC": "-1500"}, "20240301101233-0500"),
    ({"AcquisitionDateTime": "20240301101233", "TimezoneOffsetFromUTC": "+0560"}, "20240301101233-0500"),
    # an Arabic-Indic digit (a UTF-8 header's SH), which Python's \d and int() take for a digit
    ({"AcquisitionDateTime": "20240301101233", "TimezoneOffsetFromUTC": "+0\u066100",
      "SpecificCharacterSet": "ISO_IR 192"}, "20240301101233-0500"),
]


def test_every_malformed_acquisition_time_gives_a_valid_obx_14_and_the_whole_message(tmp_path, nih_images,
                                                                                   small_bundle, monkeypatch):
    """A scan of studies whose headers say when they were acquired in every broken way a
    modality or a hostile sender has (empty, a date only, no real date, fractions, 24:00, an
    offset out of range or with 60 minutes, non-ASCII digits, two values, CR and '|', a 2-digit
    year, a time a century ahead): each study's ORU reaches the RIS whole (every finding's OBX),
    passes hl7apy's STRICT validation, and OBX-14 is the acquisition time where the header's is
    one, else the study's; never a lost result or a segment of the header's making."""
    monkeypatch.setenv("TZ", "America/New_York")
    time.tzset()
    try:
        studies = tmp_path / "studies"
        for k, (header, _) in enumerate(_ACQUIRED):
            write(studies / f"{k:02d}.dcm", grey(nih_images[k % len(nih_images)]), PatientID=f"P{k}",
                  AccessionNumber=f"A{k}", StudyDate="20240301", StudyTime="101500",
                  **{"TimezoneOffsetFromUTC": "+0100", **header})
        messages = _scanned_to_ris(studies, tmp_path / "out", small_bundle)
    finally:
        monkeypatch.undo()
        time.tzset()
    seen = {}
    for message in messages:
        assert "ZZZ" not in message and message.count("\rOBX|") >= len(FINDINGS) + 1
        m = _parse(message)
        order = m.oru_r01_patient_result.oru_r01_order_observation
        seen[order.obr.obr_18.value] = {o.obx_14.value for o in _observations(m)}
    assert seen == {f"A{k}": {expected} for k, (_, expected) in enumerate(_ACQUIRED)}


def test_a_time_in_another_script_s_digits_is_none_not_a_lost_result(scored, berlin):
    """Python's \\d (and int()) takes any script's digit: a Timezone Offset From UTC with an
    Arabic-Indic one (a UTF-8 header's SH, '+0\u066000') passed as an offset, went into OBR-7
    as it was, and hl7apy refused the message: the study reached no RIS. An offset, a study
    time and an acquisition time are of ASCII digits, as DICOM writes them; another is none."""
    from tests.conftest import DST_NIGHT_AFTER

    records, bundle = scored
    berlin(DST_NIGHT_AFTER)
    record = records["plain.dcm"]
    arabic_zero = "\u0660"
    for changes, obr_7, obx_14 in (
            ({"timezone_offset": f"+0{arabic_zero}00"}, "20240301101500", "20240301101500+0100"),
            ({"study_time": f"1{arabic_zero}1500"}, "20240301", "20261025021500+0100"),
            ({"acquisition_datetime": f"202403011{arabic_zero}1233"}, "20240301101500", "20240301101500+0100"),
            ({"acquisition_datetime": f"20240301101233+0{arabic_zero}00"}, "20240301101500",
             "20240301101500+0100")):
        ids = replace(record.ids, **{"acquisition_datetime": "", "timezone_offset": "", **changes})
        m = _parse(oru_r01(replace(record, ids=ids), thresholds=bundle.thresholds))
        assert m.oru_r01_patient_result.oru_r01_order_observation.obr.obr_7.value == obr_7, changes
        assert {o.obx_14.value for o in _observations(m)} == {obx_14}, changes

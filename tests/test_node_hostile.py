"""Hostile senders against the DICOM node's listener, on loopback: idle and slow connections on
the plain and the TLS port, associations stalled mid-PDU, PDUs declaring gigabytes, objects over
the size limit, AE titles with control characters. After each, a legitimate modality must get
through; every test is bounded in time (short node timeouts) and skipped without dcmtk where it
uses it. The node runs in this process (tests/test_node.py's ``listener`` fixture)."""

from __future__ import annotations

import logging
import os
import ssl
import time

import numpy as np
import pydicom
import pytest

from cxr_batch.integration.node import ListenConfig, printable

from .dicomgen import have, write
from .dicomwire import (A_ABORT, A_ASSOCIATE_AC, A_ASSOCIATE_RJ, A_ASSOCIATE_RQ, P_DATA_TF, associate, associate_rq,
                        closed_by_peer, command_set, connect, dimse_status, p_data, pdu_header, push, read_pdu)
from .test_node import _self_signed, _send_with_pynetdicom, echo, grey_square, listener  # noqa: F401 (fixture)
from .watchkit import free_port, wait_for

needs_dcmtk = pytest.mark.skipif(not have("echoscu"), reason="dcmtk not installed")
FAST = dict(handshake_timeout=1.0, pdu_timeout=1.0)  # the node's deadlines, short for tests


def rss_bytes() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) << 10 for line in f if line.startswith("VmRSS:"))


def test_deadlines_and_limits_are_configurable_with_sane_defaults():
    cfg = ListenConfig()
    assert 0 < cfg.handshake_timeout <= 30 and 0 < cfg.pdu_timeout <= 60 and cfg.max_pending >= cfg.max_associations
    assert 1 < cfg.max_associations_per_host < cfg.max_associations
    # a 30 MB CR over a 256 kbit/s link (32 KB/s) gets through; a trickle is cut within minutes
    assert 30e6 / 32e3 < cfg.association_timeout and 0 < cfg.min_rate < 32e3 and cfg.min_rate_grace <= 120
    for key in ("handshake_timeout", "pdu_timeout", "max_pending", "max_associations_per_host", "association_timeout",
                "min_rate_grace"):
        with pytest.raises(Exception, match=key):
            ListenConfig(**{key: 0})


@needs_dcmtk
def test_idle_connections_beyond_the_association_limit_lock_no_one_out(listener):
    scp, _, _ = listener(max_associations=2, **FAST)
    # three times the association limit, saying nothing, from three other hosts (one host may
    # have as many connections in their handshake as it may hold associations: two)
    idle = [connect(scp.cfg.port, source=f"127.0.0.{2 + k % 3}") for k in range(6)]
    try:
        time.sleep(0.3)
        answered = echo(scp.cfg.port)  # at once: a connection that never asked holds no association
        assert answered.returncode == 0, answered.stderr
        for sock in idle:  # each dropped at its deadline
            assert closed_by_peer(sock, within=10) is not None
    finally:
        for sock in idle:
            sock.close()
    assert wait_for(lambda: scp.status()["dropped_timeout"] == 6, timeout=10), scp.status()


@pytest.mark.skipif(not have("openssl", "echoscu"), reason="openssl or dcmtk not installed")
def test_an_idle_connection_to_the_tls_port_stops_no_one(listener, tmp_path):
    key, cert = _self_signed(tmp_path, "node")
    scp, _, _ = listener(tls_certificate=str(cert), tls_key=str(key), handshake_timeout=30.0)
    idle = connect(scp.cfg.port)  # plain TCP to the TLS port, nothing sent: no AE title, no certificate
    try:
        time.sleep(0.3)
        start = time.monotonic()
        answered = echo(scp.cfg.port, "CXRBATCH", "ECHOSCU", "+tla", "+cf", str(cert), "-to", "10")
        assert answered.returncode == 0, answered.stderr
        assert time.monotonic() - start < 10  # not after the idle peer's deadline: beside it
    finally:
        idle.close()
    scp2, _, _ = listener(tls_certificate=str(cert), tls_key=str(key), handshake_timeout=1.0)
    idle = connect(scp2.cfg.port)
    try:
        assert closed_by_peer(idle, within=10) is not None  # and it is dropped at its deadline
    finally:
        idle.close()
    assert wait_for(lambda: scp2.status()["dropped_timeout"] == 1, timeout=10)


@pytest.mark.skipif(not have("openssl", "echoscu"), reason="openssl or dcmtk not installed")
def test_a_tls_handshake_dripped_byte_by_byte_is_cut_at_its_deadline(listener, tmp_path):
    key, cert = _self_signed(tmp_path, "node")
    scp, _, _ = listener(tls_certificate=str(cert), tls_key=str(key), handshake_timeout=1.5)
    context = ssl.create_default_context(cafile=str(cert))
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = context.wrap_bio(incoming, outgoing, server_hostname="127.0.0.1")
    with pytest.raises(ssl.SSLWantReadError):
        tls.do_handshake()
    hello = outgoing.read()
    sock = connect(scp.cfg.port)
    start = time.monotonic()
    try:
        for byte in hello:  # one byte every 0.2 s: each read is quick, the handshake never ends
            try:
                sock.sendall(bytes([byte]))
            except OSError:
                break
            time.sleep(0.2)
            if time.monotonic() - start > 10:
                break
        assert time.monotonic() - start < 5  # cut at the deadline, not when the hello was complete
        assert closed_by_peer(sock, within=5) is not None
    finally:
        sock.close()
    assert wait_for(lambda: scp.status()["dropped_timeout"] == 1, timeout=10)


@needs_dcmtk
def test_associations_stalled_mid_pdu_are_dropped_and_counted(listener):
    scp, _, _ = listener(max_associations=3, **FAST)
    stalled = []
    try:
        for _ in range(3):  # every association the node allows
            sock = associate(scp.cfg.port)
            sock.sendall(pdu_header(P_DATA_TF, 1000) + bytes(100))  # promises 1,000 bytes, sends 100
            stalled.append(sock)
        for sock in stalled:
            assert closed_by_peer(sock, within=10) is not None
        answered = echo(scp.cfg.port)
        assert answered.returncode == 0, answered.stderr
    finally:
        for sock in stalled:
            sock.close()
    assert wait_for(lambda: scp.status()["dropped_timeout"] == 3, timeout=10), scp.status()


def test_a_pdu_dripped_byte_by_byte_is_cut_at_its_deadline(listener):
    scp, _, _ = listener(**FAST)
    sock = associate(scp.cfg.port)
    start = time.monotonic()
    try:
        sock.sendall(pdu_header(P_DATA_TF, 200))
        for _ in range(50):  # a byte every 0.1 s: no single read waits long, the PDU never ends
            try:
                sock.sendall(b"\0")
            except OSError:
                break
            time.sleep(0.1)
        assert closed_by_peer(sock, within=5) is not None
        assert time.monotonic() - start < 4
    finally:
        sock.close()
    assert wait_for(lambda: scp.status()["dropped_timeout"] == 1, timeout=10)


def test_an_association_silent_between_pdus_is_dropped_by_the_network_timeout(listener):
    scp, _, _ = listener(network_timeout=1.0, **FAST)
    sock = associate(scp.cfg.port)
    try:
        assert closed_by_peer(sock, within=10) is not None
    finally:
        sock.close()


@pytest.mark.parametrize("established", [True, False], ids=["p-data", "first-pdu"])
def test_a_pdu_declaring_a_gigabyte_is_refused_from_its_header(listener, tmp_path, established):
    scp, spool, stored = listener(**FAST)
    sock = associate(scp.cfg.port) if established else connect(scp.cfg.port)
    before = rss_bytes()
    try:
        sock.sendall(pdu_header(P_DATA_TF if established else A_ASSOCIATE_RQ, 1_200_000_000))
        sent = push(sock, 256 << 20)  # and keeps sending
        assert sent < 64 << 20, f"the node took {sent >> 20} MiB of a PDU it must refuse"
        assert closed_by_peer(sock, within=10) is not None
    finally:
        sock.close()
    assert rss_bytes() - before < 64 << 20
    assert wait_for(lambda: scp.status()["dropped_oversize_pdu"] == 1, timeout=10)
    ds = pydicom.dcmread(write(tmp_path / "x.dcm", grey_square()))
    assert _send_with_pynetdicom(scp.cfg.port, ds) == 0x0000 and len(stored) == 1  # and the node goes on


def test_a_pdu_over_max_pdu_is_refused_and_one_within_it_accepted(listener, tmp_path):
    scp, _, stored = listener(max_pdu=16384, **FAST)
    sock = associate(scp.cfg.port)
    try:
        sock.sendall(pdu_header(P_DATA_TF, 16385))
        assert closed_by_peer(sock, within=10) is not None
    finally:
        sock.close()
    assert scp.status()["dropped_oversize_pdu"] == 1
    big = write(tmp_path / "big.dcm", np.tile(np.arange(256, dtype=np.uint8), (512, 1)))  # 256 KiB: many PDUs
    assert _send_with_pynetdicom(scp.cfg.port, pydicom.dcmread(big)) == 0x0000 and len(stored) == 1


def test_a_first_pdu_that_is_not_an_association_request_is_dropped(listener):
    scp, _, _ = listener(**FAST)
    sock = connect(scp.cfg.port)
    try:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        assert closed_by_peer(sock, within=10) is not None
    finally:
        sock.close()
    assert wait_for(lambda: scp.status()["dropped_protocol"] == 1, timeout=10)


def test_an_object_over_the_size_limit_leaves_nothing_in_the_spool(listener, nih_images, tmp_path):
    from .dicomgen import grey

    scp, spool, stored = listener(scoring={"max_file_bytes": 100_000}, **FAST)
    big = pydicom.dcmread(write(tmp_path / "big.dcm", grey(nih_images[0])))  # 262 KB of pixels
    assert _send_with_pynetdicom(scp.cfg.port, big) is None
    assert wait_for(lambda: scp.status()["aborted_oversize"] == 1, timeout=20)
    assert wait_for(lambda: not list(spool.iterdir()), timeout=10), list(spool.iterdir())  # no partial file left
    assert not stored


def test_a_received_object_streams_to_the_spool_not_memory(listener, tmp_path):
    """64 MB arriving: the node's memory grows by far less than the object (it is written to a
    temp file in the spool as its PDUs arrive), and the spooled file is the object as sent."""
    import subprocess
    import sys

    scp, spool, stored = listener(**FAST)
    pixels = np.random.default_rng(0).integers(0, 4096, (4096, 8192), dtype=np.uint16)  # 64 MiB
    path = write(tmp_path / "huge.dcm", pixels)
    del pixels
    sender = ("import sys, pydicom; from tests.test_node import _send_with_pynetdicom as send; "
              "sys.exit(0 if send(int(sys.argv[1]), pydicom.dcmread(sys.argv[2])) == 0 else 1)")
    peak, before = 0, rss_bytes()
    proc = subprocess.Popen([sys.executable, "-c", sender, str(scp.cfg.port), str(path)],
                            cwd=os.path.dirname(os.path.dirname(__file__)))
    while proc.poll() is None:
        peak = max(peak, rss_bytes() - before)
        time.sleep(0.01)
    assert proc.returncode == 0 and len(stored) == 1
    assert peak < 24 << 20, f"node memory grew by {peak >> 20} MiB for a 64 MiB object"
    got = pydicom.dcmread(stored[0])
    assert got.PixelData == pydicom.dcmread(path).PixelData


def test_calling_ae_titles_with_control_characters_are_logged_escaped_and_counted(listener, caplog):
    scp, _, _ = listener(allow=("MODALITY",), **FAST)
    hostile = [b"EVIL\ncxr-batch:", b"ESC\x1b[2J", b"NUL\x00X"]
    with caplog.at_level(logging.INFO, logger="cxr_batch"):
        for title in hostile:
            sock = connect(scp.cfg.port)
            try:
                sock.sendall(associate_rq(calling=title))
                closed_by_peer(sock, within=10)
            finally:
                sock.close()
        assert wait_for(lambda: scp.status()["rejected_associations"] == 3, timeout=10)
    text = "\n".join(r.getMessage() for r in caplog.records)
    assert text and not any(ch in text for ch in "\x1b\x00") and "\ncxr-batch:" not in text
    assert "EVIL\\ncxr-batch:" in text and "ESC\\x1b[2J" in text
    assert scp.status()["escaped_identifiers"] == 3


def test_printable_escapes_what_could_forge_a_log_line():
    assert printable("A\nB\x1b\x00\\C") == "A\\nB\\x1b\\x00\\\\C"
    assert printable("MODALITY") == "MODALITY" and len(printable("x" * 500, 64)) <= 70


@pytest.mark.parametrize("value", ["", ",", " , "])
def test_an_empty_allow_list_on_the_command_line_is_an_error_not_accept_all(tmp_path, value):
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", "cxr_batch", "listen", "--out", str(tmp_path / "o"), "--allow", value],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "--allow" in done.stderr and "Traceback" not in done.stderr, done.stderr
    assert not (tmp_path / "o").exists()


# ---------------------------------------------------------------------- cxr-batch listen, end to end
def node_rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) << 10 for line in f if line.startswith("VmRSS:"))


@pytest.mark.slow
@pytest.mark.skipif(not have("openssl", "echoscu", "storescu"), reason="openssl or dcmtk not installed")
def test_hostile_senders_then_a_modality_is_scored_within_90_s_on_a_tls_node(tmp_path, nih_images, small_bundle):
    """The issue's check, at the default deadlines: against `cxr-batch listen` with TLS, a PDU
    declaring 1.2 GB, an idle TCP connection to the TLS port, idle connections beyond the
    association limit, then every association one host may hold stalled mid-PDU; a modality's C-ECHO and a
    C-STORE that gets scored succeed within 90 s, and the node's memory grows by < 0.25 GB."""
    import subprocess

    from .dicomgen import grey
    from .dicomwire import tls_client
    from .test_node import listening
    from .watchkit import node_config, rows_now, start_node, status, stop

    key, cert = _self_signed(tmp_path, "node")
    out, log, port = tmp_path / "out", tmp_path / "node.log", free_port()
    config = node_config(tmp_path / "node.toml", tls_certificate=str(cert), tls_key=str(key))
    image = write(tmp_path / "legit.dcm", grey(nih_images[0]), PatientID="LEGIT")
    tls, attackers = tls_client(cert), []
    modality = ["-aet", "MODALITY", "-aec", "CXRBATCH", "+tla", "+cf", str(cert), "127.0.0.1", str(port)]
    node = start_node(out, small_bundle, config, "--port", port, "--no-pdf", log=log)
    try:
        assert wait_for(lambda: listening(log, node.pid) or node.poll() is not None, timeout=180), log.read_text()
        assert subprocess.run(["echoscu", *modality], capture_output=True, timeout=60).returncode == 0
        before = node_rss(node.pid)
        # the attackers on other loopback addresses than the modality's 127.0.0.1 (other hosts, as
        # the node sees them: a host has five handshake places and five association slots)
        big = associate(port, tls=tls, source="127.0.0.2")
        big.sendall(pdu_header(P_DATA_TF, 1_200_000_000))
        assert push(big, 256 << 20) < 64 << 20  # refused from its header
        attackers.append(big)
        # idle: one to the TLS port, twelve beyond the limit, from three hosts
        attackers += [connect(port, source=f"127.0.0.{3 + k % 3}") for k in range(13)]
        for _ in range(10):  # max_associations (10) asked for, each stalled mid-PDU: one host gets 5 of them
            sock = connect(port, tls=tls, source="127.0.0.6")
            attackers.append(sock)
            sock.sendall(associate_rq())
            if read_pdu(sock)[0] == A_ASSOCIATE_AC:
                sock.sendall(pdu_header(P_DATA_TF, 1000) + bytes(100))
        start = time.monotonic()
        assert wait_for(lambda: subprocess.run(["echoscu", *modality], capture_output=True,
                                               timeout=60).returncode == 0, timeout=90)
        assert wait_for(lambda: subprocess.run(["storescu", *modality, str(image)], capture_output=True,
                                               timeout=60).returncode == 0, timeout=90)
        assert wait_for(lambda: [r["patient_id"] for r in rows_now(out) if r["status"] == "ok"] == ["LEGIT"],
                        timeout=90), log.read_text()[-3000:]
        assert time.monotonic() - start < 90
        assert node_rss(node.pid) - before < 250 << 20
        # each attacker dropped at its deadline (10 s idle, 30 s stalled), none closed at once
        assert wait_for(lambda: status(out)["listen"]["dropped_timeout"] == 13 + 5, timeout=60), status(out)
        listen = status(out)["listen"]
        assert listen["dropped_oversize_pdu"] == 1 and listen["dropped_busy"] == 0, listen
    finally:
        for sock in attackers:
            sock.close()
        assert stop(node) == 0, log.read_text()[-3000:]
    text = log.read_text()
    assert "connection from 127.0.0.2" in text and "max_pdu" in text and "pdu_timeout" in text


@pytest.mark.slow
@pytest.mark.skipif(not have("storescu", "storescp"), reason="dcmtk not installed")
def test_a_corrected_image_gets_a_new_sr_uid_superseding_the_first_and_a_resend_none(tmp_path, nih_images,
                                                                                   small_bundle):
    """The same source instance sent again with other pixels: results.csv shows the new result,
    and its SR goes to the PACS under a SOPInstanceUID of its own naming the SR it supersedes
    (a PACS keeping the first copy of a UID would keep the stale result); the same bytes sent
    again add nothing."""
    import subprocess

    from .dicomgen import grey
    from .test_node import listening, store
    from .watchkit import node_config, rows_now, start_node, status, stop

    first = write(tmp_path / "first.dcm", grey(nih_images[0]), PatientID="P-CORRECTED")
    ds = pydicom.dcmread(first)
    ds.PixelData = (255 - ds.pixel_array).tobytes()  # the corrected image: same instance, other pixels
    corrected = tmp_path / "corrected.dcm"
    ds.save_as(corrected)
    pacs_port, pacs_dir = free_port(), tmp_path / "pacs"
    pacs_dir.mkdir()
    pacs = subprocess.Popen(["storescp", "-aet", "PACS", "-od", str(pacs_dir), str(pacs_port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    out, log, port = tmp_path / "out", tmp_path / "node.log", free_port()
    node = start_node(out, small_bundle, node_config(tmp_path / "node.toml"), "--port", port, "--no-pdf",
                      "--send-to", f"PACS@127.0.0.1:{pacs_port}", log=log)
    at_pacs = lambda: sorted(pacs_dir.iterdir())  # noqa: E731
    try:
        assert wait_for(lambda: listening(log, node.pid) or node.poll() is not None, timeout=180), log.read_text()
        assert store(port, [first]).returncode == 0
        assert wait_for(lambda: len(at_pacs()) == 1, timeout=90), log.read_text()[-3000:]
        assert store(port, [corrected]).returncode == 0
        assert wait_for(lambda: len(at_pacs()) == 2, timeout=90), log.read_text()[-3000:]
        assert store(port, [corrected]).returncode == 0  # the same bytes again: a duplicate
        assert wait_for(lambda: status(out).get("outbound", {}).get("queued") == 0)
        time.sleep(3)
        assert len(at_pacs()) == 2
    finally:
        assert stop(node) == 0, log.read_text()[-3000:]
        pacs.terminate()
        pacs.wait(timeout=10)
    srs = sorted((pydicom.dcmread(p) for p in at_pacs()), key=lambda sr: "PredecessorDocumentsSequence" in sr)
    old, new = srs
    assert old.SOPInstanceUID != new.SOPInstanceUID and "PredecessorDocumentsSequence" not in old
    (referenced,) = new.PredecessorDocumentsSequence[0].ReferencedSeriesSequence[0].ReferencedSOPSequence
    assert referenced.ReferencedSOPInstanceUID == old.SOPInstanceUID
    source = lambda sr: sr.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence[0] \
        .ReferencedSOPSequence[0].ReferencedSOPInstanceUID  # noqa: E731
    assert source(old) == source(new) == ds.SOPInstanceUID
    rows = rows_now(out)
    assert len(rows) == 1 and status(out)["superseded"] == 1


@pytest.mark.slow
@pytest.mark.skipif(not have("storescu"), reason="dcmtk not installed")
def test_a_correction_arriving_in_the_same_batch_as_the_image_it_corrects_is_not_dropped(tmp_path, nih_images,
                                                                                        small_bundle):
    """Two associations store one SOPInstanceUID with different content a moment apart, so both
    wait in one batch: the second was dropped as 'duplicate: the same instance was already
    reported' (only the key was compared within a batch, not the content) and its spool file
    deleted, so the stale first image's result stood. The later one is scored after the first,
    as its revision, and nothing is lost."""
    from .dicomgen import grey
    from .test_node import listening, store
    from .watchkit import node_config, rows_now, start_node, status, stop

    first = write(tmp_path / "first.dcm", grey(nih_images[0]), PatientID="P-FIRST")
    ds = pydicom.dcmread(first)
    ds.PatientID = "P-SECOND"
    ds.PixelData = (255 - ds.pixel_array).tobytes()  # the corrected image: same instance, other pixels
    second = tmp_path / "second.dcm"
    ds.save_as(second)
    out, log, port = tmp_path / "out", tmp_path / "node.log", free_port()
    node = start_node(out, small_bundle, node_config(tmp_path / "node.toml", max_wait=5.0), "--port", port,
                      "--no-pdf", log=log)
    try:
        assert wait_for(lambda: listening(log, node.pid) or node.poll() is not None, timeout=180), log.read_text()
        assert store(port, [first]).returncode == 0 and store(port, [second]).returncode == 0  # within max_wait
        assert wait_for(lambda: status(out).get("superseded") == 1, timeout=90), log.read_text()[-3000:]
        assert wait_for(lambda: not list((out / ".cxr-batch" / "spool").glob("*.dcm")), timeout=30)
    finally:
        assert stop(node) == 0, log.read_text()[-3000:]
    rows = rows_now(out)
    assert [(r["patient_id"], r["status"]) for r in rows] == [("P-SECOND", "ok")]
    assert "duplicate" not in log.read_text()


DX_STORAGE = b"1.2.840.10008.5.1.4.1.1.1.1"


@needs_dcmtk
def test_a_c_store_whose_command_cannot_be_decoded_is_aborted_counted_and_leaves_no_file(listener, caplog):
    """A C-STORE-RQ without its Affected SOP Instance UID killed pynetdicom's reader thread (a
    traceback on stderr, no answer to the peer, nothing in status.json) and left its temp file in
    the spool until the next start: one per association, as many as a sender cares to make."""
    scp, spool, stored = listener(**FAST)
    caplog.set_level(logging.WARNING, logger="cxr_batch")
    for _ in range(3):
        sock = connect(scp.cfg.port)
        sock.sendall(associate_rq(abstract=DX_STORAGE))
        assert read_pdu(sock)[0] == A_ASSOCIATE_AC
        command = command_set(AffectedSOPClassUID=DX_STORAGE.decode(), CommandField=0x0001, MessageID=7,
                              Priority=0, CommandDataSetType=0x0000)  # no AffectedSOPInstanceUID
        sock.sendall(p_data(command) + p_data(b"\x10\x00\x20\x00\x02\x00\x00\x00P1", command=False, last=False))
        try:
            assert read_pdu(sock)[0] == A_ABORT  # told at once, not left to its DIMSE timeout
            assert closed_by_peer(sock, within=5) is not None
        finally:
            sock.close()
    assert wait_for(lambda: scp.status()["dropped_protocol"] == 3, timeout=10), scp.status()
    assert wait_for(lambda: not list(spool.iterdir()), timeout=10), list(spool.iterdir())
    assert stored == []
    assert "a DIMSE message that cannot be decoded" in caplog.text
    answered = echo(scp.cfg.port)
    assert answered.returncode == 0, answered.stderr


@pytest.mark.parametrize("command", [None, "echo"], ids=["no-command", "c-echo-with-a-data-set"])
def test_a_data_set_no_c_store_streams_to_disk_is_cut_short_not_held_in_memory(listener, command):
    """Data set fragments with no C-STORE-RQ before them (none at all, or a C-ECHO-RQ saying a
    data set follows) were kept in memory by pynetdicom until max_file_bytes (1 GiB) was
    reached: ten associations could make the node hold 10 GiB."""
    scp, spool, stored = listener(**FAST)
    sock = associate(scp.cfg.port)
    total, sent = 64 << 20, 0
    try:
        if command == "echo":
            sock.sendall(p_data(command_set(AffectedSOPClassUID="1.2.840.10008.1.1", CommandField=0x0030,
                                            MessageID=1, CommandDataSetType=0x0000)))
        fragment = p_data(bytes(16000), command=False, last=False)
        sock.settimeout(5.0)
        try:
            while sent < total:
                sock.sendall(fragment)
                sent += len(fragment)
        except OSError:  # the node closed the connection
            pass
        assert sent < total
        assert closed_by_peer(sock, within=5) is not None
    finally:
        sock.close()
    assert wait_for(lambda: scp.status()["dropped_protocol"] == 1, timeout=10), scp.status()
    assert not stored and not list(spool.iterdir())


@needs_dcmtk
def test_one_host_cannot_take_every_association_slot(listener, caplog):
    """Twenty threads of C-ECHOs from one host held all ten association slots, and a modality's
    echo was rejected ("local limit exceeded") for as long as the flood went on; one host may
    hold max_associations_per_host (half the slots by default), the rest stay for others."""
    scp, _, _ = listener(**FAST)
    caplog.set_level(logging.WARNING, logger="cxr_batch")
    held, answers = [], []
    try:
        for _ in range(scp.cfg.max_associations):  # another host (127.0.0.2) asks for every slot, and sits
            sock = connect(scp.cfg.port, source="127.0.0.2")
            sock.sendall(associate_rq(calling=b"FLOOD"))
            answers.append(read_pdu(sock)[0])
            held.append(sock)
        per_host = scp.cfg.max_associations_per_host
        assert per_host < scp.cfg.max_associations
        assert answers == [A_ASSOCIATE_AC] * per_host + [A_ASSOCIATE_RJ] * (len(answers) - per_host)
        answered = echo(scp.cfg.port)  # the modality, from 127.0.0.1
        assert answered.returncode == 0, answered.stderr
    finally:
        for sock in held:
            sock.close()
    assert f"127.0.0.2 already holds {per_host} associations (max_associations_per_host)" in caplog.text
    assert caplog.text.count("max_associations_per_host") == 1  # a flood is one line, each rejection counted
    assert scp.status()["rejected_associations"] == len(answers) - per_host


def test_a_c_store_on_a_context_for_another_sop_class_is_refused(listener, caplog):
    """A C-STORE-RQ sent on the Verification context (any SOP class, any transfer syntax the
    peer likes, whatever the association negotiated) was stored and answered success."""
    scp, spool, stored = listener(**FAST)
    caplog.set_level(logging.WARNING, logger="cxr_batch")
    sock = associate(scp.cfg.port)  # one presentation context: Verification
    try:
        command = command_set(AffectedSOPClassUID=DX_STORAGE.decode(), CommandField=0x0001, MessageID=3, Priority=0,
                              CommandDataSetType=0x0000, AffectedSOPInstanceUID="1.2.3.4.5.6")
        sock.sendall(p_data(command) + p_data(bytes(1000), command=False))
        pdu_type, body = read_pdu(sock)
        assert pdu_type == P_DATA_TF and dimse_status(body) == 0x0122  # refused: SOP class not supported
    finally:
        sock.close()
    assert stored == [] and wait_for(lambda: not list(spool.iterdir()), timeout=10)
    assert scp.status()["refused"] == 1 and "presentation context" in caplog.text


@pytest.mark.parametrize("interruption", ["a second command", "another presentation context"])
def test_a_data_set_interrupted_by_a_command_or_another_context_is_aborted_and_leaves_no_file(listener,
                                                                                              interruption):
    """A C-STORE's data set cut short by a second C-STORE-RQ: pynetdicom opened a new temp file
    for the second and left the first's, up to max_file_bytes, open in the spool until the next
    start (a sender could fill the disk one association at a time); fragments of one message on
    two presentation contexts were taken as one data set."""
    scp, spool, stored = listener(**FAST)
    sock = connect(scp.cfg.port)
    try:
        sock.sendall(associate_rq(abstract=DX_STORAGE))
        assert read_pdu(sock)[0] == A_ASSOCIATE_AC
        command = command_set(AffectedSOPClassUID=DX_STORAGE.decode(), CommandField=0x0001, MessageID=3, Priority=0,
                              CommandDataSetType=0x0000, AffectedSOPInstanceUID="1.2.3.4.5.7")
        sock.sendall(p_data(command) + p_data(bytes(30000), command=False, last=False))
        if interruption == "a second command":
            sock.sendall(p_data(command) + p_data(bytes(100), command=False))
        else:
            sock.sendall(p_data(bytes(100), context_id=3, command=False))
        assert read_pdu(sock)[0] == A_ABORT
        assert closed_by_peer(sock, within=5) is not None
    finally:
        sock.close()
    assert wait_for(lambda: not list(spool.iterdir()), timeout=10), list(spool.iterdir())
    assert stored == [] and scp.status()["dropped_protocol"] == 1



def test_a_library_exception_without_a_message_is_no_blank_log_line():
    """pynetdicom logs the exception of a PDU it cannot decode on a line of its own
    (LOGGER.exception(exc)); with the traceback hidden (no --debug) an exception without a
    message (a PDV longer than its PDU) made an empty 'cxr-batch: ' line."""
    import io

    from cxr_batch.integration.node import EscapedLibraryLog

    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logging.Formatter("cxr-batch: %(message)s"))
    handler.addFilter(EscapedLibraryLog("pynetdicom"))
    library = logging.getLogger("pynetdicom.dul")
    library.addHandler(handler)
    try:
        try:
            raise ValueError()
        except ValueError as exc:
            library.exception(exc)
    finally:
        library.removeHandler(handler)
    assert stream.getvalue() == "cxr-batch: ValueError\n"


def test_a_complete_c_store_pynetdicom_never_hands_over_leaves_no_file(listener):
    """A C-STORE-RQ without a Message ID, its data set complete: pynetdicom answers nothing and
    never calls the handler, which would take or refuse the object, so its temp file (up to
    max_file_bytes) stayed in the spool after the association ended, until the next start."""
    scp, spool, stored = listener(**FAST)
    sock = connect(scp.cfg.port)
    try:
        sock.sendall(associate_rq(abstract=DX_STORAGE))
        assert read_pdu(sock)[0] == A_ASSOCIATE_AC
        command = command_set(AffectedSOPClassUID=DX_STORAGE.decode(), CommandField=0x0001, Priority=0,
                              CommandDataSetType=0x0000, AffectedSOPInstanceUID="1.2.3.4.5.8")  # no MessageID
        sock.sendall(p_data(command) + p_data(bytes(3000), command=False))
        assert wait_for(lambda: list(spool.iterdir()), timeout=10)  # received whole...
    finally:
        sock.close()
    assert wait_for(lambda: not list(spool.iterdir()), timeout=10), list(spool.iterdir())  # ...gone with its association
    assert stored == []


# ---------------------------------------------------------------------- slow senders, and hosts that flood
ECHO_RQ = dict(AffectedSOPClassUID="1.2.840.10008.1.1", CommandField=0x0030, CommandDataSetType=0x0101)
SLOW = dict(min_rate=1000, min_rate_grace=1.0)  # bytes per second after the first second: short for tests


def _store_rq(uid: str) -> bytes:
    return p_data(command_set(AffectedSOPClassUID=DX_STORAGE.decode(), CommandField=0x0001, MessageID=3, Priority=0,
                              CommandDataSetType=0x0000, AffectedSOPInstanceUID=uid))


def _drip(sock, pdus, every: float, limit: int = 100) -> int:
    """Send ``pdus()`` every ``every`` seconds (each PDU whole: no PDU deadline passes), reading
    what the node answers, until it closes the connection or ``limit`` were sent; how many went."""
    for sent in range(limit):
        try:
            sock.sendall(pdus())
        except OSError:
            return sent
        time.sleep(every)
    return limit


@pytest.mark.parametrize("drip", ["data-set-fragments", "c-echos"])
def test_an_association_kept_open_by_a_trickle_is_dropped_and_leaves_no_file(listener, caplog, drip):
    """Each PDU whole and quick, so pdu_timeout never passes, and the next one before
    network_timeout: a data set sent a few bytes at a time, or a C-ECHO now and then, held an
    association slot for ever, and a few hosts doing it held all of them."""
    scp, spool, stored = listener(**FAST, **SLOW)
    caplog.set_level(logging.WARNING, logger="cxr_batch")
    sock = connect(scp.cfg.port)
    sock.settimeout(5.0)
    try:
        sock.sendall(associate_rq(abstract=DX_STORAGE if drip == "data-set-fragments" else b"1.2.840.10008.1.1"))
        assert read_pdu(sock)[0] == A_ASSOCIATE_AC
        if drip == "data-set-fragments":
            sock.sendall(_store_rq("1.2.3.4.5.9") + p_data(bytes(2000), command=False, last=False))
            assert wait_for(lambda: list(spool.iterdir()), timeout=10)  # the object's temp file, arriving
            sent = _drip(sock, lambda: p_data(bytes(8), command=False, last=False), every=0.1)
        else:
            sent = _drip(sock, lambda: p_data(command_set(MessageID=1, **ECHO_RQ)), every=0.3)
        assert sent < 100, "the trickle went on undisturbed"
        assert closed_by_peer(sock, within=5) is not None
    finally:
        sock.close()
    assert wait_for(lambda: scp.status()["dropped_slow"] == 1, timeout=10), scp.status()
    assert wait_for(lambda: not list(spool.iterdir()), timeout=10), list(spool.iterdir())
    assert stored == [] and "min_rate" in caplog.text and "connection from 127.0.0.1" in caplog.text


def test_an_association_answering_c_echos_for_ever_ends_at_association_timeout(listener, caplog):
    """Fast enough for any rate limit, and never ending: C-ECHO after C-ECHO."""
    scp, _, _ = listener(association_timeout=2.0, **FAST)
    caplog.set_level(logging.WARNING, logger="cxr_batch")
    sock = associate(scp.cfg.port)
    sock.settimeout(5.0)
    end, echoes = time.monotonic() + 20, 0
    try:
        while time.monotonic() < end:
            try:
                sock.sendall(p_data(command_set(MessageID=1, **ECHO_RQ)))  # answered: free again
                pdu_type, body = read_pdu(sock)
            except OSError:
                break
            if pdu_type != P_DATA_TF:
                break
            assert dimse_status(body) == 0x0000
            echoes += 1
        assert time.monotonic() < end and echoes > 10
    finally:
        sock.close()
    assert wait_for(lambda: scp.status()["dropped_slow"] == 1, timeout=10), scp.status()
    assert "association_timeout" in caplog.text


def test_a_slow_sender_above_the_minimum_rate_gets_its_object_stored(listener):
    """A modality on a slow link: 40 KB in 1 KB PDUs over about 4 s, ten times the minimum rate
    and past its grace period, is stored as any other."""
    scp, spool, stored = listener(**FAST, **SLOW)
    sock = connect(scp.cfg.port)
    try:
        sock.sendall(associate_rq(abstract=DX_STORAGE))
        assert read_pdu(sock)[0] == A_ASSOCIATE_AC
        sock.sendall(_store_rq("1.2.3.4.5.10"))
        assert _drip(sock, lambda: p_data(bytes(1000), command=False, last=False), every=0.1, limit=40) == 40
        sock.sendall(p_data(bytes(1000), command=False))
        pdu_type, body = read_pdu(sock)
        assert pdu_type == P_DATA_TF and dimse_status(body) == 0x0000
    finally:
        sock.close()
    assert len(stored) == 1 and stored[0].stat().st_size >= 41_000 and scp.status()["dropped_slow"] == 0


@needs_dcmtk
def test_one_host_cannot_fill_the_pending_handshakes(listener, caplog):
    """One host opening connections that never ask for an association filled all max_pending
    handshake places (the per-host limit applied only to associations): every other host's
    connection was closed at once until the flood's deadlines passed. A host now has as many
    handshake places as association slots; a second host's echo gets through meanwhile."""
    scp, _, _ = listener(max_pending=8, max_associations_per_host=3, handshake_timeout=30.0, pdu_timeout=1.0)
    caplog.set_level(logging.WARNING, logger="cxr_batch")
    flood = [connect(scp.cfg.port, source="127.0.0.2") for _ in range(scp.cfg.max_pending)]
    try:
        closed = [sock for sock in flood if closed_by_peer(sock, within=2.0) is not None]
        assert len(closed) == scp.cfg.max_pending - 3  # past its share: closed at once, not at the deadline
        answered = echo(scp.cfg.port)  # another host, while the flood's own three wait out their deadline
        assert answered.returncode == 0, answered.stderr
    finally:
        for sock in flood:
            sock.close()
    assert scp.status()["dropped_busy"] == scp.cfg.max_pending - 3
    assert caplog.text.count("127.0.0.2 already has 3 connections in their handshake") == 1  # one line a flood


def test_a_peer_address_names_its_host_once_whatever_its_form():
    from cxr_batch.integration.bounded import peer_host

    assert peer_host(("::ffff:127.0.0.1", 5, 0, 0)) == peer_host(("127.0.0.1", 6)) == "127.0.0.1"
    assert peer_host(("0:0:0:0:0:ffff:a01:203", 5, 0, 0)) == "10.1.2.3"
    assert peer_host(("2001:DB8:0:0::1", 5, 0, 0)) == "2001:db8::1" and peer_host(("::1", 5, 0, 0)) == "::1"


@needs_dcmtk
def test_ipv4_and_ipv4_mapped_ipv6_count_as_one_host(listener, caplog):
    """A node listening on "::" sees an IPv4 peer as ::ffff:a.b.c.d: its limits and log lines
    must name the host as an IPv4 listener does (and the same host over IPv6 as one host)."""
    scp, _, _ = listener(host="::", max_associations_per_host=2, allow=("FLOOD", "ECHOSCU"), **FAST)
    caplog.set_level(logging.WARNING, logger="cxr_batch")
    held, answers = [], []
    try:
        for family in ("IPv4", "IPv6", "IPv4"):
            if family == "IPv4":
                sock = connect(scp.cfg.port, source="127.0.0.2")
            else:
                import socket

                sock = socket.create_connection(("::ffff:127.0.0.1", scp.cfg.port), timeout=10,
                                                source_address=("::ffff:127.0.0.2", 0))
            held.append(sock)
            sock.sendall(associate_rq(calling=b"FLOOD"))
            answers.append(read_pdu(sock)[0])
        assert answers == [A_ASSOCIATE_AC, A_ASSOCIATE_AC, A_ASSOCIATE_RJ]
        assert echo(scp.cfg.port).returncode == 0  # 127.0.0.1: another host
        assert echo(scp.cfg.port, "CXRBATCH", "STRANGER").returncode != 0  # rejected by pynetdicom: its address too
    finally:
        for sock in held:
            sock.close()
    assert "at 127.0.0.2:" in caplog.text and "127.0.0.2 already holds 2 associations" in caplog.text
    assert "STRANGER at 127.0.0.1 rejected" in caplog.text and "ffff" not in caplog.text


def test_a_connection_whose_thread_cannot_start_gives_its_host_s_handshake_place_back(listener, monkeypatch, caplog,
                                                                                    capfd):
    """At the thread limit (ulimit -u, memory) a connection's thread fails to start after it was
    counted in its host's handshake places, and was never counted out: per_host such failures
    locked that host (a modality) out of the node until it was restarted. Each is counted and
    logged as a connection closed, not a traceback on stderr."""
    import threading

    scp, _, _ = listener(max_associations_per_host=2, **FAST)
    caplog.set_level(logging.WARNING, logger="cxr_batch")
    start = threading.Thread.start

    def cannot_start(thread):
        raise RuntimeError("can't start new thread")

    monkeypatch.setattr(threading.Thread, "start", cannot_start)
    try:
        for _ in range(3):
            sock = connect(scp.cfg.port, source="127.0.0.2")
            assert closed_by_peer(sock, within=5) is not None
            sock.close()
    finally:
        monkeypatch.setattr(threading.Thread, "start", start)
    sock = associate(scp.cfg.port, source="127.0.0.2")  # the thread limit passed: its host gets through
    sock.close()
    assert scp.status()["dropped_busy"] == 3 and "no thread could be started" in caplog.text
    assert "Traceback" not in capfd.readouterr().err


def test_a_spool_that_cannot_be_written_is_said_as_such_not_as_an_undecodable_message():
    # OUT replaced by a file under the node: each C-STORE's temp file could not be made and the
    # log said "a DIMSE message that cannot be decoded (NotADirectoryError)", counted as the
    # peer's protocol error, where the fault is this side's disk
    import types

    from cxr_batch.integration.bounded import _guarded

    drops = []
    sock = types.SimpleNamespace(drop_undecodable=lambda error: drops.append(("protocol", error)),
                                 drop_unstorable=lambda error: drops.append(("spool", error)))

    def failing(error):
        def receive_primitive(primitive):
            raise error
        return types.SimpleNamespace(message=None, receive_primitive=receive_primitive)

    primitive = types.SimpleNamespace(presentation_data_value_list=[])
    _guarded(failing(NotADirectoryError(20, "Not a directory")), sock)(primitive)
    _guarded(failing(OSError(28, "No space left on device")), sock)(primitive)
    _guarded(failing(KeyError("(0000,1000)")), sock)(primitive)
    assert drops == [("spool", "NotADirectoryError: Not a directory"), ("spool", "OSError: No space left on device"),
                     ("protocol", "KeyError")]


def test_an_object_whose_header_names_another_instance_than_its_c_store_is_refused(listener, nih_images, tmp_path,
                                                                                  monkeypatch):
    """A C-STORE announcing instance Y whose data set is instance X (a hostile sender sending
    another image under a real image's UID, or a broken modality): it was stored under Y, its
    result named X and its SR took the UID derived from X, so the PACS kept whichever of the two
    SRs of X came first and answered the other "duplicate" (counted as delivered): the real
    image could show the other image's result. Refused (0x0117), as a pull refuses it."""
    from pydicom.uid import generate_uid
    from pynetdicom import AE, _config

    from .test_node import grey

    monkeypatch.setattr(_config, "STORE_SEND_CHUNKED_DATASET", True)  # a file sent as it is, its meta's UID announced

    scp, spool, stored = listener()
    ds = pydicom.dcmread(write(tmp_path / "x.dcm", grey(nih_images[0])))
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()  # what the C-STORE announces
    path = tmp_path / "y.dcm"
    ds.save_as(path)
    ae = AE(ae_title="MODALITY")
    ae.add_requested_context(ds.SOPClassUID, ds.file_meta.TransferSyntaxUID)
    assoc = ae.associate("127.0.0.1", scp.cfg.port, ae_title="CXRBATCH")
    try:
        answer = assoc.send_c_store(path)
    finally:
        assoc.release()
    assert int(answer.Status) == 0x0117 and stored == [], stored
    assert not [p for p in spool.iterdir() if not p.name.startswith(".")]
    assert scp.status()["refused"] == 1

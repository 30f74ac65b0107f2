"""The RIS and the DICOMweb archive as hostile or broken peers, and the operator's typos about
them: a STOW-RS answer that redirects elsewhere or never ends, a receiver address that cannot
be right. Each must end in a clear error or a retry, never in a result sent somewhere else, a
process holding unbounded memory, or a scan scored for nothing."""

from __future__ import annotations

import ssl
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from cxr_batch.config import ConfigError
from cxr_batch.integration import dicomweb
from cxr_batch.integration.dicomweb import DicomWebConfig, store_dataset
from cxr_batch.integration.dicom_send import Destination
from cxr_batch.integration.hl7 import MAX_ACK_BYTES, Endpoint, send_message
from tests.dicomgen import have

COMPREHENSIVE_SR = "1.2.840.10008.5.1.4.1.1.88.33"


def _object() -> Dataset:
    """A small DICOM object to store (what it holds does not matter to the archive's answer)."""
    ds = Dataset()
    ds.SOPClassUID, ds.SOPInstanceUID = COMPREHENSIVE_SR, generate_uid()
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.Modality = generate_uid(), generate_uid(), "SR"
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID, ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPClassUID, ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    return ds


class _Peer(BaseHTTPRequestHandler):
    """Answers each POST with the server's ``answer(handler)``; counts the POSTs received."""

    protocol_version = "HTTP/1.1"

    def do_POST(self):
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        self.server.posts += 1
        self.server.answer(self)

    def log_message(self, *args):
        pass


class _Server:
    def __init__(self, answer, tls: tuple[Path, Path] | None = None):
        self.http = ThreadingHTTPServer(("127.0.0.1", 0), _Peer)
        self.http.posts, self.http.answer = 0, answer
        self.scheme = "https" if tls else "http"
        if tls:
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.load_cert_chain(certfile=tls[1], keyfile=tls[0])
            self.http.socket = context.wrap_socket(self.http.socket, server_side=True)
        self.thread = threading.Thread(target=self.http.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    @property
    def url(self) -> str:
        return f"{self.scheme}://127.0.0.1:{self.http.server_address[1]}/dicom-web"

    def __enter__(self) -> "_Server":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.http.shutdown()
        self.http.server_close()
        self.thread.join(10)


def _stored(handler: BaseHTTPRequestHandler) -> None:
    """An archive that stores everything: 200 with a Referenced SOP Sequence naming nothing in
    particular (enough to count as an answer)."""
    body = b"{}"
    handler.send_response(200)
    handler.send_header("Content-Type", "application/dicom+json")
    handler.send_header("Content-Length", str(len(body)))
    handler.end_headers()
    handler.wfile.write(body)


@pytest.mark.parametrize("status", [301, 302, 307, 308])
def test_a_stow_rs_redirected_to_another_host_sends_nothing_there(status):
    """A proxy or a moved archive answering a redirect: requests followed it by default, so a
    307/308 re-posted the result (patient data) to whatever host the Location named, over plain
    http if it said so. A redirect is now a retry that names where it points: the operator
    fixes --stow-to."""
    with _Server(_stored) as elsewhere:
        def redirect(handler):
            handler.send_response(status)
            handler.send_header("Location", elsewhere.url + "/studies")
            handler.send_header("Content-Length", "0")
            handler.end_headers()

        with _Server(redirect) as archive:
            delivery = store_dataset(_object(), DicomWebConfig(url=archive.url, timeout=10))
            assert archive.http.posts == 1
        assert elsewhere.http.posts == 0
    assert delivery.outcome == "retry", delivery
    assert f"redirect (HTTP {status})" in delivery.reason and elsewhere.url in delivery.reason, delivery.reason


def _self_signed(folder: Path, name: str) -> tuple[Path, Path]:
    key, cert = folder / f"{name}.key", folder / f"{name}.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", f"/CN={name}",
                    "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", key, "-out", cert], check=True,
                   capture_output=True, timeout=60)
    return key, cert


@pytest.mark.skipif(not have("openssl"), reason="openssl not installed")
def test_an_archive_whose_certificate_is_not_trusted_gets_nothing_whatever_the_environment(tmp_path, monkeypatch):
    """An https archive with a certificate no trusted CA signed: a retry naming the failed
    verification, the object never posted; an empty REQUESTS_CA_BUNDLE or CURL_CA_BUNDLE does
    not turn verification off. The configuration's ca_bundle is what is trusted, even where the
    environment names another bundle (as corporate machines often do)."""
    archive_tls, other_tls = _self_signed(tmp_path, "archive"), _self_signed(tmp_path, "other")
    with _Server(_stored, tls=archive_tls) as archive:
        for variable in ("REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE"):
            monkeypatch.setenv(variable, "")
            delivery = store_dataset(_object(), DicomWebConfig(url=archive.url, timeout=10))
            assert delivery.outcome == "retry" and "CERTIFICATE_VERIFY_FAILED" in delivery.reason, delivery
            assert "ca_bundle" in delivery.reason
        assert archive.http.posts == 0
        monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(other_tls[1]))
        trusted = DicomWebConfig(url=archive.url, timeout=10, ca_bundle=str(archive_tls[1]))
        assert store_dataset(_object(), trusted).ok
        assert archive.http.posts == 1


@pytest.mark.skipif(not have("openssl"), reason="openssl not installed")
def test_a_ca_bundle_that_holds_no_certificate_is_refused_by_the_configuration(tmp_path):
    """The key named instead of the certificate, or a file of another kind: before, every send
    failed with "[X509: NO_CERTIFICATE_OR_CRL_FOUND]" for as long as the daemon ran."""
    key, cert = _self_signed(tmp_path, "archive")
    (tmp_path / "notes.txt").write_text("the CA is on the share\n")
    for wrong in (key, tmp_path / "notes.txt"):
        with pytest.raises(ConfigError, match="ca_bundle.*no PEM certificate"):
            DicomWebConfig(url="https://pacs.example.org/dicom-web", ca_bundle=str(wrong))
    assert DicomWebConfig(url="https://pacs.example.org/dicom-web", ca_bundle=str(cert)).ca_bundle == str(cert)


@pytest.mark.parametrize("length", ["declared", "chunked"])
def test_a_stow_rs_answer_larger_than_any_real_one_is_not_read_whole(monkeypatch, length):
    """A peer answering a STOW-RS with an endless body: requests read it all into memory before
    dicomweb-client looked at it. Now at most MAX_RESPONSE_BYTES are read, and the delivery is
    a retry saying so."""
    monkeypatch.setattr(dicomweb, "MAX_RESPONSE_BYTES", 64 * 1024)
    chunk = b"[" + b"0," * 32 * 1024

    def endless(handler):
        handler.send_response(200)
        handler.send_header("Content-Type", "application/dicom+json")
        if length == "declared":
            handler.send_header("Content-Length", str(1 << 40))
        else:
            handler.send_header("Transfer-Encoding", "chunked")
        handler.end_headers()
        try:
            for _ in range(200):  # 13 MB at most, so a test that fails ends too
                payload = chunk if length == "declared" else b"%x\r\n%s\r\n" % (len(chunk), chunk)
                handler.wfile.write(payload)
        except OSError:  # the client hung up: what the test wants
            pass
        handler.close_connection = True

    with _Server(endless) as archive:
        delivery = store_dataset(_object(), DicomWebConfig(url=archive.url, timeout=10))
    assert delivery.outcome == "retry" and "larger than" in delivery.reason, delivery


@pytest.mark.parametrize("url, says", [
    ("http://pacs:70000/dicom-web", "port"), ("http://pacs:0/dicom-web", "port"),
    ("http://pacs:port/dicom-web", "port"), ("https://pacs.example.org:-5/dw", "port"),
    ("http://pa cs/dicom-web", "host"), ("http://pacs\x01/dicom-web", "host"),
    ("http://[::1/dicom-web", "IPv6"), ("http://pacs/dicom-web?x=1", "query"),
    ("https://pacs/dicom-web/studies/", "without /studies"),  # posted to .../studies/studies: 404 for ever
])
def test_a_stow_url_that_cannot_be_right_is_refused_by_the_configuration(url, says):
    with pytest.raises(ConfigError, match=says):
        DicomWebConfig(url=url)
    assert DicomWebConfig(url="http://[::1]:8042/dicom-web").url  # IPv6, a port: fine
    assert DicomWebConfig(url="https://pacs-01.example.org/dicom-web/").url


@pytest.mark.parametrize("url", ["http://pacs:70000/dicom-web", "http://pa cs/dicom-web", "http://pacs:port/dw"])
def test_scan_with_a_stow_url_typo_exits_2_before_scoring(tmp_path, url):
    """Before: the scan scored every image and queued its results for a URL no request can
    reach; each send failed, and the queue retried it for ever."""
    (tmp_path / "in").mkdir()
    done = subprocess.run([sys.executable, "-m", "cxr_batch", "scan", str(tmp_path / "in"), "-o",
                           str(tmp_path / "out"), "--stow-to", url], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr
    assert "stow_to" in done.stderr and "Traceback" not in done.stderr
    assert not (tmp_path / "out" / "results.csv").exists()


@pytest.mark.parametrize("text", ["ris:２５７５", "ris:٢٥٧٥", "ris\x1b:2575", "ris,example.org:2575", "ris/x:2575"])
def test_a_receiver_address_with_other_digits_or_odd_characters_is_refused(text):
    """``\\d`` matched any Unicode digit and the host any character but ':', '@' and spaces."""
    with pytest.raises(ValueError):
        Endpoint.parse(text)
    assert Endpoint.parse("ris-01.example.org:2575") == Endpoint("ris-01.example.org", 2575)
    assert Endpoint.parse("ris_host:2575").host == "ris_host"  # underscores are common in hospital names
    for text in ("PACS@pacs:１０４", "PACS@pa\x1bcs:104", "PACS@pacs,x:104", "PACS@pa cs:104"):
        with pytest.raises(ValueError):
            Destination.parse(text)
    assert Destination.parse("PACS@[::1]:104") == Destination("PACS", "::1", 104)


# ------------------------------------------------------------------ a RIS answering a monster ACK
MESSAGE = "MSH|^~\\&|CXRBATCH||||20240101120000||ORU^R01^ORU_R01|0123456789ABCDEF0123|P|2.5\rPID|1||X\r"


@pytest.mark.parametrize("padding", ["ERR|x\r" * 150_000, "NTE|" + "^" * 400_000 + "\r", "NTE|" + "a~" * 300_000 + "\r"])
def test_an_ack_padded_within_the_size_limit_is_read_in_moments(padding):
    """An ACK under MAX_ACK_BYTES made of many segments, components or repetitions took
    hl7apy's parser 70 to 120 s of a core (quadratic): a RIS answering so held the HL7 sender
    and a CPU for minutes per message, at every retry. Only the MSH and the first MSA are
    read now."""
    from tests.ris import ack
    from tests.test_hl7 import _raw_peer

    framed = ack("0123456789ABCDEF0123", "AA").removesuffix("\x1c\r")
    head, msa = framed.rsplit("MSA", 1)
    answer = (head + padding + "MSA" + msa + "\x1c\r").encode()
    assert len(answer) < MAX_ACK_BYTES
    server, thread = _raw_peer([answer])
    with server:
        t0 = time.monotonic()
        delivery = send_message(MESSAGE, Endpoint("127.0.0.1", server.getsockname()[1]), timeout=30)
        elapsed = time.monotonic() - t0
        thread.join(10)
    assert delivery.ok, delivery
    assert elapsed < 10, elapsed


def test_an_ack_is_still_its_first_msa_and_needs_an_msh():
    from tests.test_hl7 import _raw_peer

    control = "0123456789ABCDEF0123"
    for answer, outcome, says in (
            (f"MSA|AA|{control}\r", "retry", "unreadable ACK"),  # no MSH
            ("MSH|^~\\&|RIS||||2024||ACK|1|P|2.5\rERR|x\r", "retry", "unreadable ACK"),  # no MSA
            (f"MSH|^~\\&|RIS||||2024||ACK|1|P|2.5\rMSA|AR|{control}|busy\rMSA|AA|{control}\r", "retry", "busy"),
            (f"MSH|^~\\&|RIS||||2024||ACK|1|P|2.5\rMSA|AA|{control}|{'x' * 5000}\r", "delivered", "AA"),
            (f"MSH|^~\\&|RIS||||2024||ACK|1|P|2.5\rMSA|AA|{'9' * 3000}{control}\r", "retry", "ACK for message"),
            # a RIS newer than hl7apy (v2.9): was "unreadable ACK" and a resend at every back-off
            (f"MSH|^~\\&|RIS||||2024||ACK|1|P|2.9\rMSA|AA|{control}\r", "delivered", "AA"),
            (f"MSH#^~\\&#RIS####2024##ACK#1#P#2.9.1^DEU\rMSA#AR#{control}#wait\r", "retry", "wait"),
            # HL7 v2.7+ MSH-2 has a fifth character, the truncation character '#': a RIS or an
            # engine answering so (a 2.9 ACK, or a 2.5 one from an engine set up for 2.7+) was
            # "unreadable ACK" and the message was sent again at every back-off, for ever
            (f"MSH|^~\\&#|RIS||||2024||ACK|1|P|2.9\rMSA|AA|{control}\r", "delivered", "AA"),
            (f"MSH|^~\\&#|RIS||||2024||ACK|1|P|2.5.1\rMSA|AE|{control}|refused\r", "rejected", "refused"),
            (f"MSH|^~\\&#|RIS||||2024||ACK|1|P|2.7.1\rMSA|CA|{control}\r", "delivered", "CA")):
        server, thread = _raw_peer([b"\x0b" + answer.encode() + b"\x1c\r"])
        with server:
            delivery = send_message(MESSAGE, Endpoint("127.0.0.1", server.getsockname()[1]), timeout=10)
            thread.join(10)
        assert delivery.outcome == outcome and says in delivery.reason, (answer[:80], delivery)


# ------------------------------------------------------------------ a hostile DICOM header in the ORU
from tests.test_hl7 import scored  # noqa: E402,F401  (fixture: real radiographs scored by the small bundle)


def test_control_characters_and_delimiters_in_a_header_stay_inside_their_fields(scored):  # noqa: F811
    """MLLP's own bytes (0x0B, 0x1C), segment breaks (CR, LF) and HL7 delimiters in the patient
    ID, name and accession number from a DICOM header: one message, the same segments as a
    clean one, and hl7apy reads each value back in its own field."""
    from dataclasses import replace

    from hl7apy.consts import VALIDATION_LEVEL
    from hl7apy.parser import parse_message

    from cxr_batch.integration.hl7 import frame, oru_r01, unescape

    records, bundle = scored
    record = records["plain.dcm"]
    hostile = replace(record, ids=replace(record.ids, patient_id="ID\r\x1c\rMSH|^~\\&|EVIL",
                                          patient_name="Doe\nOBX|1|ST\x0b^Jane\x1c\x0d",
                                          accession_number="A1\rPID|1||OTHER&~"))
    clean, message = oru_r01(record, thresholds=bundle.thresholds), oru_r01(hostile, thresholds=bundle.thresholds)
    segments = message.strip("\r").split("\r")
    assert [s[:3] for s in segments] == [s[:3] for s in clean.strip("\r").split("\r")]
    assert not any(c in message for c in "\n\x0b\x1c") and frame(message).count(b"\x1c") == 1
    parsed = parse_message(message, validation_level=VALIDATION_LEVEL.STRICT, find_groups=True)
    result = parsed.oru_r01_patient_result
    def value(field):  # a control character is dropped or made a space: either way inside the field
        return unescape(field.value).replace(" ", "")

    assert value(result.oru_r01_patient.pid.pid_3.cx_1) == "IDMSH|^~\\&|EVIL"
    assert value(result.oru_r01_patient.pid.pid_5.xpn_1) == "DoeOBX|1|ST"
    assert value(result.oru_r01_order_observation.obr.obr_18) == "A1PID|1||OTHER&~"


# ------------------------------------------------------------------ a full disk as the ORUs are written
def test_a_disk_full_while_writing_the_orus_loses_nothing_and_says_how_to_send_them(tmp_path, nih_images,
                                                                                    small_bundle, monkeypatch):
    """The disk fills while a scan's ORUs are written to OUT/hl7 (after scoring, before they
    are queued). Before: an OSError ended `scan` with "error: OUT/hl7/.X.hl7.tmp: No space
    left on device" (exit 1) and no word of what became of the results or how to send them.
    Now the scan says the results were not sent and how to send them; results.csv is whole,
    no temp file is left, and the same scan with --resume later sends each study once."""
    import errno

    from cxr_batch.integration import outbox
    from cxr_batch.integration.outbox import send_after_scan
    from cxr_batch.scan import ScanConfig, run_scan
    from tests.dicomgen import grey, write
    from tests.ris import RIS

    studies = tmp_path / "studies"
    for k, image in enumerate(nih_images[:3]):
        write(studies / f"{k}.dcm", grey(image), PatientID=f"P{k}", AccessionNumber=f"A{k}")
    out = tmp_path / "out"
    written = []
    real_write = outbox.atomic_write_bytes

    def filling(path, data, *args, **kwargs):
        if written:
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        written.append(path)
        return real_write(path, data, *args, **kwargs)

    with RIS("AA") as ris:
        cfg = ScanConfig(weights=str(small_bundle), device="cpu", progress=False, batch_size=4, workers=0, pdf=False,
                         hl7_to=str(ris.endpoint), send_wait=10)
        run_scan(studies, out, cfg)
        monkeypatch.setattr(outbox, "atomic_write_bytes", filling)
        said = send_after_scan(out, cfg)
        assert ris.received == []
        assert len(said) == 1 and "No space left on device" in said[0] and "--resume" in said[0], said
        assert not list((out / "hl7").glob(".*.tmp"))
        monkeypatch.setattr(outbox, "atomic_write_bytes", real_write)  # space again
        assert send_after_scan(out, cfg) == []
        ids = sorted(next(s for s in m.splitlines() if s.startswith("PID|")).split("|")[3] for m in ris.received)
    assert ids == ["P0", "P1", "P2"]


@pytest.mark.parametrize("status", [300, 302, 304, 399, 600])
def test_an_answer_that_is_neither_success_nor_error_is_not_taken_for_stored(status):
    """requests raises only for 4xx and 5xx: a 3xx without a Location (or a status past 599)
    with no body was read as "200 without a body", i.e. delivered, and the result left the
    queue though nothing was stored."""
    def answer(handler):
        handler.send_response(status)
        handler.send_header("Content-Length", "0")
        handler.end_headers()

    with _Server(answer) as archive:
        delivery = store_dataset(_object(), DicomWebConfig(url=archive.url, timeout=10))
    assert delivery.outcome == "retry" and f"HTTP {status}" in delivery.reason, delivery


def test_a_stow_rs_answer_dripped_byte_by_byte_ends_within_the_timeout():
    """Each read of the body waited up to the timeout, but a peer sending one byte a little
    more often held the sender for as long as it liked (here 12 s; for ever, for a hostile
    one). The answer's body now has the timeout in all."""
    def drip(handler):
        handler.send_response(200)
        handler.send_header("Content-Type", "application/dicom+json")
        handler.send_header("Transfer-Encoding", "chunked")
        handler.end_headers()
        try:
            for _ in range(60):
                handler.wfile.write(b"1\r\n \r\n")
                handler.wfile.flush()
                time.sleep(0.2)
        except OSError:
            pass
        handler.close_connection = True

    with _Server(drip) as archive:
        t0 = time.monotonic()
        delivery = store_dataset(_object(), DicomWebConfig(url=archive.url, timeout=1.5))
        elapsed = time.monotonic() - t0
    assert delivery.outcome == "retry" and "within 1.5 s" in delivery.reason, delivery
    assert elapsed < 6, elapsed


# ------------------------------------------------------------------ a scan's queue gone corrupt
def test_a_corrupt_scan_queue_says_how_to_queue_the_results_again(tmp_path, nih_images, small_bundle):
    """OUT/.cxr-batch/outbound.sqlite damaged (a disk fault, a copy cut short): `scan --resume
    --hl7-to` said "unexpected LedgerError ... (run with --debug)", as for a bug, and both it and
    `outbound list` told the operator that "the daemon rebuilds one", though a scan has none.
    Now both say it plainly (exit 1) with what to do; doing it sends the results."""
    from tests.dicomgen import grey, write
    from tests.ris import RIS
    from tests.watchkit import free_port

    studies = tmp_path / "studies"
    write(studies / "0.dcm", grey(nih_images[0]), PatientID="P0", AccessionNumber="A0")
    out, port, config = tmp_path / "out", free_port(), tmp_path / "scan.toml"
    config.write_text("[scan]\nsend_wait = 0\n")

    def cli(*args):
        return subprocess.run([sys.executable, "-m", "cxr_batch", *map(str, args)], capture_output=True, text=True,
                              timeout=300)

    scan = ["scan", studies, "-o", out, "--weights", small_bundle, "--device", "cpu", "--precision", "fp32",
            "--workers", "0", "--no-pdf", "--config", config, "--hl7-to", f"127.0.0.1:{port}"]
    first = cli(*scan)
    assert first.returncode == 3 and "outbound send" in first.stderr, first.stderr[-2000:]  # the RIS is down
    queue = out / ".cxr-batch" / "outbound.sqlite"
    queue.write_bytes(b"SQLite format 3\x00" + b"\xff" * 4000)
    with RIS("AA", port=port) as ris:
        done, listed = cli(*scan, "--resume"), cli("outbound", "list", "-o", out)
        for said in (done, listed):
            assert said.returncode == 1, said.stderr[-2000:]
            assert "unexpected" not in said.stderr and "daemon" not in said.stderr, said.stderr[-2000:]
            assert "move it aside" in said.stderr and "--resume" in said.stderr, said.stderr[-2000:]
        assert ris.received == []
        queue.rename(queue.with_suffix(".damaged"))  # what the message says
        again = cli(*scan, "--resume")  # queued again (send_wait = 0 here: sent by `outbound send`)
        assert again.returncode == 3 and "1 result(s) queued" in again.stderr, again.stderr[-2000:]
        sent = cli("outbound", "send", "-o", out, "--wait", "30")
        assert sent.returncode == 0, sent.stderr[-2000:]
        assert len(ris.received) == 1


def test_an_ack_arriving_in_small_pieces_is_looked_at_once_per_byte():
    """The MLLP reader searched the whole buffer for the block's end at every piece: 1 MiB
    sent 50 bytes at a time cost 15 s of CPU per message (at every retry, on the cores that
    score). The block is still the first 0x0B ... 0x1C 0x0D, its end found across pieces."""
    from cxr_batch.integration.hl7 import MllpReader

    framed = b"\x1c\x0d junk \x0b" + b"MSH|x\rMSA|AA|1\r" + b"\x1c\x0d\x0bnext\x1c\x0d"
    for size in (1, 2, 3, 7, len(framed)):
        reader, block = MllpReader(), None
        for k in range(0, len(framed), size):
            block = reader.add(framed[k:k + size])
            if block is not None:
                break
        assert block == b"MSH|x\rMSA|AA|1\r", (size, block)
    reader, t0 = MllpReader(), time.process_time()
    assert reader.add(b"\x0b") is None
    for _ in range(20_000):  # 1 MB, 50 bytes at a time
        assert reader.add(b"x" * 49 + b"\x1c") is None
    assert time.process_time() - t0 < 3  # 15 s before


@pytest.mark.parametrize("shape", ["streams", "drips"])
def test_an_mllp_block_that_never_ends_is_cut_by_size_or_time(shape):
    """A RIS opening a block (0x0B) and never closing it (no 0x1C 0x0D): streaming, it is cut
    once MAX_ACK_BYTES arrived; dripping a byte at a time, at the timeout. Either way a retry
    that says which, and the sender holds no more than MAX_ACK_BYTES."""
    from tests.test_hl7 import _raw_peer

    if shape == "streams":
        chunks = [b"\x0bMSH|"] + [b"x" * 65536] * (MAX_ACK_BYTES // 65536 + 4)
    else:
        chunks = [b"\x0bMSH|"] + [b"x"] * 4000  # ~1 ms apart: 4 s at least
    server, thread = _raw_peer(chunks)
    with server:
        t0 = time.monotonic()
        delivery = send_message(MESSAGE, Endpoint("127.0.0.1", server.getsockname()[1]), timeout=1.5)
        elapsed = time.monotonic() - t0
        thread.join(15)
    says = "without an MLLP block" if shape == "streams" else "no ACK from"
    assert delivery.outcome == "retry" and says in delivery.reason, delivery
    assert elapsed < 5, elapsed


def test_an_oru_half_written_when_a_scan_was_killed_is_removed_by_the_next(tmp_path, nih_images, small_bundle):
    """A scan killed while it wrote OUT/hl7/<MSH-10>.hl7 left its temp file (an ORU cut short,
    a patient ID in it) for good: the next scan cleaned reports/ and dicom/ but not hl7/."""
    from cxr_batch.scan import ScanConfig, run_scan
    from tests.dicomgen import grey, write

    studies = tmp_path / "studies"
    write(studies / "0.dcm", grey(nih_images[0]), PatientID="P0", AccessionNumber="A0")
    out = tmp_path / "out"
    cfg = ScanConfig(weights=str(small_bundle), device="cpu", progress=False, workers=0, pdf=False)
    run_scan(studies, out, cfg)
    (out / "hl7").mkdir()
    stale = out / "hl7" / ".0123456789ABCDEF0123.hl7.x1y2z3.tmp"
    stale.write_text("MSH|^~\\&|CXRBATCH|||||||ORU^R01^ORU_R01|0123456789ABCDEF0123|P|2.5\rPID|1||P0")
    run_scan(studies, out, cfg, "resume")
    assert not stale.exists()


@pytest.mark.parametrize("host", ["ris..example.org", ".ris", "r" * 64 + ".example.org"])
def test_a_ris_host_name_with_an_empty_or_overlong_label_is_refused_and_never_blamed_on_the_file(tmp_path, host):
    """``--hl7-to ris..example.org:2575`` (a doubled dot) was taken; every ORU then failed in
    Python's IDNA codec (UnicodeError, not an OSError), which the queue reported as "object file
    hl7/X.hl7 cannot be read: UnicodeError" and refused for 900 s each: the operator was sent to
    a file that was whole. The address is refused before any work, as a port out of range is;
    one already queued (by a release that took it) is a retry naming the host, the file kept."""
    from cxr_batch.integration.outbound import Sender
    from cxr_batch.integration.outbox import HL7Channel
    from cxr_batch.ledger import Ledger, outbound_entry

    from .test_outbound import LAST_OBX

    with pytest.raises(ValueError, match="label"):
        Endpoint.parse(f"{host}:2575")
    with pytest.raises(ValueError, match="label"):
        Destination.parse(f"PACS@{host}:104")
    assert Endpoint.parse("r" * 63 + ".example.org:2575").port == 2575  # 63 is DNS's longest label
    (tmp_path / "in").mkdir()
    done = subprocess.run([sys.executable, "-m", "cxr_batch", "scan", str(tmp_path / "in"), "-o",
                           str(tmp_path / "out"), "--hl7-to", f"{host}:2575"], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 2 and "hl7_to" in done.stderr and "Traceback" not in done.stderr, done.stderr

    out = tmp_path / "queued"
    (out / "hl7").mkdir(parents=True)
    (out / "hl7" / "CTRL1.hl7").write_text("MSH|^~\\&|CXRBATCH||||20240101120000||ORU^R01^ORU_R01|CTRL1|P|2.5\r"
                                          "PID|1||P001\r" + LAST_OBX)
    ledger = Ledger(out / ".cxr-batch" / "ledger.sqlite")
    where = Endpoint(host, 2575)  # as a queue of an earlier release recorded it
    ledger.queue_outbound([("k", outbound_entry("CTRL1", "hl7/CTRL1.hl7", "hl7", str(where)))])
    sender = Sender(ledger.path, out, HL7Channel(where, 2.0), retry_max=30.0)
    sender.send_due(ledger, until=time.time())
    assert "cannot be read" not in sender.last_error and "not a valid host name" in sender.last_error, \
        sender.last_error
    stats = ledger.outbound_stats(time.time(), "hl7")
    assert stats["queued"] == 1 and stats["refused"] == 0 and (out / "hl7" / "CTRL1.hl7").is_file()
    ledger.close()


@pytest.mark.parametrize("host", ["[::1]", "[::ffff:127.0.0.1]", "127.0.0.1", "localhost", "LOCALHOST.",
                                  "ris.example.org.", "RIS.Example.ORG", "xn--mller-kva.de", "ris_1.local",
                                  ("r" * 63 + ".") * 3 + "r" * 61, ("r" * 63 + ".") * 3 + "r" * 61 + "."])
def test_a_receiver_host_a_connection_can_be_made_to_is_taken(host):
    """The host check refuses only what Python's IDNA codec refuses at every connection: an IPv6
    literal, an IPv4 address, a name in capitals, with a trailing dot (fully qualified) or in
    its internationalised (xn--) form are taken. DNS's 253 characters are the name's without the
    trailing dot: a 253-character name written fully qualified (254 with its dot) was refused as
    'a label between dots is empty or over 63 characters', which none was."""
    assert Endpoint.parse(f"{host}:2575").host == host.strip("[]")
    assert Destination.parse(f"PACS@{host}:104").host == host.strip("[]")
    host.strip("[]").encode("idna")  # what a connection does with it


def test_a_receiver_host_name_over_253_characters_is_refused_saying_so():
    """A name longer than DNS's 253 characters (its trailing dot aside) is refused for its
    length, not for a label it does not have."""
    host = ("r" * 63 + ".") * 4
    with pytest.raises(ValueError, match="253"):
        Endpoint.parse(f"{host}:2575")

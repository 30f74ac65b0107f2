"""C-STORE of SR objects on loopback: dcmtk's storescp as the PACS (skipped without it), a
pynetdicom SCP for refusals, a closed port and a silent peer for the failures a PACS link has."""

from __future__ import annotations

import socket
import subprocess
import threading
import time
import warnings

import pydicom
import pytest

from cxr_batch.bundle import load_bundle
from cxr_batch.dicom import identifiers
from cxr_batch.integration.dicom_send import Destination, send_dataset
from cxr_batch.record import Scores, StudyRecord
from cxr_batch.sr import build_sr
from tests.dicomgen import grey, have, write
from tests.orthanc import make_orthanc  # noqa: F401


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_listening(port: int, seconds: float = 10.0) -> None:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listens on {port}")


@pytest.fixture(scope="module")
def sr(tmp_path_factory, nih_images, small_bundle):
    """The SR of a real NIH image as a DICOM, with a UTF-8 patient name."""
    path = write(tmp_path_factory.mktemp("src") / "a.dcm", grey(nih_images[0]), PatientName="Ödön^Kovács",
                 SpecificCharacterSet="ISO_IR 192")
    bundle = load_bundle(small_bundle)
    record = StudyRecord(file="a.dcm", ids=identifiers(pydicom.dcmread(path)), model=bundle.label,
                         weights_sha256=bundle.sha256, scores=Scores((0.7,) * 14, (1,) * 14, "urgent", 0.4))
    return build_sr(record, bundle)


@pytest.fixture()
def storescp(tmp_path):
    """dcmtk's storescp as the PACS, AE title PACS, storing into tmp_path/pacs."""
    if not have("storescp"):
        pytest.skip("dcmtk storescp not installed")
    port, folder = free_port(), tmp_path / "pacs"
    folder.mkdir()
    proc = subprocess.Popen(["storescp", "-aet", "PACS", "-od", str(folder), str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_listening(port)
        yield Destination("PACS", "127.0.0.1", port), folder
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_storescp_receives_the_sr_intact(sr, storescp):
    destination, folder = storescp
    result = send_dataset(sr, destination, timeout=10)
    assert result.ok and result.status == 0x0000 and result.reason == ""
    (stored,) = folder.iterdir()
    got = pydicom.dcmread(stored)
    assert got.SOPInstanceUID == sr.SOPInstanceUID and got.SOPClassUID == sr.SOPClassUID
    assert str(got.PatientName) == "Ödön^Kovács"
    assert got.ContentSequence == sr.ContentSequence
    # the same object again (a re-send after a crash) is the same instance, not a new one
    assert send_dataset(stored, destination, timeout=10).ok
    assert [p.name for p in folder.iterdir()] == [stored.name]


def test_closed_port_fails_quickly_and_is_worth_retrying(sr):
    start = time.monotonic()
    result = send_dataset(sr, Destination("PACS", "127.0.0.1", free_port()), timeout=5)
    assert not result.ok and result.transient and result.status is None
    assert "no association" in result.reason and time.monotonic() - start < 5


def test_a_host_name_nothing_resolves_is_said_as_such(sr):
    # docs/node.toml's placeholder send_to (PACS@pacs.example.org:104) logged "cannot connect:
    # gaierror: [Errno -2] Name or service not known" at every back-off
    result = send_dataset(sr, Destination("PACS", "no-such-host.invalid", 104), timeout=5)
    assert not result.ok and result.transient
    assert "host 'no-such-host.invalid' not found" in result.reason and "gaierror" not in result.reason, result.reason


def test_a_peer_that_is_down_is_said_once_by_us_not_by_pynetdicom_too(sr, caplog):
    # a node sending to a PACS that is down logged, at every back-off, pynetdicom's "Association
    # request failed" and "TCP Initialisation Error" above its own "not sent ... no association"
    import logging

    library = logging.getLogger("pynetdicom")
    level = library.level
    library.setLevel(logging.WARNING)  # as the commands set it without --debug
    try:
        with caplog.at_level(logging.INFO):
            result = send_dataset(sr, Destination("PACS", "127.0.0.1", free_port()), timeout=5)
    finally:
        library.setLevel(level)
    assert not result.ok and "no association" in result.reason
    assert not [r.getMessage() for r in caplog.records if r.name.startswith("pynetdicom")]


def test_silent_peer_costs_the_timeout_not_a_hang(sr):
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    try:  # accepts the TCP connection, never answers the association request
        start = time.monotonic()
        result = send_dataset(sr, Destination("PACS", "127.0.0.1", server.getsockname()[1]), timeout=1.5)
        assert not result.ok and result.transient
        assert time.monotonic() - start < 10
    finally:
        server.close()


@pytest.fixture()
def refusing_scp():
    """A pynetdicom SCP (AE title PACS, called title checked) answering C-STORE with a set status."""
    from pynetdicom import AE, AllStoragePresentationContexts, evt

    answer = {"status": 0xA700}
    ae = AE(ae_title="PACS")
    ae.require_called_aet = True
    ae.supported_contexts = AllStoragePresentationContexts
    port = free_port()
    server = ae.start_server(("127.0.0.1", port), block=False,
                             evt_handlers=[(evt.EVT_C_STORE, lambda event: answer["status"])])
    try:
        yield port, answer
    finally:
        server.shutdown()


def test_refusals_say_whether_to_retry(sr, refusing_scp):
    port, answer = refusing_scp
    busy = send_dataset(sr, Destination("PACS", "127.0.0.1", port), timeout=10)
    assert not busy.ok and busy.status == 0xA700 and busy.transient  # out of resources: later
    answer["status"] = 0xC000
    refused = send_dataset(sr, Destination("PACS", "127.0.0.1", port), timeout=10)
    assert not refused.ok and refused.status == 0xC000 and not refused.transient  # cannot understand: final
    answer["status"] = 0xB000
    assert send_dataset(sr, Destination("PACS", "127.0.0.1", port), timeout=10).ok  # coerced, but stored
    wrong_ae = send_dataset(sr, Destination("NOTPACS", "127.0.0.1", port), timeout=10)
    assert not wrong_ae.ok and "rejected" in wrong_ae.reason and not wrong_ae.transient


def test_destination_parsing():
    assert Destination.parse("PACS@pacs.example.org:104") == Destination("PACS", "pacs.example.org", 104)
    assert Destination.parse("ORTHANC@[::1]:4242") == Destination("ORTHANC", "::1", 4242)
    assert str(Destination.parse("ORTHANC@[::1]:4242")) == "ORTHANC@[::1]:4242"
    for bad in ("PACS@host", "pacs.example.org:104", "A" * 17 + "@h:104", "PACS@h:0", "PACS@h:70000", "P\\X@h:1",
                "@h:104"):
        with pytest.raises(ValueError):
            Destination.parse(bad)


def test_no_thread_is_left_behind(sr):
    before = threading.active_count()
    send_dataset(sr, Destination("PACS", "127.0.0.1", free_port()), timeout=2)
    time.sleep(0.5)
    assert threading.active_count() <= before


def test_peer_that_does_not_store_srs_is_a_final_failure(sr):
    from pynetdicom import AE
    from pynetdicom.sop_class import CTImageStorage

    ae = AE(ae_title="PACS")
    ae.add_supported_context(CTImageStorage)
    port = free_port()
    server = ae.start_server(("127.0.0.1", port), block=False)
    try:
        result = send_dataset(sr, Destination("PACS", "127.0.0.1", port), timeout=10)
    finally:
        server.shutdown()
    assert not result.ok and not result.transient and "no presentation context accepted" in result.reason
    # which kind of object the PACS does not take: older PACSs store Comprehensive SR but not
    # Comprehensive 3D SR, and the PACS's administrator needs the SOP class to say so
    assert "Comprehensive 3D SR Storage (1.2.840.10008.5.1.4.1.1.88.34)" in result.reason, result.reason


@pytest.mark.parametrize("status, outcome, says", [
    (0xB000, "delivered", ""), (0xB006, "delivered", ""), (0xB007, "delivered", ""),
    # PS3.7 C.1: every 0xBxxx (and 0x0001) is a warning, the object stored: a PACS's own
    # warning code was a refusal, the SR sent again every refused_retry for ever
    (0xB00A, "delivered", ""), (0x0001, "delivered", ""),
    # the SR's UID is derived from source and model: a PACS that refuses a second copy holds this one
    (0x0111, "delivered", "already stored"),
    (0xA700, "retry", "0xA700"), (0xA7FF, "retry", "0xA7FF"),
    (0x0213, "retry", "0x0213"),  # resource limitation (PS3.7 C.5): later, as out of resources
    (0x0110, "retry", "0x0110"),  # processing failure: as a STOW-RS failure reason 0x0110
    (0xA900, "rejected", "0xA900"), (0xC000, "rejected", "0xC000"), (0x0122, "rejected", "0x0122"),
])
def test_each_c_store_status_decides_what_the_queue_does(sr, refusing_scp, tmp_path, status, outcome, says):
    from cxr_batch.integration.outbound import DicomChannel

    port, answer = refusing_scp
    answer["status"] = status
    path = tmp_path / "sr.dcm"
    sr.save_as(path, enforce_file_format=True)
    delivery = DicomChannel(Destination("PACS", "127.0.0.1", port), timeout=10).send(path)
    assert delivery.outcome == outcome and says in delivery.reason, delivery


def test_the_pacs_s_error_comment_is_kept_with_the_status(sr, refusing_scp, tmp_path):
    """dcm4chee and others say why in the response's Error Comment (0000,0902): 'Patient ID
    mismatch' tells the PACS's administrator what 0xA900 alone does not. It is kept in the
    reason, escaped and bounded as a receiver's words are."""
    from pydicom.dataset import Dataset

    from cxr_batch.integration.outbound import DicomChannel

    port, answer = refusing_scp
    status = Dataset()
    status.Status, status.ErrorComment = 0xA900, "Patient ID mismatch\x1b[2J"
    answer["status"] = status
    path = tmp_path / "sr.dcm"
    sr.save_as(path, enforce_file_format=True)
    with warnings.catch_warnings(record=True) as seen:  # pydicom's warning would reach the user's stderr
        warnings.simplefilter("always")
        delivery = DicomChannel(Destination("PACS", "127.0.0.1", port), timeout=10).send(path)
    assert not [w for w in seen if "escape sequence" in str(w.message)]
    assert delivery.outcome == "rejected" and "0xA900" in delivery.reason, delivery
    assert "Patient ID mismatch" in delivery.reason and "\x1b" not in delivery.reason, delivery
    assert "0xA900" in delivery.logged and "mismatch" not in delivery.logged  # what the log says


def test_a_pacs_that_does_not_know_our_ae_title_is_said_as_such(sr, make_orthanc):
    # Orthanc (DicomAlwaysAllowStore false, our AE title not in its DicomModalities) accepts the
    # association, then aborts it on our C-STORE: the queue said only "no C-STORE response", and
    # an operator looked for a PACS that was down while it was its configuration that lacked us
    pacs = make_orthanc(dicomweb=False, extra={"DicomAlwaysAllowStore": False})
    result = send_dataset(sr, Destination(pacs.aet, "127.0.0.1", pacs.dicom_port), calling_ae="CXRNODE", timeout=10)
    assert not result.ok and result.transient and result.status is None
    assert "aborted the association" in result.reason and "'CXRNODE'" in result.reason, result.reason
    assert "DicomModalities" in result.reason and pacs.sop_instance_uids() == []


def test_the_readme_s_storescu_commands_send_the_srs_and_pdfs_of_a_results_folder(sr, storescp, tmp_path):
    # README's `storescu -aec PACS pacs.example.org 104 +sd RESULTS_DIR/dicom` failed: dcmtk's
    # storescu does not propose Comprehensive 3D SR unless asked for the files' own classes (-R)
    # ("No presentation context for: (SR3)"), and nothing said how to send the --dicom-pdf reports,
    # which lie beside PDFs that storescu cannot read
    import re
    from pathlib import Path

    from cxr_batch.dicom_build import encapsulated_pdf

    if not Path("/usr/bin/storescu").exists():
        pytest.skip("dcmtk storescu not installed")
    destination, folder = storescp
    out = tmp_path / "results"
    (out / "dicom").mkdir(parents=True)
    (out / "reports").mkdir()
    sr.save_as(out / "dicom" / "cxr_0a.sr.dcm", enforce_file_format=True)
    pdf = encapsulated_pdf(b"%PDF-1.4 report", {"PatientID": "P1", "StudyInstanceUID": sr.StudyInstanceUID}, "report")
    pdf.save_as(out / "reports" / "cxr_0a.dcm", enforce_file_format=True)
    (out / "reports" / "cxr_0a.pdf").write_bytes(b"%PDF-1.4 report")
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    section = readme[readme.index("### DICOM SR"):readme.index("## Watching a PACS export folder")]
    commands = re.findall(r"`(storescu [^`]*RESULTS_DIR[^`]*)`", section)
    assert any("RESULTS_DIR/dicom" in c for c in commands) and any("RESULTS_DIR/reports" in c for c in commands), commands
    for command in commands:
        argv = command.replace("pacs.example.org 104", f"127.0.0.1 {destination.port}") \
            .replace("RESULTS_DIR", str(out)).replace("'", "").split()
        run = subprocess.run(["/usr/bin/storescu", *argv[1:]], capture_output=True, text=True, timeout=60)
        assert run.returncode == 0 and "E:" not in run.stderr, (command, run.stderr)
    stored = {pydicom.dcmread(p).SOPInstanceUID for p in folder.iterdir()}
    assert stored == {sr.SOPInstanceUID, pdf.SOPInstanceUID}

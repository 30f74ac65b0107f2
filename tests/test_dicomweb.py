"""STOW-RS of real SRs to a real Orthanc (with its DICOMweb plugin) started by the test: stored
in the source's study, a re-store adds nothing, dciodvfy accepts what Orthanc holds, basic
authentication from the configuration file; and how the archive's other answers (bearer token
refused, 202 with failed instances, 409, 503, no answer) become delivered / retry / rejected."""

from __future__ import annotations

import datetime as dt
import json
import logging
import re
import socket
import subprocess
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pydicom
import pytest

from cxr_batch.config import ConfigError
from cxr_batch.integration.dicom_send import Destination, send_dataset
from cxr_batch.integration.dicomweb import DicomWebConfig, StowClient, load_dicomweb_config, store_dataset
from cxr_batch.scan import ScanConfig, run_scan
from tests.dicomgen import grey, have, write
from tests.orthanc import make_orthanc, orthanc  # noqa: F401  (fixtures)
from tests.watchkit import free_port, wait_for

PASSWORD = "s3cret|&^~pw"


@pytest.fixture(scope="module")
def results(tmp_path_factory, nih_images, small_bundle):
    """Two real NIH radiographs as DX DICOMs and the SRs a scan with --dicom-sr made of them."""
    root = tmp_path_factory.mktemp("stow")
    studies = root / "studies"
    write(studies / "a.dcm", grey(nih_images[0]), PatientID="P1", AccessionNumber="A1")
    write(studies / "b.dcm", grey(nih_images[1]), PatientID="P2", AccessionNumber="A2")
    run_scan(studies, root / "out", ScanConfig(weights=str(small_bundle), device="cpu", progress=False, batch_size=4,
                                               workers=0, pdf=False, dicom_sr=True))
    images = sorted(studies.glob("*.dcm"))
    by_study = {pydicom.dcmread(p).StudyInstanceUID: p for p in (root / "out" / "dicom").glob("*.sr.dcm")}
    return images, [by_study[pydicom.dcmread(i).StudyInstanceUID] for i in images]  # SR k is image k's


def _config(tmp_path, url, **table):
    path = tmp_path / "cxr.toml"
    path.write_text("[dicomweb]\n" + "".join(f"{k} = {json.dumps(v)}\n" for k, v in table.items()))
    path.chmod(0o600)
    return load_dicomweb_config(path, url=url)


def test_an_sr_stored_by_stow_rs_is_in_orthanc_in_the_source_study_once(results, make_orthanc, tmp_path):
    images, srs = results
    pacs = make_orthanc(users={"cxr": PASSWORD})
    # the radiograph is in the PACS already (C-STORE), as it would be
    assert send_dataset(images[0], Destination(pacs.aet, "127.0.0.1", pacs.dicom_port), timeout=20).ok
    client = StowClient(_config(tmp_path, pacs.dicomweb_url, username="cxr", password=PASSWORD))
    sr = pydicom.dcmread(srs[0])
    delivery = client.store(srs[0])
    assert delivery.ok and delivery.outcome == "delivered", delivery
    assert sorted(pacs.sop_instance_uids()) == sorted([pydicom.dcmread(images[0]).SOPInstanceUID, sr.SOPInstanceUID])
    (study,) = pacs.rest("GET", "/studies")
    assert pacs.rest("GET", f"/studies/{study}")["MainDicomTags"]["StudyInstanceUID"] == sr.StudyInstanceUID
    assert len(pacs.rest("GET", f"/studies/{study}/series")) == 2  # the image's series and the SR's
    # the same SR again (as a file, as bytes, as a Dataset): delivered, nothing added
    count = len(pacs.instances())
    for again in (srs[0], srs[0].read_bytes(), sr):
        assert client.store(again).ok
    assert len(pacs.instances()) == count
    # what Orthanc holds is the SR, and dciodvfy finds no error in it
    (stored_id,) = [i for i in pacs.instances() if pacs.rest("GET", f"/instances/{i}")["MainDicomTags"]
                    ["SOPInstanceUID"] == sr.SOPInstanceUID]
    held = tmp_path / "held.dcm"
    held.write_bytes(pacs.instance_file(stored_id))
    assert pydicom.dcmread(held).ContentSequence == sr.ContentSequence
    if have("dciodvfy"):
        done = subprocess.run(["dciodvfy", str(held)], capture_output=True, text=True, timeout=60)
        assert not [x for x in (done.stdout + done.stderr).splitlines() if x.startswith("Error")]


def test_a_wrong_password_is_retried_and_stores_nothing(results, make_orthanc, tmp_path):
    _, srs = results
    # (and the fixture's peers for C-MOVE: Orthanc knows the ones it is given)
    pacs = make_orthanc(users={"cxr": PASSWORD}, modalities={"cxrbatch": ("CXRBATCH", "127.0.0.1", 11113)})
    assert pacs.rest("GET", "/modalities") == ["cxrbatch"]
    delivery = store_dataset(srs[1], _config(tmp_path, pacs.dicomweb_url, username="cxr", password="wrong"))
    assert delivery.outcome == "retry" and "HTTP 401" in delivery.reason and "credentials" in delivery.reason
    assert pacs.instances() == []


def test_an_object_the_archive_refuses_is_rejected(orthanc, tmp_path):
    """An object without the UIDs an archive files it by: Orthanc answers 400 and lists it as
    failed with 0xC000 (cannot understand)."""
    ds = pydicom.Dataset()
    ds.SOPClassUID, ds.SOPInstanceUID = "1.2.840.10008.5.1.4.1.1.88.34", "1.2.826.0.1.3680043.10.999.2"
    ds.PatientID = "X"
    ds.file_meta = pydicom.dataset.FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID, ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPClassUID, ds.SOPInstanceUID
    delivery = store_dataset(ds, _config(tmp_path, orthanc.dicomweb_url))
    assert delivery.outcome == "rejected" and delivery.reason == "HTTP 400, failure reason 0xC000", delivery
    assert store_dataset(b"not dicom", _config(tmp_path, orthanc.dicomweb_url)).outcome == "rejected"
    assert orthanc.instances() == []


def test_an_archive_host_name_nothing_resolves_is_said_as_such(results, tmp_path):
    # "cannot reach https://nohost: ConnectionError: HTTPSConnectionPool(host='nohost', port=443): Max
    # retries exceeded with url: /dicomweb/studies (Caused by NameResolutionError(..." at every try
    _, srs = results
    delivery = store_dataset(srs[0], _config(tmp_path, "https://no-such-host.invalid/dicom-web/", timeout=2))
    assert delivery.outcome == "retry" and "host 'no-such-host.invalid' not found" in delivery.reason, delivery
    assert "HTTPSConnectionPool" not in delivery.reason


def test_no_archive_or_a_silent_one_is_retried_within_the_timeout(results, tmp_path):
    _, srs = results
    port = free_port()
    delivery = store_dataset(srs[0], _config(tmp_path, f"http://127.0.0.1:{port}/dicom-web/", timeout=2))
    # was requests' 300 characters ("HTTPConnectionPool(host=... Max retries exceeded ...") cut mid-word
    assert delivery.outcome == "retry", delivery
    assert delivery.reason == f"cannot reach http://127.0.0.1:{port}: ConnectionRefusedError: Connection refused"
    with socket.socket() as silent:  # accepts connections (the backlog), never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(4)
        t0 = time.monotonic()
        delivery = store_dataset(srs[0], _config(tmp_path, f"http://127.0.0.1:{silent.getsockname()[1]}/dw", timeout=1.5))
        assert time.monotonic() - t0 < 10
    assert delivery.outcome == "retry" and "within 1.5 s" in delivery.reason, delivery


# ------------------------------------------------------------------ answers Orthanc does not give
class _Archive(BaseHTTPRequestHandler):
    """Answers every STOW-RS with the server's canned (status, body), after checking the
    bearer token when one is set."""

    def do_POST(self):
        length = int(self.headers.get("Content-Length") or 0)
        self.rfile.read(length)
        server = self.server
        server.seen.append(self.headers.get("Authorization"))
        server.hosts.append(self.headers.get("Host"))
        if server.token and self.headers.get("Authorization") != f"Bearer {server.token}":
            status, body = 401, None
        elif server.strict_host and not re.fullmatch(r"(\[[0-9a-fA-F:]+\]|[\w.-]+)(:\d+)?", self.headers.get("Host", "")):
            status, body = 400, None  # as nginx or Apache answer a malformed Host header
        else:
            status, body = server.answer
        payload = body if isinstance(body, bytes) else json.dumps(body).encode() if body is not None else b""
        self.send_response(status)
        self.send_header("Content-Type", server.content_type)
        self.send_header("Content-Length", str(len(payload)))
        for name, value in getattr(server, "headers", {}).items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, *args):
        pass


@pytest.fixture
def archive():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Archive)
    server.token, server.answer, server.seen, server.hosts, server.strict_host = "", (200, None), [], [], False
    server.content_type, server.headers = "application/dicom+json", {}
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()
    thread.join(10)


def _item(ds, **extra):
    item = {"00081150": {"vr": "UI", "Value": [ds.SOPClassUID]}, "00081155": {"vr": "UI", "Value": [ds.SOPInstanceUID]}}
    item.update({tag: {"vr": "US", "Value": [value]} for tag, value in extra.items()})
    return item


def test_a_bearer_token_from_the_configuration_is_sent(results, archive, tmp_path):
    _, srs = results
    ds = pydicom.dcmread(srs[0])
    archive.token, archive.answer = "t0k3n", (200, {"00081199": {"vr": "SQ", "Value": [_item(ds)]}})
    url = f"http://127.0.0.1:{archive.server_address[1]}/dicom-web"
    assert store_dataset(ds, _config(tmp_path, url, token="t0k3n")).ok
    refused = store_dataset(ds, _config(tmp_path, url, token="other"))
    assert refused.outcome == "retry" and "HTTP 401" in refused.reason
    assert archive.seen == ["Bearer t0k3n", "Bearer other"]


@pytest.mark.parametrize("status, sequence, extra, outcome, says", [
    (202, "00081198", {"00081197": 0xA700}, "retry", "failure reason 0xA700"),  # out of resources
    (202, "00081198", {"00081197": 0x0110}, "retry", "0x0110"),  # processing failure
    (202, "00081198", {"00081197": 0x0213}, "retry", "0x0213"),  # resource limitation, as by C-STORE
    (202, "00081198", {"00081197": 0x0111}, "delivered", "already stored"),  # duplicate
    (409, "00081198", {"00081197": 0xA900}, "rejected", "HTTP 409, failure reason 0xA900"),
    (200, "00081199", {"00081196": 0xB000}, "delivered", "warning 0xB000"),
    (503, None, {}, "retry", "HTTP 503"),
    (413, None, {}, "rejected", "HTTP 413"),
    (404, None, {}, "retry", "check the URL"),
])
def test_the_archive_s_answer_decides_what_the_queue_does(results, archive, tmp_path, status, sequence, extra,
                                                           outcome, says):
    _, srs = results
    ds = pydicom.dcmread(srs[0])
    archive.answer = (status, {sequence: {"vr": "SQ", "Value": [_item(ds, **extra)]}} if sequence else None)
    delivery = store_dataset(ds, _config(tmp_path, f"http://127.0.0.1:{archive.server_address[1]}/dicom-web"))
    assert delivery.outcome == outcome and says in delivery.reason, delivery


# ------------------------------------------------------------------ configuration
def test_credentials_come_from_the_configuration_file_checked(tmp_path, caplog):
    url = "https://pacs.example.org/dicom-web"
    config = _config(tmp_path, url, username="cxr", password=PASSWORD, timeout=5)
    assert (config.url, config.username, config.password, config.timeout) == (url, "cxr", PASSWORD, 5.0)
    assert PASSWORD not in repr(config)  # never in a log line
    for table, says in ((dict(token="t", username="u", password="p"), "not both"),
                        (dict(username="u"), "go together"),
                        (dict(timeout=0), "timeout"),
                        (dict(user="u"), "unknown option")):
        with pytest.raises(ConfigError, match=says):
            _config(tmp_path, url, **table)
    with pytest.raises(ConfigError, match="in clear"):
        _config(tmp_path, "http://pacs.example.org/dicom-web", token="t")
    assert _config(tmp_path, "http://pacs.example.org/dicom-web", token="t", insecure_http=True).token == "t"
    assert _config(tmp_path, "http://127.0.0.1:8042/dicom-web", token="t").token == "t"  # loopback
    for bad in ("ftp://pacs/dicom-web", "pacs.example.org/dicom-web", "https://u:p@pacs.example.org/dw"):
        with pytest.raises(ConfigError):
            DicomWebConfig(url=bad)
    path = tmp_path / "cxr.toml"
    path.chmod(0o644)
    load_dicomweb_config(path, url=url)
    assert "other users can read it" in caplog.text


# ------------------------------------------------------------------ a 2xx that is no STOW-RS answer
@pytest.mark.parametrize("content_type, body, outcome, says", [
    ("text/html", b"<html><body>Please log in</body></html>", "retry", "not a STOW-RS answer"),  # a proxy's page
    ("application/dicom+json", b"[1, 2, 3]", "retry", "unreadable STOW-RS response"),
    ("application/dicom+json", b'{"00081199": {"vr": "SQ", "Value": "x"}}', "retry", "unreadable STOW-RS response"),
    ("application/dicom+json; charset=utf-8", "failed", "rejected", "failure reason 0xC000"),
    ("application/dicom+json; charset=utf-8", "stored", "delivered", ""),
])
def test_a_2xx_that_is_no_stow_rs_answer_is_never_taken_for_delivered(results, archive, tmp_path, content_type,
                                                                      body, outcome, says):
    """dicomweb-client reads only an exact 'application/dicom+json' (or XML) body and gives an
    empty answer for anything else, which was taken for '200 without a body': delivered. A
    login page (HTML) or a JSON body with a charset then lost the result from the queue."""
    _, srs = results
    ds = pydicom.dcmread(srs[0])
    if body == "failed":
        body = {"00081198": {"vr": "SQ", "Value": [_item(ds, **{"00081197": 0xC000})]}}
    elif body == "stored":
        body = {"00081199": {"vr": "SQ", "Value": [_item(ds)]}}
    archive.answer, archive.content_type = (200, body), content_type
    delivery = store_dataset(ds, _config(tmp_path, f"http://127.0.0.1:{archive.server_address[1]}/dicom-web"))
    assert delivery.outcome == outcome and says in delivery.reason, delivery


# ------------------------------------------------------------------ answers in DICOM XML (PS3.19)
NATIVE = "http://dicom.nema.org/PS3.19/models/NativeDICOM"


def _xml_item(ds, extra, keywords):
    """One Item of a Referenced/Failed SOP Sequence in the Native DICOM Model; ``keywords``:
    whether the optional keyword attributes are written (dcm4chee writes them, others not)."""
    def attribute(tag, vr, keyword, value):
        kw = f' keyword="{keyword}"' if keywords else ""
        return f'<DicomAttribute tag="{tag}" vr="{vr}"{kw}><Value number="1">{value}</Value></DicomAttribute>'
    names = {"00081197": "FailureReason", "00081196": "WarningReason"}
    return ('<Item number="1">' + attribute("00081150", "UI", "ReferencedSOPClassUID", ds.SOPClassUID)
            + attribute("00081155", "UI", "ReferencedSOPInstanceUID", ds.SOPInstanceUID)
            + "".join(attribute(tag, "US", names[tag], value) for tag, value in extra.items()) + "</Item>")


def _xml_answer(ds, sequence, extra, keywords=True):
    name = {"00081199": "ReferencedSOPSequence", "00081198": "FailedSOPSequence"}[sequence]
    kw = f' keyword="{name}"' if keywords else ""
    return (f'<?xml version="1.0" encoding="UTF-8"?>\n<NativeDicomModel xmlns="{NATIVE}">'
            f'<DicomAttribute tag="00081190" vr="UR"{" keyword=" + chr(34) + "RetrieveURL" + chr(34) if keywords else ""}>'
            f'<Value number="1">http://pacs/dicom-web/studies/{ds.StudyInstanceUID}</Value></DicomAttribute>'
            f'<DicomAttribute tag="{sequence}" vr="SQ"{kw}>{_xml_item(ds, extra, keywords)}</DicomAttribute>'
            f'</NativeDicomModel>').encode()


@pytest.mark.parametrize("status, content_type, sequence, extra, keywords, outcome, says", [
    (200, "application/dicom+xml", "00081199", {}, True, "delivered", ""),
    (200, "application/dicom+xml", "00081199", {}, False, "delivered", ""),  # keyword is optional (PS3.19)
    (200, "application/dicom+xml; charset=utf-8", "00081199", {}, True, "delivered", ""),
    (202, "application/dicom+xml", "00081199", {"00081196": 0xB000}, False, "delivered", "warning 0xB000"),
    (200, "application/dicom+xml", "00081198", {"00081197": 0xC000}, False, "rejected", "failure reason 0xC000"),
    (202, "application/dicom+xml", "00081198", {"00081197": 0xA700}, True, "retry", "failure reason 0xA700"),
    (409, "application/dicom+xml", "00081198", {"00081197": 0xA900}, False, "rejected",
     "HTTP 409, failure reason 0xA900"),
    (409, "application/dicom+xml; charset=utf-8", "00081198", {"00081197": 0x0111}, True, "delivered",
     "already stored"),
])
def test_an_answer_in_dicom_xml_decides_as_its_json_twin(results, archive, tmp_path, status, content_type, sequence,
                                                         extra, keywords, outcome, says):
    """application/dicom+xml is the default STOW-RS response type (PS3.18 10.5.3): archives that
    do not honour Accept: application/dicom+json answer it. An answer without the optional
    keyword attributes, or with a charset, was 'unreadable' or 'not a STOW-RS answer': retried
    for ever, the archive storing the same instance again at each try."""
    _, srs = results
    ds = pydicom.dcmread(srs[0])
    archive.answer, archive.content_type = (status, _xml_answer(ds, sequence, extra, keywords)), content_type
    delivery = store_dataset(ds, _config(tmp_path, f"http://127.0.0.1:{archive.server_address[1]}/dicom-web"))
    assert delivery.outcome == outcome and says in delivery.reason, delivery


def test_an_xml_answer_with_a_doctype_is_not_read(results, archive, tmp_path):
    """Entities in a DOCTYPE can expand to gigabytes (a 'billion laughs'): an archive's answer
    has no use for one, so it is not parsed, and the send is tried again later."""
    _, srs = results
    ds = pydicom.dcmread(srs[0])
    laughs = ('<?xml version="1.0"?><!DOCTYPE d [<!ENTITY a "aaaaaaaaaa"><!ENTITY b "&a;&a;&a;&a;&a;&a;&a;&a;">]>'
              f'<NativeDicomModel xmlns="{NATIVE}"><DicomAttribute tag="00081190" vr="UR"><Value number="1">&b;'
              '</Value></DicomAttribute></NativeDicomModel>').encode()
    archive.answer, archive.content_type = (200, laughs), "application/dicom+xml"
    delivery = store_dataset(ds, _config(tmp_path, f"http://127.0.0.1:{archive.server_address[1]}/dicom-web"))
    assert delivery.outcome == "retry" and "DOCTYPE" in delivery.reason, delivery


def test_orthanc_s_own_xml_answer_is_read_as_delivered(results, orthanc, archive, tmp_path):
    """Orthanc's STOW-RS answer in XML (Accept: application/dicom+xml; it adds an empty Value to
    the sequences), replayed by the canned archive to cxr-batch: delivered, and the same XML for
    another instance is not taken for this one's."""
    import requests

    _, srs = results
    boundary = "cxr-batch-test"
    body = (f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode() + srs[0].read_bytes()
            + f"\r\n--{boundary}--\r\n".encode())
    answer = requests.post(orthanc.dicomweb_url + "studies", data=body, timeout=30, headers={
        "Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}',
        "Accept": "application/dicom+xml"})
    assert answer.status_code == 200 and answer.headers["Content-Type"].startswith("application/dicom+xml")
    archive.answer, archive.content_type = (200, answer.content), answer.headers["Content-Type"]
    url = f"http://127.0.0.1:{archive.server_address[1]}/dicom-web"
    assert store_dataset(srs[0], _config(tmp_path, url)).outcome == "delivered"
    other = store_dataset(srs[1], _config(tmp_path, url))
    assert other.outcome == "retry" and "does not mention the instance" in other.reason, other


class _IPv6Server(ThreadingHTTPServer):
    address_family = socket.AF_INET6


def test_the_host_header_names_the_archive_as_its_url_does(results, archive, tmp_path):
    """dicomweb-client sends a Host header of its own making: without the port
    (127.0.0.1 for 127.0.0.1:8042) and, for an IPv6 address, '[': a server that checks the Host
    header (nginx, Apache in front of an archive) answered 400, which is a refusal of the object:
    every result refused. The Host is the URL's host and port."""
    _, srs = results
    ds = pydicom.dcmread(srs[0])
    archive.answer = (200, {"00081199": {"vr": "SQ", "Value": [_item(ds)]}})
    port = archive.server_address[1]
    assert store_dataset(ds, _config(tmp_path, f"http://127.0.0.1:{port}/dicom-web")).ok
    assert archive.hosts == [f"127.0.0.1:{port}"]
    try:
        server = _IPv6Server(("::1", 0), _Archive)
    except OSError:
        pytest.skip("no IPv6 loopback")
    server.token, server.seen, server.hosts, server.strict_host = "", [], [], True
    server.answer, server.content_type = archive.answer, "application/dicom+json"
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        delivery = store_dataset(ds, _config(tmp_path, f"http://[::1]:{server.server_address[1]}/dicom-web"))
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)
    assert delivery.ok and server.hosts == [f"[::1]:{server.server_address[1]}"], (delivery, server.hosts)


def _xml_with(ds, sequence, reason_tag, vr, value, declaration='<?xml version="1.0" encoding="UTF-8"?>'):
    """An XML answer naming ``ds`` in ``sequence`` with a Warning/Failure Reason of the archive's
    making: any VR, any text."""
    reason = f'<DicomAttribute tag="{reason_tag}" vr="{vr}"><Value number="1">{value}</Value></DicomAttribute>'
    return (f'{declaration}<NativeDicomModel xmlns="{NATIVE}"><DicomAttribute tag="{sequence}" vr="SQ"><Item number="1">'
            f'<DicomAttribute tag="00081155" vr="UI"><Value number="1">{ds.SOPInstanceUID}</Value></DicomAttribute>'
            f'{reason}</Item></DicomAttribute></NativeDicomModel>').encode()


@pytest.mark.parametrize("sequence, reason_tag, vr, value, declaration, outcome, says", [
    # stored, with a warning no status can be: stored all the same (never offered again)
    ("00081199", "00081196", "DS", "nan", None, "delivered", "warning"),
    ("00081199", "00081196", "FD", "1e999", None, "delivered", "warning"),
    ("00081199", "00081196", "LO", "see log", None, "delivered", "warning"),
    ("00081199", "00081196", "SS", "-5", None, "delivered", "warning"),
    # failed, for a reason no status can be: as a failure without a reason
    ("00081198", "00081197", "DS", "nan", None, "retry", "failure reason"),
    ("00081198", "00081197", "FD", "1e999", None, "retry", "failure reason"),
    ("00081198", "00081197", "UV", "99999999999999999999", None, "retry", "failure reason"),
    # an encoding Python has no text codec for: unreadable, tried again
    ("00081199", "00081196", "US", "1", '<?xml version="1.0" encoding="x-no-such"?>', "retry", "encoding"),
    ("00081199", "00081196", "US", "1", '<?xml version="1.0" encoding="rot13"?>', "retry", "encoding"),
])
def test_an_archive_s_odd_reason_values_decide_and_never_end_the_sender(results, archive, tmp_path, sequence,
                                                                         reason_tag, vr, value, declaration,
                                                                         outcome, says):
    """A Warning or Failure Reason the archive wrote as 'nan', '1e999', text or a negative number,
    and an XML declaration naming an encoding Python cannot decode: store_dataset raised
    (ValueError, OverflowError, LookupError), which the outbound queue took for 'object file
    cannot be read', a refusal of an object the archive had said it stored."""
    _, srs = results
    ds = pydicom.dcmread(srs[0])
    body = _xml_with(ds, sequence, reason_tag, vr, value, *([declaration] if declaration else []))
    archive.answer, archive.content_type = (200, body), "application/dicom+xml"
    delivery = store_dataset(ds, _config(tmp_path, f"http://127.0.0.1:{archive.server_address[1]}/dicom-web"))
    assert delivery.outcome == outcome and says in delivery.reason, delivery


@pytest.mark.parametrize("tag, vr, value", [
    ("00201208", "IS", "abc"),  # Number of Study Related Instances, as text
    ("00081190", "UR", "http://archive/x"),  # a Retrieve URL: read as before
    ("00091010", "DS", "1e999"),  # a vendor's private attribute
    ("00201206", "IS", "99999999999999999999999"),  # out of IS's range
])
def test_an_odd_value_the_status_does_not_depend_on_does_not_make_the_answer_unreadable(results, archive, tmp_path,
                                                                                        tag, vr, value):
    """One odd value in an attribute the outcome does not read (a count, a vendor's attribute)
    made the whole XML answer unreadable: a retry, so the archive stored the object again at
    every try although it said it had it. Such an attribute is left out; the instance is stored."""
    _, srs = results
    ds = pydicom.dcmread(srs[0])
    archive.answer, archive.content_type = (200, _xml_with(ds, "00081199", tag, vr, value)), "application/dicom+xml"
    delivery = store_dataset(ds, _config(tmp_path, f"http://127.0.0.1:{archive.server_address[1]}/dicom-web"))
    assert delivery.outcome == "delivered", delivery


# ------------------------------------------------------------------ Retry-After (RFC 9110 10.2.3)
@pytest.mark.parametrize("status, header, asked", [
    (503, "120", 120.0),  # delay-seconds
    (429, "0", 0.0),
    (503, "in a while", None),  # not understood: the queue's own back-off
])
def test_the_wait_a_busy_archive_asks_for_is_read(results, archive, tmp_path, status, header, asked):
    _, srs = results
    archive.answer, archive.headers = (status, None), {"Retry-After": header}
    delivery = store_dataset(srs[0], _config(tmp_path, f"http://127.0.0.1:{archive.server_address[1]}/dicom-web"))
    assert delivery.outcome == "retry" and delivery.retry_after == asked, delivery
    assert f"HTTP {status}" in delivery.reason and f"Retry-After {header!r}" in delivery.reason


@pytest.mark.parametrize("form", ["IMF-fixdate", "rfc850-date", "asctime-date"])
def test_a_retry_after_date_in_each_form_of_rfc_9110_is_read(form):
    from email.utils import format_datetime

    from cxr_batch.integration.dicomweb import retry_after_seconds

    now = 1_700_000_000.0  # Tue, 14 Nov 2023 22:13:20 GMT
    when = dt.datetime.fromtimestamp(now + 600, dt.timezone.utc)
    text = {"IMF-fixdate": format_datetime(when, usegmt=True),
            "rfc850-date": when.strftime("%A, %d-%b-%y %H:%M:%S GMT"),
            "asctime-date": when.strftime("%a %b %e %H:%M:%S %Y")}[form]
    assert retry_after_seconds(text, now) == 600.0
    assert retry_after_seconds(text, now + 3600) == 0.0  # a date gone by: now
    assert retry_after_seconds("-5", now) is None and retry_after_seconds("", now) is None


def test_a_retry_after_date_is_read_against_the_archive_s_clock_not_ours(results, archive, tmp_path, monkeypatch):
    """An archive asking to wait two minutes by a date (Retry-After: <HTTP-date>), to a sender
    whose clock runs an hour ahead of it: the date was gone by, the archive tried again at once
    (an hour behind: an hour's wait). The date is read against the answer's Date, the archive's clock."""
    import time
    from email.utils import format_datetime

    _, srs = results
    when = dt.datetime.fromtimestamp(time.time() + 120, dt.timezone.utc)  # the archive's clock: the real one
    archive.answer, archive.headers = (503, None), {"Retry-After": format_datetime(when, usegmt=True)}
    url = f"http://127.0.0.1:{archive.server_address[1]}/dicom-web"
    real = time.time
    for ahead in (3600.0, -3600.0):
        # the archive (a thread of this process) dates its answers by the real clock
        monkeypatch.setattr(_Archive, "date_time_string",
                            lambda self, timestamp=None: format_datetime(dt.datetime.now(dt.timezone.utc), usegmt=True))
        monkeypatch.setattr(time, "time", lambda: real() + ahead)
        delivery = store_dataset(srs[0], _config(tmp_path, url))
        monkeypatch.undo()
        assert delivery.outcome == "retry" and 100 <= delivery.retry_after <= 121, (ahead, delivery)


def _stow_sender(results, archive, tmp_path, **options):
    """A sender of the STOW-RS channel whose queue holds the first SR, for the ``archive``."""
    from cxr_batch.integration.outbound import Sender
    from cxr_batch.integration.outbox import StowChannel
    from cxr_batch.ledger import Ledger, outbound_entry

    _, srs = results
    out = srs[0].parent.parent
    url = f"http://127.0.0.1:{archive.server_address[1]}/dicom-web"
    ledger = Ledger(tmp_path / "ledger.sqlite")
    uid = pydicom.dcmread(srs[0]).SOPInstanceUID
    ledger.queue_outbound([("k", outbound_entry(uid, srs[0].relative_to(out).as_posix(), "stow", url))])
    return ledger, Sender(ledger.path, out, StowChannel(_config(tmp_path, url)), **({"retry_max": 1.0} | options))


def test_an_archive_asking_to_wait_is_not_tried_again_before_then(results, archive, tmp_path, caplog):
    """HTTP 429/503 with Retry-After: 300 was tried again within the queue's own back-off (1 s
    doubling to retry_max), hammering an archive that had said when to come back."""
    caplog.set_level(logging.INFO, "cxr_batch")
    archive.answer, archive.headers = (429, None), {"Retry-After": "300"}
    ledger, sender = _stow_sender(results, archive, tmp_path)
    try:
        before = time.time()
        sender.drain(before + 5, ledger)  # five seconds of trying: one POST, the wait asked is kept
        assert len(archive.seen) == 1
        assert before + 299 <= ledger.next_due("stow") <= time.time() + 300
        assert "asked to wait 300 s (Retry-After): next try in 300 s" in caplog.text
    finally:
        ledger.close()


def test_an_archive_asking_to_wait_for_years_is_tried_again_within_the_hour_saying_so(results, archive, tmp_path,
                                                                                       caplog):
    from cxr_batch.integration.delivery import RETRY_AFTER_MAX

    archive.answer, archive.headers = (503, None), {"Retry-After": str(10 * 365 * 86400)}
    ledger, sender = _stow_sender(results, archive, tmp_path)
    try:
        before = time.time()
        sender.send_due(ledger, until=before)
        assert before + RETRY_AFTER_MAX - 1 <= ledger.next_due("stow") <= time.time() + RETRY_AFTER_MAX
        assert (f"asked to wait 315360000 s (Retry-After), longer than the {RETRY_AFTER_MAX:.0f} s cxr-batch waits "
                f"at most: next try in {RETRY_AFTER_MAX:.0f} s") in caplog.text
    finally:
        ledger.close()


def test_a_sender_waiting_out_a_retry_after_stops_at_once(results, archive, tmp_path):
    archive.answer, archive.headers = (503, None), {"Retry-After": "3000"}
    ledger, sender = _stow_sender(results, archive, tmp_path)
    ledger.close()
    sender.start()
    try:
        assert wait_for(lambda: archive.seen, timeout=30)
    finally:
        sender.stop(timeout=15)  # a stop (SIGTERM, Ctrl-C) waits no Retry-After out
    assert not sender.thread.is_alive()


def test_why_an_archive_cannot_be_reached_is_said_whole_or_cut_between_words():
    import requests

    from cxr_batch.integration.dicomweb import unreachable

    # an archive that closes the connection without a word: requests wraps it two deep
    try:
        raise requests.ConnectionError(("Connection aborted.", ConnectionResetError("Remote end closed connection")))
    except requests.ConnectionError as e:
        said = unreachable(e, "127.0.0.1")
    assert said.startswith("ConnectionError: ") and said.endswith("Remote end closed connection'))"), said
    long = requests.ConnectionError("HTTPSConnectionPool(host='pacs', port=443): Max retries exceeded " * 8)
    said, whole = unreachable(long, "pacs"), f"ConnectionError: {long}"
    kept = said.removesuffix(" ...")
    assert len(said) <= 200 and kept != said and whole.startswith(kept) and whole[len(kept)] == " ", said


def test_an_archive_that_cannot_be_reached_keeps_the_queue_in_its_order(results, tmp_path):
    # `watch --stow-to` with the archive down sent each waiting SR to the back of the queue at each
    # failed connection (the log named another SR at every try), while C-STORE and HL7 keep the
    # queue's order: after an outage the results went out in any order, urgent ones not first
    _, srs = results
    refused = store_dataset(srs[0], _config(tmp_path, f"http://127.0.0.1:{free_port()}/dicom-web/", timeout=2))
    unknown = store_dataset(srs[0], _config(tmp_path, "http://no-such-host.invalid/dicom-web/", timeout=2))
    assert refused.outcome == unknown.outcome == "retry" and refused.unsent and unknown.unsent, (refused, unknown)
    with socket.socket() as silent:  # connected: the request may have reached it
        silent.bind(("127.0.0.1", 0))
        silent.listen(4)
        answered = store_dataset(srs[0], _config(tmp_path, f"http://127.0.0.1:{silent.getsockname()[1]}/dw", timeout=1))
    assert answered.outcome == "retry" and not answered.unsent, answered


def test_status_says_the_archive_asked_to_wait_and_until_when(results, archive, tmp_path):
    """While the STOW channel waits out an archive's Retry-After, status.json said `peer`
    "unreachable" (the archive had answered) and nowhere when the queue would move again."""
    archive.answer, archive.headers = (503, None), {"Retry-After": "600"}
    ledger, sender = _stow_sender(results, archive, tmp_path)
    try:
        before = time.time()
        sender.send_due(ledger, until=before)
        said = sender.status(ledger)
        assert said["peer"] == "asked to wait (Retry-After)", said
        assert before + 599 <= said["next_try_at"] <= time.time() + 600, said
        archive.answer, archive.headers = (200, None), {}
        ledger.outbound_send_now()  # the operator's retry: it answers, the wait is over
        sender.send_due(ledger)
        assert sender.status(ledger)["peer"] == "ok" and "next_try_at" not in sender.status(ledger)
    finally:
        ledger.close()


def test_status_s_next_try_follows_the_clock_set_back(results, archive, tmp_path, monkeypatch):
    """The archive asked to wait 10 minutes, then the clock was set back an hour (NTP): the queue
    kept its 10 minutes, but status.json's next_try_at said an hour and 10 minutes from now."""
    archive.answer, archive.headers = (503, None), {"Retry-After": "600"}
    ledger, sender = _stow_sender(results, archive, tmp_path)
    try:
        sender.send_due(ledger, until=time.time())
        real = time.time
        monkeypatch.setattr(time, "time", lambda: real() - 3600)
        assert not sender.send_due(ledger)  # the sender sees the jump; nothing is due yet
        said = sender.status(ledger)
        assert said["peer"] == "asked to wait (Retry-After)" and said["next_try_at"] <= time.time() + 600, said
    finally:
        ledger.close()


def test_a_retry_after_of_hundreds_of_digits_is_said_as_a_number_not_inf(results, archive, tmp_path, caplog):
    """A Retry-After of 400 nines was read as float infinity: capped rightly at the hour, but the
    log said 'asked to wait inf s'."""
    from cxr_batch.integration.delivery import RETRY_AFTER_MAX

    archive.answer, archive.headers = (503, None), {"Retry-After": "9" * 400}
    ledger, sender = _stow_sender(results, archive, tmp_path)
    try:
        before = time.time()
        sender.send_due(ledger, until=before)
        assert before + RETRY_AFTER_MAX - 1 <= ledger.next_due("stow") <= time.time() + RETRY_AFTER_MAX
        assert "inf" not in caplog.text, caplog.text
        assert "asked to wait more than 1000000000 s (Retry-After)" in caplog.text, caplog.text
    finally:
        ledger.close()


def test_outbound_list_says_when_a_channel_waiting_out_a_retry_after_tries_a_result_queued_since(results, archive,
                                                                                                 tmp_path):
    """`cxr-batch outbound list` said NEXT TRY "now" for a result queued while the STOW channel
    waited out the archive's Retry-After: the sender would not try it for ten minutes. The list
    gives the time the sender uses, and why; an operator's retry ends the wait."""
    import shutil
    import sys

    from cxr_batch.integration.outbound import Sender
    from cxr_batch.integration.outbox import StowChannel
    from cxr_batch.ledger import Ledger, outbound_entry

    _, srs = results
    out = tmp_path / "out"
    (out / "dicom").mkdir(parents=True)
    for sr in srs:
        shutil.copy(sr, out / "dicom" / sr.name)
    uids = [pydicom.dcmread(sr).SOPInstanceUID for sr in srs]
    url = f"http://127.0.0.1:{archive.server_address[1]}/dicom-web"
    ledger = Ledger(out / ".cxr-batch" / "ledger.sqlite")
    sender = Sender(ledger.path, out, StowChannel(_config(tmp_path, url)), retry_max=1.0)

    def listed():
        done = subprocess.run([sys.executable, "-m", "cxr_batch", "outbound", "list", "--out", str(out)],
                              capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        return {uid: line for line in done.stdout.splitlines() for uid in uids if line.startswith(uid)}

    try:
        archive.answer, archive.headers = (503, None), {"Retry-After": "600"}
        ledger.queue_outbound([("k0", outbound_entry(uids[0], f"dicom/{srs[0].name}", "stow", url))])
        sender.send_due(ledger, until=time.time())  # one POST: the archive asks for ten minutes
        ledger.queue_outbound([("k1", outbound_entry(uids[1], f"dicom/{srs[1].name}", "stow", url))])
        line = listed()[uids[1]]
        assert " now " not in line and re.search(r"\bin (10m|9m|599s|600s)\b", line), line
        assert "Retry-After" in line, line  # why it waits: not an error of its own
        sender.send_due(ledger)  # the sender keeps the wait it listed
        assert len(archive.seen) == 1
        archive.answer, archive.headers = (200, None), {}
        ledger.outbound_send_now()  # the operator's retry: the wait ends, for the list as for the sender
        assert " now " in listed()[uids[1]]
        sender.send_due(ledger)
        assert len(archive.seen) == 3 and ledger.outbound_stats(time.time(), "stow")["delivered"] == 2
    finally:
        ledger.close()


def test_status_json_s_next_try_is_the_queue_s_wait(results, archive, tmp_path):
    """status.json's next_try_at was kept by the sender apart from the queue's wait in the ledger,
    and the two disagreed: after `cxr-batch outbound retry` ended the archive's Retry-After (the
    queue due now, as `outbound list` said), status.json still said the next try was ten minutes
    away; and a daemon restarted while the archive's wait lasted said `peer` "ok" and no next try,
    while it sent nothing for those ten minutes. status.json reads the queue's wait."""
    import shutil
    import sys

    from cxr_batch.integration.outbox import Outbox, StowChannel
    from cxr_batch.ledger import Ledger, outbound_entry

    _, srs = results
    out = tmp_path / "out"
    (out / "dicom").mkdir(parents=True)
    shutil.copy(srs[0], out / "dicom" / srs[0].name)
    uid = pydicom.dcmread(srs[0]).SOPInstanceUID
    url = f"http://127.0.0.1:{archive.server_address[1]}/dicom-web"
    ledger = Ledger(out / ".cxr-batch" / "ledger.sqlite")

    def outbox() -> Outbox:  # a daemon's channels, started anew
        return Outbox(out, ledger.path, [StowChannel(_config(tmp_path, url))], retry_max=1.0, refused_retry=900.0)

    try:
        archive.answer, archive.headers = (503, None), {"Retry-After": "600"}
        ledger.queue_outbound([("k", outbound_entry(uid, f"dicom/{srs[0].name}", "stow", url))])
        running = outbox()
        running.senders[0].send_due(ledger, until=time.time())  # one POST: the archive asks for ten minutes
        until, _ = ledger.outbound_held("stow")
        said = running.status(ledger)["outbound_stow"]
        assert said["peer"] == "asked to wait (Retry-After)" and said["next_try_at"] == until, said
        restarted = outbox().status(ledger)["outbound_stow"]  # the wait outlives the daemon: said so
        assert restarted["peer"] == "asked to wait (Retry-After)" and restarted["next_try_at"] == until, restarted
        done = subprocess.run([sys.executable, "-m", "cxr_batch", "outbound", "retry", "--out", str(out)],
                              capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        said = running.status(ledger)["outbound_stow"]  # the operator ended the wait: no next try ahead
        assert "next_try_at" not in said and said["peer"] != "asked to wait (Retry-After)", said
    finally:
        ledger.close()

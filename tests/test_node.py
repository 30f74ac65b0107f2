"""The DICOM node (cxr-batch listen) on loopback, with dcmtk as the modality and the PACS:
C-ECHO, C-STORE in every transfer syntax the readers decode, the spool, safety defaults
(loopback, AE titles, TLS, object size, a full disk), the outbound queue with a PACS that is
down then up, and the issue's check: SIGKILL mid-stream, restart, exactly one SR per scored
image at the PACS and one row per image in results.csv. Skipped cleanly without dcmtk."""

from __future__ import annotations

import logging
import os
import shlex
import signal
import stat
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import highdicom as hd
import pydicom
import pytest
from pydicom.uid import (JPEG2000, DeflatedExplicitVRLittleEndian, ExplicitVRBigEndian, ExplicitVRLittleEndian,
                         ImplicitVRLittleEndian, JPEG2000Lossless, JPEGBaseline8Bit, JPEGExtended12Bit, JPEGLosslessSV1,
                         JPEGLSLossless, JPEGLSNearLossless, RLELossless, generate_uid)

from cxr_batch.bundle import load_bundle
from cxr_batch.config import ConfigError, load_dataclass
from cxr_batch.dicom import identifiers
from cxr_batch.dicom_build import encapsulated_pdf, save
from cxr_batch.integration.dicom_send import Destination
from cxr_batch.findings import FINDINGS
from cxr_batch.ledger import Ledger
from cxr_batch.integration.node import ListenConfig, Spool, StorageSCP
from cxr_batch.integration.outbound import Sender
from cxr_batch.record import Scores, StudyRecord
from cxr_batch.sr import build_sr, sr_bytes

from .dicomgen import grey, have, pydicom_checking, run, write
from .watchkit import free_port, node_config, rows_now, start_node, status, stop, wait_for

needs_dcmtk = pytest.mark.skipif(not have("echoscu", "storescu", "storescp"), reason="dcmtk not installed")
COMPREHENSIVE_3D_SR = "1.2.840.10008.5.1.4.1.1.88.34"


# ---------------------------------------------------------------------- objects a modality sends
def modality_objects(folder: Path, nih_images, bundle_dir) -> tuple[dict[str, Path], dict[str, Path]]:
    """Real NIH radiographs as DICOMs, each in its own transfer syntax (pydicom's encoders, and
    dcmtk's where installed), and three objects not to score: a lateral, an SR and a PDF."""
    made = {}
    for i, (name, ts) in enumerate([("explicit", None), ("implicit", ImplicitVRLittleEndian),
                                    ("deflated", DeflatedExplicitVRLittleEndian), ("rle", RLELossless),
                                    ("jpegls", JPEGLSLossless), ("j2k", JPEG2000Lossless)]):
        made[name] = write(folder / f"{name}.dcm", grey(nih_images[i]), ts, PatientID=f"P-{name}")
    tools = [("jpeg-baseline", "dcmcjpeg", "+eb"), ("jpeg-lossless", "dcmcjpeg", "+e1"), ("big-endian", "dcmconv", "+tb")]
    for i, (name, tool, option) in enumerate(tools, start=len(made)):
        if have(tool):
            plain = write(folder / "plain" / f"{name}.dcm", grey(nih_images[i]), PatientID=f"P-{name}")
            run(tool, option, plain, folder / f"{name}.dcm")
            made[name] = folder / f"{name}.dcm"
    lateral = write(folder / "lateral.dcm", grey(nih_images[10]), PatientID="P-lateral", ViewPosition="LL")
    bundle = load_bundle(bundle_dir)
    record = StudyRecord(file="x.dcm", ids=identifiers(pydicom.dcmread(made["explicit"])), model=bundle.label,
                         weights_sha256=bundle.sha256, scores=Scores((0.2,) * 14, (0,) * 14, "normal", -0.6))
    (folder / "sr.dcm").write_bytes(sr_bytes(build_sr(record, bundle)))
    pdf = save(encapsulated_pdf(b"%PDF-1.4 a report\n%%EOF", {"PatientID": "P-pdf"}, "report"), folder / "pdf.dcm")
    return made, {"lateral": lateral, "sr": folder / "sr.dcm", "pdf": pdf}


@pytest.fixture(scope="module")
def objects(tmp_path_factory, nih_images, small_bundle):
    return modality_objects(tmp_path_factory.mktemp("modality"), nih_images, small_bundle)


def echo(port, called="CXRBATCH", calling="ECHOSCU", *extra):
    return subprocess.run(["echoscu", *extra, "-aet", calling, "-aec", called, "127.0.0.1", str(port)],
                          capture_output=True, text=True, timeout=60)


# storescu proposes uncompressed syntaxes unless told which one to propose, and its 128 presentation
# contexts miss some SOP classes (Comprehensive 3D SR) unless -R: each file is sent
# in its own transfer syntax with the option naming it, as a modality configured for it does.
STORESCU_OPTION = {ExplicitVRLittleEndian: "-xe", ImplicitVRLittleEndian: "-xi", ExplicitVRBigEndian: "-xb",
                   DeflatedExplicitVRLittleEndian: "-xd", RLELossless: "-xr", JPEGLSLossless: "-xt",
                   JPEGLSNearLossless: "-xu", JPEG2000Lossless: "-xv", JPEG2000: "-xw", JPEGBaseline8Bit: "-xy",
                   JPEGExtended12Bit: "-xx", JPEGLosslessSV1: "-xs"}


def storescu_commands(port, files, called="CXRBATCH", calling="MODALITY") -> list[list[str]]:
    """One storescu per transfer syntax among ``files``, proposing that syntax."""
    by_syntax: dict[str, list[str]] = {}
    for f in files:
        by_syntax.setdefault(pydicom.dcmread(f, stop_before_pixels=True).file_meta.TransferSyntaxUID, []).append(str(f))
    return [["storescu", "-R", STORESCU_OPTION[ts], "-aet", calling, "-aec", called, "127.0.0.1", str(port), *group]
            for ts, group in by_syntax.items()]


def store(port, files, **titles) -> subprocess.CompletedProcess:
    """Send ``files`` (each in its own transfer syntax); returncode 0 when every one was stored."""
    runs = [subprocess.run(cmd, capture_output=True, text=True, timeout=120)
            for cmd in storescu_commands(port, files, **titles)]
    return subprocess.CompletedProcess([], max(r.returncode for r in runs), "", "".join(r.stderr for r in runs))


# ---------------------------------------------------------------------- the listener, in this process
@pytest.fixture()
def listener(tmp_path):
    """start(**ListenConfig values) -> (StorageSCP, spool folder, paths reported as stored)."""
    started = []

    def start(spool_dir=None, **values):
        cfg = ListenConfig(port=free_port(), **values)
        stored = []
        scp = StorageSCP(cfg, Spool(spool_dir or tmp_path / "spool"), stored.append, cfg.tls_context())
        scp.start()
        started.append(scp)
        return scp, scp.spool.folder, stored

    yield start
    for scp in started:
        scp.stop()


@needs_dcmtk
def test_binds_loopback_by_default_answers_echo_and_checks_ae_titles(listener):
    scp, _, _ = listener(allow=("MODALITY", "ECHOSCU"))
    assert scp.server.socket.getsockname()[0] == "127.0.0.1"
    port = scp.cfg.port
    assert echo(port).returncode == 0
    wrong_called = echo(port, called="SOMEONE")
    assert wrong_called.returncode != 0 and "Called AE Title Not Recognized" in wrong_called.stderr
    stranger = echo(port, calling="INTRUDER")
    assert stranger.returncode != 0 and "Calling AE Title Not Recognized" in stranger.stderr
    assert scp.status()["rejected_associations"] == 2


@needs_dcmtk
def test_a_rejected_association_says_what_to_change(listener, caplog):
    """The node's log line for a rejected association names the fix: the allow-list that lacks
    the calling title, or the title the sender must call (it said only "Calling AE title not
    recognised", and docs/node.toml's allow-list rejects dcmtk's default STORESCU/ECHOSCU)."""
    scp, _, _ = listener(allow=("MODALITY1", "PACS"))
    with caplog.at_level(logging.WARNING, logger="cxr_batch"):
        assert echo(scp.cfg.port, calling="ECHOSCU").returncode != 0
        assert echo(scp.cfg.port, calling="PACS", called="SOMEONE").returncode != 0
    stranger, wrong_called = [r.getMessage() for r in caplog.records if "rejected" in r.getMessage()][:2]
    assert "ECHOSCU" in stranger and "allow-list (--allow, allow): MODALITY1, PACS" in stranger
    assert "must call us as CXRBATCH (--ae-title)" in wrong_called
    # ...and the title it called, which is what the operator corrects at the sender (dcmtk's
    # storescu without -aec calls ANY-SCP)
    assert "it called SOMEONE" in wrong_called, wrong_called


@needs_dcmtk
def test_each_object_is_spooled_as_received_in_its_own_transfer_syntax(listener, objects):
    scored, not_scored = objects
    scp, spool, stored = listener()
    sent = {**scored, **not_scored}
    done = store(scp.cfg.port, sent.values())
    assert done.returncode == 0, done.stderr
    assert len(stored) == len(sent) == len(list(spool.iterdir()))
    by_uid = {pydicom.dcmread(p).SOPInstanceUID: p for p in sent.values()}
    for path in stored:
        assert path.parent == spool and stat.S_IMODE(path.stat().st_mode) == 0o640
        got = pydicom.dcmread(path)
        source = pydicom.dcmread(by_uid[got.SOPInstanceUID])
        assert path.name.startswith(got.SOPInstanceUID + ".")
        assert got.file_meta.TransferSyntaxUID == source.file_meta.TransferSyntaxUID  # not recoded on the way
        if "PixelData" in source:
            assert got.PixelData == source.PixelData
    assert len({pydicom.dcmread(p).file_meta.TransferSyntaxUID for p in stored}) >= 6
    assert scp.status()["received"] == len(sent)


def _send_with_pynetdicom(port, ds, ae_title="CXRBATCH"):
    from pynetdicom import AE

    ae = AE(ae_title="MODALITY")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 20
    ae.add_requested_context(ds.SOPClassUID, ds.file_meta.TransferSyntaxUID)
    assoc = ae.associate("127.0.0.1", port, ae_title=ae_title)
    assert assoc.is_established
    try:
        answer = assoc.send_c_store(ds)
        return int(answer.Status) if "Status" in answer else None
    finally:
        if assoc.is_established:
            assoc.release()


def test_a_hostile_uid_never_names_a_path(listener, nih_images, tmp_path):
    scp, spool, stored = listener()
    ds = pydicom.dcmread(write(tmp_path / "x.dcm", grey(nih_images[0])))
    with pytest.warns(UserWarning), pydicom_checking():  # pydicom finds the UID invalid, as it should
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = "../../escaped"
        assert _send_with_pynetdicom(scp.cfg.port, ds) == 0x0000
    (path,) = stored
    assert path.parent == spool and path.name.endswith(".dcm") and "escaped" not in path.name
    assert not list(tmp_path.rglob("escaped*"))


def test_a_spool_folder_removed_under_the_node_is_made_again(listener, tmp_path):
    import shutil

    scp, spool, stored = listener()
    shutil.rmtree(spool)  # an operator "cleaning up" .cxr-batch
    ds = pydicom.dcmread(write(tmp_path / "x.dcm", grey_square()))
    assert _send_with_pynetdicom(scp.cfg.port, ds) == 0x0000
    assert [p.parent for p in stored] == [spool] and stored[0].is_file()


def test_an_object_over_the_size_limit_aborts_its_association_only(listener, nih_images, tmp_path):
    scp, spool, stored = listener(scoring={"max_file_bytes": 100_000})
    big = pydicom.dcmread(write(tmp_path / "big.dcm", grey(nih_images[0])))  # 512 x 512: 262 KB of pixels
    assert _send_with_pynetdicom(scp.cfg.port, big) is None  # aborted: no answer
    assert wait_for(lambda: scp.status()["aborted_oversize"] == 1, timeout=20)
    assert wait_for(lambda: not list(spool.iterdir()), timeout=10)  # its partial file goes when the association ends
    import numpy as np

    small = pydicom.dcmread(write(tmp_path / "small.dcm", np.full((64, 64), 100, np.uint8)))
    assert _send_with_pynetdicom(scp.cfg.port, small) == 0x0000 and len(stored) == 1


def test_a_full_disk_answers_out_of_resources_and_leaves_no_partial_file(listener, nih_images, tmp_path, small_disk):
    scp, spool, stored = listener(spool_dir=small_disk / "spool", min_free_mb=0)  # the disk full for real
    ds = pydicom.dcmread(write(tmp_path / "x.dcm", grey(nih_images[0]), PatientID="X"))  # 262 KB
    statuses = []
    for uid in [ds.SOPInstanceUID] * 2 + [generate_uid() for _ in range(20)]:  # one instance twice, then others
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = uid
        statuses.append(_send_with_pynetdicom(scp.cfg.port, ds))  # until the 4 MiB volume is full
    assert statuses[:2] == [0, 0] and 0xA700 in statuses and set(statuses) <= {0x0000, 0xA700}
    assert len(stored) == statuses.count(0) and scp.status()["refused"] == statuses.count(0xA700)
    assert len(list(spool.iterdir())) == len({p.name for p in stored})  # no temp file left behind
    assert all(pydicom.dcmread(p).SOPInstanceUID for p in stored)


def test_low_disk_space_refuses_before_the_disk_is_full(listener, nih_images, tmp_path):
    free_mb = os.statvfs(tmp_path).f_bavail * os.statvfs(tmp_path).f_frsize >> 20
    scp, spool, stored = listener(min_free_mb=free_mb + 1024)
    ds = pydicom.dcmread(write(tmp_path / "x.dcm", grey(nih_images[0])))
    assert _send_with_pynetdicom(scp.cfg.port, ds) == 0xA700
    assert not stored and not list(spool.iterdir()) and scp.status()["refused"] == 1
    scp.min_free = 0  # space again
    assert _send_with_pynetdicom(scp.cfg.port, ds) == 0x0000 and len(stored) == 1


def test_space_below_min_free_while_an_object_arrives_stops_its_writing(listener, tmp_path, small_disk, caplog):
    """min_free_mb was checked only once an object had arrived whole: objects arriving together
    (up to max_associations x max_file_bytes) could take the volume the results and ledger share
    from min_free_mb to full before any was refused."""
    import numpy as np

    scp, spool, stored = listener(spool_dir=small_disk / "spool", min_free_mb=2)  # of the 4 MiB volume
    free = []  # the volume's free space each time the node looks (a spy: the values are the real ones)
    real = scp.spool.free_bytes
    scp.spool.free_bytes = lambda: free.append(real()) or free[-1]
    pixels = np.random.default_rng(0).integers(0, 256, (1774, 1774), dtype=np.uint8)  # 3 MiB: it cannot fit
    big = pydicom.dcmread(write(tmp_path / "big.dcm", pixels, PatientID="BIG"))
    assert _send_with_pynetdicom(scp.cfg.port, big) == 0xA700
    assert min(free) >= scp.min_free - 2 * scp.cfg.max_pdu  # one PDU's worth below at most, never 1 MiB
    assert not stored and not list(spool.iterdir()) and scp.status()["refused"] == 1
    assert "less than 2 MiB free for the spool; answered 0xA700" in caplog.text
    small = pydicom.dcmread(write(tmp_path / "small.dcm", grey_square(), PatientID="SMALL"))
    assert _send_with_pynetdicom(scp.cfg.port, small) == 0x0000 and len(stored) == 1  # the association serves on


def _self_signed(folder: Path, name: str) -> tuple[Path, Path]:
    key, cert = folder / f"{name}.key", folder / f"{name}.pem"
    run("openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", f"/CN={name}",
        "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", key, "-out", cert)
    return key, cert


@pytest.mark.skipif(not have("openssl", "echoscu"), reason="openssl or dcmtk not installed")
def test_tls_only_with_a_certificate_and_peers_verified_against_the_ca(listener, tmp_path):
    server_key, server_cert = _self_signed(tmp_path, "node")
    client_key, client_cert = _self_signed(tmp_path, "modality")
    scp, _, _ = listener(tls_certificate=str(server_cert), tls_key=str(server_key), tls_ca=str(client_cert))
    port = scp.cfg.port
    assert echo(port).returncode != 0  # plain TCP is not spoken
    assert echo(port, "CXRBATCH", "ECHOSCU", "+tla", "+cf", str(server_cert)).returncode != 0  # no client cert
    trusted = echo(port, "CXRBATCH", "ECHOSCU", "+tls", str(client_key), str(client_cert), "+cf", str(server_cert))
    assert trusted.returncode == 0, trusted.stderr
    stranger_key, stranger_cert = _self_signed(tmp_path, "stranger")
    assert echo(port, "CXRBATCH", "ECHOSCU", "+tls", str(stranger_key), str(stranger_cert), "+cf",
                str(server_cert)).returncode != 0
    with pytest.raises(ConfigError, match="cannot be loaded"):
        ListenConfig(tls_certificate=str(tmp_path / "missing.pem"), tls_key=str(server_key)).tls_context()


@pytest.mark.parametrize("values, words", [
    ({"ae_title": "A" * 17}, "AE title"),
    ({"allow": ["GOOD", "BAD\\TITLE"]}, "AE title"),
    ({"send_to": "PACS@host"}, "send_to"),
    ({"tls_certificate": "node.pem"}, "together"),
    ({"tls_ca": "ca.pem"}, "tls_ca"),
    ({"send_tls_certificate": "c.pem", "send_tls_key": "k.pem"}, "send_tls_ca"),
    ({"port": 0}, "port"),
    ({"max_pdu": 100}, "max_pdu"),
])
def test_listen_config_errors_name_the_key(values, words):
    with pytest.raises(ConfigError, match=words):
        load_dataclass(ListenConfig, values, "listen")


def test_sending_back_makes_srs_and_spool_defaults_fit_a_spool():
    cfg = load_dataclass(ListenConfig, {"send_to": "PACS@127.0.0.1:104"}, "listen")
    assert cfg.dicom_sr and cfg.destination == Destination("PACS", "127.0.0.1", 104)
    assert cfg.settle == 0.0 and cfg.broken_deadline == 0.0


# ---------------------------------------------------------------------- the outbound queue, in this process
@pytest.fixture()
def queued_srs(tmp_path, objects, small_bundle):
    """A results folder whose ledger has the SRs of two scored images queued."""
    out = tmp_path / "out"
    ledger = Ledger(out / "ledger.sqlite")
    return out, ledger, queue_srs(out, ledger, objects[0], small_bundle)


def queue_srs(out: Path, ledger: Ledger, scored: dict[str, Path], bundle_dir) -> list[str]:
    """The SRs of two scored images written to ``out``/dicom and queued in ``ledger``; their UIDs."""
    bundle = load_bundle(bundle_dir)
    (out / "dicom").mkdir(parents=True)
    uids = []
    for name in ("explicit", "rle"):
        record = StudyRecord(file=name, ids=identifiers(pydicom.dcmread(scored[name])), model=bundle.label,
                             weights_sha256=bundle.sha256, scores=Scores((0.7,) * 14, (1,) * 14, "urgent", 0.4))
        sr = build_sr(record, bundle)
        (out / "dicom" / f"{name}.sr.dcm").write_bytes(sr_bytes(sr))
        ledger.commit([(f"uid:{name}", "c", record)], [], {f"uid:{name}": [(sr.SOPInstanceUID, f"dicom/{name}.sr.dcm")]})
        uids.append(sr.SOPInstanceUID)
    return uids


@needs_dcmtk
def test_sender_backs_off_while_the_pacs_is_down_then_drains_the_queue(queued_srs, tmp_path):
    out, ledger, uids = queued_srs
    port, pacs_dir = free_port(), tmp_path / "pacs"
    pacs_dir.mkdir()
    sender = Sender(ledger.path, out, Destination("PACS", "127.0.0.1", port), calling_ae="CXRBATCH", timeout=5,
                    retry_max=1.0).start()
    pacs = None
    try:
        assert wait_for(lambda: ledger.outbound_stats(time.time())["retrying"] >= 1, timeout=30)
        assert sender.status(ledger)["peer"] == "unreachable" and "no association" in sender.status(ledger)["last_error"]
        assert ledger.outbound_stats(time.time())["queued"] == 2
        pacs = subprocess.Popen(["storescp", "-aet", "PACS", "-od", str(pacs_dir), str(port)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        assert wait_for(lambda: ledger.outbound_stats(time.time())["delivered"] == 2, timeout=60)
    finally:
        sender.stop()
        if pacs is not None:
            pacs.terminate()
            pacs.wait(timeout=10)
    assert sorted(pydicom.dcmread(p).SOPInstanceUID for p in pacs_dir.iterdir()) == sorted(uids)
    stats = ledger.outbound_stats(time.time())
    assert stats["queued"] == 0 and stats["refused"] == 0 and sender.status(ledger)["peer"] == "ok"


@pytest.mark.skipif(not have("openssl", "storescp"), reason="openssl or dcmtk not installed")
def test_results_go_to_the_pacs_over_tls_only_to_a_trusted_certificate(queued_srs, tmp_path):
    out, ledger, uids = queued_srs
    pacs_key, pacs_cert = _self_signed(tmp_path, "pacs")
    node_key, node_cert = _self_signed(tmp_path, "node")
    _, stranger_cert = _self_signed(tmp_path, "stranger")
    port, pacs_dir = free_port(), tmp_path / "pacs"
    pacs_dir.mkdir()
    pacs = subprocess.Popen(["storescp", "+tls", str(pacs_key), str(pacs_cert), "-rc", "+cf", str(node_cert), "-aet",
                             "PACS", "-od", str(pacs_dir), str(port)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    destination = f"PACS@127.0.0.1:{port}"
    try:
        for ca, delivered in ((stranger_cert, 0), (pacs_cert, 2)):  # a PACS we cannot trust gets nothing
            cfg = ListenConfig(send_to=destination, send_tls_ca=str(ca), send_tls_certificate=str(node_cert),
                               send_tls_key=str(node_key))
            sender = Sender(ledger.path, out, cfg.destination, calling_ae="CXRBATCH", timeout=5, retry_max=1.0,
                            tls=cfg.send_tls_context()).start()
            try:
                assert wait_for(lambda: ledger.outbound_stats(time.time())["retrying" if not delivered else
                                                                           "delivered"] >= max(delivered, 1), timeout=60)
            finally:
                sender.stop()
            assert ledger.outbound_stats(time.time())["delivered"] == delivered
    finally:
        pacs.terminate()
        pacs.wait(timeout=10)
    assert sorted(pydicom.dcmread(p).SOPInstanceUID for p in pacs_dir.iterdir()) == sorted(uids)
    assert sender.status(ledger)["tls"]


def test_a_peer_that_refuses_the_object_keeps_it_queued_at_a_slow_pace(queued_srs):
    from pynetdicom import AE
    from pynetdicom.sop_class import CTImageStorage

    out, ledger, _ = queued_srs
    (out / "dicom" / "rle.sr.dcm").unlink()  # and one object file lost
    ae = AE(ae_title="PACS")
    ae.add_supported_context(CTImageStorage)  # stores no SRs
    port = free_port()
    server = ae.start_server(("127.0.0.1", port), block=False)
    sender = Sender(ledger.path, out, Destination("PACS", "127.0.0.1", port), calling_ae="CXRBATCH", timeout=5,
                    retry_max=1.0, refused_retry=3600.0).start()
    try:
        assert wait_for(lambda: ledger.outbound_stats(time.time())["refused"] == 2, timeout=30)
    finally:
        sender.stop()
        server.shutdown()
    errors = sorted(e for (e,) in ledger.db.execute("SELECT last_error FROM outbound"))
    assert "no presentation context accepted" in errors[0] and "missing" in errors[1]
    assert ledger.due_outbound(time.time() + 60) == []  # not again soon (tests/test_outbound.py: list, retry, drop)
    assert len(ledger.due_outbound(time.time() + 3601)) == 2 and ledger.outbound_stats(time.time())["queued"] == 2


def test_encapsulated_pdf_reports_get_uids_derived_from_source_and_model(tmp_path, small_bundle):
    from cxr_batch.reports import ReportOptions, ReportWriter

    bundle = load_bundle(small_bundle)
    record = StudyRecord(file="a.dcm", ids=identifiers(pydicom.dcmread(write(tmp_path / "a.dcm", grey_square()))),
                         model=bundle.label, weights_sha256=bundle.sha256,
                         scores=Scores((0.2,) * 14, (0,) * 14, "normal", -0.6))
    uids = []
    for folder in ("one", "two"):
        writer = ReportWriter(tmp_path / folder, bundle, ReportOptions(heatmaps=False, dicom_pdf=True))
        name = writer.write_study(record, key="uid:a")
        uids.append(pydicom.dcmread(tmp_path / folder / (name[:-4] + ".dcm")).SOPInstanceUID)
    assert uids[0] == uids[1] and uids[0] != record.ids.sop_uid


def grey_square():
    import numpy as np

    return np.tile(np.arange(64, dtype=np.uint8), (64, 1))


# ---------------------------------------------------------------------- cxr-batch listen, end to end
@pytest.fixture()
def pacs(tmp_path):
    """dcmtk's storescp as the PACS (AE title PACS), storing into tmp_path/pacs."""
    port, folder = free_port(), tmp_path / "pacs"
    folder.mkdir()
    proc = subprocess.Popen(["storescp", "-aet", "PACS", "-od", str(folder), str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        yield port, folder
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def listening(log: Path, pid: int) -> bool:
    return log.exists() and f"PID {pid}" in log.read_text() and "listening on" in log.read_text().split(
        f"PID {pid}")[-1]


def srs_at(folder: Path) -> dict[str, Path]:
    """{source SOPInstanceUID: SR file} of every object the PACS stored, each a Comprehensive 3D
    SR; two SRs of one source fail."""
    found = {}
    for path in folder.iterdir():
        ds = pydicom.dcmread(path)
        assert ds.SOPClassUID == COMPREHENSIVE_3D_SR, path.name
        source = ds.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence[0] \
            .ReferencedSOPSequence[0].ReferencedSOPInstanceUID
        assert source not in found
        found[source] = path
    return found


def assert_names_all_findings_and_references(sr_path: Path, source_uid: str) -> None:
    sr = hd.sr.srread(sr_path)
    groups = sr.content.get_image_measurement_groups()
    assert [g.tracking_identifier for g in groups] == list(FINDINGS)
    for group in groups:
        (image,) = group.source_images
        assert image.referenced_sop_instance_uid == source_uid


@pytest.mark.slow
@needs_dcmtk
def test_sigkill_mid_stream_and_restart_gives_one_sr_per_scored_image_at_the_pacs(tmp_path, objects, small_bundle,
                                                                                 pacs):
    """The issue's check: storescu sends real images in their own transfer syntaxes plus objects
    not to score; the node is SIGKILLed mid-stream and restarted; the modality sends again what
    it is unsure of; storescp as the PACS gets exactly one SR per scored image."""
    scored, not_scored = objects
    pacs_port, pacs_dir = pacs
    out, log, port = tmp_path / "out", tmp_path / "node.log", free_port()
    config = node_config(tmp_path / "node.toml")
    args = ("--port", port, "--ae-title", "CXRBATCH", "--send-to", f"PACS@127.0.0.1:{pacs_port}", "--no-pdf")
    files = [*scored.values(), *not_scored.values()]
    node = start_node(out, small_bundle, config, *args, log=log)
    try:
        assert wait_for(lambda: listening(log, node.pid) or node.poll() is not None), log.read_text()
        assert echo(port).returncode == 0
        assert store(port, files[:5]).returncode == 0
        assert wait_for(lambda: len(rows_now(out)) >= 2), log.read_text()
        script = "; ".join(shlex.join(cmd) for cmd in storescu_commands(port, files[5:]))
        sender = subprocess.Popen(["sh", "-c", script], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(0.5)
        os.killpg(node.pid, signal.SIGKILL)  # mid-stream: objects received, in the spool, being scored, being sent
        assert node.wait(timeout=30) == -9
        sender.wait(timeout=60)
        node = start_node(out, small_bundle, config, *args, log=log)
        assert wait_for(lambda: listening(log, node.pid) or node.poll() is not None), log.read_text()
        assert store(port, files).returncode == 0  # the modality sends again all it is unsure of
        assert wait_for(lambda: len(list(pacs_dir.iterdir())) >= len(scored) and len(rows_now(out)) == len(files),
                        timeout=240), (sorted(p.name for p in pacs_dir.iterdir()), log.read_text()[-3000:])
        assert wait_for(lambda: status(out).get("outbound", {}).get("queued") == 0)
        time.sleep(3)  # rescans and the sender's idle look: nothing may be added twice
        assert echo(port).returncode == 0
    finally:
        assert stop(node) == 0, log.read_text()[-3000:]
    sources = {pydicom.dcmread(p).SOPInstanceUID: name for name, p in scored.items()}
    rows = rows_now(out)
    ok = [r for r in rows if r["status"] == "ok"]
    assert sorted(r["sop_uid"] for r in ok) == sorted(sources)  # each scored image, once
    # the lateral, the SR (made for the explicit image) and the PDF
    assert sorted(r["patient_id"] for r in rows if r["status"] == "skipped") == ["P-explicit", "P-lateral", "P-pdf"]
    at_pacs = srs_at(pacs_dir)
    assert set(at_pacs) == set(sources)
    for source_uid, path in at_pacs.items():
        assert_names_all_findings_and_references(path, source_uid)
    assert not list((out / ".cxr-batch" / "spool").iterdir())  # the spool is emptied after each commit
    final = status(out)
    assert final["state"] == "stopped" and final["outbound"]["delivered"] == len(sources)


@pytest.mark.slow
@needs_dcmtk
def test_pacs_down_then_up_the_queue_drains_with_srs_and_pdfs(tmp_path, objects, small_bundle):
    scored, _ = objects
    out, log, port, pacs_port = tmp_path / "out", tmp_path / "node.log", free_port(), free_port()
    pacs_dir = tmp_path / "pacs"
    pacs_dir.mkdir()
    config = node_config(tmp_path / "node.toml", archive_dir=str(tmp_path / "archive"))
    node = start_node(out, small_bundle, config, "--port", port, "--send-to", f"PACS@127.0.0.1:{pacs_port}",
                      "--allow", "MODALITY", "--dicom-pdf", log=log)
    pacs = None
    try:
        assert wait_for(lambda: listening(log, node.pid) or node.poll() is not None), log.read_text()
        assert echo(port, calling="INTRUDER").returncode != 0  # not on the allow-list
        assert store(port, [scored["explicit"], scored["jpegls"]]).returncode == 0
        assert wait_for(lambda: len(rows_now(out)) == 2)
        assert wait_for(lambda: status(out).get("outbound", {}).get("retrying", 0) >= 1)
        down = status(out)["outbound"]
        assert down["queued"] == 4 and down["peer"] == "unreachable" and down["last_error"]
        assert down["destination"] == f"PACS@127.0.0.1:{pacs_port}" and status(out)["listen"]["rejected_associations"] == 1
        pacs = subprocess.Popen(["storescp", "-aet", "PACS", "-od", str(pacs_dir), str(pacs_port)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        assert wait_for(lambda: status(out).get("outbound", {}).get("delivered") == 4, timeout=120), status(out)
    finally:
        assert stop(node) == 0, log.read_text()[-3000:]
        if pacs is not None:
            pacs.terminate()
            pacs.wait(timeout=10)
    kinds = Counter(pydicom.dcmread(p).SOPClassUID.name for p in pacs_dir.iterdir())
    assert kinds == {"Comprehensive 3D SR Storage": 2, "Encapsulated PDF Storage": 2}
    assert len(list((tmp_path / "archive").iterdir())) == 2  # archived, not deleted, with archive_dir
    text = log.read_text()
    assert "DOE" not in text and "JANE" not in text  # no patient names in the log


def test_cli_config_errors_exit_2_before_loading_anything(tmp_path):
    bad = tmp_path / "node.toml"
    bad.write_text('[listen]\nsend_to = "PACS@nowhere"\n')
    done = subprocess.run([sys.executable, "-m", "cxr_batch", "listen", "--out", str(tmp_path / "o"), "--config",
                           str(bad)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "send_to" in done.stderr and "Traceback" not in done.stderr
    assert not (tmp_path / "o").exists()


@needs_dcmtk
def test_a_removed_spool_is_made_again_and_the_node_stays_running(tmp_path, objects, small_bundle):
    """The spool (OUT/.cxr-batch/spool) removed by someone cleaning up: the node's status.json
    read "degraded: the watched folder is missing" (there is no watched folder in listen) until a
    modality happened to send again. The spool is the node's own folder: it is made again at the
    next heartbeat, said in the log, and the node stays running and stores."""
    import shutil

    scored, _ = objects
    out, log, port = tmp_path / "out", tmp_path / "node.log", free_port()
    node = start_node(out, small_bundle, node_config(tmp_path / "node.toml"), "--port", port, "--no-pdf", log=log)
    try:
        assert wait_for(lambda: listening(log, node.pid) or node.poll() is not None), log.read_text()
        spool = out / ".cxr-batch" / "spool"
        assert spool.is_dir()
        shutil.rmtree(spool)
        assert wait_for(lambda: spool.is_dir(), timeout=20), log.read_text()[-2000:]
        time.sleep(2)  # heartbeats
        assert status(out)["state"] == "running", status(out)
        assert store(port, list(scored.values())[:1]).returncode == 0
        assert wait_for(lambda: [r["status"] for r in rows_now(out)] == ["ok"], timeout=60), log.read_text()[-2000:]
    finally:
        assert stop(node) == 0, log.read_text()[-3000:]
    text = log.read_text()
    assert "the spool" in text and "made again" in text and "watched folder" not in text, text[-2000:]


def test_stopping_while_an_association_is_being_rejected_raises_nothing_in_its_thread(listener, monkeypatch):
    """A node stopped just as it rejects an association (state 13 of PS3.8: the A-ASSOCIATE-RJ
    sent, the connection not yet closed): pynetdicom's shutdown aborted that association too, an
    event state 13 does not take, and its thread died with "InvalidEventError: Invalid event
    'Evt15' for the current state 'Sta13'", a traceback on the node's stderr as it stopped (seen in
    CI on a loaded machine). The rejection is held open here by a slow rejection handler."""
    import threading

    from .dicomwire import A_ASSOCIATE_RJ, associate_rq, connect, read_pdu

    rejecting = threading.Event()
    said = StorageSCP.on_rejected

    def slow(self, event):
        said(self, event)
        rejecting.set()
        time.sleep(1.0)  # a loaded machine: the association thread is still in state 13

    monkeypatch.setattr(StorageSCP, "on_rejected", slow)
    scp, _, _ = listener(allow=("MODALITY",))
    died = []
    before, threading.excepthook = threading.excepthook, lambda args: died.append(args.exc_value)
    try:
        sock = connect(scp.cfg.port)
        sock.sendall(associate_rq(called=b"SOMEONE"))
        assert rejecting.wait(10)
        scp.stop()
        time.sleep(1.5)
        assert read_pdu(sock)[0] == A_ASSOCIATE_RJ
        sock.close()
    finally:
        threading.excepthook = before
    assert not died, died


def test_a_results_folder_whose_parent_went_is_not_made_again_by_the_spool(tmp_path, small_bundle):
    """OUT on a share (share/site/out) and the share unmounted: the watch daemon leaves OUT
    unmade until its folder is back (never the share's folders on the disk it was mounted over),
    but listen's spool, OUT/.cxr-batch/spool, was made again with every folder above it at the
    next heartbeat, and OUT with it: results, ledger and lock on the wrong disk, hidden once
    the share was mounted again."""
    share = tmp_path / "share"
    out = share / "site" / "out"
    port = free_port()
    node = start_node(out, small_bundle, node_config(tmp_path / "n.toml"), "--port", port, log=tmp_path / "log")
    try:
        assert wait_for(lambda: status(out).get("state") == "running", timeout=90), (tmp_path / "log").read_text()
        import shutil

        while (share / "site").exists():  # the share's folders gone (unmounted)
            shutil.rmtree(share / "site", ignore_errors=True)
        assert wait_for(lambda: "made again once" in (tmp_path / "log").read_text(), timeout=30)
        time.sleep(2)  # heartbeats (0.5 s) after the daemon saw it
        assert not (share / "site").exists(), (tmp_path / "log").read_text()[-2000:]
        ds = pydicom.dcmread(write(tmp_path / "x.dcm", grey_square()))  # a modality sends meanwhile: not stored
        assert _send_with_pynetdicom(int(port), ds) != 0x0000
        assert not (share / "site").exists() and "Traceback" not in (tmp_path / "log").read_text()
    finally:
        assert stop(node) == 0


def test_a_results_share_unmounted_under_the_node_stores_nothing_on_the_disk_below(tmp_path, small_bundle):
    """OUT a share's mount point, unmounted while the node runs: the folder it was mounted on is
    still there, so the spool (OUT/.cxr-batch/spool) was made again in it and C-STOREs answered
    success from the disk below the share, hidden (never scored) once it came back. Now none is
    answered success (the modality keeps the image and sends it again) until the share is back."""
    from .watchkit import can_mount_a_share, in_namespace, seen_by, start_on_a_share

    if not can_mount_a_share():
        pytest.skip("needs root, unshare and nsenter to mount a share at OUT for the node alone")
    out, kept, log, port = tmp_path / "out", tmp_path / "kept", tmp_path / "log", free_port()
    out.mkdir()
    kept.mkdir()
    # min_free_mb 0: the 64 MiB share is below the default floor of free space for the spool
    node = start_on_a_share(out, ["listen", "--out", out, "--weights", small_bundle, "--device", "cpu", "--no-pdf",
                                  "--config", node_config(tmp_path / "n.toml", min_free_mb=0), "--port", port], log)
    share = seen_by(node, out)
    ds = pydicom.dcmread(write(tmp_path / "x.dcm", grey_square()))
    try:
        assert wait_for(lambda: status(share).get("state") == "running", timeout=90), log.read_text()[-2000:]
        in_namespace(node, "mount", "--bind", out, kept)
        in_namespace(node, "umount", "-l", out)
        assert wait_for(lambda: "no longer a mount point" in log.read_text(), timeout=30), log.read_text()[-2000:]
        assert _send_with_pynetdicom(port, ds) != 0x0000  # a modality sends meanwhile: not stored
        time.sleep(2)  # heartbeats after the daemon saw it
        assert not list(out.iterdir()), log.read_text()[-2000:]
        in_namespace(node, "mount", "--bind", kept, out)
        assert wait_for(lambda: status(share).get("state") == "running", timeout=30), log.read_text()[-2000:]
        assert _send_with_pynetdicom(port, ds) == 0x0000
        assert wait_for(lambda: [r["sop_uid"] for r in rows_now(share)] == [ds.SOPInstanceUID], timeout=60), \
            log.read_text()[-2000:]
    finally:
        assert stop(node) == 0, log.read_text()[-3000:]
    assert not list(out.iterdir())


@pytest.mark.parametrize("how", ["moved", "removed"])
def test_objects_acknowledged_but_not_scored_when_the_results_folder_goes_are_scored_or_named(tmp_path, small_bundle,
                                                                                              nih_images, how):
    """`mv OUT OUT.old` while objects answered as stored wait in the spool for their batch: the
    node made OUT again with an empty spool and the objects stayed in OUT.old's, never scored
    and never said. Now they move with the node to the new spool and are scored there; objects
    that cannot be (`rm -rf OUT` deleted them) are named by SOPInstanceUID in the log and in
    status.json (``not_scored``), so the modality can send them again."""
    import shutil

    out, log, port = tmp_path / "out", tmp_path / "log", free_port()
    # a batch waits 20 s to fill: the objects are still in the spool when OUT goes
    node = start_node(out, small_bundle, node_config(tmp_path / "n.toml", batch_size=64, max_wait=20.0), "--port",
                      port, "--no-pdf", log=log)
    sent = [pydicom.dcmread(write(tmp_path / f"x{i}.dcm", grey(nih_images[i]), PatientID=f"X{i}")) for i in range(3)]
    spool = out / ".cxr-batch" / "spool"
    try:
        assert wait_for(lambda: listening(log, node.pid) or node.poll() is not None), log.read_text()
        assert [_send_with_pynetdicom(port, ds) for ds in sent] == [0x0000] * 3
        assert len(list(spool.glob("*.dcm"))) == 3 and not rows_now(out)  # acknowledged, not yet scored
        if how == "moved":
            out.rename(tmp_path / "out.old")
            assert wait_for(lambda: len(rows_now(out)) == 3, timeout=90), log.read_text()[-2000:]
            assert sorted(r["sop_uid"] for r in rows_now(out)) == sorted(ds.SOPInstanceUID for ds in sent)
            assert not list((tmp_path / "out.old" / ".cxr-batch" / "spool").iterdir())
        else:
            while out.exists():
                shutil.rmtree(out, ignore_errors=True)
            assert wait_for(lambda: len(status(out).get("not_scored", [])) == 3, timeout=30), log.read_text()[-2000:]
            assert sorted(status(out)["not_scored"]) == sorted(ds.SOPInstanceUID for ds in sent)
    finally:
        assert stop(node) == 0, log.read_text()[-3000:]
    if how == "removed":
        text = log.read_text()
        assert "not scored" in text and all(ds.SOPInstanceUID in text.split("not scored")[-1] for ds in sent), text


def test_a_results_folder_replaced_by_a_file_answers_out_of_resources_so_the_sender_retries(listener, tmp_path,
                                                                                            caplog):
    """OUT replaced by a file while the node runs: the C-STORE's temp file could not be made and
    the association was aborted (dropped_spool), so the sender never heard a status and a
    modality may count the object as failed for good. It is answered 0xA700 (out of resources):
    the sender keeps its copy and sends it again; once OUT is a folder again it is stored."""
    import shutil

    out = tmp_path / "out"
    scp, spool, stored = listener(spool_dir=out / ".cxr-batch" / "spool")
    shutil.rmtree(out)
    out.write_text("an operator's file where the results folder was")
    ds = pydicom.dcmread(write(tmp_path / "x.dcm", grey_square()))
    assert _send_with_pynetdicom(scp.cfg.port, ds) == 0xA700
    status = scp.status()
    assert status["refused"] == 1 and status["dropped_spool"] == 0 and not stored
    assert ("not stored: the spool cannot be written (Not a directory); answered 0xA700 (out of resources): the "
            "sender retries") in caplog.text
    out.unlink()  # the operator puts it right: the sender's retry is stored
    assert _send_with_pynetdicom(scp.cfg.port, ds) == 0x0000 and [p.parent for p in stored] == [spool]


def test_a_spool_that_stays_unwritable_is_logged_once_not_once_per_image(listener, tmp_path, caplog):
    """A modality retrying a study while OUT is a file: every C-STORE of every retry wrote the
    same error line (hundreds an hour for a CT-sized study), burying what else the log says. The
    first is an error naming the cause; the next ones with the same cause are counted in
    status.json (refused), not logged, until a C-STORE is stored again, which the log says."""
    import shutil

    caplog.set_level(logging.INFO, "cxr_batch")
    out = tmp_path / "out"
    scp, spool, stored = listener(spool_dir=out / ".cxr-batch" / "spool")
    shutil.rmtree(out)
    out.write_text("an operator's file where the results folder was")
    datasets = [pydicom.dcmread(write(tmp_path / f"x{i}.dcm", grey_square() + i)) for i in range(3)]
    for ds in datasets:
        assert _send_with_pynetdicom(scp.cfg.port, ds) == 0xA700
    assert scp.status()["refused"] == 3
    assert caplog.text.count("the spool cannot be written (Not a directory)") == 1, caplog.text
    out.unlink()
    assert _send_with_pynetdicom(scp.cfg.port, datasets[0]) == 0x0000
    assert "the spool can be written again: storing (2 more C-STOREs were refused meanwhile)" in caplog.text


@needs_dcmtk
def test_a_second_listen_or_a_watch_on_its_spool_is_refused_naming_the_node(tmp_path, objects, small_bundle):
    """Two daemons on one node's files: a second `listen` on the same OUT and port (a systemd
    unit and a manual run from the same config) was refused as "cannot listen on ...: Address
    already in use (another program ... may hold the port)", not naming the node that holds the
    results folder; and a `watch` pointed at the spool (OUT/.cxr-batch/spool) ran beside the
    node: it scored the node's studies into another results folder while the node deleted them
    under it, as each study was committed (the spool took no claim, so neither was refused).
    Both now stop before the model loads naming the node's PID, and the node goes on scoring."""
    from .watchkit import start_daemon, watch_config

    scored, _ = objects
    out, log, port = tmp_path / "out", tmp_path / "node.log", free_port()
    config = node_config(tmp_path / "node.toml")
    node = start_node(out, small_bundle, config, "--port", port, "--no-pdf", log=log)
    try:
        assert wait_for(lambda: listening(log, node.pid) or node.poll() is not None, timeout=90), log.read_text()
        holder = f"cxr-batch listen (PID {node.pid})"
        second = start_node(out, small_bundle, config, "--port", port, "--no-pdf", log=tmp_path / "second.log")
        assert second.wait(timeout=120) == 1
        said = (tmp_path / "second.log").read_text()
        assert f"{out} is in use by {holder}" in said and "Address already in use" not in said, said
        watch = start_daemon(out / ".cxr-batch" / "spool", tmp_path / "other", small_bundle,
                             watch_config(tmp_path / "watch.toml"))
        try:
            _, err = watch.communicate(timeout=120)
        except subprocess.TimeoutExpired:
            stop(watch)
            raise AssertionError("a watch daemon ran on the node's spool")
        assert watch.returncode == 1 and holder in err and "spool" in err, err
        assert not (tmp_path / "other").exists()
        assert store(port, list(scored.values())[:1]).returncode == 0
        assert wait_for(lambda: [r["status"] for r in rows_now(out)] == ["ok"], timeout=60), log.read_text()[-2000:]
    finally:
        assert stop(node) == 0, log.read_text()[-3000:]

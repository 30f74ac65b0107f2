"""A real PACS and RIS in the loop (issue 24): ``cxr-batch pull`` against a real Orthanc started
by the test, holding real NIH radiographs made into frontal chest DX by real tools (pydicom's
encoders, dcmtk's dcmcjpeg and img2dcm) in several transfer syntaxes, and objects not to score
(a lateral, a CT, an SR, an Encapsulated PDF); a RIS on MLLP (hl7apy's server). The issue's
check: one SR per frontal image in Orthanc, in the source's study, referencing it, accepted by
dciodvfy, with tracking identifiers and the algorithm as contributing equipment; an ORU^R01 per
study with its accession number and patient ID, 15 OBX, AA on the urgent finding; a second pull
adds nothing. Also: C-GET, a pull killed midway, paging, a refused association, an unknown move
destination, a RIS that is down, scan by STOW-RS to a second Orthanc, watch with --hl7-to.
Skipped cleanly without Orthanc or the NIH images. Every pull pins --precision fp32 --device cpu."""

from __future__ import annotations

import datetime as dt
import io
import json
import os
import re
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pydicom
import pytest
import torch
from PIL import Image
from pydicom.uid import ImplicitVRLittleEndian, JPEG2000Lossless, JPEGLSLossless, RLELossless, generate_uid

from cxr_batch.bundle import save_bundle
from cxr_batch.dicom_build import encapsulated_pdf, radiograph, save
from cxr_batch.findings import FINDINGS
from cxr_batch.integration.pull import FIND_CAP, TooMany, study_pages
from cxr_batch.ledger import Ledger
from cxr_batch.model import ModelConfig, build_model
from cxr_batch.patient import PatientEncoding
from cxr_batch.preprocess import Preprocessing
from tests.dicomgen import HEADER, grey, have, run, write
from tests.fakepacs import ScriptedPACS
from tests.orthanc import make_orthanc  # noqa: F401  (fixture: skips where Orthanc is absent)
from tests.ris import RIS
from tests.test_sr import ACCEPTED_DCIODVFY_WARNINGS
from tests.watchkit import free_port, status, stop, toml_table, wait_for

COMPREHENSIVE_3D_SR = "1.2.840.10008.5.1.4.1.1.88.34"
CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"
ENCAPSULATED_PDF = "1.2.840.10008.5.1.4.1.1.104.1"


@pytest.fixture(scope="module")
def urgent_bundle(tmp_path_factory) -> Path:
    """A random-weights bundle at 96 px whose Pneumothorax threshold (0.01) flags every study:
    each is urgent, so each ORU carries an ``AA``."""
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("bundle") / "urgent"
    thresholds = {f: (0.01 if f == "Pneumothorax" else 0.5) for f in FINDINGS}
    return save_bundle(folder, build_model(ModelConfig(tabular_skip=True)), name="urgent", version="test",
                       preprocessing=Preprocessing(image_size=96), encoding=PatientEncoding(), thresholds=thresholds)


def _small(path: Path, side: int = 320):
    """A real radiograph, downscaled: the archive stays small and scoring fast."""
    return grey(path)[::max(1, 1024 // side), ::max(1, 1024 // side)].copy()


@pytest.fixture(scope="module")
def archive(tmp_path_factory, nih_images):
    """({name: frontal DX file}, {name: object not to score}) made from real NIH radiographs."""
    folder = tmp_path_factory.mktemp("archive")
    frontal = {}
    shared_study, shared_accession = generate_uid(), "ACC-SHARED"  # two frontal images in one study (one patient)
    for i, (name, ts) in enumerate([("explicit", None), ("implicit", ImplicitVRLittleEndian), ("rle", RLELossless),
                                    ("jpegls", JPEGLSLossless), ("j2k", JPEG2000Lossless)]):
        study = dict(StudyInstanceUID=shared_study, AccessionNumber=shared_accession, PatientID="P-shared") \
            if i < 2 else dict(AccessionNumber=f"A-{name}", PatientID=f"P-{name}")
        frontal[name] = write(folder / f"{name}.dcm", _small(nih_images[i]), ts, ViewPosition="AP" if i == 1 else "PA",
                              **study)
    for i, (name, option) in enumerate([("jpeg-baseline", "+eb"), ("jpeg-lossless", "+e1")], start=len(frontal)):
        if have("dcmcjpeg"):
            plain = write(folder / "plain" / f"{name}.dcm", _small(nih_images[i]), PatientID=f"P-{name}",
                          AccessionNumber=f"A-{name}")
            run("dcmcjpeg", option, plain, folder / f"{name}.dcm")
            frontal[name] = folder / f"{name}.dcm"
    if have("img2dcm"):  # a JPEG photo of the film made into a DICOM by dcmtk, as a digitiser does
        jpeg = folder / "plain" / "film.jpg"
        jpeg.parent.mkdir(exist_ok=True)
        Image.fromarray(_small(nih_images[8])).save(jpeg, quality=92)
        keys = dict(Modality="DX", PatientID="P-img2dcm", PatientName="DOE^JOHN", AccessionNumber="ACC-img2dcm",
                    StudyDate="20240302", ViewPosition="PA", BodyPartExamined="CHEST")
        run("img2dcm", *[x for k, v in keys.items() for x in ("-k", f"{k}={v}")], jpeg, folder / "img2dcm.dcm")
        frontal["img2dcm"] = folder / "img2dcm.dcm"
    others = {"lateral": write(folder / "lateral.dcm", _small(nih_images[10]), PatientID="P-lateral",
                               AccessionNumber="ACC-lateral", ViewPosition="LL")}
    ct = radiograph(_small(nih_images[11]), modality="CT", PatientID="P-rle", AccessionNumber="A-rle", **HEADER_NO_ID)
    ct.SOPClassUID = ct.file_meta.MediaStorageSOPClassUID = CT_IMAGE
    ct.StudyInstanceUID = pydicom.dcmread(frontal["rle"]).StudyInstanceUID  # a CT series in a DX study
    ct.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    others["ct"] = save(ct, folder / "ct.dcm")
    lateral = pydicom.dcmread(others["lateral"])
    study = {k: lateral.get(k) for k in ("PatientID", "PatientName", "StudyInstanceUID", "StudyDate",
                                        "AccessionNumber")}
    others["pdf"] = save(encapsulated_pdf(b"%PDF-1.4 a report\n%%EOF", study, "report"), folder / "pdf.dcm")
    others["sr"] = save(_foreign_sr(lateral), folder / "sr.dcm")  # in the lateral's study: Modality SR
    return frontal, others


HEADER_NO_ID = {k: v for k, v in HEADER.items() if k not in ("PatientID", "AccessionNumber")}


def _foreign_sr(image: pydicom.Dataset) -> pydicom.Dataset:
    """A radiologist's (highdicom) Comprehensive 3D SR about ``image``, in its study."""
    import highdicom as hd

    image = pydicom.Dataset(image)
    for keyword in ("PatientBirthDate", "PatientSex", "StudyTime", "StudyID", "ReferringPhysicianName"):
        setattr(image, keyword, image.get(keyword, ""))
    report = hd.sr.Comprehensive3DSR(
        evidence=[image], content=hd.sr.MeasurementReport(
            observation_context=hd.sr.ObservationContext(),
            procedure_reported=hd.sr.CodedConcept("399208008", "SCT", "Plain chest X-ray"),
            imaging_measurements=[hd.sr.MeasurementsAndQualitativeEvaluations(
                tracking_identifier=hd.sr.TrackingIdentifier(uid=generate_uid(), identifier="read"),
                qualitative_evaluations=[hd.sr.QualitativeEvaluation(
                    hd.sr.CodedConcept("121071", "DCM", "Finding"),
                    hd.sr.CodedConcept("17621005", "SCT", "Normal"))])]),
        series_instance_uid=generate_uid(), series_number=50, sop_instance_uid=generate_uid(), instance_number=1,
        manufacturer="reading room")
    return report


def _upload(pacs, files) -> None:
    for f in files:
        pacs.rest("POST", "/instances", data=Path(f).read_bytes())


def _pull_cmd(pacs, port: int, out: Path, bundle: Path, *extra) -> list[str]:
    return [sys.executable, "-m", "cxr_batch", "pull", "--from", f"{pacs.aet}@127.0.0.1:{pacs.dicom_port}",
            "--ae-title", "CXRBATCH", "--port", str(port), "--since", "2000-01-01", "--out", str(out), "--no-pdf",
            "--weights", str(bundle), "--device", "cpu", "--precision", "fp32", "--workers", "0", *map(str, extra)]


def pull(pacs, port, out, bundle, *extra, env=None, timeout=300) -> subprocess.CompletedProcess:
    return subprocess.run(_pull_cmd(pacs, port, out, bundle, *extra), capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})})


def cli(*args, timeout=300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cxr_batch", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout)


def _held(pacs) -> dict[str, pydicom.Dataset]:
    """Every instance Orthanc holds, by SOP Instance UID."""
    return {ds.SOPInstanceUID: ds for ds in (pydicom.dcmread(io.BytesIO(pacs.instance_file(i)))
                                             for i in pacs.instances())}


def _segments(message: str) -> dict[str, list[list[str]]]:
    out: dict[str, list[list[str]]] = {}
    for segment in filter(None, message.replace("\n", "\r").split("\r")):
        fields = segment.split("|")
        out.setdefault(fields[0], []).append(fields)
    return out


def _source_of(sr: pydicom.Dataset) -> str:
    (library,) = [c for c in sr.ContentSequence if c.ConceptNameCodeSequence[0].CodeValue == "111028"]
    return library.ContentSequence[0].ContentSequence[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID


def _check_srs(pacs, frontal: dict[str, Path], tmp_path: Path) -> dict[str, pydicom.Dataset]:
    """Orthanc holds exactly one of our SRs per frontal image, in its study, referencing it, with
    tracking identifiers, the algorithm as contributing equipment, and no dciodvfy error."""
    held = _held(pacs)
    ours = [ds for ds in held.values() if ds.SOPClassUID == COMPREHENSIVE_3D_SR and ds.get("Manufacturer") == "cxr-batch"]
    sources = {pydicom.dcmread(f).SOPInstanceUID: pydicom.dcmread(f, stop_before_pixels=True) for f in frontal.values()}
    by_source = Counter(_source_of(sr) for sr in ours)
    assert by_source == Counter(sources.keys()), (by_source, list(sources))
    for sr in ours:
        source = sources[_source_of(sr)]
        assert sr.StudyInstanceUID == source.StudyInstanceUID and sr.PatientID == source.PatientID
        assert sr.AccessionNumber == source.AccessionNumber
        (algorithm,) = [e for e in sr.ContributingEquipmentSequence
                        if e.PurposeOfReferenceCodeSequence[0].CodingSchemeDesignator == "99IHE"]
        assert algorithm.PurposeOfReferenceCodeSequence[0].CodeValue == "1630" and algorithm.DeviceUID
        (measurements,) = [c for c in sr.ContentSequence if c.ConceptNameCodeSequence[0].CodeMeaning ==
                           "Imaging Measurements"]
        tracking = [c.UID for g in measurements.ContentSequence for c in g.ContentSequence
                    if c.ConceptNameCodeSequence[0].CodeValue == "112040"]
        assert len(set(tracking)) == 14
        if have("dciodvfy"):
            path = tmp_path / f"{sr.SOPInstanceUID}.dcm"
            sr.save_as(path, enforce_file_format=True)
            done = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=60)
            lines = (done.stdout + done.stderr).splitlines()
            assert not [x for x in lines if x.startswith("Error")], lines
            assert not [w for w in lines if w.startswith("Warning")
                        and not any(re.search(a, w) for a in ACCEPTED_DCIODVFY_WARNINGS)], lines
    return {_source_of(sr): sr for sr in ours}


def _check_orus(received: list[str], frontal: dict[str, Path]) -> None:
    """One ORU^R01 per scored study, its accession number and patient ID, 15 OBX (the
    priority and 14 findings), AA on the urgent finding, result status P."""
    expected = Counter((str(pydicom.dcmread(f).AccessionNumber), str(pydicom.dcmread(f).PatientID))
                       for f in frontal.values())
    got = Counter()
    for message in received:
        seg = _segments(message)
        assert seg["MSH"][0][8] == "ORU^R01^ORU_R01"
        accession, patient = seg["OBR"][0][3], seg["PID"][0][3]
        assert seg["OBR"][0][18] == accession and seg["OBR"][0][25] == "P"
        got[(accession, patient)] += 1
        obx = seg["OBX"]
        assert len(obx) >= 15
        flags = {o[3].split("^")[1]: o[8] for o in obx}
        assert flags["Triage priority"] == "AA" and flags["Pneumothorax"] == "AA"
    assert got == expected


def _pacs_with(make_orthanc, port: int, files, **options):
    pacs = make_orthanc(modalities={"cxrbatch": ("CXRBATCH", "127.0.0.1", port)}, **options)
    _upload(pacs, files)
    return pacs


# ---------------------------------------------------------------------- the check
def test_pull_leaves_one_sr_per_frontal_image_and_an_oru_per_study_once(archive, urgent_bundle, make_orthanc,
                                                                        tmp_path):
    frontal, others = archive
    port = free_port()
    pacs = _pacs_with(make_orthanc, port, [*frontal.values(), *others.values()])
    before = set(pacs.instances())
    out = tmp_path / "out"
    with RIS() as ris:
        first = pull(pacs, port, out, urgent_bundle, "--send-to", f"{pacs.aet}@127.0.0.1:{pacs.dicom_port}",
                     "--hl7-to", ris.endpoint)
        assert first.returncode == 0, first.stderr[-3000:]
        srs = _check_srs(pacs, frontal, tmp_path)
        _check_orus(ris.received, frontal)
        assert len(ris.received) == len(frontal)
        # the lateral was retrieved and skipped; the CT, the SR and the PDF were never retrieved
        assert f"{len(frontal) + 1} image(s) retrieved" in first.stderr
        assert "0 retrieval failure(s)" in first.stderr
        final = json.loads((out / "status.json").read_text())
        assert final["outbound"]["delivered"] == len(frontal) and final["outbound"]["queued"] == 0
        assert final["outbound_hl7"]["delivered"] == len(frontal) and final["outbound_hl7"]["queued"] == 0
        assert final["pull"]["studies_retrieved"] == len({pydicom.dcmread(f).StudyInstanceUID
                                                          for f in [*frontal.values(), others["lateral"]]})
        held_after_first = set(pacs.instances())
        assert held_after_first - before and len(held_after_first - before) == len(srs)
        # the same pull again: nothing retrieved, no instance added, no message sent
        second = pull(pacs, port, out, urgent_bundle, "--send-to", f"{pacs.aet}@127.0.0.1:{pacs.dicom_port}",
                      "--hl7-to", ris.endpoint)
        assert second.returncode == 0, second.stderr[-3000:]
        assert "0 image(s) retrieved" in second.stderr and f"{len(frontal) + 1} already scored" in second.stderr
        assert set(pacs.instances()) == held_after_first and len(ris.received) == len(frontal)
    # results.csv: each frontal image scored, the lateral skipped, nothing twice
    rows = (out / "results.csv").read_text().splitlines()
    assert len(rows) == 1 + len(frontal) + 1


def test_pull_by_c_get_needs_no_move_destination(archive, urgent_bundle, make_orthanc, tmp_path):
    frontal, _ = archive
    some = {k: frontal[k] for k in ("explicit", "jpegls")}
    pacs = make_orthanc()  # knows no peer: C-MOVE would be refused, C-GET answers on our association
    _upload(pacs, some.values())
    with RIS() as ris:
        done = pull(pacs, free_port(), tmp_path / "out", urgent_bundle, "--retrieve", "get", "--send-to",
                    f"{pacs.aet}@127.0.0.1:{pacs.dicom_port}", "--hl7-to", ris.endpoint)
        assert done.returncode == 0, done.stderr[-3000:]
        _check_srs(pacs, some, tmp_path)
        _check_orus(ris.received, some)


def test_pull_by_c_get_takes_every_transfer_syntax_as_stored(archive, urgent_bundle, make_orthanc, tmp_path):
    """Every frontal image of the archive (JPEG 2000, RLE, JPEG baseline... as the PACS stores
    them) by C-GET. One presentation context per class with every syntax in it let Orthanc pick
    explicit VR little endian for all, which it cannot transcode JPEG 2000 to: that image failed
    every pull ("1 retrieval failure(s)", exit 3)."""
    frontal, _ = archive
    pacs = make_orthanc()
    _upload(pacs, frontal.values())
    done = pull(pacs, free_port(), tmp_path / "out", urgent_bundle, "--retrieve", "get")
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"{len(frontal)} image(s) retrieved" in done.stderr and "0 retrieval failure(s)" in done.stderr
    rows = (tmp_path / "out" / "results.csv").read_text().splitlines()[1:]
    assert len(rows) == len(frontal) and all(",ok," in row for row in rows)


def test_a_pull_killed_midway_then_run_again_finishes_the_rest_once(archive, urgent_bundle, make_orthanc, tmp_path):
    frontal, others = archive
    port = free_port()
    pacs = _pacs_with(make_orthanc, port, [*frontal.values(), others["lateral"]])
    out = tmp_path / "out"
    config = toml_table(tmp_path / "pull.toml", "pull", dict(batch_size=2, max_wait=0.2, heartbeat_interval=0.5), {})
    args = ("--send-to", f"{pacs.aet}@127.0.0.1:{pacs.dicom_port}", "--config", config)
    with RIS() as ris:
        killed = pull(pacs, port, out, urgent_bundle, *args, "--hl7-to", ris.endpoint,
                      env={"CXR_BATCH_KILL_AT": "commit"})
        assert killed.returncode == -signal.SIGKILL
        ledger = Ledger(out / ".cxr-batch" / "ledger.sqlite")
        committed = ledger.count()  # killed after the commit, before results.csv
        ledger.close()
        again = pull(pacs, port, out, urgent_bundle, *args, "--hl7-to", ris.endpoint)
        assert again.returncode == 0, again.stderr[-3000:]
        # the first batch was committed before the kill: not retrieved again
        assert re.search(r"[1-9]\d* already scored", again.stderr), again.stderr[-2000:]
        _check_srs(pacs, frontal, tmp_path)
        # a message sent before the kill but not marked is sent again with the same MSH-10
        ids = Counter(_segments(m)["MSH"][0][9] for m in ris.received)
        assert len(ids) == len(frontal)
        _check_orus([m for m in {_segments(m)["MSH"][0][9]: m for m in ris.received}.values()], frontal)
    rows = (out / "results.csv").read_text().splitlines()
    assert len(rows) == 1 + len(frontal) + 1 and committed >= 1


# ---------------------------------------------------------------------- clear errors
def test_a_pacs_that_refuses_us_or_is_down_is_said_before_the_model_loads(make_orthanc, urgent_bundle, tmp_path):
    pacs = make_orthanc(extra={"DicomCheckCalledAet": True})
    wrong = [sys.executable, "-m", "cxr_batch", "pull", "--from", f"NOTORTHANC@127.0.0.1:{pacs.dicom_port}",
             "--out", tmp_path / "a", "--weights", urgent_bundle, "--device", "cpu"]
    done = subprocess.run(list(map(str, wrong)), capture_output=True, text=True, timeout=120)
    assert done.returncode == 1 and "rejected the association" in done.stderr and "Traceback" not in done.stderr
    assert "CXRBATCH" in done.stderr and "model" not in done.stderr.split("error:")[0]
    down = [sys.executable, "-m", "cxr_batch", "pull", "--from", f"PACS@127.0.0.1:{free_port()}", "--out",
            tmp_path / "b", "--weights", urgent_bundle, "--device", "cpu"]
    done = subprocess.run(list(map(str, down)), capture_output=True, text=True, timeout=120)
    assert done.returncode == 1 and "no association with the PACS" in done.stderr and "Traceback" not in done.stderr


def test_a_pacs_host_name_nothing_resolves_is_said_as_such(tmp_path):
    # "cannot reach the PACS PACS@nohost:104: gaierror: [Errno -2] Name or service not known"
    done = cli("pull", "--from", "PACS@no-such-host.invalid:104", "--out", tmp_path / "a", timeout=120)
    assert done.returncode == 1 and "host 'no-such-host.invalid' not found" in done.stderr, done.stderr
    assert "gaierror" not in done.stderr


def test_a_pacs_down_or_refusing_us_is_one_error_line_without_the_librarys_own(tmp_path):
    # pynetdicom logged its own "Association request failed" / "TCP Initialisation Error" (or
    # "Association Rejected" and its result) above cxr-batch's error, which says all of it
    def said(done):
        return [line for line in done.stderr.splitlines() if "starting (PID" not in line]

    down = cli("pull", "--from", f"PACS@127.0.0.1:{free_port()}", "--out", tmp_path / "a", timeout=120)
    assert down.returncode == 1 and len(said(down)) == 1, down.stderr
    assert said(down)[0].startswith("cxr-batch: error: no association with the PACS")
    pacs = ScriptedPACS([])
    pacs.server.ae.require_called_aet = True  # called by another AE title: rejected
    try:
        refused = cli("pull", "--from", f"NOTPACS@127.0.0.1:{pacs.port}", "--out", tmp_path / "b", timeout=120)
    finally:
        pacs.server.shutdown()
    assert refused.returncode == 1 and len(said(refused)) == 1, refused.stderr
    assert said(refused)[0].startswith("cxr-batch: error: the PACS NOTPACS@127.0.0.1:") and "rejected" in said(refused)[0]
    debug = cli("pull", "--from", f"PACS@127.0.0.1:{free_port()}", "--out", tmp_path / "c", "--debug", timeout=120)
    assert "TCP Initialisation Error" in debug.stderr  # --debug still shows the library's lines


def test_an_unknown_move_destination_says_how_to_add_us(archive, urgent_bundle, make_orthanc, tmp_path):
    frontal, _ = archive
    pacs = make_orthanc()  # DicomModalities empty: CXRBATCH is unknown to it
    _upload(pacs, [frontal["explicit"]])
    port = free_port()
    done = pull(pacs, port, tmp_path / "out", urgent_bundle)
    assert done.returncode == 1, done.stderr[-2000:]
    message = done.stderr.split("error:")[-1] if "error:" in done.stderr else done.stderr
    assert "0xA801" in done.stderr and "DicomModalities" in done.stderr and '"CXRBATCH"' in done.stderr
    assert str(port) in message and "Traceback" not in done.stderr


@pytest.mark.parametrize("values, words", [
    ({}, "the PACS to pull from is needed"),
    ({"source": "PACS@h:104", "since": "2024-13-01"}, "expected a date YYYY-MM-DD"),
    ({"source": "PACS@h:104", "since": "2024-01-01", "days": 3}, "since and days are given together"),
    ({"source": "PACS@h:104", "modalities": ["CR", "D\\X"]}, "expected DICOM modalities"),
    ({"source": "PACS@h:104", "page_size": 0}, "page_size = 0: must be at least 1"),
    ({"source": "PACS@h:104", "hl7_to": "ris"}, "hl7_to: 'ris': expected HOST:PORT"),
    ({"source": "PACS@h:104", "stow_to": "http://u:p@pacs/dicom-web"}, "no credentials in the URL"),
    ({"source": "PACS", "retrieve": "fetch"}, "retrieve"),
])
def test_pull_configuration_errors_exit_2_naming_the_key(tmp_path, values, words):
    config = toml_table(tmp_path / "pull.toml", "pull", {}, values)
    done = cli("pull", "--out", tmp_path / "out", "--config", config, timeout=120)
    assert done.returncode == 2 and words in done.stderr and "Traceback" not in done.stderr, done.stderr
    assert not (tmp_path / "out").exists()  # refused before anything was made


def test_an_out_folder_inside_a_results_folders_state_is_refused(tmp_path):
    done = cli("pull", "--from", "PACS@127.0.0.1:104", "--out", tmp_path / "node" / ".cxr-batch" / "spool" / "x",
               timeout=120)
    assert done.returncode == 2 and "state folder (ledger, spool)" in done.stderr and "Traceback" not in done.stderr
    assert not (tmp_path / "node").exists()


def test_an_out_folder_inside_a_state_folder_gets_a_suggestion_for_that_command(tmp_path):
    # monitor shares the check: `monitor results --out results/.cxr-batch/m` was told to use
    # `--out .../cxr-pull`, a pull's folder name
    from cxr_batch.config import ConfigError
    from cxr_batch.integration.pull import refuse_out_in_state

    for inside, suggested in (("results/.cxr-batch/m", "results-m"), ("node/.cxr-batch/spool/x", "node-x")):
        with pytest.raises(ConfigError) as refused:
            refuse_out_in_state(tmp_path / inside)
        assert f"e.g. --out {tmp_path / suggested}" in str(refused.value) and "cxr-pull" not in str(refused.value)


def test_a_pull_by_c_get_does_not_need_the_port_free(archive, urgent_bundle, tmp_path):
    """C-GET comes back on the query's association: nothing listens on --port, so a port another
    program holds (the site's own `cxr-batch listen` on the default 11112, say) must not stop a
    pull by C-GET (it did: "cannot listen on 127.0.0.1:11112")."""
    import socket

    frontal, _ = archive
    pacs = ScriptedPACS([frontal["explicit"]], ae_title="QRPACS")
    holder = socket.socket()
    try:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        done = cli("pull", "--from", f"QRPACS@127.0.0.1:{pacs.port}", "--since", "2000-01-01", "--retrieve", "get",
                   "--port", holder.getsockname()[1], "--out", tmp_path / "out", "--no-pdf", "--weights",
                   urgent_bundle, "--device", "cpu", "--precision", "fp32", "--workers", "0")
    finally:
        holder.close()
        pacs.close()
    assert done.returncode == 0, done.stderr[-3000:]
    assert "cannot listen" not in done.stderr and "1 image(s) retrieved" in done.stderr
    rows = (tmp_path / "out" / "results.csv").read_text().splitlines()[1:]
    assert len(rows) == 1 and pydicom.dcmread(frontal["explicit"]).SOPInstanceUID in rows[0]


@pytest.mark.parametrize("refuses", [False, True], ids=["ignores", "refuses"])
def test_a_pacs_ignoring_modalities_in_study_is_filtered_by_series_modality(archive, urgent_bundle, tmp_path,
                                                                            refuses):
    frontal, others = archive
    pacs = ScriptedPACS([frontal["explicit"], others["ct"], others["pdf"]], ae_title="QRPACS",
                        modalities_key="refused" if refuses else "ignored")
    try:
        done = cli("pull", "--from", f"QRPACS@127.0.0.1:{pacs.port}", "--since", "2000-01-01", "--retrieve", "get",
                   "--out", tmp_path / "out", "--no-pdf", "--weights", urgent_bundle, "--device", "cpu", "--precision",
                   "fp32", "--workers", "0")
    finally:
        pacs.close()
    assert done.returncode == 0, done.stderr[-3000:]
    said = "refused ModalitiesInStudy as a key" if refuses else "ignores ModalitiesInStudy"
    assert said in done.stderr and "1 image(s) retrieved" in done.stderr
    rows = (tmp_path / "out" / "results.csv").read_text().splitlines()[1:]
    assert len(rows) == 1 and pydicom.dcmread(frontal["explicit"]).SOPInstanceUID in rows[0]  # the CT and PDF: not
    assert pacs.levels().count("SERIES") == 3  # each study's series looked at


# ---------------------------------------------------------------------- many studies
def test_a_query_matching_many_studies_is_paged_bounded_and_continued(nih_images, urgent_bundle, make_orthanc,
                                                                       tmp_path):
    port = free_port()
    pacs = make_orthanc(modalities={"cxrbatch": ("CXRBATCH", "127.0.0.1", port)})
    day0 = dt.date(2024, 1, 1)
    files = []
    pixels = _small(nih_images[0], 128)
    for k in range(40):  # one study a day for 40 days
        files.append(write(tmp_path / "many" / f"{k}.dcm", pixels, PatientID=f"P{k}", AccessionNumber=f"A{k}",
                           StudyDate=(day0 + dt.timedelta(days=k)).strftime("%Y%m%d")))
    _upload(pacs, files)
    out = tmp_path / "out"
    config = toml_table(tmp_path / "pull.toml", "pull", dict(page_size=6, max_studies=3), {})
    scored = []
    for _ in range(2):
        done = pull(pacs, port, out, urgent_bundle, "--config", config)
        assert done.returncode == 0, done.stderr[-3000:]
        pages = [int(n) for n in re.findall(r"pull: dates \d{8}-\d{0,8}: (\d+) stud", done.stderr)]
        assert pages and max(pages) <= 6  # no page answered more than page_size
        assert "more studies match than pull.max_studies (3)" in done.stderr
        assert "3 with new images" in done.stderr
        rows = (out / "results.csv").read_text().splitlines()[1:]
        scored.append(len(rows))
    assert scored == [3, 6]  # the second pull took the next three, none twice


def test_a_pacs_limiting_its_answers_is_paged_not_taken_as_complete(nih_images, urgent_bundle, make_orthanc,
                                                                     tmp_path):
    """Orthanc with LimitFindResults answers a C-FIND matching more studies with the first few and
    status 0xFE00 (cancel); read as complete, the others were never pulled and the pull said
    success. The dates are split until each answer is whole; a day holding more than the PACS
    answers fails the pull, naming the limit."""
    pacs = make_orthanc(dicomweb=False, extra={"LimitFindResults": 2})
    day0 = dt.date(2024, 1, 1)
    pixels = _small(nih_images[0], 128)
    files = [write(tmp_path / "days" / f"{k}.dcm", pixels, PatientID=f"P{k}", AccessionNumber=f"A{k}",
                   StudyDate=(day0 + dt.timedelta(days=k)).strftime("%Y%m%d")) for k in range(3)]
    _upload(pacs, files)
    out = tmp_path / "out"
    done = pull(pacs, free_port(), out, urgent_bundle, "--retrieve", "get")
    assert done.returncode == 0, done.stderr[-3000:]
    assert len((out / "results.csv").read_text().splitlines()[1:]) == 3
    one_day = [write(tmp_path / "one" / f"{k}.dcm", pixels, PatientID=f"Q{k}", StudyDate="20240301")
               for k in range(3)]
    _upload(pacs, one_day)
    done = pull(pacs, free_port(), tmp_path / "out2", urgent_bundle, "--retrieve", "get")
    assert done.returncode == 1, done.stderr[-3000:]
    assert "0xFE00" in done.stderr and "LimitFindResults" in done.stderr, done.stderr[-3000:]


def test_study_pages_split_dates_until_each_answer_is_bounded():
    """The paging on a model of a PACS holding 5000 studies over 10 years, 60 on one day."""
    first, today = dt.date(2016, 1, 1), dt.date(2025, 12, 31)
    dates = [first + dt.timedelta(days=(k * 7919) % 3650) for k in range(4940)] + [dt.date(2020, 5, 5)] * 60
    asked = []

    def find(range_text: str, cap: int):
        low, _, high = range_text.partition("-")
        low = dt.datetime.strptime(low, "%Y%m%d").date()
        high = dt.datetime.strptime(high, "%Y%m%d").date() if high else dt.date.max
        answer = [d for d in dates if low <= d <= high]
        asked.append(len(answer))
        if len(answer) > cap:
            raise TooMany()
        return answer

    pages = list(study_pages(find, first, today, page_size=50))
    found = [d for _, page in pages for d in page]
    assert sorted(found) == sorted(dates)  # every study once
    big = [(text, len(page)) for text, page in pages if len(page) > 50]
    assert big == [("20200505-20200505", dates.count(dt.date(2020, 5, 5)))]  # only one day is not split
    filled = [page for _, page in pages if page]
    assert all(max(a) < min(b) for a, b in zip(filled, filled[1:]))  # pages oldest first
    assert max(asked) <= 5000 and FIND_CAP >= 60


# ---------------------------------------------------------------------- receivers that are down
def test_results_wait_for_a_ris_that_is_down_and_go_when_it_is_back(archive, urgent_bundle, make_orthanc, tmp_path):
    frontal, _ = archive
    some = {k: frontal[k] for k in ("explicit", "rle")}
    port = free_port()
    pacs = _pacs_with(make_orthanc, port, some.values())
    out = tmp_path / "out"
    ris_port = free_port()  # nothing listens there yet
    config = toml_table(tmp_path / "pull.toml", "pull", dict(send_wait=2.0, send_timeout=3.0), {})
    down = pull(pacs, port, out, urgent_bundle, "--config", config, "--hl7-to", f"127.0.0.1:{ris_port}")
    assert down.returncode == 3, down.stderr[-3000:]
    assert "2 HL7 message(s) not delivered" in down.stderr and "cxr-batch outbound send --out" in down.stderr
    listed = cli("outbound", "list", "--out", out, "--channel", "hl7")
    assert listed.returncode == 0 and listed.stdout.count(" hl7 ") == 2 and "retrying" in listed.stdout
    assert json.loads((out / "status.json").read_text())["outbound_hl7"]["queued"] == 2
    with RIS() as ris:
        assert ris.endpoint.port != ris_port
        sent = cli("outbound", "send", "--out", out, "--hl7-to", ris.endpoint, "--wait", 30)
        assert sent.returncode == 0 and "every queued result was delivered" in sent.stderr, sent.stderr
        _check_orus(ris.received, some)
        # the pull again: nothing retrieved, nothing sent again
        again = pull(pacs, port, out, urgent_bundle, "--config", config, "--hl7-to", ris.endpoint)
        assert again.returncode == 0 and "0 image(s) retrieved" in again.stderr, again.stderr[-2000:]
        assert len(ris.received) == 2


def test_scan_stores_one_sr_per_image_by_stow_and_hl7_waits_for_the_ris(archive, urgent_bundle, make_orthanc,
                                                                          tmp_path):
    frontal, others = archive
    studies = tmp_path / "studies"
    studies.mkdir()
    for name in ("explicit", "j2k", "jpegls"):
        (studies / f"{name}.dcm").write_bytes(frontal[name].read_bytes())
    (studies / "lateral.dcm").write_bytes(others["lateral"].read_bytes())
    second = make_orthanc(users={"cxr": "pw|&^~"})
    config = tmp_path / "cxr.toml"
    config.write_text('[scan]\nsend_wait = 3.0\nsend_timeout = 3.0\n[dicomweb]\nusername = "cxr"\npassword = "pw|&^~"\n')
    config.chmod(0o600)
    out = tmp_path / "out"
    ris_port = free_port()
    done = cli("scan", studies, "--out", out, "--dicom-sr", "--dicom-pdf", "--no-heatmaps", "--stow-to", second.dicomweb_url,
               "--hl7-to", f"127.0.0.1:{ris_port}", "--config", config, "--weights", urgent_bundle, "--device", "cpu",
               "--precision", "fp32", "--workers", "0")
    assert done.returncode == 3, done.stderr[-3000:]  # the RIS is down: said, with how to send later
    assert "3 HL7 message(s) not delivered" in done.stderr and "outbound send --out" in done.stderr
    assert "password" not in (out / "run.json").read_text() and "pw|" not in (out / "run.json").read_text()
    held = _held(second)
    assert Counter(ds.SOPClassUID for ds in held.values()) == {COMPREHENSIVE_3D_SR: 3, ENCAPSULATED_PDF: 3}
    assert sorted(_source_of(ds) for ds in held.values() if ds.SOPClassUID == COMPREHENSIVE_3D_SR) == sorted(
        pydicom.dcmread(studies / f"{n}.dcm").SOPInstanceUID for n in ("explicit", "j2k", "jpegls"))
    sources = {pydicom.dcmread(studies / f"{n}.dcm").StudyInstanceUID for n in ("explicit", "j2k", "jpegls")}
    assert {ds.StudyInstanceUID for ds in held.values()} == sources  # each report in its study
    with RIS() as ris:
        sent = cli("outbound", "send", "--out", out, "--hl7-to", ris.endpoint, "--config", config)
        assert sent.returncode == 0, sent.stderr
        _check_orus(ris.received, {n: studies / f"{n}.dcm" for n in ("explicit", "j2k", "jpegls")})
    assert len(_held(second)) == 6  # sending the queue again stored nothing twice


def test_watch_sends_an_oru_per_study_through_the_queue(archive, urgent_bundle, tmp_path):
    from tests.watchkit import start_daemon, watch_config

    frontal, _ = archive
    incoming = tmp_path / "incoming"
    incoming.mkdir()
    out = tmp_path / "out"
    with RIS() as ris:
        daemon = start_daemon(incoming, out, urgent_bundle, watch_config(tmp_path / "w.toml"), "--no-pdf",
                              "--precision", "fp32", "--hl7-to", ris.endpoint)
        try:
            for name in ("explicit", "rle"):
                (incoming / f"{name}.dcm").write_bytes(frontal[name].read_bytes())
            assert wait_for(lambda: status(out).get("outbound_hl7", {}).get("delivered") == 2, timeout=120), \
                status(out)
        finally:
            assert stop(daemon) == 0
        _check_orus(ris.received, {n: frontal[n] for n in ("explicit", "rle")})
    assert sorted(p.suffix for p in (out / "hl7").iterdir()) == [".hl7", ".hl7"]

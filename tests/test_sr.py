"""DICOM SR (TID 1500) per scored image: a scan of real DICOMs with --dicom-sr, read back with
pydicom/highdicom, and checked with dcmtk (dsrdump, dcmdump) and dicom3tools (dciodvfy)."""

from __future__ import annotations

import datetime as dt
import io
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from pydicom.sr.codedict import codes
from pydicom.uid import RE_VALID_UID

from cxr_batch.dicom import identifiers
from cxr_batch.findings import FINDINGS
from cxr_batch.record import Scores, StudyRecord
from cxr_batch.reports import report_name
from cxr_batch.results import read_results
from cxr_batch.scan import ScanConfig, run_scan
from cxr_batch.sr import (FINDING_CODES, FLAG_CODES, PRIORITY_CODES, PROBABILITY_UNIT, SRFactory, SRNotMade, build_sr,
                          device_uid, source_image, sr_bytes, sr_uids)
from tests.dicomgen import HEADER, grey, have, pydicom_checking, write

# pydicom warns, rightly, whenever the hostile source's values are read (by the scan too)
pytestmark = pytest.mark.filterwarnings("ignore:.*(exceeds the maximum|Invalid value for VR):UserWarning")

COMPREHENSIVE_3D_SR = "1.2.840.10008.5.1.4.1.1.88.34"
FULL = dict(StudyTime="101500", PatientBirthDate="19670302", ReferringPhysicianName="House^Gregory", StudyID="S17",
            IssuerOfPatientID="HOSP-A")
UTF8_NAME = "Müller-Lüdenscheidt^Jürgen=山田^太郎=やまだ^たろう"
LONG = dict(PatientName="Ø" * 100 + "^" + "Z" * 80 + "^a^b^c^d^e^f", PatientID="X" * 90, AccessionNumber="A" * 40,
            StudyID="S" * 30, SpecificCharacterSet="ISO_IR 192", StudyInstanceUID="1.2.03.4", SOPInstanceUID="abc.def", SeriesInstanceUID="1." + "2" * 80)


def _scan(studies, out, bundle, **kw):
    cfg = ScanConfig(weights=str(bundle), device="cpu", precision="fp32", progress=False, batch_size=4, workers=0,
                     pdf=False, dicom_sr=True, **kw)  # fp32: two scans' SRs are compared value for value
    return run_scan(studies, out, cfg)


@pytest.fixture(scope="module")
def sr_scan(tmp_path_factory, nih_images, small_bundle):
    """Real NIH images as DICOMs (full header, UTF-8 name, invalid UIDs and over-long values),
    a lateral DICOM and a PNG, scanned with --dicom-sr (no PDFs)."""
    root = tmp_path_factory.mktemp("sr")
    studies = root / "studies"
    write(studies / "full.dcm", grey(nih_images[0]), **FULL)
    write(studies / "utf8" / "IM0001", grey(nih_images[1]), PatientName=UTF8_NAME, SpecificCharacterSet="ISO_IR 192",
          **FULL)
    with pytest.warns(UserWarning), pydicom_checking():  # pydicom finds the values invalid, as it should
        write(studies / "hostile.dcm", grey(nih_images[2]), **LONG)
    write(studies / "lateral.dcm", grey(nih_images[3]), ViewPosition="LL")
    shutil.copy(nih_images[4], studies / nih_images[4].name)
    out = root / "out"
    summary = _scan(studies, out, small_bundle)
    rows = {r["file"]: r for r in read_results(out / "results.csv")}
    return studies, out, rows, summary


def _sources(studies):
    return {p.relative_to(studies).as_posix(): pydicom.dcmread(p) for p in studies.rglob("*")
            if p.is_file() and not p.suffix == ".png"}


def _sr_path(out, row):
    return out / "dicom" / (report_name(row["file"]).removesuffix(".pdf") + ".sr.dcm")


def _text_items(item, meaning):
    return [c.TextValue for c in item.ContentSequence if c.ConceptNameCodeSequence[0].CodeMeaning == meaning]


def test_one_sr_per_scored_dicom_image_without_pdfs(sr_scan):
    studies, out, rows, summary = sr_scan
    written = sorted(p.name for p in (out / "dicom").iterdir())
    scored_dicoms = ["full.dcm", "hostile.dcm", "utf8/IM0001"]
    assert written == sorted(_sr_path(out, rows[f]).name for f in scored_dicoms)
    assert all((out / "dicom" / n).stat().st_mode & 0o777 == 0o640 for n in written)
    assert not (out / "reports").exists()  # --no-pdf: SRs only
    png = next(r for f, r in rows.items() if f.endswith(".png"))
    assert png["status"] == "ok" and "no DICOM SR: the source is not a DICOM image" in png["notes"]
    assert rows["lateral.dcm"]["status"] == "skipped"
    assert summary.srs == 3 and json.loads((out / "run.json").read_text())["dicom_sr_written"] == 3


def test_every_finding_probability_flag_threshold_and_the_priority_read_back(sr_scan, small_bundle):
    _, out, rows, _ = sr_scan
    for name in ("full.dcm", "utf8/IM0001", "hostile.dcm"):
        row = rows[name]
        sr = hd.sr.srread(_sr_path(out, row))
        sop_uid = sr.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence[0] \
            .ReferencedSOPSequence[0].ReferencedSOPInstanceUID
        library = next(c for c in sr.ContentSequence if c.ConceptNameCodeSequence[0].CodeMeaning == "Image Library")
        assert library.ContentSequence[0].ContentSequence[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID == sop_uid
        groups = sr.content.get_image_measurement_groups()
        assert [g.tracking_identifier for g in groups] == list(FINDINGS)
        for finding, group in zip(FINDINGS, groups):
            assert group.finding_type == FINDING_CODES[finding]
            probability, threshold = group.get_measurements()
            assert probability.name == codes.DCM.Probability and probability.unit == PROBABILITY_UNIT
            assert probability.value == pytest.approx(float(row[f"p_{finding}"]), abs=1e-9)
            assert threshold.name == codes.DCM.ThresholdValue and threshold.value == 0.5
            (evaluation,) = group.get_qualitative_evaluations()
            assert evaluation.name == FINDING_CODES[finding]
            present = evaluation.value == FLAG_CODES[True]
            assert present == (row[f"flag_{finding}"] == "1") == (probability.value >= threshold.value)
            assert _text_items(group[0], "Algorithm Name") == ["small"]
            assert _text_items(group[0], "Algorithm Version") == ["test"]
            assert _text_items(group[0], "Algorithm Parameters") == [f"weights sha256 {row['weights_sha256']}"]
            (source,) = group.source_images
            (measured_on,) = probability.referenced_images
            assert source.referenced_sop_instance_uid == measured_on.referenced_sop_instance_uid == sop_uid
            assert _text_items(threshold[0], "Algorithm Parameters") == [f"weights sha256 {row['weights_sha256']}"]
        evaluations = sr.ContentSequence[-1]
        assert evaluations.ConceptNameCodeSequence[0].CodeValue == "C0034375"
        priority = evaluations.ContentSequence[0].ConceptCodeSequence[0]
        assert priority.CodeValue == PRIORITY_CODES[row["priority"]].value
        (observer,) = sr.content.get_observer_contexts(observer_type=codes.cid270.Device)
        assert observer.observer_identifying_attributes.model_name == "small@test"


def test_same_study_and_patient_as_the_source_in_a_new_series(sr_scan):
    studies, out, rows, _ = sr_scan
    for name in ("full.dcm", "utf8/IM0001"):
        source = _sources(studies)[name]
        sr = pydicom.dcmread(_sr_path(out, rows[name]))
        assert sr.SOPClassUID == COMPREHENSIVE_3D_SR and sr.Modality == "SR"
        assert sr.StudyInstanceUID == source.StudyInstanceUID
        assert sr.SeriesInstanceUID != source.SeriesInstanceUID and sr.SeriesNumber == 998
        assert sr.SpecificCharacterSet == "ISO_IR 192"
        # IssuerOfPatientID: "P001" of one site is another patient than "P001" of the next
        for keyword in ("PatientName", "PatientID", "IssuerOfPatientID", "PatientBirthDate", "PatientSex", "PatientAge",
                        "AccessionNumber", "StudyDate", "StudyTime", "StudyID", "ReferringPhysicianName"):
            assert str(sr[keyword].value) == str(source[keyword].value), keyword
        (study,) = sr.CurrentRequestedProcedureEvidenceSequence
        (series,) = study.ReferencedSeriesSequence
        (instance,) = series.ReferencedSOPSequence
        assert (study.StudyInstanceUID, series.SeriesInstanceUID) == (source.StudyInstanceUID, source.SeriesInstanceUID)
        assert (instance.ReferencedSOPClassUID, instance.ReferencedSOPInstanceUID) == \
            (source.SOPClassUID, source.SOPInstanceUID)
        assert sr.CompletionFlag == "COMPLETE" and sr.VerificationFlag == "UNVERIFIED"
    assert str(pydicom.dcmread(_sr_path(out, rows["utf8/IM0001"])).PatientName) == UTF8_NAME


def test_invalid_uids_are_replaced_and_long_values_cut(sr_scan):
    studies, out, rows, _ = sr_scan
    row = rows["hostile.dcm"]
    sr = pydicom.dcmread(_sr_path(out, row))
    uids = [sr.StudyInstanceUID, sr.SeriesInstanceUID, sr.SOPInstanceUID]
    reference = sr.CurrentRequestedProcedureEvidenceSequence[0]
    uids += [reference.StudyInstanceUID, reference.ReferencedSeriesSequence[0].SeriesInstanceUID,
             reference.ReferencedSeriesSequence[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID]
    assert all(len(u) <= 64 and RE_VALID_UID.match(u) for u in uids), uids
    assert "1.2.03.4" not in uids and "abc.def" not in uids
    assert not any(u.startswith("1.22222") for u in uids)  # an over-long UID is replaced, never cut
    assert "invalid source SOPInstanceUID, StudyInstanceUID replaced" in row["notes"]
    # an accession number over 16 characters is left out, not cut (another study's could be its prefix)
    assert sr.PatientID == "X" * 64 and sr.AccessionNumber == "" and sr.StudyID == "S" * 16
    assert str(sr.PatientName) == "Ø" * 32  # 5 components at most, cut to 64 bytes of UTF-8
    # the same invalid source gives the same replacements on every run
    record = StudyRecord(file="hostile.dcm", ids=identifiers(_sources(studies)["hostile.dcm"]),
                         scores=Scores((0.1,) * 14, (0,) * 14, "normal", -0.8))
    assert source_image(record) == source_image(record)
    assert source_image(record).study_uid == sr.StudyInstanceUID


def test_the_same_image_and_model_give_the_same_object(sr_scan, small_bundle, tmp_path):
    studies, out, rows, _ = sr_scan
    _scan(studies, tmp_path / "again", small_bundle)
    for name in ("full.dcm", "utf8/IM0001", "hostile.dcm"):
        first = pydicom.dcmread(_sr_path(out, rows[name]))
        second = pydicom.dcmread(_sr_path(tmp_path / "again", rows[name]))
        assert (first.SOPInstanceUID, first.SeriesInstanceUID) == (second.SOPInstanceUID, second.SeriesInstanceUID)
        for ds in (first, second):  # when it was made is all that may differ
            for keyword in ("InstanceCreationDate", "InstanceCreationTime", "ContentDate", "ContentTime",
                            "ContributingEquipmentSequence"):
                del ds[keyword]
        assert first == second
    # the images of one study share one SR series; another model gets other UIDs
    record = StudyRecord(file="full.dcm", ids=identifiers(_sources(studies)["full.dcm"]),
                         scores=Scores((0.1,) * 14, (0,) * 14, "normal", -0.8))
    source = source_image(record)
    assert sr_uids(source, "a" * 64) == sr_uids(source, "a" * 64)
    assert sr_uids(source, "a" * 64)[0] != sr_uids(source, "b" * 64)[0]
    assert sr_uids(source, "a" * 64)[1] != sr_uids(source, "b" * 64)[1]


def test_no_sr_for_records_that_cannot_have_one(sr_scan, small_bundle):
    from cxr_batch.bundle import load_bundle

    studies, *_ = sr_scan
    bundle = load_bundle(small_bundle)
    ids = identifiers(_sources(studies)["full.dcm"])
    scores = Scores((0.1,) * 14, (0,) * 14, "normal", -0.8)
    with pytest.raises(SRNotMade, match="not scored"):
        build_sr(StudyRecord(file="x.dcm", status="skipped", ids=ids), bundle)
    with pytest.raises(SRNotMade, match="not a DICOM image"):
        build_sr(StudyRecord(file="x.png", scores=scores), bundle)
    with pytest.raises(SRNotMade, match="other weights"):
        build_sr(StudyRecord(file="x.dcm", ids=ids, scores=scores, weights_sha256="0" * 64), bundle)
    ids.sop_class_uid = "1.2.840.10008.5.1.4.1.1.01"
    with pytest.raises(SRNotMade, match="SOP Class UID is not a valid UID"):
        build_sr(StudyRecord(file="x.dcm", ids=ids, scores=scores), bundle)



def test_a_date_that_is_not_dicom_da_is_left_out_and_not_quoted(sr_scan, small_bundle):
    """strptime reads '2024311' (7 digits) and '1950 2 3' as dates, DICOM DA does not: the SR
    copied them (dciodvfy: 'Length invalid for this VR') and pydicom's warning put the date on
    stderr. A value that is not 8 digits of a real date is left empty, as a malformed one is."""
    import warnings

    from cxr_batch.bundle import load_bundle

    studies, *_ = sr_scan
    ids = identifiers(_sources(studies)["full.dcm"])
    ids.study_date, ids.patient_birth_date = "2024311", "1950 2 3"
    record = StudyRecord(file="x.dcm", ids=ids, scores=Scores((0.1,) * 14, (0,) * 14, "normal", -0.8))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        sr = build_sr(record, load_bundle(small_bundle))
    assert sr.StudyDate == "" and sr.PatientBirthDate == ""
    assert not [w for w in caught if "2024311" in str(w.message) or "1950 2 3" in str(w.message)]

# Warnings of dciodvfy that these SRs may carry, and why each is acceptable:
ACCEPTED_DCIODVFY_WARNINGS = (
    # the private coding scheme of 6 findings and the priorities, declared in the
    # CodingSchemeIdentificationSequence; dciodvfy knows only the standard schemes
    r"Unrecognized defined term <99CXRBATCH> for value 1 of attribute <Coding Scheme Designator>",
    # a Type 2 value the source did not have (or had invalid) stays empty rather than invented
    r"Missing attribute or value that would be needed to build DICOMDIR - (Study ID|Study Date|Study Time)",
    # a one-component name (no '^') is copied as the source has it, so the PACS matches the patient
    r"Value dubious for this VR - \(0x00(08,0x0090|10,0x0010)\) PN .* - Retired Person Name form",
    # IHE AIR's Device UID of the algorithm in the Contributing Equipment Sequence: in the standard
    # (PS3.3 C.12.1, highdicom's tables have it) but not in the 2022 tables of Debian's dicom3tools
    r"Attribute is not present in standard DICOM IOD - \(0x0018,0x1002\) UI Device UID",
    r"Dicom dataset contains attributes not present in standard DICOM IOD - this is a Standard Extended SOP Class",
)


@pytest.mark.parametrize("tool", ["dsrdump", "dcmdump", "dciodvfy"])
def test_real_dicom_tools_accept_every_sr(sr_scan, tool):
    if not have(tool):
        pytest.skip(f"{tool} not installed")
    _, out, *_ = sr_scan
    for path in sorted((out / "dicom").iterdir()):
        done = subprocess.run([tool, str(path)], capture_output=True, text=True, timeout=60)
        lines = (done.stdout + done.stderr).splitlines()
        if tool == "dciodvfy":
            assert not [x for x in lines if x.startswith("Error")], (path.name, lines)
            warnings = [x for x in lines if x.startswith("Warning")]
            assert len([w for w in warnings if "Device UID" in w]) == 1  # the algorithm's, nothing else
            unexpected = [w for w in warnings if not any(re.search(a, w) for a in ACCEPTED_DCIODVFY_WARNINGS)]
            assert not unexpected, (path.name, unexpected)
        else:
            assert done.returncode == 0, (path.name, done.stderr)
            # dcmtk's VR checker does not check UTF-8 strings and says so: the only message allowed
            problems = [x for x in done.stderr.splitlines() if x[:2] in ("E:", "F:", "W:")]
            assert all("does not support this Specific Character Set: ISO_IR 192" in x for x in problems), problems
        if tool == "dsrdump":
            assert "Imaging Measurement Report" in done.stdout and done.stdout.count('"Measurement Group"') == 14


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "cxr_batch", *map(str, args)], capture_output=True, text=True,
                          timeout=300)


def test_cli_scan_no_pdf_dicom_sr_and_the_watch_daemon_writes_them_too(tmp_path, nih_images, small_bundle):
    studies = tmp_path / "studies"
    write(studies / "one.dcm", grey(nih_images[5]))
    done = _cli("scan", studies, "--out", tmp_path / "out", "--weights", small_bundle, "--device", "cpu",
                "--no-pdf", "--dicom-sr", "--quiet")
    assert done.returncode == 0, done.stderr
    (sr,) = (tmp_path / "out" / "dicom").iterdir()
    ds = pydicom.dcmread(sr)
    assert ds.SOPClassUID == COMPREHENSIVE_3D_SR and ds.PatientName == HEADER["PatientName"]
    assert not (tmp_path / "out" / "reports").exists()
    from .watchkit import rows_now, start_daemon, stop, wait_for, watch_config

    daemon = start_daemon(studies, tmp_path / "w", small_bundle, watch_config(tmp_path / "w.toml"), "--dicom-sr",
                          "--no-pdf")
    try:
        assert wait_for(lambda: [r["status"] for r in rows_now(tmp_path / "w")] == ["ok"])
    finally:
        assert stop(daemon) == 0
    (sr,) = (tmp_path / "w" / "dicom").iterdir()
    assert pydicom.dcmread(sr).SOPInstanceUID == ds.SOPInstanceUID  # the same image and model: the same SR


# ------------------------------------------------------------------ IHE AIR and OHIF
def _content(item, meaning):
    return [c for c in item.ContentSequence if c.ConceptNameCodeSequence[0].CodeMeaning == meaning]


def test_the_algorithm_tracking_and_procedure_as_ihe_air_and_ohif_read_them(sr_scan, small_bundle):
    from cxr_batch.bundle import load_bundle

    bundle = load_bundle(small_bundle)
    _, out, rows, _ = sr_scan
    for name in ("full.dcm", "utf8/IM0001", "hostile.dcm"):
        sr = pydicom.dcmread(_sr_path(out, rows[name]))
        # the algorithm as contributing equipment (AIR 6.5.3.1), beside highdicom's own item
        (algorithm,) = [e for e in sr.ContributingEquipmentSequence
                        if e.PurposeOfReferenceCodeSequence[0].CodingSchemeDesignator == "99IHE"]
        purpose = algorithm.PurposeOfReferenceCodeSequence[0]
        assert (purpose.CodeValue, purpose.CodeMeaning) == ("1630", "Processing Algorithm")
        assert (algorithm.Manufacturer, algorithm.ManufacturerModelName, algorithm.SoftwareVersions) == \
            ("cxr-batch", "small", "test")
        assert algorithm.DeviceUID == device_uid(bundle) and RE_VALID_UID.match(algorithm.DeviceUID)
        schemes = {i.CodingSchemeDesignator for i in sr.CodingSchemeIdentificationSequence}
        assert {"99IHE", "99CXRBATCH"} <= schemes
        # Procedure Reported: the imaging procedure (a plain chest X-ray), not the algorithm
        (procedure,) = _content(sr, "Procedure reported")
        assert (procedure.ConceptCodeSequence[0].CodeValue, procedure.ConceptCodeSequence[0].CodingSchemeDesignator) \
            == ("399208008", "SCT")
        # OHIF: the Image Library (111028) and, per group, a tracking identifier and UID (112039, 112040)
        (library,) = [c for c in sr.ContentSequence if c.ConceptNameCodeSequence[0].CodeValue == "111028"]
        source_uid = library.ContentSequence[0].ContentSequence[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID
        (measurements,) = _content(sr, "Imaging Measurements")
        tracking_uids = []
        for group, finding in zip(measurements.ContentSequence, FINDINGS):
            by_code = {c.ConceptNameCodeSequence[0].CodeValue: c for c in group.ContentSequence}
            assert by_code["112039"].TextValue == finding
            tracking_uids.append(by_code["112040"].UID)
            # TID 4019 algorithm identification in every group
            assert by_code["111001"].TextValue == "small" and by_code["111003"].TextValue == "test"
            assert by_code["121112"].ReferencedSOPSequence[0].ReferencedSOPInstanceUID == source_uid  # source of measurement
        assert len(set(tracking_uids)) == 14 and all(RE_VALID_UID.match(u) for u in tracking_uids)


def test_another_bundle_is_another_device(sr_scan, small_bundle):
    from dataclasses import replace

    from cxr_batch.bundle import load_bundle

    studies, *_ = sr_scan
    bundle = load_bundle(small_bundle)
    other = replace(bundle, sha256="f" * 64)
    record = StudyRecord(file="full.dcm", ids=identifiers(_sources(studies)["full.dcm"]),
                         scores=Scores((0.1,) * 14, (0,) * 14, "normal", -0.8))
    devices = []
    for b in (bundle, other):
        sr = build_sr(record, b)
        (algorithm,) = [e for e in sr.ContributingEquipmentSequence if "DeviceUID" in e]
        (observer,) = [c for c in sr.ContentSequence if c.ConceptNameCodeSequence[0].CodeValue == "121012"]
        assert algorithm.DeviceUID == observer.UID  # the Device Observer UID: one device, two places
        devices.append(algorithm.DeviceUID)
    assert devices[0] != devices[1]


# ------------------------------------------------------------------ the fast path: templates
CREATED = [dt.datetime(2026, 3, 1, 14, 5, 9, 123456), dt.datetime(2026, 12, 31, 23, 59, 59)]
DX_PRESENTATION = "1.2.840.10008.5.1.4.1.1.1.1"
CR = "1.2.840.10008.5.1.4.1.1.1"


def _variants(studies, rows):
    """Real records of the scan and harder ones: each priority, every finding flagged or none,
    extreme probabilities, unknown age/sex/time/referrer, a long UTF-8 name, invalid UIDs, CR."""
    sources = _sources(studies)

    def record(name, probs=None, flags=None, priority=None, **ids_change):
        row = rows[name]
        ids = identifiers(sources[name])
        for key, value in ids_change.items():
            setattr(ids, key, value)
        scores = Scores(tuple(float(row[f"p_{f}"]) for f in FINDINGS) if probs is None else probs,
                        tuple(int(row[f"flag_{f}"]) for f in FINDINGS) if flags is None else flags,
                        priority or row["priority"], 0.0)
        return StudyRecord(file=name, ids=ids, scores=scores, weights_sha256=row["weights_sha256"])

    return {
        "as scored": record("full.dcm"),
        "utf8 name, all flagged, urgent": record("utf8/IM0001", flags=(1,) * 14, priority="urgent"),
        "long values and invalid uids, none flagged": record("hostile.dcm", flags=(0,) * 14, priority="normal"),
        "no age, sex, time, referrer; abnormal": record(
            "full.dcm", priority="abnormal", patient_age="", patient_sex="", study_time="", referring_physician="",
            patient_birth_date="", study_id=""),
        "extreme probabilities, CR": record(
            "full.dcm", probs=(0.0, 1.0, 1e-7, 0.9999996, 0.5, 0.4999995, 1 / 3, 2 / 3, 0.1, 0.25, 0.75, 0.999999,
                               0.000001, 0.123456), sop_class_uid=CR),
        "long name": record("full.dcm", patient_name="Ø" * 40 + "^" + "名" * 30 + "^Q^R^S^T", patient_id="ÆØÅ-9^&\\x"),
    }


def test_the_template_writes_the_bytes_highdicom_writes(sr_scan, small_bundle):
    from cxr_batch.bundle import load_bundle

    studies, _, rows, _ = sr_scan
    bundle = load_bundle(small_bundle)
    factory = SRFactory(bundle)
    for label, record in _variants(studies, rows).items():
        for created in CREATED:
            reference = sr_bytes(build_sr(record, bundle, created))
            assert factory.sr_bytes(record, created) == reference, label
    # the templates were used (a refused one would fall back to highdicom and prove nothing)
    assert factory.template(DX_PRESENTATION) is not None and factory.template(CR) is not None
    # and what they write is a readable SR saying this record's values
    record = _variants(studies, rows)["utf8 name, all flagged, urgent"]
    sr = pydicom.dcmread(io.BytesIO(factory.sr_bytes(record)))
    assert str(sr.PatientName) == UTF8_NAME
    groups = hd.sr.Comprehensive3DSR.from_dataset(sr).content.get_image_measurement_groups()
    assert all(g.get_qualitative_evaluations()[0].value == FLAG_CODES[True] for g in groups)


def test_a_template_that_would_write_other_bytes_is_not_used(sr_scan, small_bundle, monkeypatch, caplog):
    """A slot the template misses (here: the patient ID stays the sentinel's) is caught before
    use; highdicom then builds every SR, so the output is still right."""
    import cxr_batch.sr as sr_module
    from cxr_batch.bundle import load_bundle

    studies, _, rows, _ = sr_scan
    real_matcher = sr_module._matcher

    def forgetful(sentinel):
        match = real_matcher(sentinel)
        return lambda elem: None if elem.keyword == "PatientID" else match(elem)

    monkeypatch.setattr(sr_module, "_matcher", forgetful)
    bundle = load_bundle(small_bundle)
    factory = SRFactory(bundle)
    record = _variants(studies, rows)["as scored"]
    assert factory.sr_bytes(record, CREATED[0]) == sr_bytes(build_sr(record, bundle, CREATED[0]))
    assert factory.template(DX_PRESENTATION) is None
    assert "values not found in highdicom's SR: ['patient_id']" in caplog.text


def test_every_finding_says_what_its_flag_is_worth(sr_scan, small_bundle, tmp_path):
    """Trust beside every flag in the SR too: one comment per finding with its operating point's
    sensitivity and PPV from the bundle's evidence (here: a bundle with a triage table)."""
    import json
    import shutil

    from cxr_batch.bundle import load_bundle, write_manifest
    from cxr_batch.sr import trust_lines

    folder = tmp_path / "b"
    shutil.copytree(small_bundle, folder)
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["triage"] = {"measured_on": "out of fold", "findings": {
        **{f: {"flagged": True, "sensitivity": 0.5, "ppv_at_nih_prevalence": 0.25} for f in FINDINGS},
        "Hernia": {"flagged": False, "why": "AUROC CI reaches 0.5"}}}
    write_manifest(folder, manifest)
    lines = trust_lines(load_bundle(folder))
    assert len(lines) == 14
    assert lines[FINDINGS.index("Pneumothorax")] == ("Pneumothorax: a flag has sensitivity 0.50, PPV 0.25 at "
                                                      "threshold 0.5 (out of fold)")
    assert lines[FINDINGS.index("Hernia")] == "Hernia: never flagged by this model: AUROC CI reaches 0.5"
    _, out, rows, _ = sr_scan
    sr = pydicom.dcmread(_sr_path(out, rows["full.dcm"]))
    comments = [i.TextValue for i in sr.ContentSequence[-1].ContentSequence if i.ValueType == "TEXT"]
    assert len(comments) == 15 and comments[-1].startswith("Decision support only")  # 14 findings, the disclaimer


def test_the_priority_is_named_as_the_reports_name_it(sr_scan):
    """A PACS shows the SR's priority by its code meaning. v3's 'abnormal' bucket holds studies
    with no finding flagged (P(any) over the cutoff), and its 'normal' bucket is 'low probability
    of any finding', never a normal result: the SR said 'Abnormal: findings flagged' of a study
    with no flag and 'No finding flagged' under the code NORMAL where every PDF says 'LOW
    PROBABILITY OF ANY FINDING. Not a normal result.'"""
    from cxr_batch.bundle import DEFAULT_BUNDLE, load_bundle
    from tests.conftest import V1_BUNDLE

    studies, *_ = sr_scan
    ids = identifiers(_sources(studies)["full.dcm"])

    def meaning(bundle, priority):
        scores = Scores((0.01,) * 14, (0,) * 14, priority, 0.45, 0.45)
        sr = build_sr(StudyRecord(file="full.dcm", ids=ids, scores=scores), bundle)
        item = sr.ContentSequence[-1].ContentSequence[0].ConceptCodeSequence[0]
        return item.CodeValue, item.CodeMeaning

    v3, v1 = load_bundle(DEFAULT_BUNDLE), load_bundle(V1_BUNDLE)
    assert meaning(v3, "abnormal") == ("ABNORMAL", "Abnormal: read with priority")
    assert meaning(v3, "normal") == ("NORMAL", "Low probability of any finding: not a normal result")
    assert meaning(v1, "normal") == ("NORMAL", "No finding flagged: not a normal result")
    assert meaning(v3, "urgent") == ("URGENT", "Urgent: an urgent finding is flagged")
    assert SRFactory(v3).sr_bytes(StudyRecord(file="full.dcm", ids=ids, scores=Scores(
        (0.01,) * 14, (0,) * 14, "normal", 0.3, 0.3))).count(b"Low probability of any finding") == 1


def test_the_sr_says_the_held_out_catch_the_pdfs_say():
    """v3's SR told a PACS 'Pneumothorax: a flag has sensitivity 0.23, PPV 0.10' (out of fold)
    and nothing else, where every PDF of the same study says it caught 0 of 10 held-out
    pneumothoraces; v1's said 'not measured' where its PDFs say 1 of 5. Each finding's line
    carries the held-out catch where the bundle has one."""
    from cxr_batch.bundle import DEFAULT_BUNDLE, load_bundle
    from cxr_batch.sr import trust_lines
    from tests.conftest import V1_BUNDLE

    v3 = trust_lines(load_bundle(DEFAULT_BUNDLE))[FINDINGS.index("Pneumothorax")]
    assert v3.startswith("Pneumothorax: a flag has sensitivity 0.23, PPV 0.10 at threshold 0.08527 (out of fold")
    assert v3.endswith("; sensitivity 0.00 (flagged 0 of 10 held-out images that had it)")
    v1 = trust_lines(load_bundle(V1_BUNDLE))[FINDINGS.index("Pneumothorax")]
    assert v1 == ("Pneumothorax: sensitivity 0.20 (flagged 1 of 5 held-out images that had it) at "
                  "threshold 0.1; PPV not measured")


EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "studies" / "dicom"


def test_two_files_claiming_one_uid_with_other_pixels_get_no_colliding_sr(tmp_path, small_bundle, caplog):
    """A folder holding two different images under one SOP Instance UID: scored, both SRs had
    the same derived UID, and a PACS kept only the first one sent, perhaps for the other image.
    Each is scored for its own pixels with an SR UID of its own; each row's notes name the UID
    and the other files (a person decides which is the image). The same bytes under two names
    stay two plain rows, each with its SR (the one object a PACS keeps is right for both)."""
    studies = tmp_path / "studies"
    source = EXAMPLE / "NIH01511" / "STUDY1" / "SERIES1" / "IM0001"
    (studies / "a").mkdir(parents=True)
    shutil.copy(source, studies / "a" / "IM0001")
    ds = pydicom.dcmread(source)
    ds.decompress(generate_instance_uid=False)  # pydicom would give it a UID of its own
    ds.PixelData = np.ascontiguousarray(ds.pixel_array[:, ::-1]).tobytes()  # the same UID, other pixels
    (studies / "b").mkdir()
    ds.save_as(studies / "b" / "IM0001", enforce_file_format=True)
    ds.PixelData = np.ascontiguousarray(ds.pixel_array[::-1]).tobytes()
    ds.file_meta.MediaStorageSOPInstanceUID = "1.2.3.4"  # its file meta names another: the SR is of the data set's
    ds.save_as(studies / "c.dcm", enforce_file_format=True)
    twin = EXAMPLE / "NIH00574" / "STUDY1" / "SERIES1" / "IM0001"
    shutil.copy(twin, studies / "twin1.dcm")
    shutil.copy(twin, studies / "twin2.dcm")
    out = tmp_path / "out"
    summary = _scan(studies, out, small_bundle)
    rows = {r["file"]: r for r in read_results(out / "results.csv")}
    uid = pydicom.dcmread(source).SOPInstanceUID
    claims = ["a/IM0001", "b/IM0001", "c.dcm"]
    for name in claims:
        assert rows[name]["status"] == "ok" and uid in rows[name]["notes"]
        assert all(other in rows[name]["notes"] for other in claims if other != name)
        assert name not in caplog.text  # the log names no file (a name may be the patient's)
        assert "a person must decide which is the image" in rows[name]["notes"]
    claimed = {pydicom.dcmread(_sr_path(out, rows[name])).SOPInstanceUID for name in claims}
    assert len(claimed) == 3  # three images, three SR objects a PACS keeps
    assert rows["twin1.dcm"]["status"] == rows["twin2.dcm"]["status"] == "ok"
    twins = {pydicom.dcmread(_sr_path(out, rows[name])).SOPInstanceUID for name in ("twin1.dcm", "twin2.dcm")}
    assert len(twins) == 1 and not twins & claimed  # the twins' one object
    assert summary.counts == {"ok": 5}


def test_a_resumed_scan_gives_an_image_arriving_under_a_scored_uid_an_sr_of_its_own(tmp_path, small_bundle):
    """Scored alone, a file has its SR; an image of other pixels under its UID arrives, and the
    resumed scan scores it with an SR UID of its own: the PACS keeps both, and its row's notes
    name the first file."""
    studies = tmp_path / "studies"
    studies.mkdir()
    source = EXAMPLE / "NIH01511" / "STUDY1" / "SERIES1" / "IM0001"
    shutil.copy(source, studies / "first.dcm")
    out = tmp_path / "out"
    _scan(studies, out, small_bundle)
    assert len(list((out / "dicom").iterdir())) == 1
    ds = pydicom.dcmread(source)
    ds.decompress(generate_instance_uid=False)
    ds.PixelData = np.ascontiguousarray(ds.pixel_array[:, ::-1]).tobytes()
    ds.save_as(studies / "second.dcm", enforce_file_format=True)
    cfg = ScanConfig(weights=str(small_bundle), device="cpu", precision="fp32", progress=False, batch_size=4,
                     workers=0, pdf=False, dicom_sr=True)
    summary = run_scan(studies, out, cfg, earlier="resume")
    rows = {r["file"]: r for r in read_results(out / "results.csv")}
    assert rows["first.dcm"]["status"] == rows["second.dcm"]["status"] == "ok" and summary.kept == 1
    assert "first.dcm" in rows["second.dcm"]["notes"]
    uids = {pydicom.dcmread(p).SOPInstanceUID for p in (out / "dicom").iterdir()}
    assert len(uids) == 2


def test_a_finding_not_flagged_reads_not_ruled_out_never_absent(sr_scan):
    """A PACS viewer lists each finding's qualitative evaluation by its code meaning. The SR said
    SNOMED 'Absent' for every finding under its threshold, so a viewer showed 'Pneumothorax:
    Absent' for v3, which flagged none of 10 held-out pneumothoraces, and 'Present' for a flag
    whose PPV is 0.10. The evaluation says what the model did: flagged (to be confirmed) or not
    flagged (not ruled out)."""
    _, out, rows, _ = sr_scan
    for file in ("full.dcm", "utf8/IM0001"):
        row = rows[file]
        path = _sr_path(out, row)
        groups = hd.sr.Comprehensive3DSR.from_dataset(pydicom.dcmread(path)).content.get_image_measurement_groups()
        for finding, group in zip(FINDINGS, groups):
            (evaluation,) = group.get_qualitative_evaluations()
            assert evaluation.value == FLAG_CODES[row[f"flag_{finding}"] == "1"]
        if have("dsrdump"):
            shown = subprocess.run(["dsrdump", str(path)], capture_output=True, text=True, timeout=60).stdout
            assert '"Absent"' not in shown and '"Present"' not in shown
            assert shown.count('"Not flagged by the model: not ruled out"') == sum(
                row[f"flag_{f}"] != "1" for f in FINDINGS)


def test_an_sr_made_the_night_the_clock_goes_back_says_its_utc_offset(sr_scan, small_bundle, berlin, tmp_path):
    """The SR's content, creation and contribution times were local times without an offset:
    on the night the clock goes back, a corrected result made at 02:15 (after the change)
    read as older than the original it corrects, made at 02:30 (before). Each SR now says the
    offset in force when it was made (Timezone Offset From UTC, PS3.3 C.12.1.1.8), the template
    and highdicom alike, and dciodvfy still finds no error."""
    from cxr_batch.bundle import load_bundle
    from tests.conftest import DST_NIGHT_AFTER, DST_NIGHT_BEFORE

    studies, _, rows, _ = sr_scan
    bundle = load_bundle(small_bundle)
    record = _variants(studies, rows)["as scored"]
    factory = SRFactory(bundle)
    made = []
    for moment in (DST_NIGHT_BEFORE, DST_NIGHT_AFTER):
        berlin(moment)
        data = factory.sr_bytes(record)
        assert data == sr_bytes(build_sr(record, bundle))  # the template writes what highdicom writes
        made.append(pydicom.dcmread(io.BytesIO(data)))
    assert factory.template(DX_PRESENTATION) is not None
    original, correction = made
    assert (original.ContentDate, original.ContentTime, original.TimezoneOffsetFromUTC) == ("20261025", "023000", "+0200")
    assert (correction.ContentDate, correction.ContentTime, correction.TimezoneOffsetFromUTC) == (
        "20261025", "021500", "+0100")
    for sr in made:
        assert (sr.InstanceCreationDate, sr.InstanceCreationTime) == (sr.ContentDate, sr.ContentTime)
        stamps = [e.ContributionDateTime for e in sr.ContributingEquipmentSequence if "ContributionDateTime" in e]
        assert stamps and set(stamps) == {sr.ContentDate + sr.ContentTime + sr.TimezoneOffsetFromUTC}

    def moment(sr):
        return dt.datetime.strptime(sr.ContentDate + sr.ContentTime + sr.TimezoneOffsetFromUTC, "%Y%m%d%H%M%S%z")

    assert moment(correction) - moment(original) == dt.timedelta(minutes=45)
    if have("dciodvfy"):
        for k, sr in enumerate(made):
            path = tmp_path / f"{k}.sr.dcm"
            path.write_bytes(sr_bytes(sr))
            done = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=60)
            lines = (done.stdout + done.stderr).splitlines()
            assert not [x for x in lines if x.startswith("Error")], lines
            unexpected = [w for w in lines if w.startswith("Warning")
                          and not any(re.search(a, w) for a in ACCEPTED_DCIODVFY_WARNINGS)]
            assert not unexpected, unexpected


def test_an_accession_number_over_16_characters_is_kept_whole_as_the_order_s_filler_number(sr_scan, small_bundle):
    """The SR left an accession number over 16 characters (not a valid SH) empty, while the ORU
    sends it whole as the order's filler number (ORC-3, OBR-3): the SR could not be matched to
    the order by it. AccessionNumber stays empty (cut, it could be another order's); the whole
    number goes into the Referenced Request Sequence as Filler Order Number / Imaging Service
    Request (LO, 64), and the row's notes say where. dciodvfy accepts it
    (test_real_dicom_tools_accept_every_sr reads this SR too)."""
    from cxr_batch.bundle import load_bundle
    from cxr_batch.integration.hl7 import oru_r01

    studies, out, rows, _ = sr_scan
    row = rows["hostile.dcm"]
    sr = pydicom.dcmread(_sr_path(out, row))
    assert sr.AccessionNumber == "" and row["accession_number"] == "A" * 40
    assert len(sr.ReferencedRequestSequence) == 1
    request = sr.ReferencedRequestSequence[0]
    assert request.FillerOrderNumberImagingServiceRequest == "A" * 40 and request.AccessionNumber == ""
    assert request.StudyInstanceUID == sr.StudyInstanceUID
    assert "accession number over 16 characters" in row["notes"] and "Filler Order Number" in row["notes"]
    # the ORU's filler order number is the same value
    record = _variants(studies, rows)["long values and invalid uids, none flagged"]
    segments = {s.split("|")[0]: s.split("|") for s in oru_r01(record).split("\r") if s}
    assert segments["ORC"][3] == request.FillerOrderNumberImagingServiceRequest
    # the template path writes the same SR (this one is built by highdicom: the template has no such sequence)
    bundle = load_bundle(small_bundle)
    assert SRFactory(bundle).sr_bytes(record, CREATED[0]) == sr_bytes(build_sr(record, bundle, CREATED[0]))
    # an accession number that fits stays where it was, with no request sequence
    full = pydicom.dcmread(_sr_path(out, rows["full.dcm"]))
    assert full.AccessionNumber == "A123" and "ReferencedRequestSequence" not in full


def test_a_site_measured_sensitivity_gives_its_count_in_the_sr_and_the_oru_as_on_the_pdfs(nih_images, small_bundle,
                                                                                          tmp_path):
    """A bundle calibrated with `--thresholds specificity:0.8` on 40 studies, 3 of them with a
    pneumothorax: the PDFs say 'sensitivity 0.67 at its threshold (flagged 2 of 3 that had it;
    cross-validated ...)', but the SR a radiologist opens in the PACS viewer (and the ORU's note
    under the flag, the same line) said 'a flag has sensitivity 0.67, PPV 0.20': two thirds of
    all pneumothoraces, read from two of three. The SR says the count in the PDFs' words, and a
    finding the calibration left at the base's figures names the base as their source, as the PDFs do."""
    from cxr_batch.bundle import load_bundle, write_manifest
    from cxr_batch.evidence import bundle_evidence
    from cxr_batch.integration.hl7 import oru_r01
    from cxr_batch.sr import trust_lines

    folder = tmp_path / "site"
    shutil.copytree(small_bundle, folder)
    manifest = json.loads((folder / "manifest.json").read_text())
    site = "cross-validated on the 40 labelled studies of this site's calibration (specificity:0.8)"
    base = "the base bundle's figures (out of fold): too few positives at this site"
    # the triage table as calibrate leaves it (cxr_batch.calibrate): the site's source for the table, the
    # base's figures (and their source) for findings with too few positives there
    manifest["triage"] = {"measured_on": site, "findings": {
        **{f: {"flagged": True, "sensitivity": 0.5, "ppv_at_nih_prevalence": 0.25, "measured_on": base}
           for f in FINDINGS},
        # as calibrate writes a finding measured on the site's studies
        "Pneumothorax": {"flagged": True, "sensitivity": 2 / 3, "specificity": 0.78, "ppv_at_nih_prevalence": None,
                         "ppv_at_site": 0.2, "flag_rate": 0.25, "positives": 3}}}
    write_manifest(folder, manifest)
    bundle = load_bundle(folder)
    pdf_words = bundle_evidence(bundle.manifest, bundle.path).sensitivity("Pneumothorax")
    assert pdf_words == f"Pneumothorax: sensitivity 0.67 at its threshold (flagged 2 of 3 that had it; {site})"

    write(tmp_path / "studies" / "a.dcm", grey(nih_images[0]), AccessionNumber="ACC1", **FULL)
    ids = identifiers(pydicom.dcmread(tmp_path / "studies" / "a.dcm"))
    k = FINDINGS.index("Pneumothorax")
    probs, flags = [0.01] * 14, [0] * 14
    probs[k], flags[k] = 0.9, 1
    record = StudyRecord(file="a.dcm", ids=ids, scores=Scores(tuple(probs), tuple(flags), "urgent", 0.9, 0.9))
    path = tmp_path / "a.sr.dcm"
    path.write_bytes(sr_bytes(build_sr(record, bundle)))
    sr = pydicom.dcmread(path)
    comments = [i.TextValue for i in sr.ContentSequence[-1].ContentSequence if i.ValueType == "TEXT"]
    said = f"Pneumothorax: a flag has sensitivity 0.67, PPV 0.20 at threshold 0.5 (flagged 2 of 3 that had it; {site})"
    assert comments[k] == said, comments[k]
    assert comments[FINDINGS.index("Effusion")] == f"Effusion: a flag has sensitivity 0.50, PPV 0.25 at threshold 0.5 ({base})"
    if have("dsrdump"):
        done = subprocess.run(["dsrdump", "+Pl", str(path)], capture_output=True, text=True, timeout=60)
        assert done.returncode == 0 and f'"{said}"' in done.stdout, done.stderr  # as a viewer shows it
    if have("dciodvfy"):
        done = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=60)
        lines = (done.stdout + done.stderr).splitlines()
        assert not [x for x in lines if x.startswith("Error")], lines
        unexpected = [w for w in lines if w.startswith("Warning")
                      and not any(re.search(a, w) for a in ACCEPTED_DCIODVFY_WARNINGS)]
        assert not unexpected, unexpected
    oru = oru_r01(record, thresholds=bundle.thresholds, trust=dict(zip(FINDINGS, trust_lines(bundle))))
    notes = [s for s in oru.split("\r") if s.startswith("NTE|1||Pneumothorax")]
    assert notes == [f"NTE|1||{said}"], notes

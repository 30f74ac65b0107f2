"""DICOM Structured Reports of the results: a TID 1500 Measurement Report per scored image.

One Comprehensive 3D SR per scored DICOM image, built with highdicom, in the source's study
(same StudyInstanceUID and patient/study modules) and in a series of its own, so a PACS files
it beside the radiograph and viewers that read TID 1500 (OHIF among them) show it, with what
IHE AI Results (AIR) asks of an AI result:

- the algorithm as contributing equipment (purpose "Processing Algorithm", 99IHE): manufacturer,
  model name, software version and a Device UID derived from the bundle_sha256;
- the device observer (cxr-batch with the bundle's label) and Procedure Reported "Plain chest
  X-ray" (the imaging procedure, not the algorithm); the Image Library (111028) with the source;
- one measurement group (TID 1501) per finding, in FINDINGS order: tracking identifier = the
  NIH label and a tracking UID (112040), the finding type as a code, the probability and the
  bundle's threshold as measurements, whether the model flagged it as a qualitative evaluation
  (private codes "Flagged by the model: to be confirmed" / "Not flagged by the model: not ruled
  out", never SNOMED's Present/Absent, which a viewer shows as a finding's presence), the algorithm (TID 4019: bundle name, version, weights sha256), and the source
  image (SOP class and instance);
- the triage priority and the decision-support statement as qualitative evaluations.

Its SOPInstanceUID is derived from the source SOPInstanceUID and the weights sha256 (and its
SeriesInstanceUID from the StudyInstanceUID and the sha256): the same image scored by the same
model always gives the same object, so sending it again after a crash replaces rather than
duplicates it. Header values are copied only in a form valid for their VR: an invalid UID is
replaced by one derived from it, over-long values are cut, malformed dates dropped.

highdicom builds an SR in about a second; :class:`SRFactory` writes the same bytes in a few
milliseconds from a per-bundle template (highdicom's SR with sentinel values, checked against a
second highdicom build before use; :mod:`cxr_batch.sr_template`).
"""
from __future__ import annotations

import datetime as dt
import io
import logging
import math
import re
import unicodedata
import warnings
from dataclasses import dataclass
from pathlib import Path

import highdicom as hd
from highdicom.coding_schemes import CodingSchemeIdentificationItem
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.uid import RE_VALID_UID
from pydicom.valuerep import DA, DS, DT, TM, PersonName

from . import __version__, clock
from .display import is_dicom_date
from .files import FILE_MODE, atomic_write_bytes, private_dir
from .findings import FINDINGS
from .record import StudyRecord, log_name
from .study import derived_uid
from .reports import DISCLAIMER, report_name
from .sr_template import ByteTemplate, TemplateError
from .triage import priority_words

log = logging.getLogger("cxr_batch")

SR_FOLDER = "dicom"  # under the results folder, beside reports/
SERIES_NUMBER = 998  # after the acquired series; the Encapsulated PDF reports use 999
SERIES_DESCRIPTION = "cxr-batch triage results (decision support)"
MANUFACTURER = "cxr-batch"

# Private codes, for the NIH labels that DICOM PS3.16 has no concept for and the priorities.
PRIVATE_SCHEME = "99CXRBATCH"


def _private(value: str, meaning: str) -> hd.sr.CodedConcept:
    return hd.sr.CodedConcept(value, PRIVATE_SCHEME, meaning)


# The finding type of each group: PS3.16's own concept where the standard has it (pydicom's
# copy of PS3.16; Infiltrate, Mass, Nodule and Pneumothorax are its chest CAD findings,
# CID 6104/6105), a private code naming the NIH label otherwise.
FINDING_CODES: dict[str, hd.sr.CodedConcept] = {
    "Atelectasis": _private("ATELECTASIS", "Atelectasis"),
    "Cardiomegaly": codes.SCT.Cardiomegaly,
    "Effusion": codes.SCT.PleuralEffusion,
    "Infiltration": codes.DCM.Infiltrate,
    "Mass": codes.SCT.Mass,
    "Nodule": codes.SCT.Nodule,
    "Pneumonia": _private("PNEUMONIA", "Pneumonia"),
    "Pneumothorax": codes.SCT.Pneumothorax,
    "Consolidation": _private("CONSOLIDATION", "Consolidation"),
    "Edema": codes.SCT.PulmonaryEdema,
    "Emphysema": _private("EMPHYSEMA", "Emphysema"),
    "Fibrosis": codes.SCT.Fibrosis,
    "Pleural_Thickening": _private("PLEURALTHICKEN", "Pleural thickening"),
    "Hernia": _private("HERNIA", "Hernia"),
}
# The priorities in the words the PDF banners use (a PACS or RIS shows the meaning): "abnormal"
# can hold a study with no finding flagged (P(any) over the cutoff), and "normal" is never a
# normal result; a bundle with a P(any) cutoff names it by that (priority_code).
PRIORITY_CODES = {
    "urgent": _private("URGENT", "Urgent: an urgent finding is flagged"),
    "abnormal": _private("ABNORMAL", "Abnormal: read with priority"),
    "normal": _private("NORMAL", "No finding flagged: not a normal result"),
}


# Whether the model flagged a finding, by flag (True/False). SNOMED's "Present"/"Absent" read as
# the finding's presence: a viewer listed "Pneumothorax: Absent" for v3, which flagged none of 10
# held-out pneumothoraces, and "Present" for a flag with a PPV of 0.10.
FLAG_CODES = {True: _private("FLAGGED", "Flagged by the model: to be confirmed"),
              False: _private("NOTFLAGGED", "Not flagged by the model: not ruled out")}


def priority_code(priority: str, normal_below: float | None) -> hd.sr.CodedConcept:
    """The code of a bucket as a bundle with (or without) a P(any) cutoff names it."""
    if priority == "normal" and normal_below is not None:
        return _private("NORMAL", f"{priority_words(priority, normal_below).capitalize()}: not a normal result")
    return PRIORITY_CODES[priority]
# UCUM "{probability}": dimensionless like "1", with an annotation that says what the number
# is. OHIF prints a NUM item as "<value> <unit CodeValue>", so readers see "0.73 {probability}"
# rather than "0.73 1".
PROBABILITY_UNIT = hd.sr.CodedConcept("{probability}", "UCUM", "probability")
QUALITATIVE_EVALUATIONS = hd.sr.CodedConcept("C0034375", "UMLS", "Qualitative Evaluations")  # TID 1500 row 12
# TID 1500 Procedure Reported (CID 100, extensible): the imaging procedure the results are about
PROCEDURE_REPORTED = hd.sr.CodedConcept("399208008", "SCT", "Plain chest X-ray")
# IHE AI Results (AIR) Rev 1.1: the algorithm is an item of the Contributing Equipment Sequence
# whose purpose of reference is IHE's interim code 1630 "Processing Algorithm" in scheme 99IHE
# (IHE's tables write it (Newcode1, 99IHE, 1630 "Processing Algorithm"): Newcode1 marks a code
# awaiting its DICOM value; MONAI Deploy writes that placeholder as the value, we write 1630).
PROCESSING_ALGORITHM = hd.sr.CodedConcept("1630", "99IHE", "Processing Algorithm")


def _coding_schemes() -> list[CodingSchemeIdentificationItem]:
    """The private coding schemes the SR uses (fresh items: each SR owns its datasets)."""
    return [CodingSchemeIdentificationItem(designator=PRIVATE_SCHEME, name="cxr-batch findings and priorities",
                                   responsible_organization="cxr-batch project"),
    CodingSchemeIdentificationItem(designator="99IHE", name="IHE interim codes",
                                   responsible_organization="IHE International")]

class SRNotMade(Exception):
    """A record no SR can be made for (not scored, not a DICOM image); ``str(e)`` says why."""


@dataclass(frozen=True)
class SourceImage:
    """The scored image as the SR refers to it: its UIDs, each valid (the source's own or,
    where that was invalid or missing, one derived from it)."""

    sop_class_uid: str
    sop_uid: str
    series_uid: str
    study_uid: str
    replaced: tuple[str, ...] = ()  # which of the source's UIDs were invalid and replaced


def _valid_uid(value: str) -> bool:
    """PS3.5 9.1: digits and dots, no leading zero in a component, 64 characters at most."""
    return 0 < len(value) <= 64 and re.match(RE_VALID_UID, value) is not None


def source_image(record: StudyRecord) -> SourceImage:
    """The record's source image, or SRNotMade when there is none to refer to."""
    ids = record.ids
    if not record.ok or record.scores is None:
        raise SRNotMade(f"not scored ({record.status})")
    if not ids.sop_class_uid:
        raise SRNotMade("the source is not a DICOM image (no SOP Class UID)")
    if not _valid_uid(ids.sop_class_uid):
        raise SRNotMade("the source's SOP Class UID is not a valid UID")
    replaced, uids = [], {}
    for keyword, value in (("SOPInstanceUID", ids.sop_uid), ("SeriesInstanceUID", ids.series_uid),
                           ("StudyInstanceUID", ids.study_uid)):
        if _valid_uid(value):
            uids[keyword] = value
        else:
            # A missing UID is derived from the file's path so that images do not share it.
            uids[keyword] = derived_uid("replaced", keyword, value or f"missing:{record.file}")
            replaced.append(keyword)
    return SourceImage(ids.sop_class_uid, uids["SOPInstanceUID"], uids["SeriesInstanceUID"],
                       uids["StudyInstanceUID"], tuple(replaced))


def sr_uids(source: SourceImage, weights_sha256: str, revision: str = "") -> tuple[str, str]:
    """(SOPInstanceUID, SeriesInstanceUID) of the SR of ``source`` by the model with these
    weights: one series per study and model, one instance per image and model, and per
    ``revision`` (set when the result replaces an earlier one of the same source)."""
    return (derived_uid("sr", source.sop_uid, weights_sha256, *([revision] if revision else [])),
            derived_uid("sr-series", source.study_uid, weights_sha256))


# ------------------------------------------------------------------ header values, VR-valid
def _clean(value: str) -> str:
    """No control characters and no backslash (the value separator of every string VR)."""
    value = "".join(ch for ch in str(value or "") if unicodedata.category(ch)[0] != "C")
    return value.replace("\\", " ").strip()


def _cut(value: str, limit: int) -> str:
    """``value`` cut to ``limit`` bytes of UTF-8 at a character boundary. PS3.5 counts
    characters, but validators (dciodvfy) count bytes: bytes satisfy both."""
    return value.encode("utf-8")[:limit].decode("utf-8", "ignore")


def _string(value: str, limit: int) -> str:
    """LO (64) and SH (16): cleaned and cut."""
    return _cut(_clean(value), limit).strip()


def _identifier(value: str, limit: int) -> str:
    """An identifier another system matches on (the accession number): cleaned, and empty
    rather than cut when over ``limit`` bytes: cut, it could be another study's."""
    value = _clean(value)
    return value if len(value.encode("utf-8")) <= limit else ""


def _person_name(value: str) -> str:
    """PN: at most 3 component groups (alphabetic=ideographic=phonetic) of at most 5
    components, each group cut to 64. A name that fits is copied unchanged."""
    groups = _clean(value).split("=")[:3]
    groups = [_cut("^".join(g.split("^")[:5]), 64).rstrip("^ ") for g in groups]
    return "=".join(groups).rstrip("=")


def _date(value: str) -> str:
    """DA: 8 digits of a real date, else empty."""
    value = _clean(value)
    return value if is_dicom_date(value) else ""


_TIME = re.compile(r"^([01]\d|2[0-3])([0-5]\d([0-5]\d(\.\d{1,6})?)?)?$")
_AGE = re.compile(r"^\d{3}[DWMY]$")


def report_header(ids) -> dict:
    """The study's identifiers another object made for it carries (the Encapsulated PDF
    report), the same values as the SR's (a PACS checking a new object's patient against the one
    it holds sees one patient), as VR-valid: {keyword: value}, empty where the source's value is
    not one (a date that is not DA, a backslash that would make a second value)."""
    return {"PatientID": _string(ids.patient_id, 64), "IssuerOfPatientID": _identifier(ids.issuer_of_patient_id, 64),
            "PatientName": _person_name(ids.patient_name),
            "PatientBirthDate": _date(ids.patient_birth_date), "PatientSex": _sex(ids.patient_sex),
            "PatientAge": _age(ids.patient_age), "StudyDate": _date(ids.study_date), "StudyTime": _time(ids.study_time),
            "StudyID": _string(ids.study_id, 16), "AccessionNumber": _identifier(ids.accession_number, 16),
            "ReferringPhysicianName": _person_name(ids.referring_physician),
            "TimezoneOffsetFromUTC": ids.timezone_offset if clock.valid_offset(ids.timezone_offset) else ""}


def _time(value: str) -> str:
    value = _clean(value)
    return value if _TIME.match(value) else ""


def _age(value: str) -> str:
    value = _clean(value)
    return value if _AGE.match(value) else ""


def _sex(value: str) -> str:
    value = _clean(value).upper()
    return value if value in ("M", "F", "O") else ""


# ------------------------------------------------------------------ one study's values
@dataclass(frozen=True)
class StudyValues:
    """Everything an SR says that depends on the study, each value already in the form written
    (VR-valid, rounded): the one input of both ways of making an SR (highdicom's, and a filled
    template), so the two cannot say different things."""

    source: SourceImage
    sr_uid: str
    sr_series_uid: str
    patient_name: str
    patient_id: str
    issuer_of_patient_id: str | None  # None: the source names no issuer, and no element
    patient_birth_date: str
    patient_sex: str
    patient_age: str | None  # None: no valid age, and no PatientAge element
    accession_number: str
    study_id: str
    study_date: str
    study_time: str
    referring_physician: str
    tracking_uids: tuple[str, ...]  # per finding, FINDINGS order
    probabilities: tuple[float, ...]  # 6 decimals, as in results.csv
    flag_codes: tuple[hd.sr.CodedConcept, ...]  # FLAG_CODES: flagged / not flagged
    priority_code: hd.sr.CodedConcept
    created: dt.datetime  # instance creation, content and contribution date/time; aware (its UTC offset)
    # an accession number too long for AccessionNumber (SH, 16) but whole in an LO (64): the
    # order's filler number in the Referenced Request Sequence, as the ORU sends it (ORC-3, OBR-3),
    # so the SR can still be matched to the order; None when AccessionNumber holds it (or none fits)
    filler_order_number: str | None = None


def study_values(record: StudyRecord, bundle, created: dt.datetime | None = None, revision: str = "") -> StudyValues:
    """The SR values of a scored DICOM ``record`` by ``bundle`` (the one that scored it);
    SRNotMade when the record cannot have an SR. ``created``: when it is made (default: now,
    from :mod:`cxr_batch.clock`); a naive time is read as local time."""
    if record.weights_sha256 and record.weights_sha256 != bundle.sha256:
        raise SRNotMade(f"scored by other weights ({record.weights_sha256[:12]}...) than this bundle's")
    source = source_image(record)
    scores = record.scores
    if len(scores.probs) != len(FINDINGS) or not all(math.isfinite(p) for p in scores.probs):
        raise SRNotMade("the scores are not one finite probability per finding")
    if scores.priority not in PRIORITY_CODES:
        raise SRNotMade(f"unknown priority {scores.priority!r}")
    sr_uid, series_uid = sr_uids(source, bundle.sha256, revision)
    ids = record.ids
    return StudyValues(
        source=source, sr_uid=sr_uid, sr_series_uid=series_uid,
        patient_name=_person_name(ids.patient_name), patient_id=_string(ids.patient_id, 64),
        issuer_of_patient_id=_identifier(ids.issuer_of_patient_id, 64) or None,
        patient_birth_date=_date(ids.patient_birth_date), patient_sex=_sex(ids.patient_sex),
        patient_age=_age(ids.patient_age) or None,
        accession_number=_identifier(ids.accession_number, 16), study_id=_string(ids.study_id, 16),
        filler_order_number=(None if _identifier(ids.accession_number, 16) else
                             _identifier(ids.accession_number, 64) or None),
        study_date=_date(ids.study_date), study_time=_time(ids.study_time),
        referring_physician=_person_name(ids.referring_physician),
        tracking_uids=tuple(derived_uid("tracking", sr_uid, f) for f in FINDINGS),
        probabilities=tuple(round(float(p), 6) for p in scores.probs),
        flag_codes=tuple(FLAG_CODES[bool(flag)] for flag in scores.flags),
        priority_code=priority_code(scores.priority, bundle.triage_policy().normal_below),
        # at the source's offset when it says one: the SR's one offset is also its study time's
        created=clock.at_offset(clock.aware(created) if created is not None else clock.local_now(),
                                record.ids.timezone_offset),
    )


def _evidence(values: StudyValues) -> Dataset:
    """The source image as highdicom takes it (``evidence``): its UIDs and the patient and
    study attributes the SR copies."""
    source = values.source
    ds = Dataset()
    ds.SOPClassUID, ds.SOPInstanceUID = source.sop_class_uid, source.sop_uid
    ds.StudyInstanceUID, ds.SeriesInstanceUID = source.study_uid, source.series_uid
    ds.PatientName = values.patient_name
    ds.PatientID = values.patient_id
    if values.issuer_of_patient_id is not None:  # "P1" of one site is another patient than "P1" of the next
        ds.IssuerOfPatientID = values.issuer_of_patient_id
    ds.PatientBirthDate = values.patient_birth_date
    ds.PatientSex = values.patient_sex
    if values.patient_age is not None:
        ds.PatientAge = values.patient_age
    ds.AccessionNumber = values.accession_number
    ds.StudyID = values.study_id
    ds.StudyDate = values.study_date
    ds.StudyTime = values.study_time
    ds.ReferringPhysicianName = values.referring_physician
    return ds


def _requested_procedure(values: StudyValues) -> Dataset:
    """The order the SR answers, for an accession number AccessionNumber (SH) cannot hold
    whole: an item of the Referenced Request Sequence with it as Filler Order Number / Imaging
    Service Request (LO), the value the ORU sends as the filler order number; its type 2
    attributes empty (AccessionNumber among them: cut, it could be another order's)."""
    item = Dataset()
    item.StudyInstanceUID = values.source.study_uid
    item.ReferencedStudySequence = []
    item.AccessionNumber = ""
    item.PlacerOrderNumberImagingServiceRequest = ""
    item.FillerOrderNumberImagingServiceRequest = values.filler_order_number
    item.RequestedProcedureID = ""
    item.RequestedProcedureDescription = ""
    item.RequestedProcedureCodeSequence = []
    return item


# ------------------------------------------------------------------ content
def _finding_group(finding: str, probability: float, flag: hd.sr.CodedConcept, threshold: float,
                   source: SourceImage, algorithm: hd.sr.AlgorithmIdentification, tracking_uid: str):
    code = FINDING_CODES[finding]
    # Each NUM has children (TID 300): the probability its source image, the threshold the
    # algorithm it belongs to. OHIF reads a NUM's children without checking there are any.
    image = [hd.sr.SourceImageForMeasurement(source.sop_class_uid, source.sop_uid)]
    return hd.sr.MeasurementsAndQualitativeEvaluations(
        # TID 1501: Tracking Identifier (112039) and Tracking Unique Identifier (112040), which
        # OHIF needs to list a measurement group
        tracking_identifier=hd.sr.TrackingIdentifier(uid=tracking_uid, identifier=finding),
        finding_type=code,
        algorithm_id=algorithm,  # TID 4019
        measurements=[
            hd.sr.Measurement(name=codes.DCM.Probability, value=probability,
                              unit=PROBABILITY_UNIT, referenced_images=image),
            hd.sr.Measurement(name=codes.DCM.ThresholdValue, value=round(float(threshold), 6),
                              unit=PROBABILITY_UNIT, algorithm_id=algorithm),
        ],
        qualitative_evaluations=[hd.sr.QualitativeEvaluation(name=code, value=flag)],
        source_images=[hd.sr.SourceImageForMeasurementGroup(source.sop_class_uid, source.sop_uid)],
    )


def _image_library(source: SourceImage) -> hd.sr.ContainerContentItem:
    """TID 1600 with the one source image. highdicom's ImageLibrary wants the whole image
    dataset (rows, columns, orientation) that a record does not keep; the entry descriptors are
    optional, and OHIF looks for the library to find the images an SR refers to."""
    contains = hd.sr.RelationshipTypeValues.CONTAINS
    image = hd.sr.ImageContentItem(name=hd.sr.CodedConcept("260753009", "SCT", "Source"),
                                   referenced_sop_class_uid=source.sop_class_uid,
                                   referenced_sop_instance_uid=source.sop_uid, relationship_type=contains)
    group = hd.sr.ContainerContentItem(name=codes.DCM.ImageLibraryGroup, relationship_type=contains)
    group.ContentSequence = hd.sr.ContentSequence([image])
    library = hd.sr.ContainerContentItem(name=codes.DCM.ImageLibrary, relationship_type=contains)
    library.ContentSequence = hd.sr.ContentSequence([group])
    return library


def trust_lines(bundle) -> list[str]:
    """What a flag of each finding is worth, from the bundle's evidence (one line per finding,
    the same in every SR of the bundle): 'Pneumothorax: a flag has sensitivity 0.45 and PPV
    0.21 at threshold 0.12 (out of fold on ...)', where measured in the PDFs' words
    (:meth:`cxr_batch.evidence.Evidence.measured`: a site's count, a finding's own source)."""
    from .display import finding_label
    from .evidence import bundle_evidence

    ev = bundle_evidence(bundle.manifest, bundle.path)
    lines = []
    for f in FINDINGS:
        point, counts, catch = ev.operating_points.get(f), ev.counts.get(f), ev.catch(f)
        # the counted catch at this bundle's threshold, as the PDFs print it (v3's pneumothorax: 0 of 10 held out)
        held_out = f"sensitivity {counts.tp / counts.positives:.2f} ({catch})" if catch else ""
        if point is None:
            text = (f"{held_out} at threshold {bundle.thresholds[f]:.4g}; PPV not measured" if held_out
                    else "sensitivity and PPV at its threshold not measured for this model")
        elif not point.flagged:
            text = f"never flagged by this model: {point.why or 'validation ranking no better than chance'}"
        else:
            where = f" ({ev.measured(f)})" if ev.measured(f) else ""
            text = f"a flag has {point.trust().replace('sens.', 'sensitivity')} at threshold {bundle.thresholds[f]:.4g}{where}"
            text += f"; {held_out}" if held_out else ""
        lines.append(_string(f"{finding_label(f)}: {text}", 1024))
    return lines


def _evaluations(priority: hd.sr.CodedConcept, trust: list[str]) -> hd.sr.ContainerContentItem:
    """TID 1500 row 12: the triage priority, what each finding's flag is worth, and the
    decision-support statement."""
    contains = hd.sr.RelationshipTypeValues.CONTAINS
    container = hd.sr.ContainerContentItem(name=QUALITATIVE_EVALUATIONS, relationship_type=contains)
    container.ContentSequence = hd.sr.ContentSequence(
        [hd.sr.CodeContentItem(name=codes.SCT.Priority, value=priority, relationship_type=contains)]
        + [hd.sr.TextContentItem(name=codes.DCM.Comment, value=line, relationship_type=contains) for line in trust]
        + [hd.sr.TextContentItem(name=codes.DCM.Comment, value=DISCLAIMER, relationship_type=contains)])
    return container


def device_uid(bundle) -> str:
    """The algorithm's Device UID: one per bundle (bundle_sha256 covers weights, thresholds,
    calibration), so a PACS or an AI-results viewer tells two models apart."""
    return derived_uid("device", bundle.sha256)


def _algorithm_equipment(bundle) -> hd.ContributingEquipment:
    """IHE AIR's algorithm identification in the Contributing Equipment Sequence: purpose
    "Processing Algorithm", manufacturer, model name, software version, Device UID."""
    item = hd.ContributingEquipment(
        manufacturer=MANUFACTURER, purpose_of_reference=codes.DCM.ProcessingEquipment,
        manufacturer_model_name=_string(bundle.name, 64), software_versions=_string(bundle.version, 64),
        contribution_description=f"Triage model {_string(bundle.label, 64)}, bundle sha256 {bundle.sha256}")
    # highdicom accepts only the DCM purposes of CID 7005; the IHE code has none yet
    item.PurposeOfReferenceCodeSequence = [PROCESSING_ALGORITHM]
    item.DeviceUID = device_uid(bundle)
    return item


def _highdicom_sr(values: StudyValues, bundle, predecessor: Dataset | None = None) -> hd.sr.Comprehensive3DSR:
    """The SR of ``values`` built by highdicom (the reference the templates are checked
    against)."""
    source = values.source
    algorithm = hd.sr.AlgorithmIdentification(name=bundle.name, version=bundle.version,
                                              parameters=[f"weights sha256 {bundle.sha256}"],
                                              manufacturer=MANUFACTURER)
    device = hd.sr.DeviceObserverIdentifyingAttributes(
        uid=device_uid(bundle), name="cxr-batch", manufacturer_name=MANUFACTURER,
        model_name=_string(bundle.label, 64))
    groups = [_finding_group(f, values.probabilities[k], values.flag_codes[k], bundle.thresholds[f], source,
                             algorithm, values.tracking_uids[k]) for k, f in enumerate(FINDINGS)]
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(
            observer_device_context=hd.sr.ObserverContext(observer_type=codes.cid270.Device,
                                                          observer_identifying_attributes=device)),
        procedure_reported=PROCEDURE_REPORTED,
        imaging_measurements=groups,
        title=codes.cid7021.ImagingMeasurementReport,
    )
    content = report[0].ContentSequence
    # TID 1500 order: ..., procedure reported, image library, imaging measurements, evaluations
    content.insert(len(content) - 1, _image_library(source))
    content.append(_evaluations(values.priority_code, trust_lines(bundle)))
    created = values.created
    with warnings.catch_warnings():
        # A one-component name ("DOE", "ANONYMOUS") is valid PN: keep it as the source had it.
        warnings.filterwarnings("ignore", message=".*unlikely to represent the intended person name")
        sr = hd.sr.Comprehensive3DSR(
            evidence=[_evidence(values)],
            content=report[0],
            series_instance_uid=values.sr_series_uid,
            series_number=SERIES_NUMBER,
            sop_instance_uid=values.sr_uid,
            previous_versions=[predecessor] if predecessor is not None else None,
            requested_procedures=[_requested_procedure(values)] if values.filler_order_number else None,
            instance_number=1,
            manufacturer=MANUFACTURER,
            manufacturer_model_name=_string(bundle.label, 64),
            software_versions=f"cxr-batch {__version__}",
            series_description=SERIES_DESCRIPTION,
            is_complete=True,  # every finding is reported
            is_final=False, is_verified=False,  # decision support: no one has verified it
            specific_character_set="ISO_IR 192",  # UTF-8: any name the source had survives
            coding_schemes=_coding_schemes(),
            contributing_equipment=[_algorithm_equipment(bundle)],
            content_date=created.date(), content_time=created.time(),
        )
    # One moment for every date/time of the object (highdicom reads its own clock for the
    # instance creation and its contribution): the same values give the same bytes.
    sr.InstanceCreationDate, sr.InstanceCreationTime = DA(created.date()), TM(created.time())
    # The UTC offset of those local dates and times (PS3.3 C.12.1.1.8), the one in force when
    # the SR was made: the night a DST clock goes back, a correction made at 02:15 +0100 is
    # later than the original it replaces, made at 02:30 +0200. The DT says it too.
    sr.TimezoneOffsetFromUTC = _created_offset(created)
    for item in sr.ContributingEquipmentSequence:
        if "ContributionDateTime" in item:
            item.ContributionDateTime = DT(created)
    return sr


def build_sr(record: StudyRecord, bundle, created: dt.datetime | None = None, revision: str = "",
             predecessor: Dataset | None = None) -> hd.sr.Comprehensive3DSR:
    """The SR of a scored DICOM ``record`` by ``bundle`` (the one that scored it: name,
    version, sha256, thresholds), built by highdicom, dated ``created`` (default: now).
    Raises SRNotMade when the record cannot have one. A changed result gets a ``revision``
    (its own UID) and names the SR it supersedes, ``predecessor`` (Predecessor Documents
    Sequence); which, is the daemon's to say (cxr_batch.watch). :class:`SRFactory` writes the
    same bytes much faster."""
    return _highdicom_sr(study_values(record, bundle, created, revision), bundle, predecessor)


def sr_bytes(sr: Dataset) -> bytes:
    """The SR as a DICOM file (preamble, file meta, explicit VR little endian)."""
    buf = io.BytesIO()
    sr.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def sr_file_name(key: str) -> str:
    """The PDF report's name with ``.sr.dcm``: the two files of a study pair up by name
    (``key`` names both: scan's file path, the daemon's key and content)."""
    return report_name(key).removesuffix(".pdf") + ".sr.dcm"


# ------------------------------------------------------------------ templates
# The fast way: highdicom builds one SR per bundle and source SOP class with sentinel values,
# cxr_batch.sr_template compiles it into fixed bytes and slots, and each study's SR is that
# template filled with its values. Before a template is used, it is filled with a second set of
# values and compared byte for byte with what highdicom builds from them; a template that
# differs is not used (highdicom builds every SR then).
def _created_date(created: dt.datetime) -> DA:
    return DA(created.date())


def _created_time(created: dt.datetime) -> TM:
    return TM(created.time())


def _created_datetime(created: dt.datetime) -> DT:
    return DT(created)


def _created_offset(created: dt.datetime) -> str:
    return clock.utc_offset(created)


def _number(value: float) -> DS:
    return DS(value, auto_format=True)  # as highdicom's NUM content item writes it


def _atoms(values: StudyValues) -> dict[str, object]:
    """``values`` flattened into the named values a template's slots carry."""
    source = values.source
    atoms: dict[str, object] = {
        "sr_uid": values.sr_uid, "sr_series_uid": values.sr_series_uid, "source_sop_uid": source.sop_uid,
        "source_series_uid": source.series_uid, "study_uid": source.study_uid,
        "patient_name": values.patient_name, "patient_id": values.patient_id,
        "issuer_of_patient_id": values.issuer_of_patient_id,
        "patient_birth_date": values.patient_birth_date, "patient_sex": values.patient_sex,
        "patient_age": values.patient_age, "accession_number": values.accession_number,
        "study_id": values.study_id, "study_date": values.study_date, "study_time": values.study_time,
        "referring_physician": values.referring_physician, "created": values.created,
    }
    for k in range(len(FINDINGS)):
        atoms[f"tracking.{k}"] = values.tracking_uids[k]
        atoms[f"probability.{k}"] = values.probabilities[k]
    for prefix, code in [(f"flag.{k}", c) for k, c in enumerate(values.flag_codes)] + [("priority", values.priority_code)]:
        if code.scheme_version:
            raise TemplateError(f"{prefix}: a code with a scheme version has no slot")
        atoms[f"{prefix}.value"] = code.value
        atoms[f"{prefix}.scheme"] = code.scheme_designator
        atoms[f"{prefix}.meaning"] = code.meaning
    return atoms


def _sentinel_values(sop_class_uid: str) -> StudyValues:
    """Values no SR content has otherwise, each different, each valid for highdicom."""
    def uid(n: int) -> str:
        return f"2.25.31415926535897932384626433832795{n:03d}"

    n = len(FINDINGS)
    return StudyValues(
        source=SourceImage(sop_class_uid, uid(1), uid(2), uid(3)), sr_uid=uid(4), sr_series_uid=uid(5),
        patient_name="ZQSENTINEL^PATIENT", patient_id="ZQSENTINELPID", issuer_of_patient_id="ZQSENTINELISSUER",
        patient_birth_date="19010101",
        patient_sex="O", patient_age="123W", accession_number="ZQSENTINELACC", study_id="ZQSENTINELSID",
        study_date="19020202", study_time="020202", referring_physician="ZQSENTINEL^REFERRER",
        tracking_uids=tuple(uid(100 + k) for k in range(n)),
        probabilities=tuple(round(0.123401 + k * 1e-6, 6) for k in range(n)),
        flag_codes=tuple(hd.sr.CodedConcept(f"ZQFLAGV{k}", f"99ZQFLAG{k}", f"ZQ flag meaning {k}") for k in range(n)),
        priority_code=hd.sr.CodedConcept("ZQPRIOV", "99ZQPRIO", "ZQ priority meaning"),
        created=dt.datetime(1903, 3, 3, 3, 3, 3, 30303, tzinfo=dt.timezone(-dt.timedelta(hours=3, minutes=17))),
    )


def _probe_values(sop_class_uid: str) -> StudyValues:
    """A second, ordinary set of values (UTF-8 name, no age, empty time, mixed flags): the
    template filled with them must give highdicom's bytes."""
    n = len(FINDINGS)
    return StudyValues(
        source=SourceImage(sop_class_uid, "1.2.3.4.5", "1.2.3.4", "1.2.3"), sr_uid="2.25.12", sr_series_uid="2.25.1",
        patient_name="Müller^Jürgen=山田^太郎", patient_id="P 7", issuer_of_patient_id=None, patient_birth_date="",
        patient_sex="F",
        patient_age=None, accession_number="A", study_id="", study_date="20260102", study_time="",
        referring_physician="", tracking_uids=tuple(f"2.25.{700 + k}" for k in range(n)),
        probabilities=tuple(round(k / (n + 1), 6) for k in range(n)),
        flag_codes=tuple(FLAG_CODES[k % 3 == 0] for k in range(n)),
        priority_code=PRIORITY_CODES["urgent"],
        created=dt.datetime(2001, 2, 3, 4, 5, 6, tzinfo=dt.timezone(dt.timedelta(hours=5, minutes=30))),
    )


_STRING_VRS = frozenset("AE AS CS DA DT LO LT PN SH ST TM UC UI UR UT".split())


def _matcher(sentinel: StudyValues):
    """The template's slot finder: an element whose value is one of the sentinel's, in the
    form highdicom writes it."""
    forms: dict[tuple[str, object], tuple[str, object]] = {}
    for name, value in _atoms(sentinel).items():
        if name == "created":
            for transform in (_created_date, _created_time, _created_datetime, _created_offset):
                forms[("text", str(transform(value)))] = (name, transform)
        elif name.startswith("probability."):
            forms[("DS", str(_number(value)))] = (name, _number)
            forms[("FD", value)] = (name, None)
        else:
            forms[("text", value)] = (name, None)
    if len(forms) != len(_atoms(sentinel)) + len(FINDINGS) + 3:
        raise TemplateError("two sentinel values look alike")

    def match(elem):
        value = elem.value
        if elem.VR == "FD" and isinstance(value, float):
            return forms.get(("FD", value))
        if elem.VR == "DS" and not isinstance(value, (list, tuple)) and value is not None:
            return forms.get(("DS", str(value)))
        if elem.VR in _STRING_VRS and isinstance(value, str | PersonName | dt.date | dt.time):
            return forms.get(("text", str(value)))  # DA, TM and DT are date/time objects
        return None
    return match


def sr_template(bundle, sop_class_uid: str) -> ByteTemplate:
    """The checked template of the SRs of ``bundle`` for sources of this SOP class; raises
    TemplateError (or highdicom's own error for a SOP class it cannot reference)."""
    sentinel = _sentinel_values(sop_class_uid)
    template = ByteTemplate.compile(_highdicom_sr(sentinel, bundle), _matcher(sentinel))
    missing = _atoms(sentinel).keys() - template.names
    if missing:
        raise TemplateError(f"values not found in highdicom's SR: {sorted(missing)}")
    probe = _probe_values(sop_class_uid)
    if template.render(_atoms(probe)) != sr_bytes(_highdicom_sr(probe, bundle)):
        raise TemplateError("the filled template differs from highdicom's SR")
    return template


class SRFactory:
    """The SRs of one bundle's results as DICOM files: each the byte-identical copy of what
    :func:`build_sr` + :func:`sr_bytes` give, from a template per source SOP class (made on
    first use, about two highdicom builds) filled in about a millisecond."""

    def __init__(self, bundle):
        self.bundle = bundle
        self._templates: dict[str, ByteTemplate | None] = {}

    def template(self, sop_class_uid: str) -> ByteTemplate | None:
        if sop_class_uid not in self._templates:
            try:
                self._templates[sop_class_uid] = sr_template(self.bundle, sop_class_uid)
            except Exception as e:  # highdicom builds these SRs (or says why it cannot)
                log.warning("SR template for SOP class %s not used (%s: %s): SRs are built one by one",
                            sop_class_uid, type(e).__name__, e)
                self._templates[sop_class_uid] = None
        return self._templates[sop_class_uid]

    def sr_bytes(self, record: StudyRecord, created: dt.datetime | None = None, revision: str = "",
                 predecessor: Dataset | None = None) -> bytes:
        """``record``'s SR as a DICOM file; raises SRNotMade as :func:`build_sr` does. An SR
        that supersedes another (``predecessor``: a rare, changed result) has a sequence the
        template lacks: highdicom builds that one."""
        values = study_values(record, self.bundle, created, revision)
        # a long accession number's request sequence is not in the template either: rare, built by highdicom
        rare = predecessor is not None or values.filler_order_number
        template = None if rare else self.template(values.source.sop_class_uid)
        if template is None:
            return sr_bytes(_highdicom_sr(values, self.bundle, predecessor))
        return template.render(_atoms(values))


@dataclass
class SRWriter:
    """Writes each scored DICOM study's SR to ``folder`` (scan, watch and the DICOM node)."""

    folder: Path
    bundle: object

    def __post_init__(self):
        self.folder = private_dir(Path(self.folder))
        self.factory = SRFactory(self.bundle)

    def write(self, record: StudyRecord, key: str | None = None, **revision) -> Path:
        """Build and write ``record``'s SR atomically (mode 0640); raises SRNotMade. ``key``
        names the file as it names the study's PDF (default: the record's file path);
        ``revision`` and ``predecessor`` go to :func:`build_sr`."""
        path = self.folder / sr_file_name(key or record.file)
        atomic_write_bytes(path, self.factory.sr_bytes(record, **revision), mode=FILE_MODE)
        return path

    def report(self, record: StudyRecord, key: str | None = None, **revision) -> Path | None:
        """:meth:`write` for a scored record; a failure costs that SR only: the record gets a
        note saying why (results.csv shows it) and None is returned. A failing write (OSError:
        disk full, read-only) is raised."""
        try:
            path = self.write(record, key, **revision)
        except SRNotMade as e:
            record.add_note(f"no DICOM SR: {e}")
            return None
        except OSError:  # the output volume (full, read-only): the caller's to handle
            raise
        except Exception as e:
            log.error("%s: DICOM SR not written: %s: %s", log_name(record.file), type(e).__name__, e)
            record.add_note("DICOM SR failed")
            return None
        replaced = source_image(record).replaced
        if replaced:
            record.add_note(f"DICOM SR: invalid source {', '.join(replaced)} replaced by a derived UID")
        if not _identifier(record.ids.accession_number, 16) and _identifier(record.ids.accession_number, 64):
            record.add_note("DICOM SR: accession number over 16 characters (AccessionNumber, SH, left empty) kept "
                            "whole in the Referenced Request Sequence as Filler Order Number, as the ORU's ORC-3")
        return path

    def report_records(self, records: list[StudyRecord]) -> int:
        """:meth:`report` for every scored record; returns how many SRs were written."""
        return sum(self.report(r) is not None for r in records if r.ok)

"""DICOM Structured Reports of the results: a TID 1500 Measurement Report per scored image.

One Comprehensive 3D SR per scored DICOM image, built with highdicom, in the source's study
(same StudyInstanceUID and patient/study modules) and in a series of its own, so a PACS files
it beside the radiograph and viewers that read TID 1500 (OHIF among them) show it:

- the device observer (cxr-batch with the bundle's label) and "Imaging procedure";
- one measurement group (TID 1501) per finding, in FINDINGS order: tracking identifier = the
  NIH label, the finding type as a code, the probability and the bundle's threshold as
  measurements, present/absent at that threshold as a qualitative evaluation, the algorithm
  (bundle name, version, weights sha256), and the source image (SOP class and instance);
- the triage priority and the decision-support statement as qualitative evaluations.

Its SOPInstanceUID is derived from the source SOPInstanceUID and the weights sha256 (and its
SeriesInstanceUID from the StudyInstanceUID and the sha256): the same image scored by the same
model always gives the same object, so sending it again after a crash replaces rather than
duplicates it. Header values are copied only in a form valid for their VR: an invalid UID is
replaced by one derived from it, over-long values are cut, malformed dates dropped.
"""

from __future__ import annotations

import datetime as dt
import io
import logging
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

from . import __version__
from .files import FILE_MODE, atomic_write_bytes, private_dir
from .findings import FINDINGS
from .record import StudyRecord, log_name
from .study import derived_uid
from .reports import DISCLAIMER, report_name

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
PRIORITY_CODES = {
    "urgent": _private("URGENT", "Urgent: an urgent finding is flagged"),
    "abnormal": _private("ABNORMAL", "Abnormal: findings flagged"),
    "normal": _private("NORMAL", "No finding flagged"),
}
# UCUM "{probability}": dimensionless like "1", with an annotation that says what the number
# is. OHIF prints a NUM item as "<value> <unit CodeValue>", so readers see "0.73 {probability}"
# rather than "0.73 1".
PROBABILITY_UNIT = hd.sr.CodedConcept("{probability}", "UCUM", "probability")
QUALITATIVE_EVALUATIONS = hd.sr.CodedConcept("C0034375", "UMLS", "Qualitative Evaluations")  # TID 1500 row 12

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


def _person_name(value: str) -> str:
    """PN: at most 3 component groups (alphabetic=ideographic=phonetic) of at most 5
    components, each group cut to 64. A name that fits is copied unchanged."""
    groups = _clean(value).split("=")[:3]
    groups = [_cut("^".join(g.split("^")[:5]), 64).rstrip("^ ") for g in groups]
    return "=".join(groups).rstrip("=")


def _date(value: str) -> str:
    value = _clean(value)
    try:
        dt.datetime.strptime(value, "%Y%m%d")
        return value
    except ValueError:
        return ""


_TIME = re.compile(r"^([01]\d|2[0-3])([0-5]\d([0-5]\d(\.\d{1,6})?)?)?$")
_AGE = re.compile(r"^\d{3}[DWMY]$")


def _time(value: str) -> str:
    value = _clean(value)
    return value if _TIME.match(value) else ""


def _age(value: str) -> str:
    value = _clean(value)
    return value if _AGE.match(value) else ""


def _sex(value: str) -> str:
    value = _clean(value).upper()
    return value if value in ("M", "F", "O") else ""


def _evidence(record: StudyRecord, source: SourceImage) -> Dataset:
    """The source image as highdicom takes it (``evidence``): its UIDs and the patient and
    study attributes the SR copies, each in a form valid for its VR."""
    ids = record.ids
    ds = Dataset()
    ds.SOPClassUID, ds.SOPInstanceUID = source.sop_class_uid, source.sop_uid
    ds.StudyInstanceUID, ds.SeriesInstanceUID = source.study_uid, source.series_uid
    ds.PatientName = _person_name(ids.patient_name)
    ds.PatientID = _string(ids.patient_id, 64)
    ds.PatientBirthDate = _date(ids.patient_birth_date)
    ds.PatientSex = _sex(ids.patient_sex)
    if _age(ids.patient_age):
        ds.PatientAge = _age(ids.patient_age)
    ds.AccessionNumber = _string(ids.accession_number, 16)
    ds.StudyID = _string(ids.study_id, 16)
    ds.StudyDate = _date(ids.study_date)
    ds.StudyTime = _time(ids.study_time)
    ds.ReferringPhysicianName = _person_name(ids.referring_physician)
    return ds


# ------------------------------------------------------------------ content
def _finding_group(finding: str, probability: float, flagged: bool, threshold: float, source: SourceImage,
                   algorithm: hd.sr.AlgorithmIdentification, sr_uid: str):
    code = FINDING_CODES[finding]
    # Each NUM has children (TID 300): the probability its source image, the threshold the
    # algorithm it belongs to. OHIF reads a NUM's children without checking there are any.
    image = [hd.sr.SourceImageForMeasurement(source.sop_class_uid, source.sop_uid)]
    return hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(uid=derived_uid("tracking", sr_uid, finding),
                                                     identifier=finding),
        finding_type=code,
        algorithm_id=algorithm,
        measurements=[
            # 6 decimals, as in results.csv, so both say the same number
            hd.sr.Measurement(name=codes.DCM.Probability, value=round(float(probability), 6),
                              unit=PROBABILITY_UNIT, referenced_images=image),
            hd.sr.Measurement(name=codes.DCM.ThresholdValue, value=round(float(threshold), 6),
                              unit=PROBABILITY_UNIT, algorithm_id=algorithm),
        ],
        qualitative_evaluations=[
            hd.sr.QualitativeEvaluation(name=code, value=codes.cid240.Present if flagged else codes.cid240.Absent),
        ],
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


def _evaluations(priority: str) -> hd.sr.ContainerContentItem:
    """TID 1500 row 12: the triage priority and the decision-support statement."""
    container = hd.sr.ContainerContentItem(name=QUALITATIVE_EVALUATIONS,
                                           relationship_type=hd.sr.RelationshipTypeValues.CONTAINS)
    container.ContentSequence = hd.sr.ContentSequence([
        hd.sr.CodeContentItem(name=codes.SCT.Priority, value=PRIORITY_CODES[priority],
                              relationship_type=hd.sr.RelationshipTypeValues.CONTAINS),
        hd.sr.TextContentItem(name=codes.DCM.Comment, value=DISCLAIMER,
                              relationship_type=hd.sr.RelationshipTypeValues.CONTAINS),
    ])
    return container


def build_sr(record: StudyRecord, bundle, revision: str = "",
             predecessor: Dataset | None = None) -> hd.sr.Comprehensive3DSR:
    """The SR of a scored DICOM ``record`` by ``bundle`` (the one that scored it: name,
    version, sha256, thresholds). Raises SRNotMade when the record cannot have one. A changed
    result gets a ``revision`` (its own UID) and names the SR it supersedes, ``predecessor``
    (Predecessor Documents Sequence); which, is the daemon's to say (cxr_batch.watch)."""
    if record.weights_sha256 and record.weights_sha256 != bundle.sha256:
        raise SRNotMade(f"scored by other weights ({record.weights_sha256[:12]}...) than this bundle's")
    source = source_image(record)
    sr_uid, series_uid = sr_uids(source, bundle.sha256, revision)
    algorithm = hd.sr.AlgorithmIdentification(name=bundle.name, version=bundle.version,
                                              parameters=[f"weights sha256 {bundle.sha256}"],
                                              manufacturer=MANUFACTURER)
    device = hd.sr.DeviceObserverIdentifyingAttributes(
        uid=derived_uid("device", bundle.sha256), name="cxr-batch", manufacturer_name=MANUFACTURER,
        model_name=_string(bundle.label, 64))
    scores = record.scores
    groups = [_finding_group(f, scores.probs[k], bool(scores.flags[k]), bundle.thresholds[f], source, algorithm,
                             sr_uid) for k, f in enumerate(FINDINGS)]
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(
            observer_device_context=hd.sr.ObserverContext(observer_type=codes.cid270.Device,
                                                          observer_identifying_attributes=device)),
        procedure_reported=codes.SCT.ImagingProcedure,
        imaging_measurements=groups,
        title=codes.cid7021.ImagingMeasurementReport,
    )
    content = report[0].ContentSequence
    # TID 1500 order: ..., procedure reported, image library, imaging measurements, evaluations
    content.insert(len(content) - 1, _image_library(source))
    content.append(_evaluations(scores.priority))
    with warnings.catch_warnings():
        # A one-component name ("DOE", "ANONYMOUS") is valid PN: keep it as the source had it.
        warnings.filterwarnings("ignore", message=".*unlikely to represent the intended person name")
        return hd.sr.Comprehensive3DSR(
            evidence=[_evidence(record, source)],
            content=report[0],
            series_instance_uid=series_uid,
            series_number=SERIES_NUMBER,
            sop_instance_uid=sr_uid,
            previous_versions=[predecessor] if predecessor is not None else None,
            instance_number=1,
            manufacturer=MANUFACTURER,
            manufacturer_model_name=_string(bundle.label, 64),
            software_versions=f"cxr-batch {__version__}",
            series_description=SERIES_DESCRIPTION,
            is_complete=True,  # every finding is reported
            is_final=False, is_verified=False,  # decision support: no one has verified it
            specific_character_set="ISO_IR 192",  # UTF-8: any name the source had survives
            coding_schemes=[CodingSchemeIdentificationItem(
                designator=PRIVATE_SCHEME, name="cxr-batch findings and priorities",
                responsible_organization="cxr-batch project")],
        )


def sr_bytes(sr: Dataset) -> bytes:
    """The SR as a DICOM file (preamble, file meta, explicit VR little endian)."""
    buf = io.BytesIO()
    sr.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def sr_file_name(key: str) -> str:
    """The PDF report's name with ``.sr.dcm``: the two files of a study pair up by name
    (``key`` names both: scan's file path, the daemon's key and content)."""
    return report_name(key).removesuffix(".pdf") + ".sr.dcm"


@dataclass
class SRWriter:
    """Writes each scored DICOM study's SR to ``folder`` (scan, watch and the DICOM node)."""

    folder: Path
    bundle: object

    def __post_init__(self):
        self.folder = private_dir(Path(self.folder))

    def write(self, record: StudyRecord, key: str | None = None, **revision) -> Path:
        """Build and write ``record``'s SR atomically (mode 0640); raises SRNotMade. ``key``
        names the file as it names the study's PDF (default: the record's file path);
        ``revision`` and ``predecessor`` go to :func:`build_sr`."""
        path = self.folder / sr_file_name(key or record.file)
        atomic_write_bytes(path, sr_bytes(build_sr(record, self.bundle, **revision)), mode=FILE_MODE)
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
        return path

    def report_records(self, records: list[StudyRecord]) -> int:
        """:meth:`report` for every scored record; returns how many SRs were written."""
        return sum(self.report(r) is not None for r in records if r.ok)

"""What reading one file yields, and the rules for what is scored: the types every reader shares.

A reader returns a :class:`StudyImage` (the grey image plus what its header said) or raises
:class:`SkipStudy` (read, deliberately not scored: a lateral view) or :class:`ReadError` (could
not be read). Both carry a reason a person understands and, when the header could be read
before the failure, the :class:`StudyHeader` so the study's row still says which study it was.
"""

from __future__ import annotations

import hashlib
import uuid
from dataclasses import dataclass, field

import numpy as np

from .acquisition import Acquisition
from .config import bounded, validate
from .display import format_date
from .patient import PatientData


# The longest value each identifier may have: its DICOM VR's maximum (PS3.5 6.2). A longer value
# (a hostile or broken header) is cut here, before it can reach a PDF, a CSV, a log or a file name.
MAX_LENGTH = {
    "patient_id": 64,  # LO
    "patient_name": 3 * 64 + 2,  # PN: up to 64 characters in each of 3 component groups
    "study_uid": 64, "series_uid": 64, "sop_uid": 64,  # UI
    # SH allows 16, but RISs issue longer ones and modalities copy them whole: cut, it would be
    # another order's number in the ORU (HL7's EI takes it whole). One over 64 is dropped, not
    # cut (NOT_CUT); DICOM objects made for the study leave one over 16 empty (cxr_batch.sr).
    "accession_number": 64,
    "study_date": 32,  # DA: 8, once read as a date (DATE_FIELDS); an unreadable value is kept whole
    "institution": 64,  # LO
    "sop_class_uid": 64,  # UI
    "patient_birth_date": 32,  # DA, as study_date
    "patient_sex": 16,  # CS
    "timezone_offset": 16,  # SH
    "acquisition_datetime": 26,  # DT
    "patient_age": 4,  # AS
    "study_time": 16,  # TM
    "study_id": 16,  # SH
    "referring_physician": 3 * 64 + 2,  # PN
    # Who issued the patient ID (PS3.3 C.7.1.1): "P1" of one site is another patient than "P1"
    # of the next. IssuerOfPatientID, and its qualifiers' universal ID (UT, but HL7's HD.2 takes
    # 199), the universal ID's type and the identifier's type (CS).
    "issuer_of_patient_id": 64,  # LO
    "issuer_universal_id": 199,
    "issuer_universal_id_type": 16,
    "patient_id_type": 16,
    # Other Patient IDs (PS3.3 C.7.1.1): the IDs other issuers know the patient by, "\\"-joined
    # (16 of LO's 64): an image whose other IDs hold the patient ID of another image of its study
    # names one patient with it (cxr_batch.integration.patients)
    "other_patient_ids": 16 * 65,
}


UID_FIELDS = ("study_uid", "series_uid", "sop_uid", "sop_class_uid")
# Identifiers a receiver matches on whose cut value could be another's (another order's accession
# number): one longer than its MAX_LENGTH is left empty, as an over-long UID is replaced (clean_uid)
NOT_CUT = ("accession_number", "issuer_of_patient_id", "issuer_universal_id", "other_patient_ids")
# Dates held as DICOM DA (YYYYMMDD) whatever spelling they came in (an ACR-NEMA header's
# 2024.03.01, a metadata table's ISO 2024-03-01): cutting those to DA's 8 characters made
# "2024.03." (read nowhere as a date) and a bad value such as 2024-13-45 into "2024-13-".
DATE_FIELDS = ("study_date", "patient_birth_date")


def dicom_date(value) -> str:
    """A date identifier as DICOM DA when a date can be read from it, else as it came (cleaned)."""
    text = clean_text(value, MAX_LENGTH["study_date"])
    iso = format_date(text)
    return iso.replace("-", "") if iso else text


def derived_uid(*parts: str) -> str:
    """A valid UID (``2.25.`` + a name-based UUID, PS3.5 B.2, at most 44 characters) that
    depends on ``parts`` only: the same inputs always give the same UID."""
    return f"2.25.{uuid.uuid5(_UID_NAMESPACE, chr(31).join(parts)).int}"


_UID_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "cxr-batch:dicom-sr")


def clean_uid(value) -> str:
    """A UID as text: control characters and spaces removed. One over the UI maximum of 64
    characters is replaced by a UID derived from all of it: cutting it would make another,
    valid-looking UID that could belong to a different image."""
    text = "" if value is None else str(value)
    if not text.isprintable() or " " in text:  # a space is the one printable character that is a space
        text = "".join(ch for ch in text if ch.isprintable() and not ch.isspace())
    return text if len(text) <= 64 else derived_uid("over-long", text)


def clean_text(value, limit: int) -> str:
    """A header value as plain text: control characters (tab, CR, LF, NUL, ESC...) removed,
    surrounding spaces stripped, at most ``limit`` characters."""
    text = "" if value is None else str(value)
    if not text.isprintable():  # most values are printable throughout: taken whole
        text = "".join(ch for ch in text if ch.isprintable())
    return text.strip()[:limit].strip()


@dataclass
class Identifiers:
    """Who and which study: from the DICOM header, a sidecar or the metadata table. Every value
    is cleaned on assignment (:func:`clean_text` to its VR's maximum length)."""

    patient_id: str = ""
    patient_name: str = ""  # DICOM PN form when from a header: FAMILY^GIVEN^MIDDLE^PREFIX^SUFFIX
    study_uid: str = ""
    series_uid: str = ""
    sop_uid: str = ""
    accession_number: str = ""
    study_date: str = ""
    institution: str = ""
    # The source header's own values, for DICOM objects made for the study (the SR): copied
    # as the header had them (names in PN form, "family^given"); never in results.csv.
    sop_class_uid: str = ""
    patient_birth_date: str = ""
    patient_sex: str = ""
    patient_age: str = ""
    study_time: str = ""
    study_id: str = ""
    referring_physician: str = ""
    issuer_of_patient_id: str = ""
    issuer_universal_id: str = ""
    issuer_universal_id_type: str = ""
    patient_id_type: str = ""
    other_patient_ids: str = ""  # as MAX_LENGTH says
    # the source's Timezone Offset From UTC (+HHMM): the SR and the Encapsulated PDF copy its
    # study date/time and write their own times at that offset, one for every time of an object
    timezone_offset: str = ""
    # when the image was acquired (AcquisitionDateTime, else AcquisitionDate + AcquisitionTime),
    # as DICOM DT (YYYYMMDDHHMMSS[.F][+ZZZZ]): the ORU's OBX-14 (cxr_batch.integration.hl7)
    acquisition_datetime: str = ""

    def __setattr__(self, name: str, value) -> None:
        if isinstance(value, str) and not value:
            # every cleaning leaves an empty value empty, and most of a record's identifiers are:
            # cleaning them was a third of reading back a results.csv row (cxr-batch monitor)
            super().__setattr__(name, value)
            return
        if name in UID_FIELDS:
            value = clean_uid(value)
        elif name in DATE_FIELDS:
            value = dicom_date(value)
        elif name in NOT_CUT:
            value = clean_text(value, MAX_LENGTH[name] + 1)
            value = value if len(value) <= MAX_LENGTH[name] else ""
        elif name in MAX_LENGTH:
            value = clean_text(value, MAX_LENGTH[name])
        super().__setattr__(name, value)

    def fill_from(self, other: "Identifiers") -> None:
        """Take each identifier this one lacks from ``other`` (a lower-priority source)."""
        for name in IDENTIFIER_FIELDS:
            if not getattr(self, name) and getattr(other, name):
                setattr(self, name, getattr(other, name))


IDENTIFIER_FIELDS = tuple(Identifiers.__dataclass_fields__)
# Identifiers written to results.csv; the name and institution stay in the reports only.
CSV_IDENTIFIERS = ("patient_id", "study_uid", "series_uid", "sop_uid", "accession_number", "study_date")


@dataclass
class StudyHeader:
    """What a file's header (or sidecar) says about the study, whatever happened to its pixels."""

    ids: Identifiers = field(default_factory=Identifiers)
    patient: PatientData = field(default_factory=PatientData)
    acquisition: Acquisition = field(default_factory=Acquisition)  # how the image was made (drift monitoring)


class StudyFailure(Exception):
    """A study that yields no scores; ``str(e)`` is the reason for its row and ``header`` what
    was read before the failure (None when nothing was)."""

    status = "error"

    def __init__(self, reason: str, header: StudyHeader | None = None):
        super().__init__(reason)
        self.header = header

    def with_header(self, header: StudyHeader) -> "StudyFailure":
        if self.header is None:
            self.header = header
        return self


class ReadError(StudyFailure):
    """The file could not be read as a study."""


class SkipStudy(StudyFailure):
    """The file was read but is deliberately not scored."""

    status = "skipped"


@dataclass
class StudyImage:
    """A decoded radiograph: uint8 grey [H, W] (MONOCHROME2, windowed) and its header data."""

    grey: np.ndarray
    kind: str  # "png", "jpeg" or "dicom"
    header: StudyHeader = field(default_factory=StudyHeader)


def pixels_sha256(grey: np.ndarray) -> str:
    """The sha256 of decoded grey pixels [H, W], with their size (cxr_batch.provenance.pixel_key)."""
    grey = np.ascontiguousarray(grey, dtype=np.uint8)
    digest = hashlib.sha256(f"{grey.shape[0]}x{grey.shape[1]}:".encode())
    digest.update(grey)  # not a copy of the image
    return digest.hexdigest()


@dataclass(frozen=True)
class ScoringRules:
    """Which files are scored (``[scoring]`` in a TOML config). Everything else gets a
    ``skipped`` row with the reason."""

    modalities: tuple[str, ...] = ("CR", "DX", "DR", "RG", "OT")  # OT: secondary capture of a radiograph
    body_parts: tuple[str, ...] = ("CHEST", "THORAX", "LUNG", "TORAX", "THORAX_CHEST")
    allow_missing_body_part: bool = True
    views: tuple[str, ...] = ("PA", "AP")
    allow_unknown_view: bool = True
    max_pixels: int = bounded(40_000_000, min=1)  # about 6300 x 6300: larger is refused before decoding
    max_file_bytes: int = bounded(1 << 30, min=1)

    def __post_init__(self):
        validate(self, "scoring")
        for name in ("modalities", "body_parts", "views"):
            object.__setattr__(self, name, tuple(v.strip().upper() for v in getattr(self, name)))


# The shortest side a radiograph can have: smaller is an icon or a 1 x 1 placeholder, which the
# model would be shown blown up to its input size and scored as if it were a chest.
MIN_IMAGE_SIDE = 32


def check_image(study: StudyImage) -> StudyImage:
    """Refuse a decoded image nothing can be read from: too small, or one grey level all over
    (a failed exposure, a blank placeholder, a window that leaves nothing): the model would
    give it probabilities like any other study's."""
    grey = study.grey
    rows, cols = grey.shape[:2]
    if min(rows, cols) < MIN_IMAGE_SIDE:
        raise ReadError(f"image is {cols} x {rows} pixels: too small to be a radiograph (at least "
                        f"{MIN_IMAGE_SIDE} a side)", study.header)
    if grey.min() == grey.max():
        raise ReadError("blank image: every pixel has the same grey level as displayed: nothing to score",
                        study.header)
    return study


def check_view(patient: PatientData, rules: ScoringRules) -> None:
    """Skip views the model is not meant for (laterals), and unknown views if configured."""
    if patient.view is None:
        if not rules.allow_unknown_view:
            raise SkipStudy("view position unknown (scoring of unknown views is turned off)")
        return
    if patient.view not in rules.views:
        raise SkipStudy(f"{patient.view.lower()} view ({patient.view_source}); only {'/'.join(rules.views)} are scored")

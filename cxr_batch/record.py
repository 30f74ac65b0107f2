"""One study's record: the single shape a study has from reading to results.csv, PDF and ledger.

A :class:`StudyRecord` is created when a file is assembled into a study (identifiers, patient
data with sources and notes, status), gets its :class:`Scores` after inference, and its report
name when its PDF is written. results.csv columns are derived from it (:data:`COLUMNS`):
``to_row()`` writes a CSV row and ``from_row()`` reads one back; ``to_json()``/``from_json()``
keep it whole (the patient name included) in the watch daemon's ledger.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field, fields
from typing import Literal

from . import acquisition as acq
from .display import format_date
from .findings import FINDINGS
from .image_stats import COLUMNS as IMAGE_COLUMNS, ImageStats
from .patient import SOURCE_UNKNOWN, PatientData
from .study import CSV_IDENTIFIERS, Identifiers

# Identifiers newer than the ledger's readers before them: written apart from "ids" ("ids_more"),
# which those releases build their Identifiers from whole and would stop at (a downgrade's
# daemon could not open the ledger); they ignore a key they do not know beside it.
IDS_APART = ("timezone_offset", "acquisition_datetime")
_ID_FIELDS = frozenset(Identifiers.__dataclass_fields__)

Status = Literal["ok", "skipped", "error"]
STATUSES: tuple[str, ...] = ("ok", "skipped", "error")

PATIENT_COLUMNS = ("age", "age_source", "sex", "sex_source", "view", "view_source")
COLUMNS: tuple[str, ...] = (
    ("file", "status", "reason")
    + CSV_IDENTIFIERS
    + PATIENT_COLUMNS
    + ("notes",)
    + tuple(f"p_{f}" for f in FINDINGS)
    + tuple(f"flag_{f}" for f in FINDINGS)
    + ("findings", "priority", "triage_score", "p_any", "worklist_rank", "report", "model", "weights_sha256")
)
# What drift monitoring compares with a reference (cxr_batch.drift): how the image was made, what
# the model's input looked like, and when the study was scored. Added as one group after the others.
DRIFT_COLUMNS: tuple[str, ...] = acq.COLUMNS + IMAGE_COLUMNS + ("scored_at",)
COLUMNS = COLUMNS + DRIFT_COLUMNS
NOTE_SEPARATOR = "; "
# how results.csv holds a probability (p_*, p_any, triage_score) and an age: drift compares every
# source (results.csv, the ledger, studies in memory) at this precision
PROBABILITY_FORMAT, AGE_FORMAT = ".6f", "g"
# Columns whose values come from outside (file names, headers, sidecars, library messages):
# neutralised for spreadsheets. The numeric columns are written by cxr-batch itself.
TEXT_COLUMNS = frozenset(("file", "reason") + CSV_IDENTIFIERS + PATIENT_COLUMNS + ("notes", "report", "model")
                         + acq.TEXT_FIELDS)
FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


def spreadsheet_safe(text: str) -> str:
    """A text cell a spreadsheet shows as text: control characters removed and a leading
    ``= + - @`` (or tab/CR) prefixed with ``'`` so that e.g. ``=HYPERLINK(...)`` is never run
    as a formula (OWASP CSV injection). :func:`from_spreadsheet` undoes the prefix."""
    # a file name's bytes that are not UTF-8 (surrogates from the file system) show as U+FFFD;
    # most texts are printable throughout, taken whole (char by char, this was half the time of
    # rewriting a year's results.csv)
    if not text.isprintable():
        text = "".join(ch if ch.isprintable() else "\ufffd" for ch in text if ch.isprintable() or _surrogate(ch))
    return "'" + text if text.startswith(FORMULA_STARTS) else text


def _surrogate(ch: str) -> bool:
    return "\ud800" <= ch <= "\udfff"


def log_name(file: str) -> str:
    """How logs name a study file: a hash of its relative path, since folder and file names
    (e.g. a storescp layout by patient name) may identify the patient. The same hash names
    the file's report (``cxr_<hash>.pdf``) in scan's reports folder."""
    return "file#" + hashlib.sha256(name_bytes(file)).hexdigest()[:20]


def name_bytes(name: str) -> bytes:
    """A path as the bytes the file system has for it. A name that is not UTF-8 (Latin-1 from an
    old export, a storescp folder named after a patient) reaches Python with its odd bytes as
    surrogates (os.fsdecode), which a plain ``encode()`` refuses: hashing its name ended the scan."""
    return name.encode("utf-8", "surrogateescape")


def name_shape(name: str) -> str:
    """A file name as a log line may show it when its form matters (a table that names files
    otherwise than the folder): each digit a 9, each letter an X or x, the rest (separators, the
    extension) kept: 'SMITH_J_0001.png' -> 'XXXXX_X_9999.png'."""
    stem, dot, extension = name.rpartition(".") if "." in name else (name, "", "")
    shape = "".join("9" if c.isdigit() else ("X" if c.isupper() else "x") if c.isalpha() else c for c in stem)
    return shape + dot + extension


def from_spreadsheet(text: str) -> str:
    return text[1:] if text.startswith("'") and text[1:].startswith(FORMULA_STARTS) else text


ISO_DATE = re.compile(r"^\d{4}-\d{2}-\d{2}$")


def _dicom_date(text: str) -> str:
    """results.csv's study date (YYYY-MM-DD) back as DICOM DA (YYYYMMDD); other text as it is."""
    return text.replace("-", "") if ISO_DATE.match(text) else text


# The note on a result that a watch/listen daemon kept because a later version of the same
# instance could not be read (cxr_batch.ledger)
UNREAD_VERSION = "a later version of this instance could not be read"
# How the reason of a study held back begins (images of two patients under one Study Instance UID,
# cxr_batch.integration.patients): not a result, provisional as an error is (cxr_batch.ledger)
HELD_BACK = "held back: "

@dataclass
class Scores:
    """The model's output for one study, in FINDINGS order, and what triage made of it."""

    probs: tuple[float, ...]
    flags: tuple[int, ...]
    priority: str
    triage_score: float  # orders the study inside its bucket (cxr_batch.triage)
    p_any: float | None = None  # P(any finding)

    @property
    def findings(self) -> tuple[str, ...]:
        """Flagged findings, in FINDINGS order."""
        return tuple(f for f, on in zip(FINDINGS, self.flags) if on)

    def prob(self, finding: str) -> float:
        return self.probs[FINDINGS.index(finding)]


@dataclass
class StudyRecord:
    file: str  # path relative to the scanned folder (POSIX separators)
    status: Status = "ok"
    reason: str = ""  # why a study was skipped or failed
    ids: Identifiers = field(default_factory=Identifiers)
    patient: PatientData = field(default_factory=PatientData)
    scores: Scores | None = None  # set for scored studies only
    report: str = ""  # file name of the PDF under reports/
    model: str = ""  # bundle name@version
    weights_sha256: str = ""
    worklist_rank: int | None = None  # 1 = read first, among the studies of one run (scan, merge)
    acquisition: acq.Acquisition = field(default_factory=acq.Acquisition)  # from the file's header
    image_stats: ImageStats | None = None  # of the model's input, for scored studies
    scored_at: str = ""  # when the model scored it: ISO 8601 UTC, to the second

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    @property
    def priority(self) -> str:
        return self.scores.priority if self.scores else ""

    @property
    def findings(self) -> tuple[str, ...]:
        return self.scores.findings if self.scores else ()

    @property
    def triage_score(self) -> float:
        return self.scores.triage_score if self.scores else 0.0

    @property
    def later_version_unread(self) -> bool:
        """A later version of this instance came and could not be read: this result stands for it."""
        return any(n.startswith(UNREAD_VERSION) for n in self.patient.notes)

    def hold_back(self, reason: str) -> None:
        """Not to be scored after all (its scores, if the model ran, dropped): skipped, ``reason``
        (beginning with :data:`HELD_BACK`) saying why."""
        self.status, self.reason = "skipped", reason
        self.scores = self.image_stats = self.worklist_rank = None
        # a row a resumed scan kept named its PDF, which the scan then removes (not scored now)
        self.scored_at = self.report = ""

    @property
    def held(self) -> bool:
        """Held back (:meth:`hold_back`): a study of two patients, for a person to resolve."""
        return self.status == "skipped" and self.reason.startswith(HELD_BACK)

    def add_note(self, note: str) -> None:
        if note not in self.patient.notes:
            self.patient.notes.append(note)

    # ---------------------------------------------------------------- results.csv
    def to_row(self) -> dict[str, str]:
        """The CSV row: probabilities to 6 decimals, absent values empty."""
        p = self.patient
        row = {"file": self.file, "status": self.status, "reason": self.reason}
        row.update({k: getattr(self.ids, k) for k in CSV_IDENTIFIERS})
        # YYYY-MM-DD: a date to a person and a spreadsheet, and text to pandas (DICOM's 20240301 is
        # read as the number 20240301.0); from_row() turns it back into DICOM DA
        row["study_date"] = format_date(self.ids.study_date) or self.ids.study_date
        row.update({
            "age": "" if p.age is None else format(p.age, AGE_FORMAT), "age_source": p.age_source,
            "sex": p.sex or "", "sex_source": p.sex_source,
            "view": p.view or "", "view_source": p.view_source,
            "notes": NOTE_SEPARATOR.join(p.notes),
        })
        s = self.scores
        for k, f in enumerate(FINDINGS):
            row[f"p_{f}"] = format(s.probs[k], PROBABILITY_FORMAT) if s else ""
        for k, f in enumerate(FINDINGS):
            row[f"flag_{f}"] = str(int(s.flags[k])) if s else ""
        row.update({
            "findings": ";".join(s.findings) if s else "", "priority": s.priority if s else "",
            "triage_score": format(s.triage_score, PROBABILITY_FORMAT) if s else "",
            "p_any": format(s.p_any, PROBABILITY_FORMAT) if s and s.p_any is not None else "",
            "worklist_rank": "" if self.worklist_rank is None else str(self.worklist_rank), "report": self.report,
            "model": self.model, "weights_sha256": self.weights_sha256,
        })
        row.update(self.acquisition.to_row())
        row.update(self.image_stats.to_row() if self.image_stats else dict.fromkeys(IMAGE_COLUMNS, ""))
        row["scored_at"] = self.scored_at
        return {k: spreadsheet_safe(v) if k in TEXT_COLUMNS else v for k, v in row.items()}

    @classmethod
    def from_row(cls, row: dict[str, str]) -> "StudyRecord":
        """A record from a results.csv row (values as strings; the patient name is not in it)."""
        row = {k: from_spreadsheet(v or "") if k in TEXT_COLUMNS else v for k, v in row.items()}

        def get(key):
            return (row.get(key) or "").strip()

        patient = PatientData(
            age=float(get("age")) if get("age") else None, age_source=get("age_source") or SOURCE_UNKNOWN,
            sex=get("sex") or None, sex_source=get("sex_source") or SOURCE_UNKNOWN,
            view=get("view") or None, view_source=get("view_source") or SOURCE_UNKNOWN,
            notes=[n for n in (row.get("notes") or "").split(NOTE_SEPARATOR) if n],
        )
        scores = None
        if get(f"p_{FINDINGS[0]}"):
            scores = Scores(
                probs=tuple(float(get(f"p_{f}")) for f in FINDINGS),
                flags=tuple(int(get(f"flag_{f}")) for f in FINDINGS),
                priority=get("priority"), triage_score=float(get("triage_score") or 0.0),
                p_any=float(get("p_any")) if get("p_any") else None,
            )
        return cls(file=row["file"], status=get("status") or "error", reason=row.get("reason") or "",
                   ids=Identifiers(**{k: row.get(k) or "" for k in CSV_IDENTIFIERS}
                                   | {"study_date": _dicom_date(row.get("study_date") or "")}), patient=patient,
                   scores=scores, report=get("report"), model=get("model"), weights_sha256=get("weights_sha256"),
                   worklist_rank=int(get("worklist_rank")) if get("worklist_rank") else None,
                   acquisition=acq.Acquisition.from_row(row), image_stats=ImageStats.from_row(row),
                   scored_at=get("scored_at"))

    # ---------------------------------------------------------------- ledger
    def to_json(self) -> dict:
        """Everything, the patient name included, as JSON-ready values."""
        nested = ("ids", "patient", "scores", "acquisition", "image_stats")
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in nested}
        out["ids"] = {f.name: getattr(self.ids, f.name) for f in fields(self.ids) if f.name not in IDS_APART}
        out["ids_more"] = {name: getattr(self.ids, name) for name in IDS_APART}
        p = self.patient
        out["patient"] = {"age": p.age, "age_source": p.age_source, "sex": p.sex, "sex_source": p.sex_source,
                          "view": p.view, "view_source": p.view_source, "notes": list(p.notes)}
        s = self.scores
        out["scores"] = None if s is None else {"probs": list(s.probs), "flags": list(s.flags),
                                                 "priority": s.priority, "triage_score": s.triage_score,
                                                 "p_any": s.p_any}
        out["acquisition"] = self.acquisition.to_json()
        out["image_stats"] = self.image_stats.to_json() if self.image_stats else None
        return out

    @classmethod
    def from_json(cls, data: dict) -> "StudyRecord":
        s = data.get("scores")
        return cls(
            file=data["file"], status=data["status"], reason=data.get("reason", ""),
            ids=_identifiers({**data.get("ids", {}), **data.get("ids_more", {})}), patient=PatientData(**data.get("patient", {})),
            scores=None if s is None else Scores(tuple(s["probs"]), tuple(s["flags"]), s["priority"],
                                                 s["triage_score"], s.get("p_any")),
            report=data.get("report", ""), model=data.get("model", ""),
            weights_sha256=data.get("weights_sha256", ""), worklist_rank=data.get("worklist_rank"),
            acquisition=acq.Acquisition.from_json(data.get("acquisition")),
            image_stats=ImageStats.from_json(data.get("image_stats")), scored_at=data.get("scored_at", ""),
        )


def _identifiers(values: dict) -> Identifiers:
    """The ledger's identifiers; one this release does not know (a later release wrote it) is
    left out rather than stopping the daemon that reads it."""
    return Identifiers(**{k: v for k, v in values.items() if k in _ID_FIELDS})

"""Patient data and identifiers for PNG/JPEG studies: JSON sidecars and NIH-style CSV tables.

A sidecar is ``<image stem>.json`` next to the image, e.g.
``{"PatientID": "17", "PatientAge": "057Y", "PatientSex": "F", "ViewPosition": "PA"}``
(DICOM keywords; ``age``/``sex``/``view``/``patient_id`` are accepted too). A metadata CSV has
the NIH Data_Entry_2017 columns Image Index, Patient ID, Patient Age, Patient Gender and View
Position, matched to images by file name.
"""

from __future__ import annotations

import difflib
import gzip
import json
import logging
import re
import os
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from .patient import PatientData, patient_from_values
from .readers import open_regular
from .record import name_shape
from .study import Identifiers, ReadError, StudyHeader, clean_text

log = logging.getLogger("cxr_batch")

NIH_COLUMNS = {"Image Index": "file", "Patient ID": "patient_id", "Patient Age": "age",
               "Patient Gender": "sex", "View Position": "view"}
# what a row says about its image besides its name: the columns a table may lack (unknown)
NIH_PATIENT_COLUMNS = [c for c in NIH_COLUMNS if c != "Image Index"]
_SIDECAR_KEYS = {
    "age": ("PatientAge", "age", "Patient Age"),
    "sex": ("PatientSex", "sex", "Patient Gender", "gender"),
    "view": ("ViewPosition", "view", "View Position"),
    "patient_id": ("PatientID", "patient_id", "Patient ID"),
    "patient_name": ("PatientName", "patient_name"),
    "study_date": ("StudyDate", "study_date"),
    "accession_number": ("AccessionNumber", "accession_number"),
    "study_uid": ("StudyInstanceUID", "study_uid"),
}


# Names a spreadsheet gives the NIH columns, beside a near spelling of the NIH name itself
_COLUMN_ALIASES = {"Image Index": ("filename", "file", "image", "imagename", "imagefile", "image index"),
                   "Finding Labels": ("findings", "labels", "label", "finding"),
                   "Patient ID": ("patientid", "pid", "mrn"),
                   "Patient Age": ("age",), "Patient Gender": ("sex", "gender", "patientsex"),
                   "View Position": ("view", "viewposition", "projection", "position")}


def _squeeze(name: str) -> str:
    return re.sub(r"[^a-z0-9]", "", name.lower())


def rename_hint(missing, columns) -> str:
    """What to rename when a table lacks NIH columns it has under another name ('Age', 'sex',
    'image index'): "; rename 'Age' to 'Patient Age'", or "" when no column looks like one."""
    free = [c for c in columns if c not in NIH_COLUMNS and c != "Finding Labels"]
    pairs = []
    for wanted in missing:
        names = {_squeeze(wanted), *_COLUMN_ALIASES.get(wanted, ())}
        found = [c for c in free if _squeeze(c) in names]
        found = found or difflib.get_close_matches(wanted.lower(), [c.lower() for c in free], n=1, cutoff=0.9)
        if found:
            column = next(c for c in free if c.lower() == found[0].lower())
            free.remove(column)
            pairs.append(f"'{column}' to '{wanted}'")
    return f"; rename {', '.join(pairs)}" if pairs else ""


class MetadataError(Exception):
    """A metadata table that cannot be used (missing file or columns)."""


@dataclass(frozen=True)
class MetadataRow:
    patient_id: str
    age: object
    sex: object
    view: object


# What a file that is not a CSV table usually is, by its first bytes.
_NOT_CSV = ((b"\x89PNG", "a PNG image"), (b"\xff\xd8\xff", "a JPEG image"), (b"PK\x03\x04", "a ZIP archive or an Excel workbook"),
            (b"%PDF", "a PDF document"), (b"\xd0\xcf\x11\xe0", "an old Excel or Office file"),
            (b"\xff\xfe", "UTF-16 text"), (b"\xfe\xff", "UTF-16 text"))
# what to do with a spreadsheet's "Unicode text" (UTF-16) or "CSV" (Latin-1/ANSI) export
SAVE_AS_UTF8 = "save it as 'CSV UTF-8 (comma delimited)'"
GZIP_MAGIC = b"\x1f\x8b"


def not_csv(head: bytes) -> str | None:
    """What the first bytes of a file say it is, when that is not CSV text; None for text."""
    for magic, what in _NOT_CSV:
        if head.startswith(magic):
            return what
    if head[128:132] == b"DICM":
        return "a DICOM file"
    if any(head) and (not any(head[1::2]) or not any(head[0::2])):  # UTF-16 without its byte-order mark
        return "UTF-16 text"
    if b"\x00" in head:
        return "binary data"
    return None


def first_non_utf8(raw: bytes, compressed: bool = False) -> str:
    """Where the first byte that is not UTF-8 is, as a text editor counts ("byte e9 on line 4,
    offset 358"): pandas's own error gives its offset in a read buffer, not in the file."""
    if compressed:
        raw = gzip.decompress(raw)
    try:
        raw.decode("utf-8")
        return "a byte that is not UTF-8"
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        return f"byte {raw[e.start:e.start + 1].hex()} on line {line}, offset {e.start}"


def load_metadata_csv(path: Path, only: set[str] | None = None, option: str = "--metadata") -> dict[str, MetadataRow]:
    """Read an NIH-style table (CSV, or gzip-compressed CSV) into {image file name: row}.
    ``only`` keeps just those names (a scan needs the rows of its own files, not all 112,120
    of the NIH table). MetadataError names the file and what is wrong with it. ``option``: the
    option that gave the table (evaluate and calibrate read their ``--labels`` as patient data),
    as its messages name it."""
    return _rows(_read_table(path, option), only)


def _read_table(path: Path, option: str = "--metadata"):
    import pandas as pd  # only when a table is given: it costs the start-up of every command otherwise

    path = Path(path)
    kind = f"{option.removeprefix('--')} file"  # "metadata file", "labels file": the option the user typed
    expected = "expected a comma-separated text table with the NIH Data_Entry columns"
    try:
        with open(path, "rb") as f:
            head = f.read(4096)
        compressed = head.startswith(GZIP_MAGIC)
        what = None if compressed else not_csv(head)
        if what:
            raise MetadataError(f"{kind} {path} is not a CSV file: it is {what}; {expected}"
                                + (f"; {SAVE_AS_UTF8}" if "text" in what else ""))
        hint = None if compressed else excel_separator_line(head)
        if hint:
            raise MetadataError(f"{kind} {path}: its first line {hint!r} {SEPARATOR_LINE}")
        table = pd.read_csv(path, dtype=str, keep_default_na=False, compression="gzip" if compressed else "infer")
    except FileNotFoundError:
        raise MetadataError(f"{kind} {path} does not exist") from None
    except UnicodeDecodeError:
        where = first_non_utf8(path.read_bytes(), compressed)
        raise MetadataError(f"{kind} {path} is not a CSV file: it is not UTF-8 text ({where}); {expected}; "
                            f"{SAVE_AS_UTF8}") from None
    except (pd.errors.ParserError, pd.errors.EmptyDataError, OSError, EOFError) as e:
        raise MetadataError(f"{kind} {path} is not a readable CSV: {e}") from None
    table.columns = [c.strip() for c in table.columns]
    twice = named_twice(table.columns, NIH_COLUMNS)
    if twice:
        raise MetadataError(f"{kind} {path} names the column {twice} twice: keep the one that is meant")
    # the columns a table has are used; a column it lacks is unknown for every row (said once)
    missing = [c for c in NIH_COLUMNS if c not in table.columns]
    delimiter = other_delimiter(table.columns, {"Image Index"}) if "Image Index" in missing else None
    if delimiter:  # a spreadsheet's locale chose the separator: the columns are there, in one
        raise MetadataError(f"{kind} {path} is separated by {delimiter}, not by commas: save it as a "
                            f"comma-separated CSV")
    if "Image Index" in missing or len(missing) == len(NIH_PATIENT_COLUMNS):
        raise MetadataError(f"{kind} {path} lacks column(s) {', '.join(map(repr, missing))}; expected the NIH "
                            f"Data_Entry columns (Image Index and at least one of {', '.join(NIH_PATIENT_COLUMNS)})"
                            + rename_hint(missing, table.columns))
    if missing:
        log.warning("%s %s has no column(s) %s: unknown for its rows unless a header or sidecar gives "
                    "them%s", kind, path, ", ".join(f"'{c}'" for c in missing), rename_hint(missing, table.columns))
    for column in missing:
        table[column] = ""
    table = table[list(NIH_COLUMNS)].rename(columns=NIH_COLUMNS)
    table["file"] = table["file"].str.strip()
    return table


def other_delimiter(columns, required: set[str]) -> str | None:
    """';' or 'tab' when a header read as one column holds the ``required`` columns joined by
    it (a spreadsheet saved in a locale whose list separator is not a comma), else None."""
    header = "".join(columns)
    for sep, name in ((";", "';'"), ("\t", "tab")):
        if required <= {c.strip() for c in header.split(sep)}:
            return name
    return None


def excel_separator_line(head: bytes) -> str | None:
    """The first line of a table when it is Excel's separator hint ('sep=;', which Excel writes
    and reads above the header), else None: read as the header, it hid the columns below it."""
    first = head.removeprefix(b"\xef\xbb\xbf").split(b"\n", 1)[0].strip()
    return first.decode("latin-1") if re.fullmatch(rb"sep=.?", first, re.IGNORECASE) else None


SEPARATOR_LINE = "is Excel's separator hint, not the header: delete that line"


def named_twice(columns, wanted) -> str | None:
    """The first of the ``wanted`` columns that a header (names stripped) holds more than once,
    said with where ("'Finding Labels' (columns 2 and 7)"), else None. pandas reads a second 'X'
    as 'X.1' and a second ' X' as another 'X': either way only one of them would be read, and
    which one the person meant is not known (a revised column added at the end under the same name)."""
    for name in wanted:
        at = [i + 1 for i, c in enumerate(columns) if c == name or re.fullmatch(re.escape(name) + r"\.\d+", c)]
        if len(at) > 1:
            return f"{name!r} (columns {', '.join(map(str, at[:-1]))} and {at[-1]})"
    return None


def _rows(table, only: set[str] | None) -> dict[str, MetadataRow]:
    if only is not None:
        table = table[table["file"].isin(only)]
    rows = {}
    for rec in table.itertuples(index=False):
        rows[rec.file] = MetadataRow(rec.patient_id.strip(), rec.age.strip() or None, rec.sex.strip() or None,
                                     rec.view.strip() or None)
    return rows


@dataclass(frozen=True)
class MetadataMatch:
    """How many of a scan's files the metadata table has a row for (matched by file name)."""

    table: str  # the table's path
    files: int  # files the scan reads that need a row (DICOM files have a header)
    matched: int  # of those, files with a row
    table_rows: int
    unmatched_example: str = ""  # a file name without a row
    table_example: str = ""  # a name the table has
    without_extension: bool = False  # the table names the unmatched example without its extension
    option: str = "--metadata"  # the option that gave the table, as the warning names it (evaluate's --labels)

    def problem(self) -> str | None:
        """A warning line when some files get nothing from the table, with how to fix it."""
        if self.files == 0 or self.matched == self.files:
            return None
        missing = self.files - self.matched
        # a name can identify the patient: the log shows its shape, run.json the name itself
        example, named = (clean_text(name_shape(name), 80) for name in (self.unmatched_example, self.table_example))
        # names of one shape (NIH's, a PACS's) differ in nothing the shape shows: say what that means
        contrast = ("while the table has no rows" if not self.table_rows else
                    f"though the table's files are named the same way ({named!r}): is it the table of other images?"
                    if example == named else f"while the table names files like {named!r}")
        fix = ("its 'Image Index' holds paths ({named!r}), and rows are matched by file name: write each image's "
               "file name alone" if "/" in self.table_example or "\\" in self.table_example else
               # labels match such a name (evaluate, calibrate), patient data do not: said, not silent
               "its 'Image Index' names files without their extension ({named!r} for {example!r}), and rows are "
               "matched by the whole file name: write each file's name with its extension"
               if self.without_extension else
               "give the table of these images, or name the images as the table does")
        return (f"{self.option} {self.table} has a row for {self.matched} of {self.files} files (matched by file name, "
                f"'Image Index'): {missing} get no patient data from it and are scored with what their header or "
                f"sidecar says, else unknown, which can change their triage; e.g. file {example!r} has no row, "
                f"{contrast}{'' if contrast.endswith('?') else '.'} Fix: {fix.format(named=named, example=example)} (DICOM files need no row: their header has the "
                f"patient data)")

    def to_dict(self) -> dict:
        return {"table": self.table, "files": self.files, "matched": self.matched, "table_rows": self.table_rows,
                "unmatched_example": self.unmatched_example, "table_example": self.table_example}


def load_metadata_for(path: Path, names: list[str], counted: list[str] | None = None, option: str = "--metadata"
                      ) -> tuple[dict[str, MetadataRow], MetadataMatch]:
    """The table's rows for the files named ``names`` (base names, one per file) and how well
    the table matches the files of ``counted`` (default: all of them; a scan counts only the
    files whose content has no header of its own). MetadataError and ``option`` as
    :func:`load_metadata_csv`."""
    table = _read_table(path, option)
    rows = _rows(table, set(names))
    counted = names if counted is None else counted
    unmatched = next((n for n in counted if n not in rows), "")
    example = next((n for n in table["file"] if n), "")
    stem = PurePosixPath(unmatched).stem
    without_extension = bool(unmatched) and stem != unmatched and stem in set(table["file"])
    return rows, MetadataMatch(str(path), len(counted), sum(n in rows for n in counted), len(table), unmatched,
                               stem if without_extension else example, without_extension, option)


def patient_from_metadata(row: MetadataRow) -> PatientData:
    return patient_from_values(row.age, row.sex, row.view, "metadata")


SIDECAR_MAX_BYTES = 64 * 1024  # a sidecar holds a few identifiers and values: a few hundred bytes


def read_sidecar(image_path: Path) -> StudyHeader | None:
    """Patient data and identifiers from ``<stem>.json`` beside the image, or None if absent.
    A sidecar that is not valid JSON, not a regular file, larger than ``SIDECAR_MAX_BYTES`` or a
    symbolic link leading out of the image's folder yields a note, not a failure, and is not
    read (a link or a sender must not bring another folder's patient data into a study)."""
    path = Path(image_path).with_suffix(".json")
    if not os.path.lexists(path):
        return None
    try:
        raw = json.loads(_sidecar_bytes(path, Path(image_path)).decode("utf-8"))
        if not isinstance(raw, dict):
            raise ValueError("not a JSON object")
    except (OSError, ValueError) as e:
        data = PatientData()
        data.notes.append(f"sidecar {path.name} not used ({e}): ignored")
        return StudyHeader(Identifiers(), data)

    def pick(name):
        return next((raw[k] for k in _SIDECAR_KEYS[name] if raw.get(k) not in (None, "")), None)

    data = patient_from_values(pick("age"), pick("sex"), pick("view"), "sidecar")
    misspelt = _misspelt_sidecar_keys(raw)
    if misspelt:
        data.notes.append(f"sidecar {path.name}: keys not read: " + ", ".join(
            f"{key!r} (did you mean {meant!r}?)" for key, meant in misspelt.items()))
    ids = {k: str(pick(k)) for k in ("patient_id", "patient_name", "study_date", "accession_number", "study_uid")
           if pick(k) is not None}
    return StudyHeader(Identifiers(**ids), data)


def _squeezed(key: str) -> str:
    return "".join(c for c in key.lower() if c.isalnum())


def _misspelt_sidecar_keys(raw: dict) -> dict[str, str]:
    """{key: the DICOM keyword meant} for the sidecar's keys that no name of _SIDECAR_KEYS reads
    but one nearly is ("Age", "Sex", "View", "Patient_Age"): such a sidecar was read as no
    patient data without a word. Keys of nothing read here ("Modality") are left alone."""
    known = {name for names in _SIDECAR_KEYS.values() for name in names}
    meant = {_squeezed(name): names[0] for names in _SIDECAR_KEYS.values() for name in names}
    out = {}
    for key in raw:
        if not isinstance(key, str) or key in known:
            continue
        close = difflib.get_close_matches(_squeezed(key), list(meant), n=1, cutoff=0.8)
        if close:
            out[key] = meant[close[0]]
    return out


def _sidecar_bytes(path: Path, image_path: Path) -> bytes:
    """The sidecar's bytes, opened once (no FIFO, device or oversized file is read)."""
    if path.is_symlink() and path.resolve().parent != image_path.resolve().parent:
        raise ValueError("a symbolic link out of the image's folder")
    try:
        with open_regular(path) as f:
            size = os.fstat(f.fileno()).st_size
            if size > SIDECAR_MAX_BYTES:
                raise ValueError(f"{size:,} bytes, over the limit of {SIDECAR_MAX_BYTES:,}")
            return f.read(SIDECAR_MAX_BYTES)
    except ReadError as e:
        raise ValueError(str(e)) from None

"""Reference labels in the NIH Data_Entry format, for evaluating and calibrating on a site's studies.

Columns: ``Image Index`` (the image's file name), ``Finding Labels`` (findings joined by ``|``,
or ``No Finding``); optionally the patient columns ``Patient ID``, ``Patient Age``,
``Patient Gender``, ``View Position``, which then also serve as patient data (as ``--metadata``
does for a scan). A table a person typed by hand gets strict checks: an unknown finding name,
an empty label, ``No Finding`` together with a finding, or one file labelled twice in two
different ways stops the command with the rows named, never a silently wrong label.
"""

from __future__ import annotations

import hashlib
import io
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import numpy as np
import pandas as pd

from . import exit_codes
from .findings import FINDINGS, NO_FINDING, resolve_finding
from .metadata import (NIH_PATIENT_COLUMNS, SAVE_AS_UTF8, SEPARATOR_LINE, excel_separator_line, first_non_utf8,
                       named_twice, not_csv, other_delimiter, rename_hint)
from .patient import parse_sex
from .readers import image_stem
from .record import log_name
from .study import clean_text

FILE_COLUMN, LABEL_COLUMN, PATIENT_COLUMN = "Image Index", "Finding Labels", "Patient ID"
# what spreadsheets and data-frame exports write in an empty cell: as a Patient ID, one such text
# would make every study without a known patient one patient
MISSING_VALUE_MARKS = {"nan", "na", "n/a", "#n/a", "none", "null"}


class LabelsError(Exception):
    """A labels table that cannot be used; the message names the file and rows."""

    exit_code = exit_codes.FATAL


class NoStudyFiles(LabelsError):
    """The studies folder of evaluate or calibrate held no file at all (exit 4, as scan's)."""

    exit_code = exit_codes.NO_FILES


def multi_hot(labels) -> np.ndarray:
    """'A|B' label strings -> [N, 14] uint8 in FINDINGS order; 'No Finding' is all zeros.
    Raises ValueError for an unknown finding name."""
    index = {f: i for i, f in enumerate(FINDINGS)}
    y = np.zeros((len(labels), len(FINDINGS)), dtype=np.uint8)
    for row, text in enumerate(labels):
        for name in str(text).split("|"):
            name = name.strip()
            if name and name != NO_FINDING:
                if name not in index:
                    raise ValueError(f"unknown finding {name!r} in labels {text!r}")
                y[row, index[name]] = 1
    return y


@dataclass
class LabelTable:
    path: Path
    sha256: str  # of the file as read: recorded in what is derived from it
    files: list[str]  # Image Index, one row per file
    y: np.ndarray  # [N, 14] uint8
    patient_ids: list[str]  # '' where the table has no Patient ID
    has_patient_data: bool  # any NIH patient column present: usable as --metadata

    def index(self) -> dict[str, int]:
        return {name: i for i, name in enumerate(self.files)}


def shown(name: str, limit: int = 80) -> str:
    """A file name from a labels table as a terminal may print it: control characters (escape
    sequences, newlines that forge output lines) removed, at most ``limit`` characters."""
    text = clean_text(name, limit + 1)
    return text if len(text) <= limit else text[:limit] + "..."


def _problem_rows(mask: pd.Series, names: pd.Series, limit: int = 5) -> str:
    # +2: the header, and rows counted from 1, as a spreadsheet shows them
    rows = [f"row {names.index[i] + 2} ({shown(names.iloc[i])})" for i in np.flatnonzero(mask.to_numpy())[:limit]]
    more = int(mask.sum()) - len(rows)
    return ", ".join(rows) + (f" and {more} more" if more > 0 else "")


def read_labels(path: Path | str) -> LabelTable:
    """Read and check a labels table. Raises LabelsError."""
    path = Path(path)
    try:
        raw = path.read_bytes()  # read once: the hash recorded is of exactly what was parsed
        what = None if path.suffix == ".gz" else not_csv(raw[:4096])
        if what:  # an image, a workbook: said as --metadata says it
            raise LabelsError(f"labels file {path} is not a CSV file: it is {what}; expected a comma-separated "
                              f"text table with the NIH Data_Entry columns '{FILE_COLUMN}' and '{LABEL_COLUMN}'"
                              + (f"; {SAVE_AS_UTF8}" if "text" in what else ""))
        hint = None if path.suffix == ".gz" else excel_separator_line(raw[:4096])
        if hint:
            raise LabelsError(f"labels file {path}: its first line {hint!r} {SEPARATOR_LINE}")
        # index_col=False: a data row with a trailing comma must not turn the first column
        # into the index (every column would shift by one); what lies beyond the header's
        # columns has no name and is not read (pandas warns about it; nothing is lost here)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", pd.errors.ParserWarning)
            # blank lines are kept, so that row numbers stay those a spreadsheet shows, and dropped below
            table = pd.read_csv(io.BytesIO(raw), dtype=str, keep_default_na=False, index_col=False,
                                skip_blank_lines=False, compression="gzip" if path.suffix == ".gz" else None)
    except FileNotFoundError:
        raise LabelsError(f"labels file {path} does not exist") from None
    except pd.errors.EmptyDataError:
        raise LabelsError(f"labels file {path} is empty; expected a comma-separated text table with the NIH "
                          f"Data_Entry columns '{FILE_COLUMN}' and '{LABEL_COLUMN}'") from None
    except UnicodeDecodeError:  # a spreadsheet's "CSV" export in the computer's own code page
        where = first_non_utf8(raw, path.suffix == ".gz")
        raise LabelsError(f"labels file {path} is not UTF-8 text ({where}): {SAVE_AS_UTF8}") from None
    except (OSError, pd.errors.ParserError, pd.errors.EmptyDataError) as e:
        raise LabelsError(f"labels file {path} is not a readable CSV: {e}") from None
    table.columns = [c.strip() for c in table.columns]
    twice = named_twice(table.columns, [FILE_COLUMN, LABEL_COLUMN, *NIH_PATIENT_COLUMNS])
    if twice:
        raise LabelsError(f"labels file {path} names the column {twice} twice: keep the one that is meant")
    missing = [c for c in (FILE_COLUMN, LABEL_COLUMN) if c not in table.columns]
    delimiter = other_delimiter(table.columns, {FILE_COLUMN, LABEL_COLUMN}) if missing else None
    if delimiter:  # a spreadsheet's locale chose the separator: every column is there, in one
        raise LabelsError(f"labels file {path} is separated by {delimiter}, not by commas: save it as a "
                          f"comma-separated CSV (the same table serves as patient data, which is read as CSV)")
    if missing and {"findings", "weights_sha256", *(f"p_{f}" for f in FINDINGS)} <= set(table.columns):
        # never the rename hint ('findings' to 'Finding Labels'): the model measured against itself
        raise LabelsError(f"labels file {path} is a cxr-batch results table (the model's own output), not labels: "
                          f"evaluate and calibrate measure the model against a reader's findings, in the NIH "
                          f"Data_Entry columns '{FILE_COLUMN}' and '{LABEL_COLUMN}'")
    if missing:
        raise LabelsError(f"labels file {path} lacks column(s) {', '.join(map(repr, missing))}; expected the NIH "
                          f"Data_Entry columns '{FILE_COLUMN}' and '{LABEL_COLUMN}'"
                          + rename_hint(missing, table.columns) + _one_column_per_finding(table.columns))
    # a blank line, or a spreadsheet's empty row exported as ',,,,': no label, and no mistake
    table = table[~table.apply(lambda column: column.str.strip() == "").all(axis=1)]
    rows_in_file = table.index  # every line after the header counted, blank ones too
    table = table.reset_index(drop=True)
    names = table[FILE_COLUMN].str.strip()
    where = pd.Series(names.to_numpy(), index=rows_in_file)  # for messages: names by their row in the file
    labels = table[LABEL_COLUMN].str.strip()
    if table.empty:
        raise LabelsError(f"labels file {path} has no rows")
    checks = (
        (names == "", f"an empty '{FILE_COLUMN}'"),
        # files match their rows by name (the patient columns too, as --metadata): a path matched
        # nothing as patient data, and the study was scored without age, sex and view
        (names.str.contains(r"[/\\]"), f"a path, not a file name, in '{FILE_COLUMN}' (write the file's name "
                                         f"alone, as the NIH table does)"),
        # (a second export's header may start with its byte-order mark: `cat a.csv b.csv`)
        ((names.str.lstrip("\ufeff") == FILE_COLUMN) & (labels == LABEL_COLUMN),
         "the header again (tables pasted one under another?)"),
        (labels == "", f"an empty '{LABEL_COLUMN}' (write '{NO_FINDING}' for a normal study)"),
        (labels.str.contains(NO_FINDING, regex=False) & (labels != NO_FINDING), f"'{NO_FINDING}' together with a finding"),
    )
    for mask, what in checks:
        if mask.any():
            raise LabelsError(f"labels file {path}: {what} in {_problem_rows(mask, where)}")
    parts = labels.str.split("|").explode().str.strip()
    unknown = sorted(set(parts) - set(FINDINGS) - {NO_FINDING})
    if unknown:
        bad = labels.apply(lambda s: any(n.strip() in unknown for n in s.split("|")))
        raise LabelsError(f"labels file {path}: unknown finding name(s) {', '.join(map(_closest, unknown))} in "
                          f"{_problem_rows(bad, where)}; known: {', '.join(FINDINGS)}, {NO_FINDING}")
    y = multi_hot(labels)
    patients = table[PATIENT_COLUMN].str.strip() if PATIENT_COLUMN in table.columns else pd.Series([""] * len(table))
    # a file's rows must agree on its findings and on its patient data (age, sex, view are the
    # scan's patient data: with two values the scan would use whichever row came last)
    frame = pd.DataFrame({"file": names, "key": ["".join(map(str, r)) for r in y], "patient": patients,
                          **{c: table[c].str.strip() for c in NIH_PATIENT_COLUMNS if c in table.columns}})
    conflicting = frame.groupby("file").nunique().max(axis=1) > 1
    if conflicting.any():
        dup = names.isin(conflicting[conflicting].index)
        raise LabelsError(f"labels file {path}: the same file with different labels or patient data "
                          f"({', '.join(c for c in NIH_PATIENT_COLUMNS if c in table.columns) or 'none'}) in "
                          f"{_problem_rows(dup, where)}")
    _check_patients(path, patients, table, where)  # after: one file's rows that disagree are said as such
    first = ~names.duplicated().to_numpy()  # a row repeated word for word counts once
    return LabelTable(
        path=path, sha256=hashlib.sha256(raw).hexdigest(), files=list(names[first]), y=y[first],
        patient_ids=list(patients[first]),
        has_patient_data=any(c in table.columns for c in NIH_PATIENT_COLUMNS),
    )


def _one_column_per_finding(columns) -> str:
    """What to write instead when a table has a column per finding (a CheXpert-style export), or
    "". Their values are not read: whether 2 or -1 (uncertain) is a positive is the site's call."""
    def is_finding(column: str) -> bool:
        try:
            return column.lower() == NO_FINDING.lower() or bool(resolve_finding(column))
        except ValueError:
            return False

    named = [c for c in columns if is_finding(c)]
    if len(named) < 2:
        return ""
    return (f"; its columns {', '.join(map(repr, named))} hold one finding each: write each row's findings in one "
            f"'{LABEL_COLUMN}' column, joined by '|' (Atelectasis|Effusion), or '{NO_FINDING}'")


def _check_patients(path: Path, patients: pd.Series, table: pd.DataFrame, where: pd.Series) -> None:
    """Studies are grouped by Patient ID (the intervals resample patients, calibrate folds by
    them): an ID that is no patient's, or one ID for two people, would group them wrongly."""
    marked = patients.str.lower().isin(MISSING_VALUE_MARKS)
    if marked.any():
        values = ", ".join(map(repr, dict.fromkeys(patients[marked])))
        raise LabelsError(f"labels file {path}: '{PATIENT_COLUMN}' {values} in {_problem_rows(marked, where)} marks a "
                          f"missing value, and as an ID it would make all those studies one patient: leave the cell "
                          f"empty where the patient is not known (each such study then counts as its own patient)")
    # 123456789012 shown by Excel as 1.23457E+11 is saved so: patients a few apart become one
    rounded = patients.str.fullmatch(r"\d(\.\d+)?E\+\d+", case=False)
    if rounded.any():
        values = ", ".join(map(repr, dict.fromkeys(patients[rounded])))
        raise LabelsError(f"labels file {path}: '{PATIENT_COLUMN}' {values} in {_problem_rows(rounded, where)} is a "
                          f"number in Excel's scientific notation, rounded: different patients' IDs become the same; "
                          f"export the table again from its source, with that column formatted as Text")
    if "Patient Gender" not in table.columns:
        return
    # one person's studies have one sex; a blank or unrecognised sex says nothing either way
    sexes = table["Patient Gender"].map(lambda value: parse_sex(value)[0])
    known = (patients != "") & sexes.notna()
    mixed = pd.DataFrame({"patient": patients[known], "sex": sexes[known]}).groupby("patient", sort=False)["sex"].nunique()
    mixed = mixed[mixed > 1]
    if len(mixed):
        patient = mixed.index[0]
        rows = known & (patients == patient)
        raise LabelsError(f"labels file {path}: {PATIENT_COLUMN} {shown(patient)!r} is given to studies of different "
                          f"sex ({', '.join(dict.fromkeys(sexes[rows]))}) in {_problem_rows(rows, where)}: two people "
                          f"share that ID (patients numbered apart, then merged) or a sex is wrong; give each person "
                          f"an ID of their own" + (f" ({len(mixed) - 1} more such IDs)" if len(mixed) > 1 else ""))


def _closest(name: str) -> str:
    """'Pneumothorx' (did you mean Pneumothorax?): resolve_finding's hint for a name in a table."""
    if name.strip().lower() == NO_FINDING.lower():  # 'no finding', 'NO FINDING': not a finding, so resolve_finding
        return f"{name!r} (write it as {NO_FINDING})"  # knows no spelling of it
    parts = [p.strip() for p in re.split(r"[;,]", name) if p.strip()]
    if len(parts) > 1 and all(p in FINDINGS for p in parts):  # 'Effusion;Mass': another list separator
        return f"{name!r} (findings are joined by '|': {'|'.join(parts)})"
    try:
        resolve_finding(name)
    except ValueError as e:
        hint = str(e).split("; known:")[0].removeprefix("unknown finding ")  # the name itself may hold a ';'
        return hint if name.strip() else repr(name)  # '' (a stray '|') has no closest name
    return f"{name!r} (write it as {resolve_finding(name)})"  # 'cardiomegaly': right name, wrong spelling


@dataclass
class Matching:
    """Which scored files have labels. A file matches the label row whose Image Index is its
    file name (as --metadata matches) or, failing that, its name without the extension; a label
    that several files match is ambiguous and left out rather than guessed."""

    pairs: list[tuple[int, int]]  # (row index, label index) of studies scored and labelled
    groups: list[str]  # patient of each pair: the labels' Patient ID, else the scan's, else the file
    scored_without_label: list[str]
    labelled_not_scored: list[dict]  # {file, status, reason}: skipped or failed
    labels_without_file: list[str]
    ambiguous: list[str]  # label names that several files match
    without_patient_id: list[str] = field(default_factory=list)  # scored, labelled, no patient ID: own patient

    def summary(self) -> dict:
        return {"labelled_and_scored": len(self.pairs), "scored_without_label": self.scored_without_label,
                "labelled_not_scored": self.labelled_not_scored, "labels_without_file": self.labels_without_file,
                "ambiguous_names": self.ambiguous, "without_patient_id": self.without_patient_id}

    def problems(self, listed_in: str | None = None) -> list[str]:
        return mismatch_lines(self.summary(), listed_in)


def mismatch_lines(summary: dict, listed_in: str | None = None) -> list[str]:
    """One line per kind of mismatch in a :meth:`Matching.summary`, for a command's output. Log
    lines carry no identifiers: a scanned file is named as logs name it (``file#<hash>``, since its
    path may name the patient), a label row by count only; ``listed_in`` says where the names are."""
    out = []
    not_scored = [f"{log_name(d['file'])} ({shown(d['reason'] or d['status'], 120)})"
                  for d in summary["labelled_not_scored"]]
    named = (("scored files have no label row", [log_name(f) for f in summary["scored_without_label"]]),
             ("labelled files were not scored", not_scored))  # with why: a link, a loop, a bad file
    counted = (("label rows have no file", len(summary["labels_without_file"])),
               ("file names occur more than once (left out)", len(summary["ambiguous_names"])))
    where = (f" ({listed_in})" if listed_in.startswith("names:") else f" (names in {listed_in})") if listed_in else ""
    for what, items in named:
        if items:
            listed = ", ".join(items[:5]) + (f" and {len(items) - 5} more" if len(items) > 5 else "")
            out.append(f"{len(items)} {what}: {listed}{where}")
    for what, count in counted:
        if count:
            out.append(f"{count} {what}{where}")
    alone = summary.get("without_patient_id", [])
    if alone:
        out.append(f"{len(alone)} labelled studies have no Patient ID (in the labels or their header): each is counted "
                   f"as its own patient, so the intervals and the folds by patient assume no patient has two of "
                   f"them; give each its patient in the labels' 'Patient ID' column")
    return out


def match_labels(rows: list[dict], labels: LabelTable) -> Matching:
    """Match result rows (``file``, ``status``, ``reason``, ``patient_id``, as results.csv has
    them) to the labels by file name, or by the name without its extension where only that
    matches (a labelled PNG exported again as ``.dcm``)."""
    index = labels.index()
    by_stem: dict[str, list[str]] = {}
    for name in labels.files:
        by_stem.setdefault(image_stem(name), []).append(name)

    def label_of(file: str) -> str | None:
        name = PurePosixPath(file).name
        if name in index:
            return name
        if name.lower().endswith(".json"):  # a sidecar (or a stray JSON file) is never the study itself
            return None
        same_stem = by_stem.get(image_stem(name), [])
        return same_stem[0] if len(same_stem) == 1 else None

    found: dict[str, list[int]] = {}
    without = []
    for i, row in enumerate(rows):
        label = label_of(row["file"])
        if label is not None:
            found.setdefault(label, []).append(i)
        elif row["status"] == "ok":
            without.append(row["file"])
    pairs, groups, not_scored, ambiguous, alone = [], [], [], [], []
    for label, matched in sorted(found.items()):
        if len(matched) > 1:
            ambiguous.append(label)
            continue
        i, j = matched[0], index[label]
        if rows[i]["status"] != "ok":
            not_scored.append({"file": rows[i]["file"], "status": rows[i]["status"], "reason": rows[i]["reason"]})
            continue
        pairs.append((i, j))
        patient = labels.patient_ids[j] or rows[i].get("patient_id")
        groups.append(patient or f"file:{rows[i]['file']}")
        if not patient:
            alone.append(rows[i]["file"])
    missing = [name for name in labels.files if name not in found]
    return Matching(pairs, groups, sorted(without), not_scored, missing, ambiguous, sorted(alone))

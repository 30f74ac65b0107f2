"""A scan into a results folder that already holds results: refuse, resume or overwrite; never replace silently.

Every scan keeps a journal, ``RESULTS_DIR/.cxr-batch/scan-journal.jsonl``: a first line with
what decides a row (the scanned folder and the settings), then one line per scored study (its
file, the sha256 of the file's content, the bundle_sha256 it was scored with and its whole
record, patient name included, for the worklist). Lines are flushed to disk after every batch,
so the journal survives Ctrl-C, SIGTERM and SIGKILL alike.

A second scan into a folder that holds an earlier scan's results:

- without an option, is refused before the model loads, saying what is there (an unfinished
  scan, or a complete one) and the two ways on;
- with ``--resume``, keeps the rows of studies scored before from a file whose content is
  unchanged, by the same bundle (bundle_sha256) and with their PDF still there, and scores
  only the rest (new, changed, failed or skipped files); refused when the earlier scan was of
  another folder or made with other settings (urgent findings, metadata, scoring rules,
  reports...), since its rows would then differ from new ones;
- with ``--overwrite``, deletes the earlier results.csv, run.json, journal, reports and SRs
  (files named by cxr-batch only) once the model has loaded, then scans anew.

A results folder of the watch daemon or the DICOM node (it has their ledger) is never a scan's.
"""

from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from .display import plural
from .files import FILE_MODE, append_whole, private_dir
from .keys import content_sha256
from .record import StudyRecord
from .results import read_run_info

log = logging.getLogger("cxr_batch")

STATE_DIR = ".cxr-batch"  # as the watch daemon's (cxr_batch.watch.STATE_DIR)
JOURNAL = "scan-journal.jsonl"
LEDGER = "ledger.sqlite"
FORMAT = 1
EARLIER_MODES = ("refuse", "resume", "overwrite")
# Settings that change how fast a scan runs, not its rows: they may differ when resuming.
# The weights are compared by bundle_sha256, study by study.
RUNTIME_SETTINGS = ("device", "precision", "batch_size", "workers", "progress", "read_memory_mb", "read_timeout",
                    "weights", "metadata",
                    # where and how results are sent: a RIS at a new address changes no row
                    "hl7_to", "stow_to", "dicomweb_file", "send_timeout", "refused_retry", "send_wait",
                    "hl7_sending_facility", "hl7_receiving_application", "hl7_receiving_facility", "hl7_processing_id")
OUR_OUTPUT = re.compile(r"^cxr_[0-9a-f]+\.(pdf|dcm|sr\.dcm)$")  # reports, encapsulated PDFs, SRs
OUTPUT_FOLDERS = ("reports", "dicom")


class EarlierResults(Exception):
    """The results folder holds an earlier scan's results, and the command does not say what
    to do with them (or cannot resume them)."""


class ResultsNotWritten(Exception):
    """A scan's results could not be written (a full disk, a read-only folder): the scan ends,
    saying what its journal kept for --resume."""


def row_settings(config: dict, metadata_sha256: str | None) -> dict:
    """What decides a study's row, from a scan's configuration (``to_plain``): the metadata
    table by its content, not its path."""
    settings = {k: v for k, v in config.items() if k not in RUNTIME_SETTINGS}
    settings["metadata_sha256"] = metadata_sha256
    return json.loads(json.dumps(settings))  # as the journal holds them: tuples are lists


@dataclass
class Entry:
    sha256: str
    bundle_sha256: str
    record: StudyRecord


@dataclass
class Earlier:
    """What an earlier scan left in the results folder, and what this scan does with it."""

    out: Path
    mode: str = "refuse"
    entries: dict[str, Entry] = field(default_factory=dict)  # resume: scored studies by file
    found: bool = False  # earlier results are there

    @property
    def journal(self) -> Path:
        return self.out / STATE_DIR / JOURNAL

    def keep(self, candidates, bundle_sha256: str, need_report: bool) -> tuple[dict[str, StudyRecord], list]:
        """Split ``candidates`` into the earlier records kept ({file: record}) and those to
        score: a record is kept when its file still has the content it was scored from, by
        this bundle, and (``need_report``) its PDF is still there."""
        kept, todo = {}, []
        for cand in candidates:
            entry = self.entries.get(cand.rel)
            if entry is not None and cand.problem is None and entry.bundle_sha256 == bundle_sha256 and (
                    not need_report or self._has_report(entry.record)) and not self._put_aside(entry.record):
                try:
                    same = content_sha256(cand.path) == entry.sha256
                except Exception:  # unreadable now: read again, its row says why
                    same = False
                if same:
                    kept[cand.rel] = entry.record
                    continue
            todo.append(cand)
        return kept, todo

    def _has_report(self, record: StudyRecord) -> bool:
        return bool(record.report) and (self.out / "reports" / record.report).is_file()

    def _put_aside(self, record: StudyRecord) -> bool:
        """Whether the study's SR or Encapsulated PDF was kept aside as damaged by the outbound
        sender (NAME.damaged, never sent): scored again, the study's objects are made again and
        queued, under the same UIDs."""
        from .integration.outbound import DAMAGED
        from .reports import report_name

        stem = report_name(record.file).removesuffix(".pdf")
        objects = (self.out / "dicom" / f"{stem}.sr.dcm", self.out / "reports" / f"{stem}.dcm")
        return any(not p.is_file() and p.with_name(p.name + DAMAGED).is_file() for p in objects)

    def remove_outputs(self) -> int:
        """``--overwrite``: the earlier scan's files, named by cxr-batch only (a user's own
        files in the folder are left alone). Returns how many were removed."""
        removed = 0
        # evaluate's files are drawn from results.csv: with it they go (never an evaluation of other rows)
        for name in ("results.csv", "run.json", f"{STATE_DIR}/{JOURNAL}", "reports/worklist.pdf", "evaluation.json",
                     "evaluation.pdf"):
            path = self.out / name
            if path.is_file():
                path.unlink()
                removed += 1
        return removed + remove_unlisted_outputs(self.out, None)


def remove_unlisted_outputs(out: Path, scored: set[str] | None) -> int:
    """Reports, encapsulated PDFs and SRs under ``out`` that belong to no scored study
    (``scored``: the files of the rows with status ok; None: remove them all): removed, so no
    PDF is left without its row."""
    keep = set()
    if scored:
        from .reports import report_name  # reportlab only when there are reports to keep

        for file in scored:
            stem = report_name(file).removesuffix(".pdf")  # the PDF, its .dcm and the SR share it
            keep.update((f"{stem}.pdf", f"{stem}.dcm", f"{stem}.sr.dcm"))
    removed = 0
    for folder in OUTPUT_FOLDERS:
        path = out / folder
        if not path.is_dir():
            continue
        for p in path.iterdir():
            if OUR_OUTPUT.match(p.name) and p.name not in keep and p.is_file():
                p.unlink(missing_ok=True)
                removed += 1
    return removed


def read_journal(path: Path) -> tuple[dict | None, dict[str, Entry]]:
    """The journal's header and its entries, the last one per file. A line cut short by a
    kill, or not JSON, is skipped."""
    header, entries = None, {}
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return None, {}
    for line in text.splitlines():
        try:
            item = json.loads(line)
            if "journal" in item:
                header = item
            else:
                entries[item["file"]] = Entry(item["sha256"], item["bundle_sha256"],
                                              StudyRecord.from_json(item["record"]))
        except (ValueError, KeyError, TypeError):
            continue
    return header, entries


def describe(out: Path, journal_entries: int) -> str:
    """One phrase on what the earlier scan left."""
    run = read_run_info(out) or {}
    if run.get("complete") is False:
        left = run.get("files_not_scored")
        return (f"an unfinished scan ({run.get('stopped_by') or 'stopped'}: {plural(journal_entries, 'study')} scored, "
                f"{plural(left, 'file') if isinstance(left, int) else 'some files'} not scored yet)")
    if not run and journal_entries:
        return f"an unfinished scan (killed: {plural(journal_entries, 'study')} scored, no run.json written)"
    if not run and not (out / STATE_DIR / JOURNAL).exists():  # a file of the user's own, say
        return ("a results.csv that no cxr-batch scan wrote (no run.json, no journal): if it is a file of your "
                "own, move it or choose another --out, since --overwrite would delete it")
    rows = sum(run.get("counts", {}).values()) if isinstance(run.get("counts"), dict) else None
    return "the results of an earlier scan" + (f" ({plural(rows, 'row')})" if rows is not None else "")


def refuse_scan_results(out: Path, command: str) -> None:
    """A daemon (watch, listen, pull) never takes over a scan's results folder: it would rebuild
    its ledger from the scan's results.csv and append its own studies to it. EarlierResults."""
    out = Path(out)
    if (out / STATE_DIR / LEDGER).exists():
        return  # the daemon's own folder (a scan never writes one that has a ledger)
    if any(p.exists() for p in (out / "run.json", out / STATE_DIR / JOURNAL)):
        raise EarlierResults(f"{out} holds the results of a scan (run.json, its journal): cxr-batch {command} writes a "
                             f"folder of its own; choose another --out")


def plan(out: Path, mode: str, studies: Path, settings: dict) -> Earlier:
    """What this scan does with an earlier scan's results in ``out`` (call it holding the
    folder's lock, before the model loads). Raises EarlierResults when it must not go on."""
    if mode not in EARLIER_MODES:
        raise ValueError(f"mode {mode!r}: expected one of {', '.join(EARLIER_MODES)}")
    out = Path(out)
    earlier = Earlier(out, mode)
    if (out / STATE_DIR / LEDGER).exists():
        raise EarlierResults(f"{out} is the results folder of a watch daemon or DICOM node (it has their ledger): "
                             f"a scan writes a folder of its own; choose another --out")
    header, entries = read_journal(earlier.journal)
    earlier.found = any((out / name).exists() for name in ("results.csv", "run.json")) or earlier.journal.exists()
    if not earlier.found:
        if mode == "resume":
            log.info("--resume: no earlier scan in %s; scanning everything", out)
        return earlier
    what = describe(out, len(entries))
    if mode == "refuse":
        raise EarlierResults(
            f"{out} already holds {what}; a scan never replaces results silently: add --resume to keep the rows "
            f"of files scored before (unchanged files, same weights) and score only the rest, or --overwrite to "
            f"delete them (results.csv, run.json, reports) and scan again, or choose another --out")
    if mode == "overwrite":
        log.warning("%s held %s: replaced (deleted once the model has loaded)", out, what)
        return earlier
    if header is None:
        raise EarlierResults(f"cannot resume in {out}: its results were not written by a scan of this version (no "
                             f"journal of what each row was scored from); use --overwrite or another --out")
    made = header.get("journal")
    if not (type(made) is int and made <= FORMAT):
        # its rows kept as this version reads them, results.csv written again without the newer columns
        said = f"format {made}" if type(made) is int else "a format this version does not know"
        raise EarlierResults(f"cannot resume in {out}: its results were written by a newer cxr-batch (scan journal "
                             f"{said}; this version reads format {FORMAT}); resume with that version, or use "
                             f"--overwrite or another --out")
    if header.get("studies") != str(Path(studies).resolve()):
        raise EarlierResults(f"cannot resume in {out}: its earlier scan was of {header.get('studies')}, not "
                             f"{Path(studies).resolve()}; use --overwrite or another --out")
    # a journal of an earlier version may hold settings that no longer decide a row
    before = {k: v for k, v in (header.get("settings") or {}).items() if k not in RUNTIME_SETTINGS}
    changed = sorted(k for k in set(before) | set(settings) if before.get(k) != settings.get(k))
    if changed:
        detail = "; ".join(changed_setting(k, before.get(k), settings.get(k)) for k in changed)
        raise EarlierResults(f"cannot resume in {out}: the earlier scan used other settings, so its rows would "
                             f"differ from new ones ({detail}); give the same options, or use --overwrite")
    earlier.entries = entries
    log.info("--resume: %s held %s; %d scored studies may be kept", out, what, len(entries))
    return earlier


ON_BY_DEFAULT = ("pdf", "heatmaps")  # --pdf/--no-pdf, --heatmaps/--no-heatmaps


def _shown(value) -> str:
    """A setting's value as an option takes it: none, a list comma-separated, a shard i/N."""
    if value is None or value == []:
        return "none"
    if isinstance(value, list):
        return ", ".join(map(str, value))
    return str(value)


def changed_setting(key: str, before, now) -> str:
    """One setting that differs between the earlier scan and this one, said as the operator gives
    it (``--no-pdf then, not now``), not as the journal keeps it (``pdf: False then, True now``)."""
    if key == "metadata_sha256":  # the table by its content: its path may be the same
        if before and now:
            return "--metadata: another table now (its content is not the one the earlier scan read)"
        return f"--metadata: {'a table' if before else 'none'} then, {'a table' if now else 'none'} now"
    if isinstance(before, dict) or isinstance(now, dict):  # a config table: [scoring]
        before, now = before or {}, now or {}
        return "; ".join(f"[{key}] {k}: {_shown(before.get(k))} then, {_shown(now.get(k))} now"
                         for k in sorted(set(before) | set(now)) if before.get(k) != now.get(k))
    if isinstance(before, bool) or isinstance(now, bool):
        typed = key not in ON_BY_DEFAULT  # the value an option given on the command line sets
        flag = "--" + ("" if typed else "no-") + key.replace("_", "-")
        return f"{flag} then, not now" if bool(before) == typed else f"{flag} now, not then"
    if key == "shard":
        before, now = ("/".join(map(str, v)) if v else v for v in (before, now))
    return f"--{key.replace('_', '-')}: {_shown(before)} then, {_shown(now)} now"


class Journal:
    """The journal of this scan: appended to (resume) or started anew, flushed every batch."""

    def __init__(self, earlier: Earlier, studies: Path, settings: dict):
        path = earlier.journal
        private_dir(path.parent)
        append = earlier.mode == "resume" and bool(earlier.entries)
        flags = os.O_WRONLY | os.O_CREAT | (os.O_APPEND if append else os.O_TRUNC)
        self._fd = os.open(path, flags, FILE_MODE)
        os.fchmod(self._fd, FILE_MODE)
        self.path = path
        self._lines: list[str] = []
        self._entries = 0  # of the lines not written yet, those of studies (not the header)
        self.written = 0  # study entries written by this scan
        if append:
            _cut_partial_line(path, self._fd)
            return
        self._lines.append(json.dumps({"journal": FORMAT, "studies": str(Path(studies).resolve()),
                                       "settings": settings}))
        try:
            self.flush()
        except OSError:  # no header: a journal that would read as another version's at --resume
            self.close()
            path.unlink(missing_ok=True)
            raise

    def add(self, record: StudyRecord, sha256: str, bundle_sha256: str) -> None:
        self._lines.append(json.dumps({"file": record.file, "sha256": sha256, "bundle_sha256": bundle_sha256,
                                       "record": record.to_json()}))
        self._entries += 1

    def flush(self) -> None:
        """Write the lines added since the last flush, whole or not at all: a write that fails
        (a full disk) is cut back to the last whole line, so a resume never glues its first
        entry to half of one; the studies of the lines not written are scored again then.
        OSError naming the journal."""
        if not self._lines:
            return
        data = ("\n".join(self._lines) + "\n").encode("utf-8")
        entries, self._entries = self._entries, 0
        self._lines.clear()
        try:
            append_whole(self._fd, data)
        except OSError as e:
            raise OSError(e.errno, e.strerror, str(self.path)) from None
        self.written += entries

    def close(self) -> None:
        if self._fd is not None:
            try:
                self.flush()
            finally:
                os.close(self._fd)
                self._fd = None


def _cut_partial_line(path: Path, fd: int) -> None:
    """A journal whose last line was cut short (a power cut mid-write) ends at its last whole
    line before this scan appends to it."""
    size = os.fstat(fd).st_size
    with open(path, "rb") as f:
        f.seek(max(0, size - (1 << 20)))
        tail = f.read()
    if tail and not tail.endswith(b"\n"):
        os.ftruncate(fd, size - len(tail) + tail.rfind(b"\n") + 1)

"""``cxr-batch monitor``: has what the model is given moved away from its reference?

Reads a results folder (``results.csv`` as scan and the daemons write it), splits its scored
studies into windows (``--window 500``: consecutive 500 studies; ``--window 14d``: 14 days by
the time each study was scored), separately for each model that scored them (a new model starts
new windows), and compares every window with a reference (:mod:`cxr_batch.drift`):

- ``--reference BUNDLE``: the reference stored in a bundle's manifest (summaries of its training
  images scored the way inference scores them);
- ``--reference RESULTS_DIR``: a site baseline, the scored studies of another results folder;
- by default, the reference of the bundle that scored the studies (found by its bundle_sha256
  among the bundle named in run.json, the default bundle and the shipped ones); when it carries
  none, the model's first window is its baseline and later windows are compared with it.

Writes ``OUT/monitor.json`` (every statistic of every window, every alarm, and ``alarms``: the
list of all alarms, each naming its quantity, window and studies) and ``OUT/monitor.pdf``.
"""

from __future__ import annotations

import csv as _csv
import datetime as dt
import hashlib
import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

from . import exit_codes
from .bundle import (DEFAULT_BUNDLE, MANIFEST_FILE, BundleError, is_bundle, manifest_sha256, read_manifest,
                     refuse_output_in_bundle)
from .drift import (DEFAULT_ALPHA, DEFAULT_MIN_STUDIES, EFFECT_NAMES, INVERTED_LEVEL, INVERTED_RATE, MIN_EFFECT,
                    OTHER_FORMAT, PATIENT_MIX_EFFECT, SPARSE_TEST, TESTS, DriftError, check_reference, compare, make_reference, monitored,
                    output_fingerprint, outputs_comparable)
from .display import format_time, plural
from .files import atomic_write_files, private_dir
from .findings import FINDINGS
from .patient import MAX_PLAUSIBLE_AGE
from .record import COLUMNS, DRIFT_COLUMNS, StudyRecord
from .results import read_run_info
from .study import clean_text

log = logging.getLogger("cxr_batch")
DEFAULT_WINDOW = "500"
METHOD = {
    "windows": "scored studies of one model in the order they were scored (scored_at, else study date, else row); "
               "'N': consecutive N studies; 'Nd'/'Nh': consecutive periods of N days/hours from the first study",
    "tests": {**{kind: test for kind, (test, _) in TESTS.items()},
              "categorical, a category expected fewer than 5 times": SPARSE_TEST,
              "images that look inverted (inversion_cue < 0 and intensity_skew > 0), counted": f"exact binomial against "
              f"{INVERTED_RATE:.0%} by chance; at least {INVERTED_LEVEL:.0%} of a window's studies alarms"},
    "effect": {**{kind: f"{EFFECT_NAMES[kind]} >= {MIN_EFFECT[kind]}" for kind in MIN_EFFECT},
               "sex, view": f"{EFFECT_NAMES['categorical']} >= {PATIENT_MIX_EFFECT}"},
    "alarm": "Holm-adjusted p-value (over every quantity tested in the window) below alpha AND the effect at least "
             "its minimum AND the window at least min_studies scored studies",
    "scope": "an early warning that inputs or outputs moved, not an estimate of performance (that needs labels: "
             "cxr-batch evaluate)",
}


class MonitorError(Exception):
    """Nothing could be monitored: no results, no scored study, an unusable reference."""


@dataclass(frozen=True)
class WindowSpec:
    count: int | None = None  # studies per window
    period: dt.timedelta | None = None  # or a period of time

    @classmethod
    def parse(cls, text: str) -> "WindowSpec":
        m = re.fullmatch(r"\s*(\d+)\s*([dh]?)\s*", str(text).lower())
        if not m or int(m.group(1)) <= 0:
            raise ValueError(f"window {text!r}: expected a number of studies (500) or a period (14d, 12h)")
        n, unit = int(m.group(1)), m.group(2)
        if not unit:
            return cls(count=n)
        try:
            return cls(period=dt.timedelta(days=n) if unit == "d" else dt.timedelta(hours=n))
        except OverflowError:
            raise ValueError(f"window {text!r}: a period longer than any date range") from None

    def __str__(self) -> str:
        if self.count is not None:
            return str(self.count)
        hours = self.period.total_seconds() / 3600
        return f"{hours / 24:g}d" if hours % 24 == 0 else f"{hours:g}h"


def study_time(record: StudyRecord) -> dt.datetime | None:
    """When a study was scored (scored_at), else its study date; None when neither is known."""
    for text, fmt in ((record.scored_at, None), (record.ids.study_date, "%Y%m%d")):
        if not text:
            continue
        try:
            t = dt.datetime.fromisoformat(text) if fmt is None else dt.datetime.strptime(text[:8], fmt)
        except ValueError:
            continue
        return t if t.tzinfo else t.replace(tzinfo=dt.timezone.utc)
    return None


@dataclass
class Window:
    index: int
    records: list[StudyRecord]
    rows: list[int]  # results.csv row of each record (1 = the first row after the header)
    times: list[dt.datetime | None] = field(default_factory=list)

    def describe(self) -> dict:
        known = [t for t in self.times if t is not None]
        return {"index": self.index, "n": len(self.records), "rows": [min(self.rows), max(self.rows)],
                "first": min(known).isoformat() if known else None, "last": max(known).isoformat() if known else None}


def split_windows(records: list[StudyRecord], rows: list[int], spec: WindowSpec) -> tuple[list[Window], int]:
    """Scored ``records`` (one model's) in time order, cut into windows. Returns the windows and
    how many studies were left out (time windows need a time)."""
    items = sorted(zip(records, rows, [study_time(r) for r in records]),
                   key=lambda t: (t[2] is None, t[2] or dt.datetime.min.replace(tzinfo=dt.timezone.utc), t[1]))
    windows, left_out = [], 0
    if spec.count is not None:
        for start in range(0, len(items), spec.count):
            chunk = items[start:start + spec.count]
            windows.append(Window(len(windows), [c[0] for c in chunk], [c[1] for c in chunk], [c[2] for c in chunk]))
        return windows, 0
    timed = [it for it in items if it[2] is not None]
    left_out = len(items) - len(timed)
    if timed:
        origin = timed[0][2]
        groups: dict[int, list] = {}
        for it in timed:
            groups.setdefault(int((it[2] - origin) / spec.period), []).append(it)
        for k in sorted(groups):
            chunk = groups[k]
            windows.append(Window(len(windows), [c[0] for c in chunk], [c[1] for c in chunk], [c[2] for c in chunk]))
    return windows, left_out


def empty_periods(windows: list[Window], spec: WindowSpec) -> list[tuple[dt.datetime, dt.datetime]]:
    """The periods of a time ``spec`` between the first window and the last that hold no study
    (from, to): the windows either side are numbered one after the other, and a week a daemon was
    stopped (or whose results were lost) would read as no week at all."""
    if spec.period is None or len(windows) < 2:
        return []
    origin = min(t for t in windows[0].times if t is not None)
    bins = [int((min(t for t in w.times if t is not None) - origin) / spec.period) for w in windows]
    return [(origin + (a + 1) * spec.period, origin + b * spec.period) for a, b in zip(bins, bins[1:]) if b > a + 1]


# ---------------------------------------------------------------------------- references
@dataclass
class Reference:
    data: dict  # the reference (cxr_batch.drift format)
    kind: str  # "bundle", "results" or "baseline"
    source: str  # where it came from, in words
    manifest: dict | None = None  # the bundle's manifest, for a bundle reference

    def describe(self) -> dict:
        return {"kind": self.kind, "source": self.source, "n_studies": self.data.get("n_studies"),
                "made_from": self.data.get("source"), "created": self.data.get("created")}


def verified_manifest(folder: Path) -> dict:
    """A bundle's manifest, its checksum verified (the reference is covered by it)."""
    manifest = read_manifest(folder)
    recorded = manifest.get("bundle_sha256")
    if not recorded or manifest_sha256(manifest) != recorded:
        raise BundleError(f"{Path(folder) / MANIFEST_FILE} fails its checksum: its reference cannot be trusted")
    return manifest


def bundle_reference(folder: Path) -> Reference:
    manifest = verified_manifest(folder)
    where = str(Path(folder) / MANIFEST_FILE)
    if "reference" not in manifest:
        raise DriftError(f"the bundle {folder} carries no reference: add one with 'python -m training.reference "
                         f"{folder} --images TRAINING_IMAGES --metadata LABELS.csv --out NEW_BUNDLE', or give a "
                         f"results folder as --reference (a site baseline)")
    ref = check_reference(manifest["reference"], where)
    return Reference(ref, "bundle", f"bundle {manifest.get('name', '')}@{manifest.get('version', '')} ({folder})",
                     manifest)


# Columns StudyRecord.from_row only copies as text and monitoring never reads (identifiers but the
# study date, notes, sources, report): left out of the records monitor keeps, a daemon's results.csv
# holding a year of studies. None of them can make a row unreadable, so the same rows read.
NOT_MONITORED = ("reason", "patient_id", "study_uid", "series_uid", "sop_uid", "accession_number", "age_source",
                 "sex_source", "view_source", "notes", "findings", "report")
MONITORED_COLUMNS = tuple(c for c in COLUMNS if c not in NOT_MONITORED)


def readable_records(csv: Path, columns: tuple[str, ...] | None = MONITORED_COLUMNS,
                     repeats: list[int] | None = None) -> tuple[list[tuple[int, StudyRecord]], list[str]]:
    """(row number, record) of each row of a results.csv that reads (1: the first row after the
    header), and why each other row did not ("row 7: ..."): a row cut short by a crash mid-append
    or read while a daemon writes it, or a value edited by hand, costs itself, not the monitoring.
    The records hold ``columns`` only (None: every column). A row the same as an earlier one in
    every column (its scored_at to the second included) is a copy, not a study (a results.csv
    appended to itself): left out, its number added to ``repeats``; counted twice, every study
    doubled the evidence the tests saw and shrank their p-values."""
    records, bad, seen = [], [], set()
    keep = None if columns is None else frozenset(columns)
    for i, row in enumerate(_rows(csv), start=1):
        if None in row or None in row.values():  # csv's restkey / restval: not the header's number of fields
            bad.append(f"row {i}: {'more' if None in row else 'fewer'} fields than the header (cut short while "
                       f"written, or edited by hand)")
            continue
        # a digest, not the row: a year of a daemon's rows is read without holding them
        digest = hashlib.blake2b("\x1f".join(row.values()).encode(), digest_size=16).digest()
        if digest in seen:
            if repeats is not None:
                repeats.append(i)
            continue
        seen.add(digest)
        if keep is not None:
            row = {k: v for k, v in row.items() if k in keep}
        try:
            record = StudyRecord.from_row(row)
        except (ValueError, TypeError, KeyError, AttributeError) as e:
            bad.append(f"row {i}: {_unreadable_value(row) or clean_text(str(e), 120)}")
            continue
        if impossible := _impossible_value(record):
            bad.append(f"row {i}: {impossible}")
        else:
            records.append((i, record))
    return records, bad


def _rows(csv: Path):
    """The rows of a results.csv one at a time, as read_results reads them (a byte-order mark is
    not part of the first column's name) but without holding them all: a year of a daemon's rows."""
    try:
        with open(csv, newline="", encoding="utf-8-sig") as f:
            yield from _csv.DictReader(f)
    except UnicodeDecodeError as e:
        raise _not_utf8(csv, e) from None


def _unreadable_value(row: dict) -> str:
    """The first number column of a results.csv row whose value is not a number (a flag or a rank:
    not a whole number), in words."""
    whole = (*(f"flag_{f}" for f in FINDINGS), "worklist_rank")
    for column in ("age", *(f"p_{f}" for f in FINDINGS), "triage_score", "p_any", *whole):
        value = (row.get(column) or "").strip()
        try:
            if value:
                (int if column in whole else float)(value)
        except ValueError:
            return f"{column} {clean_text(value, 40)!r} is not {'a whole' if column in whole else 'a'} number"
    return ""


def _impossible_value(record: StudyRecord) -> str:
    """A value scan never writes (a probability of 7, a flag of 2, an age of -40), in words: a
    number typed over by hand would move a window's statistics without anything having drifted."""
    s, age = record.scores, record.patient.age
    if s is not None:
        named = [*((f"p_{f}", p) for f, p in zip(FINDINGS, s.probs)), ("p_any", s.p_any)]
        for column, p in named:
            if p is not None and not 0.0 <= p <= 1.0:
                return f"{column} {p:g} is not a probability"
        for f, flag in zip(FINDINGS, s.flags):
            if flag not in (0, 1):
                return f"flag_{f} {flag} is not 0 or 1"
    if age is not None and not 0.0 <= age <= MAX_PLAUSIBLE_AGE:
        return f"age {age:g} is not a plausible age (scan writes such an age as unknown)"
    return ""


def _ranges(numbers: list[int], most: int = 5) -> str:
    """Row numbers in short: '31-60, 75' (the first ``most`` runs, then 'and more')."""
    runs: list[list[int]] = []
    for n in numbers:
        if runs and n == runs[-1][1] + 1:
            runs[-1][1] = n
        else:
            runs.append([n, n])
    text = ", ".join(f"{a}-{b}" if b > a else str(a) for a, b in runs[:most])
    return text + (" and more" if len(runs) > most else "")


def _not_utf8(csv: Path, e: UnicodeDecodeError) -> DriftError:
    """A results.csv saved again by a spreadsheet in the computer's own code page, said as such."""
    return DriftError(f"{csv} is not UTF-8 text (byte {e.object[e.start:e.start + 1].hex()} at offset {e.start}; "
                      f"saved again by a spreadsheet?): give the results.csv scan wrote")


def require_columns(csv: Path) -> None:
    """Refuse a results.csv whose header lacks columns of results.csv as scan writes it: a column
    removed by hand would make every study's value of it unknown (the sex column removed: 'sex
    unknown' in every study, an alarm about nothing). One from before drift monitoring (without its
    columns, and older ones without p_any and worklist_rank too) is said to be so later."""
    try:
        with open(csv, newline="", encoding="utf-8-sig") as f:  # as read_results reads it
            have = {h.strip() for h in next(_csv.reader(f), [])}
    except UnicodeDecodeError as e:  # the header is read with the first block of rows
        raise _not_utf8(csv, e) from None
    if not have & set(DRIFT_COLUMNS):
        return  # from before drift monitoring (older still: before p_any): said later, not "removed by hand"
    missing = [c for c in COLUMNS if c not in have]
    if missing and have:  # an empty file holds no study, as said later
        raise DriftError(f"{csv} lacks column(s) {', '.join(missing[:8])}{' and more' if len(missing) > 8 else ''} "
                           f"of results.csv as scan writes it (removed by hand?): give the results.csv scan wrote")


def results_reference(folder: Path) -> Reference:
    require_columns(Path(folder) / "results.csv")
    records = [r for _, r in readable_records(Path(folder) / "results.csv")[0] if monitored(r)]
    if not records:
        raise DriftError(f"{folder}/results.csv holds no scored study with drift data to serve as a reference "
                         f"(studies scored before drift monitoring have none: scan them again)")
    models = {r.weights_sha256 for r in records}
    ref = make_reference(records, f"results folder {folder}",
                         weights_sha256=models.pop() if len(models) == 1 else None)
    return Reference(ref, "results", f"site baseline: {len(records)} scored studies of {folder}")


def load_reference(path: Path) -> Reference:
    """``--reference``: a bundle folder (its manifest's reference) or a results folder."""
    path = Path(path)
    if (path / MANIFEST_FILE).is_file():
        return bundle_reference(path)
    if (path / "results.csv").is_file():
        return results_reference(path)
    raise DriftError(f"--reference {path} is neither a weights bundle (manifest.json) nor a results folder "
                     f"(results.csv)")


def known_bundles(results_dir: Path) -> list[Path]:
    """Bundles that may have scored a results folder: the one its run.json names, the default
    bundle and the other shipped bundles beside it."""
    run = read_run_info(results_dir) or {}
    config = run.get("config") if isinstance(run.get("config"), dict) else {}
    # bundle_path: absolute; config.weights is as typed, relative to wherever the scan ran
    found = [Path(w) for w in (run.get("bundle_path"), config.get("weights")) if w and isinstance(w, str)]
    found.append(DEFAULT_BUNDLE)
    if DEFAULT_BUNDLE.parent.is_dir():
        found += sorted(p for p in DEFAULT_BUNDLE.parent.iterdir() if (p / MANIFEST_FILE).is_file())
    return found


def find_manifest(sha: str, candidates: list[Path]) -> tuple[Path, dict] | None:
    """The verified manifest whose bundle_sha256 is ``sha`` among ``candidates``."""
    for folder in candidates:
        try:
            manifest = verified_manifest(folder)
        except (BundleError, OSError):
            continue
        if manifest.get("bundle_sha256") == sha:
            return folder, manifest
    return None


def same_model_elsewhere(label: str, sha: str, candidates: list[Path]) -> str | None:
    """Why no bundle was found for studies of model ``label`` (``name@version``) scored under
    bundle_sha256 ``sha``, when a verified bundle among ``candidates`` has that name and version
    under another hash: a bundle sealed again (its training-image list or reference added, an
    edit) changes its bundle_sha256, and nothing here can tell whether its weights changed."""
    for folder in candidates:
        try:
            manifest = verified_manifest(folder)
        except (BundleError, OSError):
            continue
        if f"{manifest.get('name')}@{manifest.get('version')}" == label and manifest.get("bundle_sha256") != sha:
            return (f"no bundle here has the bundle_sha256 {sha[:8]}... that scored these studies; {folder} is {label} "
                    f"too, under {manifest['bundle_sha256'][:8]}... (a bundle sealed again, e.g. when its list of "
                    f"training images was added, gets a new bundle_sha256 while its weights may be the same; the "
                    f"README says which shipped bundles were): if it is the same model, monitor with --reference "
                    f"{folder} to compare these studies with its reference")
    return None


# ---------------------------------------------------------------------------- monitoring
@dataclass
class MonitorOptions:
    window: WindowSpec = field(default_factory=lambda: WindowSpec.parse(DEFAULT_WINDOW))
    alpha: float = DEFAULT_ALPHA
    min_studies: int = DEFAULT_MIN_STUDIES


def evaluate_windows(windows: list[Window], reference: Reference | None, sha: str, fingerprint: str | None,
                     opts: MonitorOptions) -> tuple[list[dict], dict | None, list[str]]:
    """Compare each window with ``reference`` (or, without one, windows after the first with the
    first, the model's baseline). Returns the windows' results, the reference used and notes."""
    notes = []
    if reference is None:
        if not windows:
            return [], None, notes
        base = windows[0]
        data = make_reference(base.records, f"the first window ({plural(len(base.records), 'study')})",
                              weights_sha256=sha)
        reference = Reference(data, "baseline", f"site baseline: the first window of these results "
                              f"({plural(len(base.records), 'study')}, rows {min(base.rows)}-{max(base.rows)})")
        notes.append("no reference for this model: its first window is the baseline and is not tested itself")
        tested = windows[1:]
    else:
        tested = windows
    small = reference_too_small(reference, opts.min_studies)
    if small:
        notes.append(f"not compared: {small}")
        return [], reference.describe() | {"too_small": True, "outputs_compared": False}, notes
    outputs = outputs_comparable(reference.data, sha, fingerprint)
    if not outputs:
        notes.append("outputs not compared: the reference describes another model's outputs (or a different "
                     "calibration or thresholds); inputs are compared")
    out = []
    for w in tested:
        result = compare(reference.data, w.records, alpha=opts.alpha, min_studies=opts.min_studies, outputs=outputs,
                         rows=w.rows)
        out.append({"window": w.describe(), **result})
    # said once, not only in each window's statistics: the quality manager reads the notes
    why = [w["statistics"]["format"].get("not_tested", "") for w in out]
    for reason in sorted({r for r in why if r.startswith(OTHER_FORMAT)}):
        notes.append(f"acquisition not compared in {plural(why.count(reason), 'window')}: {reason}")
    return out, reference.describe() | {"outputs_compared": outputs}, notes


def reference_too_small(reference: Reference, min_studies: int, option: str = "--min-studies") -> str:
    """Why ``reference`` holds too few studies to compare with (a window of studies like its own
    would raise no alarm whatever they are), or '' when it holds enough; ``option`` names the
    minimum."""
    n = reference.data.get("n_studies")
    if isinstance(n, int) and n >= min_studies:
        return ""
    return (f"the reference ({reference.source}) holds {n} scored studies, fewer than {option} ({min_studies}): "
            f"too few to tell drift from chance")


def conclusive(window: dict) -> bool:
    """A window tested with enough studies for its "no alarm" to mean something."""
    return not window.get("too_small")


def run_monitor(results_dir: Path, out: Path, reference_path: Path | None = None,
                opts: MonitorOptions = MonitorOptions()) -> dict:
    """Monitor ``results_dir``; write OUT/monitor.json and OUT/monitor.pdf; return the report
    (its ``exit_code`` says how it went). Raises MonitorError/DriftError when nothing can be
    done."""
    results_dir, out = Path(results_dir), Path(out)
    from .folders import refuse_out_in_state  # a node's spool reads what lands there (ConfigError: exit 2)

    refuse_out_in_state(out)
    csv = results_dir / "results.csv"
    if not csv.is_file():
        raise MonitorError(f"{results_dir} holds no results.csv")
    if reference_path is not None and Path(reference_path).resolve() == results_dir.resolve():
        raise MonitorError(f"--reference {reference_path} is RESULTS itself: every window would be compared with "
                           f"the studies it holds, and no drift could be seen; give a results folder of earlier "
                           f"studies (a site baseline) or a bundle, or leave --reference out for the reference of "
                           f"the bundle that scored them")
    refuse_output_in_bundle(out, reference_path if reference_path and is_bundle(Path(reference_path))
                            else DEFAULT_BUNDLE)
    require_columns(csv)
    repeats: list[int] = []
    rows, unreadable = readable_records(csv, repeats=repeats)
    explicit = load_reference(reference_path) if reference_path is not None else None
    if explicit is not None and (small := reference_too_small(explicit, opts.min_studies)):
        raise MonitorError(f"--reference {reference_path}: {small}")
    by_model: dict[str, list[tuple[StudyRecord, int]]] = {}
    for i, r in rows:
        if monitored(r):
            by_model.setdefault(r.weights_sha256, []).append((r, i))
    older = sum(r.ok and not monitored(r) for _, r in rows)
    if not by_model:
        failed = sum(not r.ok for _, r in rows)
        raise MonitorError(f"{csv} holds no scored study with drift data" + (
            f" ({older} were scored before drift monitoring: scan them again)" if older else "") + (
            f" ({plural(failed, 'row')} "
            f"{'is an error or a skipped study' if failed == 1 else 'are errors or skipped studies'}"
            f": see their notes in results.csv)" if failed else "") + (
            f" ({plural(len(unreadable), 'row')} could not be read: {'; '.join(unreadable[:3])})" if unreadable else ""))
    report = {"results": str(results_dir), "generated": dt.datetime.now().astimezone().isoformat(timespec="seconds"),
              "window": str(opts.window), "alpha": opts.alpha, "min_studies": opts.min_studies,
              "min_effect": dict(MIN_EFFECT), "method": METHOD,
              "studies": {"rows": len(rows) + len(unreadable), "scored": sum(len(v) for v in by_model.values())},
              "models": [], "alarms": [], "notes": []}
    if unreadable:
        report["notes"].append(f"left out: {plural(len(unreadable), 'row')} of results.csv that could not be read: "
                               + "; ".join(unreadable[:5]) + (" and more" if len(unreadable) > 5 else ""))
    if older:
        report["notes"].append(f"left out: {plural(older, 'scored study')} without drift data (scored by an earlier "
                               f"cxr-batch)")
    if repeats:
        report["notes"].append(f"counted once: {plural(len(repeats), 'row')} repeat an earlier row of results.csv in "
                               f"every column (rows {_ranges(repeats)}; a results.csv appended to itself?)")
    report["mixed_models"] = mixed_periods(by_model, opts.window)
    if report["mixed_models"]:
        report["notes"].append(mixed_note(report["mixed_models"]))
    candidates = known_bundles(results_dir)
    if explicit is not None and explicit.kind == "bundle" and reference_path is not None:
        candidates = [Path(reference_path)] + candidates
    tested_any, largest, untimed, any_window = False, 0, 0, False
    for sha, items in sorted(by_model.items(), key=lambda kv: kv[1][0][1]):
        records, numbers = [r for r, _ in items], [i for _, i in items]
        found = find_manifest(sha, candidates)
        fingerprint = output_fingerprint(found[1]) if found else None
        reference = explicit
        notes = []
        if reference is None and found is not None and "reference" in found[1]:
            try:
                reference = bundle_reference(found[0])
            except DriftError as e:
                notes.append(str(e))
        if found is None and explicit is None and (why := same_model_elsewhere(records[0].model, sha, candidates)):
            notes.append(why)
        windows, left_out = split_windows(records, numbers, opts.window)
        untimed, any_window = untimed + left_out, any_window or bool(windows)
        if left_out:
            notes.append(f"left out of time windows: {plural(left_out, 'study')} without a time (scored_at or study date)")
        if gaps := empty_periods(windows, opts.window):
            notes.append("no study was scored from " + "; from ".join(
                f"{format_time(a)} to {format_time(b)}" for a, b in gaps[:5]) + (" and more" if len(gaps) > 5 else "")
                + f" ({plural(len(gaps), 'period')} of {opts.window} without a window: a daemon stopped, or results "
                  f"missing?)")
        results, ref_info, more = evaluate_windows(windows, reference, sha, fingerprint, opts)
        notes += more
        tested_any = tested_any or any(conclusive(w) for w in results)
        largest = max([largest] + [w["window"]["n"] for w in results])
        model = {"model": records[0].model, "weights_sha256": sha, "n": len(records),
                 "bundle": str(found[0]) if found else None, "reference": ref_info, "windows": results,
                 "notes": notes}
        report["models"].append(model)
        for w in results:
            for alarm in w["alarms"]:
                report["alarms"].append({**alarm, "model": model["model"], "weights_sha256": sha,
                                         "window": w["window"]})
    if not tested_any and not any_window and untimed:  # not "no reference": there was nothing to compare
        report["problem"] = (f"no window: none of the {untimed} scored studies has a time (scored_at, else the study "
                             f"date) to place it in a --window of {opts.window} (a results.csv saved again by a "
                             f"spreadsheet may have rewritten its times); use a --window of studies (500)")
    elif not tested_any and largest:
        # a longer window helps only where a model has scored enough studies for one
        longer = any(m["n"] >= opts.min_studies for m in report["models"])
        report["problem"] = (f"no verdict: no window holds --min-studies ({opts.min_studies}) scored studies (the "
                             f"largest holds {largest}): too few to tell drift from chance. Monitor again when more "
                             f"are scored" + (", or use a longer --window" if longer else ""))
    elif not tested_any and any(m["reference"] and m["reference"].get("too_small") for m in report["models"]):
        report["problem"] = "nothing was compared: " + "; ".join(n for m in report["models"] for n in m["notes"]
                                                                  if n.startswith("not compared:"))
    elif not tested_any:
        report["problem"] = ("nothing was compared: no reference was found for the model(s) that scored these "
                             "studies and there is no window after the first (the baseline); give --reference "
                             "BUNDLE_OR_RESULTS_DIR")
    report["exit_code"] = (exit_codes.FATAL if not tested_any else
                           exit_codes.DRIFT_ALARM if report["alarms"] else exit_codes.OK)
    write_outputs(report, out)
    return report


def mixed_periods(by_model: dict[str, list[tuple[StudyRecord, int]]], spec: WindowSpec) -> list[dict]:
    """The windows of the site's timeline (every model's scored studies together, cut as
    ``spec`` cuts them) that more than one model scored: a site that swapped bundles mid-week, or
    two nodes running different bundles. Each model is compared on its own, but that period's
    flag rates and worklist mix two models. Each: the window (n, rows, first, last) and its
    models (bundle_sha256, name@version, studies), in the order they first scored in it."""
    items = [item for model in by_model.values() for item in model]
    periods, _ = split_windows([r for r, _ in items], [i for _, i in items], spec)
    out = []
    for w in periods:
        counts: dict[str, list] = {}
        for r in w.records:
            counts.setdefault(r.weights_sha256, [r.model, 0])[1] += 1
        if len(counts) > 1:
            described = {k: v for k, v in w.describe().items() if k != "index"}  # not a model's window number
            out.append(described | {"models": [{"weights_sha256": sha, "model": label, "n": n}
                                               for sha, (label, n) in counts.items()]})
    return out


MIXED_SHOWN = 3  # periods named in the note; monitor.json lists all


def mixed_note(mixed: list[dict]) -> str:
    """The periods more than one model scored, in words: when, and each bundle_sha256 with its
    studies."""
    def one(p: dict) -> str:
        when = f"{p['first'][:10]} to {p['last'][:10]}" if p.get("first") else f"{plural(p['n'], 'study')}"
        models = ", ".join(f"{m['weights_sha256'][:12]}... ({m['model']}) {plural(m['n'], 'study')}"
                           for m in p["models"])
        return f"{when} (rows {p['rows'][0]}-{p['rows'][1]}): {models}"

    more = len(mixed) - MIXED_SHOWN
    return (f"models scored side by side in {plural(len(mixed), 'window')} of the site's studies: "
            + "; ".join(one(p) for p in mixed[:MIXED_SHOWN]) + (f"; and {more} more (monitor.json: mixed_models)"
                                                                if more > 0 else "")
            + ": each model is compared with its reference on its own, but these periods' flag rates and worklist "
              "mix models (a bundle swapped mid-period, or nodes running different bundles?)")


def write_outputs(report: dict, out: Path) -> None:
    from .monitor_report import monitor_pdf

    private_dir(out)
    # both in place or neither: a new monitor.json beside the last run's PDF (a full disk, a kill
    # between the two) described windows the PDF did not show
    atomic_write_files({out / "monitor.pdf": monitor_pdf(report),
                        out / "monitor.json": (json.dumps(report, indent=2) + "\n").encode()})


def chance_of_false_alarms(report: dict) -> str:
    """What Holm's bound means over the whole run, in words: it holds per window, and every window
    since the first is tested, so a run over many windows of studies like the reference's may still
    hold a false alarm or two. '' when no window was tested."""
    tested = sum(not w.get("too_small") for m in report["models"] for w in m["windows"])
    if not tested:
        return ""
    bound = tested * report["alpha"]
    return (f"by chance alone: Holm's correction bounds each window's chance of any false alarm at alpha "
            f"{report['alpha']:g}; over the {tested} window{'s' if tested > 1 else ''} tested here, at most {bound:.2g} "
            f"false alarm{'s' if bound != 1 else ''} {'are' if bound != 1 else 'is'} expected if nothing changed "
            f"(fewer with the minimum shifts); an alarm that recurs in the windows after it is unlikely to be chance")


def alarm_line(alarm: dict) -> str:
    """One alarm in words, without identifiers: quantity, size, window and studies."""
    w = alarm["window"]
    when = f"rows {w['rows'][0]}-{w['rows'][1]}" if w.get("rows") else plural(w['n'], 'study')
    return (f"{alarm['label']} ({alarm['quantity']}): {alarm['shift']}; {alarm['effect_name']} {alarm['effect']:.2f}, "
            f"p (Holm) {p_text(alarm['p_holm'])}; window {w['index']} ({plural(w['n'], 'study')}, {when})")


SMALLEST_P = 1e-15  # below it a p-value's digits are those of the approximation and of float rounding


def p_text(p: float) -> str:
    """A p-value as printed: a window whose every value moved (images resized to 64 px) printed
    "p (Holm) 5.0e-292", a precision no test has; below 1e-15 it is said as a bound."""
    return f"< {SMALLEST_P:.0e}" if p < SMALLEST_P else f"{p:.1e}"

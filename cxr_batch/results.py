"""results.csv: an atomic streaming writer, reading back, and merging shards.

The columns come from the study record (:data:`cxr_batch.record.COLUMNS`). Rows are written to a temporary file beside results.csv as they are produced (memory stays
flat on any number of studies) and renamed over results.csv only when the run completes, so
a reader never sees a half-written file.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
import tempfile
from pathlib import Path

from .files import FILE_MODE, append_whole, file_in_the_way, private_dir
from .record import COLUMNS, StudyRecord
from .triage import worklist_key

log = logging.getLogger("cxr_batch")


class AtomicCsvWriter:
    """Write rows to ``<path>.tmp`` and move it over ``path`` on :meth:`commit`.

    Used as a context manager: leaving the block by an exception removes the temp file and
    leaves any earlier ``path`` untouched.
    """

    def __init__(self, path: Path, columns=COLUMNS, mode: int = FILE_MODE, rank: bool = True):
        self.path = Path(path)
        self.mode, self.rank = mode, rank
        fd, self.tmp = tempfile.mkstemp(dir=self.path.parent, prefix=f".{self.path.name}.", suffix=".tmp")
        self._file = os.fdopen(fd, "w", newline="", encoding="utf-8")
        self._writer = csv.DictWriter(self._file, fieldnames=list(columns), extrasaction="ignore")
        self._writer.writeheader()
        self.count = 0

    def write(self, record: StudyRecord) -> None:
        self.write_row(record.to_row())

    def write_row(self, row: dict[str, str]) -> None:
        """A row of strings, written as it is (merging shards)."""
        self._writer.writerow(row)
        self.count += 1

    def commit(self) -> Path:
        """Move the rows in place; with ``rank`` (and a ``worklist_rank`` column), number the
        scored rows in worklist order first (:func:`rank_rows`): one run, one worklist."""
        if self.rank and "worklist_rank" in self._writer.fieldnames and self.count:
            self._rerank()
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        os.chmod(self.tmp, self.mode)
        os.replace(self.tmp, self.path)
        return self.path

    def _rerank(self) -> None:
        """Read the streamed rows back, rank them and write them again (same file, same order):
        a rank is known only once every study is scored."""
        self._file.flush()
        with open(self.tmp, newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
        rank_rows(rows)
        self._file.seek(0)
        self._file.truncate()
        self._writer.writeheader()
        self._writer.writerows(rows)

    def abort(self) -> None:
        try:
            if not self._file.closed:
                self._file.close()  # flushes what is buffered: on a full disk that fails too
        except OSError:
            pass
        finally:
            Path(self.tmp).unlink(missing_ok=True)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None:
            self.abort()
        elif not self._file.closed:
            self.commit()
        return False


def rank_rows(rows: list[dict]) -> int:
    """Set ``worklist_rank`` (1 = read first) on the scored rows of one run, in the order of
    :func:`cxr_batch.triage.worklist_key`; other rows get an empty rank. Returns how many were
    ranked."""
    scored = [r for r in rows if r.get("status") == "ok" and r.get("priority")]
    for r in rows:
        r["worklist_rank"] = ""
    scored.sort(key=lambda r: worklist_key(r["priority"], float(r.get("triage_score") or 0.0), r["file"]))
    for i, r in enumerate(scored, 1):
        r["worklist_rank"] = str(i)
    return len(scored)


def append_rows(path: Path, records: list[StudyRecord]) -> None:
    """Append records to results.csv (created with its header if absent) in one write,
    flushed to disk: the cost is that of the new rows, whatever the file's size. A write that
    fails (a full disk) is undone and raised; a crash mid-append can leave a partial last line,
    and the watch daemon rewrites the file from its ledger at every start."""
    path = Path(path)
    if not path.exists():  # a daemon's rows: no rank (its worklist changes with every study)
        with AtomicCsvWriter(path, rank=False) as writer:
            for record in records:
                writer.write(record)
        return
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(COLUMNS))
    for record in records:
        writer.writerow(record.to_row())
    fd = os.open(path, os.O_WRONLY | os.O_APPEND)
    try:
        append_whole(fd, buf.getvalue().encode("utf-8"))
    finally:
        os.close(fd)


def read_results(path: Path) -> list[dict]:
    """Read a results.csv back as a list of dicts of strings (for merge and tests). A byte-order
    mark (the file saved again by a spreadsheet) is not part of the first column's name."""
    with open(path, newline="", encoding="utf-8-sig") as f:
        return list(csv.DictReader(f))


def read_records(path: Path) -> list[StudyRecord]:
    """Read a results.csv back as study records."""
    return [StudyRecord.from_row(row) for row in read_results(path)]


class MergeError(Exception):
    """Shard results that cannot be merged (missing shards, different schemas or weights, one
    file in two shards)."""


RUN_INFO = "run.json"  # what a scan says of itself, beside its results.csv (cxr_batch.scan writes it)


def read_run_info(out: Path) -> dict | None:
    """The run.json a scan wrote in the results folder ``out``; None when there is none, or it is
    not a JSON object (unreadable, another tool's, edited by hand)."""
    try:
        info = json.loads((Path(out) / RUN_INFO).read_text())
    except (OSError, ValueError):
        return None
    return info if isinstance(info, dict) else None


def check_shards(inputs: list[Path], allow_partial: bool = False) -> None:
    """Refuse a set of shard results that is not one whole sharded scan: each results.csv needs
    the run.json its scan wrote beside it, naming its shard i/N (``config.shard``); every i of
    0..N-1 must be there exactly once, all with the same N and the same weights. With
    ``allow_partial`` missing shards (and a missing run.json) are warnings instead."""
    problems, missing, shards, weights = [], [], {}, {}
    for path in inputs:
        run = read_run_info(Path(path).parent)
        shard = ((run or {}).get("config") or {}).get("shard")
        if shard is not None and not (isinstance(shard, list) and len(shard) == 2
                                      and all(isinstance(v, int) for v in shard)):
            run = None  # a run.json edited by hand or of another tool: its shard is unknown
        if run is None:
            missing.append(f"{path} has no readable run.json beside it, so its shard is unknown")
        elif not shard:
            problems.append(f"{path} is not a shard (its scan ran without --shard)")
        elif tuple(shard) in shards:
            problems.append(f"shard {shard[0]}/{shard[1]} is given twice: {shards[tuple(shard)]} and {path}")
        else:
            shards[tuple(shard)] = path
            weights.setdefault(run.get("weights_sha256"), (path, run.get("model")))
    counts = {n for _, n in shards}
    if len(counts) > 1:
        problems.append(f"shards of different splits (N = {', '.join(map(str, sorted(counts)))})")
    if len(weights) > 1:
        named = ", ".join(f"{path} ({model}, bundle_sha256 {str(sha)[:8]}...)" for sha, (path, model) in weights.items())
        models = {model for _, model in weights.values()}
        # a bundle sealed again (v3's and v2.1's with their training-image list) keeps its name and version
        same = (" (the same model name and version under two bundle_sha256s: its bundle was sealed again, e.g. "
                "when its list of training images was added, or edited; its weights may be the same, but the merge "
                "cannot tell: scan the shards again with one bundle)") if len(models) == 1 else ""
        problems.append(f"shards scored with different weights or bundles: {named}{same}")
    if len(counts) == 1:
        n = counts.pop()
        absent = [f"{i}/{n}" for i in range(n) if (i, n) not in shards]
        if absent:
            missing.append(f"shard(s) {', '.join(absent)} missing: the merge would lack their studies")
    if problems or (missing and not allow_partial):
        hint = "" if problems else "; --allow-partial merges what is there"
        raise MergeError("; ".join(problems + missing) + hint)
    for message in missing:
        log.warning("partial merge: %s", message)


def refuse_output_among_inputs(inputs: list[Path], output: Path) -> None:
    """The merged file never replaces a shard's own results.csv (or the run.json that says which
    shard it is): MergeError before anything is read."""
    target = Path(output).resolve()
    for path in inputs:
        path = Path(path).resolve()
        if target in (path, path.parent / "run.json"):
            raise MergeError(f"--out {output} is the shard's own {target.name} ({path}): the merge would overwrite "
                             f"a shard; write it elsewhere, e.g. --out {path.parent.parent / 'merged_results.csv'}")


def refuse_replacing_other_file(output: Path) -> None:
    """An existing --out is replaced only when it is a cxr-batch results.csv (an earlier merge's):
    the write is a rename, so a radiograph or any other file named by mistake, read-only or
    not, would be gone. MergeError."""
    output = Path(output)
    if not output.exists():
        return
    try:
        with open(output, newline="", encoding="utf-8", errors="replace") as f:
            header = next(csv.reader([f.readline()]), [])
    except OSError:
        header = []
    if header != list(COLUMNS):
        raise MergeError(f"--out {output} exists and is not a cxr-batch results.csv: not replaced; choose another "
                         f"name, e.g. --out {output.parent / 'merged_results.csv'}")


def merge_results(inputs: list[Path], output: Path, allow_partial: bool = False) -> int:
    """Merge the results.csv of shards (``scan --shard i/N``) into one, sorted by file like a
    single scan. Needs every shard (:func:`check_shards`) unless ``allow_partial``. Refuses
    files of another schema and a file scored in two shards (the shards then overlapped:
    folders that differ between machines). Returns the number of rows written."""
    refuse_output_among_inputs(inputs, output)
    check_shards(inputs, allow_partial)
    rows, seen = [], {}
    for path in inputs:
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            if reader.fieldnames != list(COLUMNS):
                raise MergeError(f"{path}: not a cxr-batch results.csv of this version (columns differ)")
            for row in reader:
                if row["file"] in seen:
                    raise MergeError(f"{row['file']} is in both {seen[row['file']]} and {path}: shards overlap")
                seen[row["file"]] = path
                rows.append(row)
    rows.sort(key=lambda r: r["file"])
    in_the_way = file_in_the_way(output)
    if in_the_way is not None:
        raise MergeError(f"--out {output}: {in_the_way} is a file, not a folder")
    refuse_replacing_other_file(output)
    private_dir(Path(output).parent)  # `--out merged/results.csv`, as scan makes its --out
    with AtomicCsvWriter(output) as writer:
        for row in rows:
            writer.write_row(row)  # values are strings already: written unchanged
    return len(rows)

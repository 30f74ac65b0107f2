"""results.csv: an atomic streaming writer, reading back, and merging shards.

The columns come from the study record (:data:`cxr_batch.record.COLUMNS`). Rows are written to a temporary file beside results.csv as they are produced (memory stays
flat on any number of studies) and renamed over results.csv only when the run completes, so
a reader never sees a half-written file.
"""

from __future__ import annotations

import csv
import io
import os
import tempfile
from pathlib import Path

from .files import FILE_MODE
from .record import COLUMNS, StudyRecord



class AtomicCsvWriter:
    """Write rows to ``<path>.tmp`` and move it over ``path`` on :meth:`commit`.

    Used as a context manager: leaving the block by an exception removes the temp file and
    leaves any earlier ``path`` untouched.
    """

    def __init__(self, path: Path, columns=COLUMNS, mode: int = FILE_MODE):
        self.path = Path(path)
        self.mode = mode
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
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        os.chmod(self.tmp, self.mode)
        os.replace(self.tmp, self.path)
        return self.path

    def abort(self) -> None:
        if not self._file.closed:
            self._file.close()
        Path(self.tmp).unlink(missing_ok=True)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None:
            self.abort()
        elif not self._file.closed:
            self.commit()
        return False


def append_rows(path: Path, records: list[StudyRecord]) -> None:
    """Append records to results.csv (created with its header if absent) in one write,
    flushed to disk: the cost is that of the new rows, whatever the file's size. A crash
    mid-append can leave a partial last line; the watch daemon rewrites the file from its
    ledger at every start."""
    path = Path(path)
    if not path.exists():
        with AtomicCsvWriter(path) as writer:
            for record in records:
                writer.write(record)
        return
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(COLUMNS))
    for record in records:
        writer.writerow(record.to_row())
    fd = os.open(path, os.O_WRONLY | os.O_APPEND)
    try:
        os.write(fd, buf.getvalue().encode("utf-8"))
        os.fsync(fd)
    finally:
        os.close(fd)


def read_results(path: Path) -> list[dict]:
    """Read a results.csv back as a list of dicts of strings (for merge and tests)."""
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def read_records(path: Path) -> list[StudyRecord]:
    """Read a results.csv back as study records."""
    return [StudyRecord.from_row(row) for row in read_results(path)]


class MergeError(Exception):
    """Shard results that cannot be merged (different schemas, one file in two shards)."""


def merge_results(inputs: list[Path], output: Path) -> int:
    """Merge the results.csv of shards (``scan --shard i/N``) into one, sorted by file like a
    single scan. Refuses files of another schema and a file scored in two shards (the shards
    then overlapped: the same --shard i/N twice, or folders that differ between machines).
    Returns the number of rows written."""
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
    with AtomicCsvWriter(output) as writer:
        for row in rows:
            writer.write_row(row)  # values are strings already: written unchanged
    return len(rows)

"""The watcher's durable ledger: which files were seen and which studies were reported.

SQLite in WAL mode (crash-safe, one writer). A study is keyed by its SOPInstanceUID, or by the
sha256 of the file's content when it has none (PNG/JPEG, broken files). ``studies`` holds each
reported study's results row exactly once; ``files`` remembers every file already handled (by
path, size and mtime) so a rescan does not read it again, and which study it turned out to be.
"""

from __future__ import annotations

import json
import sqlite3
import time
from pathlib import Path

from .record import StudyRecord

SCHEMA = """
CREATE TABLE IF NOT EXISTS studies (
    key TEXT PRIMARY KEY,
    seq INTEGER NOT NULL,
    file TEXT NOT NULL,
    row TEXT NOT NULL,
    reported_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS files (
    path TEXT PRIMARY KEY,
    size INTEGER NOT NULL,
    mtime_ns INTEGER NOT NULL,
    key TEXT NOT NULL,
    outcome TEXT NOT NULL,
    handled_at REAL NOT NULL
);
"""


class Ledger:
    def __init__(self, path: Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(self.path, isolation_level=None, timeout=30)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=FULL")  # a committed study survives a power cut
        self.db.executescript(SCHEMA)

    def close(self) -> None:
        self.db.close()

    def is_reported(self, key: str) -> bool:
        return self.db.execute("SELECT 1 FROM studies WHERE key = ?", (key,)).fetchone() is not None

    def file_handled(self, path: str, size: int, mtime_ns: int) -> bool:
        row = self.db.execute("SELECT size, mtime_ns FROM files WHERE path = ?", (path,)).fetchone()
        return row is not None and row[0] == size and row[1] == mtime_ns

    def record(self, studies: list[tuple[str, StudyRecord]], files: list[tuple[str, int, int, str, str]]) -> None:
        """In one transaction: new studies (key, record) and handled files (path, size, mtime,
        key, outcome). A study key already present is left as it is (exactly once)."""
        now = time.time()
        with self.db:
            self.db.execute("BEGIN IMMEDIATE")
            seq = self.db.execute("SELECT COALESCE(MAX(seq), 0) FROM studies").fetchone()[0]
            for key, record in studies:
                if not self.is_reported(key):
                    seq += 1
                    self.db.execute("INSERT INTO studies VALUES (?, ?, ?, ?, ?)",
                                    (key, seq, record.file, json.dumps(record.to_json()), now))
            self.db.executemany("INSERT OR REPLACE INTO files VALUES (?, ?, ?, ?, ?, ?)",
                                [(*f, now) for f in files])

    def records(self) -> list[StudyRecord]:
        """Every reported study's record, in the order they were reported."""
        return [StudyRecord.from_json(json.loads(r[0]))
                for r in self.db.execute("SELECT row FROM studies ORDER BY seq")]

    def count(self) -> int:
        return self.db.execute("SELECT COUNT(*) FROM studies").fetchone()[0]

"""The watch daemon's durable ledger: which files were seen and what each study's result is.

SQLite in WAL mode (crash-safe, one writer: the daemon holds a lock on the results folder).
A study is keyed by its SOPInstanceUID, or by the sha256 of the file's content when it has
none (PNG/JPEG, broken files). ``studies`` holds each study's current record once, with the
sha256 of the file it came from:

- an ``error`` record is provisional: a later copy with the same key is read again and its
  record replaces the error;
- an ``ok``/``skipped`` record is replaced only by a *different* file with the same key (the
  instance was changed and re-sent); the old record moves to ``superseded``;
- the same bytes again are a duplicate and change nothing.

``files`` remembers every file already handled (by path, size, mtime and ctime) so a rescan
does not read it again. The ctime tells a file from another one put at the same path with the
same size and mtime (a correction renamed over it, or copied in place, by ``cp -p`` or
``rsync -t``): writing or renaming a file sets it, and no copy carries it over. Files recorded
before schema 7 have none and are known by size and mtime alone, as then, until first seen again: their ctime then
is recorded. ``published`` marks the rows already appended to results.csv.

``outbound`` is the queue of results to send: SRs (and Encapsulated PDFs with ``--dicom-pdf``)
back to the PACS by C-STORE (channel ``dicom``) or to a DICOMweb archive by STOW-RS (``stow``),
HL7 ORU^R01 messages to the RIS (``hl7``); keyed by channel and each object's SOPInstanceUID
(an HL7 message's control id, MSH-10). ``destination`` is where it is to go (and went). Objects
are queued in the same transaction that commits their study, so a study is never reported
without its objects queued (nor queued without being reported); each is marked delivered once
the receiver stored (acknowledged) it. Nothing leaves the queue otherwise but by an operator's ``cxr-batch
outbound drop``: an object the peer refused waits (``failed_at`` set, ``last_error`` saying
why) and is offered again later. A study committed again (an error replaced, a changed
instance) queues its objects again under their UIDs (a changed result's SR has a UID of its own).
``outbound_hold`` is a channel's wait after a failed try (its back-off, or a receiver's
Retry-After): no object of the channel is due before it ends, whenever it was queued, so `outbound
list` gives the time the sender will try, and a sender started meanwhile keeps the wait. A
delivery or an operator's retry ends it. (A table added to schema 7 where missing; older releases
ignore it.)
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

from .record import COLUMNS, HELD_BACK, UNREAD_VERSION, StudyRecord
from .study import Identifiers

SCHEMA_VERSION = 7
OUTBOUND = """
CREATE TABLE IF NOT EXISTS outbound (
    uid TEXT NOT NULL,
    channel TEXT NOT NULL DEFAULT 'dicom',
    key TEXT NOT NULL,
    path TEXT NOT NULL,
    queued_at REAL NOT NULL,
    due_at REAL NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    delivered_at REAL,
    failed_at REAL,
    destination TEXT NOT NULL DEFAULT '',
    last_error TEXT NOT NULL DEFAULT '',
    dropped_at REAL,
    sha256 TEXT NOT NULL DEFAULT '',
    PRIMARY KEY (uid, channel)
);
CREATE INDEX IF NOT EXISTS outbound_due ON outbound (channel, due_at) WHERE delivered_at IS NULL AND dropped_at IS NULL;
CREATE TABLE IF NOT EXISTS outbound_hold (
    channel TEXT PRIMARY KEY,
    held_until REAL NOT NULL,
    reason TEXT NOT NULL
);
"""
# A record held back (cxr_batch.record.StudyRecord.held), in SQL
_HELD = f"(status = 'skipped' AND json_extract(record, '$.reason') LIKE '{HELD_BACK}%')"
SCHEMA = f"""
CREATE TABLE IF NOT EXISTS studies (
    key TEXT PRIMARY KEY,
    seq INTEGER NOT NULL,
    file TEXT NOT NULL,
    content TEXT NOT NULL,
    status TEXT NOT NULL,
    record TEXT NOT NULL,
    reported_at REAL NOT NULL,
    published INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS studies_seq ON studies (seq);
CREATE INDEX IF NOT EXISTS studies_reported_at ON studies (reported_at);
CREATE INDEX IF NOT EXISTS studies_study_uid ON studies (json_extract(record, '$.ids.study_uid'));
-- the held studies, which every rescan looks at (release_held): without it, each rescan read
-- every record of a year's ledger (215 MiB at 100,000 studies) to find a few dozen
-- the rows not yet in results.csv: a few, or none, however long the ledger (csv_current)
CREATE INDEX IF NOT EXISTS studies_unpublished ON studies (seq) WHERE published = 0;
CREATE INDEX IF NOT EXISTS studies_held ON studies (json_extract(record, '$.ids.study_uid')) WHERE {_HELD};
CREATE TABLE IF NOT EXISTS superseded (
    key TEXT NOT NULL,
    seq INTEGER NOT NULL,
    file TEXT NOT NULL,
    content TEXT NOT NULL,
    record TEXT NOT NULL,
    reported_at REAL NOT NULL,
    superseded_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS files (
    path TEXT PRIMARY KEY,
    size INTEGER NOT NULL,
    mtime_ns INTEGER NOT NULL,
    key TEXT NOT NULL,
    outcome TEXT NOT NULL,
    handled_at REAL NOT NULL,
    ctime_ns INTEGER
);
CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value TEXT NOT NULL);
""" + OUTBOUND
# Waiting: neither delivered nor dropped by an operator (an object the peer refused still waits:
# failed_at is when it last did).
_WAITING = "delivered_at IS NULL AND dropped_at IS NULL"
FULL_DISK = 1 << 20  # bytes free below which a ledger that cannot be opened is said to be on a full disk
FILE_MODE = 0o640  # the ledger holds the same identifiers as results.csv
CHANNELS = ("dicom", "hl7", "stow")  # C-STORE, HL7 v2 over MLLP, STOW-RS
_OUTBOUND_COLUMNS = ("uid, channel, key, path, queued_at, due_at, attempts, delivered_at, failed_at, destination, "
                     "last_error, dropped_at")


def stored_name(path: str) -> str:
    """A file's path as the ledger stores it. A name that is not UTF-8 (Latin-1 bytes from an old
    export) comes from the file system with its odd bytes as surrogates, which SQLite cannot
    take: they are stored as ``\\xNN`` escapes (any other name is stored as it is, so ledgers
    written before read the same), and every look-up goes through here too."""
    return path.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")



def results_stamp(path: Path) -> str | None:
    """What tells one state of results.csv from another (its inode, size and times, and the
    columns this release writes: a release with another column rewrites the file), for
    :meth:`Ledger.csv_current`; None: no such file, or one on a file system whose times are
    whole milliseconds or coarser (ext4 with 128-byte inodes, vfat, HFS+, many NFS and SMB
    shares): there, the file edited in place within the tick of the daemon's last write, to the
    same size, has the same stamp, so it is rewritten at every start, as it always was."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    if st.st_mtime_ns % 1_000_000 == 0 and st.st_ctime_ns % 1_000_000 == 0:
        return None  # by chance on a finer file system: one start in 10^12 rewrites it
    columns = hashlib.sha256(",".join(COLUMNS).encode()).hexdigest()[:16]
    return f"{st.st_dev}:{st.st_ino}:{st.st_size}:{st.st_mtime_ns}:{st.st_ctime_ns}:{columns}"


class LedgerError(Exception):
    """A ledger that cannot be opened or read (corrupt, or of an unknown schema)."""


class NewerLedger(LedgerError):
    """A ledger of a newer cxr-batch: whole, kept as it is (never to be moved aside)."""


@dataclass(frozen=True)
class Known:
    """What the ledger holds for a key."""

    status: str
    content: str
    file: str
    # held back (cxr_batch.record.HELD_BACK: two patients in its study): no result, provisional
    # as an error is, so the same bytes again are read again, not dropped as a duplicate
    held: bool = False


@dataclass(frozen=True)
class Outcome:
    """What :meth:`Ledger.commit` did with one study."""

    key: str
    record: StudyRecord
    action: str  # "new", "replaced" (a provisional error or a changed file), "kept" (an error after a result)
    annotated: bool = False  # kept, and the standing result's row now says a later version could not be read


@dataclass(frozen=True)
class OutboundItem:
    """A result object waiting in the outbound queue."""

    uid: str  # its SOPInstanceUID (an HL7 message's control id)
    key: str  # the study it reports on
    path: str  # the object's file, relative to the results folder
    attempts: int  # tries so far
    channel: str = "dicom"
    destination: str = ""  # where it was queued for
    sha256: str = ""  # of the file's bytes as queued (an HL7 message), else "": checked before it is sent


def outbound_entry(uid: str, path: str, channel: str = "dicom", destination: str = "",
                   sha256: str = "") -> tuple[str, str, str, str, str]:
    """One object to queue with :meth:`Ledger.commit` or :meth:`Ledger.queue_outbound`;
    ``sha256``: of the file's bytes as written, when the file cannot tell a cut copy from a
    whole one itself (an HL7 message cut between two segments is still a message)."""
    if channel not in CHANNELS:
        raise ValueError(f"unknown outbound channel {channel!r}")
    return uid, path, channel, destination, sha256


class Ledger:
    def __init__(self, path: Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self.db = sqlite3.connect(self.path, isolation_level=None, timeout=30)
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA synchronous=FULL")  # a committed study survives a power cut
            check = self.db.execute("PRAGMA quick_check").fetchone()[0]
            if check != "ok":
                raise sqlite3.DatabaseError(check)
            self._refuse_newer()
            self._migrate()
        except sqlite3.OperationalError as e:  # a full disk, a lock, no permission: not a broken ledger
            full = " on a full disk" if shutil.disk_usage(self.path.parent).free < FULL_DISK else ""
            raise LedgerError(f"{self.path} cannot be opened now ({e}{full}); it is kept as it is: once the disk has "
                              f"room (or the ledger can be written), run the same command again") from None
        except sqlite3.DatabaseError as e:
            raise LedgerError(f"{self.path} is not a readable ledger ({e}). results.csv is kept as it is; "
                              f"move the ledger aside and the daemon rebuilds one from results.csv") from None
        for suffix in ("", "-wal", "-shm"):
            target = Path(f"{self.path}{suffix}")
            if target.exists():
                os.chmod(target, FILE_MODE)

    def _refuse_newer(self) -> None:
        """A ledger of a newer release (the daemon rolled back after an upgrade) is refused before
        anything is written: migrating it would stamp it with this schema, and the rows it
        rewrites from it would lose what the newer release records."""
        if not self.db.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'meta'").fetchone():
            return  # a new ledger, or the first release's
        row = self.db.execute("SELECT value FROM meta WHERE name = 'schema'").fetchone()
        schema = "" if row is None else str(row[0])
        if row is not None and not (schema.isdigit() and int(schema) <= SCHEMA_VERSION):
            self.db.close()
            said = f"schema {int(schema)}" if schema.isdigit() else "a schema this version does not know"
            raise NewerLedger(f"{self.path} was written by a newer cxr-batch (ledger {said}; this version reads "
                              f"schema {SCHEMA_VERSION} and older); it is kept as it is: run the newer cxr-batch on "
                              f"this results folder, or give this one another --out")

    def _migrate(self) -> None:
        tables = {r[0] for r in self.db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        old = "studies" in tables and "meta" not in tables  # the first release's schema
        if old:
            self.db.execute("ALTER TABLE studies RENAME TO studies_v1")
        columns = {r[1] for r in self.db.execute("PRAGMA table_info(outbound)")}
        if "outbound" in tables and "dropped_at" not in columns:
            # Schema 3 gave objects the peer refused up for good: they wait again, due now.
            self.db.execute("ALTER TABLE outbound ADD COLUMN dropped_at REAL")
            self.db.execute("DROP INDEX IF EXISTS outbound_waiting")
            self.db.execute("UPDATE outbound SET due_at = ? WHERE delivered_at IS NULL", (time.time(),))
        if "outbound" in tables and "channel" not in columns:
            # Schema 4 and older: one channel (C-STORE), keyed by uid alone. Rebuilt in one
            # transaction (a crash leaves the old table or the new one, never half of each).
            self.db.execute("BEGIN IMMEDIATE")
            try:
                self.db.execute("DROP INDEX IF EXISTS outbound_due")
                self.db.execute("ALTER TABLE outbound RENAME TO outbound_v4")
                for statement in OUTBOUND.split(";"):
                    if statement.strip():
                        self.db.execute(statement)
                self.db.execute(f"INSERT INTO outbound ({_OUTBOUND_COLUMNS}) SELECT uid, 'dicom', key, path, queued_at, "
                                "due_at, attempts, delivered_at, failed_at, destination, last_error, dropped_at "
                                "FROM outbound_v4")
                self.db.execute("DROP TABLE outbound_v4")
                self.db.execute("COMMIT")
            except BaseException:
                self.db.execute("ROLLBACK")
                raise
        # Schema 5 and older: no digest of the queued file; those rows are checked as before.
        self._add_column("outbound", "sha256", "TEXT NOT NULL DEFAULT ''")
        # Schema 6 and older: files known by size and mtime; those rows are matched as before.
        self._add_column("files", "ctime_ns", "INTEGER")
        self.db.executescript(SCHEMA)
        if old:
            now = time.time()
            for key, seq, file, row, at in self.db.execute("SELECT key, seq, file, row, reported_at FROM studies_v1"):
                values = {k: ("" if v is None else str(v)) for k, v in json.loads(row).items()}
                record = StudyRecord.from_row(values)
                self.db.execute("INSERT INTO studies VALUES (?, ?, ?, ?, ?, ?, ?, 1)",
                                (key, seq, file, "", record.status, json.dumps(record.to_json()), at or now))
            self.db.execute("DROP TABLE studies_v1")
        self.db.execute("INSERT OR REPLACE INTO meta VALUES ('schema', ?)", (str(SCHEMA_VERSION),))

    def _add_column(self, table: str, column: str, declaration: str) -> None:
        """Add ``column`` to ``table`` of an older ledger (a new one gets it from SCHEMA).
        Checked again inside the write lock: another process opening the same ledger (the daemon
        restarting after an upgrade, an operator's `outbound list`) may have added it since."""
        if column in {r[1] for r in self.db.execute(f"PRAGMA table_info({table})")}:
            return
        self.db.execute("BEGIN IMMEDIATE")
        try:
            columns = {r[1] for r in self.db.execute(f"PRAGMA table_info({table})")}
            if columns and column not in columns:
                self.db.execute(f"ALTER TABLE {table} ADD COLUMN {column} {declaration}")
            self.db.execute("COMMIT")
        except BaseException:
            self.db.execute("ROLLBACK")
            raise

    def close(self) -> None:
        self.db.close()

    # ------------------------------------------------------------------ reading
    def known(self, key: str) -> Known | None:
        row = self.db.execute(f"SELECT status, content, file, {_HELD} FROM studies WHERE key = ?", (key,)).fetchone()
        return Known(*row[:3], bool(row[3])) if row else None

    def is_reported(self, key: str) -> bool:
        return self.known(key) is not None

    def settled(self, keys: Sequence[str]) -> set[str]:
        """Those of ``keys`` with a result that stands (scored or skipped; an error is
        provisional: a later copy replaces it)."""
        found: set[str] = set()
        keys = list(keys)
        for start in range(0, len(keys), 500):  # SQLite's bound on host parameters
            chunk = keys[start:start + 500]
            found.update(k for (k,) in self.db.execute(
                f"SELECT key FROM studies WHERE status != 'error' AND key IN ({', '.join('?' * len(chunk))})", chunk))
        return found

    def file_handled(self, path: str, stamp: tuple[int, int, int]) -> bool:
        return self.file_outcome(path, stamp) is not None

    def file_outcome(self, path: str, stamp: tuple[int, int, int]) -> tuple[str, str] | None:
        """(key, outcome) of the file handled at ``path`` if it had this ``stamp`` (size,
        mtime_ns, ctime_ns), else None. A file recorded without a ctime (before schema 7) is
        matched by size and mtime, as it was then: an upgrade reads no handled file again. The
        ctime it has when first matched is recorded, or a correction renamed over it later with
        the same size and mtime would match for ever."""
        row = self.db.execute("SELECT size, mtime_ns, ctime_ns, key, outcome FROM files WHERE path = ?",
                              (stored_name(path),)).fetchone()
        if row is None or (row[0], row[1]) != stamp[:2] or row[2] not in (None, stamp[2]):
            return None
        if row[2] is None:  # once per such file; lost in a crash, it is recorded at the next look
            self.db.execute("UPDATE files SET ctime_ns = ? WHERE path = ? AND ctime_ns IS NULL",
                            (stamp[2], stored_name(path)))
        return row[3], row[4]

    def last_handled(self, path: str) -> tuple[int, str, str] | None:
        """(size, key, outcome) of the file last handled at ``path``, whatever it holds now."""
        row = self.db.execute("SELECT size, key, outcome FROM files WHERE path = ?", (stored_name(path),)).fetchone()
        return tuple(row) if row is not None else None

    def iter_records(self):
        """Every study's current record, in the order they were reported, one at a time."""
        for (r,) in self.db.execute("SELECT record FROM studies ORDER BY seq"):
            yield StudyRecord.from_json(json.loads(r))

    def records(self) -> list[StudyRecord]:
        return list(self.iter_records())

    def scored_reports(self) -> list[tuple[str, str]]:
        """(key, report file name, "" when none) of every scored study, in the order reported:
        read without reading the records whole (a year's ledger, 100,000 of them, at every start)."""
        return self.db.execute("SELECT key, COALESCE(json_extract(record, '$.report'), '') FROM studies "
                               "WHERE status = 'ok' ORDER BY seq").fetchall()

    def keyed_records(self) -> list[tuple[str, StudyRecord]]:
        return [(k, StudyRecord.from_json(json.loads(r)))
                for k, r in self.db.execute("SELECT key, record FROM studies ORDER BY seq")]

    def recent(self, since: float, limit: int, after_seq: int | None = None) -> list[StudyRecord]:
        """The records reported at or after ``since`` (epoch seconds; a stamp as far ahead of now
        as now is from ``since`` at most), with every one recorded after the first of them and
        after ``after_seq`` (see :meth:`last_seq`), the newest
        ``limit``. The wall-clock stamps alone lose studies to a clock step: a clock a day slow,
        then corrected, stamped minutes-old studies a day old; the ledger's order is the order
        they arrived in, whatever the clock said."""
        # A stamp further ahead of now than the window is long is no evidence: a clock set a year
        # fast, then corrected, kept every study recorded since on the list for a year. One a few
        # hours ahead (a hardware clock kept in local time, then set right by NTP) still counts.
        now = time.time()
        first = self.db.execute("SELECT MIN(seq) FROM studies WHERE reported_at >= ? AND reported_at <= ?",
                                (since, now + max(now - since, 0.0))).fetchone()[0]
        starts = [seq for seq in (first, None if after_seq is None else after_seq + 1) if seq is not None]
        if not starts:
            return []
        rows = self.db.execute("SELECT record FROM studies WHERE seq >= ? ORDER BY seq DESC LIMIT ?",
                               (min(starts), limit)).fetchall()
        return [StudyRecord.from_json(json.loads(r[0])) for r in reversed(rows)]

    def last_seq(self) -> int:
        """The order number of the last study recorded (0: none): :meth:`reported_after` it
        gives those recorded since, whatever the wall clock did meanwhile."""
        return self.db.execute("SELECT COALESCE(MAX(seq), 0) FROM studies").fetchone()[0]

    def reported_after(self, seq: int) -> list[StudyRecord]:
        """The records reported (or reported again) after :meth:`last_seq` gave ``seq``, in order."""
        rows = self.db.execute("SELECT record FROM studies WHERE seq > ? ORDER BY seq", (seq,)).fetchall()
        return [StudyRecord.from_json(json.loads(r[0])) for r in rows]

    def scored_records(self, weights_sha256: str, limit: int, newest: bool = True) -> list[tuple[int, StudyRecord]]:
        """(seq, record) of the scored studies of one model (its bundle_sha256) that carry image
        statistics (scored since drift monitoring): the newest ``limit`` or, with
        ``newest=False``, the first ``limit``, in the order reported (drift monitoring's window
        and baseline)."""
        rows = self.db.execute("SELECT seq, record FROM studies WHERE status = 'ok' AND "
                               "json_extract(record, '$.weights_sha256') = ? AND "
                               "json_extract(record, '$.image_stats') IS NOT NULL ORDER BY seq "
                               + ("DESC" if newest else "ASC") + " LIMIT ?", (weights_sha256, limit)).fetchall()
        out = [(seq, StudyRecord.from_json(json.loads(r))) for seq, r in rows]
        return out[::-1] if newest else out

    def study_patients(self, study_uid: str) -> list[tuple[str, str, str, bool, Identifiers]]:
        """(key, status, file, held, identifiers: the patient's alone) of every current record of
        the study ``study_uid``, in the order reported."""
        rows = self.db.execute(
            f"SELECT key, status, json_extract(record, '$.file'), {_HELD}, json_extract(record, '$.ids.patient_id'), "
            "json_extract(record, '$.ids.issuer_of_patient_id'), json_extract(record, '$.ids.patient_name'), "
            "json_extract(record, '$.ids.patient_birth_date'), json_extract(record, '$.ids.patient_sex'), "
            "json_extract(record, '$.ids.issuer_universal_id'), json_extract(record, '$.ids.other_patient_ids') "
            "FROM studies WHERE json_extract(record, '$.ids.study_uid') = ? ORDER BY seq", (study_uid,)).fetchall()
        return [(key, status, file or "", bool(held),
                 Identifiers(patient_id=pid or "", issuer_of_patient_id=issuer or "", patient_name=name or "",
                             patient_birth_date=birth or "", patient_sex=sex or "",
                             issuer_universal_id=issuer_uid or "", other_patient_ids=others or ""))
                for key, status, file, held, pid, issuer, name, birth, sex, issuer_uid, others in rows]

    def held_studies(self) -> list[str]:
        """The Study Instance UIDs of the studies with records held back (two patients)."""
        return [uid for (uid,) in self.db.execute(
            f"SELECT DISTINCT json_extract(record, '$.ids.study_uid') FROM studies WHERE {_HELD}") if uid]

    def record(self, key: str) -> StudyRecord | None:
        """The current record of ``key``."""
        row = self.db.execute("SELECT record FROM studies WHERE key = ?", (key,)).fetchone()
        return StudyRecord.from_json(json.loads(row[0])) if row else None

    def has_superseded(self, key: str) -> bool:
        """Whether ``key``'s result replaced an earlier one (its results have identifiers of their own)."""
        return self.db.execute("SELECT 1 FROM superseded WHERE key = ? LIMIT 1", (key,)).fetchone() is not None

    def unpublished(self) -> list[tuple[str, StudyRecord]]:
        rows = self.db.execute("SELECT key, record FROM studies WHERE published = 0 ORDER BY seq").fetchall()
        return [(k, StudyRecord.from_json(json.loads(r))) for k, r in rows]

    def count(self) -> int:
        return self.db.execute("SELECT COUNT(*) FROM studies").fetchone()[0]

    def superseded_count(self) -> int:
        return self.db.execute("SELECT COUNT(*) FROM superseded").fetchone()[0]

    # ------------------------------------------------------------------ writing
    def commit(self, studies: list[tuple[str, str, StudyRecord]], files: list[tuple[str, int, int, int, str, str]],
               outbound: Mapping[str, Sequence[tuple[str, str]]] | None = None,
               replaces: Mapping[str, str] | None = None) -> list[Outcome]:
        """In one transaction: studies (key, content sha256, record), handled files (path,
        size, mtime_ns, ctime_ns, key, outcome) and the result objects to send, ``outbound``: {key: [(uid,
        path) or :func:`outbound_entry`, ...]}, queued for the studies this commit records (not
        for those it keeps). ``replaces``: {key: key of a provisional error under another key
        that this study's record replaces} (the same file read while its copy was cut short: a
        PNG's key is its content, so the whole file has another key than its beginning had)."""
        now = time.time()
        outcomes = []
        with self.db:
            self.db.execute("BEGIN IMMEDIATE")
            seq = self.db.execute("SELECT COALESCE(MAX(seq), 0) FROM studies").fetchone()[0]
            for key, content, record in studies:
                old = self.known(key)
                if old is not None and old.status != "error" and not old.held and (record.status == "error"
                                                                                    or old.content == content):
                    # a result is never replaced by an error; a changed version that failed (a
                    # correction cut short) is said on the row that stands, or it looks current
                    annotated = record.status == "error" and old.content != content
                    if annotated:
                        self._note_unread_version(key, record.reason)
                    outcomes.append(Outcome(key, record, "kept", annotated))
                    continue
                withdrawn = (replaces or {}).get(key)
                if withdrawn is not None and self.db.execute("DELETE FROM studies WHERE key = ? AND status = 'error'",
                                                             (withdrawn,)).rowcount:
                    old = old or Known("error", "", record.file)  # published as a replaced row: results.csv rewritten
                if old is not None and old.status != "error" and not old.held:  # a held study had no result
                    self.db.execute("INSERT INTO superseded SELECT key, seq, file, content, record, reported_at, ? "
                                    "FROM studies WHERE key = ?", (now, key))
                seq += 1
                self.db.execute("INSERT OR REPLACE INTO studies VALUES (?, ?, ?, ?, ?, ?, ?, 0)",
                                (key, seq, stored_name(record.file), content, record.status, json.dumps(record.to_json()), now))
                outcomes.append(Outcome(key, record, "new" if old is None else "replaced"))
                for entry in (outbound or {}).get(key, ()):
                    self._queue(key, now, *entry)
            self.db.executemany("INSERT OR REPLACE INTO files (path, size, mtime_ns, ctime_ns, key, outcome, "
                                "handled_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
                                [(stored_name(f[0]), *f[1:], now) for f in files])
        return outcomes

    def content_grew(self, key: str, old: str, new: str) -> None:
        """``key``'s file grew after its result was made from its beginning (content ``old``):
        the result stands for the whole file's content, ``new``."""
        with self.db:
            self.db.execute("UPDATE studies SET content = ? WHERE key = ? AND content = ?", (new, key, old))

    def _note_unread_version(self, key: str, reason: str) -> None:
        """Note on ``key``'s standing result that a later version could not be read (to be
        published again: results.csv rewritten)."""
        (text,) = self.db.execute("SELECT record FROM studies WHERE key = ?", (key,)).fetchone()
        record = StudyRecord.from_json(json.loads(text))
        why = " ".join((reason or "unreadable").replace(";", ",").split())[:200]  # one note of the notes column
        # one such note, of the latest failure: a correction cut short at each resend added one each time
        record.patient.notes = [n for n in record.patient.notes if not n.startswith(UNREAD_VERSION)]
        record.add_note(f"{UNREAD_VERSION} ({why}), so this result is of the earlier version")
        self.db.execute("UPDATE studies SET record = ?, published = 0 WHERE key = ?",
                        (json.dumps(record.to_json()), key))

    def _queue(self, key: str, now: float, uid: str, path: str, channel: str = "dicom", destination: str = "",
               sha256: str = "") -> None:
        """Queue (or queue again, as new) the object ``uid`` on ``channel``."""
        self.db.execute("INSERT INTO outbound (uid, channel, key, path, queued_at, due_at, destination, sha256) "
                        "VALUES (?, ?, ?, ?, ?, ?, ?, ?) "
                        "ON CONFLICT (uid, channel) DO UPDATE SET key = excluded.key, path = excluded.path, "
                        "queued_at = excluded.queued_at, due_at = excluded.due_at, attempts = 0, "
                        "delivered_at = NULL, failed_at = NULL, dropped_at = NULL, destination = excluded.destination, "
                        "last_error = '', sha256 = excluded.sha256", (uid, channel, key, path, now, now, destination,
                                                                      sha256))

    def queue_outbound(self, items: Sequence[tuple[str, tuple[str, str, str, str, str]]]) -> int:
        """Queue ``items`` ((study key, :func:`outbound_entry`), ...) outside a study's commit
        (after a scan). An object already delivered from the same file to the same destination
        is not queued again: the same scan made twice sends nothing twice. Returns how many
        were queued."""
        now = time.time()
        queued = 0
        with self.db:
            self.db.execute("BEGIN IMMEDIATE")
            for key, (uid, path, channel, destination, sha256) in items:
                done = self.db.execute("SELECT 1 FROM outbound WHERE uid = ? AND channel = ? AND path = ? AND "
                                       "destination = ? AND delivered_at IS NOT NULL",
                                       (uid, channel, path, destination)).fetchone()
                if done is None:
                    self._queue(key, now, uid, path, channel, destination, sha256)
                    queued += 1
                elif sha256:  # its file written again (the same message, a new time stamp): resent as that
                    self.db.execute("UPDATE outbound SET sha256 = ? WHERE uid = ? AND channel = ?",
                                    (sha256, uid, channel))
        return queued

    def update_record(self, key: str, record: StudyRecord) -> None:
        """A study's record after its report was (re)made; order and status unchanged, its row
        to be published again (results.csv is rewritten at a start only when a row waits)."""
        with self.db:
            self.db.execute("UPDATE studies SET record = ?, published = 0 WHERE key = ?",
                            (json.dumps(record.to_json()), key))

    def mark_published(self, keys: list[str] | None = None, csv_stamp: str | None = None) -> None:
        """Rows now in results.csv: ``keys``, or every row (after a full rewrite); ``csv_stamp``:
        the file's :func:`results_stamp` once they are in it (:meth:`csv_current`); None: a file
        that cannot be told apart from another, so the next start rewrites it (a stamp of an
        earlier file kept would have every append taken for someone else's change)."""
        with self.db:
            if keys is None:
                self.db.execute("UPDATE studies SET published = 1 WHERE published = 0")
            else:
                self.db.executemany("UPDATE studies SET published = 1 WHERE key = ?", [(k,) for k in keys])
            if csv_stamp is not None:
                self.db.execute("INSERT OR REPLACE INTO meta VALUES ('results_csv', ?)", (csv_stamp,))
            else:
                self.db.execute("DELETE FROM meta WHERE name = 'results_csv'")

    def csv_stamp(self) -> str | None:
        """The :func:`results_stamp` of results.csv as this ledger last wrote it; None: unknown."""
        row = self.db.execute("SELECT value FROM meta WHERE name = 'results_csv'").fetchone()
        return None if row is None else row[0]

    def csv_current(self, csv_stamp: str | None) -> bool:
        """Whether results.csv, whose :func:`results_stamp` is ``csv_stamp`` now (None: there is
        none), is the file this ledger last wrote, every row in it: no row waits to be published
        (a kill between an append and its mark leaves one) and nobody (nor an older release)
        wrote it since."""
        return (csv_stamp is not None and self.csv_stamp() == csv_stamp
                and self.db.execute("SELECT 1 FROM studies WHERE published = 0 LIMIT 1").fetchone() is None)

    def import_rows(self, rows: list[tuple[str, str, StudyRecord]]) -> int:
        """Rebuild from results.csv after the ledger was lost: (key, content, record) rows,
        already published. Returns how many were imported."""
        now = time.time()
        with self.db:
            self.db.execute("BEGIN IMMEDIATE")
            seq = self.db.execute("SELECT COALESCE(MAX(seq), 0) FROM studies").fetchone()[0]
            for key, content, record in rows:
                seq += 1
                self.db.execute("INSERT OR IGNORE INTO studies VALUES (?, ?, ?, ?, ?, ?, ?, 1)",
                                (key, seq, stored_name(record.file), content, record.status, json.dumps(record.to_json()), now))
        return self.count()

    # ------------------------------------------------------------------ the outbound queue
    def due_outbound(self, now: float, limit: int = 32, channel: str = "dicom") -> list[OutboundItem]:
        """Waiting objects of ``channel`` due at ``now`` (epoch seconds), the longest-due first;
        none while the channel waits (:meth:`outbound_hold`)."""
        held = self.outbound_held(channel)
        if held is not None and held[0] > now:
            return []
        rows = self.db.execute("SELECT uid, key, path, attempts, channel, destination, sha256 FROM outbound "
                               f"WHERE {_WAITING} "
                               "AND channel = ? AND due_at <= ? ORDER BY due_at, queued_at, rowid LIMIT ?",
                               (channel, now, limit)).fetchall()
        return [OutboundItem(*row) for row in rows]

    def next_due(self, channel: str) -> float | None:
        """When the next waiting object of ``channel`` is due (epoch seconds), the channel's wait
        included; None: none waits."""
        due = self.db.execute(f"SELECT MIN(due_at) FROM outbound WHERE {_WAITING} AND channel = ?",
                              (channel,)).fetchone()[0]
        held = self.outbound_held(channel)
        return due if due is None or held is None else max(due, held[0])

    def outbound_hold(self, channel: str, until: float, reason: str) -> None:
        """The sender of ``channel`` tries nothing before ``until`` (epoch seconds): its back-off
        after a failed try, or the wait a receiver asked for; ``reason`` says which."""
        with self.db:
            self.db.execute("INSERT OR REPLACE INTO outbound_hold VALUES (?, ?, ?)", (channel, until, reason))

    def outbound_held(self, channel: str) -> tuple[float, str] | None:
        """(until, reason) of ``channel``'s wait (:meth:`outbound_hold`), ended or not; None: none."""
        row = self.db.execute("SELECT held_until, reason FROM outbound_hold WHERE channel = ?", (channel,)).fetchone()
        return tuple(row) if row is not None else None

    def outbound_rewritten(self, uid: str, channel: str, sha256: str) -> None:
        """The queued file of ``uid`` written again (the same message, made anew): its digest."""
        with self.db:
            self.db.execute("UPDATE outbound SET sha256 = ? WHERE uid = ? AND channel = ?", (sha256, uid, channel))

    def outbound_delivered(self, uid: str, destination: str, channel: str = "dicom") -> None:
        """The receiver stored ``uid``: done, and the channel's wait, if any, is over."""
        with self.db:
            self.db.execute("UPDATE outbound SET delivered_at = ?, destination = ?, attempts = attempts + 1, "
                            "last_error = '' WHERE uid = ? AND channel = ?", (time.time(), destination, uid, channel))
            self.db.execute("DELETE FROM outbound_hold WHERE channel = ?", (channel,))

    def outbound_retry(self, uid: str, due_at: float, error: str, channel: str = "dicom") -> None:
        """A try that failed for a passing reason (peer down or busy): due again at ``due_at``."""
        with self.db:
            self.db.execute("UPDATE outbound SET due_at = ?, attempts = attempts + 1, last_error = ? "
                            "WHERE uid = ? AND channel = ?", (due_at, error, uid, channel))

    def outbound_link_down(self, uid: str, due_at: float, error: str, channel: str = "dicom") -> None:
        """A try that never reached the receiver (no connection): every waiting object of
        ``channel`` is due at ``due_at`` at the earliest, so they go again in the order they were
        queued (the one tried does not go to the back of the queue)."""
        with self.db:
            self.db.execute("UPDATE outbound SET attempts = attempts + 1, last_error = ? WHERE uid = ? AND channel = ?",
                            (error, uid, channel))
            self.db.execute(f"UPDATE outbound SET due_at = MAX(due_at, ?) WHERE {_WAITING} AND channel = ?",
                            (due_at, channel))

    def outbound_refused(self, uid: str, destination: str, error: str, due_at: float, channel: str = "dicom") -> None:
        """The peer refused the object (or its file cannot be read): it waits, with the reason,
        and is offered again at ``due_at`` (or when an operator says so, or drops it)."""
        with self.db:
            self.db.execute("UPDATE outbound SET failed_at = ?, due_at = ?, destination = ?, attempts = attempts + 1, "
                            "last_error = ? WHERE uid = ? AND channel = ?",
                            (time.time(), due_at, destination, error, uid, channel))

    def outbound_clock_back(self, seconds: float, channel: str = "dicom") -> int:
        """The system clock went back ``seconds``: the waiting objects of ``channel`` are due and
        queued that much earlier, so each keeps the wait it had (and the queue its order) instead
        of waiting out the clock's jump too. Returns how many."""
        with self.db:
            self.db.execute("UPDATE outbound_hold SET held_until = held_until - ? WHERE channel = ?", (seconds, channel))
            return self.db.execute(f"UPDATE outbound SET due_at = due_at - ?, queued_at = queued_at - ? "
                                   f"WHERE {_WAITING} AND channel = ?", (seconds, seconds, channel)).rowcount

    def outbound_due_by(self, latest: float, channel: str = "dicom") -> int:
        """Waiting objects of ``channel`` due after ``latest`` (epoch seconds) are due then:
        a due time further ahead than any wait can only come from a clock that ran ahead."""
        with self.db:
            self.db.execute("UPDATE outbound_hold SET held_until = ? WHERE channel = ? AND held_until > ?",
                            (latest, channel, latest))
            return self.db.execute(f"UPDATE outbound SET due_at = ? WHERE {_WAITING} AND channel = ? AND due_at > ?",
                                   (latest, channel, latest)).rowcount

    def outbound_stats(self, now: float, channel: str | None = "dicom") -> dict:
        """For status.json: waiting objects of ``channel`` (None: every channel), the oldest
        one's age in seconds, how many of them failed at least one try and how many the peer
        refused, the commonest reasons they wait (at most three), and how many were delivered
        or dropped by an operator."""
        where, args = ("", ()) if channel is None else (" AND channel = ?", (channel,))
        waiting, oldest, retried, refused = self.db.execute(
            f"SELECT COUNT(*), MIN(queued_at), COALESCE(SUM(attempts > 0), 0), "
            f"COALESCE(SUM(failed_at IS NOT NULL), 0) FROM outbound WHERE {_WAITING}{where}", args).fetchone()
        delivered, dropped = self.db.execute(
            "SELECT COALESCE(SUM(delivered_at IS NOT NULL), 0), COALESCE(SUM(dropped_at IS NOT NULL), 0) FROM outbound "
            f"WHERE 1{where}", args).fetchone()
        reasons = self.db.execute(
            f"SELECT SUBSTR(last_error, 1, 120) AS reason, COUNT(*) AS n FROM outbound WHERE {_WAITING}{where} "
            "AND last_error != '' GROUP BY reason ORDER BY n DESC, reason LIMIT 3", args).fetchall()
        return {"queued": waiting, "oldest_queued_s": round(now - oldest, 1) if oldest is not None else 0.0,
                "retrying": retried, "refused": refused, "delivered": delivered, "dropped": dropped,
                "waiting_because": dict(reasons)}

    def outbound_channels(self) -> list[str]:
        """The channels that have objects waiting."""
        return [c for (c,) in self.db.execute(f"SELECT DISTINCT channel FROM outbound WHERE {_WAITING} ORDER BY channel")]

    # ------------------------------------------------------------------ the outbound queue, by an operator
    def outbound_rows(self, everything: bool = False, channel: str | None = None) -> list[dict]:
        """The queue for ``cxr-batch outbound list``: waiting objects, oldest first; with
        ``everything`` the delivered and dropped ones too; of one ``channel`` or all. Each with
        its channel's wait (``held_until``, ``held_because``; None: none)."""
        conditions = ([] if everything else [_WAITING]) + ([] if channel is None else ["channel = ?"])
        where = f"WHERE {' AND '.join(conditions)}" if conditions else ""
        cursor = self.db.execute(f"SELECT {_OUTBOUND_COLUMNS}, sha256, held_until, reason AS held_because "
                                 f"FROM outbound LEFT JOIN outbound_hold USING (channel) {where} "
                                 "ORDER BY queued_at, uid, channel",
                                 () if channel is None else (channel,))
        names = [d[0] for d in cursor.description]
        return [dict(zip(names, row)) for row in cursor.fetchall()]

    def outbound_send_now(self, uids: Sequence[str] | None = None, channel: str | None = None) -> int:
        """Due now: every waiting object (``uids`` None), or the objects named, whatever their
        state (a dropped one is queued again; a delivered one is sent again); of one
        ``channel`` or all. The running sender sees :meth:`outbound_nudge` change and stops any
        back-off. Returns how many."""
        now = time.time()
        where, args = ("", ()) if channel is None else (" AND channel = ?", (channel,))
        with self.db:
            self.db.execute(f"DELETE FROM outbound_hold WHERE 1{where}", args)  # the channels' waits end too
            if uids is None:
                n = self.db.execute(f"UPDATE outbound SET due_at = ? WHERE {_WAITING}{where}", (now, *args)).rowcount
            else:
                n = sum(self.db.execute("UPDATE outbound SET due_at = ?, delivered_at = NULL, dropped_at = NULL "
                                        f"WHERE uid = ?{where}", (now, uid, *args)).rowcount for uid in uids)
            self.db.execute("INSERT OR REPLACE INTO meta VALUES ('outbound_nudge', ?)", (repr(now),))
        return n

    def outbound_drop(self, uids: Sequence[str], channel: str | None = None) -> int:
        """The waiting objects named are not sent (until an operator queues them again)."""
        now = time.time()
        where, args = ("", ()) if channel is None else (" AND channel = ?", (channel,))
        with self.db:
            return sum(self.db.execute(f"UPDATE outbound SET dropped_at = ? WHERE uid = ? AND {_WAITING}{where}",
                                       (now, uid, *args)).rowcount for uid in uids)

    def outbound_nudge(self) -> str | None:
        """The mark of the operator's last ask to send now (None: never): one that differs from a
        mark read earlier is an ask since, whatever the clock did (set back after a failure, an
        ask at an earlier wall-clock time than the failure was missed)."""
        row = self.db.execute("SELECT value FROM meta WHERE name = 'outbound_nudge'").fetchone()
        return None if row is None else str(row[0])

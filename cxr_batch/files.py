"""Writing output files safely: atomically, and readable only by the owner and their group.

Results, reports, the ledger, run.json and status.json carry patient identifiers: files are
created 0640 and folders 0750 whatever the process umask (the CLI also sets umask 027 so files
made by libraries, e.g. SQLite's -wal and -shm, follow). Run the service under a group that the
radiologists' tools share.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

FILE_MODE = 0o640  # owner read/write, group read, others nothing
DIR_MODE = 0o750
PRIVATE_UMASK = 0o027


def private_dir(path: Path) -> Path:
    """Create ``path`` (and missing parents) as a 0750 folder; an existing folder made by this
    program is tightened to 0750, one made by someone else is left as it is."""
    path = Path(path)
    missing = []
    p = path
    while not p.exists():
        missing.append(p)
        p = p.parent
    path.mkdir(parents=True, exist_ok=True)
    for p in missing:
        os.chmod(p, DIR_MODE)
    return path


def file_in_the_way(path: Path) -> Path | None:
    """The nearest existing path above ``path`` when it is a file, not a folder (``--out
    a-file/new``: nothing could be made there), else None."""
    existing = next((p for p in Path(path).parents if p.exists()), None)
    return existing if existing is not None and not existing.is_dir() else None


def append_whole(fd: int, data: bytes) -> None:
    """Append ``data`` to the file open at ``fd`` and flush it to disk, whole or not at all: a
    nearly full disk takes part of a write and refuses the rest, so on any failure the file is
    cut back to where it ended (never half a row or a line) and the OSError raised."""
    end = os.lseek(fd, 0, os.SEEK_END)
    view = memoryview(data)
    try:
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    except OSError:
        try:
            os.ftruncate(fd, end)
        except OSError:
            pass
        raise


def atomic_write_bytes(path: Path, data: bytes, mode: int = FILE_MODE) -> None:
    """Write ``data`` to ``path`` via a temp file in the same folder, fsync and a rename: a
    reader sees the old file or the new one, never half of one."""
    atomic_write_files({Path(path): data}, mode)


def atomic_write_files(files: dict[Path, bytes], mode: int = FILE_MODE) -> None:
    """Write each ``{path: data}`` via a temp file beside it, and rename them into place only
    once every one is whole on disk: files that describe one run together (monitor.json and
    monitor.pdf) are all new or all as they were, never a new one beside an old one, when the
    disk fills up or the folder cannot be written. An OSError names the file it met (a write's
    own carries no name: "error: : No space left on device")."""
    temps: dict[Path, str] = {}
    try:
        for path, data in files.items():
            path = Path(path)
            fd, temps[path] = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
            try:
                with os.fdopen(fd, "wb") as f:
                    f.write(data)
                    f.flush()
                    os.fsync(f.fileno())
                os.chmod(temps[path], mode)
            except OSError as e:
                if not e.filename:
                    e.filename = str(path)
                raise
        # the old files kept under a second name (a hard link, no copy) until every rename is done: a
        # later rename refused (a share refuses to replace a file open in a viewer) puts back the ones
        # already renamed, not a new monitor.pdf beside the last run's monitor.json
        olds: dict[Path, str | None] = {}  # None: there was no old file
        try:
            for path in temps if len(temps) > 1 else ():
                olds[path] = None
                if path.exists():
                    olds[path] = f"{temps[path]}.old.tmp"  # ends .tmp: a killed run's is removed as stale
                    try:
                        os.link(path, olds[path])
                    except OSError:  # no hard links here (vfat, some shares): written as before, no way back
                        olds[path] = ""
            renamed = []
            try:
                for path, tmp in temps.items():
                    os.replace(tmp, path)
                    renamed.append(path)
            except BaseException:
                for path in renamed:
                    if olds.get(path) is None:
                        path.unlink(missing_ok=True)
                    elif olds[path]:
                        os.replace(olds[path], path)
                raise
        finally:
            for old in olds.values():
                if old:
                    Path(old).unlink(missing_ok=True)
    except BaseException:
        for tmp in temps.values():
            Path(tmp).unlink(missing_ok=True)
        raise


def remove_stale_temp(*folders: Path) -> int:
    """Remove our temp files (``.<name>.<random>.tmp``, as :func:`atomic_write_bytes` and the
    results writer make them) that a killed run left in ``folders``: never left where users
    look, never mistaken for results. Call it only while holding the folder's lock (a running
    writer's temp file is not stale). Returns how many were removed."""
    removed = 0
    for folder in folders:
        if not Path(folder).is_dir():
            continue
        for p in Path(folder).iterdir():
            if p.name.startswith(".") and p.name.endswith(".tmp") and p.is_file():
                p.unlink(missing_ok=True)
                removed += 1
    return removed

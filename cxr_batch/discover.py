"""Finding study files under a folder: every regular file, in a deterministic order.

Files are recognised later by their content, not their names, so PACS exports without
extensions (patient/study/series/instance) are found. What cannot be a study is reported
as a problem on its candidate (symlink loops, unreadable folders, a folder named ``x.dcm``
is simply a folder and is walked), never raised.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

# Names that are never studies: our own temporary files and those of PACS/transfer tools.
TEMP_SUFFIXES = (".part", ".tmp", ".partial", ".crdownload", ".filepart", ".swp")


@dataclass(frozen=True)
class Candidate:
    path: Path  # absolute path to read
    rel: str  # path relative to the scanned folder, as shown in results (POSIX separators)
    problem: str | None = None  # set when the entry cannot be read at all


def is_ignored_name(name: str) -> bool:
    """Hidden files and in-progress temporary files are not studies (yet)."""
    return name.startswith(".") or name.lower().endswith(TEMP_SUFFIXES)


def find_candidates(root: Path, exclude: list[Path] = ()) -> list[Candidate]:
    """All files under ``root`` that may be studies, sorted by relative path.

    JSON files that are sidecars of a same-stem file beside them are left out (they are read
    with their image); ``exclude`` folders (e.g. the results folder inside the scanned one)
    are not walked.
    """
    root = Path(root)
    excluded = {os.path.realpath(p) for p in exclude}
    found: list[Candidate] = []
    seen_dirs: set[tuple[int, int]] = set()

    def rel(p: Path) -> str:
        return p.relative_to(root).as_posix()

    def walk(folder: Path) -> None:
        try:
            st = folder.stat()
        except OSError as e:
            found.append(Candidate(folder, rel(folder), f"folder cannot be read: {e.strerror or e}"))
            return
        key = (st.st_dev, st.st_ino)
        if key in seen_dirs:
            found.append(Candidate(folder, rel(folder), "symbolic link loop (folder already scanned): not followed"))
            return
        seen_dirs.add(key)
        if os.path.realpath(folder) in excluded:
            return
        try:
            entries = sorted(os.scandir(folder), key=lambda e: e.name)
        except OSError as e:
            found.append(Candidate(folder, rel(folder), f"folder cannot be listed: {e.strerror or e}"))
            return
        stems = {Path(e.name).stem for e in entries if not e.name.lower().endswith(".json")}
        for entry in entries:
            path = Path(entry.path)
            if is_ignored_name(entry.name):
                continue
            try:
                if entry.is_dir(follow_symlinks=True):
                    walk(path)
                    continue
                if not entry.is_file(follow_symlinks=True):
                    if entry.is_symlink() and not path.exists():
                        found.append(Candidate(path, rel(path), "broken symbolic link"))
                    elif not entry.is_symlink():
                        found.append(Candidate(path, rel(path), "not a regular file (device, pipe or socket)"))
                    continue
            except OSError as e:  # ELOOP for a link pointing at itself, EACCES, ...
                found.append(Candidate(path, rel(path), f"cannot be opened: {e.strerror or e}"))
                continue
            if entry.name.lower().endswith(".json") and Path(entry.name).stem in stems:
                continue  # a sidecar: read together with its image
            found.append(Candidate(path, rel(path)))

    walk(root)
    return sorted(found, key=lambda c: c.rel)

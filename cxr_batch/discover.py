"""Finding study files under a folder: every regular file, in a deterministic order.

Files are recognised later by their content, not their names, so PACS exports without
extensions (patient/study/series/instance) are found. What cannot be a study is reported
as a problem on its candidate (symlink loops, unreadable folders, a folder named ``x.dcm``
is simply a folder and is walked), never raised.
"""

from __future__ import annotations

import errno
import os
from dataclasses import dataclass
from pathlib import Path

# Names that are never studies: our own temporary files and those of PACS/transfer tools.
TEMP_SUFFIXES = (".part", ".tmp", ".partial", ".crdownload", ".filepart", ".swp")


@dataclass(frozen=True)
class Candidate:
    path: Path  # absolute path to read
    rel: str  # path relative to the scanned folder, as shown in results (POSIX separators)
    problem: str | None = None  # set when the entry is not read: the reason for its row
    problem_status: str = "error"  # "skipped" when not reading it is a policy, not a failure
    identity: tuple[int, int] | None = None  # (st_dev, st_ino) when listed: the reader checks it is still that file
    stamp: tuple[int, int] | None = None  # (st_size, st_mtime_ns) when listed: changed since, it is another version


def is_ignored_name(name: str) -> bool:
    """Hidden files and in-progress temporary files are not studies (yet)."""
    return name.startswith(".") or name.lower().endswith(TEMP_SUFFIXES)


def find_candidates(root: Path, exclude: list[Path] = (), follow_links: bool = False) -> list[Candidate]:
    """All files under ``root`` that may be studies, sorted by relative path.

    JSON files that are sidecars of a same-stem file beside them are left out (they are read
    with their image); ``exclude`` folders (e.g. the results folder inside the scanned one)
    are not walked. Link policy: a symbolic link whose target lies outside ``root`` is not
    followed unless ``follow_links`` (its row says so: a link to ``/etc`` must not turn a scan
    into a scan of the system); a file reached twice (through links) is read once; anything
    that is not a regular file (a FIFO, a device, a socket) gets a row and is never opened.
    """
    root = Path(root)
    real_root = os.path.realpath(root)
    excluded = {os.path.realpath(p) for p in exclude}
    found: list[Candidate] = []
    seen_dirs: set[tuple[int, int]] = set()
    files: dict[tuple[int, int], list[tuple[bool, str, Path]]] = {}  # inode -> (through a link, rel, path)
    stamps: dict[tuple[int, int], tuple[int, int]] = {}  # inode -> (size, mtime_ns)

    def rel(p: Path) -> str:
        return p.relative_to(root).as_posix()

    def leaves_root(path: Path) -> bool:
        return leaves_folder(path, real_root)

    def walk(folder: Path, via_link: bool = False) -> None:
        try:
            st = folder.stat()
        except OSError as e:
            found.append(Candidate(folder, rel(folder), f"folder cannot be read: {e.strerror or e}"))
            return
        key = (st.st_dev, st.st_ino)
        if key in seen_dirs:
            found.append(Candidate(folder, rel(folder), "symbolic link loop (folder already scanned): not followed",
                                   "skipped"))
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
                if entry.is_symlink():
                    if not path.exists():
                        found.append(Candidate(path, rel(path), link_problem(path)))
                        continue
                    if leaves_root(path) and not follow_links:
                        found.append(Candidate(path, rel(path), "symbolic link to outside the scanned folder: not "
                                               "followed (--follow-links allows it)", "skipped"))
                        continue
                if entry.is_dir(follow_symlinks=True):
                    walk(path, via_link or entry.is_symlink())
                    continue
                if not entry.is_file(follow_symlinks=True):
                    found.append(Candidate(path, rel(path), "not a regular file (a pipe, device or socket): not read"))
                    continue
                st = entry.stat(follow_symlinks=True)
            except OSError as e:  # ELOOP for a link pointing at itself, EACCES, ...
                found.append(Candidate(path, rel(path), f"cannot be opened: {e.strerror or e}"))
                continue
            if entry.name.lower().endswith(".json") and Path(entry.name).stem in stems:
                continue  # a sidecar: read together with its image
            files.setdefault((st.st_dev, st.st_ino), []).append((via_link or entry.is_symlink(), rel(path), path))
            stamps[(st.st_dev, st.st_ino)] = (st.st_size, st.st_mtime_ns)

    walk(root)
    for identity, names in files.items():
        # a file reached again through a symbolic link is read once, under its own name if it
        # has one; hard links are separate entries and all read
        names.sort()
        first = names[0][1]
        for linked, name, path in names:
            if linked and name != first:
                found.append(Candidate(path, name, f"the same file as {first} (through a link): read once",
                                       "skipped"))
            else:
                found.append(Candidate(path, name, identity=identity, stamp=stamps[identity]))
    return sorted(found, key=lambda c: c.rel)


def leaves_folder(path: Path, real_root: str) -> bool:
    """Whether ``path``, links followed, lies outside the folder whose resolved path is
    ``real_root`` (the link policy of :func:`find_candidates`)."""
    target = os.path.realpath(path)
    return not (target == real_root or target.startswith(real_root.rstrip("/") + "/"))


def link_problem(path: Path) -> str:
    """Why a symbolic link leads nowhere: a loop of links, or a target that is missing."""
    try:
        os.stat(path)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            return "symbolic link loop (the links point at each other): not read"
    return "broken symbolic link (its target does not exist)"

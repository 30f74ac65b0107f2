"""Outputs never mix with inputs: one check for every command that reads one folder and writes another.

A results folder that is the scanned folder, lies inside it or contains it mixes what is read
with what is written: a scan reads its own reports as studies (or excludes the whole folder and
finds nothing), a watch daemon sees each append to results.csv as a new study and never stops,
a calibrated bundle written into the studies would be scanned next time. Every command refuses
such a pair before any work (before the model loads, before a folder is made), naming both
folders and a place that works.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from .config import ConfigError


class FolderOverlap(ConfigError):
    """An output folder that is, contains or lies inside an input folder (a usage error, exit 2)."""


def _relation(output: Path, source: Path) -> str | None:
    if output == source:
        return "is"
    if source in output.parents:
        return "lies inside"
    if output in source.parents:
        return "contains"
    return None


def _relation_by_identity(output: Path, source: Path) -> str | None:
    """:func:`_relation` by (device, inode): the input folder mounted again at another path
    (``mount --bind``) is the same folder, which no comparison of paths sees. ``output`` may
    not exist yet: its nearest existing folder is compared."""
    try:
        folder = source.stat()
    except OSError:
        return None
    for candidate in (output, *output.parents):
        try:
            if os.path.samestat(candidate.stat(), folder):
                return "is" if candidate == output else "lies inside"
        except OSError:
            continue
    try:
        out = output.stat()
    except OSError:
        return None
    for candidate in source.parents:
        try:
            if os.path.samestat(candidate.stat(), out):
                return "contains"
        except OSError:
            continue
    return None


def _place(path: Path) -> tuple[int, str] | None:
    """(device, path inside its file system) of an existing folder, from /proc/self/mountinfo:
    the same by any mount of it (``mount --bind`` of it or of a folder above it); None where
    that is not known (no mountinfo, a device it does not name, as btrfs subvolumes)."""
    try:
        st = path.stat()
        lines = Path("/proc/self/mountinfo").read_text().splitlines()
    except (OSError, ValueError):
        return None
    text = str(path)
    found = None
    for line in lines:  # the last, longest mount point the path lies under: the one it is on
        f = line.split()
        if len(f) < 5:
            continue
        root, point = (re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), x) for x in (f[3], f[4]))
        if (text == point or text.startswith(point.rstrip("/") + "/")) and (found is None or len(point) >= len(found[1])):
            found = (f[2], point, root)
    if found is None:
        return None
    major, _, minor = found[0].partition(":")
    if (os.major(st.st_dev), os.minor(st.st_dev)) != (int(major), int(minor)):
        return None
    rel = os.path.relpath(text, found[1])
    return st.st_dev, os.path.normpath(os.path.join(found[2], "" if rel == "." else rel))


def _relation_by_mount(output: Path, source: Path) -> str | None:
    """:func:`_relation` by place in the file system: an output on a mount of a folder inside
    the input (or of one above it) is not seen by walking up its path. ``output`` may not exist
    yet: its nearest existing folder is compared."""
    src = _place(source)
    if src is None:
        return None
    for candidate in (output, *output.parents):
        if candidate.exists():
            place = _place(candidate)
            break
    else:
        return None
    if place is None or place[0] != src[0]:
        return None

    def same(a: Path, b: Path) -> bool:  # confirmed on the folders (a share's mounts may not say their root)
        try:
            return os.path.samestat(a.stat(), b.stat())
        except OSError:
            return False

    if place[1] == src[1] or place[1].startswith(src[1].rstrip("/") + "/"):
        if same(source / os.path.relpath(place[1], src[1]), candidate):
            return "is" if candidate == output and place[1] == src[1] else "lies inside"
    elif candidate == output and src[1].startswith(place[1].rstrip("/") + "/"):
        if same(output / os.path.relpath(src[1], place[1]), source):
            return "contains"
    return None


def refuse_overlap(output: Path | str | None, inputs: dict[str, Path | str | None], option: str = "--out") -> None:
    """Raise :class:`FolderOverlap` when ``output`` is, lies inside or contains any folder of
    ``inputs`` ({what the folder is, e.g. "the scanned folder": path}; None entries are
    skipped). Paths are compared resolved (symbolic links and ``..`` followed), so a link to
    the input folder is the input folder; ``output`` need not exist yet (None: not given)."""
    if output is None:
        return
    out = Path(output).resolve()
    for what, source in inputs.items():
        if source is None:
            continue
        folder = Path(source).resolve()
        relation = _relation(out, folder)
        if relation is None and (relation := (_relation_by_identity(out, folder)
                                              or _relation_by_mount(out, folder))) is not None:
            relation += " (through another mount point of it)"
        if relation is None:
            continue
        beside = folder.parent / f"{folder.name}-results"  # a sibling of the input is always apart from it
        raise FolderOverlap(f"{option} {out} {relation} {what} {folder}: results and inputs must be kept apart "
                            f"(what is written would be read again as input, or the input hidden with the "
                            f"results); choose a folder outside it, e.g. {option} {beside}")


def refuse_out_in_state(out: Path) -> None:
    """``--out`` inside a results folder's ``.cxr-batch`` (its ledger, its spool): a node's
    spool would take our results for received objects. ConfigError (exit 2), before any work."""
    from .journal import STATE_DIR

    resolved = Path(out).resolve()
    for folder in (resolved, *resolved.parents):
        if folder.name == STATE_DIR:
            raise ConfigError(f"--out {out} lies inside {folder}, the state folder (ledger, spool) of the results "
                              f"folder {folder.parent}: what is written there would be read as received objects; "
                              f"choose a folder outside it, e.g. --out "
                              f"{folder.parent.parent / (folder.parent.name + '-' + resolved.name)}")

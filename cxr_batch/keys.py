"""A study's identity for the watch daemon: its key and the hash of the file's content.

The key is the SOPInstanceUID for DICOM (a re-sent copy of an instance is the same study),
else the sha256 of the content. It is read cheaply and within bounds: the file meta group or
the first 64 KiB of the data set, never a whole-file parse, and only after the size limit.
"""

from __future__ import annotations

import hashlib
import io
import os
from collections import defaultdict
from pathlib import Path

from .readers import open_regular, sniff
from .study import ScoringRules, clean_uid

HASH_CHUNK = 1 << 20
PIXEL_DATA = 0x7FE00010  # the last element a reader uses


def study_key(path: Path, rules: ScoringRules) -> tuple[str, str]:
    """(key, content sha256) of a file. Raises OSError when the file cannot be opened."""
    with open_regular(path) as f:
        size = os.fstat(f.fileno()).st_size
        head = f.read(1 << 16)
        if size > rules.max_file_bytes:
            # too large to be read at all: identified by its size and first bytes, not hashed whole
            digest = hashlib.sha256(head + str(size).encode()).hexdigest()
            return f"oversize:{digest}", digest
        uid = _dicom_uid(f, head)
        f.seek(len(head))
        h = hashlib.sha256(head)
        for chunk in iter(lambda: f.read(HASH_CHUNK), b""):
            h.update(chunk)
        content = h.hexdigest()
    return (f"uid:{uid}" if uid else f"sha256:{content}"), content


def content_sha256(path: Path, limit: int | None = None) -> str:
    """The sha256 of a regular file's whole content (what a resumed scan compares to know that
    a file is the one it scored), or of its first ``limit`` bytes (whether an earlier state of
    the file was its beginning). Raises OSError, or ReadError for a FIFO or device."""
    with open_regular(path) as f:
        h = hashlib.sha256()
        left = float("inf") if limit is None else limit
        while left > 0 and (chunk := f.read(int(min(HASH_CHUNK, left)))):
            h.update(chunk)
            left -= len(chunk)
    return h.hexdigest()


def reads_as_its_beginning(path: Path, size: int) -> bool:
    """Whether the DICOM file at ``path`` reads, whole, as its first ``size`` bytes did: the
    same elements up to and including the pixel data, the ones a reader uses. Bytes appended
    after the pixel data may be trailing padding or digital signatures, or a second Pixel Data
    or Patient ID: pydicom takes the last of two elements with one tag, so the grown file would
    show another image of another patient than its beginning did. Parses the file twice (within
    the size limit); only a scored file that grew is looked at. Raises OSError."""
    import pydicom

    with open_regular(path) as f:
        data = f.read()
    try:
        whole, head = (pydicom.dcmread(io.BytesIO(b), force=True) for b in (data, data[:size]))
        used = [{t: ds[t] for t in ds.keys() if t <= PIXEL_DATA} for ds in (whole, head)]
        return used[0] == used[1]
    except Exception:  # unreadable whole: not the file that was scored
        return False


def instance_uid(path: Path, rules: ScoringRules) -> str:
    """The SOPInstanceUID of a DICOM file's data set, the one its SR's UID is derived from (the
    file meta group may name another), from its first 64 KiB; "" for a file without one (a PNG,
    a broken header, a file over the size limit). Raises OSError."""
    with open_regular(path) as f:
        if os.fstat(f.fileno()).st_size > rules.max_file_bytes:
            return ""
        head = f.read(1 << 16)
    return _dataset_uid(head) if _may_be_dicom(head) else ""


def uid_conflicts(candidates, rules: ScoringRules) -> dict[str, tuple[str, list[str], str]]:
    """{rel: (uid, the other files' rels, its content sha256)} for every candidate whose
    SOPInstanceUID another candidate with other content claims too. Their SRs, derived from the
    UID alone, would share one UID and a PACS keeps only the first it is sent, perhaps of the
    other image: the scan gives each its own (cxr_batch.sr.sr_uids' revision: the content) and
    says which file is the instance is for a person to decide. The same bytes under two names
    are left alone (one image, one result). Reads 64 KiB of each file; only files that share a
    UID are hashed whole."""
    by_uid = defaultdict(list)
    for cand in candidates:
        if cand.problem is None:
            try:
                uid = instance_uid(cand.path, rules)
            except Exception:  # unreadable: its own row says why when it is read
                continue
            if uid:
                by_uid[uid].append(cand.rel)
    paths = {c.rel: c.path for c in candidates}
    conflicts = {}
    for uid, group in by_uid.items():
        if len(group) < 2:
            continue
        digests = {rel: _sha256_or_none(paths[rel]) for rel in group}
        if len(set(digests.values())) > 1:
            conflicts.update((rel, (uid, [r for r in group if r != rel], digests[rel] or "")) for rel in group)
    return conflicts


def _sha256_or_none(path: Path) -> str | None:
    try:
        return content_sha256(path)
    except Exception:  # unreadable now: not known to be the same image
        return None


def _dicom_uid(f, head: bytes) -> str:
    if not _may_be_dicom(head):
        return ""
    if sniff(head[:132]) == "dicom":
        from . import dicom  # pydicom only for what may be DICOM

        meta, _ = dicom.read_file_meta(f)
        uid = clean_uid(meta.get("MediaStorageSOPInstanceUID", ""))
        if uid:
            return uid
    return _dataset_uid(head)


def _may_be_dicom(head: bytes) -> bool:
    """A DICOM preamble, or a first element of group 0002/0008 (a file without preamble)."""
    kind = sniff(head[:132])
    return kind == "dicom" or (kind not in ("png", "jpeg") and len(head) >= 8 and head[1] == 0
                               and head[0] in (0x02, 0x08) and head[3] == 0)


def _dataset_uid(head: bytes) -> str:
    try:
        import pydicom

        ds = pydicom.dcmread(io.BytesIO(head), force=True, stop_before_pixels=True, specific_tags=["SOPInstanceUID"])
        return clean_uid(ds.get("SOPInstanceUID", "") or "")
    except Exception:  # a header cut at 64 KiB or a broken one: keyed by content instead
        return ""

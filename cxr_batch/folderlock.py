"""One writer per results folder: an exclusive lock (flock) held while scan or watch writes it.

A second daemon (or a scan into the same folder) would score everything twice and race on
results.csv; it stops at once instead, naming the process that holds the folder. The lock is
released by the kernel when the holder exits, however it exits (SIGKILL included). A forked
child (a decoding worker) does not keep it: the workers of a process killed with SIGKILL can
outlive it, and while they held the folder every later run was refused, naming the dead process.
"""

from __future__ import annotations

import fcntl
import os
import weakref
from pathlib import Path

LOCK_NAME = ".cxr-batch.lock"


# The locks this process holds, and whether forked children are told to let go of them.
_HELD: "weakref.WeakSet[FolderLock]" = weakref.WeakSet()
_at_fork = False


def _let_go_in_child() -> None:
    """In a forked child: close its copies of the lock files. The lock belongs to the open
    file, which the parent keeps open, so the parent still holds it; the child no longer does."""
    for lock in list(_HELD):
        if lock._fd is not None:
            try:
                os.close(lock._fd)
            except OSError:
                pass
            lock._fd = None
    _HELD.clear()


def _hold(lock: "FolderLock") -> None:
    """Record a lock taken, so that forked children let go of it."""
    global _at_fork
    if not _at_fork:
        os.register_at_fork(after_in_child=_let_go_in_child)
        _at_fork = True
    _HELD.add(lock)


class FolderBusy(Exception):
    """Another process writes to this results folder."""


class FolderLock:
    def __init__(self, folder: Path, what: str, advice: str = "stop it first, or choose another --out"):
        """``advice``: what to do when another process holds the folder, for the message."""
        self.path = Path(folder) / LOCK_NAME
        self.what = what
        self.advice = advice
        self._fd: int | None = None

    def acquire(self) -> "FolderLock":
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o640)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._busy(fd)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"cxr-batch {self.what} (PID {os.getpid()})\n".encode(), 0)
        self._fd = fd
        _hold(self)
        return self

    def check_free(self) -> None:
        """Raise FolderBusy, as :meth:`acquire` would, when another process holds the folder;
        nothing is made or written (the folder may not be there yet). For a check that must come
        before another one: the DICOM node's port, which a second node on the same
        configuration found taken and named no holder."""
        try:
            fd = os.open(self.path, os.O_RDONLY)
        except OSError:
            return  # no lock file, or none this process can open: acquire says so later
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            self._busy(fd)
        os.close(fd)

    def _busy(self, fd: int) -> None:
        holder = os.pread(fd, 200, 0).decode("utf-8", "replace").strip() or "an unknown process"
        os.close(fd)
        raise FolderBusy(f"{self.path.parent} is in use by {holder}; one cxr-batch process writes a results "
                         f"folder at a time ({self.advice})") from None

    def held_folder(self) -> tuple[int, int] | None:
        """(device, inode) of the folder holding the lock file this lock is on (it may have been
        moved since), None when the file is gone or no lock is held."""
        if self._fd is None:
            return None
        try:
            held = os.fstat(self._fd)
            st = os.stat(self.path)
        except OSError:
            return None
        if (st.st_dev, st.st_ino) != (held.st_dev, held.st_ino):
            return None  # the lock file at the path is another one: this lock is not on that folder
        folder = os.stat(self.path.parent)
        return folder.st_dev, folder.st_ino

    def release(self) -> None:
        _HELD.discard(self)
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> "FolderLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


# Where the claims on watched folders are kept: shared by every user and service of the host
# (/tmp may be a service's own, systemd's PrivateTmp), on every Linux. Not in the folder, which
# may be read-only, nor on it: an open descriptor of the folder kept the share mounted there
# busy (``umount``: "target is busy") for as long as the daemon ran.
CLAIM_DIR = Path("/dev/shm")


def _sole_holder(fd: int) -> str:
    """Who holds a claim file alone ("" when daemons share it, or it names no one): only a
    daemon that moves files out holds it alone, and it writes its name there; the names left by
    earlier holders are stale while others share it."""
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return os.pread(fd, 200, 0).decode("utf-8", "replace").strip()
    except OSError:
        return ""
    fcntl.flock(fd, fcntl.LOCK_UN)
    return ""


class WatchedFolderClaim(FolderLock):
    """A watch daemon's claim on the folder it watches: shared by daemons that leave its files
    in place, exclusive for one that moves them out (``--archive-dir``, ``--quarantine-dir``).
    Two daemons on one export folder (a second results site, a new model run in the shadow of
    the old) are fine while both only read it; beside one that archives what it scored, the
    other silently got only the studies not yet moved away. The lock is on a file of
    :data:`CLAIM_DIR` named by the folder's device and inode (the same folder by any path or
    mount of it on this host); never removed (another daemon may hold it open). Not checked
    where that file cannot be made or opened, or the folder is not there yet."""

    def __init__(self, folder: Path, moves: bool, claim_dir: Path = CLAIM_DIR, what: str = "watch"):
        """``what``: the command, written in the claim by a daemon that moves files out (it holds
        it alone), so that a daemon refused beside it names it."""
        self.path = Path(folder)
        self.moves = moves
        self.claim_dir = claim_dir
        self.what = what
        self._fd = None

    def acquire(self) -> "WatchedFolderClaim":
        try:
            st = os.stat(self.path)
            name = self.claim_dir / f"cxr-batch-watch-{st.st_dev:x}-{st.st_ino:x}.lock"
            try:  # readable by all: a daemon of another user locks the same file
                fd = os.open(name, os.O_RDWR | os.O_CREAT, 0o644)
                if os.fstat(fd).st_uid == os.getuid():
                    os.fchmod(fd, 0o644)  # past a umask of 077
            except PermissionError:  # another user's (or protected_regular): read, all flock needs
                fd = os.open(name, os.O_RDONLY)
        except OSError:
            return self
        try:
            fcntl.flock(fd, (fcntl.LOCK_EX if self.moves else fcntl.LOCK_SH) | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _sole_holder(fd)
            os.close(fd)
            if holder.startswith(("cxr-batch listen", "cxr-batch pull")):  # a node's spool
                raise FolderBusy(f"{self.path} is the spool of {holder}, which deletes each object once it is "
                                 f"scored: another daemon there would score the node's studies while they are "
                                 f"deleted under it; read the node's results instead") from None
            if self.moves:
                raise FolderBusy(f"another cxr-batch daemon{f' ({holder})' if holder else ''} watches {self.path}: "
                                 f"this one would move the files it scored out of it (--archive-dir, "
                                 f"--quarantine-dir), and the other would never see them; stop it first, or leave "
                                 f"the files in place") from None
            raise FolderBusy(f"another cxr-batch daemon{f' ({holder})' if holder else ''} watches {self.path} and "
                             f"moves the files it scored out of it (--archive-dir, --quarantine-dir): this one would "
                             f"get only the studies not yet moved away; stop it first, or run it without those "
                             f"options") from None
        except OSError:
            os.close(fd)
            return self
        if self.moves:
            try:
                os.ftruncate(fd, 0)
                os.pwrite(fd, f"cxr-batch {self.what} (PID {os.getpid()})\n".encode(), 0)
            except OSError:
                pass  # another user's claim file, opened read-only: held, not named
        self._fd = fd
        _hold(self)
        return self

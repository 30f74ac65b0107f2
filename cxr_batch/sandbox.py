"""Reading studies in worker processes with a memory ceiling and a time limit.

Decoders are C code fed by files from outside: a codestream that lies about its size, a
decompression bomb or a decoder bug can ask for gigabytes or never return. Every file is
therefore read (decoded, windowed, patient data merged) in a worker process whose address
space is capped (RLIMIT_AS); a worker that runs out of memory fails that one study, one that
crashes or overruns the time limit is replaced, and the study that did it gets an error row.
The service itself never holds more than one image's decoding at a time per worker.

Workers are forked from a small server process that imported only the readers (not torch),
so the ceiling applies to what decoding allocates, and a worker costs about 70 MB resident.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import resource
import signal
import threading
import time
from collections import deque
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from concurrent.futures.process import BrokenProcessPool
from multiprocessing import resource_tracker
from dataclasses import dataclass
from typing import Iterable, Iterator

from .assemble import AssembledStudy, assemble_study
from .config import bounded
from .discover import Candidate
from .metadata import MetadataRow
from .record import StudyRecord
from .study import ScoringRules

log = logging.getLogger("cxr_batch")


@dataclass(frozen=True)
class ReadLimits:
    """What one file may cost to read."""

    memory_mb: int = bounded(1024, min=128)  # address space reading one file may add to a worker
    seconds: float = bounded(120.0, gt=0.0)  # wall time for one file


def _address_space() -> int:
    """This process's mapped address space in bytes (VmSize)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmSize:"):
                    return int(line.split()[1]) << 10
    except OSError:
        pass
    return 0


def _worker_init(memory_bytes: int, owner: int) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides when to stop
    # The ceiling counts from what the worker already maps (its interpreter and readers), so
    # memory_mb is what reading one file may add.
    limit = _address_space() + memory_bytes
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    threading.Thread(target=_follow, args=(owner,), daemon=True, name="cxr-follow").start()


def _follow(owner: int) -> None:
    """End this worker, and the fork server it came from, when the process that owns them is
    gone: a scan or daemon killed with SIGKILL runs no clean-up, and multiprocessing's fork
    server outlives its client then, with its workers."""
    while True:
        time.sleep(1.0)
        try:
            os.kill(owner, 0)
        except ProcessLookupError:
            server = os.getppid()
            if server != 1:
                try:
                    os.kill(server, signal.SIGKILL)
                except OSError:
                    pass
            os._exit(0)
        except PermissionError:  # a pid reused by another user's process: the owner is gone too
            os._exit(0)


def _read(cand: Candidate, rules: ScoringRules, row: MetadataRow | None, min_side: int = 0) -> AssembledStudy:
    return assemble_study(cand, rules, {cand.path.name: row} if row is not None else None, min_side)


def _failed(cand: Candidate, reason: str) -> AssembledStudy:
    return AssembledStudy(StudyRecord(file=cand.rel, status="error", reason=reason))


class StudyReader:
    """Reads candidates into :class:`AssembledStudy` objects, in order, ``workers`` at a time.

    ``workers = 0`` reads in this process (no memory ceiling: for tests and debugging).
    Use as a context manager; :meth:`read` yields one study per candidate, in order, while up
    to ``ahead`` further candidates are read in the background.
    """

    def __init__(self, workers: int, rules: ScoringRules, limits: ReadLimits = ReadLimits()):
        self.workers, self.rules, self.limits = workers, rules, limits
        self.metadata: dict[str, MetadataRow] | None = None
        self.min_side = 0
        self._pool: ProcessPoolExecutor | None = None
        self.replaced = 0  # workers replaced after a crash or a time-out

    def __enter__(self) -> "StudyReader":
        if self.workers > 0:
            self._start()
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None

    def _start(self) -> None:
        ctx = multiprocessing.get_context("forkserver")
        ctx.set_forkserver_preload(["cxr_batch.assemble"])
        # A Ctrl-C goes to the terminal's whole process group: one that reached the fork server
        # while it started (before it ignores SIGINT) or a worker before _worker_init killed it,
        # and the scan died of "unexpected EOF" (exit 1) instead of stopping. They are started
        # with SIGINT blocked, which they keep (the mask is inherited through fork and exec);
        # a Ctrl-C meanwhile waits and reaches this process's handler once they are started.
        # The resource tracker first: starting, it unblocks SIGINT in this process.
        resource_tracker.ensure_running()
        previous = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
        try:
            self._pool = ProcessPoolExecutor(self.workers, mp_context=ctx, initializer=_worker_init,
                                             initargs=(self.limits.memory_mb << 20, os.getpid()))
            # workers start on the first task: start them now, while the caller loads the model
            for _ in range(self.workers):
                self._pool.submit(int)
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, previous)

    def _restart(self) -> None:
        """Kill every worker (one may be stuck) and start a fresh pool."""
        if self._pool is not None:
            for proc in list(getattr(self._pool, "_processes", {}).values()):
                proc.kill()
            self._pool.shutdown(wait=True, cancel_futures=True)
        self.replaced += 1
        self._start()

    def _submit(self, cand: Candidate) -> Future:
        row = self.metadata.get(cand.path.name) if self.metadata else None
        try:
            return self._pool.submit(_read, cand, self.rules, row, self.min_side)
        except BrokenProcessPool:
            # A worker died while the pool waited (the OOM killer, an operator's kill): no file is
            # to blame. Unrestarted, every later study of a daemon got an error row, for ever.
            log.warning("a reading worker had ended while it waited (killed?): the readers are started again")
            self._restart()
            return self._pool.submit(_read, cand, self.rules, row, self.min_side)

    def read_one(self, cand: Candidate, min_side: int = 0) -> AssembledStudy:
        """One candidate's study (nothing else in flight)."""
        studies = self.read([cand], min_side=min_side)
        try:
            return next(studies)
        finally:
            studies.close()

    def read(self, candidates: Iterable[Candidate], ahead: int = 32, metadata: dict[str, MetadataRow] | None = None,
             min_side: int = 0) -> Iterator[AssembledStudy]:
        """The candidates' studies in order; ``metadata``: rows of the metadata table by file name;
        ``min_side``: the short side the model needs (images may come back that small)."""
        self.metadata, self.min_side = metadata, min_side
        if self.workers == 0:
            for cand in candidates:
                yield _read(cand, self.rules, self.metadata.get(cand.path.name) if self.metadata else None, min_side)
            return
        todo = iter(candidates)
        flight: deque[tuple[Candidate, Future]] = deque()

        def fill():
            while len(flight) < max(1, ahead):
                cand = next(todo, None)
                if cand is None:
                    return
                flight.append((cand, self._submit(cand)))

        fill()
        while flight:
            cand, future = flight.popleft()
            yield self._result(cand, future, flight)
            fill()

    def _result(self, cand: Candidate, future: Future, flight: deque) -> AssembledStudy:
        try:
            return future.result(timeout=self.limits.seconds)
        except FutureTimeout:
            log.warning("a file took over %.0f s to read: its worker was stopped", self.limits.seconds)
            self._restart()
            study = _failed(cand, f"reading took longer than {self.limits.seconds:.0f} s: stopped")
        except BrokenProcessPool:
            # A worker died (a decoder crash, or killed for memory): which file did it is not
            # known, so this one is read again alone before it is blamed.
            self._restart()
            study = self._alone(cand)
        self._resubmit(flight)
        return study

    def _alone(self, cand: Candidate) -> AssembledStudy:
        try:
            return self._submit(cand).result(timeout=self.limits.seconds)
        except FutureTimeout:
            self._restart()
            return _failed(cand, f"reading took longer than {self.limits.seconds:.0f} s: stopped")
        except BrokenProcessPool:
            log.warning("a file crashed its reading worker: it gets an error row")
            self._restart()
            return _failed(cand, f"decoding failed within the memory limit of {self.limits.memory_mb} MB "
                                 "(the decoder crashed or ran out of memory)")

    def _resubmit(self, flight: deque) -> None:
        """After a restart the files that were in flight in the old pool are read again (those
        already read keep their result)."""
        pending = list(flight)
        flight.clear()
        for cand, old in pending:
            finished = old.done() and not old.cancelled() and old.exception() is None
            flight.append((cand, old if finished else self._submit(cand)))

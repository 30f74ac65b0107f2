"""Sending the results back: the DICOM node's outbound queue, drained by a thread of its own.

The queue lives in the ledger (``outbound``, cxr_batch.ledger): objects are queued in the
transaction that commits their study, so they survive any crash. :class:`Sender` C-STOREs the
due ones to the destination one at a time (cxr_batch.integration.dicom_send) and records each answer:

- stored: marked delivered, never sent again;
- a passing failure (peer down, busy, out of resources, a timeout): the link backs off
  exponentially (1 s doubling up to ``retry_max``) before the next try, and that object goes
  to the back of the queue, so one object the peer keeps refusing "for now" cannot hold up the
  others;
- a final refusal (the peer does not store that kind of object, or rejects the object), or an
  object file that is gone or unreadable: marked failed, not tried again; status.json counts it.

A crash between the peer's answer and the mark sends that object again at the next start: its
SOPInstanceUID is derived from source and model, so the peer replaces it rather than adding a
copy. Sending runs beside scoring: a slow or silent PACS never delays a study's results.
"""

from __future__ import annotations

import logging
import sqlite3
import ssl
import threading
import time
from pathlib import Path

from .dicom_send import Destination, SendResult, send_dataset
from ..ledger import Ledger, OutboundItem

log = logging.getLogger("cxr_batch")
IDLE_WAIT = 5.0  # seconds between looks at the queue when nothing woke the sender


class Sender:
    """Drains the outbound queue of the ledger at ``ledger_path`` to ``destination``.

    ``results_dir``: the folder the queued paths are relative to; ``calling_ae``: our AE title;
    ``timeout``: seconds each network step may take; ``retry_max``: the longest back-off;
    ``tls``: a client TLS context for the destination, or None for plain DICOM."""

    def __init__(self, ledger_path: Path, results_dir: Path, destination: Destination, *, calling_ae: str,
                 timeout: float, retry_max: float, tls: ssl.SSLContext | None = None):
        self.ledger_path, self.results_dir, self.destination = Path(ledger_path), Path(results_dir), destination
        self.calling_ae, self.timeout, self.retry_max, self.tls = calling_ae, timeout, retry_max, tls
        self.halt, self.wakeup = threading.Event(), threading.Event()
        self.link_failures = 0  # consecutive passing failures: the back-off's exponent
        self.last_error = ""
        self.thread: threading.Thread | None = None

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> "Sender":
        self.thread = threading.Thread(target=self._run, name="cxr-batch-sender", daemon=True)
        self.thread.start()
        return self

    def wake(self) -> None:
        """Objects were queued: look at the queue now rather than at the next idle tick."""
        self.wakeup.set()

    def stop(self, timeout: float | None = None) -> None:
        """Finish the object being sent (bounded by the network timeouts) and end the thread."""
        self.halt.set()
        self.wakeup.set()
        if self.thread is not None:
            self.thread.join(timeout if timeout is not None else 4 * self.timeout + 5)

    def status(self) -> dict:
        return {"destination": str(self.destination), "tls": self.tls is not None,
                "peer": "unreachable" if self.link_failures else "ok",
                "last_error": self.last_error[:200]}

    # ------------------------------------------------------------------ the loop
    def _run(self) -> None:
        ledger = None
        while not self.halt.is_set():
            try:
                if ledger is None:
                    ledger = Ledger(self.ledger_path)  # SQLite connections belong to one thread: its own
                if not self.send_due(ledger):
                    self.wakeup.wait(IDLE_WAIT)
                    self.wakeup.clear()
            except (sqlite3.Error, OSError) as e:  # the ledger cannot be written now (disk full): later
                self.last_error = f"outbound queue not updated: {type(e).__name__}: {e}"
                log.error("%s; retrying", self.last_error)
                self.halt.wait(min(self.retry_max, 10.0))
            except Exception as e:  # a bug must not end sending for good
                self.last_error = f"unexpected {type(e).__name__}: {e}"
                log.error("sender: %s", self.last_error, exc_info=log.isEnabledFor(logging.DEBUG))
                self.halt.wait(min(self.retry_max, 10.0))
        if ledger is not None:
            ledger.close()

    def send_due(self, ledger: Ledger) -> bool:
        """Send the due objects; returns whether there were any. After a passing failure it
        waits out the back-off (or a stop) and returns, so the queue is read afresh."""
        items = ledger.due_outbound(time.time())
        for item in items:
            if self.halt.is_set():
                break
            result = self.send_one(item)
            if result.ok:
                ledger.outbound_delivered(item.uid, str(self.destination))
                if self.link_failures:
                    log.info("%s answers again: sending the queue", self.destination)
                self.link_failures, self.last_error = 0, ""
                log.info("sent %s to %s", item.uid, self.destination)
            elif result.transient:
                self.link_failures += 1
                delay = min(self.retry_max, 2.0 ** (self.link_failures - 1))
                self.last_error = result.reason
                ledger.outbound_retry(item.uid, time.time() + delay, result.reason)
                self.halt.wait(delay)
                return True
            else:
                self.last_error = result.reason
                ledger.outbound_failed(item.uid, str(self.destination), result.reason)
                log.error("%s refused by %s for good: %s", item.uid, self.destination, result.reason)
        return bool(items)

    def send_one(self, item: OutboundItem) -> SendResult:
        path = self.results_dir / item.path
        if not path.is_file():
            return SendResult(False, reason=f"object file {item.path} is missing")
        try:
            return send_dataset(path, self.destination, calling_ae=self.calling_ae, timeout=self.timeout,
                                tls=self.tls)
        except Exception as e:  # unreadable as DICOM: sending it again cannot help
            return SendResult(False, reason=f"object file {item.path} cannot be read: {type(e).__name__}")

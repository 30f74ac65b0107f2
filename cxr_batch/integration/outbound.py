"""Sending the results back: the DICOM node's outbound queue, drained by a thread of its own.

The queue lives in the ledger (``outbound``, cxr_batch.ledger): objects are queued in the
transaction that commits their study, so they survive any crash. :class:`Sender` C-STOREs the
due ones to the destination one at a time (cxr_batch.integration.dicom_send) and records each answer:

- stored: marked delivered, never sent again;
- a failure of the link (peer down, busy, out of resources, a timeout, the association
  rejected, even "permanently": a configuration the PACS's administrator can fix): the link
  backs off exponentially (1 s doubling up to ``retry_max``) before the next try, and that
  object goes to the back of the queue, so one object the peer keeps refusing "for now" cannot
  hold up the others;
- a refusal of the object (the peer does not store that kind of object, or answers a failure
  status), or an object file that is gone or unreadable: the object waits with the reason and is
  offered again after ``refused_retry`` seconds; the others go on.

Nothing is given up silently: an object leaves the queue only when the peer stored it or an
operator dropped it (``cxr-batch outbound list|retry|drop``, :func:`queue_lines`); status.json
counts the waiting ones and says why they wait. ``outbound retry`` also cuts a back-off short.

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
    ``tls``: a client TLS context for the destination, or None for plain DICOM;
    ``refused_retry``: seconds before an object the peer refused is offered again."""

    def __init__(self, ledger_path: Path, results_dir: Path, destination: Destination, *, calling_ae: str,
                 timeout: float, retry_max: float, tls: ssl.SSLContext | None = None, refused_retry: float = 900.0):
        self.ledger_path, self.results_dir, self.destination = Path(ledger_path), Path(results_dir), destination
        self.calling_ae, self.timeout, self.retry_max, self.tls = calling_ae, timeout, retry_max, tls
        self.refused_retry = refused_retry
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
        """Send the due objects; returns whether there were any. After a failure of the link it
        waits out the back-off (or a stop, or an operator's retry) and returns, so the queue is
        read afresh."""
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
            elif result.link:
                self.link_failures += 1
                delay = min(self.retry_max, 2.0 ** (self.link_failures - 1))
                self.last_error = result.reason
                failed_at = time.time()
                ledger.outbound_retry(item.uid, failed_at + delay, result.reason)
                self._back_off(ledger, delay, failed_at)
                return True
            else:
                self.last_error = result.reason
                ledger.outbound_refused(item.uid, str(self.destination), result.reason,
                                        time.time() + self.refused_retry)
                log.error("%s refused by %s: %s; it waits in the queue and is offered again in %.0f s "
                          "(cxr-batch outbound list|retry|drop)", item.uid, self.destination, result.reason,
                          self.refused_retry)
        return bool(items)

    def _back_off(self, ledger: Ledger, delay: float, since: float) -> None:
        """Wait ``delay`` seconds, less if we are stopped or an operator asks for a retry."""
        end = time.monotonic() + delay
        while (left := end - time.monotonic()) > 0 and not self.halt.is_set():
            if self.halt.wait(min(left, IDLE_WAIT)) or ledger.outbound_nudged(since):
                return

    def send_one(self, item: OutboundItem) -> SendResult:
        path = self.results_dir / item.path
        if not path.is_file():
            return SendResult(False, reason=f"object file {item.path} is missing")
        try:
            return send_dataset(path, self.destination, calling_ae=self.calling_ae, timeout=self.timeout,
                                tls=self.tls)
        except Exception as e:  # unreadable as DICOM: a refusal of the object (offered again slowly, or dropped)
            return SendResult(False, reason=f"object file {item.path} cannot be read: {type(e).__name__}")


def _ago(seconds: float) -> str:
    seconds = abs(seconds)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.0f}{unit}"
    return f"{seconds:.0f}s"


def queue_lines(rows: list[dict], now: float) -> list[str]:
    """``cxr-batch outbound list``: one line per object (Ledger.outbound_rows), its state, tries,
    next try, age, file and why it waits."""
    lines = [f"{'SOP INSTANCE UID':<44}  {'STATE':<9}  {'TRIES':>5}  {'NEXT TRY':<9}  {'QUEUED':<7}  FILE / LAST ERROR"]
    for r in rows:
        if r["delivered_at"] is not None:
            state, due = "delivered", "-"
        elif r["dropped_at"] is not None:
            state, due = "dropped", "-"
        else:
            state = "refused" if r["failed_at"] is not None else ("retrying" if r["attempts"] else "queued")
            due = "now" if r["due_at"] <= now else f"in {_ago(r['due_at'] - now)}"
        detail = r["path"] + (f"  ({r['last_error']})" if r["last_error"] else "")
        lines.append(f"{r['uid']:<44}  {state:<9}  {r['attempts']:>5}  {due:<9}  {_ago(now - r['queued_at']):<7}  "
                     f"{detail}")
    return lines

"""Sending the results: the outbound queue, drained by a thread of its own per channel.

The queue lives in the ledger (``outbound``, cxr_batch.ledger): objects are queued in the
transaction that commits their study, so they survive any crash. Each channel (C-STORE to the
PACS, :class:`DicomChannel`; HL7 to the RIS and STOW-RS to a DICOMweb archive,
cxr_batch.integration.outbox) has a :class:`Sender` that sends its due objects one at a time
and records each answer (a :class:`~.delivery.Delivery`):

- stored: marked delivered, never sent again;
- a failure of the link (peer down, busy, out of resources, a timeout, the association
  rejected, even "permanently": a configuration the PACS's administrator can fix; an HL7 ``AR``
  (the RIS down) or no ACK; an HTTP 5xx, 401 or 404): the link
  backs off exponentially (1 s doubling up to ``retry_max``) before the next try, and that
  object goes to the back of the queue, so one object the peer keeps refusing "for now" cannot
  hold up the others; but where the object never reached the peer (no connection, no
  association: a Delivery's ``unsent``) every waiting object waits out the back-off in its
  place, so after an outage the queue goes in the order it was queued (the oldest first); a
  receiver that says when to come back (an archive's HTTP 429/503 ``Retry-After``: a Delivery's
  ``retry_after``) has the whole channel wait that long instead, bounded by RETRY_AFTER_MAX;
- a refusal of the object (the peer does not store that kind of object, or answers a failure
  status; an HL7 ``AE`` or ``CR``; an HTTP 400/409/415), or an object file that is gone or unreadable:
  the object waits with the reason and is
  offered again after ``refused_retry`` seconds; the others go on.

A channel's wait (its back-off, or the receiver's Retry-After) is recorded in the ledger
(:meth:`~cxr_batch.ledger.Ledger.outbound_hold`): an object queued meanwhile waits it out too,
``outbound list`` says when the next try comes, and a sender started meanwhile keeps it.

Nothing is given up silently: an object leaves the queue only when the peer stored it or an
operator dropped it (``cxr-batch outbound list|retry|drop``, :func:`queue_lines`); status.json
counts the waiting ones and says why they wait. ``outbound retry`` also cuts a back-off short.

A crash between the peer's answer and the mark sends that object again at the next start: its
SOPInstanceUID is derived from source and model, so the peer replaces it rather than adding a
copy (an HL7 message keeps its MSH-10, so the RIS drops the duplicate). Sending runs beside
scoring: a slow or silent PACS never delays a study's results. Where no daemon runs (after a
scan, at the end of a pull), :meth:`Sender.drain` sends in the caller's thread until the
queue is empty or a deadline passes.
"""

from __future__ import annotations

import hashlib
import logging
import sqlite3
import ssl
import threading
import time
from pathlib import Path
from typing import Protocol

from .delivery import RETRY_AFTER_MAX, Delivery
from .dicom_send import CALLING_AE_TITLE, Destination, send_dataset
from ..ledger import Ledger, LedgerError, OutboundItem

log = logging.getLogger("cxr_batch")
ASKED_SHOWN_MAX = 1e9  # seconds (about 32 years): a longer Retry-After is said as "more than" this
IDLE_WAIT = 5.0  # seconds between looks at the queue when nothing woke the sender
DAMAGED = ".damaged"  # added to the name of an object file that is not whole: kept aside, never sent
MADE_AGAIN = "made again by watch/listen at their next start, or by the same scan with --resume"
CLOCK_STEP = 1.0  # the system clock set back more than this (against the monotonic clock) is a jump
ASKED_TO_WAIT = "the receiver asked to wait (Retry-After)"  # the reason of a channel's wait a receiver asked for


class Channel(Protocol):
    """Where one kind of result goes, and how: ``name`` is the queue's channel (cxr_batch.ledger
    CHANNELS), ``str()`` the receiver as logs and status.json name it."""

    name: str
    tls: bool

    def send(self, path: Path) -> Delivery: ...


class DicomChannel:
    """C-STORE to a PACS (cxr_batch.integration.dicom_send)."""

    name = "dicom"

    def __init__(self, destination: Destination, *, calling_ae: str = CALLING_AE_TITLE, timeout: float = 30.0,
                 tls: ssl.SSLContext | None = None):
        self.destination, self.calling_ae, self.timeout, self.tls_context = destination, calling_ae, timeout, tls

    @property
    def tls(self) -> bool:
        return self.tls_context is not None

    def __str__(self) -> str:
        return str(self.destination)

    def send(self, path: Path) -> Delivery:
        result = send_dataset(path, self.destination, calling_ae=self.calling_ae, timeout=self.timeout,
                              tls=self.tls_context)
        if result.ok:
            return Delivery.delivered(result.reason)
        logged = result.reason.removesuffix(result.said) if result.said else None  # the PACS's words: not logged
        return Delivery.retry(result.reason, result.unsent, logged) if result.link else \
            Delivery.rejected(result.reason, logged)


class Sender:
    """Drains the outbound queue of the ledger at ``ledger_path`` for one ``channel`` (a
    :class:`Channel`, or a Destination: C-STORE to it).

    ``results_dir``: the folder the queued paths are relative to; ``calling_ae``, ``timeout``,
    ``tls``: for a Destination, our AE title, seconds each network step may take, a client TLS
    context (None: plain DICOM); ``retry_max``: the longest back-off; ``refused_retry``: seconds
    before an object the peer refused is offered again."""

    def __init__(self, ledger_path: Path, results_dir: Path, channel: Channel | Destination, *,
                 calling_ae: str = CALLING_AE_TITLE, timeout: float = 30.0, retry_max: float,
                 tls: ssl.SSLContext | None = None, refused_retry: float = 900.0):
        if isinstance(channel, Destination):
            channel = DicomChannel(channel, calling_ae=calling_ae, timeout=timeout, tls=tls)
        self.ledger_path, self.results_dir, self.channel = Path(ledger_path), Path(results_dir), channel
        self.timeout, self.retry_max, self.refused_retry = timeout, retry_max, refused_retry
        self.halt, self.wakeup = threading.Event(), threading.Event()
        self.link_failures = 0  # consecutive passing failures: the back-off's exponent
        self.last_error = ""
        # delivered, but not yet recorded (the ledger could not be written: a full disk): never
        # sent again while it waits to be recorded, as the queue would have it
        self.unrecorded: set[str] = set()
        self.thread: threading.Thread | None = None
        self.clock_offset = time.time() - time.monotonic()  # wall clock less monotonic: changes when the clock is set

    @property
    def destination(self) -> Channel:
        return self.channel

    @property
    def tls(self) -> bool:
        return self.channel.tls

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> "Sender":
        self.thread = threading.Thread(target=self._run, name=f"cxr-batch-sender-{self.channel.name}", daemon=True)
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

    def status(self, ledger: Ledger) -> dict:
        """status.json's record of the channel. Its wait is read from ``ledger`` (a connection of
        the calling thread), the one the queue keeps: a wait kept here too went on being said
        after an operator's retry ended it, and a daemon restarted during a receiver's wait said
        none while it waited."""
        held = ledger.outbound_held(self.channel.name)
        asked = held is not None and held[1] == ASKED_TO_WAIT and held[0] > time.time()
        return {"destination": str(self.channel), "tls": self.tls,
                # an archive that asked to wait answered: said apart from one that cannot be reached
                "peer": "asked to wait (Retry-After)" if asked else "unreachable" if self.link_failures else "ok",
                "last_error": self.last_error[:200],
                **({"next_try_at": held[0]} if asked else {})}

    # ------------------------------------------------------------------ the loop
    def _run(self) -> None:
        ledger = None
        while not self.halt.is_set():
            try:
                if ledger is None:
                    ledger = Ledger(self.ledger_path)  # SQLite connections belong to one thread: its own
                if not self.send_due(ledger):
                    # until the next object is due (the queue waiting out a link's back-off), at most IDLE_WAIT
                    due = ledger.next_due(self.channel.name)
                    self.wakeup.wait(IDLE_WAIT if due is None else min(IDLE_WAIT, max(0.05, due - time.time())))
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

    def send_due(self, ledger: Ledger, until: float | None = None, *, sending_ends: bool = False) -> bool:
        """Send the due objects; returns whether there were any. After a failure of the link it
        waits out the back-off (or a stop, or an operator's retry, or ``until``, epoch
        seconds) and returns, so the queue is read afresh. ``sending_ends``: no object is begun
        after ``until`` either (:meth:`drain`)."""
        name, where = self.channel.name, str(self.channel)
        deadline = None if until is None else time.monotonic() + (until - time.time())  # a clock's jump aside
        asked = ledger.outbound_nudge()  # an operator's retry from now on ends a back-off
        for uid in sorted(self.unrecorded):  # raises while the ledger still cannot be written
            ledger.outbound_delivered(uid, where, name)
            self.unrecorded.discard(uid)
        self._follow_the_clock(ledger)
        items = ledger.due_outbound(time.time(), channel=name)
        for item in items:
            # draining, ``until`` bounds the sending too: a receiver answering each object just
            # inside the timeout kept a scan sending the whole queue (100 ORUs at 29 s: 48 minutes
            # for a send_wait of 60 s); what is left waits in the queue
            if self.halt.is_set() or sending_ends and deadline is not None and time.monotonic() >= deadline:
                break
            result = self.send_one(item)
            if result.ok:
                self.unrecorded.add(item.uid)
                ledger.outbound_delivered(item.uid, where, name)
                self.unrecorded.discard(item.uid)
                if self.link_failures:
                    log.info("%s answers again: sending the queue", where)
                self.link_failures, self.last_error = 0, ""
                log.info("sent %s to %s", item.uid, where)
            elif result.transient:
                self.link_failures += 1
                # the exponent bounded: 2.0 ** 1024 (17 hours down at a retry_max of 60 s) overflows
                delay = min(self.retry_max, 2.0 ** min(self.link_failures - 1, 62))
                if result.retry_after is not None:
                    delay = self._asked_wait(result.retry_after, delay)
                self.last_error = result.reason
                failed_at = time.time()
                # recorded: every object of the channel waits it out, one queued since too (and
                # status.json says until when)
                ledger.outbound_hold(name, failed_at + delay, ASKED_TO_WAIT
                                     if result.retry_after is not None else f"back-off after: {result.logged}")
                # the link is down, or the receiver said when to come back: the whole queue waits, in its order
                if result.unsent or result.retry_after is not None:
                    ledger.outbound_link_down(item.uid, failed_at + delay, result.reason, name)
                else:  # the receiver answered "not now" about this object: it goes to the back
                    ledger.outbound_retry(item.uid, failed_at + delay, result.reason, name)
                if deadline is not None:
                    delay = min(delay, max(0.0, deadline - time.monotonic()))
                self._back_off(ledger, delay, asked)
                return True
            else:
                self.last_error = result.reason
                ledger.outbound_refused(item.uid, where, result.reason, time.time() + self.refused_retry, name)
                log.error("%s refused by %s: %s; it waits in the queue and is offered again in %.0f s "
                          "(cxr-batch outbound list|retry|drop)", item.uid, where, result.logged,
                          self.refused_retry)
        return bool(items)

    def _asked_wait(self, asked: float, delay: float) -> float:
        """The back-off after a receiver asked to wait ``asked`` seconds (Retry-After): as long
        as asked, but at most RETRY_AFTER_MAX, and never shorter than the queue's own
        ``delay``. Said in the log, with what was asked."""
        granted = max(delay, min(asked, RETRY_AFTER_MAX))
        if asked > RETRY_AFTER_MAX:
            # a Retry-After of hundreds of digits reads as float infinity: said as a number
            said = f"{asked:.0f} s" if asked <= ASKED_SHOWN_MAX else f"more than {ASKED_SHOWN_MAX:.0f} s"
            log.warning("%s asked to wait %s (Retry-After), longer than the %.0f s cxr-batch waits at most: next "
                        "try in %.0f s", self.channel, said, RETRY_AFTER_MAX, granted)
        else:
            log.info("%s asked to wait %.0f s (Retry-After): next try in %.0f s", self.channel, asked, granted)
        return granted

    def drain(self, until: float, ledger: Ledger | None = None) -> None:
        """Send this channel's waiting objects in the calling thread, with the same back-off,
        until none waits or none is due before ``until`` (epoch seconds, read at the call: the
        wait lasts as long whatever the system clock does then). ``ledger``: a connection of
        this thread (default: one of its own)."""
        if ledger is None:
            try:
                ledger = Ledger(self.ledger_path)
                try:
                    return self.drain(until, ledger)
                finally:
                    ledger.close()
            except (LedgerError, sqlite3.Error, OSError) as e:  # a full disk: said, not a traceback from the thread
                self.last_error = f"outbound queue not updated: {e}"
                log.error("%s results not sent: %s", self.channel.name, self.last_error)
                return
        # the wait is measured on the monotonic clock: the system clock set back (NTP) while the
        # receiver is down kept a scan trying for as long as the clock went back (an hour: an hour)
        deadline = time.monotonic() + (until - time.time())
        while not self.halt.is_set() and (left := deadline - time.monotonic()) > 0:
            self.send_due(ledger, time.time() + left, sending_ends=True)
            due = ledger.next_due(self.channel.name)
            left = deadline - time.monotonic()
            # due times are of the wall clock (they outlive the process): how far ahead, now
            if due is None or due - time.time() >= left:
                return
            if due > time.time():
                self.halt.wait(min(due - time.time(), left))

    def _follow_the_clock(self, ledger: Ledger) -> None:
        """Due times are of the wall clock (they outlive the process): when it was set back (NTP
        correcting a clock that ran ahead, a VM resumed), the waiting objects are moved back by
        as much, or each would wait out the jump (hours, days) beyond its back-off; one due
        further ahead than any wait is due at the longest wait from now."""
        offset = time.time() - time.monotonic()
        back, self.clock_offset = self.clock_offset - offset, offset
        if back > CLOCK_STEP:
            n = ledger.outbound_clock_back(back, self.channel.name)  # the channel's wait too
            log.warning("the system clock went back %.0f s: the %d waiting %s object(s) keep their wait", back, n,
                        self.channel.name)
        # set back while no sender ran (a restart with the right time after a clock that ran
        # ahead): no wait is longer than the longest a sender sets
        longest = max(self.retry_max, self.refused_retry,
                      RETRY_AFTER_MAX if getattr(self.channel, "may_ask_to_wait", False) else 0.0) + CLOCK_STEP
        if ledger.outbound_due_by(time.time() + longest, self.channel.name):
            log.warning("waiting %s object(s) were due further ahead than any wait (the clock ran ahead): due within "
                        "%.0f s", self.channel.name, longest)

    def _back_off(self, ledger: Ledger, delay: float, asked: str | None) -> None:
        """Wait ``delay`` seconds, less if we are stopped or an operator asks for a retry (the
        ledger's :meth:`~Ledger.outbound_nudge` is no longer ``asked``)."""
        end = time.monotonic() + delay
        while (left := end - time.monotonic()) > 0 and not self.halt.is_set():
            if self.halt.wait(min(left, IDLE_WAIT)) or ledger.outbound_nudge() != asked:
                return

    def send_one(self, item: OutboundItem) -> Delivery:
        path = self.results_dir / item.path
        aside = path.with_name(path.name + DAMAGED)
        if not path.is_file():
            kept = f" (its damaged copy is kept as {aside.name}; {MADE_AGAIN})" if aside.is_file() else ""
            return Delivery.rejected(f"object file {item.path} is missing{kept}")
        try:
            if put_aside(path, item.uid, item.sha256) is not None:
                # never sent: a daemon makes the result's file again at its next start (as for a
                # missing one), under the same SOPInstanceUID or MSH-10
                what = "is not the message queued (its sha256 differs: cut short or changed)" if item.sha256 else \
                    "is cut short or damaged"
                return Delivery.rejected(f"object file {item.path} {what}: not sent, kept as {aside.name}; "
                                         f"{MADE_AGAIN}")
            return self.channel.send(path)
        except Exception as e:  # unreadable: a refusal of the object (offered again slowly, or dropped)
            return Delivery.rejected(f"object file {item.path} cannot be read: {type(e).__name__}")


def put_aside(path: Path, uid: str, sha256: str = "") -> Path | None:
    """The queued file of object ``uid`` at ``path`` moved to NAME.damaged when it is not whole
    (:func:`whole_object_file`): kept for the operator, never sent. Where it went; None when it
    is whole."""
    if whole_object_file(path, uid, sha256):
        return None
    aside = path.with_name(path.name + DAMAGED)
    path.replace(aside)
    return aside


def whole_object_file(path: Path, uid: str, sha256: str = "") -> bool:
    """Whether the queued file at ``path`` is a whole object: an ORU^R01 (MSH-10 ``uid``), an SR
    or an Encapsulated PDF; with ``sha256`` (recorded when it was queued) its bytes must be
    those: an ORU cut between two of its segments is an ORU still, with a whole last segment."""
    if sha256 and hashlib.sha256(path.read_bytes()).hexdigest() != sha256:
        return False
    if path.suffix == ".hl7":
        from .hl7 import whole_message

        try:
            return whole_message(path.read_bytes().decode("utf-8"), uid)
        except UnicodeDecodeError:
            return False
    return whole_dicom_file(path)


def whole_dicom_file(path: Path) -> bool:
    """Whether ``path`` holds a whole DICOM object of ours (SR or Encapsulated PDF). pydicom
    reads a file cut anywhere without a word (a value shorter than its length, a sequence never
    closed), and what it read would go to the PACS under the result's own SOPInstanceUID: the
    file must be what pydicom writes again from it, and hold the object's content."""
    import io
    import warnings

    import pydicom
    from pydicom.uid import EncapsulatedPDFStorage

    data = path.read_bytes()
    try:
        with warnings.catch_warnings():  # what a damaged file makes pydicom say is ours to say
            warnings.simplefilter("ignore")
            ds = pydicom.dcmread(io.BytesIO(data))
            again = io.BytesIO()
            ds.save_as(again, enforce_file_format=False)  # as it was read
    except Exception:
        return False
    content = "EncapsulatedDocument" if ds.get("SOPClassUID") == EncapsulatedPDFStorage else "ContentSequence"
    return again.getvalue() == data and content in ds


def _ago(seconds: float) -> str:
    seconds = abs(seconds)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.0f}{unit}"
    return f"{seconds:.0f}s"


def queue_lines(rows: list[dict], now: float) -> list[str]:
    """``cxr-batch outbound list``: one line per object (Ledger.outbound_rows), its state, tries,
    next try (the later of its own and its channel's wait: when the sender will try it), age,
    file and why it waits."""
    lines = [f"{'SOP INSTANCE UID / HL7 ID':<44}  {'CHANNEL':<7}  {'STATE':<9}  {'TRIES':>5}  {'NEXT TRY':<9}  "
             f"{'QUEUED':<7}  FILE / LAST ERROR"]
    for r in rows:
        held = False
        if r["delivered_at"] is not None:
            state, due = "delivered", "-"
        elif r["dropped_at"] is not None:
            state, due = "dropped", "-"
        else:
            state = "refused" if r["failed_at"] is not None else ("retrying" if r["attempts"] else "queued")
            held = r["held_until"] is not None and r["held_until"] > max(now, r["due_at"])
            next_try = r["held_until"] if held else r["due_at"]
            due = "now" if next_try <= now else f"in {_ago(next_try - now)}"
        detail = r["path"] + (f"  ({r['last_error']})" if r["last_error"] else "")
        if held:
            detail += f"  (the {r['channel']} channel waits: {r['held_because']})"
        lines.append(f"{r['uid']:<44}  {r['channel']:<7}  {state:<9}  {r['attempts']:>5}  {due:<9}  {_ago(now - r['queued_at']):<7}  "
                     f"{detail}")
    return lines

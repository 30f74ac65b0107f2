"""Sending a DICOM object to a peer by C-STORE (pynetdicom): the results going back to the PACS.

:func:`send_dataset` stores one object and reports what happened instead of raising: the
outbound queue (issue 14) decides from :class:`SendResult` whether to retry (the peer is down,
busy or out of resources: ``transient``) or to give up on that object (the peer refused it).
Timeouts bound every step, so a peer that accepts a connection and then says nothing costs
``timeout`` seconds, not a hung worker. Nothing about the patient is logged: the SOP Instance
UID and the peer only.
"""

from __future__ import annotations

import contextlib
import logging
import re
import socket
import ssl
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import pydicom
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian

from .delivery import HOST_PORT, connect_error, host_problem, shown

log = logging.getLogger("cxr_batch")

CALLING_AE_TITLE = "CXRBATCH"
_DESTINATION = re.compile(f"^(?P<ae>[^@]{{1,16}})@{HOST_PORT}$", re.ASCII)
# C-STORE statuses that mean "stored": success, and every warning (PS3.7 C.1: 0x0001 and 0xBxxx;
# PS3.4 B.2.3 names 0xB000, 0xB006, 0xB007, and PACSs add warning codes of their own).
_WARNINGS = {0x0001, *range(0xB000, 0xC000)}
# Failures that say "not now": out of resources (0xA7xx), resource limitation (0x0213, PS3.7
# C.5), processing failure (0x0110, as a STOW-RS failure reason); other failures refuse the object.
_TRANSIENT_FAILURES = {0x0110, 0x0213, *range(0xA700, 0xA800)}
# Not a C-STORE status, but answered by PACSs that refuse a second copy of a SOP Instance UID
# (PS3.7 C.4.11): the SR's UID is derived from source and model, so what they hold is this one.
DUPLICATE_SOP_INSTANCE = 0x0111


def tcp_no_delay(event) -> None:
    """An ``EVT_CONN_OPEN`` handler (either side of an association): TCP_NODELAY on its socket.
    A DIMSE message goes out as several small PDUs (command, then data set), and with Nagle's
    algorithm each waits for the peer's delayed ACK: a C-STORE on loopback took about 50 ms
    instead of 13 (measured against cxr-batch listen's own SCP)."""
    try:
        event.assoc.dul.socket.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except (AttributeError, OSError):  # no socket any more, or not TCP: nothing to tune
        pass


def check_ae_title(title: str) -> str:
    """An AE title as PS3.5 allows it (1-16 characters of the default repertoire, no
    backslash, not only spaces), stripped; ValueError otherwise."""
    stripped = title.strip()
    if not 0 < len(title) <= 16 or not stripped or "\\" in title or not (title.isascii() and title.isprintable()):
        raise ValueError(f"the AE title {title!r} must be 1-16 printable ASCII characters without '\\'")
    return stripped


@dataclass(frozen=True)
class Destination:
    """A peer to store to: AE title, host and port (``AE@HOST:PORT``; ``AE@[::1]:104``)."""

    ae_title: str
    host: str
    port: int

    @classmethod
    def parse(cls, text: str) -> "Destination":
        """``AE@HOST:PORT`` -> Destination; ValueError naming what is wrong."""
        m = _DESTINATION.match(text.strip())
        if m is None:
            raise ValueError(f"{text!r}: expected AE@HOST:PORT, e.g. PACS@pacs.example.org:104")
        ae_title, port = m["ae"].strip(), int(m["port"])
        try:
            check_ae_title(ae_title)
        except ValueError as e:
            raise ValueError(f"{text!r}: {e}") from None
        if not 1 <= port <= 65535:
            raise ValueError(f"{text!r}: port {port} is not 1-65535")
        if problem := host_problem(m["host"].strip("[]")):
            raise ValueError(f"{text!r}: {problem}")
        return cls(ae_title, m["host"].strip("[]"), port)

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.ae_title}@{host}:{self.port}"


@dataclass(frozen=True)
class SendResult:
    ok: bool  # the peer stored it (success or a warning status)
    status: int | None = None  # the C-STORE status, when the peer answered one
    reason: str = ""  # why not, for the log and the queue; when ok, a warning or "already stored" (else empty)
    transient: bool = False  # worth retrying later: network, timeout, busy or out of resources
    link: bool = False  # about the association, not this object: every object would fail alike now
    unsent: bool = False  # no association: the object never reached the peer
    said: str = ""  # the end of ``reason`` that is the peer's own words (an Error Comment): not logged


def failure_is_transient(status: int) -> bool:
    """Out of resources, a resource limitation, a processing failure: try again later;
    refusals of the object itself are final (a C-STORE status, or a STOW-RS Failure Reason,
    which is one)."""
    return status in _TRANSIENT_FAILURES


# What pynetdicom logs (at ERROR, from its association threads) when a request fails: pull's
# connect() and send_dataset turn every such failure into one line of ours, which they repeat
ASSOCIATION_FAILURE_LINES = ("Association request failed", "TCP Initialisation Error", "Association Rejected",
                             "Result: ", "Reason: ", "Association Aborted")


class _AssociationFailures(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.name.startswith("pynetdicom") and str(record.msg).startswith(ASSOCIATION_FAILURE_LINES))


@contextlib.contextmanager
def association_failures_said_by_us():
    """pynetdicom's own lines about a failed association request are not printed while it is
    made (--debug, the library at DEBUG, keeps them)."""
    if logging.getLogger("pynetdicom").isEnabledFor(logging.DEBUG):
        yield
        return
    quiet, handlers = _AssociationFailures(), list(logging.getLogger().handlers)
    for handler in handlers:
        handler.addFilter(quiet)
    try:
        yield
    finally:
        for handler in handlers:
            handler.removeFilter(quiet)


def send_dataset(dataset: Dataset | str | Path, destination: Destination, *, calling_ae: str = CALLING_AE_TITLE,
                 timeout: float = 30.0, tls: ssl.SSLContext | None = None) -> SendResult:
    """C-STORE ``dataset`` (a Dataset with file meta, or a DICOM file's path) to
    ``destination``, over TLS with ``tls`` (the peer's certificate checked against the
    context's CAs and the destination's host name); never raises for network, peer or
    association failures."""
    from pynetdicom import AE, evt  # imported only where results are sent

    # A peer's text with an escape byte that names no character set (a PACS's Error Comment:
    # its words may hold anything) makes pydicom warn on the user's stderr, from pynetdicom's
    # thread as it decodes the response; the text is still read (ISO 8859) and shown escaped.
    # (Adding the same filter again replaces it: the list does not grow.)
    warnings.filterwarnings("ignore", message="Found unknown escape sequence", category=UserWarning)
    if not isinstance(dataset, Dataset):
        dataset = pydicom.dcmread(dataset)
    uid = str(dataset.get("SOPInstanceUID", ""))
    ae = AE(ae_title=calling_ae)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = ae.connection_timeout = timeout
    # Both uncompressed syntaxes: pynetdicom converts between them, so any peer that stores this
    # SOP class at all can take the object.
    ae.add_requested_context(dataset.SOPClassUID, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
    try:
        with association_failures_said_by_us():
            assoc = ae.associate(destination.host, destination.port, ae_title=destination.ae_title,
                                 tls_args=(tls, destination.host) if tls is not None else None,
                                 evt_handlers=[(evt.EVT_CONN_OPEN, tcp_no_delay)])
    except Exception as e:  # a bad host name, an unreachable network
        return _failed(uid, destination, f"cannot connect: {connect_error(e, destination.host)}", transient=True, unsent=True)
    if not assoc.is_established:
        if assoc.is_rejected:
            rsp = assoc.acceptor.primitive
            return _failed(uid, destination, f"association rejected ({rsp.result_str}, {rsp.reason_str})",
                           transient=rsp.result == 0x02, link=True, unsent=True)
        # no answer, refused connection, or no presentation context accepted for this SOP class
        sop_class = pydicom.uid.UID(str(dataset.SOPClassUID))  # named: older PACSs lack Comprehensive 3D SR
        named = sop_class if sop_class.name == sop_class else f"{sop_class.name} ({sop_class})"
        what = f"no presentation context accepted: the peer does not store {named}" \
            if assoc.is_aborted and assoc.rejected_contexts else "no association (peer down, unreachable or not answering)"
        return _failed(uid, destination, what, transient=not assoc.rejected_contexts, unsent=True)
    started = time.monotonic()
    try:
        answer = assoc.send_c_store(dataset)
    except Exception as e:  # a dataset pynetdicom cannot encode
        assoc.abort()
        return _failed(uid, destination, f"C-STORE not sent: {type(e).__name__}: {e}", transient=False)
    status = int(answer.Status) if "Status" in answer else None
    if assoc.is_established:
        assoc.release()
    if status is None and time.monotonic() - started < 0.9 * timeout:
        # no answer, and not for want of time: the PACS ended the association (an A-ABORT, or the
        # connection closed before pynetdicom read one). Orthanc answers so a store from an AE title
        # it does not know (its log: "Rejected Store request"): the fix is in its configuration
        return _failed(uid, destination, f"the PACS aborted the association instead of answering our C-STORE: "
                       f"it may not accept objects from our AE title {calling_ae!r} at this address; add us to its "
                       f"DICOM nodes (Orthanc: DicomModalities, or DicomAlwaysAllowStore) and see its log", transient=True)
    if status is None:  # no response within the timeout, or the association was aborted
        return _failed(uid, destination, "no C-STORE response", transient=True)
    note = "" if status == 0x0000 else f"warning 0x{status:04X}" if status in _WARNINGS else \
        f"status 0x{status:04X}: already stored" if status == DUPLICATE_SOP_INSTANCE else None
    if note is None:
        # the PACS's own words (dcm4chee: "Patient ID mismatch") for the queue and `outbound
        # list`, not the log: like an ACK's MSA-3 they may quote the patient
        comment = str(answer.get("ErrorComment", "") or "").strip()
        return _failed(uid, destination, f"C-STORE failed with status 0x{status:04X}",
                       transient=failure_is_transient(status), status=status,
                       said=f" ({shown(comment, 200)})" if comment else "")
    log.debug("sent %s to %s (status 0x%04X)", uid, destination, status)
    return SendResult(True, status, note)


def _failed(uid: str, destination: Destination, reason: str, transient: bool, status: int | None = None,
            link: bool = False, unsent: bool = False, said: str = "") -> SendResult:
    """``said``: the peer's words, added to the reason but not logged."""
    log.warning("not sent %s to %s: %s", uid, destination, reason)
    return SendResult(False, status, reason + said, transient, link or transient, unsent, said)

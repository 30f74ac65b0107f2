"""What became of one result sent to a receiver (RIS over HL7, archive over DICOMweb).

The outbound queue decides from a :class:`Delivery` alone: ``delivered`` is done, ``retry``
goes back to the queue with back-off (the receiver is down, slow, busy, or said "try again"),
``rejected`` is a final refusal of that result (resending the same bytes cannot help). ``ok``
and ``transient`` read as in :class:`cxr_batch.integration.dicom_send.SendResult`, so the queue
treats C-STORE, HL7 and STOW-RS alike.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass
from typing import Literal

from ..display import visible

Outcome = Literal["delivered", "retry", "rejected"]
# HOST:PORT of a receiver (RIS, PACS): an IPv6 address in brackets or a host name of ASCII letters,
# digits, . _ - (and the port's digits ASCII too, with re.ASCII: \d alone takes any script's digits)
HOST_PORT = r"(?P<host>\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9_.-]+):(?P<port>\d{1,5})"
# The longest wait a receiver's "try again in N seconds" (HTTP Retry-After) is granted. An archive
# in maintenance or rate-limiting asks for seconds to minutes; one asking for more than an hour is
# misconfigured or hostile (a year would park every result unseen), and triage results must not
# wait longer unnoticed: after the hour the next try (one request an hour is no hammering) comes,
# and the log says what was asked.
RETRY_AFTER_MAX = 3600.0
REASON_LIMIT = 300  # characters of a reason kept: one line in a log, status.json and `outbound list`


def shown(text: str, limit: int = REASON_LIMIT) -> str:
    """``text`` from a receiver (an ACK's MSA-3, an HTTP reason phrase), fit for one line: cut to
    ``limit`` characters, controls escaped (:func:`cxr_batch.display.visible`)."""
    text = str(text)
    return visible(text[:limit] + "..." if len(text) > limit else text)


def host_problem(host: str) -> str | None:
    """What makes ``host`` (HOST_PORT's, brackets stripped) no name a connection can be made
    to, or None: a label (between dots) empty or over DNS's 63 characters (``ris..example.org``,
    a doubled dot) fails in Python's IDNA codec at every connection, not in DNS; one trailing
    dot (a fully qualified name) is fine."""
    if ":" in host:  # an IPv6 address
        return None
    name = host[:-1] if host.endswith(".") else host
    if not all(1 <= len(label) <= 63 for label in name.split(".")):
        return f"host {host!r} is not a valid host name (a label between dots is empty or over 63 characters)"
    if len(name) > 253:  # DNS's longest name, its trailing dot aside (a 253-character name may have one)
        return f"host {host!r} is not a valid host name (over 253 characters)"
    return None


def connect_error(e: BaseException, host: str) -> str:
    """Why no connection to ``host`` was made, in words: a name nothing resolves (a placeholder
    left in a configuration, pacs.example.org) is said as such, not "gaierror: [Errno -2] ..."."""
    if isinstance(e, UnicodeError):  # the IDNA codec refused the name (HOST_PORT took it: an older queue's)
        return host_problem(host) or f"host {host!r} is not a valid host name ({e})"
    cause, seen = e, set()
    while cause is not None and id(cause) not in seen:  # requests wraps it three deep
        if isinstance(cause, socket.gaierror):
            return f"host {host!r} not found ({cause.strerror or cause}): check the name"
        seen.add(id(cause))
        cause = cause.__cause__ or cause.__context__
    return f"{type(e).__name__}: {e}"


@dataclass(frozen=True)
class Delivery:
    outcome: Outcome
    reason: str = ""  # why not delivered (or what the receiver added), for the queue and status.json
    # a retry where the object never reached the receiver (no connection, no association): the
    # link is down, not this object's fault, so the queue keeps its order (cxr_batch.ledger)
    unsent: bool = False
    # the reason without the receiver's own words (an ACK's MSA-3, a C-STORE Error Comment),
    # which may quote the patient: what a log line says. None: the reason says nothing of theirs
    log_reason: str | None = None
    # a retry the receiver asked to come back for no sooner than this many seconds from now (an
    # HTTP 429/503's Retry-After), as it asked: the queue bounds it by RETRY_AFTER_MAX
    retry_after: float | None = None

    def __post_init__(self):
        object.__setattr__(self, "reason", shown(self.reason))
        if self.log_reason is not None:
            object.__setattr__(self, "log_reason", shown(self.log_reason))

    @classmethod
    def delivered(cls, note: str = "") -> "Delivery":
        return cls("delivered", note)

    @classmethod
    def retry(cls, reason: str, unsent: bool = False, log_reason: str | None = None,
              retry_after: float | None = None) -> "Delivery":
        return cls("retry", reason, unsent, log_reason, retry_after)

    @classmethod
    def rejected(cls, reason: str, log_reason: str | None = None) -> "Delivery":
        return cls("rejected", reason, log_reason=log_reason)

    @property
    def logged(self) -> str:
        """What a log line says of this delivery: the reason, less the receiver's own words."""
        return self.reason if self.log_reason is None else self.log_reason

    @property
    def ok(self) -> bool:
        return self.outcome == "delivered"

    @property
    def transient(self) -> bool:
        return self.outcome == "retry"

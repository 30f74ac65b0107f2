"""What became of one result sent to a receiver (RIS over HL7, archive over DICOMweb).

The outbound queue decides from a :class:`Delivery` alone: ``delivered`` is done, ``retry``
goes back to the queue with back-off (the receiver is down, slow, busy, or said "try again"),
``rejected`` is a final refusal of that result (resending the same bytes cannot help). ``ok``
and ``transient`` read as in :class:`cxr_batch.integration.dicom_send.SendResult`, so the queue
treats C-STORE, HL7 and STOW-RS alike.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Outcome = Literal["delivered", "retry", "rejected"]


@dataclass(frozen=True)
class Delivery:
    outcome: Outcome
    reason: str = ""  # why not delivered (or what the receiver added), for the queue and status.json

    @classmethod
    def delivered(cls, note: str = "") -> "Delivery":
        return cls("delivered", note)

    @classmethod
    def retry(cls, reason: str) -> "Delivery":
        return cls("retry", reason)

    @classmethod
    def rejected(cls, reason: str) -> "Delivery":
        return cls("rejected", reason)

    @property
    def ok(self) -> bool:
        return self.outcome == "delivered"

    @property
    def transient(self) -> bool:
        return self.outcome == "retry"

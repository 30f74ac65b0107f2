"""A RIS for the tests: hl7apy's MLLP server on loopback, answering each message as told and
keeping what it received.

    with RIS(answer="AA") as ris:          # "AA", "AE", "AR", "CA", "CE", "CR": that ACK code
        ris.answers[control_id] = "AE"     # (or another, for one message);
        send_message(msg, ris.endpoint)    # "silent": no answer; "other-id": an ACK for another
        ris.received                       # message; "garbage": framed bytes that are no HL7

The server runs in a thread of the test process and is shut down (its handler threads joined)
when the block ends; a "silent" handler is released then, so nothing outlives the test.
"""

from __future__ import annotations

import threading

from hl7apy.consts import VALIDATION_LEVEL
from hl7apy.core import Message
from hl7apy.mllp import AbstractErrorHandler, AbstractHandler, MLLPServer

from cxr_batch.integration.hl7 import Endpoint, message_control_id

ACK_CODES = ("AA", "AE", "AR", "CA", "CE", "CR")


def ack(control_id: str, code: str, text: str = "") -> str:
    """An HL7 v2.5 ACK built by hl7apy, MLLP-framed as the server writes it."""
    m = Message("ACK", version="2.5", validation_level=VALIDATION_LEVEL.TOLERANT)
    m.msh.msh_3, m.msh.msh_9, m.msh.msh_10, m.msh.msh_11 = "TESTRIS", "ACK^R01^ACK", "ACK" + control_id[:17], "P"
    m.msa.msa_1, m.msa.msa_2 = code, control_id
    if text:
        m.msa.msa_3 = text
    return "\x0b" + m.to_er7() + "\r\x1c\r"


class _Handler(AbstractHandler):
    def __init__(self, message, ris: "RIS"):
        super().__init__(message)
        self.ris = ris

    def reply(self) -> str:
        ris = self.ris
        with ris.lock:
            ris.received.append(self.incoming_message)
        answer = ris.answer
        if answer == "silent":
            ris.release.wait(60)
            return ""
        if answer == "garbage":
            return "\x0bthis is not HL7\x1c\r"
        control = message_control_id(self.incoming_message)
        answer = ris.answers.get(control, answer)
        if answer == "other-id":
            return ack("SOMEONEELSE", "AA")
        return ack(control, answer, ris.text)


class _Malformed(AbstractErrorHandler):
    """What the server could not route (not HL7, another message type): kept, and an AR."""

    def __init__(self, exc, message, ris: "RIS"):
        super().__init__(exc, message)
        self.ris = ris

    def reply(self) -> str:
        with self.ris.lock:
            self.ris.errors.append(f"{type(self.exc).__name__}: {self.exc}")
        return ack("UNKNOWN", "AR", "not an ORU^R01")


class RIS:
    def __init__(self, answer: str = "AA", text: str = "", port: int = 0):
        if answer not in ACK_CODES + ("silent", "other-id", "garbage"):
            raise ValueError(answer)
        self.answer, self.text, self.port = answer, text, port  # port 0: any free one
        self.answers: dict[str, str] = {}  # MSH-10 -> the ACK code for that message (else ``answer``)
        self.received: list[str] = []
        self.errors: list[str] = []
        self.lock = threading.Lock()
        self.release = threading.Event()
        self._server: MLLPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def endpoint(self) -> Endpoint:
        host, port = self._server.server_address[:2]
        return Endpoint(host, port)

    def __enter__(self) -> "RIS":
        handlers = {"ORU^R01^ORU_R01": (_Handler, self), "ERR": (_Malformed, self)}
        self._server = MLLPServer("127.0.0.1", self.port, handlers, timeout=10)
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05},
                                        daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.release.set()
        self._server.shutdown()
        self._server.server_close()  # joins the handler threads
        self._thread.join(10)

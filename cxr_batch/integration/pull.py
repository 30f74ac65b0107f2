"""``cxr-batch pull``: score what is already in the PACS (a morning backlog, downtime catch-up,
a silent trial over last month's studies), once.

- Query (:class:`Source`, pynetdicom, Study Root): C-FIND at study level by date range and
  ModalitiesInStudy, then for each study a series-level C-FIND whose Modality picks the series
  to take (where a PACS ignores or refuses ModalitiesInStudy, this is the filter), then an
  image-level C-FIND listing the series' SOP Instance UIDs.
- Exactly once: an instance the ledger holds a result for (scored or skipped; an error is
  provisional) or that waits in the spool is not retrieved again; a series with nothing new is
  not retrieved at all. A second pull over the same range retrieves and sends nothing; a pull
  killed midway and run again finishes the rest (the spool's objects are scored at the start,
  the queue sends what waited).
- Retrieve by C-MOVE to our own storage SCP on ``port`` (the PACS must know our AE title, host
  and port: 0xA801 otherwise, said plainly) or by C-GET over the query's association; either way
  the objects arrive through the DICOM node's receiving path (:class:`~.node.StorageSCP`: spool,
  ledger, scoring, results sent back by the outbox). Retrieval pauses while ``max_spooled``
  objects wait to be scored, so the disk stays bounded (a larger series: image by image).
- Bounded, paged: the date range is split in halves while one C-FIND answers more than
  ``page_size`` studies (read no further: the association is aborted), pages are done oldest
  first, and a pull stops after ``max_studies`` studies with anything new (run it again for the
  rest). Progress is logged every few seconds and kept in status.json.
- The pull ends when everything retrieved is scored and its results delivered, or
  ``send_wait`` seconds after scoring ended (what was not delivered waits in the queue: the
  next pull or ``cxr-batch outbound send`` sends it).

Logs name counts, AE titles and SOP Instance UIDs, never a patient's name; patient IDs only
where an arriving object names another patient than the C-FIND answered for its study, or the
PACS answers a study for two patients (held back: :mod:`.patients`).
"""

from __future__ import annotations

import copy
import datetime as dt
import logging
import os
import re
import struct
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from ..config import ConfigError, bounded
from ..exit_codes import FATAL, OK, SOME_FAILED
from ..folders import refuse_out_in_state
from ..watch import file_stamp
from .delivery import connect_error
from .dicom_send import Destination, association_failures_said_by_us, tcp_no_delay
from .node import ListenConfig, Node, escape_library_log, valid_uid
from .patients import Patient, two_patients

log = logging.getLogger("cxr_batch")

# C-FIND / C-MOVE / C-GET statuses (PS3.4 C.4)
PENDING = (0xFF00, 0xFF01)
SUCCESS, CANCELLED, WARNING_SUBOPS = 0x0000, 0xFE00, 0xB000
UNKNOWN_MOVE_DESTINATION = 0xA801
OUT_OF_RESOURCES = range(0xA700, 0xA800)
FIND_CAP = 100_000  # answers one series- or image-level C-FIND may give before it is cut off
ANSWER_BYTES_MAX = 1 << 20  # one answer's data set (a C-FIND answer), or one command, at most
C_STORE_RQ, P_DATA_TF = 0x0001, b"\x04"
ANSWER_VALUE_MAX = 1024  # bytes of one key of an answer (a UID is 64, a date range 17): longer is left out
PROGRESS_EVERY = 5.0  # seconds between progress lines
ONE_BY_ONE_FAILURES = 5  # images of a series in a row whose retrieval failed: the rest is left to the next pull
REFUSALS_SAID = 10  # objects refused in one retrieval with a line each; the others are counted
# Storage classes asked for by C-GET (each needs a presentation context and an SCP role: at most
# 128 in all): the radiographs, and what a CR/DX series may also hold.
GET_STORAGE_CLASSES = (
    "1.2.840.10008.5.1.4.1.1.1",  # Computed Radiography
    "1.2.840.10008.5.1.4.1.1.1.1",  # Digital X-Ray, for presentation
    "1.2.840.10008.5.1.4.1.1.1.1.1",  # Digital X-Ray, for processing
    "1.2.840.10008.5.1.4.1.1.7",  # Secondary Capture
    "1.2.840.10008.5.1.4.1.1.7.2",  # Multi-frame Grayscale Byte Secondary Capture
    "1.2.840.10008.5.1.4.1.1.7.3",  # Multi-frame Grayscale Word Secondary Capture
    "1.2.840.10008.5.1.4.1.1.12.1",  # X-Ray Angiographic
    "1.2.840.10008.5.1.4.1.1.12.2",  # X-Ray Radiofluoroscopic
    "1.2.840.10008.5.1.4.1.1.88.34",  # Comprehensive 3D SR (an SR filed in an image series)
    "1.2.840.10008.5.1.4.1.1.104.1",  # Encapsulated PDF
)
GET_NON_IMAGE_CLASSES = ("1.2.840.10008.5.1.4.1.1.88.34", "1.2.840.10008.5.1.4.1.1.104.1")  # no pixel syntax


class PullError(Exception):
    """The pull cannot go on (the PACS refuses us, does not know our AE title); ``str(e)`` says
    what to do."""


@dataclass
class PullConfig(ListenConfig):
    """The ``[pull]`` table of ``--config`` (and ``[scoring]``): the DICOM node's options (our AE
    title, the port C-MOVE sends to, send_to, TLS...) and the query's. Command-line options win."""

    source: str = ""  # AE@HOST:PORT of the PACS to query and retrieve from (--from)
    since: str | None = None  # YYYY-MM-DD: studies of this date or later...
    days: int | None = bounded(None, min=1, max=36_500)  # ...or of the last D days, today included (default 1)
    modalities: tuple[str, ...] = ("CR", "DX")  # series of these modalities are retrieved
    retrieve: Literal["move", "get"] = "move"  # C-MOVE to our own SCP on port, or C-GET
    page_size: int = bounded(500, min=1, max=100_000)  # studies one C-FIND may answer before its dates are split
    max_studies: int = bounded(10_000, min=1, max=10_000_000)  # studies retrieved by one pull (again: the rest)
    max_spooled: int = bounded(64, min=1, max=100_000)  # received objects waiting to be scored: retrieval waits
    query_timeout: float = bounded(120.0, gt=0.0)  # seconds the PACS may take for each answer
    broken_deadline: float = bounded(0.0, min=0.0)

    def __post_init__(self):
        super().__post_init__()
        where = self.table
        if not self.source:
            raise ConfigError(f"{where}.source: the PACS to pull from is needed (--from AE@HOST:PORT)")
        try:
            Destination.parse(self.source)
        except ValueError as e:
            raise ConfigError(f"{where}.source: {e}") from None
        if self.since is not None and self.days is not None:
            raise ConfigError(f"{where}: since and days are given together; give one")
        if self.since is not None:
            try:
                if not re.fullmatch(r"\d{4}-\d{2}-\d{2}", self.since):
                    raise ValueError
                dt.date.fromisoformat(self.since)
            except ValueError:
                raise ConfigError(f"{where}.since = {self.since!r}: expected a date YYYY-MM-DD") from None
        modalities = tuple(m.strip().upper() for m in self.modalities if m.strip())
        if not modalities or any(not re.fullmatch(r"[A-Z0-9_ ]{1,16}", m) for m in modalities):
            raise ConfigError(f"{where}.modalities = {list(self.modalities)!r}: expected DICOM modalities, e.g. "
                              f"[\"CR\", \"DX\"]")
        self.modalities = modalities

    @property
    def table(self) -> str:
        return "pull"

    @property
    def source_pacs(self) -> Destination:
        return Destination.parse(self.source)

    def first_day(self, today: dt.date | None = None) -> dt.date:
        today = today or dt.date.today()
        if self.since is not None:
            return dt.date.fromisoformat(self.since)
        return today - dt.timedelta(days=(self.days or 1) - 1)


# ---------------------------------------------------------------------- talking to the PACS
@dataclass(frozen=True)
class Study:
    uid: str
    modalities: tuple[str, ...]  # ModalitiesInStudy as answered ("" when the PACS gave none)
    patient: Patient = Patient()  # as the study-level C-FIND answered


class QueryRefused(PullError):
    """The PACS answered a C-FIND with a failure status (e.g. a key it does not support)."""


class TooMany(Exception):
    """A C-FIND answered more than it may; the association was aborted."""


class Overdue(Exception):
    """A retrieval went on past its deadline (pending answers, or objects, without end); the
    association was aborted. ``str(e)`` says so."""


class Gone(Exception):
    """What a retrieval asked for is no longer in the PACS (deleted, merged or split between the
    query and the retrieval): nothing to retrieve now or later. ``str(e)`` says so."""


class Stopped(Exception):
    """The pull was told to stop (SIGTERM, SIGINT): no new association is opened."""


class Source:
    """One association at a time with the PACS (``cfg.source``), for C-FIND and C-MOVE (or C-GET,
    whose C-STOREs ``on_store`` handles); re-opened after an abort."""

    def __init__(self, cfg: PullConfig, on_store=None):
        self.cfg, self.pacs = cfg, cfg.source_pacs
        self.on_store = on_store
        self.oversize = ""  # why the association was aborted for a data set too large, if it was
        self.held = None  # (study, series) and still_held's answer, since the last retrieval began
        self.assoc = None
        self.moved_any = False  # a C-MOVE of this pull sent us something: the PACS knows us
        self.silent_failures, self.silent_code = 0, 0  # C-MOVEs refused before sending anything
        self.stopped = False
        self.lock = threading.Lock()  # the retrieval thread uses it; a stop aborts it from another
        self.msg_id = 0

    # ------------------------------------------------------------------ the association
    def _ae(self):
        from pynetdicom import AE
        from pynetdicom.sop_class import (StudyRootQueryRetrieveInformationModelFind,
                                          StudyRootQueryRetrieveInformationModelGet,
                                          StudyRootQueryRetrieveInformationModelMove)

        from pynetdicom import _config

        from ..dicom import DECODED_TRANSFER_SYNTAXES, ENCAPSULATED_TRANSFER_SYNTAXES

        # pynetdicom formats every C-FIND answer whole for its INFO log, shown or not: each value
        # decoded (a 10 000-value padding too) and kept in the answer before asked_keys() reads it
        _config.LOG_RESPONSE_IDENTIFIERS = False
        ae = AE(ae_title=self.cfg.ae_title)
        ae.acse_timeout = ae.connection_timeout = self.cfg.acse_timeout
        ae.dimse_timeout = ae.network_timeout = self.cfg.query_timeout
        ae.maximum_pdu_size = self.cfg.max_pdu
        ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
        if self.cfg.retrieve == "move":
            ae.add_requested_context(StudyRootQueryRetrieveInformationModelMove)
        else:
            ae.add_requested_context(StudyRootQueryRetrieveInformationModelGet)
            # The PACS accepts one transfer syntax per presentation context, and one context holding
            # every syntax got explicit VR little endian: Orthanc cannot transcode JPEG 2000 to it and
            # failed that image on every pull. So each image class also gets a context per compressed
            # syntax, and the PACS can send an object as it is stored (8 classes x 13 + 4 <= 128).
            uncompressed = [ts for ts in DECODED_TRANSFER_SYNTAXES if ts not in ENCAPSULATED_TRANSFER_SYNTAXES]
            for uid in GET_STORAGE_CLASSES:
                ae.add_requested_context(uid, uncompressed)
                if uid not in GET_NON_IMAGE_CLASSES:
                    for ts in ENCAPSULATED_TRANSFER_SYNTAXES:
                        ae.add_requested_context(uid, ts)
        return ae

    def connect(self):
        """The association, opened when there is none; PullError when the PACS cannot be reached
        or refuses it."""
        if self.stopped:
            raise Stopped()
        if self.assoc is not None and self.assoc.is_established:
            return self.assoc
        from pynetdicom import build_role, evt

        ae = self._ae()
        sizes = DataSetSizes(self.cfg.scoring.max_file_bytes)
        self.oversize = ""
        handlers = [(evt.EVT_CONN_OPEN, tcp_no_delay), (evt.EVT_DATA_RECV, lambda event: self._measure(sizes, event))]
        roles = []
        if self.cfg.retrieve == "get":
            roles = [build_role(uid, scp_role=True) for uid in GET_STORAGE_CLASSES]
            if self.on_store:
                handlers.append((evt.EVT_C_STORE, self.on_store))
        try:
            with association_failures_said_by_us():
                assoc = ae.associate(self.pacs.host, self.pacs.port, ae_title=self.pacs.ae_title, ext_neg=roles,
                                     evt_handlers=handlers)
        except Exception as e:  # a bad host name
            raise PullError(f"cannot reach the PACS {self.pacs}: {connect_error(e, self.pacs.host)}") from None
        if assoc.is_rejected:
            rsp = assoc.acceptor.primitive
            raise PullError(f"the PACS {self.pacs} rejected the association ({rsp.result_str}: {rsp.reason_str}): "
                            f"it must know our AE title '{self.cfg.ae_title}' (our --ae-title) as a node allowed to "
                            f"query and retrieve, and be called '{self.pacs.ae_title}' (in Orthanc: DicomAet, and "
                            f"DicomModalities or DicomAlwaysAllowFind/Move/Get)")
        if not assoc.is_established:
            raise PullError(f"no association with the PACS {self.pacs}: it is down, the address or port is wrong, "
                            f"or a firewall drops the connection")
        wanted = {"move": "C-MOVE", "get": "C-GET"}[self.cfg.retrieve]
        models = {cx.abstract_syntax for cx in assoc.accepted_contexts}
        if not any(m.endswith(".2.2.1") for m in models):
            assoc.release()
            raise PullError(f"the PACS {self.pacs} does not answer Study Root C-FIND queries from us")
        if not any(m.endswith(".2.2.2" if wanted == "C-MOVE" else ".2.2.3") for m in models):
            assoc.release()
            other = "--retrieve get" if wanted == "C-MOVE" else "--retrieve move"
            raise PullError(f"the PACS {self.pacs} does not accept Study Root {wanted} from us: try {other}")
        self.assoc = assoc
        return assoc

    def _measure(self, sizes: "DataSetSizes", event) -> None:
        """Every PDU from the PACS: a data set over its limit aborts the association (pynetdicom
        would hold it whole, in memory or in the spool)."""
        if self.oversize:
            return  # PDUs read before the abort took effect
        why = sizes.add(event.data)
        if why:
            self.oversize = f"the PACS {self.pacs} sent {why}: the association was aborted"
            log.warning("pull: %s", self.oversize)
            self.abort()

    def check(self) -> None:
        """Open and release an association: PullError now, before the model loads, when the PACS
        cannot be reached or refuses us."""
        self.connect()
        self.close()

    def close(self) -> None:
        with self.lock:
            assoc, self.assoc = self.assoc, None
        if assoc is not None and assoc.is_established:
            assoc.release()

    def shutdown(self) -> None:
        """A stop: the association in progress is aborted (a retrieval in progress ends now;
        the next pull redoes it) and no other is opened."""
        self.stopped = True
        self.abort()

    def abort(self) -> None:
        """Cut the association short (a stop, or a query answering too much)."""
        with self.lock:
            assoc, self.assoc = self.assoc, None
        if assoc is not None:
            assoc.abort()
            # pynetdicom's C-FIND/C-GET/C-MOVE wait for the next answer on the DIMSE queue for up to
            # dimse_timeout (query_timeout, 120 s) even after a local abort: woken now, so Ctrl-C
            # during a retrieval ends the pull at once instead of two minutes later.
            waiting = getattr(getattr(assoc, "dimse", None), "msg_queue", None)  # pynetdicom 3.0's internals
            if waiting is not None:
                waiting.put((None, None))

    def _next_id(self) -> int:
        self.msg_id = self.msg_id % 65535 + 1
        return self.msg_id

    # ------------------------------------------------------------------ C-FIND
    def find(self, identifier, cap: int = FIND_CAP) -> list:
        """The identifiers answering ``identifier`` (Study Root); TooMany beyond ``cap``
        (association aborted: nothing more is read); PullError when the PACS fails the query."""
        from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind

        assoc = self.connect()
        found = []
        status = None
        for status, answer in assoc.send_c_find(identifier, StudyRootQueryRetrieveInformationModelFind,
                                                msg_id=self._next_id()):
            code = int(status.Status) if "Status" in status else None
            if code in PENDING:
                if answer is not None:
                    found.append(asked_keys(answer, identifier))
                if len(found) > cap:
                    self.abort()
                    raise TooMany(f"more than {cap} answers")
        code = int(status.Status) if status is not None and "Status" in status else None
        if code is None and self.stopped:  # our own stop aborted it (Ctrl-C): not the PACS's failure
            raise Stopped()
        if code is None:
            self.abort()
            raise PullError(self.oversize or f"the PACS {self.pacs} did not answer a C-FIND within "
                                             f"{self.cfg.query_timeout:g} s (or dropped the association)")
        if code in OUT_OF_RESOURCES:  # too many matches for the PACS itself: a smaller range may do
            raise TooMany(f"status 0x{code:04X}, out of resources")
        if code == CANCELLED:  # we never cancel: the PACS stopped at a limit of its own, the rest unsaid
            raise TooMany(f"status 0xFE00 (cancelled) after {len(found)} answers: the PACS cuts its C-FIND answers "
                          f"short (a limit of its own: LimitFindResults in Orthanc)")
        if code != SUCCESS:
            raise QueryRefused(f"the PACS {self.pacs} failed a {identifier.QueryRetrieveLevel.lower()}-level C-FIND "
                               f"with status 0x{code:04X}")
        return found

    # ------------------------------------------------------------------ C-MOVE / C-GET
    def retrieve(self, identifier, arrived=lambda: 0) -> tuple[int, int]:
        """Retrieve the objects ``identifier`` names (C-MOVE to our AE title, or C-GET):
        (completed, failed) sub-operations. PullError for an unknown move destination or a PACS
        that cannot retrieve at all; Overdue when no object asked for arrived (``arrived()``,
        their count, did not grow) for twice ``query_timeout`` while the PACS answered "pending":
        each answer may come within ``query_timeout``, and a PACS answering "pending" (or sending
        objects we refuse) for ever would hold the pull for ever. (Not a deadline per object
        listed: the PACS chooses how many it lists.)"""
        from pynetdicom.sop_class import (StudyRootQueryRetrieveInformationModelGet,
                                          StudyRootQueryRetrieveInformationModelMove)

        self.held = None  # a still_held answer is of the retrieval it follows
        assoc = self.connect()
        if self.cfg.retrieve == "move":
            answers = assoc.send_c_move(identifier, self.cfg.ae_title, StudyRootQueryRetrieveInformationModelMove,
                                        msg_id=self._next_id())
        else:
            answers = assoc.send_c_get(identifier, StudyRootQueryRetrieveInformationModelGet, msg_id=self._next_id())
        allowed = 2 * self.cfg.query_timeout
        deadline, count = time.monotonic() + allowed, arrived()
        status = None
        for status, _ in answers:
            if arrived() != count:
                deadline, count = time.monotonic() + allowed, arrived()
            elif time.monotonic() > deadline and "Status" in status and int(status.Status) in PENDING:
                self.abort()
                raise Overdue(f"the PACS {self.pacs} answered a retrieval with \"pending\" for {allowed:g} s "
                              f"(twice pull.query_timeout) without sending anything asked for: abandoned")
        if (status is None or "Status" not in status) and self.stopped:  # aborted by our own stop
            raise Stopped()
        if status is None or "Status" not in status:
            self.abort()
            return 0, -1  # no final answer: nothing is known of what arrived
        code = int(status.Status)
        # sub-operations with a warning stored their object too
        completed = sum(int(status.get(f"Number{k}Suboperations", 0) or 0) for k in ("OfCompleted", "OfWarning"))
        failed = int(status.get("NumberOfFailedSuboperations", 0) or 0)
        failure = code not in (SUCCESS, WARNING_SUBOPS, CANCELLED) and code not in PENDING
        if failure and not completed and not failed and code != UNKNOWN_MOVE_DESTINATION \
                and self._gone(identifier):
            # Orthanc answers a retrieval of what it no longer holds with 0xC000, as it answers an
            # unknown move destination: a study deleted between the query and the retrieval was
            # read as that, and the pull failed telling the operator to add us to DicomModalities
            raise Gone(f"the {identifier.QueryRetrieveLevel.lower()} asked for is no longer in the PACS {self.pacs} "
                       f"(status 0x{code:04X}; deleted, merged or split since it was listed)")
        if self.cfg.retrieve == "move":
            if code == UNKNOWN_MOVE_DESTINATION:
                raise PullError(self.unknown_destination(code))
            self.moved_any = self.moved_any or completed > 0
            if failure and not completed and not failed:  # refused before sending anything
                self.silent_failures += 1
                self.silent_code = code
                if self.silent_failures >= 2 and not self.moved_any:  # not one series: the destination
                    raise PullError(self.unknown_destination(code))
        if failure and not completed:
            hint = ""
            if code in OUT_OF_RESOURCES and self.cfg.retrieve == "move":
                hint = (f"; if the PACS cannot connect to us: is port {self.cfg.port} on {self.cfg.host} reachable "
                        f"from it (--host 0.0.0.0 listens on every interface)?")
            log.warning("the PACS %s failed a retrieval with status 0x%04X (%d sub-operations failed)%s",
                        self.pacs, code, failed, hint)
            return completed, max(failed, 1)
        return completed, failed

    def _gone(self, identifier) -> bool:
        """Whether the PACS lists the series ``identifier`` names (or its one instance) no more."""
        held = self.still_held(identifier)
        instance = str(identifier.get("SOPInstanceUID", "") or "")
        return held is not None and (instance not in held if instance else not held)

    def still_held(self, identifier) -> set[str] | None:
        """The SOP Instance UIDs the PACS still lists of the series ``identifier`` names (of its
        one instance too: the series asked for), by the image-level C-FIND that listed them; None
        when it cannot say. What is not in a successful answer is gone, with nothing to try again:
        so any doubt is None (a failure the next pull retries): the query failed, or an answer
        names another study or series, or no SOP Instance UID (a PACS ignoring the keys, or not
        returning them, says nothing of these images). Asked for the one instance, a PACS without
        single-value matching on SOPInstanceUID answered none: every image was gone."""
        from pydicom.dataset import Dataset

        query = Dataset()
        query.QueryRetrieveLevel = "IMAGE"
        query.StudyInstanceUID = str(identifier.StudyInstanceUID)
        query.SeriesInstanceUID = str(identifier.SeriesInstanceUID)
        query.SOPInstanceUID = ""
        key = (query.StudyInstanceUID, query.SeriesInstanceUID)
        if self.held is not None and self.held[0] == key:  # asked already after this retrieval: once will do
            return self.held[1]
        self.held = (key, None)  # a query failed (timed out) is not asked twice either
        try:
            answers = self.find(query)
        except (PullError, TooMany, Stopped):
            return None
        held = set()
        for a in answers:
            if any(str(a.get(k, "") or "").strip() not in ("", str(query[k].value))
                   for k in ("StudyInstanceUID", "SeriesInstanceUID")):
                return None
            uid = str(a.get("SOPInstanceUID", "") or "").strip()
            if not valid_uid(uid):
                return None
            held.add(uid)
        self.held = (key, held)
        return held

    def unknown_destination(self, code: int) -> str:
        """A C-MOVE refused before any image was sent: 0xA801 says the destination is unknown;
        Orthanc 1.10 answers 0xC000 for the same: C-MOVEs of two series (or of every series of a
        pull with one) refused so, and none sending anything, are read as that."""
        said = "move destination unknown" if code == UNKNOWN_MOVE_DESTINATION else \
            "no image sent; a PACS answers 0xA801 'move destination unknown', Orthanc 1.10 0xC000"
        return (f"the PACS {self.pacs} refused to send us the images by C-MOVE (status 0x{code:04X}: {said}): it "
                f"must know our AE title '{self.cfg.ae_title}', this machine's address and our port "
                f"({self.cfg.port}) as a DICOM node. Add us to its DICOM nodes; in Orthanc's configuration: "
                f"\"DicomModalities\": {{\"cxrbatch\": [\"{self.cfg.ae_title}\", \"<this machine's address>\", "
                f"{self.cfg.port}]}} (then restart Orthanc, or PUT /modalities/cxrbatch with that list). "
                f"Or pull with --retrieve get, which needs no destination")


class DataSetSizes:
    """The size of each command and data set arriving on an association, read from the P-DATA
    PDUs (PS3.8 9.3.5: each PDV's 4-byte length, context ID, then its control header: bit 0 a
    command, bit 1 its last fragment): a C-STORE's object may be ``max_object`` bytes, anything
    else (a C-FIND answer, a command) ANSWER_BYTES_MAX. Each is measured alone: the answers of
    the queries of a C-GET association are no part of the next object."""

    def __init__(self, max_object: int):
        self.max_object = max_object
        self.command, self.data_set = bytearray(), 0
        self.store = False  # the data set in progress follows a C-STORE request

    def add(self, pdu: bytes) -> str:
        """What is over its limit once ``pdu`` (a whole PDU, as read) is counted, else ""."""
        if pdu[:1] != P_DATA_TF:  # association PDUs hold no command nor data set
            return ""
        pos = 6  # the PDU's type, reserved byte and length
        while pos + 6 <= len(pdu):
            length, control = int.from_bytes(pdu[pos:pos + 4], "big"), pdu[pos + 5]
            fragment = pdu[pos + 6:pos + 4 + length]
            pos += 4 + length
            if control & 0x01:
                self.command += fragment
                if len(self.command) > ANSWER_BYTES_MAX:
                    return f"a DIMSE command over {ANSWER_BYTES_MAX} bytes"
                if control & 0x02:
                    self.store = command_field(bytes(self.command)) == C_STORE_RQ
                    self.command = bytearray()
                continue
            self.data_set += len(fragment)
            if self.store and self.data_set > self.max_object:
                return f"an object over {self.max_object} bytes (scoring.max_file_bytes)"
            if not self.store and self.data_set > ANSWER_BYTES_MAX:
                return f"an answer over {ANSWER_BYTES_MAX} bytes (real ones are a few hundred)"
            if control & 0x02:
                self.data_set = 0
        return ""


def command_field(command: bytes) -> int | None:
    """(0000,0100) Command Field of a command set (implicit VR little endian), None without one."""
    pos = 0
    while pos + 8 <= len(command):
        group, element, length = struct.unpack_from("<HHI", command, pos)
        if (group, element) == (0x0000, 0x0100) and length == 2 and pos + 10 <= len(command):
            return struct.unpack_from("<H", command, pos + 8)[0]
        pos += 8 + length
    return None


def asked_keys(answer, identifier):
    """A C-FIND answer with only the keys ``identifier`` asked for, and none whose value is longer
    than ANSWER_VALUE_MAX bytes: what a PACS adds (50 kB of padding, a 10 000-value list) would be
    held for every answer, up to FIND_CAP of them."""
    from pydicom.dataset import Dataset

    kept = Dataset()
    for tag in (element.tag for element in identifier):
        if tag in answer:
            value = answer.get_item(tag).value  # bytes as received (a decoded one: its text)
            if len(value if isinstance(value, (bytes, str)) else str(value)) <= ANSWER_VALUE_MAX:
                kept[tag] = answer[tag]
    return kept


def pydicom_header(path):
    """The header of a received object (no pixel data read)."""
    import pydicom

    return pydicom.dcmread(path, stop_before_pixels=True,
                           specific_tags=["SpecificCharacterSet", "SOPInstanceUID", "StudyInstanceUID", "PatientID",
                                          "IssuerOfPatientID", "PatientName", "PatientBirthDate", "PatientSex",
                                          "IssuerOfPatientIDQualifiersSequence", "OtherPatientIDs", "OtherPatientIDsSequence"])


def study_day(answer) -> str | None:
    """An answer's StudyDate as YYYYMMDD, None when it has none a date can be read from."""
    value = str(answer.get("StudyDate", "") or "").strip()
    try:
        return dt.datetime.strptime(value, "%Y%m%d").strftime("%Y%m%d")
    except ValueError:
        return None


def date_range(first: dt.date, last: dt.date | None) -> str:
    """A DICOM DA range: ``YYYYMMDD-YYYYMMDD``, open-ended (``YYYYMMDD-``) when ``last`` is None."""
    return f"{first:%Y%m%d}-" + (f"{last:%Y%m%d}" if last is not None else "")


def study_pages(find, first: dt.date, today: dt.date, page_size: int) -> Iterator[tuple[str, list]]:
    """(date range, studies) pages covering ``first`` onwards, oldest first: ``find(range,
    cap)`` answers one range or raises TooMany beyond ``cap``; a range answering more than
    ``page_size`` is split in two halves (the newest stays open-ended, so studies dated after
    today are found too). A day is not split, nor what is dated after today (a PACS ignoring the
    dates would otherwise be asked day after day into the future): their cap is the larger of
    page_size and FIND_CAP, and a PACS answering even those with too many (or out of resources)
    ends the pull with PullError rather than being asked the same again."""
    stack: list[tuple[dt.date, dt.date | None]] = [(first, None)]
    while stack:
        start, end = stack.pop()
        last = end if end is not None else max(today, start)
        one_day = start >= last and end is not None
        future = end is None and start > today
        asked = date_range(start, end)
        try:
            yield asked, find(asked, max(page_size, FIND_CAP) if one_day or future else page_size)
        except TooMany as e:
            if one_day or future:
                raise PullError(f"the PACS answered the study-level C-FIND of {asked} with {e or 'too many studies'} "
                                f"and that range cannot be split further: ask its administrator to raise its "
                                f"C-FIND limit, or pull that day with a smaller --modality list") from None
            if start >= last:  # an open-ended range from today on: close it, then what follows
                stack += [(last + dt.timedelta(days=1), None), (start, last)]
                continue
            middle = start + dt.timedelta(days=(last - start).days // 2)
            stack += [(middle + dt.timedelta(days=1), end), (start, middle)]  # the older half first


# ---------------------------------------------------------------------- the pull
@dataclass
class Progress:
    """What the pull did so far (status.json's ``pull``, the log's progress lines)."""

    state: str = "starting"  # querying, retrieving, scoring, sending, done, failed
    pages: int = 0
    studies_found: int = 0
    studies_looked_at: int = 0
    studies_retrieved: int = 0
    images_listed: int = 0
    images_retrieved: int = 0
    already_scored: int = 0
    retrieval_failures: int = 0
    not_asked: int = 0  # objects the PACS sent that this pull had not asked for: refused, never scored
    other_patient: int = 0  # of those, objects of the study asked for naming another patient than its C-FIND
    two_patients: int = 0  # studies answered for two patients: held back, not retrieved
    series_patient_keys: bool | None = None  # whether the PACS takes patient keys in a series-level C-FIND
    not_retrievable: int = 0  # objects of a class C-GET does not ask for (an SR in a DX series): not retrieved
    gone: int = 0  # objects listed, then no longer in the PACS when retrieved: nothing to retry
    more_match: bool = False  # max_studies reached: a next pull does the rest
    error: str = ""
    ignores_modalities_in_study: bool = False
    counts: dict = field(default_factory=dict)

    def line(self) -> str:
        return (f"{self.studies_looked_at}/{self.studies_found} studies looked at ({self.pages} page(s)), "
                f"{self.studies_retrieved} with new images: {self.images_retrieved} image(s) retrieved, "
                f"{self.already_scored} already scored (or received), {self.retrieval_failures} retrieval failure(s)"
                + (f", {self.not_asked - self.other_patient} object(s) sent unasked refused"
                   if self.not_asked > self.other_patient else "")
                + (f", {self.other_patient} object(s) naming another patient than the C-FIND answered refused"
                   if self.other_patient else "")
                + (f", {self.not_retrievable} object(s) of a class C-GET does not take left" if self.not_retrievable
                   else "")
                + (f", {self.two_patients} stud(ies) answered for two patients held back" if self.two_patients
                   else "")
                + (f", {self.gone} object(s) no longer in the PACS when retrieved" if self.gone else ""))


class _StopWhenDone:
    """The daemon's stop signal, also true once the pull is complete (the watch loop ends)."""

    def __init__(self, signal, done):
        self.signal, self.done = signal, done

    def __bool__(self) -> bool:
        return bool(self.signal) or self.done()

    def __getattr__(self, name):
        return getattr(self.signal, name)


class Puller(Node):
    """The DICOM node, fed by a query of the PACS instead of by senders, ending when done."""

    command = "pull"

    def __init__(self, out, cfg: PullConfig, stop=None):
        refuse_out_in_state(Path(out))
        super().__init__(out, cfg, stop)
        self.source = Source(cfg, on_store=self.scp.on_store)
        self.asked: frozenset[str] = frozenset()  # SOP Instance UIDs of the retrieval in progress
        self.asked_study = ""  # ...and the study they belong to
        self.asked_patient = Patient()  # ...and its patient, as the C-FIND answered
        self.arrived: set[str] = set()  # ...and those of them that arrived
        self.unfit: set[str] = set()  # ...and those refused for their header (another study)
        self.refused_now = 0  # objects refused since the retrieval in progress began
        self.scp.refusal, self.scp.taken = self._not_asked, self._taken
        self.progress = Progress()
        self.seen_studies: set[str] = set()  # study UIDs answered so far: each looked at once
        self.interrupt = self.stop  # SIGTERM/SIGINT only
        self.stop = _StopWhenDone(self.stop, self._complete)
        self.retrieval: threading.Thread | None = None
        self.retrieved_all = threading.Event()
        self.scored_at: float | None = None  # when everything retrieved was scored (time.monotonic)
        self.begin_summary()
        self.exit_code = OK
        self._checked = 0.0
        self._complete_cache = False

    def begin_summary(self) -> None:
        """The studies this pull reports are those the ledger records from now: known by their
        order in it, not by the wall clock (set back during the pull, its studies were not counted)."""
        self.first_seq = self.ledger.last_seq()

    # ------------------------------------------------------------------ the daemon's hooks
    def receives_on_port(self, cfg: PullConfig) -> bool:
        return cfg.retrieve == "move"  # C-GET: the objects come back on the query's association

    def listen(self) -> None:
        if self.cfg.retrieve == "move":
            super().listen()  # before the first C-MOVE can reach us
        else:  # C-GET: pynetdicom's records (a PACS dropping the association) escaped, as the node's
            escape_library_log("pynetdicom")
        self.retrieval = threading.Thread(target=self._retrieve_all, name="cxr-batch-pull", daemon=True)
        self.retrieval.start()

    def loop(self) -> None:
        start = time.monotonic()
        try:
            super().loop()
        finally:
            self.source.shutdown()  # a stop: a retrieval in progress ends now (the next pull redoes it)
            if self.retrieval is not None:
                self.retrieval.join(timeout=self.cfg.query_timeout + 5)
        self.finish(time.monotonic() - start)

    def extra_status(self) -> dict:
        p = self.progress
        return {"pull": {"source": str(self.source.pacs), "since": self.cfg.first_day().isoformat(),
                         "modalities": list(self.cfg.modalities), "retrieve": self.cfg.retrieve,
                         **vars(p)},
                **super().extra_status()}

    # ------------------------------------------------------------------ when the pull is complete
    def _complete(self) -> bool:
        """Everything retrieved is scored and its results delivered (or ``send_wait`` passed
        since scoring ended). Checked by the watch loop; looked at twice a second."""
        now = time.monotonic()
        if now - self._checked < 0.5:
            return self._complete_cache
        self._checked = now
        self._complete_cache = self._check_complete()
        return self._complete_cache

    def _check_complete(self) -> bool:
        if not self.retrieved_all.is_set() or self.pending or not self.events.empty() or self._unscored():
            return False
        if self.scored_at is None:
            self.scored_at = time.monotonic()
            if self.outbox:
                self.progress.state = "sending"
                log.info("pull: everything retrieved is scored; delivering the results (at most %.0f s more)",
                         self.cfg.send_wait)
        if not self.outbox:
            return True
        # send_wait on the monotonic clock (the system clock set back an hour: an hour more);
        # the due times are of the wall clock (they outlive the process): how far ahead, now
        left = self.scored_at + self.cfg.send_wait - time.monotonic()
        due = [d for d in (self.ledger.next_due(name) for name in self.outbox.names) if d is not None]
        return not due or min(due) - time.time() >= left or left <= 0

    def _unscored(self) -> int:
        """Objects in the spool not yet committed."""
        n = 0
        for entry in os.scandir(self.spool.folder):
            if entry.name.endswith(".dcm") and not entry.name.startswith("."):
                st = entry.stat()
                if not self.ledger.file_handled(entry.name, file_stamp(st)):
                    n += 1
        return n

    def finish(self, seconds: float) -> None:
        """The summary and the exit code, while the ledger is open."""
        p = self.progress
        records = self.ledger.reported_after(self.first_seq)
        status = Counter(r.status for r in records)
        priorities = Counter(r.priority for r in records if r.ok)
        undelivered = self.outbox.undelivered_lines(self.ledger, self.out) if self.outbox else []
        if self.interrupt:
            p.state = "stopped"
        elif p.state != "failed":
            p.state = "done"
        p.counts = dict(status)
        self.heartbeat()
        rate = p.studies_retrieved / seconds if seconds > 0 else 0.0
        pr = ", ".join(f"{priorities[x]} {x}" for x in ("urgent", "abnormal", "normal"))
        log.info("pull from %s, %s onwards: %s", self.source.pacs, self.cfg.first_day().isoformat(), p.line())
        log.info("pull: %d image(s) scored (%s), %d skipped, %d failed in %.1f s (%.2f studies/s)", status["ok"], pr,
                 status["skipped"], status["error"], seconds, rate)
        for line in undelivered:
            log.warning("pull: %s", line)
        if p.more_match:
            log.warning("pull: more studies match than pull.max_studies (%d): run the same pull again for the rest",
                        self.cfg.max_studies)
        if p.error:
            log.error("pull: %s", p.error)
            self.exit_code = FATAL
        elif self.interrupt:
            log.warning("pull: stopped before the end; run the same pull again to finish")
            self.exit_code = SOME_FAILED
        elif status["error"] or p.retrieval_failures or undelivered or p.two_patients or self.two_patient_studies:
            self.exit_code = SOME_FAILED

    def run(self) -> int:
        super().run()
        return self.exit_code

    # ------------------------------------------------------------------ the retrieval thread
    def _retrieve_all(self) -> None:
        from ..ledger import Ledger

        ledger = Ledger(self.ledger.path)  # SQLite connections belong to one thread: its own
        try:
            self._pull(ledger)
            if self.source.silent_failures and not self.source.moved_any:  # every C-MOVE refused, nothing sent
                raise PullError(self.source.unknown_destination(self.source.silent_code))
        except Stopped:
            pass
        except PullError as e:
            self.progress.state, self.progress.error = "failed", str(e)
        except Exception as e:  # a bug: said, and the pull ends with what it has
            self.progress.state, self.progress.error = "failed", f"unexpected {type(e).__name__}: {e}"
            log.error("pull: unexpected %s", type(e).__name__, exc_info=log.isEnabledFor(logging.DEBUG))
        finally:
            self.source.close()
            ledger.close()
            if self.progress.state not in ("failed",):
                self.progress.state = "scoring"
            self.retrieved_all.set()

    def _pull(self, ledger) -> None:
        p, cfg = self.progress, self.cfg
        first = cfg.first_day()
        log.info("pull: querying %s for %s studies from %s on, as %s (retrieve by C-%s)", self.source.pacs,
                 "/".join(cfg.modalities), first.isoformat(), cfg.ae_title, cfg.retrieve.upper())
        p.state = "querying"
        last_line = time.monotonic()
        for dates, studies in study_pages(self._find_studies, first, dt.date.today(), cfg.page_size):
            p.pages += 1
            p.studies_found += len(studies)
            log.info("pull: dates %s: %d stud%s", dates, len(studies), "y" if len(studies) == 1 else "ies")
            for study in studies:
                if self.interrupt:
                    return
                if p.studies_retrieved >= cfg.max_studies:
                    p.more_match = True
                    return
                self._pull_study(ledger, study)
                p.studies_looked_at += 1
                if time.monotonic() - last_line >= PROGRESS_EVERY:
                    log.info("pull: %s", p.line())
                    last_line = time.monotonic()
        log.info("pull: %s", p.line())

    def _find_studies(self, dates: str, cap: int) -> list[Study]:
        """One study-level C-FIND: ModalitiesInStudy as a key, or without it where the PACS
        refuses it (the series' Modality then picks)."""
        from pydicom.dataset import Dataset

        def query(with_modalities: bool):
            ds = Dataset()
            ds.QueryRetrieveLevel = "STUDY"
            ds.StudyDate = dates
            ds.StudyInstanceUID = ""
            ds.ModalitiesInStudy = list(self.cfg.modalities) if with_modalities else ""
            # whose: each object arriving is checked
            ds.PatientID = ds.IssuerOfPatientID = ds.PatientName = ds.PatientBirthDate = ds.PatientSex = ""
            return self.source.find(ds, cap)

        try:
            answers = query(not self.progress.ignores_modalities_in_study)
        except QueryRefused as e:
            if self.progress.ignores_modalities_in_study:
                raise
            log.warning("pull: the PACS refused ModalitiesInStudy as a key (%s): every study of the dates is looked "
                        "at and its series filtered on Modality", e)
            self.progress.ignores_modalities_in_study = True
            answers = query(False)
        studies, wanted = [], set(self.cfg.modalities)
        first, _, last = dates.partition("-")
        outside = 0
        patients: dict[str, list[Patient]] = {}  # each study's patients as answered
        for answer in answers:
            uid = str(answer.get("StudyInstanceUID", "") or "")
            if not valid_uid(uid):
                log.warning("pull: a study answered without a valid Study Instance UID: skipped")
                continue
            if uid in self.seen_studies:  # answered in an earlier page: looked at once
                continue
            day = study_day(answer)
            if day is not None and (day < first or (last and day > last)):  # a PACS ignoring the dates asked
                outside += 1
                continue
            if uid in patients:  # answered twice in this page: looked at once, each patient answered kept
                patients[uid].append(Patient.of(answer))
                continue
            patients[uid] = [Patient.of(answer)]
            value = answer.get("ModalitiesInStudy") or []
            modalities = tuple(str(m).upper() for m in ([value] if isinstance(value, str) else value) if m)
            if not (set(modalities) & wanted) and not self.progress.ignores_modalities_in_study:
                log.info("pull: the PACS ignores ModalitiesInStudy: studies are filtered by their series' Modality")
                self.progress.ignores_modalities_in_study = True
            studies.append(Study(uid, modalities, Patient.of(answer)))
        self.seen_studies.update(patients)
        if outside:
            log.warning("pull: %d stud%s dated outside %s answered (the PACS ignores the dates asked?): skipped",
                        outside, "y" if outside == 1 else "ies", dates)
        return [study for study in studies if not self._two_patients(study.uid, patients[study.uid])]

    def _two_patients(self, study: str, patients: list[Patient]) -> bool:
        """Whether the PACS answered ``study`` for two patients (Orthanc keeps one study per
        patient and Study Instance UID: a UID collision, a mis-merge, or a hostile PACS). Then
        nothing of it is retrieved: scored under the one UID, one patient's results would be
        filed in the other's study (and, asked as the first answer's, the other's images were
        refused on every pull). Said for a person to resolve in the PACS; the pull exits 3."""
        said = two_patients(patients)
        if said:
            self.progress.two_patients += 1
            log.error("pull: study %s is answered for two patients, %s: held back, none of its images retrieved or "
                      "scored; resolve the study in the PACS (split or merge it), then pull again", study, said)
        return bool(said)

    def _pull_study(self, ledger, study: Study) -> None:
        from pydicom.dataset import Dataset

        p = self.progress
        ds = Dataset()
        ds.QueryRetrieveLevel = "SERIES"
        ds.StudyInstanceUID = study.uid
        ds.SeriesInstanceUID = ""
        ds.Modality = ""
        wanted = set(self.cfg.modalities)
        try:
            found = self._find_series(ds)
        except (QueryRefused, TooMany) as e:  # this study only: the others are still pulled
            log.warning("pull: study %s could not be listed (%s): skipped; the next pull tries it again", study.uid,
                        e or "too many series")
            p.retrieval_failures += 1
            return
        found = self._of_study(found, study.uid, "series")
        if self._two_patients(study.uid, [study.patient, *map(Patient.of, found)]):
            return
        # each series once: a PACS answering one series many times would have it listed as often
        series = list({str(s.SeriesInstanceUID): s for s in found if str(s.get("Modality", "") or "").upper() in wanted
                       and valid_uid(str(s.get("SeriesInstanceUID", "") or ""))}.values())
        retrieved_any = False
        for s in series:
            ds = Dataset()
            ds.QueryRetrieveLevel = "IMAGE"
            ds.StudyInstanceUID = study.uid
            ds.SeriesInstanceUID = str(s.SeriesInstanceUID)
            ds.SOPInstanceUID = ""
            ds.SOPClassUID = ""  # a return key: what C-GET could not take is not asked for
            try:
                images = self.source.find(ds)
            except (QueryRefused, TooMany) as e:
                log.warning("pull: series %s of study %s could not be listed (%s): skipped; the next pull tries it "
                            "again", ds.SeriesInstanceUID, study.uid, e or "too many images")
                p.retrieval_failures += 1
                continue
            images = self._of_study(images, study.uid, "image", ds.SeriesInstanceUID)
            listed = sorted({u for u in (str(i.get("SOPInstanceUID", "") or "") for i in images) if valid_uid(u)})
            if not listed:  # a series without images is no series: a PACS answering no image-level query had
                # every study looked at, none retrieved, exit 0 and nothing said
                log.warning("pull: series %s of study %s was listed, but no image of it (does the PACS answer "
                            "image-level C-FINDs?): skipped; the next pull tries it again", ds.SeriesInstanceUID,
                            study.uid)
                p.retrieval_failures += 1
                continue
            uids = sorted(set(listed) - self._not_retrievable(images, study.uid))
            p.images_listed += len(uids)
            done = ledger.settled([f"uid:{u}" for u in uids])
            spooled = self._spooled_uids()
            new = [u for u in uids if f"uid:{u}" not in done and u not in spooled]
            p.already_scored += len(uids) - len(new)
            if not new:
                continue
            retrieved_any = True
            p.state = "retrieving"
            if len(new) == len(listed) and len(new) <= self.cfg.max_spooled:  # the whole series: one request,
                # then one by one what it did not bring because of an object we refused
                new = self._retrieve(study, ds.SeriesInstanceUID, None, new, whole=True)
            # else some were scored before (a pull cut short), or more than the spool may hold: one by one,
            # each when there is room (a series of thousands came whole into the spool)
            failing = 0  # images in a row whose retrieval failed
            for k, uid in enumerate(new):
                before = p.retrieval_failures
                self._retrieve(study, ds.SeriesInstanceUID, uid, [uid])
                failing = failing + 1 if p.retrieval_failures > before else 0
                if failing >= ONE_BY_ONE_FAILURES and k + 1 < len(new):  # a PACS refusing each: a retrieval
                    # and a C-FIND of the series per image (a series of 10,000: 10^8 answers); the rest next pull
                    p.retrieval_failures += len(new) - k - 1
                    log.warning("pull: study %s, series %s: %d image(s) in a row could not be retrieved: the other %d "
                                "not asked for; the next pull tries again", study.uid, ds.SeriesInstanceUID, failing,
                                len(new) - k - 1)
                    break
        if retrieved_any:
            p.studies_retrieved += 1

    def _find_series(self, ds) -> list:
        """A series-level C-FIND, the patient keys asked too (a PACS answering one study per
        patient and Study Instance UID answers ModalitiesInStudy's study-level C-FIND once, for one
        of them: their series say the other); without them where the PACS refuses them (a
        refusal before any query with them was answered: asked again without; answered so, the
        keys are left out from then on)."""
        p = self.progress
        if p.series_patient_keys is not False:
            asked = copy.deepcopy(ds)  # Dataset.copy() shares its elements
            asked.PatientID = asked.IssuerOfPatientID = asked.PatientName = asked.PatientBirthDate = ""
            asked.PatientSex = ""
            try:
                found = self.source.find(asked)
                p.series_patient_keys = True
                return found
            except QueryRefused as e:
                if p.series_patient_keys:  # they were answered before: this study's refusal
                    raise
                found = self.source.find(ds)
                log.warning("pull: the PACS refused patient keys in a series-level C-FIND (%s): asked without them "
                            "from now on; a study it holds for two patients is found as its images arrive", e)
                p.series_patient_keys = False
                return found
        return self.source.find(ds)

    def _of_study(self, answers: list, study: str, level: str, series: str = "") -> list:
        """The answers of a series- or image-level C-FIND that belong to the study (and series)
        asked, or do not say: a PACS ignoring those keys answered other studies' series, which
        were then queried and retrieved under this study, their objects refused as another
        study's, and every pull failed. Those left out are said."""
        asked = {"StudyInstanceUID": study, **({"SeriesInstanceUID": series} if series else {})}
        kept = [a for a in answers if all(str(a.get(k, "") or "").strip() in ("", uid) for k, uid in asked.items())]
        if len(kept) < len(answers):
            log.warning("pull: the PACS answered the %s-level C-FIND of study %s with %d %s of other studies or "
                        "series (it ignores the keys asked?): left out", level, study, len(answers) - len(kept),
                        level if level == "series" else "images")
        return kept

    def _not_retrievable(self, images: list, study: str) -> set[str]:
        """SOP Instance UIDs of a series' objects that C-GET cannot take (their SOP class has no
        presentation context in it: a Basic Text SR, a presentation state filed with the
        images), each class said once per series: asking for them would fail every pull for
        ever. A PACS that does not answer SOPClassUID: none (they are asked for, as before);
        C-MOVE takes any class (the node gives what is not a radiograph a skipped row)."""
        if self.cfg.retrieve != "get":
            return set()
        left: dict[str, list[str]] = {}
        for answer in images:
            uid, cls = (str(answer.get(k, "") or "").strip() for k in ("SOPInstanceUID", "SOPClassUID"))
            if cls and valid_uid(uid) and cls not in GET_STORAGE_CLASSES:
                left.setdefault(cls, []).append(uid)
        for cls, uids in left.items():
            log.warning("pull: %d object(s) of SOP class %s in a series of study %s not retrieved: not an image class "
                        "the C-GET asks for (--retrieve move takes them, to a skipped row)", len(uids), cls, study)
        self.progress.not_retrievable += sum(len(u) for u in left.values())
        return {u for uids in left.values() for u in uids}

    def _retrieve(self, study: Study, series: str, instance: str | None, asked: list[str],
                  whole: bool = False) -> list[str]:
        """Retrieve ``asked`` (the series', or the one ``instance``), counting what failed. For a
        ``whole`` series cut short after an object we refused (Orthanc ends a C-MOVE at its first
        refused sub-operation: an image added to the series since it was listed, sent first, cost
        every image asked for), what did not come is returned, not counted, to be asked for one by
        one; otherwise []."""
        from pydicom.dataset import Dataset

        self._wait_for_room()
        ds = Dataset()
        ds.QueryRetrieveLevel = "IMAGE" if instance else "SERIES"
        ds.StudyInstanceUID = study.uid
        ds.SeriesInstanceUID = series
        if instance:
            ds.SOPInstanceUID = instance
        refused = self.progress.not_asked
        self.arrived, self.unfit, self.refused_now = set(), set(), 0
        self.asked, self.asked_study, self.asked_patient = frozenset(asked), study.uid, study.patient
        answered = True  # the PACS gave the retrieval a final answer
        try:
            completed, failed = self.source.retrieve(ds, lambda: len(self.arrived))
        except Overdue as e:
            log.warning("pull: %s; what arrived is scored, the rest is retrieved by the next pull", e)
            completed, failed = len(self.arrived), len(asked) - len(self.arrived)
            answered = False
        except Gone as e:  # nothing lost, nothing to try again
            log.warning("pull: study %s, series %s: %s: skipped, not a retrieval failure", study.uid, series, e)
            self.progress.gone += len(asked)
            return []
        finally:
            self.asked = frozenset()
        if self.refused_now > REFUSALS_SAID:
            log.warning("pull: %d object(s) refused in one retrieval (the first %d said)", self.refused_now,
                        REFUSALS_SAID)
        if self.source.stopped:  # cut short by a stop: the next pull retrieves the rest
            raise Stopped()
        failed = max(0, failed - (self.progress.not_asked - refused)) if failed > 0 else failed  # ours, not the PACS's
        if failed < 0:
            log.warning("pull: no final answer to a retrieval (none within %.0f s, or the PACS dropped the "
                        "association); what arrived is scored, the rest is retrieved by the next pull",
                        self.cfg.query_timeout)
            failed, answered = len(asked), False
        absent = set(asked) - self.arrived
        # asked only of a PACS that answered: one hung or gone would cost another association's timeout
        held = self.source.still_held(ds) if absent and answered and not self.source.stopped else None
        gone = absent - held if held is not None else set()
        if gone:  # deleted since listed (Orthanc moves what the series holds now): nothing to try again
            log.warning("pull: study %s, series %s: %d of %d object(s) asked for no longer in the PACS (deleted, "
                        "merged or split since it was listed): skipped, not a retrieval failure", study.uid, series,
                        len(gone), len(asked))
            self.progress.gone += len(gone)
            asked = [u for u in asked if u not in gone]
            failed = max(0, failed - len(gone))
        left = sorted(set(asked) - self.arrived - self.unfit)
        if whole and left and self.refused_now and answered:
            log.info("pull: study %s, series %s: %d of %d object(s) not sent after one we refused (the PACS ends a "
                     "retrieval at a refused object): asked for one by one", study.uid, series, len(left), len(asked))
            self.progress.images_retrieved += len(self.arrived)
            return left
        missing = len(set(asked) - self.arrived)  # a PACS's "success" is not what arrived
        if missing > failed:
            unsent = missing - failed - len(self.unfit)  # those refused for their header were said
            if unsent > 0:
                log.warning("pull: the PACS answered the retrieval of %d object(s) with status success but did not "
                            "send %d of them", len(asked), unsent)
            failed = missing
        self.progress.images_retrieved += completed
        if failed:
            self.progress.retrieval_failures += failed
            log.warning("pull: %d of %d object(s) of a series could not be retrieved; the next pull tries again",
                        failed, len(asked))
        return []

    def _not_asked(self, event) -> tuple[str, bool] | None:
        """Why an arriving object is refused: only the instances the retrieval in progress asked
        for are stored and scored (a PACS sending another study's image, or a sender reaching our
        C-MOVE port, must not get a result, an SR or an HL7 message as if it had been asked for).
        The header's own SOP Instance UID must be the one announced: it is what the result is
        keyed by, its Study Instance UID the one asked for (an object of another study would have
        its result filed there) and its patient the one the C-FIND answered for that study (an
        image of another patient filed under the study would have its result sent to the RIS
        under the wrong patient). Each instance is taken once per
        retrieval: a PACS sending it again and again (or on two associations at once) would have
        it scored again each time. (why, whether to log it): the first REFUSALS_SAID of a
        retrieval are logged, the others counted (a PACS sending what we refuse for as long as
        the retrieval lasts wrote a line per object)."""
        uid = str(event.request.AffectedSOPInstanceUID or "")
        why = None
        if uid not in self.asked:
            why = "not asked for by this pull (not scored)"
        elif uid in self.arrived:
            why = "sent again in the same retrieval (the copy received first is scored)"
        else:
            try:
                try:
                    path = event.dataset_path
                except AttributeError:
                    path = None
                header = pydicom_header(path) if path else event.dataset  # else held in memory (C-GET)
                if str(header.get("SOPInstanceUID", "") or "") != uid:
                    why = "its header's SOP Instance UID is not the one announced (not scored)"
                elif str(header.get("StudyInstanceUID", "") or "") != self.asked_study:
                    why = f"its header names another study than the one asked for, {self.asked_study} (not scored)"
                elif differs := self.asked_patient.differs(Patient.of(header)):
                    why = f"its header names another patient than study {self.asked_study}: {differs} (not scored)"
                    self.progress.other_patient += 1
            except Exception as e:  # unreadable: the scoring could not key it either
                why = f"its header cannot be read ({type(e).__name__}: {e}; not scored)"
        if not why:
            return None
        self.progress.not_asked += 1
        if uid in self.asked and uid not in self.arrived:
            self.unfit.add(uid)
        self.refused_now += 1
        if self.asked:  # the PACS reached us: whatever it answers, it knows our move destination
            self.source.moved_any = True
        if self.refused_now == REFUSALS_SAID:
            why += "; further objects refused in this retrieval are counted, not logged"
        return why, self.refused_now <= REFUSALS_SAID

    def _taken(self, uid: str) -> None:
        """An instance asked for is in the spool (the storage SCP holds its UID's lock from
        :meth:`_not_asked` to here, so a copy arriving meanwhile on another association waits,
        then is refused). Not before: a copy that could not be written may be sent again."""
        if uid in self.asked:
            self.arrived.add(uid)

    def _spooled_uids(self) -> set[str]:
        """SOP Instance UIDs of received objects waiting in the spool (named ``UID.HASH.dcm``)."""
        return {name[:-4].rsplit(".", 1)[0] for name in os.listdir(self.spool.folder)
                if name.endswith(".dcm") and not name.startswith(".")}

    def _wait_for_room(self) -> None:
        """Retrieval waits while ``max_spooled`` received objects wait to be scored."""
        while not self.interrupt:
            waiting = sum(1 for n in os.listdir(self.spool.folder) if n.endswith(".dcm") and not n.startswith("."))
            if waiting < self.cfg.max_spooled:
                return
            self.progress.state = "scoring"
            time.sleep(0.2)


def run_pull(out, cfg: PullConfig, stop=None) -> Puller:
    """Check ``out`` and the PACS (ConfigError, PullError before the model loads), then the
    puller (its ``run()`` pulls)."""
    refuse_out_in_state(Path(out))
    Source(cfg).check()
    return Puller(out, cfg, stop)


"""HL7 v2.5 ORU^R01 to the RIS over MLLP: the study's priority where the worklist is made.

:func:`oru_r01` builds one message per scored study with hl7apy (strict validation: required
fields, structure, lengths), from its :class:`~cxr_batch.record.StudyRecord`:

- MSH: sending/receiving application and facility, MSH-10 control id derived from the source
  image and the bundle (:func:`control_id`: a retry, or the same result built again, carries
  the same id, so the RIS can drop the duplicate), processing id, version 2.5, UTF-8;
- PID: PID-3 patient ID with its issuer (:func:`patient_identifier`), PID-5 name (DICOM PN order mapped to XPN, one repetition per
  component group with its representation code A/I/P in XPN-8 when the name has an ideographic
  or phonetic one; ``""``, HL7's explicit null, when the record has none), PID-7 birth date, PID-8 sex;
- ORC/OBR: the accession number as filler order number (ORC-3, OBR-3) and in OBR-18, the field
  IHE Scheduled Workflow maps to DICOM's Accession Number; OBR-4 the imaging procedure, OBR-7
  the study date/time as the DICOM header has it (with its Timezone Offset From UTC when it has
  one), OBR-22
  the time the message was made (as MSH-7, with the UTC offset then in force: ``+0100``,
  ``+0200``), OBR-25 ``P`` (preliminary: no radiologist has read it); two NTEs name
  the model (name@version, bundle sha256) and say it is decision support;
- OBX 1: the triage priority (CE), OBX-8 ``AA`` urgent, ``A`` abnormal, empty for the
  low-probability bucket (``N`` is "Normal" in table 0078: it is not a normal result);
- OBX 2-15: per finding, the probability (NM, 6 decimals as in results.csv), the threshold as
  reference range (``<t``: flagged at t or above), OBX-8 ``AA`` for a flagged urgent finding,
  ``A`` for another flagged one, empty otherwise (not flagged is not normal); OBX-11 ``P``; a flagged finding's OBX is
  followed by an NTE saying what its flag is worth (``trust``: the SR's line for it, sensitivity
  and PPV at its operating point and the held-out catch), as the PDF and the SR say beside it;
- OBX 16: what orders the study inside its priority on the worklist (the urgent finding's
  probability, or P(any finding)); OBX 17: P(any finding), when the bundle has one.
- every OBX: OBX-14 when the image was acquired (:func:`_observation_time`), OBX-19 when the
  result was made (MSH-7), each with its UTC offset.

Every value from outside (IDs, names) is escaped (``\\F\\``, ``\\S\\``, ``\\T\\``, ``\\R\\``,
``\\E\\``), so a ``|^~\\&`` in a name cannot break the message. The MSH's application and
facility names come from the configuration as HD values (``NAME`` or ``NAME^OID^ISO``, the form
interface engines route by), checked (:func:`hd_problem`) rather than escaped.

:func:`send_message` is the MLLP client: one connection per message, the message framed
``0x0B ... 0x1C 0x0D``, the ACK awaited within ``timeout``, MSA-1/MSA-2 read back into a
:class:`~cxr_batch.integration.delivery.Delivery`, as HL7 v2.5 2.9.2.2 reads the codes: AA/CA
delivered; AR/CE retry (the RIS is down or failed "for reasons unrelated to content or format":
the link backs off); AE/CR rejected (an error in this message, e.g. an order the RIS does not
know, or its type, version or processing id refused: it waits ``refused_retry``, the others go
on); no ACK, a closed connection, an ACK for another message or an unreadable one: retry. Logs name the control id and the code, never the patient.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import logging
import re
import socket
import time
import unicodedata
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from .. import clock
from ..display import is_dicom_date
from ..findings import DEFAULT_URGENT, FINDINGS
from ..record import StudyRecord
from .delivery import HOST_PORT, Delivery, connect_error, host_problem, shown

log = logging.getLogger("cxr_batch")

VERSION = "2.5"
SENDING_APPLICATION = "CXRBATCH"
START_BLOCK, END_BLOCK = b"\x0b", b"\x1c\x0d"
MAX_ACK_BYTES = 1 << 20  # an ACK is a few hundred bytes; a peer that streams more is not a RIS
ACK_SEGMENT_CHARS = 1024  # of the MSH and the MSA read from an ACK (MSA-3 is 80 characters in v2.5)
LOCAL_CODES = "99CXRBATCH"  # the private coding scheme of the DICOM SR, for the same concepts
PROCEDURE = "399208008^Plain chest X-ray^SCT"  # as the SR's Procedure Reported
PRIORITY_OBSERVATION = f"PRIORITY^Triage priority^{LOCAL_CODES}"
ORDER_OBSERVATION = f"ORDER^Worklist order within the priority^{LOCAL_CODES}"
ANY_FINDING_OBSERVATION = f"PANY^Probability of any finding^{LOCAL_CODES}"
# OBX-8 (HL7 v2.5 table 0078): "N" is "Normal", which a RIS shows beside the value; nothing the
# model did not flag is normal (v3 caught 0 of 10 held-out pneumothoraces), so the low-probability
# priority and a finding not flagged carry no flag (empty: "normal ranges don't apply")
PRIORITY_FLAGS = {"urgent": "AA", "abnormal": "A", "normal": ""}
# HL7 v2.5 2.9.2.2 and table 0008: AE, an error in processing this message (an order the RIS
# does not know, a value it refuses): this message waits, the others go on; AR, a failure
# "unrelated to its content or format (system down, internal error)" the RIS is likely to get
# over, and CE, the commit failing "for any other reason": the link backs off and tries again;
# CR, the message type, version or processing id refused
ACK_DELIVERED, ACK_RETRY, ACK_REJECTED = {"AA", "CA"}, {"AR", "CE"}, {"AE", "CR"}


PROCESSING_IDS = ("P", "D", "T")  # MSH-11, HL7 table 0103
HD_LIMITS = (("name (HD-1)", 20), ("universal ID (HD-2)", 199))  # the lengths hl7apy checks


def hd_problem(value: str) -> str | None:
    """What makes ``value`` unfit as an HD field of the MSH (MSH-3 to MSH-6: ``NAME``, or
    ``NAME^OID^ISO``, the form interface engines route by), or None."""
    if not value:
        return None
    if any(c in value for c in "|~\\&") or not value.isprintable():
        return f"{value!r}: an HD value has no | ~ \\ & or control characters (^ separates NAME^OID^ISO)"
    if value.count("^") > 2:
        return f"{value!r}: an HD value has at most 3 components (NAME^OID^ISO)"
    # HD-1 is an IS, HD-2 an ST (v2.5 2.A.33): a longer one passed here, then hl7apy refused
    # every ORU of the run ('a name or an ID is longer than HL7 v2.5 allows'), none sent
    for (part, limit), component in zip(HD_LIMITS, value.strip().split("^")):
        if len(component) > limit:
            return f"{shown(value, 60)!r}: an HD value's {part} has at most {limit} characters (HL7 v2.5)"
    return None


def _hd(value: str) -> str:
    """An HD field of the MSH from the configuration: its components kept (``NAME^OID^ISO``)."""
    if problem := hd_problem(value):
        raise HL7NotMade(problem)
    return value.strip()


class HL7NotMade(Exception):
    """A record no valid ORU^R01 can be made for; ``str(e)`` says why."""


@dataclass(frozen=True)
class Endpoint:
    """A RIS's MLLP listener: ``HOST:PORT`` (``[::1]:2575`` for IPv6)."""

    host: str
    port: int

    @classmethod
    def parse(cls, text: str) -> "Endpoint":
        m = re.match(f"^{HOST_PORT}$", text.strip(), re.ASCII)
        if m is None:
            raise ValueError(f"{text!r}: expected HOST:PORT, e.g. ris.example.org:2575")
        port = int(m["port"])
        if not 1 <= port <= 65535:
            raise ValueError(f"{text!r}: port {port} is not 1-65535")
        if problem := host_problem(m["host"].strip("[]")):
            raise ValueError(f"{text!r}: {problem}")
        return cls(m["host"].strip("[]"), port)

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


# ------------------------------------------------------------------ escaping (HL7 v2.5 2.7.4)
_ESCAPES = (("\\", "\\E\\"), ("|", "\\F\\"), ("^", "\\S\\"), ("&", "\\T\\"), ("~", "\\R\\"))
_UNESCAPES = {"E": "\\", "F": "|", "S": "^", "T": "&", "R": "~"}


def escape(text: str) -> str:
    """``text`` as one HL7 value: control characters (a CR would end the segment) become
    spaces, the delimiters their escape sequences (the escape character first)."""
    text = "".join(" " if unicodedata.category(ch) == "Cc" else ch for ch in str(text or ""))
    for char, sequence in _ESCAPES:
        text = text.replace(char, sequence)
    return text.strip()


def unescape(text: str) -> str:
    """The inverse of :func:`escape` for the delimiter escapes (others are kept as written)."""
    return re.sub(r"\\([EFSTR])\\", lambda m: _UNESCAPES[m[1]], text)


# ------------------------------------------------------------------ the message
def control_id(record: StudyRecord, revision: str = "") -> str:
    """MSH-10 (at most 20 characters): the same for the same image scored by the same bundle;
    a ``revision`` (a changed instance's content hash, as for its SR) gives a changed result
    an id of its own, so the RIS does not drop it as a duplicate of the first."""
    ids = record.ids
    basis = ids.sop_uid or ids.study_uid or record.file
    text = f"oru\x1f{basis}\x1f{record.weights_sha256}" + (f"\x1f{revision}" if revision else "")
    return hashlib.sha256(text.encode()).hexdigest()[:20].upper()


def _date(value: str) -> str:
    """HL7 DT from a DICOM DA: 8 digits of a real date, else empty. One before the year 1000
    (00010101, a modality's clock reset) is none: hl7apy writes its year without the leading
    zeros ('10101101500' in OBR-7, no TS), a message no RIS parses."""
    return value if is_dicom_date(value) and value >= "1000" else ""


def _study_datetime(record: StudyRecord) -> str:
    """OBR-7 from the DICOM study date and time (HL7 TS: YYYYMMDD[HHMM[SS]][+/-ZZZZ]), with the
    UTC offset the source gave them (Timezone Offset From UTC): without one HL7 reads the time
    in the sender's zone, MSH-7's, not the modality's."""
    date = _date(record.ids.study_date)
    time_of_day = record.ids.study_time.split(".")[0]
    if date and re.fullmatch(r"([01]\d|2[0-3])[0-5]\d([0-5]\d)?", time_of_day, re.ASCII):
        offset = record.ids.timezone_offset
        return date + time_of_day + (offset if clock.valid_offset(offset) else "")
    return date


# a DICOM DT to the second (YYYYMMDDHHMM[SS][.F][+ZZZZ]): an acquisition time
_DICOM_DT = re.compile(r"(\d{8})([01]\d|2[0-3])([0-5]\d)([0-5]\d)?(?:\.\d{1,6})?([+-]\d{4})?", re.ASCII)


def _observation_time(record: StudyRecord, made: dt.datetime) -> str:
    """OBX-14, Date/Time of the Observation (HL7 TS with its UTC offset). HL7 v2.5.1 7.4.2.14:
    "the physiologically relevant date-time or the closest approximation to that date-time";
    for an observation made on the patient (an X-ray image), when it was performed. The model's
    probabilities describe the chest as imaged, so it is when the image was acquired (the
    header's AcquisitionDateTime, or AcquisitionDate + AcquisitionTime), else the study's date
    and time (OBR-7, which HL7 reads in OBX-14's place), else ``made``, the time of the result
    (the latest the image can have been made; OBX-19 says it in every OBX): a time after it,
    or before X-rays were, is none (:func:`_observed`). The offset is the
    time's own, else the source's Timezone Offset From UTC, else the local zone's at that moment:
    what HL7 reads a time without one as, said, so an engine filing by it compares like with
    like."""
    ids = record.ids
    for text in (ids.acquisition_datetime, _date(ids.study_date) + ids.study_time.split(".")[0]):
        observed = _observed(text, ids.timezone_offset, made)
        if observed:
            return observed
    return made.strftime("%Y%m%d%H%M%S") + clock.utc_offset(made)


_FIRST_X_RAY = dt.datetime(1895, 11, 8, tzinfo=dt.timezone.utc)


def _observed(text: str, timezone_offset: str, made: dt.datetime) -> str:
    """A DICOM DT as HL7 TS (to the minute or second, its fraction left out) with its UTC
    offset: its own, else the source's ``timezone_offset``, else the local zone's at that
    moment. Empty when it is not when an image of a result made at ``made`` was acquired: not a
    DT, after ``made`` or before X-rays were (a modality's clock reset or wrong, a hostile
    header). A local time at the ends of the calendar cannot be converted (ValueError 'year 0
    is out of range' stopped the ORUs of a whole scan), and a year before 1000 came out of
    hl7apy without its leading zeros (00010101 as 10101: no TS)."""
    m = _DICOM_DT.fullmatch(text)
    if m is None or not _date(m[1]):
        return ""
    moment = m[1] + m[2] + m[3] + (m[4] or "")
    offset = next((o for o in (m[5], timezone_offset) if clock.valid_offset(o or "")), None)
    try:
        naive = dt.datetime.strptime(moment.ljust(14, "0"), "%Y%m%d%H%M%S")
        if offset is None:
            observed = clock.aware(naive)
        else:
            observed = naive.replace(tzinfo=dt.datetime.strptime(offset, "%z").tzinfo)
        if not _FIRST_X_RAY <= observed <= made:
            return ""
    except (ValueError, OverflowError):
        return ""
    return moment + clock.utc_offset(observed)


# XPN-8, name representation code (HL7 table 4000), of DICOM PN's component groups in their order
NAME_REPRESENTATIONS = ("A", "I", "P")  # alphabetic, ideographic (kanji), phonetic (kana)


def _person_group(group: str) -> str:
    """XPN-1 to XPN-5 from one DICOM PN component group (family^given^middle^prefix^suffix):
    family^given^middle^suffix^prefix, each escaped."""
    parts = (group.split("^") + [""] * 5)[:5]
    family, given, middle, prefix, suffix = (escape(p) for p in parts)
    return "^".join((family, given, middle, suffix, prefix)).rstrip("^")


def _person_names(pn: str) -> list[str]:
    """PID-5's repetitions (XPN) from a DICOM PN: one per component group the name has,
    alphabetic first, each with its name representation code in XPN-8 (HL7 v2.5 2.A.88: the
    name repeated in each representation). A name with no ideographic or phonetic group is
    one XPN without the code (alphabetic is HL7's default), as before; [] when no name."""
    groups = [_person_group(g) for g in pn.split("=")[:3]]
    if not any(groups[1:]):
        return [groups[0]] if groups[0] else []
    return [f"{xpn}{'^' * (7 - xpn.count('^'))}{code}"
            for xpn, code in zip(groups, NAME_REPRESENTATIONS) if xpn]


def _flag(flagged: bool, urgent: bool) -> str:
    return ("AA" if urgent else "A") if flagged else ""


def oru_r01(record: StudyRecord, *, thresholds: Mapping[str, float] | None = None,
            urgent: Sequence[str] = DEFAULT_URGENT, sending_application: str = SENDING_APPLICATION,
            sending_facility: str = "", receiving_application: str = "", receiving_facility: str = "",
            processing_id: str = "P", created: dt.datetime | None = None, revision: str = "",
            trust: Mapping[str, str] | None = None, normal_below: float | None = None) -> str:
    """The ORU^R01 of a scored ``record`` as ER7 text (segments ended by CR), validated by
    hl7apy; HL7NotMade when the record cannot have one (not scored, no patient ID or accession
    number to match the order by, a value the standard's lengths refuse). ``revision``: see
    :func:`control_id`. ``trust``: per finding, what its flag is worth (:func:`cxr_batch.sr.trust_lines`),
    noted under each flagged finding's OBX. ``normal_below``: the bundle's P(any) cutoff, which
    names the low-probability bucket as the SR and the PDF do. ``created``: when the message is
    made (MSH-7, OBR-22; default: now, from :mod:`cxr_batch.clock`; a naive time is read as
    local time), written with its UTC offset."""
    from hl7apy.consts import VALIDATION_LEVEL
    from hl7apy.core import Message
    from hl7apy.exceptions import HL7apyException

    from ..sr import FINDING_CODES, priority_code

    scores, ids = record.scores, record.ids
    if not record.ok or scores is None:
        raise HL7NotMade(f"not scored ({record.status})")
    if not ids.patient_id.strip():
        raise HL7NotMade("no patient ID (PID-3): the RIS could not match the patient")
    if not ids.accession_number.strip():
        raise HL7NotMade("no accession number: the RIS could not match the order")
    if scores.priority not in PRIORITY_FLAGS or len(scores.probs) != len(FINDINGS):
        raise HL7NotMade("the scores are not one probability per finding and a known priority")
    if processing_id not in PROCESSING_IDS:
        raise HL7NotMade(f"processing id {processing_id!r} is not P, D or T (HL7 table 0103)")
    # MSH-7 and OBR-22 with the UTC offset in force when the message was made (TS:
    # YYYYMMDDHHMMSS+ZZZZ): the night a DST clock goes back, a correction made at 02:15 +0100
    # is later than the original it replaces, made at 02:30 +0200
    made = clock.aware(created) if created is not None else clock.local_now()
    when = made.strftime("%Y%m%d%H%M%S") + clock.utc_offset(made)
    # OBX-14 and OBX-19 of every OBX: when the image was acquired, when this result was made
    times = (_observation_time(record, made), when)
    accession = escape(ids.accession_number)
    try:
        m = Message("ORU_R01", version=VERSION, validation_level=VALIDATION_LEVEL.STRICT)
        msh = m.msh
        msh.msh_3, msh.msh_4 = _hd(sending_application), _hd(sending_facility)
        msh.msh_5, msh.msh_6 = _hd(receiving_application), _hd(receiving_facility)
        msh.msh_7, msh.msh_9, msh.msh_10 = when, "ORU^R01^ORU_R01", control_id(record, revision)
        msh.msh_11, msh.msh_18 = processing_id, "UNICODE UTF-8"
        result = m.add_group("ORU_R01_PATIENT_RESULT")
        pid = result.add_group("ORU_R01_PATIENT").pid
        pid.pid_1, pid.pid_3 = "1", patient_identifier(ids)
        # PID-5 is required: without a name (results.csv keeps none) HL7's explicit null "" says so
        names = _person_names(ids.patient_name) or ['""']
        pid.pid_5 = names[0]
        for name in names[1:]:
            pid.add_field("pid_5").value = name
        if _date(ids.patient_birth_date):
            pid.pid_7 = ids.patient_birth_date
        if ids.patient_sex.strip().upper() in ("M", "F", "O"):
            pid.pid_8 = ids.patient_sex.strip().upper()
        order = result.add_group("ORU_R01_ORDER_OBSERVATION")
        order.orc.orc_1, order.orc.orc_3 = "RE", accession  # RE: observations to follow
        obr = order.obr
        obr.obr_1, obr.obr_3, obr.obr_4 = "1", accession, PROCEDURE
        study_time = _study_datetime(record)
        if study_time:
            obr.obr_7 = study_time
        obr.obr_18, obr.obr_22, obr.obr_24, obr.obr_25 = accession, when, "RAD", "P"
        for k, text in enumerate((f"cxr-batch triage model {record.model or 'unknown'}, bundle sha256 "
                                  f"{record.weights_sha256 or 'unknown'}", _disclaimer()), start=1):
            note = order.add_segment("NTE")
            note.nte_1, note.nte_3 = str(k), escape(text)
        code = priority_code(scores.priority, normal_below)  # the SR's words for the bucket
        _observation(order, 1, "CE", PRIORITY_OBSERVATION,
                     f"{escape(code.value)}^{escape(code.meaning)}^{LOCAL_CODES}", PRIORITY_FLAGS[scores.priority],
                     times=times)
        for k, finding in enumerate(FINDINGS):
            code = FINDING_CODES[finding]
            threshold = None if thresholds is None else thresholds.get(finding)
            group = _observation(order, k + 2, "NM",
                                 f"{escape(code.value)}^{escape(code.meaning)}^{escape(code.scheme_designator)}",
                                 f"{float(scores.probs[k]):.6f}", _flag(bool(scores.flags[k]), finding in urgent),
                                 reference_range=None if threshold is None else f"<{float(threshold):.6f}",
                                 times=times)
            if scores.flags[k] and trust and trust.get(finding):
                # a RIS showed a bare "A"/"AA" where the PDF and the SR say the flag's sensitivity
                # and PPV (v3's pneumothorax: 0 of 10 held out): the ORU says it beside the flag too
                note = group.add_segment("NTE")
                note.nte_1, note.nte_3 = "1", escape(trust[finding])
        # what orders the study inside its priority, as on the worklist (cxr_batch.triage): a RIS
        # that sorts by priority, then by this, reads the studies in cxr-batch's worklist order
        _observation(order, len(FINDINGS) + 2, "NM", ORDER_OBSERVATION, f"{float(scores.triage_score):.6f}", "",
                     times=times)
        if scores.p_any is not None:
            _observation(order, len(FINDINGS) + 3, "NM", ANY_FINDING_OBSERVATION, f"{float(scores.p_any):.6f}", "",
                         times=times)
        m.validate()
        return m.to_er7() + "\r"
    except (HL7apyException, ValueError) as e:  # hl7apy says ValueError of a date it refuses
        raise HL7NotMade(f"hl7apy refused the message: {_refusal(e, ids)}") from None


# HL7 v2.5's lengths of the parts of PID-3 taken from the header's issuer (HD.1 IS, HD.2 ST,
# HD.3 ID, CX.5 ID); a part that does not fit is left out rather than cut (another issuer's name)
_ISSUER_LENGTHS = {"namespace": 20, "universal_id": 199, "universal_id_type": 6, "type_code": 5}


def patient_identifier(ids) -> str:
    """PID-3 (CX): the patient ID with the authority that issued it (CX.4, an HD: namespace &
    universal ID & its type) and the identifier's type (CX.5), as PS3.17's HL7 v2 mapping reads
    IssuerOfPatientID and its qualifiers. "P1" of one site is another patient than "P1" of the
    next; a RIS matching on the identifier list needs the issuer to tell them apart. Parts the
    header lacks, or that HL7 cannot hold, are left out (the bare ID, as before, when none)."""
    def part(value: str, name: str) -> str:
        value = escape(value)
        if len(value) > _ISSUER_LENGTHS[name]:
            log.warning("the patient ID's issuer (%s) is longer than HL7 v2.5 takes (%d characters): PID-3 goes "
                        "without it", name.replace("_", " "), _ISSUER_LENGTHS[name])
            return ""
        return value

    namespace = part(ids.issuer_of_patient_id, "namespace")
    universal_id, kind = part(ids.issuer_universal_id, "universal_id"), part(ids.issuer_universal_id_type,
                                                                             "universal_id_type")
    if not (universal_id and kind):  # HD.2 and HD.3 go together (HL7 v2.5 2.A.33)
        universal_id = kind = ""
    authority = "&".join((namespace, universal_id, kind)).rstrip("&")
    components = [escape(ids.patient_id), "", "", authority, part(ids.patient_id_type, "type_code")]
    return "^".join(components).rstrip("^")


def _refusal(e, ids) -> str:
    """Why hl7apy refused, without the value it refused: its messages quote it, and the reason
    goes to the log and to results.csv's notes (a name whose escaped delimiters take it past
    HL7's 199 characters would be written there in full)."""
    from hl7apy.exceptions import MaxLengthReached

    if isinstance(e, MaxLengthReached):
        return f"a value (a name or an ID) is longer than HL7 v2.5 allows ({e.limit} characters)"
    said = str(e)
    for value in (ids.patient_id, ids.patient_name, ids.accession_number, ids.patient_birth_date, ids.study_date):
        # a name's components in every group (alphabetic=ideographic=phonetic), as hl7apy quotes them
        for part in {value, escape(value), *(escape(p) for p in re.split("[=^]", value))} - {""}:
            said = said.replace(part, "...")
    return f"{type(e).__name__}: {said}"


def _disclaimer() -> str:
    from ..reports import DISCLAIMER

    return DISCLAIMER


def _observation(order, set_id: int, value_type: str, identifier: str, value: str, flag: str,
                 reference_range: str | None = None, times: tuple[str, str] = ("", "")):
    """An OBX in an observation group of its own; the group (for an NTE under it). ``times``:
    OBX-14 (when observed) and OBX-19 (when analysed), HL7 TS."""
    group = order.add_group("ORU_R01_OBSERVATION")
    obx = group.obx
    obx.obx_1, obx.obx_2, obx.obx_3, obx.obx_5 = str(set_id), value_type, identifier, value
    if value_type == "NM":
        obx.obx_6 = "{probability}^probability^UCUM"
    if reference_range:
        obx.obx_7 = reference_range
    if flag:
        obx.obx_8 = flag
    obx.obx_11 = "P"
    observed, analysed = times
    if observed:
        obx.obx_14 = observed
    if analysed:
        obx.obx_19 = analysed
    return group


def message_control_id(message: str) -> str:
    """MSH-10 of an ER7 message (our own: ``|`` field separator)."""
    msh = message.split("\r", 1)[0]
    fields = msh.split(msh[3:4] or "|")
    if not msh.startswith("MSH") or len(fields) < 10:
        raise ValueError("not an HL7 message (no MSH with a control id)")
    return fields[9]


def whole_message(message: str, control: str) -> bool:
    """Whether ``message`` is a whole ORU^R01 of :func:`oru_r01` with MSH-10 ``control``: an ORU
    file cut short (a failed disk or copy) is still HL7, and a RIS would take a result with
    findings missing. It ends with the CR of its last observation (the worklist order, or
    P(any finding) after it), OBX-11 included, and OBX-19 (its time stamp with its offset)
    where the message has one (one queued by a release before OBX-14 and OBX-19 ends at OBX-11)."""
    try:
        if message_control_id(message) != control or not message.endswith("\r"):
            return False
    except ValueError:
        return False
    last = message[:-1].rsplit("\r", 1)[-1].split("|")
    whole_last = len(last) == 12 or len(last) == 20 and re.fullmatch(r"\d{14}[+-]\d{4}", last[19])
    return bool(whole_last and last[0] == "OBX" and last[11] == "P"
                and last[3] in (ORDER_OBSERVATION, ANY_FINDING_OBSERVATION))


# ------------------------------------------------------------------ MLLP
@dataclass(frozen=True)
class Ack:
    code: str  # MSA-1
    control_id: str  # MSA-2
    text: str = ""  # MSA-3, unescaped


def frame(message: str) -> bytes:
    """The MLLP block of ``message``: 0x0B, the UTF-8 text, 0x1C 0x0D."""
    return START_BLOCK + message.encode("utf-8") + END_BLOCK


def read_ack(text: str) -> Ack:
    """MSA-1, MSA-2 and MSA-3 of an ACK (any HL7 v2 version hl7apy knows); ValueError when
    ``text`` is not one."""
    from hl7apy.consts import VALIDATION_LEVEL
    from hl7apy.exceptions import HL7apyException
    from hl7apy.parser import parse_message

    segments = [s for s in text.replace("\n", "\r").split("\r") if s]
    if not segments or not segments[0].startswith("MSH"):
        raise ValueError("not an HL7 ACK (it does not begin with an MSH segment)")
    msa = next((s for s in segments if s.startswith("MSA")), None)
    if msa is None:
        raise ValueError("an ACK without an MSA segment")
    # only what is read: hl7apy's parser takes time quadratic in the segments, components and
    # repetitions of what it is given (minutes for an ACK of 600 kB), an ACK a few hundred bytes
    text = "\r".join((_known_version(segments[0][:ACK_SEGMENT_CHARS]), msa[:ACK_SEGMENT_CHARS]))
    try:
        message = parse_message(text, validation_level=VALIDATION_LEVEL.TOLERANT, find_groups=False)
        msa = message.msa
        code = msa.msa_1.value.strip().upper()
        control = msa.msa_2.value
        answer = msa.msa_3.value if msa.msa_3 else ""
    except (HL7apyException, AttributeError, IndexError, ValueError, KeyError) as e:
        raise ValueError(f"not an HL7 ACK ({type(e).__name__}: {e})") from None
    if not code:
        raise ValueError("an ACK without MSA-1")
    return Ack(code, unescape(control), unescape(answer))


class MllpReader:
    """The first MLLP block of bytes arriving piece by piece (bytes before its 0x0B are
    ignored), each byte looked at once: searching all that arrived at every piece cost 15 s of
    CPU for 1 MiB sent 50 bytes at a time."""

    def __init__(self):
        self.received = bytearray()
        self.start = -1  # where the block's 0x0B is, once seen
        self.looked = 0  # where the search goes on

    def __len__(self) -> int:
        return len(self.received)

    def add(self, piece: bytes) -> bytes | None:
        """The block's content once complete, else None."""
        self.received += piece
        if self.start < 0:
            self.start = self.received.find(START_BLOCK, self.looked)
            if self.start < 0:
                self.looked = len(self.received)
                return None
            self.looked = self.start + 1
        end = self.received.find(END_BLOCK, self.looked)
        if end >= 0:
            return bytes(self.received[self.start + 1:end])
        self.looked = max(self.start + 1, len(self.received) - len(END_BLOCK) + 1)  # an end cut in two
        return None

    def closed(self) -> bytes | None:
        """The block's content when the peer hung up right after its 0x1C without the 0x0D
        (some RIS interfaces end a block so), else None."""
        if self.start >= 0 and self.received.endswith(END_BLOCK[:1]):
            return bytes(self.received[self.start + 1:-1])
        return None


def _known_version(msh: str) -> str:
    """``msh`` with an MSH-12 hl7apy does not know (2.9, a RIS newer than the library) read as
    2.5, and MSH-2 cut to the four encoding characters every version has: MSA-1 to MSA-3, all
    that is read of an ACK, are the same in every v2 version, and an ACK refused for its version
    left every message to be sent again for ever."""
    from hl7apy import SUPPORTED_LIBRARIES

    fields = msh.split(msh[3:4] or "|")
    if len(fields) > 11 and fields[11].split(msh[4:5] or "^")[0] not in SUPPORTED_LIBRARIES:
        fields[11] = VERSION
    if len(fields) > 1 and len(fields[1]) > 4:
        # v2.7+ adds a fifth encoding character, the truncation character (MSH-2 '^~\&#'), which
        # hl7apy refuses below v2.7: MSA-1 to MSA-3 are read without it
        fields[1] = fields[1][:4]
    return (msh[3:4] or "|").join(fields)


# What answers at a wrong --hl7-to port, told by its first bytes (which are never quoted: they are
# the peer's, and may be anything)
_OTHER_PROTOCOLS = ((b"HTTP/", "an HTTP server"), (b"\x15\x03", "a TLS server"), (b"\x16\x03", "a TLS server"),
                    (b"SSH-", "an SSH server"))


def _not_mllp(reader: MllpReader, endpoint: Endpoint) -> str:
    """When ``endpoint`` answered, but nothing of an MLLP block: what it seems to be, and what to
    check; "" when it answered nothing (or began a block)."""
    if not len(reader) or reader.start >= 0:
        return ""
    head = bytes(reader.received[:8])
    what = next((name for prefix, name in _OTHER_PROTOCOLS if head.startswith(prefix)), "")
    said = f"{what} answered" if what else f"it answered {len(reader)} bytes that are not HL7 over MLLP"
    return f"{endpoint} is not an HL7 listener: {said}; check the RIS's MLLP port (--hl7-to HOST:PORT)"


def _exchange(data: bytes, endpoint: Endpoint, timeout: float) -> bytes | Delivery:
    """Send ``data`` and read one MLLP block back; a Delivery (retry) when that fails."""
    deadline = time.monotonic() + timeout
    try:
        sock = socket.create_connection((endpoint.host, endpoint.port), timeout=timeout)
    except (OSError, UnicodeError) as e:  # UnicodeError: a name the IDNA codec refuses
        return Delivery.retry(f"cannot connect to {endpoint}: {connect_error(e, endpoint.host)}", unsent=True)
    reader, block = MllpReader(), None
    with sock:
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.sendall(data)
            while block is None:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise socket.timeout
                sock.settimeout(remaining)
                chunk = sock.recv(65536)
                if not chunk:
                    block = reader.closed()
                    if block is not None:
                        break
                    return Delivery.retry(_not_mllp(reader, endpoint)
                                          or f"{endpoint} closed the connection without an ACK")
                block = reader.add(chunk)
                if block is None and len(reader) > MAX_ACK_BYTES:
                    return Delivery.retry(f"{endpoint} sent over {MAX_ACK_BYTES} bytes without an MLLP block")
        except socket.timeout:
            return Delivery.retry(_not_mllp(reader, endpoint) or f"no ACK from {endpoint} within {timeout:g} s")
        except OSError as e:  # a wrong port's server may reset the connection once it has answered
            return Delivery.retry(_not_mllp(reader, endpoint) or f"connection to {endpoint} failed: "
                                                                 f"{type(e).__name__}: {e}")
    return block


def send_message(message: str, endpoint: Endpoint, *, timeout: float = 30.0) -> Delivery:
    """Send one ER7 ``message`` to ``endpoint`` and read its ACK; never raises for network or
    peer failures (the Delivery says what to do)."""
    control = message_control_id(message)
    answer = _exchange(frame(message), endpoint, timeout)
    if isinstance(answer, Delivery):
        log.warning("HL7 %s to %s: %s", control, endpoint, answer.reason)
        return answer
    try:
        ack = read_ack(answer.decode("utf-8", "replace"))
    except ValueError as e:
        log.warning("HL7 %s to %s: unreadable answer", control, endpoint)
        return Delivery.retry(f"unreadable ACK from {endpoint}: {e}")
    if ack.control_id != control:
        log.warning("HL7 %s to %s: ACK for another message", control, endpoint)
        return Delivery.retry(f"ACK for message {ack.control_id!r}, not {control!r}")
    said = f"{ack.code}" + (f": {ack.text}" if ack.text else "")
    if ack.code in ACK_DELIVERED:
        log.debug("HL7 %s to %s: %s", control, endpoint, ack.code)
        return Delivery.delivered(said)
    log.warning("HL7 %s to %s: %s", control, endpoint, shown(ack.code, 16))  # the RIS's text
    code = shown(ack.code, 16)  # the log has the code, not MSA-3 (it may quote the patient)
    if ack.code in ACK_REJECTED:
        what = "found an error in" if ack.code == "AE" else "rejected"
        return Delivery.rejected(f"the RIS {what} the message ({said})", f"the RIS {what} the message ({code})")
    if ack.code in ACK_RETRY:
        return Delivery.retry(f"the RIS could not process the message now ({said})",
                              log_reason=f"the RIS could not process the message now ({code})")
    return Delivery.retry(f"unknown acknowledgment code ({said})", log_reason=f"unknown acknowledgment code ({code})")

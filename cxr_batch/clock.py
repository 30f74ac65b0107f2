"""The clock the times cxr-batch sends out are read from: the DICOM SR's dates and times and
the HL7 ORU's time stamps. One place to read it (and to set it in tests).

Each time goes out with the UTC offset in force at the moment it was read (DICOM's Timezone
Offset From UTC, HL7's ``+ZZZZ``), never alone: on the night a DST clock goes back, a corrected
result made at 02:15 (+0100) is later than the original made at 02:30 (+0200); without the
offset it reads as the older of the two.
"""

from __future__ import annotations

import datetime as dt
import re

# DICOM's Timezone Offset From UTC (PS3.3 C.12.1.1.8): -1200 to +1400. ASCII digits only: a
# str pattern's \d (and int()) takes any script's ('+0\u066100' in a UTF-8 header's SH), which
# went out as is in OBR-7 and the SR, and hl7apy refused the ORU: the study reached no RIS
_OFFSET = re.compile(r"([+-])(0\d|1[0-4])([0-5]\d)", re.ASCII)


def utc_now() -> dt.datetime:
    """Now, in UTC (aware)."""
    return dt.datetime.now(dt.timezone.utc)


def local_now() -> dt.datetime:
    """Now as a local time with the offset in force at this moment (aware). Taken from the UTC
    moment, so the hour a DST clock goes back, which the local time alone names twice, gets
    the right one of its two offsets."""
    return whole_minutes(utc_now().astimezone())


def aware(moment: dt.datetime) -> dt.datetime:
    """``moment`` with its UTC offset: an aware one as it is, a naive one read as local time."""
    return whole_minutes(moment if moment.tzinfo is not None else moment.astimezone())


def whole_minutes(moment: dt.datetime) -> dt.datetime:
    """The same moment with an offset of whole minutes, all DICOM and HL7 can write: a zone's
    offset had seconds before 1972 (Africa/Monrovia -00:44:30; a clock reset to 1970 by a dead
    RTC battery reads it), and the offset cut to -0044 beside a local time that kept the 30
    seconds named another moment than the one meant."""
    offset = moment.utcoffset()
    if offset is None or offset.seconds % 60 == 0 and not offset.microseconds:
        return moment
    return moment.astimezone(dt.timezone(dt.timedelta(minutes=round(offset.total_seconds() / 60))))


def utc_offset(moment: dt.datetime) -> str:
    """The ``+HHMM`` / ``-HHMM`` offset of an aware ``moment`` (DICOM's Timezone Offset From
    UTC and HL7's TS write it so)."""
    return moment.strftime("%z")[:5]


def valid_offset(text: str) -> bool:
    """Whether ``text`` is a UTC offset DICOM can say (``+HHMM``/``-HHMM``, -1200 to +1400)."""
    m = _OFFSET.fullmatch(text or "")
    return bool(m) and -12 * 60 <= _minutes(m) <= 14 * 60


def at_offset(moment: dt.datetime, offset: str) -> dt.datetime:
    """The aware ``moment`` at the UTC ``offset`` (``-0500``), the same moment; as it is when
    ``offset`` is not one. A DICOM object has one offset for all of its times: one made for a
    study whose source says its offset writes its own times at that offset, so the study
    date/time it copies keeps its meaning."""
    if not valid_offset(offset):
        return moment
    return moment.astimezone(dt.timezone(dt.timedelta(minutes=_minutes(_OFFSET.fullmatch(offset)))))


def _minutes(m: re.Match) -> int:
    return (-1 if m.group(1) == "-" else 1) * (60 * int(m.group(2)) + int(m.group(3)))

"""How values read to a person: finding names, dates, times, ages, person names, right-to-left
text, and any text from outside (a path, a header value, a peer's reply) on a console or log line.

Reports, the worklist and monitor.pdf show values through these functions only, so a finding, a
date, a time or an age reads the same everywhere a person sees it. results.csv keeps the raw
values (its study date is written with format_date too: YYYY-MM-DD).
"""

from __future__ import annotations

import datetime as dt
import math
import os
import re
import time
import unicodedata
import zoneinfo

DAYS_PER_YEAR = 365.25
_DATE = re.compile(r"^(\d{4})[-.]?(\d{2})[-.]?(\d{2})$")  # DICOM DA, ACR-NEMA YYYY.MM.DD, ISO


def finding_label(name: str) -> str:
    """A finding as a person reads it: ``Pleural_Thickening`` -> ``Pleural thickening``."""
    words = name.split("_")
    return " ".join([words[0]] + [w.lower() for w in words[1:]])


def format_date(raw: str | None) -> str | None:
    """A study date as ``YYYY-MM-DD`` from DICOM ``YYYYMMDD``, ``YYYY.MM.DD`` or ISO text (a
    time after the date is dropped). None for an empty or invalid value."""
    text = (raw or "").strip()
    match = _DATE.match(text[:10] if len(text) > 10 and text[10] in "T " else text)
    if not match:
        return None
    try:
        return dt.date(*map(int, match.groups())).isoformat()
    except ValueError:  # 2024-02-30 and the like
        return None


def format_time(moment: dt.datetime) -> str:
    """``2024-04-15 10:32:05 CEST (UTC+02:00)`` or ``... UTC+00:00``: the time with its zone's
    name and offset, so readers in other zones are not misled (a naive time is taken as local)."""
    if moment.tzinfo is None:
        moment = moment.astimezone()
    offset = moment.strftime("%z")
    zone, name = f"UTC{offset[:3]}:{offset[3:]}", moment.tzname() or ""
    if name in time.tzname and not _local_zone_known():
        name = ""  # TZ=Europe/Berln: UTC, under the name "Europe"
    if not name or name.startswith(("UTC", "GMT", "+", "-")):  # no abbreviation: the offset says it all
        return f"{moment:%Y-%m-%d %H:%M:%S} {zone}"
    return f"{moment:%Y-%m-%d %H:%M:%S} {name} ({zone})"


def _local_zone_known() -> bool:
    """Whether the local zone's abbreviation means something: TZ unset, a file (``:path``), a
    POSIX rule (its offset has digits) or a zone the system has. A mistyped zone name is UTC to
    the C library, named after its first word."""
    tz = os.environ.get("TZ")
    if tz is None or tz.startswith(":") or any(c.isdigit() for c in tz):
        return True
    try:
        zoneinfo.ZoneInfo(tz)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError):
        return False
    return True


def is_dicom_date(text: str) -> bool:
    """8 ASCII digits of a real date: what a DICOM DA or an HL7 date may be written as
    (strptime alone takes '2024311' and '1950 2 3')."""
    return len(text) == 8 and text.isascii() and text.isdigit() and format_date(text) is not None


def plural(n: int, noun: str, nouns: str = "") -> str:
    """A count with its noun in the number it takes: ``1 study``, ``2 studies``, ``0 files``.
    ``nouns``: the plural when it is not the noun with -s (or -y made -ies)."""
    if n == 1:
        return f"{n} {noun}"
    if not nouns:
        nouns = noun[:-1] + "ies" if noun.endswith("y") and noun[-2:-1] not in "aeiou" else noun + "s"
    return f"{n} {nouns}"


def format_age(years: float | None) -> str | None:
    """An age as a report gives it: completed years, months under one year, days under one
    month (``57 years``, ``6 months``, ``10 days``). None when unknown."""
    if years is None or not math.isfinite(years) or years < 0:
        return None
    days = years * DAYS_PER_YEAR
    if days < 29.5:  # a month old from 30 days: "1 month" for DICOM "001M" (30.4 days)
        return plural(round(days), "day")
    if years < 1:
        return plural(max(1, int(years * 12 + 1e-3)), "month")  # 1e-3: ages are stored rounded
    return plural(int(years + 1e-6), "year")


def _person_group(group: str) -> str:
    """One PN component group ``FAMILY^GIVEN^MIDDLE^PREFIX^SUFFIX`` -> ``FAMILY, PREFIX GIVEN MIDDLE, SUFFIX``."""
    family, given, middle, prefix, suffix = ([p.strip() for p in group.split("^")] + [""] * 5)[:5]
    first = " ".join(p for p in (prefix, given, middle) if p)
    return ", ".join(p for p in (family, first, suffix) if p)


def person_name(raw: str | None, can_draw=lambda text: True) -> str:
    """A patient name for display, from plain text or the DICOM PN form
    ``FAMILY^GIVEN^MIDDLE^PREFIX^SUFFIX`` with up to three ``=`` groups (alphabetic,
    ideographic, phonetic).

    The family name comes first, followed by a comma (``DOE, JANE``), the order radiology
    worklists and reports use (and DICOM and HL7 store): it sorts by family name and never
    leaves a reader guessing which part is the family name, whatever the culture's usual
    order. The case is kept as recorded (upper-casing corrupts names such as McDonald). The
    ideographic group follows in parentheses when ``can_draw`` says the font has its glyphs;
    the phonetic group (a pronunciation aid) is not shown. Plain text comes back unchanged
    apart from spacing.
    """
    text = " ".join((raw or "").split())
    if "^" not in text and "=" not in text:
        return text
    groups = [_person_group(g) for g in text.split("=")[:2]]
    main = groups[0] or next((g for g in groups[1:] if g and can_draw(g)), "")
    extra = [g for g in groups[1:] if g and g != main and can_draw(g)]
    return main + "".join(f" ({g})" for g in extra)


def is_right_to_left(text: str) -> bool:
    """Whether ``text`` holds a right-to-left letter (Hebrew, Arabic, ...)."""
    return any(unicodedata.bidirectional(ch) in ("R", "AL") for ch in text)


def visual_order(text: str) -> str:
    """Text as a left-to-right renderer (the PDF library) must draw it: Arabic letters in their
    joined contextual forms (arabic-reshaper) and right-to-left runs reordered by the Unicode
    bidirectional algorithm (python-bidi). Left-to-right text is returned unchanged. For one
    line: a paragraph that wraps must be reordered line by line, so callers give short text."""
    if not is_right_to_left(text):
        return text
    import arabic_reshaper
    from bidi import get_display

    # letters joined, but no word ligature: 'الله' as one glyph (U+FDF2, on by default) is missing
    # from report fonts (DejaVu Sans), and a name is shown letter by letter as it was written
    reshaper = arabic_reshaper.ArabicReshaper(configuration={"ARABIC LIGATURE ALLAH": False})
    return get_display(reshaper.reshape(text))


# C0 and C1 control characters and DEL as text (\x1b, \n): a folder named '\x1b[2J' or a
# peer's reply cannot clear or retitle the terminal, or a log viewer reading 2>file, nor end a
# line and forge the next. The backslash itself is kept: text made visible once is not changed again.
CONTROL_ESCAPES = {**{c: f"\\x{c:02x}" for c in (*range(0x20), *range(0x7F, 0xA0))}, 0x0A: "\\n", 0x0D: "\\r",
             0x09: "\\t"}


def visible(text) -> str:
    """``text`` fit for one console or log line: its control characters shown as escapes
    (``\\x1b[2J``), anything else, accented or right-to-left letters included, as it is."""
    return str(text).translate(CONTROL_ESCAPES)


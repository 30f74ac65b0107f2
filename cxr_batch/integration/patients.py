"""Whom an object belongs to, as a DICOM peer says it, and when two say different patients.

A pull checks each arriving object against the patient its study's C-FIND answered
(cxr_batch.integration.pull); the node (listen, pull) holds back a study whose images name two
patients (:func:`two_patients`): scored under one Study Instance UID, one patient's result would be
filed in the other's study. Log lines name patient IDs, never a name or a birth date.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass

from ..display import format_date
from .node import printable


def _name_key(text: str) -> str:
    """A person name as compared (:func:`_same_name`): the alphabetic group alone, its
    components split on "^" and their words on anything not a letter or digit, upper case,
    trailing empty components dropped ("doe^jane^^" and "DOE^JANE" are one name). A word with a
    letter outside ASCII keeps its ASCII letters and digits, marked "~": such a word is written
    otherwise by another system ('MÜLLER' as 'MULLER', 'MUELLER', or read as Latin-1 from UTF-8
    'MÃ\x9cLLER'), and upper() makes ASCII of some ('ß' -> 'SS') on one side only."""
    def word(w: str) -> str:
        ascii_part = re.sub(r"[^A-Za-z0-9]", "", w).upper()
        return ascii_part if w.isascii() else f"~{ascii_part}"

    alphabetic = unicodedata.normalize("NFC", text.split("=")[0])  # "Ü" as one letter, not "U" and its mark
    components = [" ".join(word(w) for w in re.findall(r"[^\W_]+", c)) for c in alphabetic.split("^")]
    while components and not components[-1]:
        components.pop()
    return "^".join(components)


def _same_word(a: str, b: str) -> bool:
    """Whether two words of :func:`_name_key` may be one: equal, or a marked word's ASCII
    letters in order within the other's (MLLER in MUELLER, MULLER and MLLER)."""
    def within(short: str, long: str) -> bool:
        rest = iter(long)
        return all(ch in rest for ch in short)

    marked_a, marked_b = a.startswith("~"), b.startswith("~")
    a, b = a.lstrip("~"), b.lstrip("~")
    return a == b or (marked_a and within(a, b)) or (marked_b and within(b, a))


def _same_name(a: str, b: str) -> bool:
    """Whether two names of :func:`_name_key` may be one person's: each component both give
    agrees (a middle name, a prefix or a given name one system leaves out is not compared); or,
    typed without "^" on one side ("DOE JOHN", "DOE, JOHN"), each word of the one with fewer
    matches another word of the other, in any order."""
    def glued(component: str) -> str:
        words = component.split()
        return ("~" if any(w.startswith("~") for w in words) else "") + "".join(w.lstrip("~") for w in words)

    if all(_same_word(glued(x), glued(y)) for x, y in zip(a.split("^"), b.split("^")) if x and y):
        return True
    fewer, more = sorted((a.replace("^", " ").split(), b.replace("^", " ").split()), key=len)
    for w in fewer:
        match = next((i for i, m in enumerate(more) if _same_word(w, m)), None)
        if match is None:
            return False
        del more[match]
    return bool(fewer)


def _date_key(text: str) -> str:
    """A birth date as compared: DA (YYYYMMDD) when a date can be read from it; else empty, not
    compared (a modality's 00000000 for a date not given, a year alone)."""
    iso = format_date(text)
    return iso.replace("-", "") if iso else ""


def _sex_key(text: str) -> str:
    """M or F as compared; "O" (other, what a modality writes when none was given) and anything
    else is not compared."""
    sex = text.strip().upper()
    return sex if sex in ("M", "F") else ""


@dataclass(frozen=True)
class Patient:
    """Whom a study belongs to, as a C-FIND answered it, an object's header or a scored record."""

    id: str = ""
    issuer: str = ""
    name: str = ""  # as compared (_name_key): "DOE^JANE"
    birth_date: str = ""  # DA, YYYYMMDD, or "" (_date_key)
    sex: str = ""  # M, F or "" (a frontal and a lateral of one study that disagree are two patients)

    @classmethod
    def of(cls, ds) -> "Patient":
        """The patient keys of a C-FIND answer or an object's header; a value with no usable
        text is empty."""
        def text(key: str) -> str:
            try:
                return str(ds.get(key, "") or "").strip()
            except Exception:  # a value its character set cannot decode
                return ""

        return cls(text("PatientID"), text("IssuerOfPatientID"), _name_key(text("PatientName")),
                   _date_key(text("PatientBirthDate")), _sex_key(text("PatientSex")))

    @classmethod
    def of_ids(cls, ids) -> "Patient":
        """The patient of a record's :class:`~cxr_batch.study.Identifiers`."""
        return cls(ids.patient_id, ids.issuer_of_patient_id, _name_key(ids.patient_name), _date_key(ids.patient_birth_date),
                   _sex_key(ids.patient_sex))

    def _first_difference(self, other: "Patient") -> str:
        """The first key both give with different values ("" when none): a value empty on
        either side is not compared (a PACS answering no issuer, an object without a name)."""
        for key in ("id", "issuer", "name", "birth_date", "sex"):
            a, b = getattr(self, key), getattr(other, key)
            if a and b and a != b and not (key == "name" and _same_name(a, b)):
                return key
        return ""

    def differs(self, other: "Patient") -> str:
        """How ``other`` (an arriving object's header) names another patient than this one (the
        C-FIND's answer), for a log line: the two IDs quoted, never a name; "" when it does not."""
        key = self._first_difference(other)
        if key == "id":
            return f"patient ID '{printable(other.id)}' where the C-FIND answered '{printable(self.id)}'"
        if key == "issuer":
            return (f"issuer of patient ID '{printable(other.issuer)}' where the C-FIND answered "
                    f"'{printable(self.issuer)}' (patient ID '{printable(self.id or other.id)}')")
        if key == "name":
            return f"another patient name than the C-FIND answered (patient ID '{printable(self.id or other.id)}')"
        if key in ("birth_date", "sex"):
            return (f"another {key.replace('_', ' ')} than the C-FIND answered (patient ID "
                    f"'{printable(self.id or other.id)}')")
        return ""

    def apart(self, other: "Patient") -> str:
        """How this patient and ``other`` are two, said alike whichever came first: "patient
        IDs 'A' and 'B'", or the one ID and what differs; "" when they may be one patient."""
        key = self._first_difference(other)
        if not key:
            return ""
        first, second = sorted((self, other), key=lambda p: (p.id, p.issuer, p.name, p.birth_date, p.sex))
        if key == "id":
            return f"patient IDs '{printable(first.id)}' and '{printable(second.id)}'"
        same = f"patient ID '{printable(self.id or other.id)}'"
        if key == "issuer":
            return f"{same} of two issuers, '{printable(first.issuer)}' and '{printable(second.issuer)}'"
        return f"{same} with two {dict(name='names', birth_date='birth dates', sex='sexes')[key]}"


def two_patients(patients) -> str:
    """How ``patients`` (of one study) hold two patients (:meth:`Patient.apart` of the first
    pair found), "" when they may all be one."""
    patients = list(dict.fromkeys(patients))  # a study of many images of one patient: one
    for i, one in enumerate(patients):
        for other in patients[i + 1:]:
            if said := one.apart(other):
                return said
    return ""

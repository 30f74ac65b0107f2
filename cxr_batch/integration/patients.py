"""Whom an object belongs to, as a DICOM peer says it, and when two say different patients.

A pull checks each arriving object against the patient its study's C-FIND answered
(cxr_batch.integration.pull); the node (listen, pull) holds back a study whose images name two
patients (:func:`two_patients`): scored under one Study Instance UID, one patient's result would be
filed in the other's study. Held back, no radiologist sees the study in the worklist: what a PACS
administrator takes for one patient written otherwise by another system (padding, case, leading
zeros, another romanisation or character set, another issuer's ID named among the Other Patient
IDs) is one patient. Log lines name patient IDs, never a name or a birth date.
"""

from __future__ import annotations

import re
import unicodedata
from collections import Counter
from dataclasses import dataclass, replace

from ..display import format_date
from .node import printable


def _name_key(text: str) -> str:
    """A person name as compared (:func:`_same_name`): the alphabetic group alone, its
    components split on "^" and their words on anything not a letter or digit, upper case,
    trailing empty components dropped ("doe^jane^^" and "DOE^JANE" are one name). A word with a
    letter outside ASCII keeps its ASCII letters and digits, marked "~": such a word is written
    otherwise by another system ('MÜLLER' as 'MULLER', 'MUELLER', or read as Latin-1 from UTF-8
    'MÃ\x9cLLER'), and upper() makes ASCII of some ('ß' -> 'SS') on one side only. A word
    without an ASCII letter or digit (Cyrillic, Greek, kanji written in the alphabetic group)
    keeps its letters, marked "!" (:func:`_script_word`): 'ИВАНОВ' and 'ПЕТРОВ' are two names,
    not two words with nothing to compare."""
    def word(w: str) -> str:
        ascii_part = re.sub(r"[^A-Za-z0-9]", "", w).upper()
        if w.isascii():
            return ascii_part
        return f"~{ascii_part}" if ascii_part else f"!{_script_word(w)}"

    alphabetic = unicodedata.normalize("NFC", text.split("=")[0])  # "Ü" as one letter, not "U" and its mark
    components = [" ".join(word(w) for w in re.findall(r"[^\W_]+", c)) for c in alphabetic.split("^")]
    while components and not components[-1]:
        components.pop()
    return "^".join(components)


def _script_word(word: str) -> str:
    """A word of another script than Latin as compared: NFKC, upper case, hiragana as katakana
    (one reading), without accents and other combining marks ('СЕМЁНОВ' as 'СЕМЕНОВ', 'ΝΊΚΟΣ' as
    'ΝΙΚΟΣ', as one system writes and another leaves out) but the kana's voicing marks ('ダ' is not
    'タ')."""
    word = _kana_as_katakana(unicodedata.normalize("NFKC", word).upper())
    return unicodedata.normalize("NFC", "".join(ch for ch in unicodedata.normalize("NFD", word)
                                                 if not unicodedata.combining(ch) or ch in "\u3099\u309a"))


def _kana_as_katakana(text: str) -> str:
    return "".join(chr(ord(ch) + 0x60) if "\u3041" <= ch <= "\u3096" else ch for ch in text)


def _group_keys(text: str) -> tuple[str, str]:
    """The ideographic and phonetic groups of a person name ("Yamada^Tarou=山田^太郎=やまだ^たろう"),
    as compared: NFKC (half-width kana and full-width letters as their usual forms), hiragana as
    katakana (one reading), upper case, without spaces or punctuation, trailing empty
    components dropped; "" for a group not given."""
    def key(group: str) -> str:
        group = unicodedata.normalize("NFKC", group).upper()
        group = _kana_as_katakana(group)
        components = [re.sub(r"[\W_]+", "", c) for c in group.split("^")]
        while components and not components[-1]:
            components.pop()
        return "^".join(components)

    groups = text.split("=")[1:3]
    return tuple(key(g) for g in groups) + ("",) * (2 - len(groups))


def _id_key(text: str) -> str:
    """A patient ID as compared (padding is stripped when read): an ID of digits alone without
    its leading zeros, as a system keeping the number writes it where the issuer pads it to a
    width ("00012345" and "12345" are one ID); any other ID as written."""
    return (text.lstrip("0") or "0") if text.isascii() and text.isdigit() else text


def _same_word(a: str, b: str) -> bool:
    """Whether two words of :func:`_name_key` may be one: equal, equal but for a Japanese long
    vowel's romanisation (TAROU, TAROH, TARO), or a marked word's ASCII letters in order within
    the other's (MLLER in MUELLER, MULLER and MLLER); words of another script than Latin
    (marked "!") equal, beside a Latin word always (a transliteration, not compared)."""
    def within(short: str, long: str) -> bool:
        rest = iter(long)
        return all(ch in rest for ch in short)

    def long_vowels(w: str) -> str:  # Hepburn's long vowel romanised otherwise: ŌNO, OHNO, OONO, ONO; YUUKI, YUKI
        return re.sub(r"UU", "U", re.sub(r"O[UOH](?![AEIOU])", "O", w))

    if a.startswith("!") or b.startswith("!"):
        return a == b or not (a.startswith("!") and b.startswith("!"))
    marked_a, marked_b = a.startswith("~"), b.startswith("~")
    a, b = a.lstrip("~"), b.lstrip("~")
    return (a == b or long_vowels(a) == long_vowels(b) or (marked_a and within(a, b))
            or (marked_b and within(b, a)))


def _same_name(a: str, b: str) -> bool:
    """Whether two names of :func:`_name_key` may be one person's: each component both give
    agrees (a middle name, a prefix or a given name one system leaves out is not compared); or,
    typed without "^" on one side ("DOE JOHN", "DOE, JOHN"), each word of the one with fewer
    matches another word of the other, in any order, or the letters of the two are one run
    (a script written without spaces: "李^明" typed "李明")."""
    def glued(component: str) -> str:
        words = component.split()
        if words and all(w.startswith("!") for w in words):
            return "!" + "".join(w[1:] for w in words)
        ascii_words = ["" if w.startswith("!") else w.lstrip("~") for w in words]  # another script's: no ASCII
        return ("~" if any(w[:1] in "~!" for w in words) else "") + "".join(ascii_words)

    if all(_same_word(glued(x), glued(y)) for x, y in zip(a.split("^"), b.split("^")) if x and y):
        return True
    if re.sub(r"[\^ ~!]", "", a) == re.sub(r"[\^ ~!]", "", b):
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
    issuer: str = ""  # IssuerOfPatientID as written; compared in any case ("HOSP" and "hosp": one issuer)
    name: str = ""  # as compared (_name_key): "DOE^JANE"
    birth_date: str = ""  # DA, YYYYMMDD, or "" (_date_key)
    sex: str = ""  # M, F or "" (a frontal and a lateral of one study that disagree are two patients)
    issuer_uid: str = ""  # the issuer's universal ID (IssuerOfPatientIDQualifiersSequence): an OID, a URI
    other_ids: frozenset = frozenset()  # Other Patient IDs, as compared (_id_key)
    name_groups: tuple = ("", "")  # ideographic and phonetic groups of the name, as compared (_group_keys)

    @classmethod
    def of(cls, ds) -> "Patient":
        """The patient keys of a C-FIND answer or an object's header; a value with no usable
        text is empty."""
        from ..dicom import issuer_qualifiers, other_patient_ids

        def text(key: str) -> str:
            try:
                return str(ds.get(key, "") or "").strip()
            except Exception:  # a value its character set cannot decode
                return ""

        return cls._made(text("PatientID"), text("IssuerOfPatientID"), text("PatientName"),
                         text("PatientBirthDate"), text("PatientSex"),
                         issuer_qualifiers(ds).get("issuer_universal_id", ""), other_patient_ids(ds))

    @classmethod
    def of_ids(cls, ids) -> "Patient":
        """The patient of a record's :class:`~cxr_batch.study.Identifiers`."""
        return cls._made(ids.patient_id, ids.issuer_of_patient_id, ids.patient_name, ids.patient_birth_date,
                         ids.patient_sex, ids.issuer_universal_id, ids.other_patient_ids)

    @classmethod
    def _made(cls, pid: str, issuer: str, name: str, birth_date: str, sex: str, issuer_uid: str,
              other_ids: str) -> "Patient":
        return cls(pid, issuer, _name_key(name), _date_key(birth_date), _sex_key(sex), issuer_uid.strip(),
                   frozenset(_id_key(i.strip()) for i in other_ids.split("\\") if i.strip()), _group_keys(name))

    def _linked(self, other: "Patient") -> bool:
        """Whether one of the two gives the other's patient ID among its Other Patient IDs (an
        image filed under the ID another issuer gave the patient, naming the ID of this one)."""
        return _id_key(other.id) in self.other_ids or _id_key(self.id) in other.other_ids

    def _issuer_said(self, other: "Patient") -> tuple[str, str]:
        """The two issuers as compared: the universal IDs when both give one (the issuer's own
        identity, whatever local name each writes), else the IssuerOfPatientIDs."""
        if self.issuer_uid and other.issuer_uid:
            return self.issuer_uid, other.issuer_uid
        return self.issuer, other.issuer

    def _first_difference(self, other: "Patient") -> str:
        """The first key both give with different values ("" when none): a value empty on
        either side is not compared (a PACS answering no issuer, an object without a name). IDs
        compare as :func:`_id_key`, issuers as :meth:`_issuer_said` in any case, names as
        :meth:`_names_differ`; an ID the
        other gives among its Other Patient IDs is the same patient's, its issuer another's."""
        linked = bool(self.id and other.id) and _id_key(self.id) != _id_key(other.id) and self._linked(other)
        for key in ("id", "issuer", "name", "birth_date", "sex"):
            a, b = self._issuer_said(other) if key == "issuer" else (getattr(self, key), getattr(other, key))
            if key == "name":
                if self._names_differ(other):
                    return key
                continue
            if not (a and b) or (linked and key in ("id", "issuer")):  # the other ID is another issuer's
                continue
            if key == "id":
                differ = _id_key(a) != _id_key(b)
            elif key == "issuer":
                differ = a.casefold() != b.casefold()
            else:
                differ = a != b
            if differ:
                return key
        return ""

    def _names_differ(self, other: "Patient") -> bool:
        """Whether the two names are two people's: an ideographic or phonetic group both give
        alike is one person's; else the alphabetic groups as :func:`_same_name` when both give
        one, else the groups both give ("=山田^太郎" and "=佐藤^花子", with no alphabetic group,
        are two names; "=山田^太郎" and "YAMADA^TARO" have nothing to compare)."""
        groups = [(x, y) for x, y in zip(self.name_groups, other.name_groups) if x and y]
        if any(x == y for x, y in groups):
            return False
        if self.name and other.name:
            return not _same_name(self.name, other.name)
        return bool(groups)

    def _ids_said(self, other: "Patient") -> str:
        """The patient ID of two found one patient's, for a line saying what else differs: as
        each writes it when they write it otherwise ("00012345" and "12345", an ID and another
        issuer's of its Other Patient IDs), in one order whichever came first."""
        ids = sorted({p.id for p in (self, other) if p.id})
        if len(ids) > 1:
            return f"patient IDs '{printable(ids[0])}' and '{printable(ids[1])}' (one patient's)"
        return f"patient ID '{printable(ids[0] if ids else '')}'"

    def differs(self, other: "Patient") -> str:
        """How ``other`` (an arriving object's header) names another patient than this one (the
        C-FIND's answer), for a log line: the two IDs quoted, never a name; "" when it does not."""
        key = self._first_difference(other)
        if key == "id":
            return f"patient ID '{printable(other.id)}' where the C-FIND answered '{printable(self.id)}'"
        if key == "issuer":
            mine, theirs = self._issuer_said(other)
            return (f"issuer of patient ID '{printable(theirs)}' where the C-FIND answered "
                    f"'{printable(mine)}' ({self._ids_said(other)})")
        if key == "name":
            return f"another patient name than the C-FIND answered ({self._ids_said(other)})"
        if key in ("birth_date", "sex"):
            return f"another {key.replace('_', ' ')} than the C-FIND answered ({self._ids_said(other)})"
        return ""

    def apart(self, other: "Patient") -> str:
        """How this patient and ``other`` are two, said alike whichever came first: "patient
        IDs 'A' and 'B'", or the one ID and what differs; "" when they may be one patient."""
        key = self._first_difference(other)
        if not key:
            return ""
        first, second = sorted((self, other), key=lambda p: (p.id, p.issuer_uid, p.issuer, p.name, p.birth_date, p.sex))
        if key == "id":
            return f"patient IDs '{printable(first.id)}' and '{printable(second.id)}'"
        if key == "issuer":
            one, two = first._issuer_said(second)
            return f"{self._ids_said(other)} of two issuers, '{printable(one)}' and '{printable(two)}'"
        return f"{self._ids_said(other)} with two {dict(name='names', birth_date='birth dates', sex='sexes')[key]}"


def two_patients(patients) -> str:
    """How ``patients`` (of one study) hold two patients (:meth:`Patient.apart` of the first
    pair found), "" when they may all be one. The Other Patient IDs one image gives hold for
    every image of its patient ID: a frontal filed under the hospital's ID naming the outside
    one, a lateral under the hospital's ID alone and an image under the outside ID are one."""
    patients = list(patients)
    others: dict[str, frozenset] = {}
    for p in patients:
        others[_id_key(p.id)] = others.get(_id_key(p.id), frozenset()) | p.other_ids
    patients = list(dict.fromkeys(replace(p, other_ids=others[_id_key(p.id)]) if p.id else p for p in patients))
    for i, one in enumerate(patients):
        for other in patients[i + 1:]:
            if said := one.apart(other):
                return said
    return ""


def held_reason(study: str, said: str, remedy: str) -> str:
    """The reason on the row of each held image of ``study`` (:func:`two_patients` ``said`` how it
    holds two patients), as listen, pull, watch and scan give it; ``remedy``: what a person does."""
    from ..record import HELD_BACK

    return (f"{HELD_BACK}study {study} holds images of two patients, {said} (a Study Instance UID collision or a "
            f"mis-merged study); {remedy}")


MAX_FILES_SAID = 20  # a study's files named in a reason; more are counted


def files_said(images, for_log: bool) -> str:
    """A study's files and the patient ID each names, for a person to find the misfiled one, the
    patient with fewest images first: ``images``: [(file, :class:`Patient`)] -> "b.dcm ('P-B'),
    a1.dcm ('P-A'), a2.dcm ('P-A')"; ``for_log``: each file named by the hash a log names it by
    (cxr_batch.record.log_name: a folder or file name may name the patient), else as
    results.csv's file column has it."""
    from ..record import log_name, name_bytes

    def named(file: str) -> str:
        if for_log:
            return log_name(file)
        return "".join(ch if ch.isprintable() else "?" for ch in name_bytes(file).decode("utf-8", "backslashreplace"))

    images = list(images)
    # the patient with fewest images first (stable): in a study of 200, the misfiled image is
    # named, not cut off among the "and 180 more"
    count = Counter(p for _, p in images)
    images.sort(key=lambda image: count[image[1]])
    said = [f"{named(file)} ('{printable(p.id)}')" for file, p in images[:MAX_FILES_SAID]]
    more = len(images) - len(said)
    return ", ".join(said) + (f" and {more} more" if more else "")


def folder_remedy(images, again: str, for_log: bool = False) -> str:
    """What to do with a held study of a folder (scan, watch): its files named (:func:`files_said`),
    ``again``: how it is then scored."""
    return f"correct or remove the misfiled image among its files {files_said(images, for_log)}; {again}"

"""One Study Instance UID, two patients: a UID collision, a mis-merged or hostile PACS, a modality
that reused a study for the next patient. Scoring the images under the one study would show a
radiologist one patient's result in another's study (the SR filed there, the ORU sent under it).
The whole study is held back from the moment two patients are seen in it: a skipped row whose
reason names both patient IDs, one line in the log, for a person to resolve in the PACS; not
retried on every pull."""

from __future__ import annotations

import logging
import subprocess
import sys
import time
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import generate_uid

from tests.dicomgen import grey, have, write
from tests.orthanc import make_orthanc  # noqa: F401  (fixture: skips where Orthanc is absent)
from tests.watchkit import free_port, node_config, rows_now, start_node, stop, wait_for

needs_dcmtk = pytest.mark.skipif(not have("storescu"), reason="dcmtk not installed")


def _image(folder: Path, nih_image: Path, name: str, **header) -> Path:
    return write(folder / f"{name}.dcm", grey(nih_image)[::4, ::4].copy(), **header)


@pytest.fixture()
def shared_study(tmp_path, nih_images) -> dict[str, Path]:
    """Three images of study S: two of patient P-A (one at first, one later) and one of P-B, as
    different patients (another ID, another birth date); and an image of P-A in another study."""
    study, folder = generate_uid(), tmp_path / "images"
    a = dict(PatientID="P-A", PatientName="DOE^JANE", PatientBirthDate="19600101", StudyInstanceUID=study)
    return {"a1": _image(folder, nih_images[0], "a1", **a),
            "b": _image(folder, nih_images[1], "b", PatientID="P-B", PatientName="ROE^RICHARD",
                        PatientBirthDate="19700202", StudyInstanceUID=study),
            "a2": _image(folder, nih_images[2], "a2", **a),
            "other": _image(folder, nih_images[3], "other", **{**a, "StudyInstanceUID": generate_uid()})}


def _uid(path: Path) -> str:
    return pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID


def _by_uid(out: Path) -> dict[str, dict]:
    return {row["sop_uid"]: row for row in rows_now(out)}


@needs_dcmtk
def test_listen_holds_back_a_study_two_patients_are_sent_under(shared_study, small_bundle, tmp_path):
    """Two associations send the same Study Instance UID for P-A then P-B: P-B's image is not
    scored (no result under P-A's study), nor is any image of the study sent after; the log names
    both IDs, never a name; an image of P-A in another study is scored as ever."""
    from tests.test_node import listening

    out, log, port = tmp_path / "out", tmp_path / "node.log", free_port()
    node = start_node(out, small_bundle, node_config(tmp_path / "node.toml"), "--port", port, "--no-pdf", log=log)
    try:
        assert wait_for(lambda: listening(log, node.pid) or node.poll() is not None), log.read_text()
        for n, name in enumerate(("a1", "b", "a2", "other"), start=1):
            sent = subprocess.run(["storescu", "-aec", "CXRBATCH", "127.0.0.1", str(port), shared_study[name]],
                                  capture_output=True, text=True, timeout=60)
            assert sent.returncode == 0, sent.stderr
            assert wait_for(lambda: len(rows_now(out)) == n, timeout=60), log.read_text()[-3000:]
    finally:
        assert stop(node) == 0, log.read_text()[-3000:]
    rows = _by_uid(out)
    assert rows[_uid(shared_study["a1"])]["status"] == "ok"  # scored before P-B was seen: said below
    assert rows[_uid(shared_study["other"])]["status"] == "ok"
    for name in ("b", "a2"):
        row = rows[_uid(shared_study[name])]
        assert row["status"] == "skipped" and row["p_Pneumothorax"] == "", row
        assert "two patients" in row["reason"] and "'P-A'" in row["reason"] and "'P-B'" in row["reason"], row
    text = log.read_text()
    conflicts = [line for line in text.splitlines() if "two patients" in line]
    assert len(conflicts) == 2 and all("'P-A'" in c and "'P-B'" in c for c in conflicts), text[-3000:]
    assert "DOE" not in text and "ROE" not in text


_CYRILLIC = dict(SpecificCharacterSet="ISO_IR 144")


@needs_dcmtk
@pytest.mark.parametrize("mine, other, said", [
    ({}, dict(PatientBirthDate="20240101"), "two birth dates"),
    ({}, dict(PatientSex="M"), "two sexes"),
    ({**_CYRILLIC, "PatientName": "ИВАНОВА^АННА"}, {**_CYRILLIC, "PatientName": "ПЕТРОВА^ОЛЬГА"}, "two names")])
def test_listen_holds_back_images_of_one_patient_id_with_another_birth_date_sex_or_name(
        shared_study, small_bundle, tmp_path, nih_images, mine, other, said):
    """The same patient ID with another birth date (two patients with one hospital's number, a
    mother and her newborn), a frontal and a lateral whose sex disagrees, or two names written
    in Cyrillic, in one study: held back, sent in one association together."""
    from tests.test_node import listening

    first = shared_study["a1"]  # PatientSex F (tests.dicomgen.HEADER)
    study = pydicom.dcmread(first).StudyInstanceUID
    if mine:
        first = _image(tmp_path / "images", nih_images[0], "mine", **dict(
            PatientID="P-A", PatientBirthDate="19600101", StudyInstanceUID=study, **mine))
    twin = _image(tmp_path / "images", nih_images[4], "twin", **{
        **dict(PatientID="P-A", PatientName="DOE^JANE", PatientBirthDate="19600101", ViewPosition="LL",
               StudyInstanceUID=study), **other})
    out, log, port = tmp_path / "out", tmp_path / "node.log", free_port()
    node = start_node(out, small_bundle, node_config(tmp_path / "node.toml", max_wait=2.0), "--port", port, "--no-pdf",
                      log=log)
    try:
        assert wait_for(lambda: listening(log, node.pid) or node.poll() is not None), log.read_text()
        sent = subprocess.run(["storescu", "-aec", "CXRBATCH", "127.0.0.1", str(port), first, twin],
                              capture_output=True, text=True, timeout=60)
        assert sent.returncode == 0, sent.stderr
        assert wait_for(lambda: len(rows_now(out)) == 2, timeout=60), log.read_text()[-3000:]
    finally:
        assert stop(node) == 0, log.read_text()[-3000:]
    rows = _by_uid(out)
    assert rows[_uid(twin)]["status"] == "skipped", rows  # a lateral: not scored in any case
    held = rows[_uid(first)]
    assert held["status"] == "skipped" and "two patients" in held["reason"] and said in held["reason"], held
    assert not list((out / ".cxr-batch").rglob("*.sr.dcm"))


def _pull(pacs, out: Path, bundle: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cxr_batch", "pull", "--from",
                           f"{pacs.aet}@127.0.0.1:{pacs.dicom_port}", "--retrieve", "get", "--since", "2000-01-01",
                           "--out", str(out), "--no-pdf", "--weights", str(bundle), "--device", "cpu", "--workers",
                           "0"], capture_output=True, text=True, timeout=300)


def test_pull_holds_back_a_study_the_pacs_answers_for_two_patients(shared_study, small_bundle, make_orthanc,
                                                                   tmp_path):
    """Orthanc keeps one study per patient and Study Instance UID: it answers the study-level
    C-FIND twice, for P-A and P-B. The first answer was taken, P-A's images scored under the
    study and P-B's refused on every pull (exit 3 for ever). Now: nothing of the study is
    retrieved, one line names both IDs, the pull exits 3; the next pull says it again and
    retrieves nothing either. The other study is pulled as ever."""
    pacs = make_orthanc(dicomweb=False)
    for f in shared_study.values():
        pacs.rest("POST", "/instances", data=f.read_bytes())
    out = tmp_path / "out"
    for _ in range(2):
        done = _pull(pacs, out, small_bundle)
        assert done.returncode == 3, done.stderr[-3000:]
        study = pydicom.dcmread(shared_study["a1"]).StudyInstanceUID
        conflicts = [line for line in done.stderr.splitlines() if "is answered for two patients" in line]
        assert len(conflicts) == 1 and study in conflicts[0], done.stderr[-3000:]
        assert "'P-A'" in conflicts[0] and "'P-B'" in conflicts[0], conflicts[0]
        assert "0 retrieval failure(s), 1 stud(ies) answered for two patients held back" in done.stderr
        assert "DOE" not in done.stderr and "ROE" not in done.stderr
        rows = rows_now(out)
        assert [r["sop_uid"] for r in rows] == [_uid(shared_study["other"])], rows


class _StrictSeriesPACS:
    """A PACS that fails a series-level C-FIND holding patient keys (0xC000), as a strict archive
    may: made from tests.fakepacs.ScriptedPACS."""

    def __new__(cls, files):
        from tests.fakepacs import ScriptedPACS

        class Strict(ScriptedPACS):
            def find(self, event):
                if event.identifier.QueryRetrieveLevel == "SERIES" and "PatientID" in event.identifier:
                    self.queries.append(event.identifier)
                    yield 0xC000, None
                    return
                yield from super().find(event)

        return Strict(files)


def test_a_pacs_refusing_patient_keys_below_the_study_is_asked_without_them(shared_study, small_bundle, tmp_path):
    """The series-level C-FIND asks the patient keys (a PACS answering one study per patient and
    UID says the second patient there); a PACS failing such a query is asked once more without
    them, and without them from then on: every study pulled, no failure, said once."""
    from tests.test_pull_hostile import _pull_by_get

    files = [shared_study["a1"], shared_study["other"]]
    pacs = _StrictSeriesPACS(files)
    done, rows = _pull_by_get(pacs, tmp_path / "out", small_bundle)
    assert done.returncode == 0 and len(rows) == 2, done.stderr[-3000:]
    assert done.stderr.count("refused patient keys in a series-level C-FIND") == 1, done.stderr[-3000:]
    assert [q.QueryRetrieveLevel for q in pacs.queries].count("SERIES") == 3  # one refused, two answered


def _item(**values) -> pydicom.Dataset:
    item = pydicom.Dataset()
    for keyword, value in values.items():
        setattr(item, keyword, value)
    return item


def _universal(uid: str) -> dict:
    """The issuer's qualifiers (PS3.3 C.7.1.1): its universal ID, an ISO OID."""
    return dict(IssuerOfPatientIDQualifiersSequence=[_item(UniversalEntityID=uid, UniversalEntityIDType="ISO")])


def _japanese(name: str) -> dict:
    return dict(PatientName=name, SpecificCharacterSet="ISO_IR 192")


_UNIVERSAL = _universal("1.2.826.0.1.3680043.2.1")

# One patient as modalities and PACSs write them: the same patient ID, the name, birth date, sex
# and issuer written otherwise, or left out, by one image of the study (a frontal from the DR room,
# a second view from another modality). Each is one patient: held back, the study is not triaged.
ONE_PATIENT = dict(PatientID="P-A", PatientName="MÜLLER^JÖRG", PatientBirthDate="19600101", PatientSex="M",
                   SpecificCharacterSet="ISO_IR 100")
ONE_PATIENT_OTHERWISE = {
    "trailing empty components": dict(PatientName="MÜLLER^JÖRG^^^"),
    "another case": dict(PatientName="müller^jörg"),
    "extra spaces": dict(PatientName=" MÜLLER ^ JÖRG "),
    "ideographic and phonetic groups": dict(PatientName="MÜLLER^JÖRG=ミュラー^ヨルク=みゅらー^よるく",
                                            SpecificCharacterSet="ISO_IR 192"),
    "UTF-8 for Latin-1": dict(SpecificCharacterSet="ISO_IR 192"),
    "umlauts transliterated": dict(PatientName="MUELLER^JOERG", SpecificCharacterSet=None),
    "umlauts dropped": dict(PatientName="MULLER^JORG", SpecificCharacterSet=None),
    "a middle name": dict(PatientName="MÜLLER^JÖRG^K"),
    "a prefix": dict(PatientName="MÜLLER^JÖRG^^DR"),
    "family name alone": dict(PatientName="MÜLLER"),
    "typed with a space": dict(PatientName="MÜLLER JÖRG"),
    "typed with a comma": dict(PatientName="MÜLLER, JÖRG"),
    "no birth date": dict(PatientBirthDate=""),
    "birth date unknown as zeros": dict(PatientBirthDate="00000000"),
    "birth year alone": dict(PatientBirthDate="1960"),
    "no sex": dict(PatientSex=""),
    "sex O": dict(PatientSex="O"),
    "an issuer": dict(IssuerOfPatientID="HOSP-1"),
    "ID with spaces": dict(PatientID=" P-A "),
    "another age": dict(PatientAge="065Y"),
    # a value of the pair's first image, then the second's
    "issuer in another case": (dict(IssuerOfPatientID="HOSP"), dict(IssuerOfPatientID="hosp")),
    "issuer padded with NUL": (dict(IssuerOfPatientID="HOSP"), dict(IssuerOfPatientID="HOSP\x00")),
    "issuer's universal ID in one image": (dict(IssuerOfPatientID="HOSP"), dict(IssuerOfPatientID="HOSP", **_UNIVERSAL)),
    "one universal ID, two local names": ({**_UNIVERSAL, "IssuerOfPatientID": "HOSP"},
                                          {**_UNIVERSAL, "IssuerOfPatientID": "St Elsewhere"}),
    "ID with leading zeros": (dict(PatientID="00012345"), dict(PatientID="12345")),
    "ID padded with NUL": dict(PatientID="P-A\x00"),
    "another romanisation beside one ideographic name": (_japanese("Yamada^Tarou=山田^太郎=やまだ^たろう"),
                                                         _japanese("YAMADA^TARO=山田^太郎")),
    "ISO 2022 IR 87 and UTF-8": ({**_japanese("Yamada^Tarou=山田^太郎=やまだ^たろう"),
                                  "SpecificCharacterSet": ["", "ISO 2022 IR 87"]},
                                 _japanese("Yamada^Tarou=山田^太郎=やまだ^たろう")),
    "phonetic in katakana and in hiragana": (_japanese("Yamada^Tarou==ヤマダ^タロウ"), _japanese("Yamada^Taro==やまだ^たろう")),
    "an ideographic name alone": (_japanese("=山田^太郎"), _japanese("YAMADA^TAROU")),
    "a long vowel romanised otherwise": (_japanese("OHNO^YUUKI"), _japanese("ONO^YUKI")),
    "a Cyrillic name and its transliteration": (dict(PatientName="ИВАНОВ^ИВАН", SpecificCharacterSet="ISO_IR 144"),
                                                dict(PatientName="IVANOV^IVAN", SpecificCharacterSet=None)),
    "Cyrillic Ё written Е": (dict(PatientName="СЕМЁНОВ^ПЁТР", SpecificCharacterSet="ISO_IR 144"),
                             dict(PatientName="Семенов^Петр", SpecificCharacterSet="ISO_IR 144")),
    "Greek with and without accents": (dict(PatientName="ΝΙΚΟΛΑΟΥ^ΜΑΡΙΑ", SpecificCharacterSet="ISO_IR 126"),
                                       dict(PatientName="Νικολάου^Μαρία", SpecificCharacterSet="ISO_IR 192")),
    "kanji in the alphabetic group and romanised": (_japanese("山田^太郎"), _japanese("YAMADA^TARO")),
    "kanji typed without '^'": (_japanese("山田^太郎"), _japanese("山田太郎")),
    "filed under another issuer's ID": (dict(PatientID="EXT-77", IssuerOfPatientID="ELSEWHERE"),
                                        dict(PatientID="P-A", IssuerOfPatientID="HOSP",
                                             OtherPatientIDsSequence=[_item(PatientID="EXT-77",
                                                                            IssuerOfPatientID="ELSEWHERE")])),
}
TWO_PATIENTS = {"another ID": (dict(PatientID="P-B"), "patient IDs 'P-A' and 'P-B'"),
                "another birth date": (dict(PatientBirthDate="19600102"), "patient ID 'P-A' with two birth dates"),
                "another sex": (dict(PatientSex="F"), "patient ID 'P-A' with two sexes"),
                "another given name": (dict(PatientName="MÜLLER^JENS"), "patient ID 'P-A' with two names"),
                "another issuer": ((dict(IssuerOfPatientID="HOSP-1"), dict(IssuerOfPatientID="HOSP-2")),
                                   "patient ID 'P-A' of two issuers, 'HOSP-1' and 'HOSP-2'"),
                "another universal ID of the issuer": (({**_UNIVERSAL, "IssuerOfPatientID": "HOSP"},
                                                        {**_universal("2.16.840.1.113883.3.99"),
                                                         "IssuerOfPatientID": "HOSP"}),
                                                       "patient ID 'P-A' of two issuers, '1.2.826.0.1.3680043.2.1' "
                                                       "and '2.16.840.1.113883.3.99'"),
                "another ideographic name": ((_japanese("Yamada^Tarou=山田^太郎"), _japanese("Sato^Hanako=佐藤^花子")),
                                             "patient ID 'P-A' with two names"),
                "another name in Cyrillic": ((dict(PatientName="ИВАНОВ^ИВАН", SpecificCharacterSet="ISO_IR 144"),
                                              dict(PatientName="ПЕТРОВ^ПЁТР", SpecificCharacterSet="ISO_IR 144")),
                                             "patient ID 'P-A' with two names"),
                "another name in Greek": ((dict(PatientName="ΠΑΠΑΔΟΠΟΥΛΟΣ^ΓΙΑΝΝΗΣ", SpecificCharacterSet="ISO_IR 126"),
                                           dict(PatientName="ΝΙΚΟΛΑΟΥ^ΜΑΡΙΑ", SpecificCharacterSet="ISO_IR 126")),
                                          "patient ID 'P-A' with two names"),
                "another name in kanji in the alphabetic group": ((_japanese("山田^太郎"), _japanese("佐藤^花子")),
                                                                  "patient ID 'P-A' with two names"),
                "another ideographic name alone": ((_japanese("=山田^太郎"), _japanese("=佐藤^花子")),
                                                   "patient ID 'P-A' with two names"),
                "another phonetic name alone": ((_japanese("==やまだ^たろう"), _japanese("==サトウ^ハナコ")),
                                                "patient ID 'P-A' with two names"),
                "another issuer's ID of another name": ((dict(PatientID="EXT-77", PatientName="ROE^RICHARD"),
                                                         dict(OtherPatientIDsSequence=[_item(PatientID="EXT-77")])),
                                                        "patient IDs 'EXT-77' and 'P-A' (one patient's) with two names"),
                "ID with leading zeros of another birth date": ((dict(PatientID="00012345"),
                                                                 dict(PatientID="12345", PatientBirthDate="19600102")),
                                                                "patient IDs '00012345' and '12345' (one patient's) "
                                                                "with two birth dates"),
                "other IDs naming a third patient": ((dict(PatientID="P-B"),
                                                      dict(OtherPatientIDsSequence=[_item(PatientID="P-C")])),
                                                     "patient IDs 'P-A' and 'P-B'")}


def _pairs() -> dict[str, tuple[dict, dict, str]]:
    """Each case of ONE_PATIENT_OTHERWISE and TWO_PATIENTS: (the first image's header values over
    ONE_PATIENT, the second's, what a hold-back says or "")."""
    def pair(values) -> tuple[dict, dict]:
        return ({}, values) if isinstance(values, dict) else values

    return {**{k: pair(v) + ("",) for k, v in ONE_PATIENT_OTHERWISE.items()},
            **{k: pair(other) + (said,) for k, (other, said) in TWO_PATIENTS.items()}}


def test_the_patients_of_a_pair_of_images_are_told_apart_as_a_pacs_administrator_would(tmp_path, nih_images):
    """Each pair of ONE_PATIENT_OTHERWISE and TWO_PATIENTS written to DICOM files and read back,
    as listen reads an arriving object's header and pull a retrieved one: one patient or the
    two said, whichever image comes first; a pull takes the second image for the first's study
    when they are one patient, refuses it when two."""
    from cxr_batch.integration.node import patient_header
    from cxr_batch.integration.patients import Patient, two_patients
    from cxr_batch.integration.pull import pydicom_header

    wrong = []
    for n, (case, (first, second, said)) in enumerate(_pairs().items()):
        paths = [_image(tmp_path, nih_images[0], f"{n}{view}", **{k: v for k, v in {**ONE_PATIENT, **extra}.items()
                                                                   if v is not None})
                 for view, extra in (("PA", first), ("AP", second))]
        for read in (lambda p: patient_header(p)[1], lambda p: Patient.of(pydicom_header(p))):
            one, other = map(read, paths)
            for got in (two_patients([one, other]), two_patients([other, one])):
                if got != said:
                    wrong.append(f"{case}: {got!r}, not {said!r}")
            if bool(one.differs(other)) != bool(said):  # pull: the C-FIND answered one, the header is the other
                wrong.append(f"{case}: pull refuses the object: {one.differs(other)!r}" if not said else
                             f"{case}: pull takes the object")
    assert not wrong, "\n".join(sorted(set(wrong)))


@needs_dcmtk
def test_listen_scores_a_study_whose_images_write_one_patient_otherwise(small_bundle, tmp_path, nih_images):
    """Each study: a PA and an AP of one patient, the AP's header written as another modality or
    PACS writes it. Every one is scored; the studies of two patients are held back (one image at
    least: the other may be scored before it is seen), the reason saying which of the patient's
    keys differs."""
    from tests.test_node import listening

    folder, files, expect = tmp_path / "images", [], {}
    cases = _pairs()
    for n, (case, (first, second, said)) in enumerate(cases.items()):
        study = generate_uid()
        for view, extra in (("PA", first), ("AP", second)):
            header = {k: v for k, v in {**ONE_PATIENT, **extra}.items() if v is not None}
            path = _image(folder, nih_images[n % len(nih_images)], f"{n}{view}", ViewPosition=view,
                          StudyInstanceUID=study, **header)
            files.append(path)
            expect[_uid(path)] = (case, said)
    out, log, port = tmp_path / "out", tmp_path / "node.log", free_port()
    node = start_node(out, small_bundle, node_config(tmp_path / "node.toml", max_wait=2.0), "--port", port, "--no-pdf",
                      log=log)
    try:
        assert wait_for(lambda: listening(log, node.pid) or node.poll() is not None), log.read_text()
        sent = subprocess.run(["storescu", "-aec", "CXRBATCH", "127.0.0.1", str(port), *files],
                              capture_output=True, text=True, timeout=120)
        assert sent.returncode == 0, sent.stderr
        assert wait_for(lambda: len(rows_now(out)) == len(files), timeout=240), log.read_text()[-3000:]
    finally:
        assert stop(node) == 0, log.read_text()[-3000:]
    wrong, held = [], set()
    for uid, row in _by_uid(out).items():
        case, said = expect[uid]
        if said and row["status"] == "skipped" and said in row["reason"]:
            held.add(case)
        elif row["status"] != "ok":  # of two patients: scored before the other image was seen
            wrong.append(f"{case}: {row['status']} {row['reason']}")
    wrong += [f"{case}: not held back as '{said}'" for case, said in set(expect.values()) if said and case not in held]
    assert not wrong, "\n".join(sorted(set(wrong)))


@needs_dcmtk
def test_listen_scores_a_study_whose_patient_is_corrected_image_by_image(small_bundle, tmp_path, nih_images):
    """An emergency study registered under a temporary ID, reconciled in the PACS to the
    patient's own and sent again, one image per association (as many PACSs forward): each image
    is a corrected version of itself, scored, not held back against the other image's version
    that still names the temporary ID until it comes too."""
    from tests.test_node import listening

    study, folder = generate_uid(), tmp_path / "images"
    trauma = dict(PatientID="TRAUMA-1", PatientName="UNKNOWN^TRAUMA", StudyInstanceUID=study)
    first = {view: _image(folder, nih_images[n], f"t{view}", ViewPosition=view, **trauma)
             for n, view in enumerate(("PA", "AP"))}
    corrected = {}
    for view, path in first.items():
        ds = pydicom.dcmread(path)
        ds.PatientID, ds.PatientName, ds.PatientBirthDate = "P-A", "DOE^JANE", "19600101"
        ds.save_as(corrected.setdefault(view, folder / f"c{view}.dcm"))
    out, log, port = tmp_path / "out", tmp_path / "node.log", free_port()
    node = start_node(out, small_bundle, node_config(tmp_path / "node.toml", max_wait=1.0), "--port", port, "--no-pdf",
                      log=log)
    try:
        assert wait_for(lambda: listening(log, node.pid) or node.poll() is not None), log.read_text()
        for pid, path in [*(("TRAUMA-1", p) for p in first.values()), *(("P-A", p) for p in corrected.values())]:
            sent = subprocess.run(["storescu", "-aec", "CXRBATCH", "127.0.0.1", str(port), path],
                                  capture_output=True, text=True, timeout=60)
            assert sent.returncode == 0, sent.stderr
            assert wait_for(lambda: _by_uid(out).get(_uid(path), {}).get("patient_id") == pid, timeout=60), \
                log.read_text()[-3000:]
    finally:
        assert stop(node) == 0, log.read_text()[-3000:]
    rows = _by_uid(out)
    assert [rows[_uid(p)]["status"] for p in corrected.values()] == ["ok", "ok"], [rows[_uid(p)] for p in corrected.values()]


def test_other_patient_ids_of_one_image_hold_for_every_image_of_its_patient_id(tmp_path, nih_images):
    """A frontal filed under the hospital's ID naming the outside ID among its Other Patient IDs,
    a lateral under the hospital's ID alone, an image under the outside ID: one patient,
    whichever comes first; an image under a third ID is another patient."""
    from cxr_batch.integration.node import patient_header
    from cxr_batch.integration.patients import two_patients

    hospital = dict(PatientID="P-A", IssuerOfPatientID="HOSP")
    outside = dict(PatientID="EXT-77", IssuerOfPatientID="ELSEWHERE")
    headers = {"frontal": {**hospital, "OtherPatientIDsSequence": [_item(**outside)]}, "lateral": hospital,
               "outside": outside, "third": dict(PatientID="P-C")}
    patients = {name: patient_header(_image(tmp_path, nih_images[0], name, **{**ONE_PATIENT, **header}))[1]
                for name, header in headers.items()}
    for order in (["frontal", "lateral", "outside"], ["outside", "lateral", "frontal"], ["lateral", "outside", "frontal"]):
        assert two_patients([patients[n] for n in order]) == "", order
    assert two_patients([patients[n] for n in ("frontal", "lateral", "outside", "third")]).startswith("patient IDs")


@needs_dcmtk
def test_listen_tells_one_patient_of_two_issuers_from_two_patients_across_associations(small_bundle, tmp_path):
    """The example study sent again image by image as other systems file it (copies made with
    dcmodify, each scored before the next is sent, so the node compares it with the results in
    its ledger): the hospital's image naming the outside ID, the outside system's image, the
    hospital's ID under its issuer written in lower case: scored; the same ID under an issuer of
    another universal ID: held back, the reason naming both universal IDs."""
    from tests.test_node import listening

    example = Path(__file__).parent.parent / "examples/studies/dicom/NIH00100/STUDY1/SERIES1/IM0001.dcm"
    universal = "(0010,0024)[0].(0040,0032)"
    edits = {"hospital": ["IssuerOfPatientID=HOSP", f"{universal}=1.2.826.0.1.3680043.2.1",
                          "(0010,0024)[0].(0040,0033)=ISO", "(0010,1002)[0].(0010,0020)=EXT-77",
                          "(0010,1002)[0].(0010,0021)=ELSEWHERE"],
             "outside": ["PatientID=EXT-77", "IssuerOfPatientID=ELSEWHERE", "PatientName=poe^edgar^^"],
             "lower case issuer": ["IssuerOfPatientID=hosp"],
             "another authority": ["IssuerOfPatientID=HOSP", f"{universal}=2.16.840.1.113883.3.99"]}
    files = {}
    for name, values in edits.items():
        files[name] = tmp_path / f"{name.replace(' ', '_')}.dcm"
        files[name].write_bytes(example.read_bytes())
        subprocess.run(["dcmodify", "-nb", "-gin", *(a for v in values for a in ("-i", v)), files[name]], check=True,
                       capture_output=True, timeout=60)
    out, log, port = tmp_path / "out", tmp_path / "node.log", free_port()
    node = start_node(out, small_bundle, node_config(tmp_path / "node.toml", max_wait=1.0), "--port", port, "--no-pdf",
                      log=log)
    try:
        assert wait_for(lambda: listening(log, node.pid) or node.poll() is not None), log.read_text()
        for path in files.values():
            sent = subprocess.run(["storescu", "-R", "-xt", "-aec", "CXRBATCH", "127.0.0.1", str(port), path],
                                  capture_output=True, text=True, timeout=60)  # as stored: JPEG-LS lossless
            assert sent.returncode == 0, sent.stderr
            assert wait_for(lambda: _uid(path) in _by_uid(out), timeout=120), log.read_text()[-3000:]
    finally:
        assert stop(node) == 0, log.read_text()[-3000:]
    rows = _by_uid(out)
    got = {name: (rows[_uid(path)]["status"], rows[_uid(path)]["reason"]) for name, path in files.items()}
    assert [got[n][0] for n in ("hospital", "outside", "lower case issuer")] == ["ok"] * 3, got
    assert got["another authority"][0] == "skipped", got
    assert ("patient ID 'NIH00100' of two issuers, '1.2.826.0.1.3680043.2.1' and '2.16.840.1.113883.3.99'"
            in got["another authority"][1]), got


def _scan(folder: Path, out: Path, bundle: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cxr_batch", "scan", str(folder), "--out", str(out), "--no-pdf",
                           "--weights", str(bundle), "--device", "cpu", "--workers", "0"],
                          capture_output=True, text=True, timeout=600)


def _files(out: Path) -> dict[str, dict]:
    return {Path(row["file"]).name: row for row in rows_now(out)}


def test_scan_holds_back_a_study_whose_images_name_two_patients(shared_study, small_bundle, tmp_path):
    """A folder where one image of P-B is misfiled into P-A's study: scan scored the three images
    under the one study and wrote P-B's result in P-A's study (exit 0). Now, as listen and pull
    decide (cxr_batch.integration.patients): none of the study's images is scored, each row
    says why (the study, both IDs, its files), the log says it once, the exit code is 3 (some
    files not scored); the image of P-A in another study is scored as ever."""
    done = _scan(shared_study["a1"].parent, tmp_path / "out", small_bundle)
    assert done.returncode == 3, done.stderr[-3000:]
    rows = _files(tmp_path / "out")
    study = pydicom.dcmread(shared_study["a1"]).StudyInstanceUID
    assert rows["other.dcm"]["status"] == "ok", rows["other.dcm"]
    for name in ("a1.dcm", "b.dcm", "a2.dcm"):
        row = rows[name]
        assert row["status"] == "skipped" and row["p_Pneumothorax"] == "" and row["priority"] == "", row
        for said in ("two patients", "patient IDs 'P-A' and 'P-B'", study, "a1.dcm", "a2.dcm", "b.dcm"):
            assert said in row["reason"], (said, row["reason"])
    conflicts = [line for line in done.stderr.splitlines() if "holds images of two patients" in line
                 and "row " not in line]
    assert len(conflicts) == 1 and study in conflicts[0] and "'P-A' and 'P-B'" in conflicts[0], done.stderr[-3000:]
    assert "3 held back" in done.stderr.splitlines()[-1], done.stderr.splitlines()[-1]
    assert "DOE" not in done.stderr and "ROE" not in done.stderr
    assert "a1.dcm" not in done.stderr and "b.dcm" not in done.stderr  # files by their hash, as every log line
    # the study's files are named once, in its line: each row's line only points to it
    held_rows = [line for line in done.stderr.splitlines() if "row " in line and "held back" in line]
    assert len(held_rows) == 3 and all("file#" not in line.split("held back", 1)[1] for line in held_rows), held_rows


def test_scan_scores_a_study_whose_images_write_one_patient_otherwise(small_bundle, tmp_path, nih_images):
    """Each pair of ONE_PATIENT_OTHERWISE and TWO_PATIENTS as two images of one study in a folder:
    scan decides as listen does (test_listen_scores_a_study_whose_images_write_one_patient_otherwise),
    with the same code: one patient written otherwise is scored, two patients held back, the reason
    saying which of the patient's keys differs."""
    folder, expect = tmp_path / "images", {}
    for n, (case, (first, second, said)) in enumerate(_pairs().items()):
        study = generate_uid()
        for view, extra in (("PA", first), ("AP", second)):
            header = {k: v for k, v in {**ONE_PATIENT, **extra}.items() if v is not None}
            path = _image(folder, nih_images[n % len(nih_images)], f"{n}{view}", ViewPosition=view,
                          StudyInstanceUID=study, **header)
            expect[path.name] = (case, said)
    done = _scan(folder, tmp_path / "out", small_bundle)
    assert done.returncode == 3, done.stderr[-3000:]  # the pairs of two patients
    wrong = []
    for name, row in _files(tmp_path / "out").items():
        case, said = expect[name]
        if said and not (row["status"] == "skipped" and said in row["reason"]):
            wrong.append(f"{case}: {row['status']} {row['reason']}, not held back as '{said}'")
        elif not said and row["status"] != "ok":
            wrong.append(f"{case}: {row['status']} {row['reason']}")
    assert not wrong, "\n".join(sorted(set(wrong)))


@pytest.mark.parametrize("correction", ["removed", "replaced"])
def test_watch_holds_back_a_study_of_two_patients_until_its_misfiled_image_is_corrected(
        shared_study, small_bundle, tmp_path, correction):
    """A PACS export folder where P-B's image is misfiled in P-A's study: watch scored the three
    under the one study. Now, as listen decides: the study's images are held (skipped rows naming
    the study, both IDs and the files; status.json counts it; the log says it, never a name),
    the rest is scored; once the misfiled file is removed, or replaced by its corrected version
    (P-A's), the study is read again and its images scored."""
    from tests.watchkit import start_daemon, status, watch_config

    incoming, out = shared_study["a1"].parent, tmp_path / "out"
    study = pydicom.dcmread(shared_study["a1"]).StudyInstanceUID
    daemon = start_daemon(incoming, out, small_bundle, watch_config(tmp_path / "w.toml", rescan_interval=1.0),
                          "--no-pdf")
    try:
        assert wait_for(lambda: len(rows_now(out)) == 4, timeout=120)
        rows = _files(out)
        assert rows["other.dcm"]["status"] == "ok", rows["other.dcm"]
        for name in ("a1.dcm", "b.dcm", "a2.dcm"):
            row = rows[name]
            assert row["status"] == "skipped" and row["p_Pneumothorax"] == "", row
            for said in ("two patients", "patient IDs 'P-A' and 'P-B'", study, "a1.dcm", "a2.dcm", "b.dcm"):
                assert said in row["reason"], (said, row["reason"])
        assert wait_for(lambda: status(out).get("two_patient_studies") == 1, timeout=30), status(out)
        b = shared_study["b"]
        if correction == "removed":
            b.unlink()
        else:
            ds = pydicom.dcmread(b)
            ds.PatientID, ds.PatientName, ds.PatientBirthDate = "P-A", "DOE^JANE", "19600101"
            ds.save_as(tmp_path / "b.dcm")
            (tmp_path / "b.dcm").replace(b)
        scored = ("a1.dcm", "a2.dcm") + (("b.dcm",) if correction == "replaced" else ())
        assert wait_for(lambda: all(_files(out)[n]["status"] == "ok" for n in scored), timeout=120), _files(out)
    finally:
        assert stop(daemon) == 0
    text = daemon.stderr.read()
    conflicts = [line for line in text.splitlines() if "holds images of two patients" in line]
    assert len(conflicts) == 1 and study in conflicts[0] and "'P-A' and 'P-B'" in conflicts[0], text[-3000:]
    assert "DOE" not in text and "ROE" not in text
    assert {r["patient_id"] for r in _files(out).values() if r["status"] == "ok"} == {"P-A"}


@needs_dcmtk
def test_listen_scores_a_held_image_sent_again_once_its_study_is_resolved(shared_study, small_bundle, tmp_path):
    """The README's way out of a held study: resolve it in the PACS, send its images again. P-B's
    misfiled image corrected to P-A and sent (a new version: scored), then P-A's held image sent
    again unchanged: it was dropped as a duplicate of its held row, so the study stayed held for
    ever; now a held row is provisional, as an error row is, and the image is scored."""
    from tests.test_node import listening

    corrected = tmp_path / "b-corrected.dcm"
    ds = pydicom.dcmread(shared_study["b"])
    ds.PatientID, ds.PatientName, ds.PatientBirthDate = "P-A", "DOE^JANE", "19600101"
    ds.save_as(corrected)
    out, log, port = tmp_path / "out", tmp_path / "node.log", free_port()
    node = start_node(out, small_bundle, node_config(tmp_path / "node.toml"), "--port", port, "--no-pdf", log=log)
    a2 = _uid(shared_study["a2"])
    try:
        assert wait_for(lambda: listening(log, node.pid) or node.poll() is not None), log.read_text()
        for path, (uid, status) in ((shared_study["a1"], (_uid(shared_study["a1"]), "ok")),
                                    (shared_study["b"], (_uid(shared_study["b"]), "skipped")),
                                    (shared_study["a2"], (a2, "skipped")), (corrected, (_uid(corrected), "ok")),
                                    (shared_study["a2"], (a2, "ok"))):
            sent = subprocess.run(["storescu", "-aec", "CXRBATCH", "127.0.0.1", str(port), path],
                                  capture_output=True, text=True, timeout=60)
            assert sent.returncode == 0, sent.stderr
            assert wait_for(lambda: _by_uid(out).get(uid, {}).get("status") == status, timeout=60), \
                (path.name, _by_uid(out).get(uid), log.read_text()[-3000:])
    finally:
        assert stop(node) == 0, log.read_text()[-3000:]
    assert {row["status"] for row in _by_uid(out).values()} == {"ok"}


def test_scan_holds_back_a_study_of_two_patients_written_without_the_preamble(shared_study, small_bundle, tmp_path):
    """An export that writes DICOM without the 128-byte preamble and 'DICM' (the scan reads such
    files, cxr_batch.readers.content_kind): the study's header pass read preamble files only, so
    P-B's misfiled image was scored with P-A's under the one study, exit 0. Now held back as a
    study of preamble files is."""
    for path in shared_study.values():
        path.write_bytes(path.read_bytes()[132:])
    done = _scan(shared_study["a1"].parent, tmp_path / "out", small_bundle)
    rows = _files(tmp_path / "out")
    assert rows["other.dcm"]["status"] == "ok", rows["other.dcm"]
    for name in ("a1.dcm", "b.dcm", "a2.dcm"):
        row = rows[name]
        assert row["status"] == "skipped" and "patient IDs 'P-A' and 'P-B'" in row["reason"], row
    assert done.returncode == 3, done.stderr[-3000:]


def test_the_reason_of_a_large_held_study_names_its_misfiled_image(caplog, tmp_path, nih_images):
    """A study of 30 images of P-A and one misfiled image of P-B whose name sorts last: the
    reason named the first 20 files ('correct or remove the misfiled image among its files
    a00.dcm ('P-A'), ... and 11 more') and not the misfiled one, so a person had to open the
    study's files one by one to find it. The image of the patient with fewest images is named
    first; only the study's files are held, the other study is not."""
    from cxr_batch.discover import find_candidates
    from cxr_batch.scan import two_patient_studies

    folder, study = tmp_path / "images", generate_uid()
    for n in range(30):
        _image(folder, nih_images[n % len(nih_images)], f"a{n:02d}", PatientID="P-A", StudyInstanceUID=study)
    _image(folder, nih_images[0], "z-misfiled", PatientID="P-B", StudyInstanceUID=study)
    _image(folder, nih_images[1], "other", PatientID="P-C", StudyInstanceUID=generate_uid())
    with caplog.at_level(logging.ERROR, logger="cxr_batch"):
        held = two_patient_studies(find_candidates(folder))
    assert sorted(held) == sorted(f"a{n:02d}.dcm" for n in range(30)) + ["z-misfiled.dcm"], sorted(held)
    reason = held["a00.dcm"]
    assert "z-misfiled.dcm ('P-B')" in reason, reason
    logged = [r.getMessage() for r in caplog.records if "holds images of two patients" in r.getMessage()]
    assert len(logged) == 1 and "z-misfiled" not in logged[0] and "('P-B')" in logged[0], logged


def test_scan_resume_holds_back_a_study_scored_before_its_misfiled_image_came(shared_study, small_bundle, tmp_path):
    """P-A's study scored with its PDFs; P-B's image is then misfiled into it and the scan run
    again with --resume: the rows kept from the earlier scan are held back too (not left 'ok'
    beside a held row), their PDFs no longer in the results folder; once the misfiled image is
    removed, --resume scores the study again, each row with its PDF."""
    folder, out = shared_study["a1"].parent, tmp_path / "out"
    b = shared_study["b"].rename(tmp_path / "b.dcm")

    def scan(*extra):
        return subprocess.run([sys.executable, "-m", "cxr_batch", "scan", str(folder), "--out", str(out),
                               "--weights", str(small_bundle), "--device", "cpu", "--workers", "0", *extra],
                              capture_output=True, text=True, timeout=600)

    done = scan()
    assert done.returncode == 0, done.stderr[-3000:]
    first = _files(out)
    assert all(first[n]["status"] == "ok" and (out / "reports" / first[n]["report"]).is_file() for n in ("a1.dcm", "a2.dcm"))
    b.rename(folder / "b.dcm")
    done = scan("--resume")
    assert done.returncode == 3, done.stderr[-3000:]
    rows = _files(out)
    for name in ("a1.dcm", "a2.dcm", "b.dcm"):
        assert rows[name]["status"] == "skipped" and "'P-A' and 'P-B'" in rows[name]["reason"], rows[name]
        assert rows[name]["report"] == "", rows[name]
    assert not (out / "reports" / first["a1.dcm"]["report"]).exists() and not (out / "reports" / first["a2.dcm"]["report"]).exists()
    assert rows["other.dcm"]["status"] == "ok" and (out / "reports" / rows["other.dcm"]["report"]).is_file()
    assert "3 held back" in done.stderr.splitlines()[-1], done.stderr.splitlines()[-1]
    (folder / "b.dcm").unlink()
    done = scan("--resume")
    assert done.returncode == 0, done.stderr[-3000:]
    rows = _files(out)
    assert all(rows[n]["status"] == "ok" and (out / "reports" / rows[n]["report"]).is_file() for n in ("a1.dcm", "a2.dcm")), rows


def test_watch_killed_while_a_study_is_held_says_it_is_held_when_it_starts_again(shared_study, small_bundle,
                                                                                 tmp_path):
    """watch is killed (SIGKILL: a crash, an OOM kill) while P-A's study is held by P-B's
    misfiled image, and started again: its files were handled, so nothing was read again and
    status.json said no study was held (the count was of this run's holds) while the study still
    was. Now status.json counts the studies held now, from the ledger: 1 after the restart,
    and none once the misfiled image is removed and the study scored."""
    import signal

    from tests.watchkit import start_daemon, status, watch_config

    incoming, out = shared_study["a1"].parent, tmp_path / "out"
    config = watch_config(tmp_path / "w.toml", rescan_interval=1.0, heartbeat_interval=1.0)
    daemon = start_daemon(incoming, out, small_bundle, config, "--no-pdf")
    try:
        assert wait_for(lambda: len(rows_now(out)) == 4, timeout=120)
        assert wait_for(lambda: status(out).get("two_patient_studies") == 1, timeout=30), status(out)
    finally:
        daemon.send_signal(signal.SIGKILL)
        daemon.wait(timeout=60)
    daemon = start_daemon(incoming, out, small_bundle, config, "--no-pdf")
    try:
        assert wait_for(lambda: status(out).get("pid") == daemon.pid and status(out).get("state") == "running",
                        timeout=120), status(out)
        assert status(out).get("two_patient_studies") == 1, status(out)
        shared_study["b"].unlink()
        assert wait_for(lambda: all(_files(out)[n]["status"] == "ok" for n in ("a1.dcm", "a2.dcm")), timeout=120), \
            _files(out)
        assert wait_for(lambda: not status(out).get("two_patient_studies"), timeout=30), status(out)
    finally:
        assert stop(daemon) == 0


def test_watch_keeps_a_study_held_while_its_misfiled_image_is_renamed_and_scores_it_once_replaced(
        shared_study, small_bundle, tmp_path, nih_images):
    """An operator renames P-B's misfiled image in the watched folder (b.dcm to b-wrong.dcm: the
    same bytes, the same instance): the study stays held (the renamed file is still in it). Then,
    in one moment, the renamed file is removed and a new image of P-A's study added: the three
    images of P-A are scored, nothing of P-B."""
    from tests.watchkit import start_daemon, status, watch_config

    incoming, out = shared_study["a1"].parent, tmp_path / "out"
    study = pydicom.dcmread(shared_study["a1"]).StudyInstanceUID
    daemon = start_daemon(incoming, out, small_bundle, watch_config(tmp_path / "w.toml", rescan_interval=1.0,
                                                                    heartbeat_interval=1.0), "--no-pdf")
    try:
        assert wait_for(lambda: len(rows_now(out)) == 4, timeout=120)
        wrong = shared_study["b"].rename(incoming / "b-wrong.dcm")
        assert wait_for(lambda: "b-wrong.dcm" in _files(out), timeout=60), _files(out)
        time.sleep(3)  # three rescans: nothing of the study is scored
        rows = _files(out)
        for name in ("a1.dcm", "a2.dcm", "b-wrong.dcm"):
            assert rows[name]["status"] == "skipped" and "'P-A' and 'P-B'" in rows[name]["reason"], rows[name]
        assert status(out).get("two_patient_studies") == 1, status(out)
        a3 = _image(tmp_path / "new", nih_images[5], "a3", PatientID="P-A", PatientName="DOE^JANE",
                    PatientBirthDate="19600101", StudyInstanceUID=study)
        wrong.unlink()
        a3.replace(incoming / "a3.dcm")
        scored = ("a1.dcm", "a2.dcm", "a3.dcm")
        assert wait_for(lambda: all(_files(out).get(n, {}).get("status") == "ok" for n in scored), timeout=120), \
            _files(out)
        assert wait_for(lambda: not status(out).get("two_patient_studies"), timeout=30), status(out)
    finally:
        assert stop(daemon) == 0
    assert {r["patient_id"] for r in _files(out).values() if r["status"] == "ok"} == {"P-A"}


def test_watch_with_a_quarantine_folder_alone_scores_a_held_study_once_its_misfiled_image_is_removed(
        shared_study, small_bundle, tmp_path):
    """watch --quarantine-dir (failures moved apart, the rest left in place): a held study's files
    stay in the watched folder (a quarantine takes failures only), but the watcher took them for
    moved away, so removing the misfiled image as the row says left the study held for ever.
    Now it is read again and scored, as without the quarantine folder."""
    from tests.watchkit import start_daemon, status, watch_config

    incoming, out = shared_study["a1"].parent, tmp_path / "out"
    daemon = start_daemon(incoming, out, small_bundle, watch_config(tmp_path / "w.toml", rescan_interval=1.0,
                                                                    heartbeat_interval=1.0),
                          "--no-pdf", "--quarantine-dir", tmp_path / "quarantine")
    try:
        assert wait_for(lambda: len(rows_now(out)) == 4, timeout=120)
        assert _files(out)["a1.dcm"]["status"] == "skipped" and shared_study["a1"].is_file()
        shared_study["b"].unlink()
        assert wait_for(lambda: all(_files(out)[n]["status"] == "ok" for n in ("a1.dcm", "a2.dcm")), timeout=60), \
            _files(out)
        assert wait_for(lambda: not status(out).get("two_patient_studies"), timeout=30), status(out)
    finally:
        assert stop(daemon) == 0


def test_watch_with_an_archive_says_how_a_held_study_is_scored_and_scores_it_so(shared_study, small_bundle,
                                                                                 tmp_path):
    """watch --archive-dir: a held study's files are archived. Its rows said 'correct or remove
    the misfiled image among its files ...; the study is then read again', but nothing is left in
    the folder to correct, remove or read again. Now the row says what works there, and it does:
    the corrected image put in the folder is scored, then the study's other images put there
    again are scored too."""
    from tests.watchkit import start_daemon, watch_config

    incoming, out, archive = shared_study["a1"].parent, tmp_path / "out", tmp_path / "archive"
    kept = {n: shared_study[n].read_bytes() for n in ("a1", "a2")}
    daemon = start_daemon(incoming, out, small_bundle, watch_config(tmp_path / "w.toml", rescan_interval=1.0),
                          "--no-pdf", "--archive-dir", archive)
    try:
        assert wait_for(lambda: len(rows_now(out)) == 4, timeout=120)
        reason = _files(out)["a1.dcm"]["reason"]
        assert "then read again" not in reason and "archive" in reason, reason
        assert not shared_study["b"].exists()  # archived
        ds = pydicom.dcmread(next(archive.rglob("b*.dcm")))
        ds.PatientID, ds.PatientName, ds.PatientBirthDate = "P-A", "DOE^JANE", "19600101"
        ds.save_as(tmp_path / "b.dcm")
        (tmp_path / "b.dcm").replace(incoming / "b.dcm")
        assert wait_for(lambda: _files(out)["b.dcm"]["status"] == "ok", timeout=60), _files(out)
        for n, data in kept.items():
            (incoming / f"{n}.dcm").write_bytes(data)
        assert wait_for(lambda: all(_files(out)[n]["status"] == "ok" for n in ("a1.dcm", "a2.dcm")), timeout=60), \
            _files(out)
    finally:
        assert stop(daemon) == 0


def test_two_shards_of_a_scan_agree_on_a_study_of_two_patients(shared_study, small_bundle, tmp_path):
    """--shard 0/2 and 1/2: the study's images fall in both shards (a1, b in one, a2 in the
    other, or so): each shard holds its part of the study (the whole folder is compared before
    sharding), neither scores an image of it, both exit 3; other.dcm is scored in its shard."""
    folder, rows = shared_study["a1"].parent, {}
    for index in (0, 1):
        out = tmp_path / f"out{index}"
        done = subprocess.run([sys.executable, "-m", "cxr_batch", "scan", str(folder), "--out", str(out), "--no-pdf",
                               "--weights", str(small_bundle), "--device", "cpu", "--workers", "0",
                               "--shard", f"{index}/2"], capture_output=True, text=True, timeout=600)
        assert done.returncode == 3, (index, done.stderr[-3000:])
        rows.update(_files(out))
    assert sorted(rows) == ["a1.dcm", "a2.dcm", "b.dcm", "other.dcm"], rows
    assert rows["other.dcm"]["status"] == "ok"
    assert all(rows[n]["status"] == "skipped" and "'P-A' and 'P-B'" in rows[n]["reason"]
               for n in ("a1.dcm", "a2.dcm", "b.dcm")), rows


def test_the_study_header_pass_does_not_block_on_a_fifo_swapped_in(tmp_path):
    """The header pass of scan and watch (patient_header) opened each file by its name after it
    was found to be DICOM: a FIFO swapped in since (by anyone who may write to the folder) blocked
    it for ever, the scan or the watch daemon with it, before any reading worker and its time
    limit. Now a file that is not a regular one is not read (its study is compared without it)."""
    import os
    import threading

    from cxr_batch.integration.node import patient_header

    fifo = tmp_path / "swapped.dcm"
    os.mkfifo(fifo)
    got = []
    reader = threading.Thread(target=lambda: got.append(patient_header(fifo)), daemon=True)
    reader.start()
    reader.join(timeout=10)
    if reader.is_alive():  # let the blocked open return, so the test ends
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        reader.join(timeout=10)
        pytest.fail("patient_header blocked on a FIFO")
    assert got and got[0][0] == "", got


def test_watch_scores_a_held_study_once_its_misfiled_image_is_corrected_in_place(shared_study, small_bundle,
                                                                                  tmp_path):
    """P-B's misfiled image corrected where it lies (its PatientID, name and birth date rewritten
    into the same file, as an editor saving over it does: the same path and inode, new bytes):
    the study is read again and its three images scored under P-A."""
    from tests.watchkit import start_daemon, status, watch_config

    incoming, out = shared_study["a1"].parent, tmp_path / "out"
    daemon = start_daemon(incoming, out, small_bundle, watch_config(tmp_path / "w.toml", rescan_interval=1.0,
                                                                    heartbeat_interval=1.0), "--no-pdf")
    try:
        assert wait_for(lambda: len(rows_now(out)) == 4, timeout=120)
        assert _files(out)["b.dcm"]["status"] == "skipped", _files(out)["b.dcm"]
        ds = pydicom.dcmread(shared_study["b"])
        ds.PatientID, ds.PatientName, ds.PatientBirthDate = "P-A", "DOE^JANE", "19600101"
        with open(shared_study["b"], "r+b") as f:  # the same inode
            ds.save_as(f)
            f.truncate()
        scored = ("a1.dcm", "a2.dcm", "b.dcm")
        assert wait_for(lambda: all(_files(out)[n]["status"] == "ok" for n in scored), timeout=120), _files(out)
        assert wait_for(lambda: not status(out).get("two_patient_studies"), timeout=30), status(out)
    finally:
        assert stop(daemon) == 0
    assert {r["patient_id"] for r in _files(out).values() if r["status"] == "ok"} == {"P-A"}


def test_watch_says_how_to_release_a_study_whose_misfiled_image_was_scored_first(shared_study, small_bundle,
                                                                                  tmp_path):
    """P-B's misfiled image comes first and is scored (nothing to compare it with yet); P-A's
    images of the study then come and are held. Their rows said 'correct or remove the misfiled
    image', but removing the scored one leaves its result in the study, which stays held (a
    scored image whose file is gone is not taken away: its result stands). Now they say to
    correct a scored image where it lies, and that releases the study."""
    from tests.watchkit import start_daemon, watch_config

    incoming, out, park = shared_study["a1"].parent, tmp_path / "out", tmp_path / "park"
    park.mkdir()
    for n in ("a1", "a2", "other"):
        shared_study[n].rename(park / f"{n}.dcm")
    daemon = start_daemon(incoming, out, small_bundle, watch_config(tmp_path / "w.toml", rescan_interval=1.0),
                          "--no-pdf")
    try:
        assert wait_for(lambda: _files(out).get("b.dcm", {}).get("status") == "ok", timeout=120), _files(out)
        for n in ("a1", "a2"):
            (park / f"{n}.dcm").rename(incoming / f"{n}.dcm")
        assert wait_for(lambda: len(rows_now(out)) == 3, timeout=120)
        reason = _files(out)["a1.dcm"]["reason"]
        assert _files(out)["a1.dcm"]["status"] == "skipped" and "correct it where it lies" in reason, reason
        ds = pydicom.dcmread(shared_study["b"])
        ds.PatientID, ds.PatientName, ds.PatientBirthDate = "P-A", "DOE^JANE", "19600101"
        ds.save_as(tmp_path / "b.dcm")
        (tmp_path / "b.dcm").replace(shared_study["b"])
        scored = ("a1.dcm", "a2.dcm", "b.dcm")
        assert wait_for(lambda: all(_files(out)[n]["status"] == "ok" and _files(out)[n]["patient_id"] == "P-A"
                                    for n in scored), timeout=120), _files(out)
    finally:
        assert stop(daemon) == 0

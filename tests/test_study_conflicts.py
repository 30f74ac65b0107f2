"""One Study Instance UID, two patients: a UID collision, a mis-merged or hostile PACS, a modality
that reused a study for the next patient. Scoring the images under the one study would show a
radiologist one patient's result in another's study (the SR filed there, the ORU sent under it).
The whole study is held back from the moment two patients are seen in it: a skipped row whose
reason names both patient IDs, one line in the log, for a person to resolve in the PACS; not
retried on every pull."""

from __future__ import annotations

import subprocess
import sys
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


@needs_dcmtk
@pytest.mark.parametrize("other, said", [(dict(PatientBirthDate="20240101"), "two birth dates"),
                                         (dict(PatientSex="M"), "two sexes")])
def test_listen_holds_back_images_of_one_patient_id_with_another_birth_date_or_sex(shared_study, small_bundle,
                                                                                   tmp_path, nih_images, other, said):
    """The same patient ID with another birth date (two patients with one hospital's number, a
    mother and her newborn), or a frontal and a lateral whose sex disagrees, in one study: held
    back, sent in one association together."""
    from tests.test_node import listening

    first = shared_study["a1"]  # PatientSex F (tests.dicomgen.HEADER)
    twin = _image(tmp_path / "images", nih_images[4], "twin", **{
        **dict(PatientID="P-A", PatientName="DOE^JANE", PatientBirthDate="19600101", ViewPosition="LL",
               StudyInstanceUID=pydicom.dcmread(first).StudyInstanceUID), **other})
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
}
TWO_PATIENTS = {"another ID": (dict(PatientID="P-B"), "patient IDs 'P-A' and 'P-B'"),
                "another birth date": (dict(PatientBirthDate="19600102"), "patient ID 'P-A' with two birth dates"),
                "another sex": (dict(PatientSex="F"), "patient ID 'P-A' with two sexes"),
                "another given name": (dict(PatientName="MÜLLER^JENS"), "patient ID 'P-A' with two names"),
                "another issuer": ((dict(IssuerOfPatientID="HOSP-1"), dict(IssuerOfPatientID="HOSP-2")),
                                   "patient ID 'P-A' of two issuers, 'HOSP-1' and 'HOSP-2'")}


@needs_dcmtk
def test_listen_scores_a_study_whose_images_write_one_patient_otherwise(small_bundle, tmp_path, nih_images):
    """Each study: a PA and an AP of one patient, the AP's header written as another modality or
    PACS writes it. Every one is scored; the studies of two patients are held back (one image at
    least: the other may be scored before it is seen), the reason saying which of the patient's
    keys differs."""
    from tests.test_node import listening

    folder, files, expect = tmp_path / "images", [], {}
    cases = {**{k: ({}, v, "") for k, v in ONE_PATIENT_OTHERWISE.items()},
             **{k: ((({}, other) if isinstance(other, dict) else other) + (said,))
                for k, (other, said) in TWO_PATIENTS.items()}}
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

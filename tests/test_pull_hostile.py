"""The pull against a hostile PACS: each test reproduces a problem found by attacking it (a PACS
that ignores the dates, answers out of resources for ever, duplicates or garbage studies), fixed with it."""

from __future__ import annotations

import copy
import datetime as dt
import subprocess
import sys
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import generate_uid

from cxr_batch.integration.pull import FIND_CAP, PullError, TooMany, study_pages
from tests.dicomgen import write
from tests.fakepacs import ScriptedPACS
from tests.watchkit import free_port


def cli(*args, timeout=300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cxr_batch", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout)


# ---------------------------------------------------------------------- pull: the paging ends
def _counted(find, limit=5000):
    calls = []

    def counted(dates, cap):
        calls.append((dates, cap))
        assert len(calls) <= limit, f"still asking after {limit} C-FINDs: {calls[-4:]}"
        return find(dates, cap)

    return counted, calls


def test_a_pacs_out_of_resources_for_one_day_stops_the_pull_instead_of_asking_for_ever():
    def find(dates, cap):
        raise TooMany("status 0xA700, out of resources")

    counted, calls = _counted(find)
    with pytest.raises(PullError, match="0xA700.*cannot be split further"):
        list(study_pages(counted, dt.date(2025, 1, 1), dt.date(2025, 1, 10), page_size=10))
    assert len(calls) < 40


def test_a_pacs_ignoring_the_dates_is_asked_once_per_day_not_into_the_future():
    def find(dates, cap):  # 20 studies whatever the dates
        if 20 > cap:
            raise TooMany(f"more than {cap} answers")
        return list(range(20))

    counted, calls = _counted(find)
    pages = list(study_pages(counted, dt.date(2025, 1, 1), dt.date(2025, 1, 10), page_size=10))
    assert pages[-1][0] == "20250111-" and len(pages) == 11  # ten days, then what is dated after today
    assert len(calls) < 40 and FIND_CAP > 20


# ---------------------------------------------------------------------- pull: a hostile PACS
def _pull(pacs, out, bundle, *extra, timeout=300):
    since = () if "--days" in extra else ("--since", "2000-01-01")
    return cli("pull", "--from", pacs.address, *since, "--out", out, "--no-pdf", "--weights", bundle, "--device", "cpu",
               "--precision", "fp32", "--workers", "0", *extra, timeout=timeout)


def _study(uid, date="20240301", modalities="DX") -> pydicom.Dataset:
    answer = pydicom.Dataset()
    answer.QueryRetrieveLevel = "STUDY"
    answer.StudyInstanceUID, answer.StudyDate, answer.ModalitiesInStudy = uid, date, modalities
    return answer


@pytest.fixture()
def radiographs(tmp_path, nih_images) -> list[Path]:
    """Three real radiographs as DX, each its own study dated 2024-03-01."""
    return [write(tmp_path / "pacs" / f"{k}.dcm", _pixels(nih_images[k]), PatientID=f"P{k}", AccessionNumber=f"A{k}")
            for k in range(3)]


def _pixels(path):
    from tests.dicomgen import grey

    return grey(path)[::4, ::4].copy()


def _rows(out: Path) -> list[str]:
    return (out / "results.csv").read_text().splitlines()[1:]


def _pull_by_get(pacs, out: Path, bundle):
    """A C-GET pull from ``pacs`` (closed after): (the finished process, results.csv's rows); a
    traceback on stderr fails the test."""
    try:
        done = _pull(pacs, out, bundle, "--retrieve", "get", timeout=300)
    finally:
        pacs.close()
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    return done, _rows(out)


def test_a_pull_takes_hostile_study_answers_in_its_stride(radiographs, small_bundle, tmp_path):
    real = [pydicom.dcmread(f) for f in radiographs]
    padded = _study(generate_uid())
    padded.StudyDescription = "x" * 60_000  # a padded answer is not kept whole
    hostile = [_study("1.2.3\n4"), _study("../../etc/passwd"), _study("1.2/3"), _study("1." + "2" * 998),
               _study(real[0].StudyInstanceUID), _study(real[0].StudyInstanceUID, date="2024-13-45"),
               _study(real[1].StudyInstanceUID, date="garbage"), _study(""), padded]
    refused = generate_uid()
    hostile.append(_study(refused))
    pacs = ScriptedPACS(radiographs, studies=hostile, refuse={refused, padded.StudyInstanceUID})
    out = tmp_path / "out"
    try:
        done = _pull(pacs, out, small_bundle, "--retrieve", "get", timeout=300)
    finally:
        pacs.close()
    assert done.returncode == 3, done.stderr[-3000:]  # two studies could not be listed; the rest scored
    assert "Traceback" not in done.stderr and "unexpected" not in done.stderr
    assert "could not be listed" in done.stderr and "2 retrieval failure(s)" in done.stderr
    rows = _rows(out)
    assert len(rows) == 3 and all(any(ds.SOPInstanceUID in r for r in rows) for ds in real)
    assert pacs.levels().count("SERIES") == 5  # each distinct valid study once: the 3 real, the 2 refused
    assert not list((out / ".cxr-batch" / "spool").glob("*.dcm"))


def test_a_pacs_out_of_resources_for_every_query_fails_the_pull_clearly(radiographs, small_bundle, tmp_path):
    pacs = ScriptedPACS(radiographs, study_status=0xA700)
    try:
        done = _pull(pacs, tmp_path / "out", small_bundle, "--retrieve", "get", "--days", "3", timeout=300)
    finally:
        pacs.close()
    assert done.returncode == 1 and "0xA700" in done.stderr and "cannot be split further" in done.stderr
    assert "Traceback" not in done.stderr
    assert len(pacs.queries) < 20


def test_a_pacs_ignoring_the_dates_gives_only_the_days_asked(radiographs, small_bundle, tmp_path):
    today = dt.date.today().strftime("%Y%m%d")
    files = [write(tmp_path / "today.dcm", pydicom.dcmread(radiographs[0]).pixel_array, PatientID="PT",
                   StudyDate=today), *radiographs]
    pacs = ScriptedPACS(files)  # answers every study whatever the dates asked
    out = tmp_path / "out"
    try:
        done = _pull(pacs, out, small_bundle, "--retrieve", "get", "--days", "1", timeout=300)
    finally:
        pacs.close()
    assert done.returncode == 0, done.stderr[-3000:]
    assert "dated outside" in done.stderr
    rows = _rows(out)
    assert len(rows) == 1 and pydicom.dcmread(files[0]).SOPInstanceUID in rows[0]


def _text_sr(image: pydicom.Dataset, path: Path) -> Path:
    """A Basic Text SR filed in ``image``'s series (a PACS that keeps a note with the images):
    a class the C-GET does not negotiate."""
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian

    sr = pydicom.Dataset()
    sr.SOPClassUID, sr.SOPInstanceUID = "1.2.840.10008.5.1.4.1.1.88.11", generate_uid()
    sr.StudyInstanceUID, sr.SeriesInstanceUID = image.StudyInstanceUID, image.SeriesInstanceUID
    sr.Modality, sr.StudyDate, sr.PatientID = "SR", image.StudyDate, image.PatientID
    sr.ValueType, sr.ContentSequence = "CONTAINER", []
    sr.file_meta = FileMetaDataset()
    sr.file_meta.MediaStorageSOPClassUID, sr.file_meta.MediaStorageSOPInstanceUID = sr.SOPClassUID, sr.SOPInstanceUID
    sr.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    sr.save_as(path, enforce_file_format=True)
    return path


def test_a_series_holding_an_object_that_is_no_image_says_so_and_does_not_fail_every_pull(radiographs, small_bundle,
                                                                                          tmp_path):
    """A DX series that also holds a Basic Text SR, and odd headers (no patient ID, an age of
    0 days, a Latin-1 name): the radiographs are scored, the SR is named in a line as not an
    image and not retrieved, and the pull ends 0 (the next pull would fail the same way for
    ever otherwise); no patient name in the log."""
    odd = [write(tmp_path / "odd0.dcm", _pixels_of(radiographs[0]), PatientID="", PatientAge="000D",
                 AccessionNumber="A9", SpecificCharacterSet="ISO_IR 100", PatientName="Müller^Jürgen")]
    image = pydicom.dcmread(odd[0])
    files = odd + [_text_sr(image, tmp_path / "note.dcm")] + radiographs[1:]
    out = tmp_path / "out"
    done = _pull_closing(ScriptedPACS(files), out, small_bundle)
    assert "Traceback" not in done.stderr and "Müller" not in done.stderr
    assert "1.2.840.10008.5.1.4.1.1.88.11" in done.stderr and "not an image class" in done.stderr, done.stderr[-3000:]
    assert done.returncode == 0, done.stderr[-3000:]
    rows = _rows(out)
    assert len(rows) == 3


def _pixels_of(path):
    return pydicom.dcmread(path).pixel_array


def _pull_closing(pacs, out, bundle):
    """A pull by C-GET from ``pacs``, stopped after it."""
    try:
        return _pull(pacs, out, bundle, "--retrieve", "get", timeout=300)
    finally:
        pacs.close()


class _VanishingPACS(ScriptedPACS):
    """Drops the association when asked for its second retrieval, and every association after
    (a PACS going down: it still accepts connections, answers nothing)."""

    gets, gone = 0, False

    def get(self, event):
        self.gets += 1
        if self.gets == 2:
            self.gone = True
        if self.gone:  # the connection reset (RST), as by a PACS that crashed
            import socket
            import struct

            raw = event.assoc.dul.socket.socket
            raw.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            raw.close()
            return
        yield from super().get(event)

    def find(self, event):
        if self.gone:
            event.assoc.abort()
            return
        yield from super().find(event)


def test_a_pacs_that_goes_away_mid_pull_keeps_what_arrived_and_says_so(radiographs, small_bundle, tmp_path):
    out = tmp_path / "out"
    done = _pull_closing(_VanishingPACS(radiographs), out, small_bundle)
    assert "Traceback" not in done.stderr and "unexpected" not in done.stderr, done.stderr[-3000:]
    assert done.returncode in (1, 3), done.stderr[-3000:]
    assert "dropped the association" in done.stderr, done.stderr[-3000:]
    assert len(_rows(out)) == 1  # the image retrieved before it went is scored
    assert not list((out / ".cxr-batch" / "spool").glob("*.dcm"))


# ---------------------------------------------------------------------- pull: a retrieval that lies
class _FloodingPACS(ScriptedPACS):
    """Answers a C-GET with ``flood()`` (a generator of objects) and never a final status of its own."""

    def __init__(self, files, flood):
        super().__init__(files)
        self.flood, self.sent = flood, 0

    def get(self, event):
        yield 65535  # the most a C-GET may announce
        for ds in self.flood(event.identifier):
            if not event.assoc.is_established:
                return
            self.sent += 1
            yield 0xFF00, ds


def _pull_config(tmp_path, **pull) -> Path:
    path = tmp_path / "pull.toml"
    path.write_text("[pull]\n" + "".join(f"{k} = {v!r}\n" for k, v in pull.items()))
    return path


def test_a_retrieval_that_never_ends_is_cut_and_said(radiographs, small_bundle, tmp_path):
    """A PACS answering the C-GET of a series with other studies' objects for ever (each refused,
    each followed by a pending status): the retrieval is abandoned after its deadline, the series
    counted as a failure, and the pull ends."""
    other = pydicom.dcmread(radiographs[2])

    def flood(identifier):
        if identifier.StudyInstanceUID == other.StudyInstanceUID:
            yield other
            return
        while True:
            yield other

    pacs = _FloodingPACS(radiographs, flood)
    out = tmp_path / "out"
    try:
        done = _pull(pacs, out, small_bundle, "--retrieve", "get", "--config",
                     _pull_config(tmp_path, query_timeout=2.0), timeout=240)
    finally:
        pacs.close()
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    assert done.returncode == 3, done.stderr[-3000:]
    assert "without sending anything asked for" in done.stderr, done.stderr[-3000:]
    rows = _rows(out)
    assert len(rows) == 1 and other.SOPInstanceUID in rows[0]
    # a line per refused object was a log line per object the PACS cares to send, for minutes: ten
    # for each of the two retrievals flooded, then their counts
    import re

    assert pacs.sent > 40 and sum(" refused: " in line for line in done.stderr.splitlines()) == 20, pacs.sent
    assert done.stderr.count("further objects refused in this retrieval are counted, not logged") == 2
    counts = [int(n) for n in re.findall(r"(\d+) object\(s\) refused in one retrieval", done.stderr)]
    assert len(counts) == 2 and min(counts) > 10 and sum(counts) <= pacs.sent - 1, (counts, pacs.sent)  # the
    # last few sent were cut off by the abort


def test_an_instance_sent_many_times_is_stored_and_scored_once(radiographs, small_bundle, tmp_path):
    """A PACS sending the instance asked for 30 times in one C-GET, each copy a little different
    (as a PACS re-stamping a header): one copy is taken, the others refused; one row, one result."""
    def flood(identifier):
        for k in range(30):
            for ds in (pydicom.dcmread(f) for f in radiographs):
                if ds.StudyInstanceUID == identifier.StudyInstanceUID:
                    ds.InstitutionName = f"copy {k}"
                    yield ds

    done, rows = _pull_by_get(_FloodingPACS(radiographs, flood), tmp_path / "out", small_bundle)
    assert len(rows) == 3, "\n".join(rows)
    assert "sent again" in done.stderr, done.stderr[-3000:]


def test_an_object_whose_header_names_another_study_is_refused(radiographs, small_bundle, tmp_path):
    """The instance asked for arrives with another study's (and patient's) header: its result would
    be filed in that other study. Refused, never scored; the pull says it and exits 3."""
    def flood(identifier):
        for ds in (pydicom.dcmread(f) for f in radiographs):
            if ds.StudyInstanceUID == identifier.StudyInstanceUID:
                if ds.PatientID == "P1":
                    ds.StudyInstanceUID, ds.PatientID = generate_uid(), "SOMEONE-ELSE"
                yield ds

    done, rows = _pull_by_get(_FloodingPACS(radiographs, flood), tmp_path / "out", small_bundle)
    assert len(rows) == 2 and not any("SOMEONE-ELSE" in r for r in rows), "\n".join(rows)
    assert "another study" in done.stderr and done.returncode == 3, done.stderr[-3000:]


class _PaddedSeriesPACS(ScriptedPACS):
    """Answers a series-level C-FIND with ``count`` series, each answer padded with 50 kB of a
    key nobody asked for, and ModalitiesInStudy padded as long."""

    count = 100

    def find(self, event):
        if event.identifier.QueryRetrieveLevel != "SERIES":
            yield from super().find(event)
            return
        for _ in range(self.count):
            answer = pydicom.Dataset()
            answer.QueryRetrieveLevel = "SERIES"
            answer.StudyInstanceUID, answer.SeriesInstanceUID = event.identifier.StudyInstanceUID, generate_uid()
            answer.Modality, answer.SeriesDescription = "DX", "x" * 50_000
            answer.ModalitiesInStudy = "DX\\" * 10_000 + "DX"
            yield 0xFF00, answer


def test_a_c_find_s_answers_are_kept_without_what_was_not_asked(tmp_path, nih_images):
    """100 000 answers (the cap) of 80 kB would hold 8 GB: each answer keeps only the keys asked
    for, and none of their values longer than any real one."""
    import gc
    import tracemalloc

    from cxr_batch.integration.pull import PullConfig, Source

    file = write(tmp_path / "pacs" / "a.dcm", _pixels(nih_images[0]), StudyDate="20240301")
    pacs = _PaddedSeriesPACS([file])
    query = pydicom.Dataset()
    query.QueryRetrieveLevel, query.StudyInstanceUID = "SERIES", pydicom.dcmread(file).StudyInstanceUID
    query.SeriesInstanceUID, query.Modality, query.ModalitiesInStudy = "", "", ""
    tracemalloc.start()
    try:
        source = Source(PullConfig(source=pacs.address, retrieve="get", query_timeout=30))
        gc.collect()
        before = tracemalloc.get_traced_memory()[0]
        answers = source.find(query)
        source.close()
        gc.collect()
        held = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
        pacs.close()
    assert len(answers) == _PaddedSeriesPACS.count
    assert held < 1_000_000, f"{held:,} bytes held for {len(answers)} answers"
    assert all(a.Modality == "DX" and "SeriesDescription" not in a and "ModalitiesInStudy" not in a
               for a in answers)


class _RepeatingSeriesPACS(ScriptedPACS):
    """Answers each series-level C-FIND with every series 300 times over."""

    def find(self, event):
        answers = list(super().find(event))
        repeat = 300 if event.identifier.QueryRetrieveLevel == "SERIES" else 1
        for _ in range(repeat):
            yield from answers


def test_a_series_answered_many_times_is_listed_and_retrieved_once(radiographs, small_bundle, tmp_path):
    """300 answers naming the same series: one image-level C-FIND and one retrieval for it, not 300."""
    pacs = _RepeatingSeriesPACS(radiographs)
    out = tmp_path / "out"
    try:
        done = _pull(pacs, out, small_bundle, "--retrieve", "get", timeout=300)
    finally:
        pacs.close()
    assert done.returncode == 0, done.stderr[-3000:]
    assert len(_rows(out)) == 3
    assert pacs.levels().count("IMAGE") == 3, pacs.levels().count("IMAGE")


def test_a_c_get_s_queries_do_not_count_as_the_size_of_an_object(radiographs, small_bundle, tmp_path):
    """By C-GET the queries' answers come on the association the objects come on: they were
    added to the size of the next object, and a pull whose answers held more than
    scoring.max_file_bytes (a PACS answering every study key it has) aborted as 'an object over'
    the limit before anything was retrieved."""
    real = [pydicom.dcmread(f) for f in radiographs]
    padded = []
    for ds in real:
        answer = _study(ds.StudyInstanceUID)
        answer.StudyDescription = "CHEST PA " * 1_000
        padded.append(answer)
    pacs = ScriptedPACS(radiographs, studies=padded)
    config = tmp_path / "pull.toml"
    config.write_text(f"[scoring]\nmax_file_bytes = {max(f.stat().st_size for f in radiographs) + 4096}\n")
    out = tmp_path / "out"
    try:
        done = _pull(pacs, out, small_bundle, "--retrieve", "get", "--config", config, timeout=300)
    finally:
        pacs.close()
    assert done.returncode == 0, done.stderr[-3000:]
    assert len(_rows(out)) == 3


class _HugeAnswerPACS(ScriptedPACS):
    """Answers a series-level C-FIND with one answer of 40 MB."""

    def find(self, event):
        answer = pydicom.Dataset()
        answer.QueryRetrieveLevel, answer.StudyInstanceUID = "SERIES", event.identifier.StudyInstanceUID
        answer.SeriesInstanceUID, answer.Modality = generate_uid(), "DX"
        answer.add_new(0x00091010, "OB", bytes(40_000_000))  # a private element, as large as it likes
        yield 0xFF00, answer


def test_a_c_find_answer_of_40_mb_is_not_read_whole(tmp_path, nih_images):
    """The association is aborted once an answer passes 1 MiB (pynetdicom would assemble it whole in
    memory, then decode it): the query fails saying why."""
    from cxr_batch.integration.pull import PullConfig, PullError, Source

    file = write(tmp_path / "pacs" / "a.dcm", _pixels(nih_images[0]), StudyDate="20240301")
    pacs = _HugeAnswerPACS([file])
    query = pydicom.Dataset()
    query.QueryRetrieveLevel, query.StudyInstanceUID = "SERIES", pydicom.dcmread(file).StudyInstanceUID
    query.SeriesInstanceUID, query.Modality = "", ""
    try:
        source = Source(PullConfig(source=pacs.address, retrieve="move", query_timeout=30))
        with pytest.raises(PullError, match="an answer over 1048576 bytes"):
            source.find(query)
    finally:
        pacs.close()


# ---------------------------------------------------------------------- pull: deliveries racing each other
class _PullerAt:
    """A Puller's receiving side in this process (its storage SCP listening, no PACS asked):
    ``expect(ds)`` makes ``ds`` the instance a retrieval in progress asked for."""

    def __init__(self, out: Path, bundle: Path):
        from cxr_batch.integration.pull import PullConfig, Puller
        from tests.watchkit import free_port

        cfg = PullConfig(source="PACS@127.0.0.1:104", port=free_port(), weights=str(bundle), device="cpu",
                         precision="fp32", workers=0, pdf=False)
        self.puller = Puller(out, cfg)
        self.puller.scp.start()

    def expect(self, ds: pydicom.Dataset) -> None:
        self.puller.asked, self.puller.asked_study = frozenset([ds.SOPInstanceUID]), ds.StudyInstanceUID
        self.puller.arrived, self.puller.unfit = set(), set()

    def send(self, ds: pydicom.Dataset) -> int:
        """``ds`` C-STOREd on an association of its own: the status answered."""
        from pynetdicom import AE

        ae = AE(ae_title="PACS")
        ae.add_requested_context(ds.SOPClassUID)
        assoc = ae.associate("127.0.0.1", self.puller.cfg.port, ae_title=self.puller.cfg.ae_title)
        assert assoc.is_established
        try:
            return int(assoc.send_c_store(ds).Status)
        finally:
            assoc.release()

    def spooled(self) -> list[Path]:
        return sorted(self.puller.spool.folder.glob("*.dcm"))

    def close(self) -> None:
        p = self.puller
        p.scp.stop()
        p.outbox.stop()
        p.reader.close()
        p.ledger.close()
        p.lock.release()


def test_one_instance_delivered_on_two_associations_at_once_is_stored_once(radiographs, small_bundle, tmp_path,
                                                                           monkeypatch):
    """A PACS moving one instance over two associations at the same moment (two copies, a header
    re-stamped): both passed the duplicate check while the first read its header, and the image
    was scored twice (two rows, two results sent). The second waits for the first and is refused."""
    import threading

    from cxr_batch.integration import pull

    first = pydicom.dcmread(radiographs[0])
    second = pydicom.dcmread(radiographs[0])
    second.InstitutionName = "copy 2"
    reading, go_on = threading.Event(), threading.Event()
    real_header = pull.pydicom_header

    def slow_header(path):  # the first delivery stays in its check until told to go on
        if not reading.is_set():
            reading.set()
            go_on.wait(timeout=60)
        return real_header(path)

    monkeypatch.setattr(pull, "pydicom_header", slow_header)
    node = _PullerAt(tmp_path / "out", small_bundle)
    try:
        node.expect(first)
        answers = {}
        one = threading.Thread(target=lambda: answers.setdefault("first", node.send(first)))
        one.start()
        assert reading.wait(timeout=60)
        two = threading.Thread(target=lambda: answers.setdefault("second", node.send(second)))
        two.start()
        two.join(timeout=3)  # unfixed, it was stored meanwhile; fixed, it waits for the first
        go_on.set()
        one.join(timeout=60)
        two.join(timeout=60)
        spooled = node.spooled()
    finally:
        go_on.set()
        node.close()
    assert sorted(answers.values()) == [0x0000, 0x0117], answers
    assert answers["first"] == 0x0000 and len(spooled) == 1
    assert node.puller.arrived == {first.SOPInstanceUID} and node.puller.progress.not_asked == 1


# ---------------------------------------------------------------------- pull: an object of another patient
class _RelabellingPACS(ScriptedPACS):
    """Answers the study-level C-FIND with ``answered`` ({study UID: {key: value}}) over what its
    objects say, and sends each object changed by ``sent`` ({study UID: {key: value}})."""

    def __init__(self, files, answered, sent):
        super().__init__(files)
        self.answered, self.sent = answered, sent

    def find(self, event):
        for status, answer in super().find(event):
            if answer is not None and answer.QueryRetrieveLevel == "STUDY":
                for key, value in self.answered.get(answer.StudyInstanceUID, {}).items():
                    setattr(answer, key, value)
            yield status, answer

    def _sent(self, identifier):
        chosen = []
        for ds in super()._sent(identifier):
            ds = pydicom.dcmread(ds.filename)  # a copy: the next pull is sent the original
            for key, value in self.sent.get(ds.StudyInstanceUID, {}).items():
                setattr(ds, key, value)
            chosen.append(ds)
        return chosen


@pytest.mark.parametrize("retrieve", ["get", "move"])
def test_an_object_of_the_study_asked_for_naming_another_patient_is_refused(radiographs, small_bundle, tmp_path,
                                                                            retrieve):
    """Objects sent under the Study Instance UID asked for whose patient differs from the study's
    C-FIND answer (another patient ID, or the same ID and another name) would have another
    patient's result sent to the RIS under this one: refused, said with the study and both IDs
    (never a name), counted in the summary. Differences real archives make (an issuer only one
    of them gives, trailing spaces, a name's case and empty components) are not refused."""
    studies = [pydicom.dcmread(f).StudyInstanceUID for f in radiographs]
    answered = {studies[0]: {"PatientID": "P0  ", "PatientName": "doe^jane^^^", "IssuerOfPatientID": ""},
                studies[2]: {"PatientName": "ROE^RICHARD"}}
    sent = {studies[0]: {"IssuerOfPatientID": "HOSP"}, studies[1]: {"PatientID": "SOMEONE-ELSE"}}
    pacs = _RelabellingPACS(radiographs, answered, sent)
    out = tmp_path / "out"
    if retrieve == "get":  # the objects held in memory
        done, rows = _pull_by_get(pacs, out, small_bundle)
    else:  # written to the spool as they arrive, their header read from there
        from tests.watchkit import free_port

        pacs.move_to = free_port()
        try:
            done = _pull(pacs, out, small_bundle, "--port", pacs.move_to)
        finally:
            pacs.close()
        assert "Traceback" not in done.stderr, done.stderr[-3000:]
        rows = _rows(out)
    assert len(rows) == 1 and pydicom.dcmread(radiographs[0]).SOPInstanceUID in rows[0], "\n".join(rows)
    assert done.returncode == 3, done.stderr[-3000:]
    refusals = [line for line in done.stderr.splitlines() if "header names another patient" in line]
    assert len(refusals) == 2, done.stderr[-3000:]
    assert studies[1] in refusals[0] and "'SOMEONE-ELSE'" in refusals[0] and "'P1'" in refusals[0], refusals[0]
    assert studies[2] in refusals[1] and "'P2'" in refusals[1], refusals[1]
    assert "ROE" not in done.stderr and "DOE" not in done.stderr.upper()
    assert "2 object(s) naming another patient than the C-FIND answered refused" in done.stderr
    assert not list((out / ".cxr-batch" / "spool").glob("*.dcm"))


# ---------------------------------------------------------------------- pull: the spool stays bounded
class _SpoolWatchingPACS(ScriptedPACS):
    """Notes, before sending each object by C-GET, how many received objects wait in ``spool``."""

    def __init__(self, files, spool: Path):
        super().__init__(files)
        self.spool, self.waiting = spool, []

    def get(self, event):
        for answer in super().get(event):
            if isinstance(answer, tuple):
                self.waiting.append(len(list(self.spool.glob("*.dcm"))))
            yield answer


def test_a_series_larger_than_max_spooled_does_not_fill_the_spool_past_it(radiographs, small_bundle, tmp_path):
    """Retrieval waited for room only before each series: a series of more images than
    pull.max_spooled (a PACS listing thousands in one series) came whole into the spool. It is
    retrieved image by image, each when there is room."""
    study, series = generate_uid(), generate_uid()
    files = [write(tmp_path / "series" / f"{k}.dcm", _pixels_of(f), PatientID="P7", StudyInstanceUID=study,
                   SeriesInstanceUID=series) for k, f in enumerate(radiographs)]
    out = tmp_path / "out"
    pacs = _SpoolWatchingPACS(files, out / ".cxr-batch" / "spool")
    try:
        done = _pull(pacs, out, small_bundle, "--retrieve", "get", "--config", _pull_config(tmp_path, max_spooled=1))
    finally:
        pacs.close()
    assert done.returncode == 0, done.stderr[-3000:]
    assert len(_rows(out)) == 3
    assert len(pacs.waiting) == 3 and max(pacs.waiting) == 0, pacs.waiting



def test_patient_names_a_character_set_decodes_apart_are_not_another_patient():
    """A PACS's C-FIND answer without SpecificCharacterSet has a UTF-8 name read as Latin-1; the
    object, with its character set, reads it right: the same patient, not a refusal. Names that
    differ in their letters still differ."""
    from cxr_batch.integration.pull import Patient

    def patient(pid, name):
        ds = pydicom.Dataset()
        ds.PatientID, ds.PatientName = pid, name
        return Patient.of(ds)

    answered = patient("P1", "Müller^Jürgen".encode().decode("latin-1"))
    assert not answered.differs(patient("P1 ", "MÜLLER^Jürgen^^"))
    assert answered.differs(patient("P1", "Schmidt^Jürgen"))


class _KeyIgnoringPACS(ScriptedPACS):
    """Ignores StudyInstanceUID below the study level (a series- or image-level C-FIND answers, and
    a retrieval sends, every study's objects of the series asked for, or every series)."""

    def _matches(self, query, ds) -> bool:
        keys = ("StudyInstanceUID",) if query.QueryRetrieveLevel == "STUDY" else ("SeriesInstanceUID", "SOPInstanceUID")
        return all(str(ds.get(k, "")) == str(query.get(k)) for k in keys if query.get(k))


def test_a_pacs_ignoring_the_study_asked_below_the_study_level_is_pulled_without_failures(radiographs, small_bundle,
                                                                                           tmp_path):
    """Each study listed every series of the archive; the other studies' series were queried and
    retrieved under it, their objects refused as another study's, and every pull failed (exit 3).
    Answers naming another study than the one asked are left out, and said."""
    pacs = _KeyIgnoringPACS(radiographs)
    out = tmp_path / "out"
    try:
        done = _pull(pacs, out, small_bundle, "--retrieve", "get", timeout=300)
    finally:
        pacs.close()
    assert done.returncode == 0, done.stderr[-3000:]
    assert len(_rows(out)) == 3
    assert pacs.levels().count("IMAGE") == 3, pacs.levels()
    assert "other stud" in done.stderr, done.stderr[-3000:]


@pytest.mark.parametrize("name", ["Straße^Jürgen", "Yılmaz^Ayşe", "Ōkubo^ﬁona"])
def test_names_whose_letters_upper_case_to_ascii_are_not_another_patient_when_read_as_latin_1(name):
    """str.upper() turns some letters outside ASCII into ASCII ones ('ß' -> 'SS', Turkish 'ı' ->
    'I', the ligature 'ﬁ' -> 'FI'): the object read right and the answer read as Latin-1 (no
    SpecificCharacterSet) kept different letters, and the image was refused as another patient's."""
    from cxr_batch.integration.pull import Patient

    def patient(value):
        ds = pydicom.Dataset()
        ds.PatientID, ds.PatientName = "P1", value
        return Patient.of(ds)

    assert not patient(name.encode().decode("latin-1")).differs(patient(name))
    assert not patient(name).differs(patient(name.encode().decode("latin-1")))


# ---------------------------------------------------------------------- pull: the system clock set back
def _puller_at_the_end(ledger, send_wait=60.0):
    """A pull whose retrieval is done and whose studies are all scored, at its completion check
    and summary (the parts of a running Puller these use; its ledger real)."""
    import queue
    import threading
    from types import SimpleNamespace

    from cxr_batch.integration.pull import Progress, Puller

    puller = Puller.__new__(Puller)
    puller.retrieved_all, puller.pending, puller.events = threading.Event(), {}, queue.Queue()
    puller.retrieved_all.set()
    puller._unscored = lambda: 0
    puller.scored_at, puller.progress, puller.ledger = None, Progress(), ledger
    puller.outbox = SimpleNamespace(names=["hl7"], undelivered_lines=lambda ledger, out: [])
    puller.cfg = SimpleNamespace(send_wait=send_wait, max_studies=10, first_day=lambda: dt.date(2024, 3, 1))
    puller.source = SimpleNamespace(pacs="PACS@127.0.0.1:104")
    puller.interrupt, puller.two_patient_studies, puller.exit_code, puller.out = False, 0, 0, Path(".")
    puller.heartbeat = lambda: None
    return puller


def _clocks(monkeypatch):
    """The wall and monotonic clocks of this process, each moved by the returned offsets."""
    import time

    wall, mono = [0.0], [0.0]
    real_time, real_monotonic = time.time, time.monotonic
    monkeypatch.setattr(time, "time", lambda: real_time() + wall[0])
    monkeypatch.setattr(time, "monotonic", lambda: real_monotonic() + mono[0])
    return wall, mono


def test_a_pull_s_send_wait_lasts_send_wait_with_the_clock_set_back(tmp_path, monkeypatch):
    """A pull done scoring sends its results for send_wait seconds with the RIS down: the system
    clock set back an hour then (NTP) held the pull an hour more, its end measured on the wall clock."""
    import time

    from cxr_batch.ledger import Ledger, outbound_entry

    wall, mono = _clocks(monkeypatch)
    ledger = Ledger(tmp_path / "ledger.sqlite")
    ledger.queue_outbound([("k", outbound_entry("CTRL1", "hl7/CTRL1.hl7", "hl7", "127.0.0.1:2575"))])
    ledger.outbound_retry("CTRL1", time.time() + 5, "connection refused", "hl7")  # the RIS is down
    puller = _puller_at_the_end(ledger)
    assert not puller._check_complete()  # sending, for at most send_wait
    wall[0] -= 3600.0
    ledger.outbound_clock_back(3600.0, "hl7")  # what the sender does on seeing the jump
    wall[0] += 61.0
    mono[0] += 61.0  # send_wait has passed
    assert puller._check_complete()
    ledger.close()


def test_a_pull_s_summary_counts_the_studies_scored_after_the_clock_was_set_back(tmp_path, monkeypatch, caplog):
    """The pull's summary and exit code came from the studies reported since its start, by the
    wall clock: set back an hour during the pull, it said '0 image(s) scored, 0 failed' and
    exited 0 over a failed study."""
    import logging

    from cxr_batch.integration.pull import Puller
    from cxr_batch.ledger import Ledger
    from cxr_batch.record import StudyRecord

    wall, _ = _clocks(monkeypatch)
    ledger = Ledger(tmp_path / "ledger.sqlite")
    ledger.commit([("uid:old", "c0", StudyRecord(file="old.dcm", status="error", reason="a pull before"))], [])
    puller = _puller_at_the_end(ledger)
    Puller.begin_summary(puller)
    wall[0] -= 3600.0
    ledger.commit([("uid:1", "c1", StudyRecord(file="a.dcm", status="error", reason="truncated"))], [])
    with caplog.at_level(logging.INFO, logger="cxr_batch"):
        puller.finish(5.0)
    assert "0 image(s) scored (0 urgent, 0 abnormal, 0 normal), 0 skipped, 1 failed" in caplog.text
    assert puller.exit_code == 3
    ledger.close()


# ---------------------------------------------------------------------- pull: a real Orthanc that changes under it
from tests.orthanc import make_orthanc  # noqa: E402,F401,F811  (fixture: skips where Orthanc is absent)


def test_studies_deleted_from_orthanc_between_query_and_retrieval_are_said_gone_not_a_wrong_destination(
        radiographs, small_bundle, make_orthanc, tmp_path, monkeypatch, caplog):
    """Two of three studies deleted in Orthanc (a radiographer merging or removing them), and one
    image of the third, after the pull listed their images and before its C-MOVE: Orthanc answers 0xC000 without sending
    anything, as it does for a move destination it does not know. Read as that, the pull failed
    (exit 1) telling the operator to add us to DicomModalities, which Orthanc already had, and the
    third study was never pulled (the image deleted from it counted a retrieval failure: exit 3 on
    a pull with nothing left to retry). Now each is said to be gone from the PACS, the rest is
    pulled."""
    import logging

    from cxr_batch.integration.pull import PullConfig, Puller

    port = free_port()
    pacs = make_orthanc(dicomweb=False, modalities={"cxrbatch": ("CXRBATCH", "127.0.0.1", port)})
    second = pydicom.dcmread(radiographs[2])  # the third study holds two images in one series
    second.SOPInstanceUID = second.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    second.save_as(tmp_path / "second.dcm")
    for f in [*radiographs, tmp_path / "second.dcm"]:
        pacs.rest("POST", "/instances", data=Path(f).read_bytes())
    deleted = []
    retrieve = Puller._retrieve

    def deleting(self, study, *args, **kwargs):  # each gone between its image-level C-FIND and its C-MOVE
        if study.uid == second.StudyInstanceUID:  # one image of it
            (found,) = pacs.rest("POST", "/tools/lookup", data=second.SOPInstanceUID)
            pacs.rest("DELETE", found["Path"])
        elif len(deleted) < 2 and study.uid not in deleted:  # two whole studies
            (found,) = pacs.rest("POST", "/tools/lookup", data=study.uid)
            pacs.rest("DELETE", found["Path"])
            deleted.append(study.uid)
        return retrieve(self, study, *args, **kwargs)

    monkeypatch.setattr(Puller, "_retrieve", deleting)
    cfg = PullConfig(source=f"{pacs.aet}@127.0.0.1:{pacs.dicom_port}", port=port, since="2000-01-01",
                     weights=str(small_bundle), device="cpu", precision="fp32", workers=0, pdf=False)
    out = tmp_path / "out"
    with caplog.at_level(logging.INFO):
        code = Puller(out, cfg).run()
    said = caplog.text
    assert "DicomModalities" not in said and len(deleted) == 2, said[-3000:]
    assert code == 0, said[-3000:]  # nothing is left to retrieve: the next pull has nothing to do again
    assert said.count("asked for is no longer in the PACS") == 2, said[-3000:]
    assert "1 of 2 object(s) asked for no longer in the PACS" in said and "did not send" not in said, said[-3000:]
    rows = _rows(out)
    assert len(rows) == 1 and radiographs[2].name and pydicom.dcmread(radiographs[2]).SOPInstanceUID in rows[0]



def test_orthanc_killed_mid_pull_then_restarted_the_same_pull_finishes_once(radiographs, small_bundle, make_orthanc,
                                                                           tmp_path, monkeypatch, caplog):
    """Orthanc killed (SIGKILL) after the first study came, before the second's C-MOVE, while the
    first's SR goes back to it: the pull ends saying the PACS went away, with the first study
    scored; Orthanc restarted, the same pull sends what waited, retrieves the two others, scores
    nothing twice and leaves one SR per image in Orthanc."""
    import logging

    from cxr_batch.integration.pull import PullConfig, Puller

    port = free_port()
    pacs = make_orthanc(dicomweb=False, modalities={"cxrbatch": ("CXRBATCH", "127.0.0.1", port)})
    for f in radiographs:
        pacs.rest("POST", "/instances", data=f.read_bytes())
    retrieve, studies = Puller._retrieve, []

    def killing(self, study, *args, **kwargs):
        studies.append(study.uid)
        if len(studies) == 2:
            pacs._process.kill()
            pacs.stop()
        return retrieve(self, study, *args, **kwargs)

    monkeypatch.setattr(Puller, "_retrieve", killing)
    address = f"{pacs.aet}@127.0.0.1:{pacs.dicom_port}"
    cfg = PullConfig(source=address, port=port, since="2000-01-01", send_to=address, send_wait=3,
                     weights=str(small_bundle), device="cpu", precision="fp32", workers=0, pdf=False)
    out = tmp_path / "out"
    with caplog.at_level(logging.INFO, logger="cxr_batch"):
        code = Puller(out, cfg).run()
    first = caplog.text
    assert code in (1, 3) and "Traceback" not in first, first[-3000:]
    assert "no association with the PACS" in first, first[-3000:]
    assert len(_rows(out)) == 1, first[-3000:]
    monkeypatch.undo()
    caplog.clear()
    pacs.start()  # the same ports and storage
    with caplog.at_level(logging.INFO, logger="cxr_batch"):
        code = Puller(out, cfg).run()
    second = caplog.text
    assert code == 0, second[-3000:]
    rows = _rows(out)
    images = [pydicom.dcmread(f).SOPInstanceUID for f in radiographs]
    assert len(rows) == 3 and all(sum(uid in r for r in rows) == 1 for uid in images), rows
    assert "1 already scored" in second, second[-3000:]
    held = pacs.sop_instance_uids()
    assert len(held) == 6 and len(set(held)) == 6  # three images, one SR each


def test_an_image_added_to_a_series_between_query_and_retrieval_does_not_cost_the_series(
        radiographs, small_bundle, make_orthanc, tmp_path, monkeypatch, caplog):
    """An image added to a series in Orthanc after the pull listed it, before its C-MOVE: Orthanc
    sent it first, it was refused (not asked for), and Orthanc ends a C-MOVE at its first refused
    sub-operation: the image asked for never came, the pull exited 3 and only the next one had it.
    Now what did not come is asked for image by image at once; the added image waits for the next
    pull, which takes it alone."""
    import logging

    from cxr_batch.integration.pull import PullConfig, Puller

    port = free_port()
    pacs = make_orthanc(dicomweb=False, modalities={"cxrbatch": ("CXRBATCH", "127.0.0.1", port)})
    pacs.rest("POST", "/instances", data=radiographs[0].read_bytes())
    added = pydicom.dcmread(radiographs[0])
    added.SOPInstanceUID = added.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    added.save_as(tmp_path / "added.dcm")
    retrieve = Puller._retrieve

    def adding(self, study, *args, **kwargs):
        if len(pacs.instances()) == 1:
            pacs.rest("POST", "/instances", data=(tmp_path / "added.dcm").read_bytes())
        return retrieve(self, study, *args, **kwargs)

    monkeypatch.setattr(Puller, "_retrieve", adding)
    cfg = PullConfig(source=f"{pacs.aet}@127.0.0.1:{pacs.dicom_port}", port=port, since="2000-01-01",
                     weights=str(small_bundle), device="cpu", precision="fp32", workers=0, pdf=False)
    out = tmp_path / "out"
    with caplog.at_level(logging.INFO, logger="cxr_batch"):
        code = Puller(out, cfg).run()
    assert code == 0, caplog.text[-3000:]
    rows = _rows(out)
    assert len(rows) == 1 and pydicom.dcmread(radiographs[0]).SOPInstanceUID in rows[0]
    monkeypatch.undo()
    assert Puller(out, cfg).run() == 0
    rows = _rows(out)
    assert len(rows) == 2 and added.SOPInstanceUID in rows[1]


# ---------------------------------------------------------------------- pull: "gone" only when the PACS says so
class _DoubtfulPACS(ScriptedPACS):
    """Fails every retrieval before sending anything (an exception in its handler: 0xC411, no
    sub-operation counted, as Orthanc's 0xC000 for what it no longer holds), then answers the
    image-level C-FIND that asks whether the images are still there in a way that says nothing:
    - "other": with images of another series (a PACS ignoring the keys, or answering some of
      its archive);
    - "nouid": its answers without SOPInstanceUID (a PACS not returning the key);
    - "single": the whole series' retrieval sends another study's object, then ends (the series
      is asked for image by image); a query for one SOP Instance UID is answered with no match (a
      PACS without single-value matching on it), the series' listing as before."""

    def __init__(self, files, how, stranger):
        super().__init__(files)
        self.how, self.stranger, self.listed = how, pydicom.dcmread(stranger), set()

    def get(self, event):
        if self.how == "single" and not event.identifier.get("SOPInstanceUID"):
            yield 1
            yield 0xFF00, self.stranger
            return
        raise RuntimeError("refused")

    def find(self, event):
        query = event.identifier
        if query.QueryRetrieveLevel != "IMAGE":
            yield from super().find(event)
            return
        self.queries.append(query)
        series = str(query.SeriesInstanceUID)
        if self.how == "single":
            if not query.get("SOPInstanceUID"):
                self.queries.pop()
                yield from super().find(event)
            return
        if series not in self.listed:  # the listing: as it is
            self.listed.add(series)
            self.queries.pop()
            yield from super().find(event)
            return
        answer = pydicom.Dataset()
        answer.QueryRetrieveLevel = "IMAGE"
        answer.StudyInstanceUID = query.StudyInstanceUID
        answer.SeriesInstanceUID = generate_uid() if self.how == "other" else series
        if self.how == "other":
            answer.SOPInstanceUID = generate_uid()
        yield 0xFF00, answer


@pytest.mark.parametrize("how", ["other", "nouid", "single"])
def test_a_retrieval_refused_is_not_gone_when_the_pacs_does_not_positively_list_the_series_without_it(
        how, radiographs, small_bundle, tmp_path, nih_images):
    """Each study was counted "no longer in the PACS" and skipped: exit 0, nothing scored, nothing
    failed, and a radiologist's studies never triaged. Only a PACS's successful answer to the
    query that listed the images, listing the series without them, makes them gone; any doubt is
    a retrieval failure the next pull tries again."""
    import json

    stranger = write(tmp_path / "stranger.dcm", _pixels(nih_images[3]), PatientID="P9", AccessionNumber="A9")
    pacs = _DoubtfulPACS(radiographs, how, stranger)
    out = tmp_path / "out"
    done = _pull_failing(pacs, out, small_bundle, 3)
    assert "no longer in the PACS" not in done.stderr, done.stderr[-3000:]
    assert json.loads((out / "status.json").read_text())["pull"]["gone"] == 0


class _RefusingOneByOnePACS(ScriptedPACS):
    """One series of ``n`` images. Its whole retrieval sends another study's object first, then
    fails (the series is asked for image by image); each image's retrieval fails before sending
    anything."""

    def __init__(self, file, n, stranger):
        super().__init__([file])
        first = self.datasets[0]
        self.datasets = []
        for _ in range(n):
            ds = copy.deepcopy(first)
            ds.SOPInstanceUID = generate_uid()
            self.datasets.append(ds)
        self.stranger, self.singles = pydicom.dcmread(stranger), 0

    def get(self, event):
        if event.identifier.get("SOPInstanceUID"):
            self.singles += 1
            raise RuntimeError("refused")
        yield len(self.datasets)
        yield 0xFF00, self.stranger
        yield 0xA702, None


def test_a_series_whose_every_image_is_refused_one_by_one_is_not_asked_for_image_by_image_to_its_end(
        radiographs, small_bundle, tmp_path, nih_images):
    """A series of 40 images cut short by an object we refused, then each image refused: 40
    retrievals and 40 image-level C-FINDs of the whole series (a series of 10,000: 10,000 of each,
    10^8 answers). After a few images in a row fail, the rest count as failures the next pull retries."""
    stranger = write(tmp_path / "stranger.dcm", _pixels(nih_images[3]), PatientID="P9", AccessionNumber="A9")
    pacs = _RefusingOneByOnePACS(radiographs[0], 40, stranger)
    out = tmp_path / "out"
    _pull_failing(pacs, out, small_bundle, 40)
    assert pacs.singles <= 5, pacs.singles
    assert pacs.levels().count("IMAGE") <= 7, pacs.levels()


class _NoImageLevelPACS(ScriptedPACS):
    """Answers an image-level C-FIND with success and no match (a PACS that answers study- and
    series-level queries only, or restricts image-level ones)."""

    def find(self, event):
        if event.identifier.QueryRetrieveLevel == "IMAGE":
            self.queries.append(event.identifier)
            return
        yield from super().find(event)


def test_a_series_listed_without_images_is_a_retrieval_failure_not_nothing_to_do(radiographs, small_bundle,
                                                                                tmp_path):
    """Each study's series listed, none of its images: nothing retrieved, nothing said, exit 0:
    the studies were never triaged and the operator never told."""
    pacs = _NoImageLevelPACS(radiographs)
    out = tmp_path / "out"
    done = _pull_failing(pacs, out, small_bundle, 3)
    assert "no image" in done.stderr, done.stderr[-3000:]


def _pull_failing(pacs, out, small_bundle, failures: int):
    """A pull by C-GET from ``pacs`` (closed after) that ends with ``failures`` retrieval
    failures, exit 3, no traceback; its completed process."""
    try:
        done = _pull(pacs, out, small_bundle, "--retrieve", "get", timeout=300)
    finally:
        pacs.close()
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    assert done.returncode == 3, done.stderr[-3000:]
    assert f"{failures} retrieval failure(s)" in done.stderr, done.stderr[-3000:]
    return done

"""Review 2 (hostile senders, unlucky operators): each test reproduces a problem found by
attacking cxr-batch, and was written before its fix."""

from __future__ import annotations

import copy
import time

import pydicom
import pytest
from pydicom.uid import generate_uid

from tests.dicomgen import write
from tests.watchkit import free_port
from tests.fakepacs import ScriptedPACS
from tests.test_pull_hostile import _pixels, _pull, _rows


@pytest.fixture()
def asked_and_unasked(tmp_path, nih_images):
    """One radiograph the PACS lists (asked) and objects it sends besides, never listed."""
    asked = write(tmp_path / "pacs" / "asked.dcm", _pixels(nih_images[0]), PatientID="P0", AccessionNumber="A0",
                  StudyDate="20240301")
    other = write(tmp_path / "hostile" / "other.dcm", _pixels(nih_images[1]), PatientID="P1", AccessionNumber="A1",
                  StudyDate="20240301")
    return asked, other


@pytest.mark.parametrize("retrieve", ["get", "move"])
def test_a_pacs_sending_an_image_not_asked_for_does_not_get_it_scored_as_asked(asked_and_unasked, small_bundle,
                                                                               tmp_path, retrieve):
    asked, other = asked_and_unasked
    a, o = pydicom.dcmread(asked), pydicom.dcmread(other)
    long_id = copy.deepcopy(o)
    long_id.SOPInstanceUID = generate_uid()
    long_id.PatientID = "X" * 1000 + "\x1b[31m\n"
    pacs = ScriptedPACS([asked], moved=[a, o, long_id, a])
    pacs.move_to = free_port()  # our storage SCP, where the C-MOVE sends
    out = tmp_path / "out"
    try:
        done = _pull(pacs, out, small_bundle, "--retrieve", retrieve, "--port", pacs.move_to, timeout=300)
    finally:
        pacs.close()
    rows = _rows(out)
    assert done.returncode == 0, done.stderr[-3000:]  # all that was asked is scored
    assert "Traceback" not in done.stderr and "unexpected" not in done.stderr
    assert "3 object(s) sent unasked refused" in done.stderr, done.stderr[-3000:]  # o, long_id, a again
    assert sum(a.SOPInstanceUID in r for r in rows) == 1, rows
    assert not any(o.SOPInstanceUID in r or long_id.SOPInstanceUID in r for r in rows if ",ok," in r), rows


# ---------------------------------------------------------------------- a hostile RIS's words
TERMINAL_TRAP = "\x1b]0;owned\x07\x1b[2J\x9b31m order not found " + "y" * 5000


def test_what_a_hostile_ris_answers_reaches_the_operator_escaped_and_bounded(tmp_path, nih_images, small_bundle):
    """A RIS answering AE with terminal escape sequences and 5,000 characters in MSA-3: the
    scan's message and `outbound list` show the reason escaped, one short line, never the
    sequences themselves (they would retitle or clear the operator's terminal)."""
    from tests.ris import RIS
    from tests.test_pull_hostile import cli

    studies = tmp_path / "studies"
    write(studies / "a.dcm", _pixels(nih_images[0]))
    config = tmp_path / "scan.toml"
    config.write_text("[scan]\nsend_wait = 3\n")
    out = tmp_path / "out"
    with RIS(answer="AE", text=TERMINAL_TRAP) as ris:
        done = cli("scan", studies, "--out", out, "--weights", small_bundle, "--device", "cpu", "--precision", "fp32",
                   "--workers", "0", "--no-pdf", "--hl7-to", f"{ris.endpoint.host}:{ris.endpoint.port}", "--config",
                   config)
        assert ris.received, done.stderr[-2000:]
    listed = cli("outbound", "list", "--out", out)
    assert done.returncode == 3 and listed.returncode == 0, (done.stderr[-2000:], listed.stderr)
    for text in (done.stderr, listed.stdout + listed.stderr):
        assert "order not found" in text  # the reason is said...
        assert not any(c in text for c in "\x1b\x07\x9b"), repr(text[-600:])  # ...escaped
        assert max(len(line) for line in text.splitlines()) < 1000


# ---------------------------------------------------------------------- an unlucky operator
class SlowPACS(ScriptedPACS):
    """Sends each object of a C-GET a second apart: time to press Ctrl-C mid-retrieval."""

    def get(self, event):
        import time

        chosen = self._sent(event.identifier)
        yield len(chosen)
        for ds in chosen:
            time.sleep(1.0)
            yield 0xFF00, ds


class SlowFindPACS(ScriptedPACS):
    """Takes its time over every series-level C-FIND: a stop can come while one waits."""

    def find(self, event):
        import time

        if event.identifier.QueryRetrieveLevel == "SERIES":
            time.sleep(3.0)
        yield from super().find(event)


def test_a_stop_while_a_query_waits_is_a_stop_not_a_pacs_that_failed(tmp_path, nih_images):
    """Ctrl-C aborts the association of a C-FIND in progress; that abort is ours: the pull says
    it stopped (exit 3, 'run the same pull again'), not that the PACS did not answer (exit 1)."""
    import threading

    from cxr_batch.integration.pull import PullConfig, Source, Stopped

    file = write(tmp_path / "pacs" / "a.dcm", _pixels(nih_images[0]), StudyDate="20240301")
    pacs = SlowFindPACS([file])
    try:
        source = Source(PullConfig(source=pacs.address, retrieve="get", query_timeout=30))
        query = pydicom.Dataset()
        query.QueryRetrieveLevel, query.StudyInstanceUID = "SERIES", pydicom.dcmread(file).StudyInstanceUID
        query.SeriesInstanceUID, query.Modality = "", ""
        outcome = []

        def ask():
            try:
                outcome.append(source.find(query))
            except Exception as e:  # what the retrieval thread would see
                outcome.append(e)
        thread = threading.Thread(target=ask)
        thread.start()
        time.sleep(1.0)  # the C-FIND is waiting for its answer
        source.shutdown()
        thread.join(timeout=20)
    finally:
        pacs.close()
    assert not thread.is_alive() and len(outcome) == 1
    assert isinstance(outcome[0], Stopped), repr(outcome[0])


def test_ctrl_c_during_a_pull_keeps_what_came_and_the_same_pull_finishes_once(tmp_path, nih_images, small_bundle):
    import signal
    import subprocess
    import sys
    import time

    files = [write(tmp_path / "pacs" / f"{k}.dcm", _pixels(nih_images[k]), PatientID=f"P{k}", StudyDate="20240301")
             for k in range(3)]
    uids = [pydicom.dcmread(f).SOPInstanceUID for f in files]
    pacs = SlowPACS(files)
    out = tmp_path / "out"
    args = ["pull", "--from", pacs.address, "--since", "2000-01-01", "--out", out, "--no-pdf", "--weights",
            small_bundle, "--device", "cpu", "--precision", "fp32", "--workers", "0", "--retrieve", "get"]
    try:
        proc = subprocess.Popen([sys.executable, "-m", "cxr_batch", *map(str, args)], stderr=subprocess.PIPE,
                                text=True)
        lines = []
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            line = proc.stderr.readline()
            if not line:
                break
            lines.append(line)
            if "status=ok" in line:  # one study scored, the others on their way
                proc.send_signal(signal.SIGINT)
                break
        rest = proc.communicate(timeout=30)[1]  # at once, not after the 120 s query_timeout
        first = "".join(lines) + rest
        assert proc.returncode == 3, first[-3000:]
        assert "Traceback" not in first and "run the same pull again" in first
        again = _pull(pacs, out, small_bundle, "--retrieve", "get", timeout=300)
    finally:
        pacs.close()
    assert again.returncode == 0, again.stderr[-3000:]
    rows = _rows(out)
    assert sorted(sum(u in r for r in rows) for u in uids) == [1, 1, 1], rows


def test_monitor_never_writes_into_a_results_folders_state(tmp_path, nih_images, small_bundle):
    """`monitor R --out R/.cxr-batch/spool`: a listen or pull node reads its spool as received
    objects (monitor.pdf would get an error row, then be deleted). Refused (exit 2), nothing written."""
    from tests.test_pull_hostile import cli

    studies = tmp_path / "studies"
    studies.mkdir()
    for p in nih_images[:2]:
        (studies / p.name).write_bytes(p.read_bytes())
    results = tmp_path / "results"
    done = cli("scan", studies, "--out", results, "--weights", small_bundle, "--device", "cpu", "--precision", "fp32",
               "--workers", "0", "--no-pdf")
    assert done.returncode == 0, done.stderr[-2000:]
    for inside in (results / ".cxr-batch", results / ".cxr-batch" / "spool"):
        done = cli("monitor", results, "--out", inside)
        assert done.returncode == 2 and "state folder" in done.stderr and "Traceback" not in done.stderr, done.stderr
        assert not list(inside.glob("monitor.*"))


@pytest.mark.parametrize("retrieve", ["get", "move"])
def test_a_pacs_answering_success_but_sending_nothing_is_a_retrieval_failure(asked_and_unasked, small_bundle,
                                                                           tmp_path, retrieve):
    """The PACS lists an image, then answers its C-GET/C-MOVE "success, 0 sub-operations" and sends
    nothing: the pull said exit 0 (everything retrieved) with no result for the image."""
    asked, _ = asked_and_unasked
    pacs = ScriptedPACS([asked], moved=[])
    pacs.move_to = free_port()
    out = tmp_path / "out"
    try:
        done = _pull(pacs, out, small_bundle, "--retrieve", retrieve, "--port", pacs.move_to, timeout=300)
    finally:
        pacs.close()
    assert done.returncode == 3, done.stderr[-3000:]
    assert "1 retrieval failure(s)" in done.stderr and "Traceback" not in done.stderr
    assert not _rows(out)

"""Reading in worker processes: a memory ceiling, a time limit, crashes contained, and no
process left behind when the scan or daemon that owns them is killed."""

import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from cxr_batch.discover import Candidate
from cxr_batch.sandbox import ReadLimits, StudyReader
from cxr_batch.study import ScoringRules

from .dicomgen import write


def descendants(pid: int) -> set[int]:
    rows = [line.split() for line in subprocess.run(["ps", "-eo", "pid=,ppid="], capture_output=True,
                                                       text=True).stdout.splitlines()]
    found, grew = {pid}, True
    while grew:
        grew = False
        for child, parent in rows:
            if int(parent) in found and int(child) not in found:
                found.add(int(child))
                grew = True
    return found - {pid}


def test_workers_end_with_a_killed_owner():
    code = ("import time\nfrom cxr_batch.sandbox import StudyReader\nfrom cxr_batch.study import ScoringRules\n"
            "r = StudyReader(1, ScoringRules()).__enter__()\nprint('up', flush=True)\ntime.sleep(120)\n")
    owner = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                             text=True)
    assert owner.stdout.readline().strip() == "up"
    deadline = time.time() + 60
    while not descendants(owner.pid) and time.time() < deadline:
        time.sleep(0.5)
    helpers = descendants(owner.pid)
    assert helpers  # the fork server and its worker
    owner.send_signal(signal.SIGKILL)
    owner.wait()
    deadline = time.time() + 20
    while any(Path(f"/proc/{p}").exists() for p in helpers) and time.time() < deadline:
        time.sleep(0.5)
    assert not [p for p in helpers if Path(f"/proc/{p}").exists()]


def test_memory_ceiling_costs_one_row_and_reading_goes_on(tmp_path, nih_images):
    from .dicomgen import grey

    # 6000 x 6000 x 16 bits: within max_pixels, but its decode needs more than 128 MB
    big = write(tmp_path / "big.dcm", np.random.default_rng(0).integers(0, 4096, (6000, 6000), dtype=np.uint16),
                BitsStored=12)
    small = write(tmp_path / "small.dcm", grey(nih_images[1]))
    with StudyReader(1, ScoringRules(), ReadLimits(memory_mb=128)) as reader:
        studies = list(reader.read([Candidate(big, big.name), Candidate(small, small.name)]))
    assert studies[0].record.status == "error" and "memory" in studies[0].record.reason
    assert studies[1].record.status == "ok" and studies[1].grey is not None


def test_a_worker_killed_between_reads_costs_no_study(tmp_path, nih_images):
    """A reading worker that dies while the pool is idle (the OOM killer, an operator's kill):
    the next submit raised BrokenProcessPool, and a watch daemon or listen node gave every later
    study an error row ("internal error while processing"), for as long as it ran."""
    from .dicomgen import grey

    files = [write(tmp_path / f"s{i}.dcm", grey(p)) for i, p in enumerate(nih_images[:2])]
    with StudyReader(1, ScoringRules()) as reader:
        assert reader.read_one(Candidate(files[0], files[0].name)).record.status == "ok"
        for proc in list(reader._pool._processes.values()):
            proc.kill()
            proc.join()
        deadline = time.time() + 30
        while not reader._pool._broken and time.time() < deadline:  # as a daemon waiting for files sees it
            time.sleep(0.05)
        studies = list(reader.read([Candidate(f, f.name) for f in files]))
    assert [s.record.status for s in studies] == ["ok", "ok"], [s.record.reason for s in studies]

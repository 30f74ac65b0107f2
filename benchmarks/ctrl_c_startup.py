"""Ctrl-C while ``cxr-batch`` starts: what a user sees at each moment, and how long the part that
only Python owns lasts.

    python benchmarks/ctrl_c_startup.py [--runs 60] [--max-ms 150] [--timings 20]

Runs a scan of examples/studies through the entry point as pip's wrapper does (``from
cxr_batch.__main__ import run``), sends SIGINT after a random delay in [0, --max-ms] ms, and
sorts what came back: exit 130 with cxr-batch's line (its handling, ``cxr_batch.__main__.run``
on); killed by SIGINT without a word (before Python installed its handler); a KeyboardInterrupt
traceback raised in Python's start-up (``site``: the .pth files of site-packages) or while
Python finds ``cxr_batch.__main__`` (both before any cxr-batch code runs); or a traceback
anywhere else, which would be cxr-batch's to fix. Then the median wall time of ``python -S -c
pass``, ``python -c pass`` and ``python -c 'from cxr_batch.__main__ import run'`` (--timings
runs each): the last is the window no code of cxr-batch can cover.
"""

from __future__ import annotations

import argparse
import collections
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WRAPPER = "import sys\nfrom cxr_batch.__main__ import run\nsys.exit(run())\n"  # pip's console script, in short


def outcome(returncode: int, err: str) -> str:
    lines = err.strip().splitlines()
    if "Traceback" not in err:
        if returncode == 130 and lines and ("interrupted" in lines[-1] or "stopped by SIGINT" in lines[-1]):
            return "exit 130, cxr-batch's line" + ("" if len(lines) == 1 else " (after the scan's log lines)")
        return "killed by SIGINT, nothing printed" if returncode == -signal.SIGINT and not lines else \
            f"other: exit {returncode}, {err.strip()[-200:]!r}"
    frames = [line for line in lines if line.startswith("  File")]
    if any("<frozen site>" in f for f in frames):
        return "traceback in Python's start-up (site)"
    if frames and all("cxr_batch" not in f for f in frames):
        return "traceback while Python finds cxr_batch.__main__"
    return "traceback in cxr-batch's code: " + " | ".join(f.strip() for f in frames[-3:])


def median_ms(command: list[str], runs: int, env: dict) -> float:
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        subprocess.run(command, env=env, check=True, capture_output=True)
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=60)
    ap.add_argument("--max-ms", type=float, default=150.0)
    ap.add_argument("--timings", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    rng = random.Random(args.seed)
    seen, first_ms = collections.Counter(), {}
    with tempfile.TemporaryDirectory() as tmp:
        for run in range(args.runs):
            command = [sys.executable, "-c", WRAPPER, "scan", str(ROOT / "examples" / "studies"), "--out",
                       str(Path(tmp) / f"out{run}"), "--device", "cpu", "--no-pdf"]
            delay = rng.uniform(0, args.max_ms)
            proc = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
            time.sleep(delay / 1000)
            proc.send_signal(signal.SIGINT)
            _, err = proc.communicate(timeout=120)
            what = outcome(proc.returncode, err)
            seen[what] += 1
            first_ms[what] = min(first_ms.get(what, delay), delay)
    print(f"{args.runs} runs, SIGINT after 0-{args.max_ms:g} ms:")
    for what, n in seen.most_common():
        print(f"  {n:4d}  {what} (earliest at {first_ms[what]:.0f} ms)")
    print(f"median wall time of {args.timings} runs:")
    for flags in (["-S", "-c", "pass"], ["-c", "pass"], ["-c", "from cxr_batch.__main__ import run"]):
        print(f"  {median_ms([sys.executable, *flags], args.timings, env):5.0f} ms  python {' '.join(flags)}")


if __name__ == "__main__":
    main()

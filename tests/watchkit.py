"""Running the watch daemon in tests: start it as a user would, wait for rows, read its state."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

from cxr_batch.results import read_results


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def watch_config(path, **values) -> str:
    """A [watch] table with fast timings for tests (values override)."""
    base = dict(batch_size=4, max_wait=0.3, settle=0.5, broken_deadline=4.0, rescan_interval=2.0,
                heartbeat_interval=0.5, worklist_interval=0.0)
    base.update(values)
    lines = ["[watch]"] + [f"{k} = {json.dumps(v)}" for k, v in base.items()]
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def start_daemon(incoming, out, bundle, config, *extra, env=None):
    return subprocess.Popen([sys.executable, "-m", "cxr_batch", "watch", str(incoming), "--out", str(out),
                             "--weights", str(bundle), "--device", "cpu", "--config", str(config), "--no-heatmaps",
                             *map(str, extra)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, **(env or {})})


def rows_now(out):
    try:
        return read_results(out / "results.csv")
    except (FileNotFoundError, ValueError):
        return []


def status(out) -> dict:
    try:
        return json.loads((out / "status.json").read_text())
    except (FileNotFoundError, ValueError):
        return {}


def wait_for(predicate, timeout=120):
    end = time.time() + timeout
    while time.time() < end:
        if predicate():
            return True
        time.sleep(0.3)
    return False


def stop(proc, timeout=60) -> int:
    """SIGTERM and the exit code (killed if it does not stop)."""
    if proc.poll() is None:
        proc.terminate()
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.wait()

"""Running the watch daemon in tests: start it as a user would, wait for rows, read its state."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

from cxr_batch.results import read_results


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def toml_table(path, table: str, base: dict, values: dict) -> str:
    """Write a TOML file with one ``[table]`` of ``base`` updated by ``values``; its path."""
    lines = [f"[{table}]"] + [f"{k} = {json.dumps(v)}" for k, v in {**base, **values}.items()]
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def watch_config(path, **values) -> str:
    """A [watch] table with fast timings for tests (values override)."""
    return toml_table(path, "watch", dict(batch_size=4, max_wait=0.3, settle=0.5, broken_deadline=4.0,
                                          rescan_interval=2.0, heartbeat_interval=0.5, worklist_interval=0.0), values)


def start_daemon(incoming, out, bundle, config, *extra, env=None, start_new_session=False):
    """``cxr-batch watch``; ``start_new_session``: in a process group of its own, as a terminal
    runs a command (``os.killpg`` then reaches its reading workers too, as a Ctrl-C does)."""
    return subprocess.Popen([sys.executable, "-m", "cxr_batch", "watch", str(incoming), "--out", str(out),
                             "--weights", str(bundle), "--device", "cpu", "--config", str(config), "--no-heatmaps",
                             *map(str, extra)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, **(env or {})}, start_new_session=start_new_session)


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


def node_config(path, **values) -> str:
    """A [listen] table with fast timings for tests (values override)."""
    return toml_table(path, "listen", dict(batch_size=4, max_wait=0.3, rescan_interval=2.0, heartbeat_interval=0.5,
                                           worklist_interval=0.0, retry_max=2.0, send_timeout=5.0), values)


def start_node(out, bundle, config, *extra, log, env=None):
    """``cxr-batch listen`` as a user starts it; its log goes to the file ``log`` (a pipe nobody
    reads would fill up and block the node). In a session of its own: ``os.killpg(pid, SIGKILL)``
    kills it with its reading workers, as systemd kills a service's control group."""
    with open(log, "a") as stderr:
        return subprocess.Popen([sys.executable, "-m", "cxr_batch", "listen", "--out", str(out), "--weights",
                                 str(bundle), "--device", "cpu", "--config", str(config), "--no-heatmaps",
                                 *map(str, extra)],
                                stdout=subprocess.DEVNULL, stderr=stderr, text=True, env={**os.environ, **(env or {})},
                                start_new_session=True)


def can_mount_a_share() -> bool:
    """Whether a test may give a daemon a mount namespace of its own (root, unshare, nsenter)."""
    import shutil

    return os.geteuid() == 0 and bool(shutil.which("unshare") and shutil.which("nsenter"))


def start_on_a_share(share, args, log):
    """``python -m cxr_batch ARGS`` in a mount namespace of its own, a tmpfs mounted at the
    folder ``share`` there (a share at OUT; this process sees the folder below it). Its stderr
    goes to the file ``log``; ``/proc/PID/root/SHARE`` is the share as it sees it."""
    mount = 'mount -t tmpfs -o size=64m,mode=0750 share "$0" && exec "$@"'
    with open(log, "a") as stderr:
        return subprocess.Popen(["unshare", "-m", "--propagation", "private", "sh", "-c", mount, str(share),
                                 sys.executable, "-m", "cxr_batch", *map(str, args)],
                                stdout=subprocess.DEVNULL, stderr=stderr, start_new_session=True)


def seen_by(proc, folder):
    """``folder`` as process ``proc`` sees it (in its mount namespace)."""
    from pathlib import Path

    return Path(f"/proc/{proc.pid}/root") / Path(folder).relative_to("/")


def in_namespace(proc, *cmd) -> None:
    """Run ``cmd`` in the mount namespace of process ``proc`` (nsenter)."""
    subprocess.run(["nsenter", "-t", str(proc.pid), "-m", *map(str, cmd)], check=True, capture_output=True, timeout=30)


@contextlib.contextmanager
def ctrl_c_pressed_again_and_again(proc):
    """Within the block, SIGINT to ``proc``'s process group every 20 ms, as a terminal sends an
    operator's Ctrl-C to the whole foreground group (``proc`` started with start_new_session)."""
    done = threading.Event()

    def press():
        while not done.wait(0.02):
            try:
                os.killpg(proc.pid, signal.SIGINT)
            except ProcessLookupError:
                return

    pressing = threading.Thread(target=press)
    pressing.start()
    try:
        yield
    finally:
        done.set()
        pressing.join()

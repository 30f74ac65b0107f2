"""A clean stop on SIGTERM/SIGINT for long-running commands, from the first instant.

The handler is installed before anything heavy is imported: a service manager that stops the
daemon while it is still loading the model gets a clean exit 0, not a process killed half-way.
"""

from __future__ import annotations

import logging
import signal
import threading

log = logging.getLogger("cxr_batch")


class StopSignal:
    """Set by SIGTERM or SIGINT; long loops check it between units of work."""

    def __init__(self):
        self.event = threading.Event()
        self.signum: int | None = None  # the signal that asked for the stop (None: set in code)

    def install(self) -> "StopSignal":
        self._previous = {s: signal.signal(s, self._on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
        return self

    def restore(self) -> None:
        """The handlers that were there before :meth:`install` (a command run inside another
        program, e.g. click's test runner, leaves its signals as it found them)."""
        for s, handler in getattr(self, "_previous", {}).items():
            signal.signal(s, handler)

    def ignore_ctrl_c(self) -> None:
        """SIGINT ignored from now on: the process is stopping as it was asked to, and a Ctrl-C
        pressed again while it exits was a KeyboardInterrupt traceback."""
        signal.signal(signal.SIGINT, signal.SIG_IGN)

    def _on_signal(self, signum, _frame) -> None:
        if not self.event.is_set():
            self.signum = signum
            log.info("signal %d: finishing the current batch, then stopping", signum)
        self.event.set()

    def __bool__(self) -> bool:
        return self.event.is_set()

    def set(self) -> None:
        self.event.set()

    @property
    def signal_name(self) -> str:
        return signal.Signals(self.signum).name if self.signum else "a stop request"

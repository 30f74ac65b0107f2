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

    def install(self) -> "StopSignal":
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)
        return self

    def _on_signal(self, signum, _frame) -> None:
        if not self.event.is_set():
            log.info("signal %d: finishing the current batch, then stopping", signum)
        self.event.set()

    def __bool__(self) -> bool:
        return self.event.is_set()

    def set(self) -> None:
        self.event.set()

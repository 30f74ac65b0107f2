"""Named points between the steps of writing results, for tests of crashes and of files that
change at the worst moment (they do nothing unless their environment variable is set).

- ``CXR_BATCH_KILL_AT=step``: the process dies there as under SIGKILL (no clean-up runs), to
  test exactly-once delivery across a kill between two steps.
- ``CXR_BATCH_PAUSE_AT=step``: the process waits there while the file
  ``CXR_BATCH_PAUSE_FILE`` exists, so a test can change a study file in between; it makes
  ``CXR_BATCH_PAUSE_FILE.here`` when it gets there.
"""

from __future__ import annotations

import os
import signal
import time

KILL_AT = os.environ.get("CXR_BATCH_KILL_AT", "")
PAUSE_AT = os.environ.get("CXR_BATCH_PAUSE_AT", "")


def checkpoint(step: str) -> None:
    if KILL_AT == step:
        os.kill(os.getpid(), signal.SIGKILL)
    if PAUSE_AT == step:
        pause = os.environ.get("CXR_BATCH_PAUSE_FILE", "")
        if os.path.exists(pause):
            open(pause + ".here", "w").close()
        while os.path.exists(pause):
            time.sleep(0.05)

"""``python -m cxr_batch`` and the ``cxr-batch`` command (setup.cfg's entry point)."""

import sys

from . import exit_codes


def run():
    """The command line, with a Ctrl-C during start-up said in one line: importing click and the
    command line takes a while, and before any command's own handling is in place a Ctrl-C
    printed a KeyboardInterrupt traceback. (One in the first milliseconds, while Python itself
    starts, is Python's own to report.)"""
    try:
        from .checkpoints import checkpoint

        checkpoint("starting")
        from .cli import main
    except KeyboardInterrupt:
        sys.stderr.write("cxr-batch: interrupted (Ctrl-C) while starting: nothing was read or written\n")
        sys.exit(exit_codes.INTERRUPTED)
    main()


if __name__ == "__main__":
    run()

"""The command line's exit codes, one list for every command (documented in the README)."""

OK = 0  # every file scored or deliberately skipped
FATAL = 1  # nothing could be done: bad or tampered weights, unreadable metadata, a corrupt ledger
USAGE = 2  # a bad option or configuration value, no such device
SOME_FAILED = 3  # some files failed (their rows say why) or an output could not be written; the rest were
NO_FILES = 4  # the folder held no file at all: an unmounted share or a wrong path is no success
DRIFT_ALARM = 5  # monitor: at least one alarm (the inputs or outputs moved away from the reference)
# a scan stopped by a signal (128 + its number, the shell's convention): results.csv and run.json
# hold every study scored until then, run.json says the run is incomplete
INTERRUPTED = 130  # SIGINT (Ctrl-C)
TERMINATED = 143  # SIGTERM

"""The ``cxr-batch`` command line: a thin layer over scan, merge, watch, evaluate, calibrate, monitor and train.

Exit codes: 0 every file scored or deliberately skipped; 3 some files failed but the rest
were written; 4 (scan) the folder held no file at all (an unmounted share, a wrong path):
results.csv is empty; 5 (monitor) a drift alarm; 2 usage error (also: an output folder in or around
an input folder); 1 nothing could be done (bad weights, metadata or device; results folder in use or
holding an earlier scan; merge: missing or inconsistent shards); 130 / 143 (scan) stopped by SIGINT /
SIGTERM, every study scored until then written.
"""

from __future__ import annotations

import dataclasses
import errno
import functools
import logging
import math
import os
import sys
import typing
from pathlib import Path

import click

from . import exit_codes
from .display import plural, visible
from .findings import check_findings
from .metrics import MIN_RESAMPLES  # the same minimum train's configuration holds to

# Heavy modules (torch, pydicom, reportlab) are imported inside the commands that use them:
# `--help` stays fast, and processes that import this module (the reading workers of
# cxr_batch.sandbox re-import the main script) stay small.
EXIT_FATAL, EXIT_USAGE = exit_codes.FATAL, exit_codes.USAGE

log = logging.getLogger("cxr_batch")


class VisibleFormatter(logging.Formatter):
    """Log lines whose message shows control characters as text (:func:`visible`): a line names
    paths and peers' words, which a hostile folder name or reply could fill with escapes that
    clear or retitle the operator's terminal. A traceback (--debug) keeps its lines."""

    def formatMessage(self, record: logging.LogRecord) -> str:
        record.message = visible(record.message)
        return super().formatMessage(record)


def setup_logging(quiet: bool, debug: bool) -> None:
    level = logging.DEBUG if debug else (logging.WARNING if quiet else logging.INFO)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(VisibleFormatter("cxr-batch: %(message)s"))
    logging.basicConfig(level=level, handlers=[handler], force=True)
    # Libraries log a line per DICOM message (pynetdicom) or per object made (highdicom): warnings
    # only, unless --debug
    for library in ("pynetdicom", "highdicom", "dicomweb_client"):
        logging.getLogger(library).setLevel(logging.DEBUG if debug else logging.WARNING)


def private_files() -> None:
    """Files and folders this process creates carry patient data: no access for others,
    whatever umask the service was started with (cxr_batch.files explains the modes)."""
    from .files import PRIVATE_UMASK

    os.umask(os.umask(0) | PRIVATE_UMASK)


def finite(_ctx, _param, value):
    """A float option's value, refused when NaN or infinite (click's ranges let NaN through:
    every comparison with it is false)."""
    if value is not None and not math.isfinite(value):
        raise click.BadParameter(f"{value} is not a number")
    return value


def bootstrap_resamples(_ctx, _param, value):
    """--bootstrap: 0 (no intervals) or enough resamples for a 95% interval ('--bootstrap 1'
    printed "95% CI 0.583-0.583" beside a mean AUROC of 0.574)."""
    if 0 < value < MIN_RESAMPLES:
        raise click.BadParameter(f"{value} resamples cannot make a 95% interval: give at least {MIN_RESAMPLES} "
                                 f"(0: no intervals)")
    return value


def say(text: str, err: bool = False) -> None:
    """Print one line of output, control characters shown as text as the log's are."""
    click.echo(visible(text), err=err)


def fail(message: str, debug: bool, code: int = EXIT_FATAL):
    if debug:
        raise
    say(f"cxr-batch: error: {message}", err=True)
    sys.exit(code)


def _in_out(name: Path, out: Path) -> bool:
    """``name`` is ``out``, inside it, or a temp file or folder beside it that becomes it, or a
    file in that folder (calibrate's bundle: TEMP/model.pt)."""
    return name == out or out in name.parents or any(
        p.parent == out.parent and p.name.startswith(f".{out.name}.") for p in (name, *name.parents))


def os_error_line(e: OSError, out: Path | None = None) -> str:
    """An OSError as one line. One met writing ``--out`` (read-only, full, a parent that is a file)
    names the option and what it needs: its lock or temp file alone ("OUT/.cxr-batch.lock:
    Read-only file system") named a file the operator never made."""
    if out is not None and e.filename and _in_out(Path(os.path.abspath(e.filename)), Path(os.path.abspath(out))):
        where = "" if Path(e.filename) == Path(out) else f"{e.filename}: "
        # a full disk needs room, not another folder: what was written stays (the same command goes on)
        advice = ("free space on its volume, or give a folder on a volume with room" if e.errno == errno.ENOSPC
                  else "give a folder this user can write to, on a volume with room")
        return f"cannot write --out {out}: {where}{e.strerror or e}; {advice}"
    return f"{e.filename or ''}: {e.strerror or e}"


def run_fatal_errors(debug: bool, action, out: Path | None = None):
    """Run ``action()`` with the exits every scoring command shares: a bad device is a usage
    error (2); bad weights, metadata, labels or files mean nothing could be done (1), an
    ``out`` that cannot be written said as such; a bug is said plainly (``--debug`` shows the
    traceback)."""
    from .bundle import BundleError
    from .config import ConfigError
    from .device import DeviceError
    from .folderlock import FolderBusy
    from .journal import EarlierResults, ResultsNotWritten
    from .labels import LabelsError
    from .ledger import LedgerError
    from .metadata import MetadataError

    try:
        return action()
    except (DeviceError, ConfigError) as e:  # ConfigError: e.g. --out inside the studies (cxr_batch.folders)
        fail(str(e), debug, EXIT_USAGE)
    except (BundleError, FolderBusy, MetadataError, LabelsError, EarlierResults, LedgerError,
            ResultsNotWritten) as e:
        fail(str(e), debug, getattr(e, "exit_code", EXIT_FATAL))  # an empty studies folder: 4
    except KeyboardInterrupt as e:  # a command without a graceful stop (scan has one): nothing half-written
        fail(str(e) or "interrupted (Ctrl-C): stopped; nothing was written", debug, exit_codes.INTERRUPTED)
    except OSError as e:
        fail(os_error_line(e, out), debug)
    except Exception as e:  # a bug: say so plainly; --debug shows the traceback
        fail(f"unexpected {type(e).__name__}: {e} (run with --debug for details)", debug)


def parse_shard(_ctx, _param, value):
    if value is None:
        return None
    try:
        i, n = (int(x) for x in value.split("/"))
        if n < 1 or not 0 <= i < n:
            raise ValueError
    except ValueError:
        raise click.BadParameter(f"{value!r}: expected i/N with 0 <= i < N, e.g. 0/4") from None
    return i, n


def parse_urgent(_ctx, _param, value):
    if value is None:
        return None
    names = [v.strip() for v in value.split(",") if v.strip()]
    if not names:  # an unset shell variable, say: never a silent end of the urgent bucket
        raise click.BadParameter(f"{value!r} names no finding; leave the option out for the default "
                                 f"(Pneumothorax), or set urgent = [] in the --config table for no urgent bucket")
    try:
        return tuple(check_findings(names))
    except ValueError as e:
        raise click.BadParameter(visible(e)) from None


class PathOrHint(click.Path):
    """click.Path that, given a file where a folder is wanted (or a folder where a file is), says
    what to give instead: click's own "Directory 'x.png' is a file." leaves the user to guess."""

    def __init__(self, hint, **kwargs):
        super().__init__(**kwargs)
        self.hint = hint  # the given path -> the sentence saying what to give

    def convert(self, value, param, ctx):
        path = Path(os.fsdecode(value))
        if (not self.file_okay and path.is_file()) or (not self.dir_okay and path.is_dir()):
            self.fail(visible(self.hint(path)), param, ctx)
        return super().convert(value, param, ctx)


def studies_folder() -> PathOrHint:
    return PathOrHint(lambda p: f"{p} is a file; STUDIES is a folder: to score one file, put it in a folder of its "
                                f"own and give that folder", exists=True, file_okay=False, path_type=Path)


def bundle_folder() -> PathOrHint:
    return PathOrHint(lambda p: f"{p} is a file; a weights bundle is a folder (manifest.json and model.pt): give "
                                f"the bundle's folder: --weights {p.parent}", exists=True, file_okay=False)


# Tables a --config file may hold: each command reads its own and [scoring]; one file can
# configure every command.
CONFIG_TABLES = ("scan", "watch", "listen", "scoring", "pull", "dicomweb")
COMMAND_TABLES = ("scan", "watch", "listen", "pull")  # the tables of one command each


def load_config(cls, config_file: Path | None, table: str, **options):
    """A command's configuration: its ``[table]`` and ``[scoring]`` from ``config_file``,
    command-line ``options`` (None = not given) on top, with ``--hl7-to``/``--stow-to``
    (:func:`delivery_options`). A ``[dicomweb]`` table holds the STOW-RS credentials (and may
    name the archive); they are checked here, before any work. ConfigError names the bad key."""
    from .config import ConfigError, check_tables, load_dataclass, read_toml

    data = read_toml(config_file) if config_file is not None else {}
    where = str(config_file) if config_file is not None else "options"
    check_tables(data, CONFIG_TABLES, where, {f.name: table for f in dataclasses.fields(cls) if f.init})
    # a command reads only its own table: another command's file (docs/watch.toml given to listen)
    # would start it with every setting there silently at its default
    others = [name for name in COMMAND_TABLES if name != table and name in data]
    if others and table not in data:
        raise ConfigError(f"{where} has no [{table}] table, only {', '.join(f'[{o}]' for o in others)}: '{table}' "
                          f"reads [{table}] and [scoring], so nothing of {' or '.join(others)}'s would be used; "
                          f"write {table}'s settings below a [{table}] line (an empty [{table}] line to use only "
                          f"[scoring])")
    values = dict(data.get(table, {}))
    if "scoring" in data:  # checked as the table the file has, so that a mistake is named there
        scoring_type = typing.get_type_hints(cls)["scoring"]
        values["scoring"] = load_dataclass(scoring_type, data["scoring"], f"{where} [scoring]")
    context = click.get_current_context(silent=True)
    options = {**(context.meta.get("cxr_batch.delivery", {}) if context is not None else {}), **options}
    if "dicomweb" in data:
        values.setdefault("dicomweb_file", str(config_file))
        if isinstance(data["dicomweb"], dict) and data["dicomweb"].get("url"):
            values.setdefault("stow_to", data["dicomweb"]["url"])
    try:
        cfg = load_dataclass(cls, values, f"{where} [{table}]" if config_file else table, **options)
    except ConfigError as e:
        # the checks in the configuration's own __post_init__ (urgent findings) know only their table:
        # name the file too, as every other mistake in it is named ("c.toml [scan].urgent: ...")
        if config_file is not None and table in data and str(e).startswith(f"{table}."):
            raise ConfigError(f"{where} [{table}]{str(e)[len(table):]}") from None
        raise
    if getattr(cfg, "stow_to", None):
        from .integration.outbox import dicomweb_config

        dicomweb_config(cfg)  # the archive's URL and credentials, checked before the model loads
    return cfg


def delivery_options(command):
    """``--hl7-to`` and ``--stow-to`` for a scoring command: kept in the click context for
    :func:`load_config`, so the command's own signature does not change."""
    @functools.wraps(command)
    def run(*args, hl7_to=None, stow_to=None, **kwargs):
        click.get_current_context().meta["cxr_batch.delivery"] = {"hl7_to": hl7_to, "stow_to": stow_to}
        return command(*args, **kwargs)

    run = click.option("--stow-to", metavar="URL",
                       help="DICOMweb root URL: each SR (and --dicom-pdf report) stored by STOW-RS, through the "
                            "outbound queue; credentials only from the [dicomweb] table of --config. Turns on "
                            "--dicom-sr.")(run)
    return click.option("--hl7-to", metavar="HOST:PORT",
                        help="The RIS's MLLP listener: one HL7 ORU^R01 per scored study (priority and findings, "
                             "matched by accession number and patient ID), through the outbound queue.")(run)


INTERRUPTED_LINE = "cxr-batch: interrupted (Ctrl-C): stopped"


class Commands(click.Group):
    """The command group. A Ctrl-C that no command handles itself (one while click reads the
    options, before a scan's stop handler is in place, or in a command that has no graceful
    stop) ends with one line and the documented exit code 130, where click would print
    "Aborted!" and exit 1."""

    def make_context(self, *args, **kwargs):
        try:
            return super().make_context(*args, **kwargs)
        except KeyboardInterrupt:
            interrupted()

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except KeyboardInterrupt:
            interrupted()


def interrupted():
    say(INTERRUPTED_LINE, err=True)
    raise click.exceptions.Exit(exit_codes.INTERRUPTED)


@click.group(cls=Commands, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="cxr-batch")
def main():
    """Chest X-ray triage: score frontal radiographs for the 14 NIH ChestX-ray14 findings."""


def config_option(command: str, example: str = "docs/watch.toml"):
    # what only a command line gives (cxr_batch.config.COMMAND_LINE_ONLY), as this command has it
    command_line_only = "--out, --resume, --overwrite, --quiet, --debug" if command == "scan" else "--out, --debug"
    return click.option(
        "--config", "config_file", type=click.Path(exists=True, dir_okay=False, path_type=Path),
        help=f"TOML file: a [{command}] table (any option of this command but {command_line_only}; '_' for '-', "
             f"pdf = false for --no-pdf) and a [scoring] table "
             "(what is scored: modalities, body_parts, views, allow_unknown_view, allow_missing_body_part, "
             f"max_pixels, max_file_bytes); command-line options win. See {example}.")


# Options of every command that scores studies (scan, watch), in the order --help lists them.
RUN_OPTIONS = (
    click.option("--weights", type=bundle_folder(),
                 help="Weights bundle folder (default: the bundled weights)."),
    click.option("--metadata", type=PathOrHint(lambda p: f"{p} is a folder; --metadata takes the table itself, a "
                                                         f"CSV file with the NIH Data_Entry columns",
                                               exists=True, dir_okay=False),
                 help="NIH Data_Entry-style CSV with patient data for PNG/JPEG files."),
    click.option("--device", help="auto, cpu, cuda or cuda:N.  [default: auto]"),
    click.option("--precision", type=click.Choice(["auto", "fp32", "bf16", "fp16"]),
                 help="Inference precision.  [default: auto]"),
    click.option("--workers", type=click.IntRange(0, 64),
                 help="Decoding worker processes (default: chosen for this machine)."),
    click.option("--urgent", callback=parse_urgent,
                 help="Comma-separated findings that make a study urgent.  [default: Pneumothorax]"),
    click.option("--pdf/--no-pdf", default=None, help="PDF reports and worklist in OUT/reports.  [default: pdf]"),
    click.option("--heatmaps/--no-heatmaps", default=None, help="Grad-CAM for flagged findings (models of 128 px and more).  [default: heatmaps]"),
    click.option("--dicom-pdf", is_flag=True, default=None, help="Also write each report as a DICOM Encapsulated PDF."),
    click.option("--dicom-sr", is_flag=True, default=None,
                 help="Write a DICOM SR (TID 1500 measurement report) per scored DICOM image to OUT/dicom."),
    click.option("--title", help="Report title.  [default: Chest X-ray triage report]"),
    click.option("--institution", help="Institution name printed on reports."),
    click.option("--follow-links", is_flag=True, default=None,
                 help="Follow symbolic links that lead outside the folder (default: such links get a row "
                      "and are not followed)."),
)
DEBUG_OPTION = click.option("--debug", is_flag=True, help="Show tracebacks and library messages.")


def options(table):
    """A decorator that adds the click options of ``table`` in the order --help lists them."""
    def decorate(command):
        for option in reversed(table):
            command = option(command)
        return command

    return decorate


run_options = options(RUN_OPTIONS)


def misplaced_option(name: str, why: str):
    """A hidden option that only says which one is meant: a newcomer gives evaluate the
    --metadata that scan takes (the README says its labels serve "as --metadata does"), and
    click's "No such option" said nothing of where the patient data go. Exit 2, before any work."""
    def refuse(ctx, _param, value):
        if value is not None:
            raise click.UsageError(f"{name} is not an option of '{ctx.info_name}': "
                                   f"{why.format(command=ctx.info_name)}", ctx)

    return click.option(name, hidden=True, expose_value=False, callback=refuse)


@main.command()
@click.argument("studies", type=studies_folder())
@click.option("--out", "-o", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Results folder (results.csv, run.json, reports/).")
@config_option("scan")
@run_options
@delivery_options
@click.option("--batch-size", type=click.IntRange(1, 4096), help="Images per forward pass.  [default: 16]")
@click.option("--shard", callback=parse_shard, metavar="i/N",
              help="Process only shard i of N: a deterministic 1/N of the files (merge the shards with merge).")
@click.option("--resume", is_flag=True,
              help="OUT holds an earlier (or interrupted) scan of STUDIES: keep the rows of files scored before "
                   "(unchanged content, same weights) and score only the rest.")
@click.option("--overwrite", is_flag=True,
              help="OUT holds an earlier scan: delete its results.csv, run.json and reports, and scan again.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar, warnings only.")
@DEBUG_OPTION
@misplaced_option("--labels", "scan takes no labels: patient data go in --metadata; labelled studies are for "
                              "'cxr-batch evaluate' and 'cxr-batch calibrate'")
def scan(studies, out, config_file, weights, metadata, device, precision, workers, urgent, pdf, heatmaps, dicom_pdf,
         dicom_sr, title, institution, follow_links, batch_size, shard, resume, overwrite, quiet, debug):
    """Score every frontal chest radiograph under STUDIES into OUT/results.csv.

    Ctrl-C or SIGTERM stops after the current batch: every study scored so far is written
    (exit 130 or 143) and --resume finishes the scan. A second scan into the same OUT is
    refused unless --resume or --overwrite says what to do with the first one's results.
    """
    if resume and overwrite:  # one would silently win: keeping and deleting the first scan's rows
        raise click.UsageError("--resume and --overwrite exclude each other: --resume keeps the earlier scan's "
                               "rows, --overwrite deletes them; give one")
    earlier = "resume" if resume else "overwrite" if overwrite else "refuse"
    from .stopping import StopSignal

    stop = StopSignal().install()  # before the heavy imports: a Ctrl-C while loading is a clean stop
    try:
        from .config import ConfigError
        from .scan import ScanConfig, run_scan

        setup_logging(quiet, debug)
        private_files()
        try:
            cfg = load_config(ScanConfig, config_file, "scan", weights=weights, metadata=metadata, device=device,
                              precision=precision, batch_size=batch_size, workers=workers, urgent=urgent,
                              shard=shard, pdf=pdf, heatmaps=heatmaps, dicom_pdf=dicom_pdf, dicom_sr=dicom_sr,
                              title=title, institution=institution, follow_links=follow_links,
                              progress=False if quiet else None)
        except ConfigError as e:
            fail(str(e), debug, EXIT_USAGE)
        summary = run_fatal_errors(debug, lambda: run_scan(studies, out, cfg, earlier, stop), out)
    finally:
        if stop.signum is None:
            stop.restore()
        else:  # stopping: a Ctrl-C pressed again (torch's clean-up at exit takes a while) printed a traceback
            stop.ignore_ctrl_c()
    say(("cxr-batch: " if summary.stopped_by else "") + summary.line(), err=True)
    if summary.stopped_by:  # stopped: the results go out when --resume finishes the scan
        sys.exit(summary.exit_code)
    sys.exit(send_scan_results(out, cfg, summary.exit_code, debug, studies))


def send_scan_results(out: Path, cfg, code: int, debug: bool, studies: Path | None = None) -> int:
    """After a scan with --hl7-to/--stow-to: its results sent through the queue; what could not
    be delivered is said, with how to send it later, and the exit code becomes 3. ``studies``:
    the scanned folder (the ORUs' patient names come from its headers)."""
    if not (cfg.hl7_to or cfg.stow_to) or not (out / "results.csv").is_file():
        return code
    from .checkpoints import checkpoint
    from .integration.outbox import send_after_scan

    checkpoint("send")  # results.csv and run.json written, nothing queued yet
    lines = run_fatal_errors(debug, lambda: send_after_scan(out, cfg, Path(studies) if studies else None))
    for line in lines:
        say(f"cxr-batch: {line}", err=True)
    return exit_codes.SOME_FAILED if lines and code == exit_codes.OK else code


@main.command()
@click.argument("inputs", nargs=-1, required=True, type=PathOrHint(
    lambda p: f"{p} is a folder; merge takes the shards' results.csv files: give its results.csv: {p / 'results.csv'}",
    exists=True, dir_okay=False, path_type=Path))
@click.option("--out", "-o", required=True, type=click.Path(dir_okay=False),
              help="Merged results.csv to write.")
@click.option("--allow-partial", is_flag=True,
              help="Merge even when shards are missing (each results.csv needs its run.json beside it to say "
                   "which shard it is); warns for each missing shard.")
def merge(inputs, out, allow_partial):
    """Merge the results.csv files of a sharded scan (scan --shard i/N) into one.

    INPUTS are the shards' results.csv files; every shard 0..N-1 must be given once.
    """
    from .results import MergeError, merge_results

    if out.endswith(("/", os.sep)):  # Path() drops the slash: a file named after the folder was written
        raise click.BadParameter(visible(f"{out} names a folder; merge writes one file: give its name, e.g. "
                                         f"{out}results.csv"), param_hint="'--out'")
    out = Path(out)
    setup_logging(False, False)
    try:
        n = merge_results(list(inputs), out, allow_partial)
    except MergeError as e:
        fail(str(e), False)
    except OSError as e:  # a parent that is a file, a read-only or full volume: nothing is written
        fail(f"cannot merge into {out}: {e.strerror or e} ({e.filename or out})", False)
    say(f"{plural(n, 'row')} from {plural(len(inputs), 'file')} -> {out}", err=True)
    from .bundle import BundleError
    from .reports import MERGED_WORKLIST, is_our_worklist, write_merged_worklist
    from .results import read_run_info

    beside = out.parent / MERGED_WORKLIST
    if beside.exists() and not is_our_worklist(beside):
        # results.csv is never replaced unless cxr-batch's: nor is a worklist.pdf of the user's
        log.warning("no worklist.pdf for the merged results: %s exists and is not a cxr-batch worklist: not "
                    "replaced (results.csv is written; its worklist_rank is the order to read in)", beside)
        return
    worklist = None
    try:  # the whole scan's worklist: each shard's ranks only its own studies
        worklist = write_merged_worklist(out, list(inputs), [read_run_info(Path(p).parent) for p in inputs])
    except (BundleError, OSError) as e:
        log.warning("no worklist.pdf for the merged results: %s (results.csv is written; its worklist_rank is "
                    "the order to read in)", e)
    if worklist is not None:
        say(f"worklist in worklist_rank order -> {worklist}", err=True)
    elif beside.is_file():
        # an earlier merge's, beside the results.csv just written: other studies in another
        # order, which a reader would take for these
        try:
            beside.unlink()
        except OSError as e:
            log.warning("%s is an earlier merge's worklist and does not list these results: remove it (%s)",
                        beside, e.strerror or e)
        else:
            log.warning("removed %s: an earlier merge's worklist, it does not list these results", beside)


def run_daemon(build, out: Path, debug: bool):
    """Start and run a daemon (watch, listen) until SIGTERM: the stop signal first (a stop while
    loading is a clean stop), then ``build(stop)`` -> the daemon (configuration, model, ledger),
    its failures mapped to exit codes, then ``run()``."""
    from .stopping import StopSignal

    stop = StopSignal().install()  # before the heavy imports
    setup_logging(False, debug)
    log.info("starting (PID %d)", os.getpid())

    from .bundle import BundleError
    from .config import ConfigError
    from .device import DeviceError
    from .folderlock import FolderBusy
    from .journal import EarlierResults
    from .ledger import LedgerError
    from .metadata import MetadataError
    from .integration.node import NodeError

    private_files()
    try:
        daemon = build(stop)
    except (ConfigError, DeviceError) as e:
        fail(str(e), debug, EXIT_USAGE)
    except (BundleError, FolderBusy, LedgerError, MetadataError, NodeError, EarlierResults) as e:  # NodeError: a port in use
        fail(str(e), debug)
    except OSError as e:
        fail(os_error_line(e, out), debug)
    try:
        code = daemon.run()
    except NodeError as e:  # the node's port cannot be bound
        fail(str(e), debug)
    if stop.signum is not None:  # stopped by a signal: a Ctrl-C pressed again while Python exits killed it (not 0)
        stop.ignore_ctrl_c()
    sys.exit(code)


@main.command()
@click.argument("watch_dir", type=PathOrHint(lambda p: f"{p} is a file; watch takes the folder that studies "
                                                       f"arrive in (the PACS's export folder)",
                                             exists=True, file_okay=False, path_type=Path))
@click.option("--out", "-o", required=True, type=click.Path(file_okay=False, path_type=Path), help="Results folder.")
@config_option("watch")
@run_options
@delivery_options
@click.option("--batch-size", type=click.IntRange(1, 4096), help="Studies scored together.  [default: 8]")
@click.option("--max-wait", type=click.FloatRange(0), help="Seconds a ready study waits for its batch to fill.")
@click.option("--settle", type=click.FloatRange(0), help="Seconds a file must stay unchanged to count as complete.")
@click.option("--polling", is_flag=True, default=None, help="Poll the folder (network shares without inotify).")
@click.option("--archive-dir", type=click.Path(file_okay=False),
              help="Move processed files here (default: leave them in place).")
@click.option("--quarantine-dir", type=click.Path(file_okay=False), help="Move files that failed here.")
@DEBUG_OPTION
def watch(watch_dir, out, config_file, weights, metadata, device, precision, workers, urgent, pdf, heatmaps, dicom_pdf,
          dicom_sr, title, institution, follow_links, batch_size, max_wait, settle, polling, archive_dir,
          quarantine_dir, debug):
    """Watch WATCH_DIR (a PACS export folder) and report every new study once, until SIGTERM."""

    def build(stop):
        from .watch import WatchConfig, Watcher

        cfg = load_config(WatchConfig, config_file, "watch", weights=weights, metadata=metadata, device=device,
                          precision=precision, workers=workers, urgent=urgent, pdf=pdf, heatmaps=heatmaps,
                          dicom_pdf=dicom_pdf, dicom_sr=dicom_sr, title=title, institution=institution,
                          follow_links=follow_links, batch_size=batch_size, max_wait=max_wait, settle=settle,
                          polling=polling, archive_dir=archive_dir, quarantine_dir=quarantine_dir)
        return Watcher(watch_dir, out, cfg, stop)

    run_daemon(build, out, debug)


def parse_ae_titles(_ctx, _param, value):
    """Comma-separated AE titles. Given but empty (``--allow ''``, ``--allow ','``, an unset
    variable in a unit file) is an error: read as "no list" it would accept any peer."""
    if value is None:
        return None
    titles = tuple(v.strip() for v in value.split(","))
    if not any(titles):
        raise click.BadParameter(f"{value!r} names no AE title; leave the option out to use the configuration's "
                                 f"allow-list (or accept any peer when it has none)")
    if not all(titles):
        raise click.BadParameter(f"{value!r} has an empty AE title between its commas")
    return titles


@main.command()
@click.option("--out", "-o", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Results folder (results.csv, reports/, dicom/; received objects wait in OUT/.cxr-batch/spool).")
@click.option("--port", type=click.IntRange(1, 65535), help="TCP port to listen on.  [default: 11112]")
@click.option("--ae-title", help="Our AE title; associations calling another are rejected.  [default: CXRBATCH]")
@click.option("--host", help="Address to listen on (0.0.0.0 or :: for every interface).  [default: 127.0.0.1]")
@click.option("--allow", callback=parse_ae_titles,
              help="Comma-separated calling AE titles allowed to associate (default: the config's allow-list; "
                   "none: any). An empty list is an error.")
@click.option("--send-to", help="AE@HOST:PORT that receives each scored image's DICOM SR (e.g. PACS@pacs:104).")
@config_option("listen", "docs/node.toml")
@run_options
@delivery_options
@click.option("--batch-size", type=click.IntRange(1, 4096), help="Studies scored together.  [default: 8]")
@click.option("--max-wait", type=click.FloatRange(0), help="Seconds a received study waits for its batch to fill.")
@click.option("--archive-dir", help="Move processed objects here (default: delete them from the spool).")
@click.option("--quarantine-dir", help="Move objects that failed here (default: delete them from the spool).")
@DEBUG_OPTION
def listen(out, port, ae_title, host, allow, send_to, config_file, weights, metadata, device, precision, workers, urgent,
           pdf, heatmaps, dicom_pdf, dicom_sr, title, institution, follow_links, batch_size, max_wait, archive_dir,
           quarantine_dir, debug):
    """A DICOM node: receive studies by C-STORE, report each once, send the results back, until SIGTERM."""

    def build(stop):
        from .integration.node import ListenConfig, Node

        cfg = load_config(ListenConfig, config_file, "listen", port=port, ae_title=ae_title, host=host, allow=allow,
                          send_to=send_to, weights=weights, metadata=metadata, device=device, precision=precision,
                          workers=workers, urgent=urgent, pdf=pdf, heatmaps=heatmaps, dicom_pdf=dicom_pdf,
                          dicom_sr=dicom_sr, title=title, institution=institution, follow_links=follow_links,
                          batch_size=batch_size, max_wait=max_wait, archive_dir=archive_dir,
                          quarantine_dir=quarantine_dir)
        return Node(out, cfg, stop)

    run_daemon(build, out, debug)


def parse_modalities(_ctx, _param, value):
    if value is None:
        return None
    names = tuple(v.strip().upper() for v in value.split(",") if v.strip())
    if not names:
        raise click.BadParameter(f"{value!r} names no modality, e.g. CR,DX")
    return names


@main.command()
@click.option("--from", "source", metavar="AE@HOST:PORT", help="The PACS to query and retrieve from.")
@click.option("--out", "-o", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Results folder (results.csv, reports/, dicom/, hl7/; retrieved objects wait in "
                   "OUT/.cxr-batch/spool).")
@click.option("--ae-title", help="Our AE title (the PACS must know it, with our host and --port, for C-MOVE).  "
                                 "[default: CXRBATCH]")
@click.option("--port", type=click.IntRange(1, 65535), help="Port of our storage SCP, where C-MOVE sends the images.  "
                                                            "[default: 11112]")
@click.option("--host", help="Address our storage SCP listens on (0.0.0.0: every interface, for a PACS on another "
                             "machine).  [default: 127.0.0.1]")
@click.option("--since", metavar="YYYY-MM-DD", help="Studies of this date or later.")
@click.option("--days", type=click.IntRange(1, 36_500), help="Studies of the last D days, today included.  [default: 1]")
@click.option("--modalities", callback=parse_modalities, metavar="CR,DX",
              help="Series of these modalities are retrieved.  [default: CR,DX]")
@click.option("--retrieve", type=click.Choice(["move", "get"]),
              help="C-MOVE to our storage SCP on --port, or C-GET over the query's association.  [default: move]")
@click.option("--send-to", metavar="AE@HOST:PORT", help="C-STORE each scored image's DICOM SR here (e.g. the same PACS).")
@config_option("pull", "docs/pull.toml")
@run_options
@delivery_options
@click.option("--batch-size", type=click.IntRange(1, 4096), help="Studies scored together.  [default: 8]")
@DEBUG_OPTION
def pull(source, out, ae_title, port, host, since, days, modalities, retrieve, send_to, config_file, weights, metadata,
         device, precision, workers, urgent, pdf, heatmaps, dicom_pdf, dicom_sr, title, institution, follow_links,
         batch_size, debug):
    """Score what is already in a PACS: query it by date and modality, retrieve what was not scored before, score
    it as cxr-batch listen does and send the results; exit when done."""

    def build(stop):
        from .integration.pull import PullConfig, PullError, run_pull

        cfg = load_config(PullConfig, config_file, "pull", source=source, ae_title=ae_title, port=port, host=host,
                          since=since, days=days, modalities=modalities, retrieve=retrieve, send_to=send_to,
                          weights=weights, metadata=metadata, device=device, precision=precision, workers=workers,
                          urgent=urgent, pdf=pdf, heatmaps=heatmaps, dicom_pdf=dicom_pdf, dicom_sr=dicom_sr,
                          title=title, institution=institution, follow_links=follow_links, batch_size=batch_size)
        try:
            return run_pull(out, cfg, stop)
        except PullError as e:
            fail(str(e), debug)

    run_daemon(build, out, debug)


@main.group()
def outbound():
    """The queue of results to send (C-STORE --send-to, HL7 --hl7-to, STOW-RS --stow-to): show, re-send, drop."""


RESULTS_OPTION = click.option("--out", "-o", required=True, type=click.Path(exists=True, file_okay=False, path_type=Path),
                              help="The results folder (of listen, watch, pull or scan).")
CHANNEL_OPTION = click.option("--channel", type=click.Choice(["dicom", "hl7", "stow"]),
                              help="Only this channel's objects (default: every channel).")


def open_outbound(out: Path):
    """The queue of the results folder ``out``: its daemon's ledger (the daemon may be running:
    SQLite lets both in), or a scan's queue."""
    from .integration.outbox import open_queue, queue_paths
    from .ledger import LedgerError
    from .results import read_run_info
    from .watch import STATE_DIR

    paths = queue_paths(out)
    config = (read_run_info(out) or {}).get("config")
    if not paths and isinstance(config, dict) and (config.get("hl7_to") or config.get("stow_to")):
        # a scan stopped (killed) between writing its results and queueing them
        fail(f"{out} holds a scan made to send its results (--hl7-to/--stow-to) whose results were never queued: it "
             f"was stopped before sending them. Run the same scan command with --resume: it keeps every row and "
             f"queues and sends the results", False)
    if not paths:
        fail(f"{out} has no ledger ({out / STATE_DIR / 'ledger.sqlite'}) nor queue: not a results folder of cxr-batch "
             f"listen, watch, pull or of a scan with --hl7-to/--stow-to", False)
    try:
        return open_queue(paths[0])
    except LedgerError as e:
        fail(str(e), False)


@outbound.command("list")
@RESULTS_OPTION
@click.option("--all", "everything", is_flag=True, help="Delivered and dropped objects too.")
@CHANNEL_OPTION
def outbound_list(out, everything, channel):
    """The objects waiting to be sent (channel, state, tries, next try, why they wait)."""
    import time

    from .integration.outbound import queue_lines

    ledger = open_outbound(out)
    rows = ledger.outbound_rows(everything, channel)
    for line in queue_lines(rows, time.time()):
        say(line)
    stats = ledger.outbound_stats(time.time(), channel)
    say(f"{stats['queued']} waiting ({stats['refused']} refused by the peer), {stats['delivered']} delivered, "
               f"{stats['dropped']} dropped", err=True)


@outbound.command("retry")
@RESULTS_OPTION
@CHANNEL_OPTION
@click.argument("uids", nargs=-1)
def outbound_retry(out, channel, uids):
    """Send now: every waiting object, or the UIDS named (dropped or delivered ones are queued again)."""
    ledger = open_outbound(out)
    n = ledger.outbound_send_now(list(uids) or None, channel)
    say(f"{plural(n, 'object')} due now; a running daemon sends them within seconds (else: cxr-batch outbound send)",
               err=True)
    if uids and n < len(set(uids)):
        fail(f"{len(set(uids)) - n} of the UIDs named are not in the queue: "
             + _uids_not_found(ledger.outbound_rows(True, channel), uids, waiting=False), False)


@outbound.command("drop")
@RESULTS_OPTION
@CHANNEL_OPTION
@click.argument("uids", nargs=-1, required=True)
def outbound_drop(out, channel, uids):
    """Stop sending the waiting objects UIDS (they stay listed with --all; retry queues them again)."""
    ledger = open_outbound(out)
    rows = ledger.outbound_rows(True, channel)  # before the drop: what each UID was
    n = ledger.outbound_drop(list(uids), channel)
    say(f"{plural(n, 'object')} dropped", err=True)
    if n < len(set(uids)):
        fail(f"{len(set(uids)) - n} of the UIDs named are not waiting in the queue: "
             + _uids_not_found(rows, uids, waiting=True), False)


def _uids_not_found(rows: list[dict], uids, waiting: bool) -> str:
    """Which of ``uids`` the queue's ``rows`` (Ledger.outbound_rows, everything) lack, each with
    the queued one it is closest to (a UID or control id is 20-64 characters typed or pasted by
    hand), or, ``waiting``, that it was delivered or dropped already. Printed through :func:`fail`,
    which shows control characters as text."""
    import difflib

    known = {r["uid"]: r for r in rows}
    said = []
    for uid in dict.fromkeys(uids):
        row = known.get(uid)
        if row is None:
            close = difflib.get_close_matches(uid, list(known), n=1, cutoff=0.8)
            said.append(f"{uid!r} is not in the queue" + (f" (did you mean {close[0]!r}?)" if close else ""))
        elif waiting and (row["delivered_at"] is not None or row["dropped_at"] is not None):
            said.append(f"{uid!r} is not waiting: "
                        + ("delivered" if row["delivered_at"] is not None else "dropped") + " already")
    return "; ".join(said) + " ('cxr-batch outbound list --all' lists every one)"


@outbound.command("send")
@RESULTS_OPTION
@click.option("--send-to", metavar="AE@HOST:PORT", help="C-STORE here (default: where the objects were queued for).")
@click.option("--hl7-to", metavar="HOST:PORT", help="Send HL7 messages here (default: where they were queued for).")
@click.option("--stow-to", metavar="URL", help="STOW-RS here (default: where the objects were queued for).")
@click.option("--ae-title", default="CXRBATCH", show_default=True, help="Our AE title for C-STORE.")
@click.option("--config", "config_file", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="TOML file whose [dicomweb] table has the STOW-RS credentials.")
@click.option("--wait", type=click.FloatRange(0), default=60.0, show_default=True, callback=finite,
              help="Seconds to go on trying (with back-off) before giving the rest back to the queue.")
@DEBUG_OPTION
def outbound_send(out, send_to, hl7_to, stow_to, ae_title, config_file, wait, debug):
    """Send the waiting objects of a results folder no daemon runs on (after a scan or a pull), now."""
    import time

    from .config import ConfigError
    from .integration.outbox import recorded_destinations, send_channels, send_queue

    setup_logging(False, debug)
    open_outbound(out).close()  # a folder with a queue, else a clear error
    wanted = {**recorded_destinations(out), **{k: v for k, v in (("dicom", send_to), ("hl7", hl7_to),
                                                                  ("stow", stow_to)) if v}}
    try:
        channels = send_channels(wanted, ae_title, config_file)
    except ConfigError as e:
        fail(str(e), debug, EXIT_USAGE)
    lines = run_fatal_errors(debug, lambda: send_queue(out, channels, time.time() + wait))
    for line in lines:
        say(f"cxr-batch: {line}", err=True)
    if lines:
        sys.exit(exit_codes.SOME_FAILED)
    say("cxr-batch: every queued result was delivered", err=True)


def parse_rule(_ctx, _param, value):
    from .thresholds import parse_rule as parse

    try:
        parse(value)
    except ValueError as e:
        raise click.BadParameter(visible(e)) from None
    return value


# What evaluate and calibrate both take: labelled studies and how to score them.
LABELLED_OPTIONS = (
    click.argument("studies", type=studies_folder()),
    click.option("--labels", required=True, type=PathOrHint(lambda p: f"{p} is a folder; --labels takes the table "
                                                                      f"itself, a CSV file with the NIH Data_Entry columns",
                                                            exists=True, dir_okay=False, path_type=Path),
                 help="Reference labels, NIH Data_Entry format: Image Index, Finding Labels ('|'-separated or "
                      "'No Finding'); its Patient ID/Age/Gender/View Position columns also serve as patient data."),
    click.option("--weights", type=bundle_folder(),
                 help="Weights bundle folder (default: the bundled weights)."),
    click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N."),
    click.option("--batch-size", type=click.IntRange(1, 4096), default=16, show_default=True),
    click.option("--workers", type=click.IntRange(0, 64), help="Decoding worker processes (default: chosen for this machine)."),
    click.option("--follow-links", is_flag=True,
                 help="Follow symbolic links that lead outside the folder (default: such links get a row "
                      "and are not followed)."),
    click.option("--quiet", "-q", is_flag=True, help="No progress bar, warnings only."),
    DEBUG_OPTION,
    misplaced_option(
        "--metadata", "{command} reads patient data from --labels (its Patient ID, Patient Age, Patient Gender and View "
                      "Position columns): put them in that table"),
)
labelled_options = options(LABELLED_OPTIONS)


def _number(value, digits: int) -> str:
    """A measured figure for the terminal; 'n/a' where there was nothing to measure it on."""
    return "n/a" if value is None else f"{value:.{digits}f}"


@main.command()
@labelled_options
@click.option("--out", "-o", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Folder for results.csv, evaluation.json and evaluation.pdf.")
@click.option("--precision", type=click.Choice(["auto", "fp32", "bf16", "fp16"]), default="auto", show_default=True)
@click.option("--bootstrap", type=click.IntRange(0, 100_000), default=1000, show_default=True,
              callback=bootstrap_resamples, help="Bootstrap resamples (by patient) for the intervals: 0 (none) or "
                                                 f"at least {MIN_RESAMPLES}.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the bootstrap.")
def evaluate(studies, labels, weights, device, batch_size, workers, follow_links, quiet, debug, out, precision,
             bootstrap, seed):
    """Scan STUDIES and measure the model against LABELS: OUT/evaluation.json and OUT/evaluation.pdf."""
    from .evaluate import run_evaluate
    from .labels import mismatch_lines, read_labels
    from .scan import ScanConfig

    setup_logging(quiet, debug)
    cfg = ScanConfig(weights=weights, device=device, precision=precision, batch_size=batch_size, workers=workers,
                     follow_links=follow_links, progress=not quiet)
    result, summary = run_fatal_errors(debug, lambda: run_evaluate(studies, read_labels(labels), out, cfg,
                                                                   bootstrap, seed), out)
    say(summary.line(), err=True)
    for line in mismatch_lines(result["matching"], str(out / "evaluation.json")):
        say(f"cxr-batch: {line}", err=True)
    ci, auroc = result["mean_auroc_ci95"], result["mean_auroc"]
    say(f"{plural(result['n_studies'], 'study')} of {plural(result['n_patients'], 'patient')}: mean AUROC "
               + (_number(auroc, 3) if auroc is not None else "n/a (no finding has both positive and negative studies)")
               + (f" (95% CI {ci[0]:.3f}-{ci[1]:.3f})" if ci else " (no CI)" if auroc is not None else "")
               + f", ECE {_number(result['ece'], 3)}, Brier {_number(result['brier'], 4)}"
               # the Brier score of the prevalence, not the prevalence ("prevalence 0.0000" when every study had it)
               f" ({_number(result['brier_prevalence'], 4)} predicting the prevalence)"
               f" -> {out / 'evaluation.json'}, {out / 'evaluation.pdf'}", err=True)
    sys.exit(summary.exit_code)


@main.command()
@labelled_options
@click.option("--out", "-o", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="New bundle folder to write (must not exist, or be empty).")
@click.option("--method", type=click.Choice(["prevalence", "offset", "platt", "temperature"]), default="prevalence",
              show_default=True,
              help="prevalence: a logit shift per finding with enough positives (how common it is here); offset: one "
                   "shift for every finding (the site's overall rate of findings; lowest variance); platt: slope and "
                   "intercept per finding; temperature: one scale per finding.")
@click.option("--thresholds", "threshold_rule", default="keep", show_default=True, callback=parse_rule,
              help="keep (the bundle's operating points, moved with the calibration: the same studies flagged), "
                   "specificity:S, sensitivity:S (checked out of fold), precision_f1[:P] or youden.")
@click.option("--min-positives", type=click.IntRange(2), default=10, show_default=True,
              help="Positive (and negative) studies a finding needs before its calibration and threshold move.")
@click.option("--version", "version", help="Version of the new bundle (default: <base>+site.<date>.<hash of the new manifest>).")
def calibrate(studies, labels, weights, device, batch_size, workers, follow_links, quiet, debug, out, method,
              threshold_rule, min_positives, version):
    """Fit per-finding calibration and thresholds on labelled STUDIES; write a new bundle to OUT."""
    from .calibrate import CALIBRATE_NAMES, CalibrateOptions, run_calibrate
    from .labels import read_labels

    setup_logging(quiet, debug)
    opts = CalibrateOptions(weights=weights, method=method, thresholds=threshold_rule, min_positives=min_positives,
                            version=version, device=device, batch_size=batch_size, workers=workers,
                            follow_links=follow_links, progress=not quiet)
    result = run_fatal_errors(debug, lambda: run_calibrate(studies, read_labels(labels), out, opts), out)
    for line in result.matching.problems(CALIBRATE_NAMES):
        say(f"cxr-batch: {line}", err=True)
    for line in result.lines:
        say(line, err=True)
    say(f"ECE on the {plural(len(result.matching.pairs), 'fitting study')} {result.ece_before:.4f} -> "
               f"{result.ece_after:.4f} (in-sample: check with 'cxr-batch evaluate' on other studies)", err=True)
    say(f"new bundle {result.version} -> {result.bundle}", err=True)


def parse_window(_ctx, _param, value):
    from .monitor import WindowSpec

    try:
        return WindowSpec.parse(value)
    except ValueError as e:
        raise click.BadParameter(visible(e)) from None


ALARM_LINES = 20  # monitor: alarms printed on the terminal at most


def _alarm_age(window: dict) -> tuple:
    """Sorts an alarm's window newest first: by its last study's time, else its last row of
    results.csv. Not by its number: each model's windows are numbered from 0, so after a bundle
    change the old model's window 99 outranked the current model's window 0."""
    import datetime as dt

    try:
        last = dt.datetime.fromisoformat(window["last"]).timestamp() if window.get("last") else None
    except (TypeError, ValueError):
        last = None
    rows = window.get("rows") or [0, 0]
    return (last is None, -(last or 0.0), -rows[-1], -window.get("index", 0))


@main.command()
@click.argument("results", type=PathOrHint(lambda p: f"{p} is a file; RESULTS is a results folder: give "
                                                     f"the folder that holds it: {p.parent}",
                                           exists=True, file_okay=False, path_type=Path))
@click.option("--out", "-o", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Folder for monitor.json and monitor.pdf.")
@click.option("--reference", type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="A weights bundle (its manifest's reference) or a results folder (a site baseline). Default: the "
                   "reference of the bundle that scored RESULTS, else their first window.")
@click.option("--window", default="500", show_default=True, callback=parse_window,
              help="Studies per window (500) or a period (14d, 12h).")
@click.option("--alpha", type=click.FloatRange(0, 1, min_open=True, max_open=True), default=0.001, show_default=True,
              callback=finite, help="Family-wise false-alarm rate per window (Holm over every quantity).")
@click.option("--min-studies", type=click.IntRange(1), default=20, show_default=True,
              help="Scored studies a window needs before it can raise an alarm.")
@DEBUG_OPTION
def monitor(results, out, reference, window, alpha, min_studies, debug):
    """Compare the studies of RESULTS (a results folder) with a reference: have the inputs drifted?

    Exit codes: 0 no alarm; 5 at least one alarm; 1 nothing could be compared; 2 usage error.
    """
    from .drift import DriftError
    from .monitor import MonitorError, MonitorOptions, alarm_line, run_monitor

    setup_logging(False, debug)
    private_files()
    opts = MonitorOptions(window=window, alpha=alpha, min_studies=min_studies)

    def action():
        try:
            return run_monitor(results, out, reference, opts)
        except (MonitorError, DriftError) as e:
            fail(str(e), debug)

    report = run_fatal_errors(debug, action, out)  # bad bundles, unreadable files: exit 1, said plainly
    for note in report["notes"] + [n for m in report["models"] for n in m["notes"]]:  # rows left out, what was not compared
        say(f"cxr-batch: note: {note}", err=True)
    # a drift lasting months alarms in nearly every window: the newest are printed, the summary
    # line stays in sight, and monitor.json / monitor.pdf hold every one
    alarms = report["alarms"]
    shown = sorted(sorted(range(len(alarms)), key=lambda i: _alarm_age(alarms[i]["window"]))[:ALARM_LINES])
    if len(alarms) > len(shown):
        say(f"cxr-batch: {plural(len(alarms) - len(shown), 'earlier alarm')} not printed: monitor.json lists "
                   f"every one, "
                   f"monitor.pdf draws them; the newest {len(shown)}:", err=True)
    for i in shown:
        say(f"cxr-batch: ALARM {alarms[i]['model']}: {alarm_line(alarms[i])}", err=True)
    if report.get("problem"):
        say(f"cxr-batch: error: {report['problem']}", err=True)
    windows = [w for m in report["models"] for w in m["windows"]]
    small = sum(w["too_small"] for w in windows)
    too_small = f", {small} too small (under --min-studies {min_studies})" if small else ""
    say(f"{plural(report['studies']['scored'], 'scored study')}, "
               f"{plural(len(windows) - small, 'window')} tested{too_small}: {plural(len(report['alarms']), 'alarm')} "
               f"-> {out / 'monitor.json'}, {out / 'monitor.pdf'}", err=True)
    sys.exit(report["exit_code"])


@main.command()
@click.option("--images", required=True, type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="Folder of NIH ChestX-ray14 PNGs.")
@click.option("--metadata", required=True, type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Data_Entry_2017.csv (or .csv.gz).")
@click.option("--out", "-o", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Run folder (checkpoints, metrics, figures; the weights bundle in OUT/bundle).")
@click.option("--split-lists", nargs=2, type=click.Path(exists=True, dir_okay=False),
              help="Official train_val_list.txt and test_list.txt.")
@click.option("--config", "config_file", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="TOML file of training options (see training/config.py).")
@click.option("--epochs", type=click.IntRange(0),
              help="Training epochs; 0 evaluates and exports --init-weights.  [default: 15]")
@click.option("--image-size", type=click.IntRange(32), help="Model input size in pixels.  [default: 224]")
@click.option("--batch-size", type=click.IntRange(1), help="Images per training step.  [default: 160]")
@click.option("--limit", type=click.IntRange(1), help="Use only the first N images of the metadata.")
@click.option("--device", default=None, help="auto, cpu, cuda or cuda:N.  [default: auto]")
@click.option("--resume", is_flag=True, help="Continue an interrupted run in --out.")
@click.option("--imagenet", default=None, help="Initialise the backbone from ImageNet: 'torchvision' or a file.")
@click.option("--init-backbone", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Initialise the DenseNet-121 from a pretrained file: a TorchXRayVision DenseNet-121 state dict, "
                   "a CheXNet checkpoint or a torchvision densenet121 state dict; its input normalisation goes into "
                   "the bundle.")
@click.option("--init-format", type=click.Choice(["auto", "torchvision", "xrv", "chexnet"]), default="auto",
              show_default=True, help="The format of --init-backbone (auto: from its keys and first convolution).")
@click.option("--init-weights", type=click.Path(exists=True, path_type=Path),
              help="Start from these weights (bundle folder or state dict); with --epochs 0, evaluate and export only.")
@DEBUG_OPTION
def train(images, metadata, out, split_lists, config_file, epochs, image_size, batch_size, limit, device, resume,
          imagenet, init_backbone, init_format, init_weights, debug):
    """Train a model from NIH ChestX-ray14 and export a weights bundle to OUT/bundle."""
    from training.config import TrainConfig
    from training.train import main as train_main

    from .config import ConfigError

    setup_logging(False, debug)
    logging.getLogger("cxr_batch.train").setLevel(logging.INFO)
    overrides = dict(images=str(images), metadata=str(metadata), out=str(out),
                     init_weights=str(init_weights) if init_weights else None,
                     split_lists=tuple(split_lists) if split_lists else None, epochs=epochs, image_size=image_size,
                     batch_size=batch_size, limit=limit, device=device, imagenet=imagenet,
                     init_backbone=str(init_backbone) if init_backbone else None,
                     init_format=init_format if init_backbone else None)
    try:
        cfg = TrainConfig.load(config_file, **overrides)
    except ConfigError as e:
        fail(str(e), debug, EXIT_USAGE)
    try:
        run = train_main(cfg, resume=resume)
    except (ValueError, OSError) as e:
        fail(str(e), debug)
    except KeyboardInterrupt:  # checkpoint.pt holds the last finished epoch; a bundle is written only at the end
        fail(f"interrupted (Ctrl-C): no bundle was written; the same command with --resume continues {out} "
             "from its last finished epoch", debug, exit_codes.INTERRUPTED)
    say(f"run written to {run}; bundle: {run / 'bundle'}", err=True)


if __name__ == "__main__":
    main()

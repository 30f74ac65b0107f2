"""The ``cxr-batch`` command line: a thin layer over scan, merge, watch and train.

Exit codes: 0 every file scored or deliberately skipped; 3 some files failed but the rest
were written; 2 usage error; 1 nothing could be done (bad weights, metadata or device).
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import click

from .findings import DEFAULT_URGENT, check_findings
from .scan import EXIT_FATAL, EXIT_USAGE

log = logging.getLogger("cxr_batch")


def setup_logging(quiet: bool, debug: bool) -> None:
    level = logging.DEBUG if debug else (logging.WARNING if quiet else logging.INFO)
    logging.basicConfig(level=level, format="cxr-batch: %(message)s", stream=sys.stderr, force=True)


def fail(message: str, debug: bool, code: int = EXIT_FATAL):
    if debug:
        raise
    click.echo(f"cxr-batch: error: {message}", err=True)
    sys.exit(code)


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
    names = [v.strip() for v in value.split(",") if v.strip()]
    try:
        return tuple(check_findings(names))
    except ValueError as e:
        raise click.BadParameter(str(e)) from None


def load_rules(config_file: Path | None):
    """ScoringRules from the [scoring] table of a TOML file (defaults without one)."""
    import tomllib
    from dataclasses import fields

    from .readers import ScoringRules

    if config_file is None:
        return ScoringRules()
    with open(config_file, "rb") as f:
        table = tomllib.load(f).get("scoring", {})
    known = {f.name for f in fields(ScoringRules)}
    unknown = set(table) - known
    if unknown:
        raise ValueError(f"unknown [scoring] option(s) {sorted(unknown)}; known: {sorted(known)}")
    return ScoringRules(**{k: tuple(v) if isinstance(v, list) else v for k, v in table.items()})


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="cxr-batch")
def main():
    """Chest X-ray triage: score frontal radiographs for the 14 NIH ChestX-ray14 findings."""


@main.command()
@click.argument("studies", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--out", "-o", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Results folder (results.csv, run.json, reports/).")
@click.option("--weights", type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="Weights bundle folder (default: the bundled weights).")
@click.option("--metadata", "metadata_csv", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="NIH Data_Entry-style CSV with patient data for PNG/JPEG files.")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
@click.option("--precision", default="auto", show_default=True,
              type=click.Choice(["auto", "fp32", "bf16", "fp16"]), help="Inference precision.")
@click.option("--batch-size", default=16, show_default=True, type=click.IntRange(1, 4096))
@click.option("--workers", default=None, type=click.IntRange(0, 64),
              help="DataLoader worker processes (default: chosen for this machine).")
@click.option("--urgent", default=",".join(DEFAULT_URGENT), show_default=True, callback=parse_urgent,
              help="Comma-separated findings that make a study urgent.")
@click.option("--config", "config_file", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="TOML file; its [scoring] table sets what is scored (modalities, body_parts, views, "
                   "allow_unknown_view, allow_missing_body_part, max_pixels, max_file_bytes).")
@click.option("--shard", default=None, callback=parse_shard,
              help="Process only shard i of N (i/N): a deterministic 1/N of the files.")
@click.option("--pdf/--no-pdf", default=True, show_default=True, help="PDF reports and worklist in OUT/reports.")
@click.option("--heatmaps/--no-heatmaps", default=True, show_default=True, help="Grad-CAM for flagged findings.")
@click.option("--dicom-pdf", is_flag=True, help="Also write each report as a DICOM Encapsulated PDF.")
@click.option("--title", default="Chest X-ray triage report", show_default=True, help="Report title.")
@click.option("--institution", default="", help="Institution name printed on reports.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar, warnings only.")
@click.option("--debug", is_flag=True, help="Show tracebacks.")
def scan(studies, out, weights, metadata_csv, device, precision, batch_size, workers, urgent, config_file, shard,
         pdf, heatmaps, dicom_pdf, title, institution, quiet, debug):
    """Score every frontal chest radiograph under STUDIES into OUT/results.csv."""
    from .bundle import BundleError
    from .inference import ScanOptions
    from .metadata import MetadataError
    from .runtime import DeviceError
    from .scan import run_scan

    setup_logging(quiet, debug)
    try:
        rules = load_rules(config_file)
    except (ValueError, TypeError) as e:
        fail(f"{config_file}: {e}", debug, EXIT_USAGE)
    options = ScanOptions(batch_size=batch_size, workers=workers, urgent=urgent, rules=rules, progress=not quiet)
    reports = None
    if pdf:
        from .reports import ReportOptions

        reports = ReportOptions(title=title, institution=institution, heatmaps=heatmaps, dicom_pdf=dicom_pdf)
    try:
        summary = run_scan(studies, out, weights=weights, metadata_csv=metadata_csv, device=device,
                           precision=precision, options=options, shard=shard, reports=reports)
    except DeviceError as e:
        fail(str(e), debug, EXIT_USAGE)
    except (BundleError, MetadataError) as e:
        fail(str(e), debug)
    except OSError as e:
        fail(f"{e.filename or ''}: {e.strerror or e}", debug)
    except Exception as e:  # a bug: say so plainly; --debug shows the traceback
        fail(f"unexpected {type(e).__name__}: {e} (run with --debug for details)", debug)
    click.echo(summary.line(), err=True)
    sys.exit(summary.exit_code)


@main.command()
@click.argument("inputs", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--out", "-o", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="Merged results.csv to write.")
def merge(inputs, out):
    """Merge the results.csv files of a sharded scan (scan --shard i/N) into one."""
    from .results import MergeError, merge_results

    try:
        n = merge_results(list(inputs), out)
    except MergeError as e:
        fail(str(e), False)
    click.echo(f"{n} rows from {len(inputs)} files -> {out}", err=True)


@main.command()
@click.argument("watch_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--out", "-o", required=True, type=click.Path(file_okay=False, path_type=Path), help="Results folder.")
@click.option("--config", "config_file", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="TOML file: a [watch] table (every option, see cxr_batch/watch.py) and [scoring].")
@click.option("--weights", default=None, help="Weights bundle folder.")
@click.option("--metadata", default=None, help="NIH-style CSV with patient data for PNG/JPEG files.")
@click.option("--device", default=None, help="auto, cpu, cuda or cuda:N.")
@click.option("--batch-size", type=click.IntRange(1, 4096), default=None)
@click.option("--max-wait", type=float, default=None, help="Seconds a ready study waits for its batch to fill.")
@click.option("--settle", type=float, default=None, help="Seconds a file must stay unchanged to count as complete.")
@click.option("--polling", is_flag=True, default=None, help="Poll the folder (network shares without inotify).")
@click.option("--archive-dir", default=None, help="Move processed files here (default: leave them in place).")
@click.option("--quarantine-dir", default=None, help="Move files that failed here.")
@click.option("--no-heatmaps", "heatmaps", flag_value=False, default=None, help="Skip Grad-CAM in reports.")
@click.option("--no-pdf", "pdf", flag_value=False, default=None, help="No PDF reports.")
@click.option("--debug", is_flag=True)
def watch(watch_dir, out, config_file, weights, metadata, device, batch_size, max_wait, settle, polling, archive_dir,
          quarantine_dir, heatmaps, pdf, debug):
    """Watch WATCH_DIR (a PACS export folder) and report every new study once, until SIGTERM."""
    from .bundle import BundleError
    from .runtime import DeviceError
    from .watch import WatchConfig, Watcher

    setup_logging(False, debug)
    try:
        cfg = WatchConfig.from_toml(config_file, weights=weights, metadata=metadata, device=device,
                                    batch_size=batch_size, max_wait=max_wait, settle=settle, polling=polling,
                                    archive_dir=archive_dir, quarantine_dir=quarantine_dir, heatmaps=heatmaps, pdf=pdf)
    except (ValueError, TypeError) as e:
        fail(str(e), debug, EXIT_USAGE)
    try:
        code = Watcher(watch_dir, out, cfg).run()
    except DeviceError as e:
        fail(str(e), debug, EXIT_USAGE)
    except BundleError as e:
        fail(str(e), debug)
    sys.exit(code)


@main.command()
@click.option("--images", required=True, type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="Folder of NIH ChestX-ray14 PNGs.")
@click.option("--metadata", required=True, type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Data_Entry_2017.csv (or .csv.gz).")
@click.option("--out", required=True, type=click.Path(file_okay=False, path_type=Path), help="Run folder.")
@click.option("--split-lists", nargs=2, type=click.Path(exists=True, dir_okay=False),
              help="Official train_val_list.txt and test_list.txt.")
@click.option("--config", "config_file", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="TOML file of training options (see training/config.py).")
@click.option("--epochs", type=click.IntRange(0))
@click.option("--image-size", type=click.IntRange(32))
@click.option("--batch-size", type=click.IntRange(1))
@click.option("--limit", type=click.IntRange(1), help="Use only the first N images of the metadata.")
@click.option("--device", default=None, help="auto, cpu, cuda or cuda:N.")
@click.option("--resume", is_flag=True, help="Continue an interrupted run in --out.")
@click.option("--imagenet", default=None, help="Initialise the backbone from ImageNet: 'torchvision' or a file.")
@click.option("--init-weights", type=click.Path(exists=True, path_type=Path),
              help="Start from these weights (bundle folder or state dict); with --epochs 0, evaluate and export only.")
@click.option("--debug", is_flag=True)
def train(images, metadata, out, split_lists, config_file, epochs, image_size, batch_size, limit, device, resume,
          imagenet, init_weights, debug):
    """Train a model from NIH ChestX-ray14 and export a weights bundle to OUT/bundle."""
    from training.config import TrainConfig
    from training.train import main as train_main

    setup_logging(False, debug)
    logging.getLogger("cxr_batch.train").setLevel(logging.INFO)
    overrides = dict(images=str(images), metadata=str(metadata), out=str(out),
                     init_weights=str(init_weights) if init_weights else None,
                     split_lists=tuple(split_lists) if split_lists else None, epochs=epochs, image_size=image_size,
                     batch_size=batch_size, limit=limit, device=device, imagenet=imagenet)
    try:
        cfg = (TrainConfig.from_toml(config_file, **overrides) if config_file
               else TrainConfig.from_dict({k: v for k, v in overrides.items() if v is not None}))
        run = train_main(cfg, resume=resume)
    except (ValueError, OSError) as e:
        fail(str(e), debug)
    click.echo(f"run written to {run}; bundle: {run / 'bundle'}", err=True)


if __name__ == "__main__":
    main()

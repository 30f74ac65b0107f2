"""What ``cxr-batch monitor`` tells a hospital's quality manager, week by week, on real NIH
radiographs: when a real shift is alarmed (how many days and studies after it began), what the
alarm says, and how many alarms weeks without any change raise.

    python benchmarks/drift_scenarios.py [--pools DIR] [--out DIR] [--per-day 30] [--only NAME,...]

1. Pools: NIH images scored once by the default bundle (fp32, CPU), as a hospital's archive would
   send them (DICOM, MONOCHROME2, 8 bits, one vendor, the NIH table's age, sex and view in the
   header) and as changed sources would: another detector (MONOCHROME1, 16 bits, another vendor:
   shown right, only the header changes), a detector with other processing (less contrast,
   brighter), an export that inverts the grey levels, a paediatric mix (ages 1-17), and the
   images of ``../shared/data/nih_extra`` (AP films, many pneumonias). Kept in ``--pools``
   (reused when there).
2. Scenarios: a results.csv as a daemon writes it, ``--per-day`` studies a day, each study's
   ``scored_at`` its day and hour. The site baseline (``--reference RESULTS_DIR``) is a random
   half of the NIH images; the weeks without change draw from the other half. Then
   ``cxr-batch monitor --window 7d`` (and ``--window 500``; and ``--window 7d`` against the
   bundle's own reference) on each, in this process; and operator faults (a results.csv
   appended to itself, a week missing, two bundles' exports merged).
3. Printed: per scenario, the first alarmed window, how many days and shifted studies after the
   change its last study came, and the alarm lines; for the quiet scenarios, how many windows
   of how many alarmed.
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import io
import shutil
import sys
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.common import NIH  # noqa: E402
from cxr_batch.dicom_build import radiograph, save  # noqa: E402
from cxr_batch.record import COLUMNS  # noqa: E402

EXTRA = NIH.parent / "nih_extra"
START = dt.datetime(2026, 1, 5, 7, 0, tzinfo=dt.timezone.utc)  # a Monday


def labels_of(path: Path) -> dict[str, dict]:
    with open(path, newline="") as f:
        return {r["Image Index"]: r for r in csv.DictReader(f)}


def as_dicom(png: Path, dest: Path, label: dict, *, change=None, photometric="MONOCHROME2", bits=8,
             vendor="Vendor A", model="DR-1", age=None) -> None:
    """One NIH image as a hospital's DX DICOM file, its patient data in the header."""
    pixels = np.asarray(Image.open(png).convert("L"))
    if change is not None:
        pixels = change(pixels)
    if bits == 16:
        pixels = pixels.astype(np.uint16) * 257
    if photometric == "MONOCHROME1":  # stored inverted; a viewer (and cxr-batch) shows it right
        pixels = (65535 if bits == 16 else 255) - pixels
    years = age if age is not None else int(label["Patient Age"])
    ds = radiograph(pixels, photometric=photometric, PatientID=f"P{label['Patient ID']}",
                    PatientAge=f"{years:03d}Y", PatientSex=label["Patient Gender"], ViewPosition=label["View Position"],
                    Manufacturer=vendor, ManufacturerModelName=model, PixelSpacing=[0.286, 0.286])
    save(ds, dest)


POOLS = {
    # name: (images, labels, how each becomes a file)
    "site": ("nih", {}),  # the hospital's usual studies
    "new_detector": ("nih", dict(photometric="MONOCHROME1", bits=16, vendor="Vendor B", model="FDX-9")),
    "low_contrast": ("nih", dict(change=lambda g: (g * 0.55 + 100).astype(np.uint8), vendor="Vendor B",
                                 model="FDX-9")),
    "inverted_export": ("nih", dict(change=lambda g: 255 - g)),
    "paediatric": ("nih", dict(age="young")),
    "extra": ("extra", {}),  # AP-heavy, pneumonia-heavy
    "site_v2": ("nih", {}),  # the hospital's usual studies scored by the v2.1 weights (a second workstation)
}
WEIGHTS = {"site_v2": str(Path(__file__).resolve().parent.parent / "weights" / "cxr-fpn-v2")}


def build_pools(pools: Path, names: list[str]) -> dict[str, Path]:
    """Each pool scored once: {name: results folder}."""
    from cxr_batch.scan import ScanConfig, run_scan

    out = {}
    sources = {"nih": (NIH / "images", NIH / "labels.csv"), "extra": (EXTRA / "images", EXTRA / "labels.csv")}
    for name in names:
        results = pools / name
        out[name] = results
        if (results / "results.csv").is_file():
            continue
        folder, labels_csv = sources[POOLS[name][0]]
        labels = labels_of(labels_csv)
        files = pools / f"{name}_files"
        shutil.rmtree(files, ignore_errors=True)
        files.mkdir(parents=True)
        rng = np.random.default_rng(7)
        opts = dict(POOLS[name][1])
        for png in sorted(folder.glob("*.png")):
            if opts.get("age") == "young":
                as_dicom(png, files / f"{png.stem}.dcm", labels[png.name], age=int(rng.integers(1, 18)))
            else:
                as_dicom(png, files / f"{png.stem}.dcm", labels[png.name], **opts)
        print(f"scoring pool {name}: {sum(1 for _ in files.iterdir())} files", flush=True)
        run_scan(files, results, ScanConfig(weights=WEIGHTS.get(name), precision="fp32", device="cpu", pdf=False, heatmaps=False,
                                            progress=False, workers=1))
        shutil.rmtree(files)
    return out


# ---------------------------------------------------------------------------- scenarios
def pool_rows(results: Path) -> list[dict]:
    with open(results / "results.csv", newline="", encoding="utf-8-sig") as f:
        return [r for r in csv.DictReader(f) if r["status"] == "ok"]


def write_results(folder: Path, rows: list[dict], run_json: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copy(run_json, folder / "run.json")  # names the bundle that scored them
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=list(COLUMNS), lineterminator="\r\n")
    writer.writeheader()
    writer.writerows(rows)
    (folder / "results.csv").write_text(out.getvalue())
    return folder


def timed(rows: list[dict], day: int, per_day: int) -> list[dict]:
    """``rows`` as the studies of day ``day``, spread over its working hours."""
    out = []
    for k, r in enumerate(rows):
        when = START + dt.timedelta(days=day, minutes=int(k * 600 / max(per_day, 1)))
        out.append({**r, "scored_at": when.isoformat(timespec="seconds")})
    return out


def stream(days: int, per_day, draw) -> list[dict]:
    """``days`` days of studies: ``per_day(day)`` a day, each drawn by ``draw(day)``."""
    rows = []
    for day in range(days):
        n = per_day(day)
        rows += timed([draw(day) for _ in range(n)], day, n)
    return rows


def first_alarm(report: dict, change_day: int) -> dict | None:
    """The first alarmed window that ends after the change (an alarm before it is a false one)."""
    change = START + dt.timedelta(days=change_day)
    for model in report["models"]:
        for w in model["windows"]:
            if w["alarms"] and dt.datetime.fromisoformat(w["window"]["last"]) >= change:
                return w
    return None


def false_alarms(report: dict, change_day: int | None) -> tuple[int, int]:
    """(windows with an alarm, windows tested) wholly before the change."""
    change = START + dt.timedelta(days=change_day) if change_day is not None else None
    alarmed = tested = 0
    for model in report["models"]:
        for w in model["windows"]:
            if w["too_small"]:
                continue
            if change is not None and dt.datetime.fromisoformat(w["window"]["last"]) >= change:
                continue
            tested += 1
            alarmed += bool(w["alarms"])
    return alarmed, tested


V2_COLUMNS = ("model", "weights_sha256", "findings", "priority", "triage_score", "worklist_rank")


def faults(out: Path, baseline: Path, studies: list[dict], run_json: Path, v2: list[dict]) -> None:
    """Operator faults on 12 weeks of the site's studies without any change, --window 7d."""
    from cxr_batch.monitor import MonitorOptions, WindowSpec, run_monitor

    week = WindowSpec.parse("7d")
    cases = {
        "as written, against the site baseline": (studies, baseline),
        "as written, against the bundle's own reference (made from NIH PNG files)": (studies, None),
        "appended to itself": (studies + studies, baseline),
        "every third study scored by v2.1 (two workstations' exports merged)": (
            [{**r, **{c: v for c, v in v2[k % len(v2)].items() if c.startswith(("p_", "flag_")) or c in V2_COLUMNS}}
             if k % 3 == 0 else r for k, r in enumerate(studies)], baseline),
        "week 5 missing": ([r for r in studies if not 28 <= (dt.datetime.fromisoformat(r["scored_at"]) - START).days
                            < 35], baseline),
    }
    print("\n=== operator faults: 12 weeks of the site's studies, no change, --window 7d ===")
    for k, (name, (rows, reference)) in enumerate(cases.items()):
        folder = write_results(out / f"f{k:02d}", rows, run_json)
        report = run_monitor(folder, out / f"f{k:02d}_m", reference, MonitorOptions(window=week))
        windows = [w for m in report["models"] for w in m["windows"]]
        notes = report["notes"] + [n for m in report["models"] for n in m["notes"]]
        print(f"- {name}: exit {report['exit_code']}, {sum(bool(w['alarms']) for w in windows)} of {len(windows)} "
              f"windows alarmed, {len(report['alarms'])} alarms ({', '.join(sorted({a['quantity'] for a in report['alarms']}))})")
        for n in notes:
            print(f"    note: {n[:160]}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pools", type=Path, default=Path("/tmp/cxr-drift-scenarios/pools"))
    ap.add_argument("--out", type=Path, default=Path("/tmp/cxr-drift-scenarios/runs"))
    ap.add_argument("--per-day", type=int, default=30)
    ap.add_argument("--only", default="")
    args = ap.parse_args()
    from cxr_batch.monitor import MonitorOptions, WindowSpec, alarm_line, run_monitor

    pools = build_pools(args.pools, list(POOLS))
    rows = {name: pool_rows(p) for name, p in pools.items()}
    run_json = pools["site"] / "run.json"
    rng = np.random.default_rng(0)
    site = rows["site"]
    order = rng.permutation(len(site))
    baseline_idx, usual_idx = order[:240], order[240:]
    shutil.rmtree(args.out, ignore_errors=True)
    baseline = write_results(args.out / "baseline", timed([site[i] for i in baseline_idx], -30, 240), run_json)
    usual = [site[i] for i in usual_idx]
    names = {r["file"].removesuffix(".dcm") for r in usual}  # the images of the weeks without change

    def same_images(pool):  # a changed source, on the images of the usual weeks (not the baseline's)
        return [r for r in rows[pool] if r["file"].removesuffix(".dcm") in names]

    extra = rows["extra"]
    extra_labels = labels_of(EXTRA / "labels.csv")
    ap_films = [r for r in extra if r["view"] == "AP"]
    pneumonia = [r for r in extra if "Pneumonia" in extra_labels[r["file"].replace(".dcm", ".png")]["Finding Labels"]]
    pick = lambda pool: (lambda day: pool[rng.integers(len(pool))])  # noqa: E731
    per_day = args.per_day
    change_day = 21  # three weeks as usual, then the change

    def shift(pool, share=1.0):
        def draw(day):
            moved = day >= change_day and rng.random() < share
            return pick(pool)(day) if moved else pick(usual)(day)
        return stream(42, lambda d: per_day, draw)

    scenarios = {
        "stable, 30 a day": (stream(84, lambda d: per_day, pick(usual)), None),
        "stable, 4 a day (28 a week)": (stream(364, lambda d: 4, pick(usual)), None),
        "stable, 1-3 a day": (stream(364, lambda d: int(rng.integers(1, 4)), pick(usual)), None),
        "new detector (MONOCHROME1, 16-bit, vendor B)": (shift(same_images("new_detector")), change_day),
        "new detector, half the studies": (shift(same_images("new_detector"), 0.5), change_day),
        "detector with less contrast, brighter": (shift(same_images("low_contrast")), change_day),
        "less contrast, a third of the studies": (shift(same_images("low_contrast"), 1 / 3), change_day),
        "export inverts grey levels": (shift(same_images("inverted_export")), change_day),
        "export inverts, a tenth of the studies": (shift(same_images("inverted_export"), 0.1), change_day),
        "paediatric ward (ages 1-17)": (shift(same_images("paediatric"), 0.5), change_day),
        "ICU flood: AP portable films": (shift(ap_films, 0.6), change_day),
        "many pneumonias": (shift(pneumonia, 0.5), change_day),
    }
    only = [s for s in args.only.split(",") if s]
    if not only or "faults" in only:
        faults(args.out, baseline, scenarios["stable, 30 a day"][0], run_json, rows["site_v2"])
    for window, reference in (("7d", baseline), ("500", baseline), ("7d", None)):
        print(f"\n=== --window {window}, " + ("--reference the site baseline (240 studies)" if reference else
                                              "no --reference (the bundle's own, made from its NIH PNG files)")
              + f", {per_day} studies a day unless said; change on day {change_day} ===")
        for k, (name, (studies, change)) in enumerate(scenarios.items()):
            if only and not any(o in name for o in only):
                continue
            folder = write_results(args.out / f"s{k:02d}", studies, run_json)
            report = run_monitor(folder, args.out / f"m{k:02d}_{window}{'' if reference else '_bundle'}", reference,
                                 MonitorOptions(window=WindowSpec.parse(window)))
            fa, tested = false_alarms(report, change)
            line = f"- {name}: {len(studies)} studies; windows before the change with an alarm: {fa} of {tested}"
            if change is not None:
                w = first_alarm(report, change)
                if w is None:
                    line += "; the change: NO ALARM"
                else:
                    last = dt.datetime.fromisoformat(w["window"]["last"])
                    days = (last - (START + dt.timedelta(days=change))).total_seconds() / 86400
                    shifted = sum(1 for r in studies if dt.datetime.fromisoformat(r["scored_at"]) <= last
                                  and dt.datetime.fromisoformat(r["scored_at"]) >= START + dt.timedelta(days=change))
                    line += (f"; first alarm: window {w['window']['index']} ending {days:.1f} days after the change "
                             f"({shifted} studies since it)")
                    print(line)
                    for a in w["alarms"][:6]:
                        print(f"    {alarm_line({**a, 'window': w['window']})}")
                    continue
            print(line)
            for w in (w for m in report["models"] for w in m["windows"] if w["alarms"]):
                for a in w["alarms"][:3]:
                    print(f"    false? {alarm_line({**a, 'window': w['window']})}")


if __name__ == "__main__":
    main()

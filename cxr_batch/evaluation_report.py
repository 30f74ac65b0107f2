"""evaluation.pdf: the evaluation of ``cxr-batch evaluate`` drawn for a clinical lead.

Page 1: what was evaluated, the headline numbers in words, the table per finding. Page 2: ROC
curve of every finding. Page 3: the reliability diagram and the results by view, sex and age
band. Every number comes from the evaluation dict that evaluation.json holds.
"""

from __future__ import annotations

import datetime as dt
import gc
import io
import textwrap
from collections.abc import Iterable
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no screen
import numpy as np  # noqa: E402
from matplotlib.backends.backend_pdf import PdfPages  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from sklearn.metrics import roc_curve  # noqa: E402

from .display import finding_label, format_time, plural  # noqa: E402
from .files import atomic_write_bytes  # noqa: E402
from .findings import FINDINGS  # noqa: E402

A4 = (8.27, 11.69)


def _f(x, digits: int = 3) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def _auroc(x) -> str:
    """An AUROC as its interval and its ROC curve's title print it (2 decimals): a third decimal is
    noise on a site's few positives, and one AUROC must not read as two figures on the pages."""
    return _f(x, 2)


def _ci(ci) -> str:
    return "no CI" if ci is None else f"{ci[0]:.2f}-{ci[1]:.2f}"


def _text(fig: Figure, y: float, text: str, size: float = 9, weight: str = "normal", width: int | None = None) -> float:
    """Write wrapped text at height y (figure fraction) and return the height below it. The
    default width is what fits the page at ``size``: 110 characters at 9 points, fewer at 10."""
    lines = textwrap.wrap(text, width or int(110 * 9 / size)) or [""]
    fig.text(0.06, y, "\n".join(lines), fontsize=size, weight=weight, va="top", family="DejaVu Sans")
    return y - 0.0165 * len(lines) * size / 9


def _table(ax, header: list[str], rows: list[list[str]], widths: list[float], size: float = 7.5) -> None:
    ax.axis("off")
    table = ax.table(cellText=rows, colLabels=header, colWidths=widths, loc="upper center", cellLoc="center")
    table.auto_set_font_size(False)
    table.set_fontsize(size)
    table.scale(1.0, 1.25)
    for (r, _c), cell in table.get_celld().items():
        cell.set_linewidth(0.3)
        if r == 0:
            cell.set_text_props(weight="bold")
            cell.set_facecolor("#e8e8e8")


def summary_page(ev: dict, generated: dt.datetime) -> Figure:
    fig = Figure(figsize=A4)
    y = _text(fig, 0.965, "Evaluation on local labelled studies", 15, "bold")
    m = ev["matching"]
    y = _text(fig, y - 0.005, f"Model {ev['model']} (bundle sha256 {(ev.get('bundle_sha256') or ev['weights_sha256'])[:16]}...)"
              f"{', site-calibrated' if ev['calibrated'] else ''}. Labels: {Path(ev['labels']['file']).name} "
              f"(sha256 {ev['labels']['sha256'][:16]}...). Generated {format_time(generated)} by cxr-batch.")
    y = _text(fig, y, f"{plural(ev['n_studies'], 'study')} of {plural(ev['n_patients'], 'patient')} scored and "
              f"labelled. Not used: {len(m['scored_without_label'])} scored without a label, "
              f"{len(m['labelled_not_scored'])} labelled but skipped or failed, "
              f"{plural(len(m['labels_without_file']), 'label')} without a file, "
              f"{plural(len(m['ambiguous_names']), 'label')} matching several files (lists in evaluation.json).")
    # each in-sample kind in red; the figures on the studies in neither once, under the last
    said = [(ev.get("training_overlap"), "Training images"), (ev.get("calibration_overlap"), "Calibration studies")]
    last = max((k for k, (s, _) in enumerate(said) if s and s.get("checked") and s.get("message")), default=None)
    for k, (s, what) in enumerate(said):
        y = _overlap_lines(fig, y, s, what, figures_without=k == last)
    if (ev.get("calibrated_on") or {}).get("message"):
        y = _text(fig, y - 0.004, f"In-sample: {ev['calibrated_on']['message']}.", 10, "bold", width=90)
        fig.texts[-1].set_color("#b00000")
    y -= 0.008
    auc = ev["mean_auroc"]
    ci = f"95% CI {_ci(ev['mean_auroc_ci95'])}" if ev["mean_auroc_ci95"] else "no 95% CI"  # why: its note below
    y = _text(fig, y, f"Ranking: mean AUROC {_auroc(auc)} ({ci}) over "
              f"{plural(len(ev['mean_auroc_findings']), 'finding')} with positive and negative studies. 0.5 is chance.", 10)
    y = _text(fig, y, f"Probabilities: mean predicted {_f(ev['mean_probability'])} against an observed prevalence of "
              f"{_f(ev['prevalence'])}; calibration error (ECE, {ev['ece_bins']} bins, all findings pooled) "
              f"{_f(ev['ece'])}; Brier score {_f(ev['brier'], 4)} against {_f(ev['brier_prevalence'], 4)} for "
              f"always predicting this set's prevalence (skill {_f(ev['brier_skill'])}; above 0 means the "
              "probabilities carry information beyond how common each finding is).", 10)
    t = ev.get("triage") or {}
    b = t.get("buckets", {})
    # a bundle without a P(any) cutoff (v1, v2) has no low-probability bucket: its "normal" is nothing flagged
    has_cut = t.get("normal_below") is not None
    low = "low probability" if has_cut else "no finding flagged"
    if b:
        def pct(x):
            return "-" if x is None else f"{x:.0%}"
        y = _text(fig, y, f"Worklist: {pct(t['studies_flagged'])} of studies flagged ({_f(t['flags_per_study'], 1)} flags per "
                  f"study); buckets urgent / abnormal / {low} {pct(b['all']['urgent'])} / "
                  f"{pct(b['all']['abnormal'])} / {pct(b['all']['normal'])}. The {low.replace(' ', '-')} bucket held "
                  f"{pct(b['without_a_finding']['normal'])} of the {plural(b['without_a_finding']['n'], 'study')} "
                  f"without a finding "
                  f"and {pct(b['with_a_finding']['normal'])} of the {b['with_a_finding']['n']} with one. The worklist order "
                  f"puts studies with a finding first with AUROC {_auroc(t['worklist_auroc_any_finding'])}, pneumothorax "
                  f"{_auroc(t.get('worklist_auroc_pneumothorax'))}.", 10)
    y = _text(fig, y, "Flags as results.csv has them: a finding at or over the bundle's threshold"
              + (f", none in the low-probability bucket (P(any finding) below its cutoff {_f(t['normal_below'])})"
                 if has_cut else "") + ". Per-finding numbers rest on the positives shown: with few "
              "positives they are noise. Decision support only: every study still needs a radiologist.", 9)
    header = ["finding", "pos", "AUROC", "95% CI", "thresh.", "sens.", "spec.", "PPV", "NPV", "ECE"]
    rows = []
    resamples = (ev.get("bootstrap") or {}).get("resamples", 1)
    for f in FINDINGS:
        r = ev["per_finding"][f]
        # no interval: with --bootstrap 0 say so, not a count of patients that reads as the reason
        ci = (_ci(r["auroc_ci95"]) if r["auroc_ci95"] else "no CI: bootstrap off" if not resamples
              else f"no CI: {plural(r['positive_patients'], 'pos. patient')}")
        if r["auroc"] is None:
            ci = "one label value"
        rows.append([finding_label(f), str(r["positives"]), _auroc(r["auroc"]), ci, _f(r["threshold"], 3),
                     _f(r["sensitivity"], 2), _f(r["specificity"], 2), _f(r["ppv"], 2), _f(r["npv"], 2), _f(r["ece"])])
    ax = fig.add_axes([0.04, y - 0.31, 0.92, 0.29])
    _table(ax, header, rows, [0.17, 0.06, 0.08, 0.19, 0.08, 0.07, 0.07, 0.07, 0.07, 0.07])
    y = _text(fig, y - 0.32, "How the numbers are computed", 10, "bold")
    d = ev["definitions"]
    for key in ("matching", "patient", "mean_auroc", "bootstrap", "ece", "brier_prevalence", "operating_point"):
        y = _text(fig, y, f"{key.replace('_', ' ')}: {d[key]}.", 8, width=130)
    if ev["mean_auroc_ci_note"]:
        _text(fig, y, f"Mean AUROC interval: {ev['mean_auroc_ci_note']}.", 8, width=130)
    return fig


def _overlap_lines(fig: Figure, y: float, said: dict | None, what: str, figures_without: bool = True) -> float:
    """Whether the model was trained (or the bundle calibrated) on these studies: in bold red,
    with the figures without them when ``figures_without``, when it was; one plain line when
    the bundle cannot say (``what``: the list it lacks)."""
    if not said or not said.get("message"):
        return y
    if not said["checked"]:
        return _text(fig, y, f"{what}: {said['message']}.", 9)
    y = _text(fig, y - 0.004, f"In-sample: {said['message']}.", 10, "bold", width=90)  # bold is wider
    fig.texts[-1].set_color("#b00000")
    if not figures_without:
        return y
    rest = said.get("without_them")
    if rest and rest.get("too_few"):
        y = _text(fig, y, f"Without them ({plural(rest['n'], 'study')} of {plural(rest['patients'], 'patient')}): "
                  f"{rest['too_few']}; evaluation.json lists the in-sample files.", 9)
    elif rest:
        y = _text(fig, y, f"Without them ({plural(rest['n'], 'study')} of {plural(rest['patients'], 'patient')}): "
                  f"mean AUROC {_auroc(rest['mean_auroc'])} over {plural(rest['findings_in_mean'], 'finding')}, ECE "
                  f"{_f(rest['ece'])}, Brier {_f(rest['brier'], 4)} (no interval; evaluation.json lists the "
                  f"in-sample files).", 9)
    else:
        y = _text(fig, y, "Every study here is in-sample: nothing on this page measures the model on new studies.", 9)
    return y


def roc_page(ev: dict, y: np.ndarray, p: np.ndarray) -> Figure:
    fig = Figure(figsize=A4)
    fig.suptitle("ROC curve per finding (dashed: chance)", fontsize=12, weight="bold", y=0.975)
    axes = fig.subplots(5, 3, gridspec_kw={"hspace": 0.55, "wspace": 0.35, "left": 0.09, "right": 0.96,
                                           "top": 0.93, "bottom": 0.05})
    for k, ax in enumerate(axes.ravel()):
        if k >= len(FINDINGS):
            ax.axis("off")
            continue
        f, r = FINDINGS[k], ev["per_finding"][FINDINGS[k]]
        ax.plot([0, 1], [0, 1], "k--", lw=0.6)
        if r["auroc"] is not None:
            fpr, tpr, _ = roc_curve(y[:, k], p[:, k])
            ax.plot(fpr, tpr, lw=1.2, color="#1f5fa8")
            if r["sensitivity"] is not None and r["specificity"] is not None:
                ax.plot(1 - r["specificity"], r["sensitivity"], "o", color="#c0392b", ms=4)
        title = f"{finding_label(f)}\nAUROC {_auroc(r['auroc'])}, {r['positives']} pos."
        ax.set_title(title, fontsize=8)
        ax.set(xlim=(0, 1), ylim=(0, 1))
        ax.tick_params(labelsize=6)
        ax.set_xlabel("1 - specificity", fontsize=6)
        ax.set_ylabel("sensitivity", fontsize=6)
    fig.text(0.5, 0.015, "red dot: the bundle's threshold", ha="center", fontsize=8)
    return fig


def calibration_page(ev: dict) -> Figure:
    fig = Figure(figsize=A4)
    fig.suptitle("Calibration and subgroups", fontsize=12, weight="bold", y=0.975)
    rel = ev["reliability"]
    edges = np.array(rel["edges"])
    centres = (edges[:-1] + edges[1:]) / 2
    used = [i for i, c in enumerate(rel["count"]) if c]
    ax = fig.add_axes([0.12, 0.62, 0.45, 0.32])
    ax.plot([0, 1], [0, 1], "k--", lw=0.7, label="perfect calibration")
    ax.plot([rel["mean_predicted"][i] for i in used], [rel["observed"][i] for i in used], "o-", color="#1f5fa8",
            ms=4, label="this model")
    ax.set(xlim=(0, 1), ylim=(0, 1), xlabel="mean predicted probability (bin)", ylabel="observed frequency")
    ax.set_title(f"Reliability, all findings pooled (ECE {_f(ev['ece'])})", fontsize=9)
    ax.legend(fontsize=7, loc="upper left")
    hist = fig.add_axes([0.66, 0.62, 0.28, 0.32])
    hist.bar(centres, rel["count"], width=edges[1] - edges[0], color="#999999", edgecolor="white")
    hist.set_yscale("log")
    hist.set(xlim=(0, 1), xlabel="predicted probability", ylabel="image-finding pairs (log)")
    hist.set_title("How many pairs per bin", fontsize=9)
    for a in (ax, hist):
        a.tick_params(labelsize=7)
        a.xaxis.label.set_size(8)
        a.yaxis.label.set_size(8)
    header = ["group", "value", "n", "patients", "mean AUROC", "findings", "ECE", "Brier"]
    rows = []
    for group, values in ev["by_group"].items():
        for value, r in values.items():
            rows.append([group.replace("_", " "), value, str(r["n"]), str(r["patients"]), _auroc(r["mean_auroc"]),
                         str(r["findings_in_mean"]), _f(r["ece"]), _f(r["brier"], 4)])
    _text(fig, 0.57, "By view, sex and age band (as the model received them; 'unknown': not available). "
          "findings: how many findings the group's mean AUROC averages (those with positive and negative "
          "studies in the group; mean AUROC '-': no finding has both there). No intervals: a subgroup's few "
          "patients make its numbers uncertain.", 9)
    table_ax = fig.add_axes([0.06, 0.04, 0.88, 0.46])  # below the three lines above
    _table(table_ax, header, rows, [0.12, 0.12, 0.08, 0.1, 0.14, 0.1, 0.1, 0.1])
    return fig


def write_evaluation_pdf(ev: dict, y: np.ndarray, p: np.ndarray, path: Path, generated: dt.datetime) -> Path:
    """Write the three pages to ``path`` (via a temp file and a rename); ``generated`` (the moment
    evaluation.json records) is printed as the study reports print theirs."""
    return save_pages([summary_page(ev, generated), roc_page(ev, y, p), calibration_page(ev)], path,
                      f"cxr-batch evaluation of {ev['model']}")


def save_pages(figures: Iterable[Figure], path: Path, title: str) -> Path:
    """Write ``figures`` as the pages of one PDF at ``path``, mode 0640, via a temp file and a
    rename: a reader never sees half a report."""
    atomic_write_bytes(Path(path), pdf_pages(figures, title), mode=0o640)
    return Path(path)


def pdf_pages(figures: Iterable[Figure], title: str) -> bytes:
    """``figures`` as the pages of one PDF. Drawn in memory: matplotlib writing to a full disk as
    it draws hid the OSError behind a zlib error ('inconsistent stream state'). ``figures`` may
    be made one at a time (a generator): each is freed once written."""
    buffer = io.BytesIO()
    # what the caller holds (monitor: every window's statistics of a year of studies) is set aside
    # from the collections below, which then walk only the pages' objects: walking it on every page
    # was most of the time monitor spent writing its PDF
    gc.freeze()
    try:
        with PdfPages(buffer, metadata={"Title": title}) as pdf:
            for fig in figures:
                pdf.savefig(fig)
                del fig  # a figure's artists refer to each other: freed by the collector, not when dropped
                gc.collect()
    finally:
        gc.unfreeze()
    return buffer.getvalue()

"""monitor.pdf: the drift monitor's report for a site's AI lead.

Page 1: the alarms first (each quantity, the size of its shift, its window and studies), then
what was compared with what and how. Then, per model, the trends: every quantity window by
window against its reference (continuous: the window's median and interquartile range against
the reference's; a category: the distance between the two distributions; a proportion: the
window's rate with its 95% interval against the reference's), alarmed windows in red. Every
number comes from the report that monitor.json holds.
"""

from __future__ import annotations

import datetime as dt
import itertools
import textwrap
from collections.abc import Iterator

import matplotlib

matplotlib.use("Agg")  # files only, no screen
from matplotlib.figure import Figure  # noqa: E402

from .display import format_time, plural  # noqa: E402
from .drift import GROUPS, QUANTITIES  # noqa: E402
from .evaluation_report import pdf_pages  # noqa: E402

A4 = (8.27, 11.69)
ALARM, OK_COLOUR, REF = "#c0392b", "#1f5fa8", "#999999"
PANELS = (6, 4)  # rows, columns of trend panels per page


def _text(fig: Figure, y: float, text: str, size: float = 9, weight: str = "normal", width: int | None = None,
          colour: str = "black") -> float:
    """Wrapped text at height y; the default width is what fits the page at ``size`` (105
    characters at 9 points, fewer for a larger or bold headline, which ran off the page at 11)."""
    lines = textwrap.wrap(text, width or int(105 * 9 / size * (0.95 if weight == "bold" else 1.0))) or [""]
    fig.text(0.06, y, "\n".join(lines), fontsize=size, weight=weight, va="top", family="DejaVu Sans", color=colour)
    return y - 0.0165 * len(lines) * size / 9


def summary_page(report: dict) -> Figure:
    from .monitor import alarm_line, chance_of_false_alarms

    fig = Figure(figsize=A4)
    y = _text(fig, 0.965, "Drift monitoring: do the inputs still look like the reference?", 14, "bold")
    y = _text(fig, y - 0.004, f"Results {report['results']}: {plural(report['studies']['scored'], 'scored study')} of "
              f"{plural(report['studies']['rows'], 'row')}. Windows of {report['window']}; generated "
              # as the study reports and the worklist print it: in this computer's zone, named
              f"{format_time(dt.datetime.fromisoformat(report['generated']).astimezone())}.")
    alarms = report["alarms"]
    y -= 0.01
    if report.get("problem"):
        y = _text(fig, y, f"Nothing compared: {report['problem']}.", 11, "bold", width=80, colour=ALARM)
    elif alarms:
        inputs = sum(a["group"] != "output" for a in alarms)
        y = _text(fig, y, f"{len(alarms)} ALARM{'S' if len(alarms) > 1 else ''} ({inputs} on inputs, "
                  f"{len(alarms) - inputs} on outputs): check what changed before trusting the results.", 11, "bold",
                  colour=ALARM)
    else:
        y = _text(fig, y, "No alarm: no quantity moved beyond its minimum shift with a corrected p-value below "
                  f"{report['alpha']:g}.", 11, "bold", colour=OK_COLOUR)
    inverted = inverted_lines(report)
    if alarms or inverted:
        # no alarm: a few images that look inverted are worth a look, not something that moved
        y = _text(fig, y - 0.004, "What moved" if alarms else "Worth a look", 10, "bold")
        moved = what_moved(report)
        for line in moved[:MOVED_LINES]:
            y = _text(fig, y, f"- {line}", 8, width=125)
        if len(moved) > MOVED_LINES:
            y = _text(fig, y, f"... and {plural(len(moved) - MOVED_LINES, 'more quantity')} in monitor.json.", 8)
        # counted study by study, alarmed or not: "N studies this week look inverted"
        for line in inverted:
            y = _text(fig, y, f"- {line}", 8, width=125)
    if alarms:
        y = _text(fig, y - 0.006, "Alarms, window by window", 10, "bold")
    shown = 0
    for a in alarms:
        if y < 0.42:
            break
        y = _text(fig, y, f"- {a['model']}: {alarm_line(a)}", 8, width=125)
        shown += 1
    if shown < len(alarms):
        y = _text(fig, y, f"... and {plural(len(alarms) - shown, 'more alarm')} in monitor.json.", 8)
    if alarms and (chance := chance_of_false_alarms(report)):
        y = _text(fig, y, chance[0].upper() + chance[1:] + ".", 8, width=125)
    y -= 0.012
    y = _text(fig, y, "Compared with", 10, "bold")
    for m in report["models"]:
        ref = m["reference"]
        what = (f"{ref['source']} ({plural(ref['n_studies'], 'study')}; outputs "
                f"{'compared' if ref['outputs_compared'] else 'not compared'})") if ref else "nothing"
        small = sum(bool(w.get("too_small")) for w in m["windows"])
        tested = f"{plural(len(m['windows']) - small, 'window')} tested" + (f", {small} too small" if small else "")
        y = _text(fig, y, f"{m['model']} (bundle sha256 {m['weights_sha256'][:12]}..., {plural(m['n'], 'study')}, "
                  f"{tested}): "
                  f"{what}.", 8, width=125)
        for note in m["notes"]:
            y = _text(fig, y, f"  note: {note}.", 8, width=125)
    for note in report["notes"]:
        y = _text(fig, y, f"Note: {note}.", 8, width=125)
    y -= 0.012
    y = _text(fig, y, "How", 10, "bold")
    method = report["method"]
    lines = [f"windows: {method['windows']}.",
             "tests: " + "; ".join(f"{k}: {v}" for k, v in method["tests"].items()) + ".",
             "minimum shift: " + "; ".join(f"{k}: {v}" for k, v in method["effect"].items()) + ".",
             f"alarm: {method['alarm']}; alpha {report['alpha']:g}, at least {plural(report['min_studies'], 'study')}.",
             # said beside the alarms when there are some
             *([f"{chance}."] if not alarms and (chance := chance_of_false_alarms(report)) else []),
             f"scope: {method['scope']}."]
    for line in lines:
        y = _text(fig, y, line, 8, width=125)
    return fig


MOVED_LINES = 10  # quantities listed under "What moved" at most


def what_moved(report: dict) -> list[str]:
    """Each quantity that alarmed, once, inputs first: its shift in its first alarmed window (from
    which date) and in how many of the windows tested since it alarmed. A flood of AP films
    alarmed on the view and a dozen output flags in window after window: listed alarm by alarm,
    the one thing the wards could be asked about was a line among forty."""
    by: dict[tuple[str, str, str], list[dict]] = {}
    for a in report["alarms"]:
        by.setdefault((a["model"], a.get("weights_sha256"), a["quantity"]), []).append(a)
    several = len(report["models"]) > 1
    lines = []
    def when(a: dict) -> tuple:  # each model numbers its windows from 0: by time first
        return (a["window"].get("first") or "", a["window"]["index"])

    for (model, sha, _), items in sorted(by.items(), key=lambda kv: (GROUPS.index(kv[1][0]["group"]),
                                                                      min(when(a) for a in kv[1]))):
        first = min(items, key=when)
        tested = [w for m in report["models"] if m.get("weights_sha256") == sha for w in m["windows"]
                  if not w.get("too_small") and w.get("window", {}).get("index", 0) >= first["window"]["index"]]
        since = f" ({first['window']['first'][:10]})" if first["window"].get("first") else ""
        lines.append(f"{model + ': ' if several else ''}{first['label']}: {first['shift']} from window "
                     f"{first['window']['index']}{since}; in {len(items)} of the {plural(len(tested), 'window')} "
                     f"tested since")
    return lines


INVERTED_WINDOWS = 3  # windows named with their count of images that look inverted; monitor.json has all


def inverted_lines(report: dict) -> list[str]:
    """Per model, the windows holding studies whose image looks inverted (the newest, alarmed
    ones first), with their count and share: a tenth of the studies inverted moves no
    distribution enough to alarm, yet a radiologist wants to know "12 studies this week look
    inverted". [] when no study does."""
    from .drift import INVERTED_LEVEL, INVERTED_RATE

    several = len(report["models"]) > 1
    lines = []
    for m in report["models"]:
        hit = [w for w in m["windows"] if w.get("looks_inverted", {}).get("count")]
        if not hit:
            continue
        shown = sorted(hit, key=lambda w: (w["looks_inverted"]["alarm"], w["window"]["index"]))[-INVERTED_WINDOWS:]
        parts = []
        for w in sorted(shown, key=lambda w: w["window"]["index"]):
            c, when = w["looks_inverted"], f" ({w['window']['first'][:10]})" if w["window"].get("first") else ""
            parts.append(f"window {w['window']['index']}{when}: {c['count']} of {plural(c['n'], 'study')} "
                         f"({c['count'] / c['n']:.1%}){', ALARM' if c['alarm'] else ''}")
        more = len(hit) - len(shown)
        lines.append(f"{m['model'] + ': ' if several else ''}images that look inverted (band cue and grey-level "
                     f"asymmetry both reversed; about {INVERTED_RATE:.0%} of radiographs shown right do, {INVERTED_LEVEL:.0%} of a "
                     f"window alarms): " + "; ".join(parts)
                     + (f"; and {plural(more, 'more window')} (monitor.json)" if more else "")
                     + ". Look at those studies (rows in monitor.json)")
    return lines


def _panel(ax, name: str, entries: list[tuple[int, dict]]) -> None:
    """One quantity over the windows: value against the reference, alarms in red. Each kind of
    mark is drawn in one call and the axis numbers about six windows: a year of windows drawn
    one artist each took most of monitor's time, and 196 tick labels could not be read."""
    ax.set_title(name if len(name) <= 28 else name[:27] + "...", fontsize=6.5)
    ax.tick_params(labelsize=5)
    xs = [i for i, _ in entries]
    _window_ticks(ax, xs)
    tested = [(i, e) for i, e in entries if "not_tested" not in e]
    if not tested:
        ax.text(0.5, 0.5, "not tested", ha="center", va="center", fontsize=6, color=REF, transform=ax.transAxes)
        return
    kind = tested[0][1]["kind"]
    at = [i for i, _ in tested]
    # a window under --min-studies is no verdict: drawn in the reference's grey, never as a window
    # found like the reference
    colours = [ALARM if e.get("alarm") else REF if e.get("too_small") else OK_COLOUR for _, e in tested]
    dot = dict(c=colours, s=2.5 ** 2, marker="o", linewidths=0, zorder=3)  # as plot(..., "o", ms=2.5)
    if kind == "continuous":
        e0 = tested[0][1]
        ax.axhspan(*e0["reference_iqr"], color=REF, alpha=0.25, lw=0)
        ax.axhline(e0["reference_median"], color=REF, lw=0.8)
        ax.vlines(at, [e["window_iqr"][0] for _, e in tested], [e["window_iqr"][1] for _, e in tested],
                  colors=colours, lw=1)
        ax.scatter(at, [e["window_median"] for _, e in tested], **dot)
        # one detector, one pixel spacing: every value the same, and the axis, spread over float
        # rounding, read '1e-13+2.86e-1'; the value is shown, with room around it
        drawn = [*e0["reference_iqr"], *(v for _, e in tested for v in (*e["window_iqr"], e["window_median"]))]
        low, high = min(drawn), max(drawn)
        if high - low <= 1e-9 * max(1.0, abs(high)):
            pad = 0.05 * abs(high) or 1.0
            ax.set_ylim(low - pad, high + pad)
        ax.ticklabel_format(axis="y", useOffset=False)
    elif kind == "proportion":
        ax.axhline(tested[0][1]["reference_rate"], color=REF, lw=0.8)
        ax.vlines(at, [e["window_ci95"][0] for _, e in tested], [e["window_ci95"][1] for _, e in tested],
                  colors=colours, lw=1)
        ax.scatter(at, [e["window_rate"] for _, e in tested], **dot)
    else:
        ax.axhline(tested[0][1]["min_effect"], color=ALARM, lw=0.6, ls="--")
        ax.scatter(at, [e["effect"] for _, e in tested], **dot)
        ax.set_ylim(-0.04, 1.04)  # a distance of 0 or 1 (every study unknown) shows its whole dot


def _window_ticks(ax, xs: list[int]) -> None:
    """Every window numbered when they are few; otherwise about six whole-number ticks (a panel is
    3 cm wide)."""
    from matplotlib.ticker import MaxNLocator

    if len(xs) <= 12:
        ax.set_xticks(xs)
    else:
        ax.xaxis.set_major_locator(MaxNLocator(nbins=6, integer=True))
    ax.set_xlim(min(xs) - 0.5, max(xs) + 0.5)


def trend_pages(report: dict) -> Iterator[Figure]:
    """The trend pages one at a time: a page of a year of windows holds tens of thousands of
    artists, so each is written (:func:`pdf_pages`) before the next is drawn, not all held."""
    per_page = PANELS[0] * PANELS[1]
    names = [q.name for q in sorted(QUANTITIES, key=lambda q: GROUPS.index(q.group))]
    for m in report["models"]:
        if not m["windows"]:
            continue
        for start in range(0, len(names), per_page):
            yield _trend_page(m, names[start:start + per_page])


def _trend_page(m: dict, names: list[str]) -> Figure:
    fig = Figure(figsize=A4)
    fig.suptitle(f"Trends by window: {m['model']} ({m['weights_sha256'][:12]}...)", fontsize=11,
                 weight="bold", y=0.98)
    fig.text(0.5, 0.958, "x: window; grey band and line: the reference (median and interquartile range, or rate; "
             "dashed: the smallest distance that alarms)\ndots: each window; red: an alarm; grey: a window under "
             "--min-studies, too small for a verdict", ha="center", va="top", fontsize=7)
    axes = fig.subplots(*PANELS, gridspec_kw={"hspace": 0.7, "wspace": 0.35, "left": 0.07, "right": 0.97,
                                              "top": 0.92, "bottom": 0.04})
    for ax, name in zip(axes.ravel(), names + [None] * (PANELS[0] * PANELS[1])):
        if name is None:
            ax.axis("off")
            continue
        _panel(ax, name, [(w["window"]["index"], {**w["statistics"][name], "too_small": w.get("too_small", False)})
                          for w in m["windows"]])
    return fig


def monitor_pdf(report: dict) -> bytes:
    """The summary and trend pages, as a PDF's bytes."""
    return pdf_pages(itertools.chain([summary_page(report)], trend_pages(report)), "cxr-batch drift monitoring")


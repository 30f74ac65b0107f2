"""Drift monitoring: the quantities watched, their summaries (a reference) and the tests.

A CXR model degrades silently when what it is given moves away from what it was trained on: a
new detector or export setting (inverted grey levels, another matrix size), another patient mix
(a paediatric ward routed to it), another prevalence. Every scored study records how its image
was made (:mod:`cxr_batch.acquisition`), statistics of the model's input
(:mod:`cxr_batch.image_stats`), its patient data and its outputs. This module

- names the quantities watched (:data:`QUANTITIES`), each continuous, categorical or a
  proportion, in one of four groups: acquisition, image, patient, output;
- summarises a set of scored studies into a *reference* (:func:`summarise`): exact counts, or
  101 percentiles for a continuous quantity with many distinct values, so a reference of any
  size fits in a bundle's manifest;
- compares a window of studies with a reference (:func:`compare`): two-sample Kolmogorov-Smirnov
  for continuous quantities (with the population stability index beside it), chi-square on the
  2 x k table for categorical ones (when a category is expected fewer than 5 times, Fisher's exact
  test of each category against the rest, Bonferroni over them), Fisher's exact test for
  proportions (flag rates, unknown age)
  with the window's exact binomial interval. The p-values are corrected for the number of
  quantities tested together (Holm), and an alarm needs both a corrected p-value below
  ``alpha`` and a shift at least :data:`MIN_EFFECT` large, in a window of at least
  ``min_studies`` studies. So a window drawn from the reference's own population raises an
  alarm in at most ``alpha`` of evaluations (Holm controls the family-wise error), and a
  shift too small to matter never does, however many studies make it significant.

It is an early warning that the inputs (or outputs) have moved, not an estimate of how well the
model does: that needs labels (``cxr-batch evaluate``).
"""

from __future__ import annotations

import datetime as dt
import functools
import hashlib
import json
import math
import warnings
from dataclasses import dataclass
from typing import Callable

import numpy as np

from .acquisition import NUMBER_FORMAT
from .findings import FINDINGS
from .image_stats import COLUMNS as IMAGE_COLUMNS, VALUE_FORMAT, looks_inverted
from .record import AGE_FORMAT, PROBABILITY_FORMAT, StudyRecord, log_name

REFERENCE_FORMAT = 1
GROUPS = ("acquisition", "image", "patient", "output")
INPUT_GROUPS = ("acquisition", "image", "patient")
# The smallest shift that raises an alarm, per kind of quantity: a Kolmogorov-Smirnov distance
# (largest gap between the two cumulative distributions), a total variation distance (half the
# summed absolute differences of category shares) and Cohen's h (difference of arcsine-root
# proportions; 0.2 is "small", 0.5 "medium"). Below them a shift is reported, not alarmed: with
# hundreds of studies a trivial difference is significant.
MIN_EFFECT = {"continuous": 0.3, "categorical": 0.15, "proportion": 0.3}
# A patient mix moves more from week to week than a device or an export setting does (the
# portable AP films of an ICU, a clinic's day): sex and view need a swing of 30 points.
PATIENT_MIX_EFFECT = 0.3
EFFECT_NAMES = {"continuous": "KS distance", "categorical": "total variation distance", "proportion": "Cohen's h"}
DEFAULT_ALPHA = 0.001
DEFAULT_MIN_STUDIES = 20
EXACT_LIMIT = 100  # a continuous quantity with at most this many distinct values is kept as exact counts
CATEGORY_LIMIT = 40  # categories kept by name in a reference; the rest are "(other)"
NONE, OTHER, UNKNOWN = "(none)", "(other)", "unknown"
EXAMPLES = 10  # studies named in an alarm
# Images that look inverted, counted study by study (image_stats.looks_inverted): a tenth of the
# studies inverted moves each distribution by a KS distance of about 0.1, under the 0.3 that
# alarms, while a count says "N studies this week look inverted". By chance at most
# INVERTED_RATE of the studies look inverted (measured: 0.6% of the NIH radiographs shown right,
# 1.6% of nih_extra's, upright or upside down, benchmarks/inversion_check.py): a window alarms when its count is
# significantly above that (exact binomial test, in the window's Holm family) and at least
# INVERTED_LEVEL of its studies.
INVERTED = "looks_inverted"
INVERTED_RATE = 0.02
INVERTED_LEVEL = 0.05
INVERTED_LABEL = "images that look inverted (grey levels negated?)"


class DriftError(Exception):
    """A reference that cannot be used (malformed, of another format) or no reference at all."""


@dataclass(frozen=True)
class Quantity:
    name: str
    group: str
    kind: str  # "continuous", "categorical" or "proportion"
    label: str
    value: Callable[[StudyRecord], object]  # a number (None: unknown), a category, or a bool
    min_effect: float | None = None  # the smallest shift that alarms, when not its kind's MIN_EFFECT
    written: str | None = None  # a continuous float's format in results.csv (None: whole numbers)

    @property
    def floor(self) -> float:
        return MIN_EFFECT[self.kind] if self.min_effect is None else self.min_effect

    def as_written(self, v):
        """A continuous value at the precision results.csv holds it. A reference and a window
        come from different sources (studies in memory, the ledger, results.csv): one detector's
        pixel spacing, 0.1943109 whole and 0.1943 in results.csv, was a Kolmogorov-Smirnov
        distance of 1 between the same studies."""
        return float(format(v, self.written)) if self.written and _finite(v) else v


def _text(getter):
    return lambda r: getter(r) or NONE


def _image(name: str):
    return lambda r: getattr(r.image_stats, name) if r.image_stats is not None else None


IMAGE_LABELS = {
    "intensity_p05": "image intensity: 5th percentile", "intensity_p50": "image intensity: median",
    "intensity_p95": "image intensity: 95th percentile", "intensity_mean": "image intensity: mean",
    "intensity_std": "image contrast: standard deviation of intensity",
    "intensity_skew": "image intensity: skewness (percentiles; flips when grey levels are inverted)",
    "inversion_cue": "image intensity: centre band minus lateral bands (inversion cue)",
    # inverted grey levels flip this cue as much as an upside-down image does: said, so an
    # inversion alarm is not read as "upside down" (its p-value often lists it first)
    "top_bottom": "image intensity: lower half minus upper half (orientation cue; flips when the image is upside "
                  "down or its grey levels are inverted)",
    "left_right": "image intensity: right half minus left half (mirroring cue)",
    "sharpness": "image sharpness: neighbour difference / contrast (falls when a small image is enlarged)",
}


def _quantities() -> tuple[Quantity, ...]:
    a = lambda name: (lambda r: getattr(r.acquisition, name))  # noqa: E731
    out = [
        Quantity("format", "acquisition", "categorical", "file format", _text(a("format"))),
        Quantity("modality", "acquisition", "categorical", "DICOM modality", _text(a("modality"))),
        Quantity("photometric", "acquisition", "categorical", "photometric interpretation", _text(a("photometric"))),
        Quantity("bits_stored", "acquisition", "categorical", "bits stored (bit depth)",
                 lambda r: str(r.acquisition.bits_stored) if r.acquisition.bits_stored else NONE),
        Quantity("image_rows", "acquisition", "continuous", "image size: rows (pixels)", a("image_rows")),
        Quantity("image_columns", "acquisition", "continuous", "image size: columns (pixels)", a("image_columns")),
        Quantity("pixel_spacing", "acquisition", "continuous", "image resolution: pixel spacing (mm)",
                 a("pixel_spacing"), written=NUMBER_FORMAT),
        Quantity("manufacturer", "acquisition", "categorical", "manufacturer", _text(a("manufacturer"))),
        Quantity("manufacturer_model", "acquisition", "categorical", "manufacturer's model name",
                 _text(a("manufacturer_model"))),
    ]
    out += [Quantity(c, "image", "continuous", IMAGE_LABELS[c], _image(c), written=VALUE_FORMAT)
            for c in IMAGE_COLUMNS]
    out += [
        Quantity("age", "patient", "continuous", "patient age (years, known ages)", lambda r: r.patient.age,
                 written=AGE_FORMAT),
        Quantity("age_unknown", "patient", "proportion", "share of studies without a known age",
                 lambda r: r.patient.age is None),
        Quantity("sex", "patient", "categorical", "patient sex", lambda r: r.patient.sex or UNKNOWN,
                 PATIENT_MIX_EFFECT),
        Quantity("view", "patient", "categorical", "view position", lambda r: r.patient.view or UNKNOWN,
                 PATIENT_MIX_EFFECT),
    ]
    for k, f in enumerate(FINDINGS):
        out.append(Quantity(f"p_{f}", "output", "continuous", f"output: probability of {f}",
                            lambda r, k=k: r.scores.probs[k] if r.scores else None, written=PROBABILITY_FORMAT))
    for k, f in enumerate(FINDINGS):
        out.append(Quantity(f"flag_{f}", "output", "proportion", f"output: share of studies flagged {f}",
                            lambda r, k=k: bool(r.scores.flags[k]) if r.scores else None))
    out.append(Quantity("p_any", "output", "continuous", "output: P(any finding)",
                        lambda r: r.scores.p_any if r.scores else None, written=PROBABILITY_FORMAT))
    out.append(Quantity("priority", "output", "categorical", "output: triage priority",
                        lambda r: r.scores.priority if r.scores else None))
    return tuple(out)


QUANTITIES: tuple[Quantity, ...] = _quantities()
BY_NAME = {q.name: q for q in QUANTITIES}


# ---------------------------------------------------------------------------- summaries
def monitored(record: StudyRecord) -> bool:
    """A scored study with the data drift monitoring needs: studies scored by a cxr-batch
    before drift monitoring have no image statistics, and would look like a change of format."""
    return record.ok and record.scores is not None and record.image_stats is not None


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _round(v: float) -> float:
    return float(f"{v:.6g}")


def summarise_values(kind: str, values: list) -> dict:
    """One quantity's summary: what a reference stores and what the tests read."""
    if kind == "continuous":
        known = np.array([float(v) for v in values if _finite(v)], dtype=float)
        out = {"kind": kind, "n": int(known.size), "missing": len(values) - int(known.size)}
        if known.size:
            out.update(mean=_round(known.mean()), std=_round(known.std()), min=_round(known.min()),
                       max=_round(known.max()))
            distinct, counts = np.unique(np.round(known, 6), return_counts=True)
            if distinct.size <= EXACT_LIMIT:
                out.update(values=[_round(v) for v in distinct], counts=[int(c) for c in counts])
            else:
                out["quantiles"] = [_round(v) for v in np.quantile(known, np.linspace(0, 1, 101))]
        return out
    if kind == "categorical":
        counts: dict[str, int] = {}
        for v in values:
            if v is not None:
                counts[str(v)] = counts.get(str(v), 0) + 1
        kept = dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:CATEGORY_LIMIT])
        rest = sum(counts.values()) - sum(kept.values())
        if rest:
            kept[OTHER] = kept.get(OTHER, 0) + rest
        return {"kind": kind, "n": sum(counts.values()), "counts": kept}
    known = [bool(v) for v in values if v is not None]
    return {"kind": kind, "n": len(known), "k": int(sum(known))}


def summarise(records: list[StudyRecord]) -> dict[str, dict]:
    """Every quantity's summary over the scored studies of ``records``."""
    scored = [r for r in records if monitored(r)]
    return {q.name: summarise_values(q.kind, [q.as_written(q.value(r)) for r in scored]) for q in QUANTITIES}


def output_fingerprint(manifest: dict) -> str:
    """What fixes a bundle's outputs for a given input: its weights, thresholds, calibration,
    triage table, preprocessing, patient encoding and model configuration (not its metrics,
    card or reference). A reference's outputs are compared only with studies scored by a bundle of the
    same fingerprint: a calibrated copy of a bundle carries its base's reference, whose inputs
    still apply but whose outputs no longer do."""
    parts = {k: manifest.get(k) for k in ("sha256", "thresholds", "calibration", "triage", "preprocessing",
                                          "patient_encoding", "model_config")}
    return hashlib.sha256(json.dumps(parts, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def make_reference(records: list[StudyRecord], source: str, outputs_for: str | None = None,
                   weights_sha256: str | None = None) -> dict:
    """A reference: every quantity's summary over ``records`` (scored the way inference scores),
    where they came from, and which model's outputs it describes: ``outputs_for`` (the bundle's
    :func:`output_fingerprint`) or ``weights_sha256`` (the bundle_sha256 that scored a site
    baseline)."""
    from . import __version__

    scored = [r for r in records if monitored(r)]
    if not scored:
        raise DriftError(f"no scored study to build a reference from ({source})")
    ref = {"format": REFERENCE_FORMAT, "source": source, "n_studies": len(scored),
           "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
           "cxr_batch": __version__, "quantities": summarise(scored)}
    if outputs_for:
        ref["outputs_for"] = outputs_for
    if weights_sha256:
        ref["weights_sha256"] = weights_sha256
    return ref


def check_reference(ref, where: str) -> dict:
    """A reference as read from a manifest or a file, checked enough that the tests cannot
    crash on it. Raises DriftError naming what is wrong."""
    if not isinstance(ref, dict) or not isinstance(ref.get("quantities"), dict):
        raise DriftError(f"{where}: 'reference' must be a table with 'quantities'")
    if ref.get("format") != REFERENCE_FORMAT:
        raise DriftError(f"{where}: reference format {ref.get('format')!r} is not {REFERENCE_FORMAT} (made by another "
                         f"cxr-batch version): make the reference again")
    for name, s in ref["quantities"].items():
        q = BY_NAME.get(name)
        if q is None:
            continue  # a quantity this version does not watch: ignored
        try:
            ok = s["kind"] == q.kind and isinstance(s["n"], int) and s["n"] >= 0
            if q.kind == "continuous" and s["n"]:
                if "values" in s:
                    ok = ok and len(s["values"]) == len(s["counts"]) and sum(s["counts"]) == s["n"]
                    ok = ok and all(_finite(v) for v in s["values"]) and all(isinstance(c, int) and c > 0
                                                                             for c in s["counts"])
                else:
                    ok = ok and len(s["quantiles"]) >= 2 and all(_finite(v) for v in s["quantiles"])
            elif q.kind == "categorical":
                ok = ok and all(isinstance(c, int) and c >= 0 for c in s["counts"].values())
                ok = ok and sum(s["counts"].values()) == s["n"]
            elif q.kind == "proportion":
                ok = ok and isinstance(s["k"], int) and 0 <= s["k"] <= s["n"]
        except (KeyError, TypeError, AttributeError):
            ok = False
        if not ok:
            raise DriftError(f"{where}: the reference's summary of '{name}' is malformed")
    return ref


def reference_sample(s: dict) -> np.ndarray:
    """The reference's values of a continuous quantity: exact when it kept counts, else n values
    rebuilt from its percentiles (within 1% of the original cumulative distribution)."""
    if not s.get("n"):
        return np.empty(0)
    if "values" in s:
        return np.repeat(np.array(s["values"], dtype=float), s["counts"])
    q = np.array(s["quantiles"], dtype=float)
    return np.interp((np.arange(s["n"]) + 0.5) / s["n"], np.linspace(0, 1, len(q)), q)


# ---------------------------------------------------------------------------- tests
def _psi(ref: np.ndarray, win: np.ndarray) -> float | None:
    """Population stability index over the reference's deciles (0.1: moderate, 0.25: large)."""
    edges = np.unique(np.quantile(ref, np.linspace(0, 1, 11))[1:-1])
    if edges.size == 0:
        return None
    r = np.bincount(np.searchsorted(edges, ref, side="right"), minlength=edges.size + 1) / ref.size
    w = np.bincount(np.searchsorted(edges, win, side="right"), minlength=edges.size + 1) / win.size
    r, w = np.clip(r, 1e-4, None), np.clip(w, 1e-4, None)
    return float(np.sum((w - r) * np.log(w / r)))


# The tests' p-values depend on a few whole numbers only (a table's counts; the two sample sizes
# and their distance): a year of windows of one site asks the same ones again and again, and
# scipy's exact computations were most of the time ``cxr-batch monitor`` spent testing windows
# (``benchmarks/monitor_large.py --phases``). Kept here, each is computed once per process.
MEMO_SIZE = 65536
_KS_RESULTS: dict[tuple[int, int, float], tuple[float, float]] = {}


def ks_distance(ref: np.ndarray, win: np.ndarray) -> float:
    """The two-sample Kolmogorov-Smirnov distance, computed as ``scipy.stats.ks_2samp`` computes
    it (the same operations in the same order: the same float), of which with the two sizes its
    statistic and p-value are a function."""
    data1, data2 = np.sort(ref), np.sort(win)
    data_all = np.concatenate([data1, data2])
    cddiffs = (np.searchsorted(data1, data_all, side="right") / data1.shape[0]
               - np.searchsorted(data2, data_all, side="right") / data2.shape[0])
    min_s, max_s = np.clip(-cddiffs[np.argmin(cddiffs)], 0, 1), cddiffs[np.argmax(cddiffs)]
    return float(min_s if min_s > max_s else max_s)


def ks_test(ref: np.ndarray, win: np.ndarray) -> tuple[float, float]:
    """``scipy.stats.ks_2samp(ref, win)``'s statistic and p-value (two-sided, its automatic
    method), each (sizes, distance) computed once."""
    from scipy.stats import ks_2samp

    key = (int(ref.size), int(win.size), ks_distance(ref, win))
    if key not in _KS_RESULTS:
        if len(_KS_RESULTS) >= MEMO_SIZE:
            _KS_RESULTS.clear()
        with warnings.catch_warnings():
            # scipy falls back from the exact p-value to the asymptotic one when the exact sum fails
            # (a window much like its reference: p near 1) and says so on stderr, once per quantity;
            # the fallback is the right answer, and the operator's terminal is no place for it
            warnings.filterwarnings("ignore", "ks_2samp: Exact calculation unsuccessful", RuntimeWarning)
            ks = ks_2samp(ref, win)
        _KS_RESULTS[key] = (float(ks.statistic), float(ks.pvalue))
    return _KS_RESULTS[key]


@functools.lru_cache(maxsize=MEMO_SIZE)
def fisher_p(table: tuple[int, int, int, int]) -> float:
    """Fisher's exact test's two-sided p-value of the 2 x 2 table ((a, b), (c, d))."""
    from scipy.stats import fisher_exact

    a, b, c, d = table
    return float(fisher_exact([[a, b], [c, d]])[1])


@functools.lru_cache(maxsize=MEMO_SIZE)
def chi_square_p(reference: tuple[int, ...], window: tuple[int, ...]) -> float:
    """The chi-square test's p-value of the 2 x k table of reference and window counts."""
    from scipy.stats import chi2_contingency

    return float(chi2_contingency(np.vstack([np.array(reference, dtype=float), np.array(window, dtype=float)]))[1])


def _continuous(s: dict, values: list) -> dict:
    win = np.array([float(v) for v in values if _finite(v)], dtype=float)
    ref = reference_sample(s)
    out = {"n_window": int(win.size), "n_reference": int(ref.size), "missing_window": len(values) - int(win.size)}
    if not win.size or not ref.size:
        out["not_tested"] = "no known values in the window" if ref.size else "the reference has no known values"
        return out
    statistic, p_value = ks_test(ref, win)
    out.update(effect=statistic, p_value=p_value, psi=_psi(ref, win),
               reference_median=_round(float(np.median(ref))), window_median=_round(float(np.median(win))),
               reference_mean=_round(float(ref.mean())), window_mean=_round(float(win.mean())),
               reference_iqr=[_round(v) for v in np.quantile(ref, [0.25, 0.75])],
               window_iqr=[_round(v) for v in np.quantile(win, [0.25, 0.75])])
    out["shift"] = (f"median {out['reference_median']:.3g} -> {out['window_median']:.3g}, mean "
                    f"{out['reference_mean']:.3g} -> {out['window_mean']:.3g}")
    return out


SPARSE = 5  # Cochran's rule: chi-square's p-value holds when every expected count is at least this
SPARSE_TEST = "Fisher's exact, each category against the rest, Bonferroni over the categories"


def _categorical(s: dict, values: list) -> dict:
    ref_counts = dict(s["counts"])
    win_counts: dict[str, int] = {}
    for v in values:
        if v is None:
            continue
        v = str(v)
        if v not in ref_counts and OTHER in ref_counts:
            v = OTHER  # the reference folded its rare categories together
        win_counts[v] = win_counts.get(v, 0) + 1
    n_ref, n_win = sum(ref_counts.values()), sum(win_counts.values())
    out = {"n_window": n_win, "n_reference": n_ref}
    if not n_win or not n_ref:
        out["not_tested"] = "no values in the window" if n_ref else "the reference has no values"
        return out
    cats = sorted(set(ref_counts) | set(win_counts))
    r = np.array([ref_counts.get(c, 0) for c in cats], dtype=float)
    w = np.array([win_counts.get(c, 0) for c in cats], dtype=float)
    share_r, share_w = r / n_ref, w / n_win
    tvd = float(0.5 * np.abs(share_w - share_r).sum())
    expected = np.outer([n_ref, n_win], r + w) / (n_ref + n_win)
    if len(cats) < 2:
        p = 1.0
    elif expected.min() >= SPARSE:
        p = chi_square_p(tuple(int(c) for c in r), tuple(int(c) for c in w))
    else:
        # a rare category (an urgent priority at 2%, a vendor with 1% of the studies) in a window of
        # 20: chi-square's p-value fell below alpha / 53 thirty to sixty times as often as it says,
        # false alarms beyond alpha. Each category's exact test against the rest is exact; the
        # Bonferroni bound over the categories keeps their smallest p-value a valid one
        p = min(1.0, len(cats) * min(fisher_p((int(wc), int(n_win - wc), int(rc), int(n_ref - rc)))
                                     for rc, wc in zip(r, w)))
        out["test"] = SPARSE_TEST
    grew = cats[int(np.argmax(share_w - share_r))]
    out.update(effect=tvd, p_value=p, grew=grew,
               reference_shares={c: _round(v) for c, v in zip(cats, share_r)},
               window_shares={c: _round(v) for c, v in zip(cats, share_w)})
    out["shift"] = f"'{grew}' {share_r[cats.index(grew)]:.0%} -> {share_w[cats.index(grew)]:.0%} of studies"
    return out


@functools.lru_cache(maxsize=MEMO_SIZE)
def clopper_pearson(k: int, n: int, level: float = 0.95) -> tuple[float, float]:
    """The exact (Clopper-Pearson) interval of k successes in n, from the beta distribution's
    quantiles: scipy's ``binomtest(k, n).proportion_ci(method="exact")`` to 1e-12, without its
    root search over the binomial distribution, which was most of a long ``monitor`` run's time
    (``benchmarks/monitor_large.py --phases``)."""
    from scipy.stats import beta

    tail = (1 - level) / 2
    low = 0.0 if k == 0 else float(beta.ppf(tail, k, n - k + 1))
    high = 1.0 if k == n else float(beta.ppf(1 - tail, k + 1, n - k))
    return low, high


def _proportion(s: dict, values: list) -> dict:
    known = [bool(v) for v in values if v is not None]
    n_win, k_win, n_ref, k_ref = len(known), int(sum(known)), int(s["n"]), int(s["k"])
    out = {"n_window": n_win, "n_reference": n_ref}
    if not n_win or not n_ref:
        out["not_tested"] = "no values in the window" if n_ref else "the reference has no values"
        return out
    rate_w, rate_r = k_win / n_win, k_ref / n_ref
    low, high = clopper_pearson(k_win, n_win)
    h = abs(2 * math.asin(math.sqrt(rate_w)) - 2 * math.asin(math.sqrt(rate_r)))
    p = fisher_p((k_win, n_win - k_win, k_ref, n_ref - k_ref))
    out.update(effect=h, p_value=p, reference_rate=_round(rate_r), window_rate=_round(rate_w),
               window_ci95=[_round(low), _round(high)], k_window=k_win, k_reference=k_ref)
    out["shift"] = f"{rate_r:.1%} -> {rate_w:.1%} (95% CI {low:.1%}-{high:.1%})"
    return out


TESTS = {"continuous": ("two-sample Kolmogorov-Smirnov", _continuous),
         "categorical": ("chi-square, reference vs window counts", _categorical),
         "proportion": ("Fisher's exact, reference vs window", _proportion)}


def holm(pvalues: dict[str, float]) -> dict[str, float]:
    """Holm's step-down adjustment: adjusted p-values controlling the family-wise error rate."""
    order = sorted(pvalues, key=pvalues.get)
    m, running, out = len(order), 0.0, {}
    for i, name in enumerate(order):
        running = max(running, min(1.0, (m - i) * pvalues[name]))
        out[name] = running
    return out


def written_summary(q: Quantity, s: dict) -> dict:
    """A reference's summary of ``q`` at the precision results.csv holds it (references made
    before kept 6 significant digits)."""
    if q.kind != "continuous" or not q.written:
        return s
    return {**s, **{k: [q.as_written(v) for v in s[k]] for k in ("values", "quantiles") if k in s}}


def outputs_comparable(reference: dict, weights_sha256: str, fingerprint: str | None) -> bool:
    """Whether the reference's outputs describe the model that scored the window."""
    if reference.get("weights_sha256"):
        return reference["weights_sha256"] == weights_sha256
    return bool(fingerprint) and reference.get("outputs_for") == fingerprint


OTHER_FORMAT = "the reference holds no"  # how other_format's reason begins


def other_format(reference: dict, records: list[StudyRecord]) -> str:
    """Why the acquisition quantities of ``records`` cannot be compared with ``reference``, or ''.
    A reference holding no study of the window's file format (the bundled ones were made from
    NIH PNG files; a hospital sends DICOM) cannot say what that format's header, matrix and bit
    depth should be: every window of a DICOM site alarmed on format, modality, photometric
    interpretation, manufacturer and model, for ever, and an alarm that never ends is one nobody
    reads. The images, patients and outputs are still compared."""
    counts = (reference["quantities"].get("format") or {}).get("counts") or {}
    known = {f for f, c in counts.items() if c and f != OTHER}
    formats = {str(BY_NAME["format"].value(r)) for r in records}
    if not known or not formats or formats & known or OTHER in counts:
        return ""
    return (f"{OTHER_FORMAT} {'/'.join(sorted(formats))} studies (it was made from {'/'.join(sorted(known))} files): "
            f"the header, matrix and bit depth of these studies cannot be compared with it; to watch them (a new "
            f"detector, vendor or export setting), give a site baseline, --reference RESULTS_DIR of studies scored "
            f"here while all was well")


def compare(reference: dict, records: list[StudyRecord], *, alpha: float = DEFAULT_ALPHA,
            min_studies: int = DEFAULT_MIN_STUDIES, outputs: bool = True,
            rows: list[int] | None = None) -> dict:
    """Test every quantity of the scored ``records`` (one window) against ``reference``.
    ``outputs``: whether the reference's outputs describe this model (else only inputs are
    tested). ``rows``: each record's row in results.csv, to name the studies behind an alarm.
    Returns {"n", "too_small", "statistics": {name: {...}}, "alarms": [...]}."""
    scored = [(i, r) for i, r in enumerate(records) if monitored(r)]
    foreign = other_format(reference, [r for _, r in scored])
    stats: dict[str, dict] = {}
    for q in QUANTITIES:
        s = reference["quantities"].get(q.name)
        entry = {"group": q.group, "kind": q.kind, "label": q.label, "test": TESTS[q.kind][0],
                 "effect_name": EFFECT_NAMES[q.kind], "min_effect": q.floor}
        if q.group == "output" and not outputs:
            entry["not_tested"] = "the reference's outputs are of another model (inputs still compared)"
        elif q.group == "acquisition" and foreign:
            entry["not_tested"] = foreign
        elif s is None:
            entry["not_tested"] = "not in the reference"
        else:
            entry.update(TESTS[q.kind][1](written_summary(q, s), [q.as_written(q.value(r)) for _, r in scored]))
        stats[q.name] = entry
    inverted = inverted_count(scored, rows)
    adjusted = holm({n: e["p_value"] for n, e in stats.items() if "p_value" in e} | {INVERTED: inverted["p_value"]})
    too_small = len(scored) < min_studies
    alarms = []
    inverted["p_holm"] = adjusted.pop(INVERTED)
    inverted["alarm"] = bool(inverted["p_holm"] < alpha and inverted["share"] >= INVERTED_LEVEL and not too_small)
    if inverted["alarm"]:
        alarms.append({"quantity": INVERTED, "group": "image", "label": INVERTED_LABEL, "kind": "count",
                       "effect_name": "share", "effect": round(inverted["share"], 4), "shift": inverted["shift"],
                       "p_value": inverted["p_value"], "p_holm": inverted["p_holm"], "test": inverted["test"],
                       "studies": {"n": inverted["count"], "examples": inverted["studies"]}})
    for name, e in stats.items():
        if name not in adjusted:
            continue
        e["p_holm"] = adjusted[name]
        e["significant"] = adjusted[name] < alpha
        e["alarm"] = bool(e["significant"] and e["effect"] >= e["min_effect"] and not too_small)
        if e["alarm"]:
            alarms.append(_alarm(BY_NAME[name], e, reference, scored, rows))
    alarms.sort(key=lambda a: (GROUPS.index(a["group"]), -a["effect"]))
    return {"n": len(scored), "too_small": too_small, "statistics": stats, "looks_inverted": inverted,
            "alarms": alarms}


def inverted_count(scored: list[tuple[int, StudyRecord]], rows: list[int] | None) -> dict:
    """How many of a window's scored studies look inverted, their share, the exact binomial
    p-value of so many if each looked inverted with chance INVERTED_RATE, and the first
    EXAMPLES of them (results.csv row and ``file#<hash>``)."""
    from scipy.stats import binom

    found = [(i, r) for i, r in scored if looks_inverted(r.image_stats)]
    n, k = len(scored), len(found)
    share = k / n if n else 0.0
    studies = [{"study": log_name(r.file), **({"row": rows[i]} if rows is not None else {})}
               for i, r in found[:EXAMPLES]]
    return {"n": n, "count": k, "share": _round(share), "level": INVERTED_LEVEL, "chance_rate": INVERTED_RATE,
            "p_value": float(binom.sf(k - 1, n, INVERTED_RATE)) if k else 1.0,
            "test": f"exact binomial, one-sided, against {INVERTED_RATE:.0%} by chance",
            "shift": f"{k} of {n} studies ({share:.1%}) look inverted", "studies": studies}


def _alarm(q: Quantity, e: dict, reference: dict, scored: list[tuple[int, StudyRecord]],
           rows: list[int] | None) -> dict:
    return {"quantity": q.name, "group": q.group, "label": q.label, "kind": q.kind,
            "effect_name": e["effect_name"], "effect": round(e["effect"], 4), "shift": e["shift"],
            "p_value": e["p_value"], "p_holm": e["p_holm"], "test": e["test"],
            "studies": {"n": e["n_window"], "examples": _examples(q, e, reference, scored, rows)}}


def _examples(q: Quantity, e: dict, reference: dict, scored: list[tuple[int, StudyRecord]],
              rows: list[int] | None) -> list[dict]:
    """The studies of the window that show the shift most: for a continuous quantity the ones
    furthest into the reference's tails, for a category the ones in the category that grew,
    for a proportion the ones on the side that grew. Named by their results.csv row and
    ``file#<hash>`` (no identifiers)."""
    picked = []
    if q.kind == "continuous":
        ref = np.sort(reference_sample(reference["quantities"][q.name]))
        known = [(i, r, v) for i, r in scored if _finite(v := q.value(r))]
        if known:  # furthest into the tails first; equally far: in the window's order (a stable sort)
            tail = np.abs(np.searchsorted(ref, np.array([v for _, _, v in known], dtype=float)) / ref.size - 0.5)
            picked = [known[k] for k in np.argsort(-tail, kind="stable")[:EXAMPLES]]
    elif q.kind == "categorical":
        picked = [(i, r, v) for i, r in scored if str(v := q.value(r)) == e.get("grew")]
    else:
        up = e["window_rate"] >= e["reference_rate"]
        picked = [(i, r, v) for i, r in scored if (v := q.value(r)) is not None and bool(v) == up]
    out = []
    for i, r, v in picked[:EXAMPLES]:
        item = {"study": log_name(r.file), "value": v if not isinstance(v, float) else _round(v)}
        if rows is not None:
            item["row"] = rows[i]
        out.append(item)
    return out

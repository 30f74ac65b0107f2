"""Drift monitoring inside the daemons (watch, and listen and pull, which run the watch daemon's loop).

Every ``drift_every`` scored studies the newest ``drift_window`` studies scored by the current
model (its bundle_sha256, from the ledger) are compared with a reference
(:func:`cxr_batch.drift.compare`): ``drift_reference`` (a bundle or a results folder) when
configured, else the reference the bundle carries, else a site baseline, the first
``drift_window`` studies this model scored here (taken from the ledger, so it survives restarts;
the window then holds only later studies). A new model (another bundle_sha256) therefore starts
a new window and, without a reference, a new baseline.

The outcome goes to ``status.json`` (``drift``: state, reference, window, the alarms in short),
to ``RESULTS_DIR/drift.json`` (every statistic) and, while there are alarms, to one line on the
worklist. Nothing here ever stops or delays scoring: any failure is logged and the daemon goes
on; an evaluation costs tens of milliseconds (about 50 tests on at most ``drift_window``
records).
"""

from __future__ import annotations

import datetime as dt
import json
import logging
from pathlib import Path

from .bundle import BundleError
from .config import ConfigError
from .drift import DriftError, check_reference, compare, make_reference, output_fingerprint, outputs_comparable
from .display import plural
from .files import atomic_write_bytes
from .monitor import Reference, load_reference, reference_too_small

log = logging.getLogger("cxr_batch")
STATUS_ALARMS = 5  # alarms named in status.json (all of them are in drift.json)


class DriftWatch:
    def __init__(self, ledger, bundle, out: Path, *, every: int, window: int, min_studies: int, alpha: float,
                 reference: str | None = None):
        self.ledger, self.out = ledger, Path(out)
        self.every, self.window, self.min_studies, self.alpha = every, window, min_studies, alpha
        self.sha, self.fingerprint = bundle.sha256, output_fingerprint(bundle.manifest)
        self.reference: Reference | None = None
        if reference:
            try:
                self.reference = load_reference(Path(reference))
            except (DriftError, BundleError, OSError, ValueError) as e:  # the daemon does not start: exit 2
                raise ConfigError(f"drift_reference = {reference!r}: {e}") from None
            if small := reference_too_small(self.reference, min_studies, "drift_min_studies"):
                raise ConfigError(f"drift_reference = {reference!r}: {small}")
        elif "reference" in bundle.manifest:
            try:
                data = check_reference(bundle.manifest["reference"], f"{bundle.path}/manifest.json")
                self.reference = Reference(data, "bundle", f"bundle {bundle.label}", bundle.manifest)
            except DriftError as e:
                log.error("drift monitoring: %s; using a site baseline instead", e)
        self.baseline: tuple[int, Reference] | None = None  # (last seq in it, reference), once complete
        self.pending = 0  # scored studies since the last evaluation
        self.state: dict = {"state": "off" if not every else "waiting", "reference": self._reference_kind()}
        self.alarms: list[dict] = []

    def _reference_kind(self) -> str:
        if self.reference is not None:
            return self.reference.source
        return f"site baseline: the first {plural(self.window, 'study')} this model scored here"

    # ------------------------------------------------------------------ evaluation
    def added(self, scored: int) -> None:
        """``scored`` more studies were committed: evaluate once ``drift_every`` have come."""
        if not self.every or not scored:
            return
        self.pending += scored
        if self.pending >= self.every:
            self.evaluate()

    def evaluate(self) -> None:
        """Compare the current window with the reference; never raises."""
        if not self.every:
            return
        self.pending = 0
        try:
            self._evaluate()
        except Exception as e:  # monitoring must never cost a study
            log.error("drift monitoring failed: %s: %s (scoring goes on)", type(e).__name__, e)
            self.state = {**self.state, "state": "error", "reason": f"{type(e).__name__}: {e}"}

    def _reference_now(self) -> tuple[Reference | None, int]:
        """The reference, and the seq after which window studies start (a baseline's last)."""
        if self.reference is not None:
            return self.reference, 0
        if self.baseline is None:
            first = self.ledger.scored_records(self.sha, self.window, newest=False)
            if len(first) < self.window:
                return None, 0
            data = make_reference([r for _, r in first],
                                  f"the first {plural(self.window, 'study')} scored by this model here",
                                  weights_sha256=self.sha)
            self.baseline = (first[-1][0], Reference(data, "baseline", self._reference_kind()))
        return self.baseline[1], self.baseline[0]

    def _evaluate(self) -> None:
        now = dt.datetime.now().astimezone().isoformat(timespec="seconds")
        reference, after = self._reference_now()
        if reference is None:
            have = len(self.ledger.scored_records(self.sha, self.window, newest=False))
            self._set({"state": "waiting",
                       "reason": f"building the site baseline: {have} of {self.window} studies at the last evaluation"},
                      [], now)
            return
        window = [(seq, r) for seq, r in self.ledger.scored_records(self.sha, self.window) if seq > after]
        if len(window) < self.min_studies:
            self._set({"state": "waiting", "reason": f"{len(window)} of the {self.min_studies} studies a window needs "
                                                     "at the last evaluation"}, [], now)
            return
        outputs = outputs_comparable(reference.data, self.sha, self.fingerprint)
        result = compare(reference.data, [r for _, r in window], alpha=self.alpha, min_studies=self.min_studies,
                         outputs=outputs)
        described = {"n": len(window), "first": window[0][1].scored_at, "last": window[-1][1].scored_at}
        for alarm in result["alarms"]:
            alarm["window"] = described
        detail = {"evaluated_at": now, "reference": reference.describe() | {"outputs_compared": outputs},
                  "window": described, "alpha": self.alpha, "min_studies": self.min_studies, **result}
        atomic_write_bytes(self.out / "drift.json", (json.dumps(detail, indent=2) + "\n").encode())
        new = {a["quantity"] for a in result["alarms"]} - {a["quantity"] for a in self.alarms}
        for alarm in result["alarms"]:
            if alarm["quantity"] in new:
                log.warning("drift alarm: %s (%s): %s; %s %.2f over the last %s (scoring goes on)",
                            alarm["label"], alarm["quantity"], alarm["shift"], alarm["effect_name"], alarm["effect"],
                            plural(len(window), "study"))
        if self.alarms and not result["alarms"]:
            log.info("drift: no alarm any more over the last %s", plural(len(window), "study"))
        self._set({"state": "alarm" if result["alarms"] else "ok", "window": described}, result["alarms"], now)

    def _set(self, state: dict, alarms: list[dict], now: str) -> None:
        self.alarms = alarms
        self.state = {**state, "reference": self._reference_kind(), "evaluated_at": now}

    # ------------------------------------------------------------------ reporting
    def status(self) -> dict:
        """For status.json: the state and the alarms in short (drift.json has everything)."""
        out = dict(self.state)
        if self.every:  # the state is that of evaluated_at: say how far the next evaluation is
            out["scored_since_evaluation"] = self.pending
            out["next_evaluation_in"] = max(self.every - self.pending, 0)
        if self.alarms:
            out["alarms"] = [{"quantity": a["quantity"], "group": a["group"], "effect": a["effect"],
                              "shift": a["shift"]} for a in self.alarms[:STATUS_ALARMS]]
            out["alarm_count"] = len(self.alarms)
            out["detail"] = "drift.json"
        return out

    def worklist_line(self) -> str:
        """One line for the worklist while there are alarms, else ''."""
        if not self.alarms:
            return ""
        n = self.state.get("window", {}).get("n", 0)
        named = ", ".join(f"{a['quantity']} ({a['effect_name']} {a['effect']:.2f})" for a in self.alarms[:4])
        more = f" and {len(self.alarms) - 4} more" if len(self.alarms) > 4 else ""
        return (f"DRIFT ALARM: over the last {plural(n, 'study')}, {plural(len(self.alarms), 'quantity')} moved away "
                f"from the reference: "
                f"{named}{more}. Check what changed (detector, export settings, patient mix) before relying on these "
                f"results; scoring goes on. Details: drift.json.")

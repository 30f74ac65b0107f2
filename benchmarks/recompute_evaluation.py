"""Recompute an evaluation.json from its results.csv and NIH labels with scikit-learn/numpy alone
(no cxr_batch code): python benchmarks/recompute_evaluation.py EVAL_DIR LABELS.csv
Prints every number that differs by more than 1e-9 and, per finding, an independent patient
bootstrap interval (2000 resamples) beside the one evaluate wrote."""
import json, sys
import numpy as np, pandas as pd
from sklearn.metrics import roc_auc_score, brier_score_loss
from sklearn.calibration import calibration_curve
F = ["Atelectasis","Cardiomegaly","Effusion","Infiltration","Mass","Nodule","Pneumonia","Pneumothorax",
     "Consolidation","Edema","Emphysema","Fibrosis","Pleural_Thickening","Hernia"]
out, labels = sys.argv[1], sys.argv[2]
ev = json.load(open(f"{out}/evaluation.json"))
res = pd.read_csv(f"{out}/results.csv", dtype=str, keep_default_na=False)
lab = pd.read_csv(labels, dtype=str, keep_default_na=False)
res["name"] = res["file"].map(lambda s: s.split("/")[-1])
d = res.merge(lab, left_on="name", right_on="Image Index", how="inner")
y = np.array([[int(f in s.split("|")) for f in F] for s in d["Finding Labels"]])
p = d[[f"p_{f}" for f in F]].astype(float).to_numpy()
fl = d[[f"flag_{f}" for f in F]].astype(int).to_numpy()
g = d["Patient ID"].to_numpy()
thr = {f: ev["per_finding"][f]["threshold"] for f in F}
rows = []
def cmp(name, mine, theirs):
    if mine is None or theirs is None or (isinstance(mine, float) and np.isnan(mine)):
        ok = (mine is None or (isinstance(mine, float) and np.isnan(mine))) and theirs is None
        rows.append((name, mine, theirs, "match" if ok else "MISMATCH")); return
    diff = abs(mine - theirs)
    rows.append((name, round(mine, 6), round(theirs, 6), "match" if diff < 1e-9 else f"diff {diff:.2g}"))
print("n", len(d), ev["n_studies"], "patients", len(set(g)), ev["n_patients"])
# flags vs p >= threshold
for k, f in enumerate(F):
    recomputed = (p[:, k] >= thr[f]).astype(int)
    differ = recomputed != fl[:, k]
    if differ.any():  # the normal bucket carries no flag (README, buckets): anything else is wrong
        elsewhere = int((differ & (d["priority"].to_numpy() != "normal")).sum())
        print(f"flag != p>=t for {f}: {int(differ.sum())} studies, {elsewhere} outside the normal bucket")
for k, f in enumerate(F):
    e = ev["per_finding"][f]; yy, pp, ff = y[:, k], p[:, k], fl[:, k]
    auc = roc_auc_score(yy, pp) if 0 < yy.sum() < len(yy) else None
    cmp(f"{f} auroc", auc, e["auroc"])
    tp = int(((yy == 1) & (ff == 1)).sum()); fn = int(((yy == 1) & (ff == 0)).sum())
    tn = int(((yy == 0) & (ff == 0)).sum()); fp = int(((yy == 0) & (ff == 1)).sum())
    cmp(f"{f} sens", tp / (tp + fn) if tp + fn else None, e["sensitivity"])
    cmp(f"{f} spec", tn / (tn + fp) if tn + fp else None, e["specificity"])
    cmp(f"{f} ppv", tp / (tp + fp) if tp + fp else None, e["ppv"])
    cmp(f"{f} flag_rate", ff.mean(), e["flag_rate"])
    cmp(f"{f} brier", brier_score_loss(yy, pp) if True else None, e["brier"])
    cmp(f"{f} mean_p", pp.mean(), e["mean_probability"]); cmp(f"{f} prev", yy.mean(), e["prevalence"])
    # ECE per finding with sklearn bins
    edges = np.linspace(0, 1, 16); ids = np.clip(np.digitize(pp, edges[1:-1]), 0, 14)
    ece = sum((ids == b).mean() * abs(yy[ids == b].mean() - pp[ids == b].mean()) for b in range(15) if (ids == b).any())
    cmp(f"{f} ece", ece, e["ece"])
aucs = [roc_auc_score(y[:, k], p[:, k]) for k in range(14) if 0 < y[:, k].sum() < len(y)]
cmp("mean_auroc", float(np.mean(aucs)), ev["mean_auroc"])
cmp("brier pooled", float(np.mean((p - y) ** 2)), ev["brier"])
prev = y.mean(0); cmp("brier_prevalence", float(np.mean((prev - y) ** 2)), ev["brier_prevalence"])
yf, pf = y.ravel(), p.ravel()
prob_true, prob_pred = calibration_curve(yf, pf, n_bins=15, strategy="uniform")
edges = np.linspace(0, 1, 16); ids = np.searchsorted(edges[1:-1], pf, side="right")
cnt = np.bincount(ids, minlength=15); nz = cnt[cnt > 0]
ece = float(np.sum(nz / len(pf) * np.abs(prob_true - prob_pred)))
cmp("ece pooled (sklearn calibration_curve bins)", ece, ev["ece"])
cmp("mean_probability", pf.mean(), ev["mean_probability"]); cmp("prevalence", yf.mean(), ev["prevalence"])
# triage
anyf = y.max(1); rank = d["worklist_rank"].astype(float).to_numpy(); pany = d["p_any"].astype(float).to_numpy()
pr = d["priority"].to_numpy(); t = ev["triage"]
for grp, m in (("all", np.ones(len(d), bool)), ("with_a_finding", anyf == 1), ("without_a_finding", anyf == 0)):
    for b in ("urgent", "abnormal", "normal"):
        cmp(f"bucket {grp} {b}", float((pr[m] == b).mean()) if m.any() else None, t["buckets"][grp][b])
cmp("worklist_auroc_any", roc_auc_score(anyf, -rank), t["worklist_auroc_any_finding"])
cmp("worklist_auroc_ptx", roc_auc_score(y[:, 7], -rank) if 0 < y[:, 7].sum() < len(y) else None, t["worklist_auroc_pneumothorax"])
cmp("p_any_auroc", roc_auc_score(anyf, pany), t["p_any_auroc"])
cmp("studies_flagged", fl.any(1).mean(), t["studies_flagged"]); cmp("flags_per_study", fl.sum(1).mean(), t["flags_per_study"])
# patient cluster bootstrap, independent implementation, per finding
rng = np.random.default_rng(12345); up = np.unique(g)
idx = {u: np.flatnonzero(g == u) for u in up}
for k, f in enumerate(F):
    ci = ev["per_finding"][f]["auroc_ci95"]
    if ci is None: rows.append((f"{f} ci", None, None, "none: " + ev["per_finding"][f]["auroc_ci_note"])); continue
    vals = []
    while len(vals) < 2000:
        pick = np.concatenate([idx[u] for u in rng.choice(up, len(up))])
        if 0 < y[pick, k].sum() < len(pick): vals.append(roc_auc_score(y[pick, k], p[pick, k]))
    lo, hi = np.percentile(vals, [2.5, 97.5])
    rows.append((f"{f} ci", f"[{lo:.3f},{hi:.3f}]", f"[{ci[0]:.3f},{ci[1]:.3f}]", "indep. bootstrap 2000"))
for r in rows: print(*r, sep="\t")

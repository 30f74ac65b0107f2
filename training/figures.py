"""Training figures as PNG files: ROC curves, training curves, example predictions."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no screen
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from sklearn.metrics import roc_auc_score, roc_curve  # noqa: E402

from cxr_batch.findings import FINDINGS  # noqa: E402


def roc_curves(y: np.ndarray, p: np.ndarray, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(7, 7))
    for c, name in enumerate(FINDINGS):
        if len(np.unique(y[:, c])) == 2:
            fpr, tpr, _ = roc_curve(y[:, c], p[:, c])
            ax.plot(fpr, tpr, lw=1, label=f"{name} ({roc_auc_score(y[:, c], p[:, c]):.2f})")
    ax.plot([0, 1], [0, 1], "k--", lw=0.8)
    ax.set(xlabel="false positive rate", ylabel="true positive rate", title="ROC on the test part")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7, loc="lower right")
    else:  # no finding has both labels in the test part: say so on the figure, not with a warning
        ax.text(0.5, 0.5, "no finding has positive and negative test images", ha="center")
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def training_curves(history: list, path: Path) -> None:
    epochs = [h["epoch"] for h in history]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    a.plot(epochs, [h["train_loss"] for h in history], label="train loss")
    a.plot(epochs, [h["val_loss"] for h in history], label="validation loss")
    a.set(xlabel="epoch", title="loss")
    a.legend()
    b.plot(epochs, [h["mean_auc"] for h in history], label="mean AUC")
    b.plot(epochs, [h["f1_macro"] for h in history], label="macro F1 (0.5)")
    b.set(xlabel="epoch", title="validation")
    b.legend()
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def example_predictions(table, dataset, p: np.ndarray, thr: np.ndarray, path: Path, n: int = 8) -> None:
    n = min(n, len(table))
    if n == 0:
        return
    fig, axes = plt.subplots(2, (n + 1) // 2, figsize=(3 * ((n + 1) // 2), 7))
    for k, ax in enumerate(np.ravel(axes)):
        ax.axis("off")
        if k >= n:
            continue
        image = dataset[k][0][0].numpy()
        flagged = [f for f, v, t in zip(FINDINGS, p[k], thr) if v >= t]
        ax.imshow(image, cmap="gray")
        ax.set_title(f"true: {table['labels'].iloc[k][:40]}\npred: {', '.join(flagged)[:40] or 'none'}", fontsize=7)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)

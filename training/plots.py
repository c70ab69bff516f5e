"""PNG figures of the demo: accuracy per method with 95% CIs, and one episode's support/query grid."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch
from torch import Tensor

from training.evaluation import EvalResult


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # headless: the demo runs on servers and in CI
    import matplotlib.pyplot as plt

    return plt


def plot_accuracy(results: Sequence[EvalResult], path: str | Path, title: str = "") -> Path:
    """Bar chart of mean accuracy per method with 95% confidence intervals."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(1.8 + 1.4 * len(results), 3.6))
    names = [r.name for r in results]
    means = [100 * r.mean for r in results]
    cis = [100 * r.ci95 for r in results]
    bars = ax.bar(names, means, yerr=cis, capsize=6, color=["#4C72B0", "#DD8452", "#55A868", "#C44E52"][: len(results)])
    for bar, m, c in zip(bars, means, cis):
        ax.text(bar.get_x() + bar.get_width() / 2, m + c + 1, f"{m:.1f}±{c:.1f}", ha="center", va="bottom", fontsize=8)
    ax.set_ylabel("query accuracy (%)")
    ax.set_ylim(0, min(105, max(m + c for m, c in zip(means, cis)) + 12))
    ax.set_title(title or f"{results[0].episodes} test episodes, 95% CI")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def plot_episode(support_x: Tensor, support_y: Tensor, query_x: Tensor, query_y: Tensor,
                 predictions: dict[str, Tensor], path: str | Path, max_queries: int = 10) -> Path:
    """Grid: the support images (row 1) and queries with each method's predicted label (green right, red wrong)."""
    plt = _pyplot()
    n_sup = support_x.shape[0]
    q_idx = torch.linspace(0, query_x.shape[0] - 1, min(max_queries, query_x.shape[0])).round().long().unique()
    cols = max(n_sup, len(q_idx))
    fig, axes = plt.subplots(2, cols, figsize=(1.25 * cols, 1.25 * 2 + 0.35 * len(predictions)), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for i in range(n_sup):
        axes[0, i].imshow(support_x[i, 0].cpu().numpy(), cmap="gray_r", vmin=0, vmax=1)
        axes[0, i].set_title(f"support {int(support_y[i])}", fontsize=8)
    for j, q in enumerate(q_idx.tolist()):
        ax = axes[1, j]
        ax.imshow(query_x[q, 0].cpu().numpy(), cmap="gray_r", vmin=0, vmax=1)
        truth = int(query_y[q])
        lines = [f"true {truth}"]
        for name, pred in predictions.items():
            lines.append(f"{name[:10]}: {int(pred[q])}")
        ax.set_title("\n".join(lines), fontsize=7)
        wrong = [n for n, p in predictions.items() if int(p[q]) != truth]
        for spine in ax.spines.values():
            spine.set_visible(True)
            spine.set_color("#C44E52" if wrong else "#55A868")
            spine.set_linewidth(2)
        ax.axis("on")
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle("one test episode: support (top), queries with predicted labels (bottom)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)

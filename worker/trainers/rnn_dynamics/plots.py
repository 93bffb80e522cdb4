"""PNGs of the analysis (matplotlib, Agg: no display needed): one PCA picture per model, the distance
matrices, and the clustering picture (MDS embedding and dendrogram, coloured by learning rule)."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from worker.trainers.rnn_dynamics.fixed_points import Condition
from worker.trainers.rnn_dynamics.geometry import classical_mds

RULE_COLOURS = {"bptt": "tab:red", "ga": "tab:green", "ff": "tab:blue"}
MARKERS = {"stable": "o", "saddle": "X", "unstable": "^"}
TRAJECTORIES_DRAWN = 40


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def rule_colour(rule: str) -> str:
    return RULE_COLOURS.get(rule, "tab:gray")


def pca(states: np.ndarray, dims: int = 2) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Mean [H], the top `dims` principal axes [dims, H] and their explained variance ratios of [N, H] states."""
    mean = states.mean(axis=0)
    _, s, vt = np.linalg.svd(states - mean, full_matrices=False)
    ratios = s ** 2 / max(np.sum(s ** 2), 1e-300)
    return mean, vt[:dims], ratios[:dims]


def plot_model(path: Path, title: str, states: np.ndarray, targets: np.ndarray, found: Sequence[Condition]) -> Path:
    """Trial trajectories [T, B, H] in their first two PCs, coloured by the trial's target sign, with each
    condition's fixed points (marker = type) and slow points (small x) projected on the same axes."""
    plt = _pyplot()
    T, B, H = states.shape
    mean, axes, ratios = pca(states.reshape(-1, H))
    project = lambda x: (np.asarray(x) - mean) @ axes.T  # noqa: E731 - one line, used thrice
    fig, ax = plt.subplots(figsize=(7, 6))
    for b in range(min(B, TRAJECTORIES_DRAWN)):
        xy = project(states[:, b])
        colour = "tab:red" if targets[b] > 0 else ("tab:blue" if targets[b] < 0 else "tab:gray")
        ax.plot(xy[:, 0], xy[:, 1], color=colour, alpha=0.25, linewidth=0.8)
    cmap = plt.get_cmap("viridis", max(2, len(found)))
    for c, condition in enumerate(found):
        for point in condition.fixed:
            xy = project(point.state)
            ax.scatter(xy[0], xy[1], marker=MARKERS[point.kind], s=70, color=cmap(c), edgecolors="k",
                       linewidths=0.6, zorder=3)
        if condition.slow:
            xy = project(np.stack([p.state for p in condition.slow]))
            ax.scatter(xy[:, 0], xy[:, 1], marker="x", s=14, color=cmap(c), alpha=0.6, zorder=2)
        ax.scatter([], [], marker="s", color=cmap(c), label=condition.label)
    for kind, marker in MARKERS.items():
        ax.scatter([], [], marker=marker, color="w", edgecolors="k", label=kind)
    ax.set_xlabel(f"PC1 ({100 * ratios[0]:.0f}% var)")
    ax.set_ylabel(f"PC2 ({100 * ratios[1]:.0f}% var)" if len(ratios) > 1 else "PC2")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=7, loc="best", ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_distances(path: Path, matrices: dict[str, np.ndarray], names: Sequence[str]) -> Path:
    """One heatmap per distance (topology, 1 - CKA, 1 - SVCCA), models in the same order on both axes."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(matrices), figsize=(5.2 * len(matrices), 4.8), squeeze=False)
    for ax, (title, distance) in zip(axes[0], matrices.items()):
        image = ax.imshow(distance, cmap="magma")
        ax.set_title(title, fontsize=10)
        ax.set_xticks(range(len(names)), names, rotation=90, fontsize=6)
        ax.set_yticks(range(len(names)), names, fontsize=6)
        fig.colorbar(image, ax=ax, fraction=0.046)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_clusters(path: Path, matrices: dict[str, np.ndarray], names: Sequence[str], rules: Sequence[str]) -> Path:
    """Per distance: a 2-D classical-MDS embedding (top) and an average-linkage dendrogram (bottom), both
    coloured by learning rule, as the seed's MDS plots group BPTT against GA models."""
    from scipy.cluster.hierarchy import dendrogram, linkage
    from scipy.spatial.distance import squareform

    plt = _pyplot()
    columns = len(matrices)
    fig, axes = plt.subplots(2, columns, figsize=(5.2 * columns, 9), squeeze=False)
    for col, (title, distance) in enumerate(matrices.items()):
        coords = classical_mds(distance)
        ax = axes[0][col]
        for rule in dict.fromkeys(rules):
            idx = [i for i, r in enumerate(rules) if r == rule]
            ax.scatter(coords[idx, 0], coords[idx, 1], color=rule_colour(rule), label=rule, s=40)
        ax.set_title(f"{title}: MDS", fontsize=10)
        ax.legend(fontsize=8)
        ax = axes[1][col]
        if len(names) > 1 and not np.any(distance > 0):
            ax.text(0.5, 0.5, "all models at distance 0", ha="center", va="center", transform=ax.transAxes)
        elif len(names) > 1:
            tree = linkage(squareform(distance, checks=False), method="average")
            dendrogram(tree, labels=list(names), ax=ax, leaf_rotation=90, leaf_font_size=6,
                       color_threshold=0, above_threshold_color="k")
            for label in ax.get_xticklabels():
                label.set_color(rule_colour(rules[list(names).index(label.get_text())]))
        ax.set_title(f"{title}: average linkage", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path

"""The report's plots (PNG, matplotlib's Agg backend): metric bars, training curves, caption lengths and the
students x attributes heat map."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from pipeline.attribute_metrics import ATTRIBUTES
from pipeline.results import SEED_ORDER

SHORT_NAMES = {"vgg19_gru": "VGG19\nGRU", "resnet101_gru": "R101\nGRU", "resnet101_attn_gru": "R101 grid\natt-GRU",
               "vit_transformer": "ViT-B/16\nTransf."}


def _figure():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_metric_bars(results: Sequence[dict], path: Path) -> None:
    """Grouped bars: one panel per metric, students on the x axis, one bar per caption source."""
    plt = _figure()
    archs = list(dict.fromkeys(r["arch"] for r in results))
    sources = list(dict.fromkeys(r["source"] for r in results))
    fig, axes = plt.subplots(1, len(SEED_ORDER), figsize=(4.2 * len(SEED_ORDER), 4), constrained_layout=True)
    width = 0.8 / max(1, len(sources))
    for ax, metric in zip(axes, SEED_ORDER):
        for j, source in enumerate(sources):
            values = [next((r["test"].get(metric, 0) for r in results if r["arch"] == a and r["source"] == source), 0)
                      for a in archs]
            ax.bar([i + j * width for i in range(len(archs))], values, width, label=source)
        ax.set_xticks([i + width * (len(sources) - 1) / 2 for i in range(len(archs))])
        ax.set_xticklabels([SHORT_NAMES.get(a, a) for a in archs], fontsize=8)
        ax.set_title(metric)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, title="trained on", loc="outside right center")
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_curves(curves: dict[str, dict], path: Path) -> None:
    """Training loss and validation CIDEr-D against step, one line per student."""
    plt = _figure()
    fig, (loss_ax, val_ax) = plt.subplots(1, 2, figsize=(12, 4.2), constrained_layout=True)
    colours = plt.get_cmap("tab20").colors
    for i, (name, c) in enumerate(sorted(curves.items())):
        colour = colours[i % len(colours)]
        if c.get("train_loss"):
            steps, losses = zip(*c["train_loss"])
            loss_ax.plot(steps, losses, lw=0.8, label=name, color=colour)
        if c.get("val_cider"):
            steps, cider = zip(*c["val_cider"])
            val_ax.plot(steps, cider, marker="o", ms=3, label=name, color=colour)
    loss_ax.set(title="training loss (masked cross-entropy)", xlabel="step", yscale="log")
    val_ax.set(title="validation CIDEr-D", xlabel="step")
    val_ax.legend(fontsize=6, ncol=2)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_length_histograms(lengths: dict[str, list[int]], path: Path) -> None:
    plt = _figure()
    fig, ax = plt.subplots(figsize=(7, 4), constrained_layout=True)
    top = max((max(v) for v in lengths.values() if v), default=1)
    bins = range(0, top + 5, 2)
    for source, values in lengths.items():
        ax.hist(values, bins=bins, alpha=0.5, label=f"{source} (mean {sum(values) / max(1, len(values)):.1f})")
    ax.set(title="caption length per source (training captions)", xlabel="words", ylabel="captions")
    ax.legend()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_attribute_heatmap(labels: Sequence[str], values: Sequence[Sequence[float]], path: Path) -> None:
    """Rows (students, then the majority baseline) x attributes, accuracy as colour and as a number in each cell."""
    plt = _figure()
    columns = list(ATTRIBUTES.values())
    fig, ax = plt.subplots(figsize=(0.62 * len(columns) + 3.5, 0.42 * len(labels) + 1.8), constrained_layout=True)
    image = ax.imshow(values, cmap="RdYlGn", vmin=0.0, vmax=1.0, aspect="auto")
    ax.set_xticks(range(len(columns)), columns, rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(len(labels)), labels, fontsize=8)
    for i, row in enumerate(values):
        for j, v in enumerate(row):
            ax.text(j, i, f"{100 * v:.0f}", ha="center", va="center", fontsize=7)
    ax.set_title("attribute accuracy on the ground-truth test split (%)")
    fig.colorbar(image, ax=ax, shrink=0.8)
    fig.savefig(path, dpi=110)
    plt.close(fig)

"""The report's plots (PNG, matplotlib's Agg backend): metric bars, training curves, caption lengths, the
students x attributes heat map and quality against CPU throughput."""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path

from pipeline.core.archs import short_name
from pipeline.core.rundir import atomic_write_bytes
from pipeline.evaluation.attributes import ATTRIBUTES
from pipeline.evaluation.results import COURSE_METRICS


def _figure():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> None:
    """``fig`` as the image file ``path`` (format from its suffix), written atomically like every other output."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format=Path(path).suffix[1:], dpi=110)
    atomic_write_bytes(path, buffer.getvalue())


def plot_metric_bars(results: Sequence[dict], path: Path) -> None:
    """Grouped bars: one panel per metric, students on the x axis, one bar per caption source."""
    plt = _figure()
    archs = list(dict.fromkeys(r["arch"] for r in results))
    sources = list(dict.fromkeys(r["source"] for r in results))
    fig, axes = plt.subplots(1, len(COURSE_METRICS), figsize=(4.2 * len(COURSE_METRICS), 4), constrained_layout=True)
    width = 0.8 / max(1, len(sources))
    for ax, metric in zip(axes, COURSE_METRICS):
        for j, source in enumerate(sources):
            values = [next((r["test"].get(metric, 0) for r in results if r["arch"] == a and r["source"] == source), 0)
                      for a in archs]
            ax.bar([i + j * width for i in range(len(archs))], values, width, label=source)
        ax.set_xticks([i + width * (len(sources) - 1) / 2 for i in range(len(archs))])
        ax.set_xticklabels([short_name(a) for a in archs], fontsize=8)
        ax.set_title(metric)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, title="trained on", loc="outside right center")
    _save(fig, path)
    plt.close(fig)


def plot_curves(curves: dict[str, dict], path: Path) -> None:
    """Training loss, validation CIDEr-D and validation attribute accuracy against step, one line per student."""
    plt = _figure()
    fig, (loss_ax, cider_ax, attr_ax) = plt.subplots(1, 3, figsize=(16, 4.2), constrained_layout=True)
    colours = plt.get_cmap("tab20").colors
    for i, (name, c) in enumerate(sorted(curves.items())):
        colour = colours[i % len(colours)]
        if c.get("train_loss"):
            steps, losses = zip(*c["train_loss"])
            loss_ax.plot(steps, losses, lw=0.8, label=name, color=colour)
        for ax, key in ((cider_ax, "val_cider"), (attr_ax, "val_attributes")):
            if c.get(key):
                steps, values = zip(*c[key])
                ax.plot(steps, values, marker="o", ms=3, label=name, color=colour)
    loss_ax.set(title="training loss (masked cross-entropy)", xlabel="step", yscale="log")
    cider_ax.set(title="validation CIDEr-D", xlabel="step")
    attr_ax.set(title="validation attribute accuracy (macro)", xlabel="step")
    attr_ax.legend(fontsize=6, ncol=2)
    _save(fig, path)
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
    _save(fig, path)
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
    _save(fig, path)
    plt.close(fig)


def plot_speed_quality(records: Sequence[dict], batch_size: int, path: Path) -> None:
    """Attribute accuracy and CIDEr-D against CPU images/s at ``batch_size`` (log x) for the records of
    :func:`pipeline.reporting.tables.speed_records`: one point per model and runtime (PyTorch a circle, onnxruntime a
    square, joined by a line), the teacher a black star; the legend names the models by colour."""
    plt = _figure()
    from matplotlib.lines import Line2D
    from matplotlib.ticker import LogFormatter

    markers = {"torch": "o", "onnx": "s"}
    colours = plt.get_cmap("tab20").colors
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.8), constrained_layout=True)
    handles = [Line2D([], [], color="grey", marker=markers["torch"], ls="", label="PyTorch"),
               Line2D([], [], color="grey", marker=markers["onnx"], ls="", label="onnxruntime")]
    for i, r in enumerate(records):
        colour = "black" if r["teacher"] else colours[i % len(colours)]
        label = r["label"] if r["teacher"] else f"{short_name(r['arch'])} ← {r['source']}"
        handles.append(Line2D([], [], color=colour, marker="*" if r["teacher"] else "o", ms=10 if r["teacher"] else 6,
                              label=label.replace("\n", " ")))
        points = sorted((rates[str(batch_size)], runtime) for runtime, rates in r["images_per_s"].items())
        for ax, metric in zip(axes, ("attributes", "CIDEr-D")):
            if r[metric] is None:
                continue
            ax.plot([x for x, _ in points], [r[metric]] * len(points), color=colour, lw=0.8)
            for x, runtime in points:
                ax.scatter(x, r[metric], color=colour, marker="*" if r["teacher"] else markers[runtime],
                           s=180 if r["teacher"] else 40, zorder=3)
    for ax, metric in zip(axes, ("attribute accuracy", "CIDEr-D")):
        ax.set(xscale="log", xlabel=f"CPU images/s at batch {batch_size} (log scale)", ylabel=metric,
               title=f"{metric} on the test split vs throughput")
        ax.margins(x=0.15, y=0.15)
        ax.xaxis.set_major_formatter(LogFormatter())  # plain numbers: 20, 30, 50 rather than 2x10^1
        ax.xaxis.set_minor_formatter(LogFormatter(labelOnlyBase=False, minor_thresholds=(2, 0.4)))
    fig.legend(handles=handles, fontsize=8, loc="outside right center")
    _save(fig, path)
    plt.close(fig)


SWEEP_MARKERS = {"samples": "^", "unlabeled": "D"}  # the points at the best temperature


def plot_sweep(records: Sequence[dict], best: dict, path: Path) -> None:
    """Against the teacher's temperature: the student's attribute accuracy and CIDEr-D on validation and test (the
    ground-truth student dashed; the points at the best temperature as markers: k samples per image a triangle, the
    unlabelled images a diamond), and the teacher dataset's distinct-2, mean length and agreement with the ground
    truth (the ground truth's own captions dashed); the chosen temperature dotted."""
    plt = _figure()
    fig, axes = plt.subplot_mosaic([["attributes"] * 3 + ["CIDEr-D"] * 3,
                                    ["distinct_2"] * 2 + ["length_mean"] * 2 + ["agreement"] * 2],
                                   figsize=(13, 8), constrained_layout=True)
    curve = sorted((r for r in records if r["kind"] == "temperature"), key=lambda r: r["temperature"])
    temps = [r["temperature"] for r in curve]
    gt = next((r for r in records if r["kind"] == "gt"), None)
    splits = {"val": ("validation", "tab:blue"), "test": ("test", "tab:orange")}
    for metric in ("attributes", "CIDEr-D"):
        ax = axes[metric]
        for split, (name, colour) in splits.items():
            ax.plot(temps, [r[split][metric] for r in curve], marker="o", color=colour, label=name)
            if gt:
                ax.axhline(gt[split][metric], color=colour, ls="--", lw=0.9,
                           label=f"trained on ground truth ({name})")
            for r in records:
                if r["kind"] in SWEEP_MARKERS:
                    ax.scatter(r["temperature"], r[split][metric], marker=SWEEP_MARKERS[r["kind"]], s=60,
                               color=colour, edgecolor="black", zorder=3, label=f"{r['source']} ({name})")
        ax.set(title=f"student {metric} ({best['student']})", xlabel="teacher temperature T",
               ylabel="attribute accuracy (macro)" if metric == "attributes" else metric)
        ax.legend(fontsize=7)
    teacher_panels = {"distinct_2": "distinct-2 of the training captions",
                      "length_mean": "mean caption length (words)"}
    for key, title in teacher_panels.items():
        ax = axes[key]
        ax.plot(temps, [r["teacher"][key] for r in curve], marker="o", color="tab:green", label="teacher")
        if gt:
            ax.axhline(gt["teacher"][key], color="grey", ls="--", lw=0.9, label="ground truth")
        ax.set(title=title, xlabel="teacher temperature T")
        ax.legend(fontsize=7)
    ax = axes["agreement"]
    for metric, colour in (("attributes", "tab:purple"), ("CIDEr-D", "tab:brown"), ("BLEU-4", "tab:grey")):
        ax.plot(temps, [r["teacher"]["vs_ground_truth"][metric] for r in curve], marker="o", color=colour,
                label=metric)
    ax.set(title="teacher vs ground truth (train+val images)", xlabel="teacher temperature T")
    ax.legend(fontsize=7)
    for ax in axes.values():
        ax.axvline(best["temperature"], color="black", ls=":", lw=1)
    fig.suptitle(f"temperature sweep: chosen T={best['temperature']:g} ({best['select_on']})")
    _save(fig, path)
    plt.close(fig)

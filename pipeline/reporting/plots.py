"""The report's plots (PNG, matplotlib's Agg backend): metric bars with the teacher and the majority baseline,
training curves per caption source, caption lengths, the attributes heat map and quality against CPU throughput."""

from __future__ import annotations

import io
import math
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


TEACHER_STYLE = {"color": "black", "ls": "--", "lw": 1.2}
MAJORITY_STYLE = {"color": "tab:red", "ls": ":", "lw": 1.2}


def _metric(r: dict, metric: str) -> float:
    return r.get("attributes", {}).get("macro", 0) if metric == "attributes" else r["test"].get(metric, 0)


def plot_metric_bars(results: Sequence[dict], path: Path, teacher: dict | None = None,
                     majority: float | None = None) -> None:
    """Grouped bars: one panel per metric (the n-gram metrics and attribute accuracy), students on the x axis, one
    bar per caption source; the teacher's test figures (``teacher``: :func:`~pipeline.reporting.tables.
    reference_teacher`) dashed and the majority baseline's attribute accuracy dotted across their panels."""
    plt = _figure()
    archs = list(dict.fromkeys(r["arch"] for r in results))
    sources = list(dict.fromkeys(r["source"] for r in results))
    metrics = (*COURSE_METRICS, "attributes")
    fig, axes = plt.subplots(1, len(metrics), figsize=(4.2 * len(metrics), 4), constrained_layout=True)
    width = 0.8 / max(1, len(sources))
    for ax, metric in zip(axes, metrics):
        for j, source in enumerate(sources):
            values = [next((_metric(r, metric) for r in results if r["arch"] == a and r["source"] == source), 0)
                      for a in archs]
            ax.bar([i + j * width for i in range(len(archs))], values, width, label=source)
        known = teacher and (teacher["attributes"] if metric == "attributes" else teacher["test"].get(metric))
        if known is not None and teacher:
            ax.axhline(known, **TEACHER_STYLE, label=f"teacher ({teacher['dataset']} captions)")
        if metric == "attributes" and majority is not None:
            ax.axhline(majority, **MAJORITY_STYLE, label="majority baseline")
        ax.set_xticks([i + width * (len(sources) - 1) / 2 for i in range(len(archs))])
        ax.set_xticklabels([short_name(a) for a in archs], fontsize=8)
        ax.set_title("attribute accuracy (macro)" if metric == "attributes" else metric)
    handles, labels = axes[-1].get_legend_handles_labels()
    fig.legend(handles, labels, title="trained on", loc="outside right center")
    _save(fig, path)
    plt.close(fig)


def epoch_points(points: Sequence[Sequence[float]], steps_per_epoch: float) -> tuple[list[float], list[float]]:
    return [step / steps_per_epoch for step, _ in points], [value for _, value in points]


def epoch_means(points: Sequence[Sequence[float]], steps_per_epoch: float) -> tuple[list[int], list[float]]:
    """The mean of per-step values over each epoch (epoch e: steps in ((e-1)·n, e·n])."""
    sums: dict[int, list[float]] = {}
    for step, value in points:
        sums.setdefault(max(1, math.ceil(step / steps_per_epoch - 1e-9)), []).append(value)
    return list(sums), [sum(v) / len(v) for v in sums.values()]


def plot_curves(curves: dict[tuple[str, str], dict], path: Path) -> None:
    """One column per caption source, epochs on the x axis: the training loss (mean of each epoch), validation
    attribute accuracy and validation CIDEr-D, one line per architecture (the same colour in every panel).
    ``curves``: (arch, source) -> the student's ``curves.json`` plus ``steps_per_epoch``."""
    plt = _figure()
    from matplotlib.ticker import MaxNLocator
    sources = list(dict.fromkeys(source for _, source in curves))
    archs = list(dict.fromkeys(arch for arch, _ in curves))
    colours = plt.get_cmap("tab10").colors
    rows = (("train_loss", "training loss (epoch mean)"), ("val_attributes", "validation attribute accuracy"),
            ("val_cider", "validation CIDEr-D"))
    fig, axes = plt.subplots(len(rows), len(sources), figsize=(4.6 * len(sources) + 1.5, 9), squeeze=False,
                             sharex="col", sharey="row", constrained_layout=True)
    for (arch, source), c in curves.items():
        col, colour = sources.index(source), colours[archs.index(arch) % len(colours)]
        for row, (key, _) in enumerate(rows):
            if not c.get(key):
                continue
            if key == "train_loss":
                x, y = epoch_means(c[key], c["steps_per_epoch"])
            else:
                x, y = epoch_points(c[key], c["steps_per_epoch"])
            axes[row][col].plot(x, y, marker="o", ms=3, color=colour, label=short_name(arch).replace("\n", " "))
    for col, source in enumerate(sources):
        axes[0][col].set_title(f"trained on {source}")
        axes[-1][col].set_xlabel("epoch")
        axes[0][col].set_yscale("log")
    for row, (_, label) in enumerate(rows):
        axes[row][0].set_ylabel(label)
    for ax in axes[-1]:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    lines = {line.get_label(): line for ax in axes[0] for line in ax.get_lines()}  # every architecture once
    fig.legend(list(lines.values()), list(lines), loc="outside right center", fontsize=8)
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


def colour_floor(majority: float | None) -> float:
    """Where the heat map's colour scale starts: just below the majority baseline's macro accuracy (on a 0.05 grid),
    so that the differences above what ignoring the image gives show; 0 without a baseline."""
    return 0.0 if majority is None else max(0.0, math.floor((majority - 0.05) * 20) / 20)


def plot_attribute_heatmap(labels: Sequence[str], values: Sequence[Sequence[float]], path: Path, *,
                           floor: float = 0.0) -> None:
    """Rows (the teacher, students, the majority baseline) x attributes and their macro mean, accuracy as colour
    (from ``floor``: lower values all show as the lowest colour) and as a number in each cell."""
    plt = _figure()
    columns = [*ATTRIBUTES.values(), "macro"]
    table = [[*row, sum(row) / len(row)] for row in values]
    fig, ax = plt.subplots(figsize=(0.62 * len(columns) + 3.5, 0.42 * len(labels) + 1.8), constrained_layout=True)
    image = ax.imshow(table, cmap="RdYlGn", vmin=floor, vmax=1.0, aspect="auto")
    ax.axvline(len(columns) - 1.5, color="black", lw=1.5)  # the macro column apart
    ax.set_xticks(range(len(columns)), columns, rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(len(labels)), labels, fontsize=8)
    for i, row in enumerate(table):
        for j, v in enumerate(row):
            ax.text(j, i, f"{100 * v:.0f}", ha="center", va="center", fontsize=7,
                    fontweight="bold" if j == len(columns) - 1 else "normal")
    ax.set_title(f"attribute accuracy on the ground-truth test split (%); colours from {100 * floor:.0f}%")
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

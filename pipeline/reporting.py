"""Results tables (markdown + CSV), plots (PNG) and the sample gallery (one self-contained HTML page)."""

from __future__ import annotations

import base64
import csv
import html
import io
from collections.abc import Sequence
from pathlib import Path
from typing import Any

SEED_ORDER = ("BLEU-4", "CIDEr-D", "METEOR", "ROUGE-L")  # the course reports' column order
ARCH_NAMES = {"vgg19_gru": "VGG19 + GRU", "resnet101_gru": "ResNet-101 global + GRU",
              "resnet101_attn_gru": "ResNet-101 grid + attention GRU", "vit_transformer": "ViT-B/16 + Transformer"}

SHORT_NAMES = {"vgg19_gru": "VGG19\nGRU", "resnet101_gru": "R101\nGRU", "resnet101_attn_gru": "R101 grid\natt-GRU",
               "vit_transformer": "ViT-B/16\nTransf."}


def _fmt(value: Any) -> str:
    if value is None:
        return "—"
    return f"{value:.3f}" if isinstance(value, float) else str(value)


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def csv_text(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    buf = io.StringIO()
    csv.writer(buf).writerows([header, *rows])
    return buf.getvalue()


def student_rows(results: Sequence[dict], baselines: dict[str, dict]) -> list[list[Any]]:
    """One row per student x source (plus the constant baseline of each source), seed column order."""
    rows = [[ARCH_NAMES.get(r["arch"], r["arch"]), r["source"], *(r["test"].get(m) for m in SEED_ORDER)]
            for r in results]
    rows += [["constant caption (baseline)", s, *(b["test"].get(m) for m in SEED_ORDER)] for s, b in baselines.items()]
    return rows


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


def _image_data_uri(path: str, size: int = 192) -> str:
    from pipeline.data.images import load_rgb

    im = load_rgb(path)
    im.thumbnail((size, size))
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=88)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()


def gallery_html(samples: Sequence[dict], title: str) -> str:
    """A self-contained page: each sample has ``image_path``, ``image_id`` and ``captions`` (label -> text)."""
    cards = []
    for s in samples:
        items = "".join(f"<dt>{html.escape(label)}</dt><dd>{html.escape(text or '—')}</dd>"
                        for label, text in s["captions"].items())
        image = f'<img src="{_image_data_uri(s["image_path"])}" alt="{html.escape(s["image_id"])}">'
        cards.append(f'<section class="card">{image}'
                     f'<div><h2>{html.escape(s["image_id"])}</h2><dl>{items}</dl></div></section>')
    style = ("body{font-family:system-ui,sans-serif;margin:2em;background:#fafafa}"
             ".card{display:flex;gap:1.5em;background:#fff;border:1px solid #ddd;border-radius:8px;padding:1em;"
             "margin-bottom:1em}.card img{width:192px;height:192px;object-fit:contain;image-rendering:pixelated}"
             "h2{font-size:1em;margin:0 0 .5em}dt{font-weight:600;font-size:.85em;color:#555}"
             "dd{margin:0 0 .6em 0;font-size:.9em}")
    return (f"<!doctype html><html lang=en><head><meta charset=utf-8><title>{html.escape(title)}</title>"
            f"<style>{style}</style></head><body><h1>{html.escape(title)}</h1>{''.join(cards)}</body></html>\n")

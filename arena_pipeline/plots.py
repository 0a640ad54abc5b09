"""Plots a person would rather look at than numbers: PNG files for MLflow, inline images for Dagster."""

from __future__ import annotations

import base64
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

import dagster as dg  # noqa: E402

CLASSES = ("A wins", "B wins", "tie")


def _save(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def as_metadata(path: Path, url: str | None = None) -> dg.MetadataValue:
    """A PNG as Dagster asset metadata.

    With ``url`` (where the image is served, e.g. the MLflow server's artifact URL) a short Markdown image,
    which the Dagster UI (1.13: no image metadata type) draws inline on the asset page: it renders Markdown
    values under 1,000 characters in place and longer ones behind a "[Show Markdown]" link. Without one the
    PNG is embedded as a data URI (always shown, but only behind that link).
    """
    if url:
        return dg.MetadataValue.md(f"![{Path(path).stem}]({url})")
    data = base64.b64encode(Path(path).read_bytes()).decode()
    return dg.MetadataValue.md(f"![{Path(path).stem}](data:image/png;base64,{data})")


def length_histogram(lengths: dict[str, np.ndarray], path: Path, title: str = "text length (characters)") -> Path:
    fig, ax = plt.subplots(figsize=(6, 3.2))
    for name, values in lengths.items():
        ax.hist(np.log10(np.maximum(values, 1)), bins=40, alpha=0.55, label=name)
    ax.set_xlabel("log10 characters (prompt + both responses)")
    ax.set_ylabel("rows")
    ax.set_title(title)
    ax.legend(fontsize=8)
    return _save(fig, path)


def confusion_matrix(y: np.ndarray, probs: np.ndarray, path: Path, title: str = "confusion matrix") -> Path:
    matrix = np.zeros((3, 3), dtype=int)
    for truth, pred in zip(y, probs.argmax(axis=1)):
        matrix[int(truth), int(pred)] += 1
    fig, ax = plt.subplots(figsize=(3.8, 3.4))
    ax.imshow(matrix, cmap="Blues")
    for i in range(3):
        for j in range(3):
            ax.text(j, i, str(matrix[i, j]), ha="center", va="center")
    ax.set_xticks(range(3), CLASSES)
    ax.set_yticks(range(3), CLASSES)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    return _save(fig, path)


def reliability_table(y: np.ndarray, probs: np.ndarray, n_bins: int = 10) -> list[dict]:
    """Per confidence bin (max probability): rows, mean confidence, accuracy."""
    conf = probs.max(axis=1)
    correct = probs.argmax(axis=1) == y
    edges = np.linspace(1 / 3, 1, n_bins + 1)
    rows = []
    for lo, hi in zip(edges[:-1], edges[1:]):
        mask = (conf >= lo) & ((conf < hi) | (hi == 1))
        if mask.any():
            rows.append({"bin": f"{lo:.2f}-{hi:.2f}", "rows": int(mask.sum()),
                         "confidence": float(conf[mask].mean()), "accuracy": float(correct[mask].mean())})
    return rows


def reliability_diagram(y: np.ndarray, probs: np.ndarray, path: Path, title: str = "reliability") -> Path:
    rows = reliability_table(y, probs)
    fig, ax = plt.subplots(figsize=(3.8, 3.4))
    ax.plot([1 / 3, 1], [1 / 3, 1], "--", color="grey", label="perfect")
    ax.plot([r["confidence"] for r in rows], [r["accuracy"] for r in rows], "o-", label="model")
    ax.set_xlabel("confidence (max probability)")
    ax.set_ylabel("accuracy")
    ax.set_title(title)
    ax.legend(fontsize=8)
    return _save(fig, path)


def bar_chart(values: dict[str, float], path: Path, title: str, xlabel: str) -> Path:
    names = list(values)
    fig, ax = plt.subplots(figsize=(6, 0.4 * len(names) + 1.2))
    ax.barh(names, [values[n] for n in names], color="tab:blue")
    for i, name in enumerate(names):
        ax.text(values[name], i, f" {values[name]:.4f}", va="center", fontsize=8)
    ax.set_xlabel(xlabel)
    ax.set_title(title)
    return _save(fig, path)


def entropy_histogram(probs: np.ndarray, path: Path, title: str = "pseudo-label entropy") -> Path:
    p = np.clip(probs, 1e-12, 1)
    entropy = -(p * np.log(p)).sum(axis=1)
    fig, ax = plt.subplots(figsize=(5, 3))
    ax.hist(entropy, bins=30, range=(0, np.log(3)))
    ax.set_xlabel("entropy (nats; ln 3 = uniform)")
    ax.set_ylabel("pairs")
    ax.set_title(title)
    return _save(fig, path)

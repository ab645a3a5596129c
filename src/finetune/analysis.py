"""Error analysis of a classifier from its logits: per-class metrics, calibration, figures and `eval.md`.

Everything here takes logits (or probabilities) and labels, not a model or a Trainer, so it runs on what
an evaluation loop gathered. The metrics come from torchmetrics; figures are built without pyplot (Agg
canvas, as in `finetune.report`), so this runs headless.
"""

from __future__ import annotations

import csv
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from matplotlib.figure import Figure
from PIL import Image
from torch import nn
from torchmetrics.functional.classification import (
    multiclass_accuracy,
    multiclass_calibration_error,
    multiclass_confusion_matrix,
    multiclass_f1_score,
    multiclass_precision,
    multiclass_recall,
)

from finetune.data.images import read_rgb
from finetune.errors import ConfigError
from finetune.report import markdown_table

TTA_MODES = ("none", "flip")
ANNOTATE_UP_TO = 25  # classes; beyond that a confusion matrix's cells are too small for numbers


@dataclass(frozen=True)
class ReliabilityBins:
    """Top-1 confidence against accuracy in equal-width bins (what a reliability diagram draws).

    Bin k holds confidences in [edges[k], edges[k+1]), the last bin also 1.0; empty bins have NaN means.
    """

    edges: list[float]
    confidence: list[float]
    accuracy: list[float]
    count: list[int]


@dataclass(frozen=True)
class ClassificationMetrics:
    """Per-class lists are in label order (`classes`); `confusion[true][predicted]` counts images."""

    classes: list[str]
    precision: list[float]
    recall: list[float]
    f1: list[float]
    support: list[int]
    accuracy: float
    macro_f1: float
    balanced_accuracy: float
    ece: float
    confusion: list[list[int]]
    reliability: ReliabilityBins


def _check(scores: torch.Tensor, labels: torch.Tensor, classes: Sequence[str] | None = None) -> None:
    if scores.ndim != 2 or labels.shape != scores.shape[:1] or len(labels) == 0:
        raise ValueError(
            f"expected scores (N, C) and labels (N,) with N > 0, got {tuple(scores.shape)} and {tuple(labels.shape)}"
        )
    if classes is not None and len(classes) != scores.shape[1]:
        raise ValueError(f"{len(classes)} class names for {scores.shape[1]} columns of scores")


def expected_calibration_error(probs: torch.Tensor, labels: torch.Tensor, bins: int = 15) -> float:
    """ECE (l1): the gap between top-1 confidence and accuracy, averaged over equal-width bins by their count."""
    _check(probs, labels)
    return float(multiclass_calibration_error(probs, labels, probs.shape[1], n_bins=bins, norm="l1"))


def reliability_bins(probs: torch.Tensor, labels: torch.Tensor, bins: int = 15) -> ReliabilityBins:
    """Per-bin mean confidence, accuracy and count of the top-1 predictions, binned as torchmetrics' ECE bins them
    (but for a confidence of exactly 1.0, which torchmetrics puts into a bin of its own, here into the last)."""
    _check(probs, labels)
    confidence, predicted = probs.double().max(dim=1)
    correct = (predicted == labels.to(predicted.device)).double()
    edges = torch.linspace(0, 1, bins + 1, dtype=torch.float64, device=probs.device)
    index = (torch.bucketize(confidence, edges, right=True) - 1).clamp(0, bins - 1)
    count = torch.bincount(index, minlength=bins)

    def mean(values: torch.Tensor) -> list[float]:  # NaN in empty bins
        return (torch.bincount(index, weights=values, minlength=bins) / count).tolist()

    return ReliabilityBins(edges.tolist(), mean(confidence), mean(correct), count.tolist())


def classification_metrics(
    logits: torch.Tensor, labels: torch.Tensor, classes: Sequence[str], bins: int = 15
) -> ClassificationMetrics:
    """Per-class precision, recall, F1 and support; accuracy, macro-F1, balanced accuracy (the mean recall);
    ECE and reliability bins of softmax(logits). A class never predicted has precision 0."""
    _check(logits, labels, classes)
    num = len(classes)
    labels = labels.to(logits.device)
    confusion = multiclass_confusion_matrix(logits, labels, num)
    probs = logits.float().softmax(dim=1)
    return ClassificationMetrics(
        classes=list(classes),
        precision=multiclass_precision(logits, labels, num, average=None).tolist(),
        recall=multiclass_recall(logits, labels, num, average=None).tolist(),
        f1=multiclass_f1_score(logits, labels, num, average=None).tolist(),
        support=confusion.sum(dim=1).tolist(),
        accuracy=float(multiclass_accuracy(logits, labels, num, average="micro")),
        macro_f1=float(multiclass_f1_score(logits, labels, num, average="macro")),
        balanced_accuracy=float(multiclass_recall(logits, labels, num, average="macro")),
        ece=expected_calibration_error(probs, labels, bins),
        confusion=confusion.tolist(),
        reliability=reliability_bins(probs, labels, bins),
    )


def fit_temperature(logits: torch.Tensor, labels: torch.Tensor, max_iter: int = 100) -> float:
    """Temperature scaling (Guo et al. 2017): the T minimising the NLL of softmax(logits / T) on held-out
    (validation) logits. LBFGS on log T in float64 on the CPU, from T = 1: deterministic and T stays positive.
    T > 1 softens an over-confident model; the ranking of classes, so accuracy, never changes."""
    _check(logits, labels)
    with torch.inference_mode(False), torch.enable_grad():  # callers often sit in inference_mode or no_grad
        # copies: tensors made in inference mode cannot be saved for backward
        logits, labels = logits.detach().to("cpu", torch.float64, copy=True), labels.detach().to("cpu", copy=True)
        log_t = torch.zeros((), dtype=torch.float64, requires_grad=True)
        optimizer = torch.optim.LBFGS([log_t], lr=1.0, max_iter=max_iter, line_search_fn="strong_wolfe")

        def nll() -> torch.Tensor:
            optimizer.zero_grad()
            loss = F.cross_entropy(logits / log_t.exp(), labels)
            loss.backward()
            return loss

        optimizer.step(nll)
    return float(log_t.detach().exp())


def softmax_probs(model: nn.Module, images: torch.Tensor, temperature: float = 1.0, tta: str = "none") -> torch.Tensor:
    """softmax(model(images) / temperature); with `tta="flip"` the mean of that over the batch and its
    horizontal flip (one forward pass of both views). Runs the model as it is: put it in eval mode first."""
    if tta not in TTA_MODES:
        raise ConfigError(f"tta: unknown mode '{tta}', expected one of {', '.join(TTA_MODES)}")
    views = images if tta == "none" else torch.cat([images, images.flip(-1)])
    probs = (model(views).float() / temperature).softmax(dim=1)
    return probs.unflatten(0, (-1, len(images))).mean(dim=0)


def most_confident_errors(probs: torch.Tensor, labels: torch.Tensor, k: int) -> list[int]:
    """Indices of up to `k` wrong predictions, the most confident (highest top-1 probability) first."""
    _check(probs, labels)
    confidence, predicted = probs.max(dim=1)
    wrong = (predicted != labels.to(predicted.device)).nonzero().flatten()
    order = confidence[wrong].argsort(descending=True, stable=True)
    return wrong[order][:k].tolist()


def plot_confusion_matrix(confusion: Sequence[Sequence[int]], classes: Sequence[str]) -> Figure:
    """Counts and row-normalised (recall per true class) side by side, class names on both axes."""
    counts = np.asarray(confusion, dtype=np.int64)
    rows = counts.sum(axis=1, keepdims=True)
    normalised = np.divide(counts, rows, out=np.zeros(counts.shape), where=rows > 0)
    side = max(4.0, 0.45 * len(classes) + 2)
    fig = Figure(figsize=(2 * side + 1, side), layout="constrained")
    for ax, values, title, text in zip(
        fig.subplots(1, 2),
        (counts, normalised),
        ("counts", "row-normalised (recall)"),
        (str, lambda v: f"{v:.2f}"),
        strict=True,
    ):
        image = ax.imshow(values, cmap="Blues", vmin=0)
        fig.colorbar(image, ax=ax, shrink=0.8)
        ticks = range(len(classes))
        ax.set_xticks(ticks, classes, rotation=45, ha="right", fontsize="small")
        ax.set_yticks(ticks, classes, fontsize="small")
        ax.set(title=title, xlabel="predicted", ylabel="true")
        if len(classes) <= ANNOTATE_UP_TO:
            light = values.max() / 2
            for (i, j), value in np.ndenumerate(values):
                color = "white" if value > light else "black"
                ax.text(j, i, text(value), ha="center", va="center", color=color, fontsize="small")
    return fig


def write_confusion_csv(confusion: Sequence[Sequence[int]], classes: Sequence[str], path: str | os.PathLike) -> None:
    """Counts, one row per true class, one column per predicted class."""
    with open(path, "w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(["true \\ predicted", *classes])
        writer.writerows([name, *row] for name, row in zip(classes, confusion, strict=True))


def _thumbnail(image: Image.Image | str | os.PathLike, size: int = 256) -> Image.Image:
    image = image.convert("RGB") if isinstance(image, Image.Image) else read_rgb(image)
    image.thumbnail((size, size))  # in place, keeps the aspect ratio
    return image


def plot_top_errors(
    images: Sequence[Image.Image | str | os.PathLike],
    probs: torch.Tensor,
    labels: torch.Tensor,
    classes: Sequence[str],
    k: int = 9,
) -> Figure | None:
    """The `k` most confidently wrong images in a grid, each titled true / predicted (probability), as fastai's
    `plot_top_losses`. `images[i]` is image i (PIL or a file path); only the shown ones are read. None if no error."""
    shown = most_confident_errors(probs, labels, k)
    if not shown:
        return None
    columns = math.ceil(math.sqrt(len(shown)))
    grid_rows = math.ceil(len(shown) / columns)
    fig = Figure(figsize=(3 * columns, 3.4 * grid_rows), layout="constrained")
    axes = np.atleast_1d(fig.subplots(grid_rows, columns)).flatten()
    confidence, predicted = probs.max(dim=1)
    for ax, index in zip(axes, shown, strict=False):
        ax.imshow(_thumbnail(images[index]))
        true, guess = classes[int(labels[index])], classes[int(predicted[index])]
        ax.set_title(f"true: {true}\npredicted: {guess} ({float(confidence[index]):.2f})", fontsize="small")
    for ax in axes:
        ax.axis("off")
    fig.suptitle("most confidently wrong")
    return fig


def plot_reliability(diagrams: Mapping[str, ReliabilityBins]) -> Figure:
    """One reliability diagram per entry (title: its key): accuracy per confidence bin against the diagonal
    of perfect calibration, the gap to each bin's mean confidence in red, and the bins' counts below."""
    fig = Figure(figsize=(4.5 * len(diagrams), 5.5), layout="constrained")
    axes = np.asarray(fig.subplots(2, len(diagrams), height_ratios=(3, 1), sharex=True, squeeze=False))
    for (title, bins), top, bottom in zip(diagrams.items(), axes[0], axes[1], strict=True):
        edges = np.asarray(bins.edges)
        left, width = edges[:-1], np.diff(edges)
        accuracy, confidence = np.nan_to_num(bins.accuracy), np.asarray(bins.confidence)
        filled = np.asarray(bins.count) > 0
        top.bar(left, accuracy, width, align="edge", edgecolor="black", label="accuracy")
        top.bar(
            left[filled],
            confidence[filled] - accuracy[filled],
            width[filled],
            bottom=accuracy[filled],
            align="edge",
            color="red",
            alpha=0.3,
            edgecolor="red",
            label="gap to confidence",
        )
        top.plot([0, 1], [0, 1], "k--", label="calibrated")
        top.set(title=title, ylabel="accuracy", xlim=(0, 1), ylim=(0, 1))
        top.legend(loc="upper left", fontsize="small")
        bottom.bar(left, bins.count, width, align="edge", color="grey")
        bottom.set(xlabel="top-1 confidence", ylabel="images")
    return fig


def _table(metrics: ClassificationMetrics) -> str:
    rows = zip(metrics.classes, metrics.precision, metrics.recall, metrics.f1, metrics.support, strict=True)
    return markdown_table(
        ["class", "precision", "recall", "F1", "support"],
        [[name, f"{p:.3f}", f"{r:.3f}", f"{f:.3f}", str(n)] for name, p, r, f, n in rows],
    )


def write_report(
    output_dir: str | os.PathLike,
    logits: torch.Tensor,
    labels: torch.Tensor,
    classes: Sequence[str],
    images: Sequence[Image.Image | str | os.PathLike] | None = None,
    temperature: float | None = None,
    bins: int = 15,
    top_errors: int = 9,
) -> str:
    """Writes `eval.md`, `confusion_matrix.png/.csv`, `reliability.png` and, given the images (PIL or paths, in
    the order of `logits`), `top_errors.png` into `output_dir`; returns eval.md's text. With `temperature`
    (fitted on validation logits) the ECE and reliability diagram are shown before and after scaling."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    metrics = classification_metrics(logits, labels, classes, bins)
    diagrams = {f"uncalibrated: ECE {metrics.ece:.3f}": metrics.reliability}
    ece = f"{metrics.ece:.3f}"
    if temperature is not None:
        scaled = (logits.float() / temperature).softmax(dim=1)
        after = expected_calibration_error(scaled, labels, bins)
        diagrams[f"T = {temperature:.2f}: ECE {after:.3f}"] = reliability_bins(scaled, labels, bins)
        ece = f"{metrics.ece:.3f} before, {after:.3f} after temperature scaling (T = {temperature:.3f})"
    figures = [
        (
            "confusion_matrix.png",
            "Confusion matrix ([CSV](confusion_matrix.csv))",
            plot_confusion_matrix(metrics.confusion, classes),
        ),
        ("reliability.png", "Reliability diagram", plot_reliability(diagrams)),
    ]
    if images is not None:
        errors = plot_top_errors(images, logits.float().softmax(dim=1), labels, classes, top_errors)
        figures.append(("top_errors.png", "Most confidently wrong", errors))
    write_confusion_csv(metrics.confusion, classes, output_dir / "confusion_matrix.csv")
    summary = [
        ["images", str(len(labels))],
        ["accuracy", f"{metrics.accuracy:.4f}"],
        ["macro-F1", f"{metrics.macro_f1:.4f}"],
        ["balanced accuracy", f"{metrics.balanced_accuracy:.4f}"],
        [f"ECE ({bins} bins)", ece],
    ]
    parts = ["# Evaluation", "", markdown_table(["metric", "value"], summary), "", "## Per class", "", _table(metrics)]
    for name, caption, figure in figures:
        if figure is not None:  # no wrong prediction: no top_errors.png
            figure.savefig(output_dir / name, dpi=100)
            parts += ["", f"## {caption}", "", f"![{name}]({name})"]
    text = "\n".join(parts) + "\n"
    (output_dir / "eval.md").write_text(text)
    return text

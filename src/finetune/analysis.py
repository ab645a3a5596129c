"""Error analysis of a classifier from its logits: per-class metrics, calibration, figures and `eval.md`.

Everything but the test-time augmentation (`tta_logits`) takes logits (or probabilities) and labels, not a
model or a Trainer, so it runs on what an evaluation loop gathered. The metrics come from torchmetrics; figures are built without pyplot (Agg
canvas, as in `finetune.report`), so this runs headless.
"""

from __future__ import annotations

import csv
import math
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
from matplotlib.backends.backend_agg import FigureCanvasAgg
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
    multilabel_average_precision,
    multilabel_f1_score,
    multilabel_precision,
    multilabel_precision_recall_curve,
    multilabel_recall,
)

from finetune.data.images import read_rgb
from finetune.errors import ConfigError
from finetune.report import markdown_table

if TYPE_CHECKING:  # tensorboard is imported only by those who write to it
    from torch.utils.tensorboard import SummaryWriter

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


# A run has collapsed when one class takes this share of the predictions, this much more than its share of the labels
COLLAPSE_SHARE, COLLAPSE_EXCESS = 0.9, 0.25


def collapse(metrics: ClassificationMetrics) -> str | None:
    """Why the predictions have collapsed, or None: one class predicted for nearly every image (far more than it
    holds), or an accuracy no better than chance (1 / classes). A diverged fine-tune often ends there while its
    best epoch's val acc still looks fine (issue 26: 9 of 20 trials of an lr search at test acc 0.100 = chance)."""
    total = sum(metrics.support)
    predicted = [sum(row[c] for row in metrics.confusion) for c in range(len(metrics.classes))]
    top = max(range(len(predicted)), key=predicted.__getitem__)
    share, holds = predicted[top] / total, metrics.support[top] / total
    if share >= COLLAPSE_SHARE and share - holds >= COLLAPSE_EXCESS:
        return (
            f"predictions collapsed: '{metrics.classes[top]}' for {share:.0%} of the {total} test images (it is "
            f"{holds:.0%} of them), test acc {metrics.accuracy:.3f}, macro-F1 {metrics.macro_f1:.3f}"
        )
    chance = 1 / len(metrics.classes)
    if len(metrics.classes) > 1 and metrics.accuracy <= chance + 1e-6:  # accuracy is float32
        return f"predictions collapsed: test acc {metrics.accuracy:.3f} is no better than chance ({chance:.3f})"
    return None


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


def check_tta(mode: str, key: str = "tta") -> str:
    """`mode` if it is a known test-time augmentation, else a ConfigError naming `key`."""
    if mode not in TTA_MODES:
        raise ConfigError(f"{key}: unknown test-time augmentation '{mode}', expected one of {', '.join(TTA_MODES)}")
    return mode


def tta_logits(model: nn.Module, images: torch.Tensor, tta: str = "none") -> torch.Tensor:
    """The model's logits (float32); with `tta="flip"` the log of the mean softmax of the batch and its horizontal
    flip (one forward pass of both views): the logits of the averaged prediction, so a temperature fitted on them
    (`fit_temperature`) calibrates what is predicted. Runs the model as it is: put it in eval mode first."""
    check_tta(tta)
    if tta == "none":
        return model(images).float()
    views = model(torch.cat([images, images.flip(-1)])).float().log_softmax(dim=1)
    return views.unflatten(0, (2, len(images))).logsumexp(dim=0) - math.log(2)


def softmax_probs(model: nn.Module, images: torch.Tensor, temperature: float = 1.0, tta: str = "none") -> torch.Tensor:
    """softmax(tta_logits / temperature): the probabilities a prediction reports."""
    return (tta_logits(model, images, tta) / temperature).softmax(dim=1)


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
    image: Callable[[int], Image.Image | str | os.PathLike],
    probs: torch.Tensor,
    labels: torch.Tensor,
    classes: Sequence[str],
    k: int = 9,
) -> Figure | None:
    """The `k` most confidently wrong images in a grid, each titled true / predicted (probability), as fastai's
    `plot_top_losses`. `image(i)` gives image i (PIL or a file path); only the shown ones are read. None if no error."""
    shown = most_confident_errors(probs, labels, k)
    if not shown:
        return None
    columns = math.ceil(math.sqrt(len(shown)))
    grid_rows = math.ceil(len(shown) / columns)
    fig = Figure(figsize=(3 * columns, 3.4 * grid_rows), layout="constrained")
    axes = np.atleast_1d(fig.subplots(grid_rows, columns)).flatten()
    confidence, predicted = probs.max(dim=1)
    for ax, index in zip(axes, shown, strict=False):
        ax.imshow(_thumbnail(image(index)))
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


@dataclass(frozen=True)
class Report:
    """What `write_report` wrote: eval.md's text, the metrics, the ECE after temperature scaling, the figures
    (rendered once, as RGB pixels: the PNG files and TensorBoard's images are the same pixels)."""

    text: str
    metrics: ClassificationMetrics
    ece_calibrated: float | None
    figures: dict[str, np.ndarray]  # (H, W, 3) uint8, by file name

    @property
    def scalars(self) -> dict[str, float]:
        """The figures beside accuracy (which an evaluation loop reports itself), by TensorBoard name."""
        values = {
            "macro_f1": self.metrics.macro_f1,
            "balanced_acc": self.metrics.balanced_accuracy,
            "ece": self.metrics.ece,
        }
        return values if self.ece_calibrated is None else values | {"ece_calibrated": self.ece_calibrated}

    def add_figures(self, writer: SummaryWriter, prefix: str, step: int = 0) -> None:
        """Each figure as a TensorBoard image `<prefix>/<file stem>` (e.g. `test/confusion_matrix`)."""
        for name, pixels in self.figures.items():
            writer.add_image(f"{prefix}/{Path(name).stem}", pixels, step, dataformats="HWC")


def render(figure: Figure) -> np.ndarray:
    """The figure's pixels (H, W, 3) at 100 dpi, drawn once: the layout engine and drawing are most of a report's
    time."""
    figure.set_dpi(100)
    canvas = FigureCanvasAgg(figure)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()


def write_report(
    output_dir: str | os.PathLike,
    logits: torch.Tensor,
    labels: torch.Tensor,
    classes: Sequence[str],
    image: Callable[[int], Image.Image | str | os.PathLike] | None = None,
    temperature: float | None = None,
    notes: Sequence[str] = (),
    bins: int = 15,
    top_errors: int = 9,
) -> Report:
    """Writes `eval.md`, `confusion_matrix.png/.csv`, `reliability.png` and, given `image` (`image(i)`: image i in
    the order of `logits`, PIL or a path), `top_errors.png` into `output_dir`. With `temperature` (fitted on
    validation logits) the ECE and reliability diagram are shown before and after scaling. `notes` are listed
    under the title (what was evaluated, and how)."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    metrics = classification_metrics(logits, labels, classes, bins)
    diagrams = {f"uncalibrated: ECE {metrics.ece:.3f}": metrics.reliability}
    ece, after = f"{metrics.ece:.3f}", None
    if temperature is not None:
        scaled = (logits.float() / temperature).softmax(dim=1)
        after = expected_calibration_error(scaled, labels, bins)
        diagrams[f"T = {temperature:.2f}: ECE {after:.3f}"] = reliability_bins(scaled, labels, bins)
        ece = f"{metrics.ece:.3f} before, {after:.3f} after temperature scaling (T = {temperature:.3f})"
    figures = {
        "confusion_matrix.png": plot_confusion_matrix(metrics.confusion, classes),
        "reliability.png": plot_reliability(diagrams),
    }
    captions = {
        "confusion_matrix.png": "Confusion matrix ([CSV](confusion_matrix.csv))",
        "reliability.png": "Reliability diagram",
        "top_errors.png": "Most confidently wrong",
    }
    errors = None
    if image is not None:  # None too when no prediction is wrong
        errors = plot_top_errors(image, logits.float().softmax(dim=1), labels, classes, top_errors)
    if errors is not None:
        figures["top_errors.png"] = errors
    write_confusion_csv(metrics.confusion, classes, output_dir / "confusion_matrix.csv")
    summary = [
        ["images", str(len(labels))],
        ["accuracy", f"{metrics.accuracy:.4f}"],
        ["macro-F1", f"{metrics.macro_f1:.4f}"],
        ["balanced accuracy", f"{metrics.balanced_accuracy:.4f}"],
        [f"ECE ({bins} bins)", ece],
    ]
    parts = ["# Evaluation", "", *(f"- {note}" for note in notes), *([""] if notes else [])]
    parts += [markdown_table(["metric", "value"], summary), "", "## Per class", "", _table(metrics)]
    rendered = {name: render(figure) for name, figure in figures.items()}
    for name, pixels in rendered.items():
        Image.fromarray(pixels).save(output_dir / name)
        parts += ["", f"## {captions[name]}", "", f"![{name}]({name})"]
    text = "\n".join(parts) + "\n"
    (output_dir / "eval.md").write_text(text)
    return Report(text, metrics, after, rendered)


@dataclass(frozen=True)
class MultiLabelScores:
    """A multi-label model's scores, per class in label order: average precision (AP), and precision, recall and F1
    at the class's threshold; `support`: the images that have the class. `mean_average_precision` is the macro mean
    of the APs (as `val/map` is logged), `macro_f1` of the F1s."""

    classes: list[str]
    average_precision: list[float]
    thresholds: list[float]
    precision: list[float]
    recall: list[float]
    f1: list[float]
    support: list[int]
    mean_average_precision: float
    macro_f1: float


def multilabel_scores(
    logits: torch.Tensor, targets: torch.Tensor, classes: Sequence[str], thresholds: Sequence[float]
) -> MultiLabelScores:
    """The scores of logits (N, C) against multi-hot targets (N, C), an image having a class when its sigmoid is at
    least the class's threshold. torchmetrics counts the AP of a class without a positive as 0."""
    if logits.shape != targets.shape or logits.shape != (len(targets), len(classes)) or len(thresholds) != len(classes):
        raise ValueError(f"expected logits and targets (N, {len(classes)}), got {logits.shape} and {targets.shape}")
    num, targets = len(classes), targets.int()
    predicted = (logits.float().sigmoid() >= torch.tensor(list(thresholds))).int()
    average_precision = multilabel_average_precision(logits.float(), targets, num, average=None)
    f1 = multilabel_f1_score(predicted, targets, num, average=None)
    return MultiLabelScores(
        classes=list(classes),
        average_precision=average_precision.tolist(),
        thresholds=[float(t) for t in thresholds],
        precision=multilabel_precision(predicted, targets, num, average=None).tolist(),
        recall=multilabel_recall(predicted, targets, num, average=None).tolist(),
        f1=f1.tolist(),
        support=targets.sum(dim=0).tolist(),
        mean_average_precision=float(average_precision.mean()),
        macro_f1=float(f1.mean()),
    )


def plot_precision_recall(logits: torch.Tensor, targets: torch.Tensor, scores: MultiLabelScores) -> Figure:
    """Each class's precision-recall curve (AP in the legend), its threshold's point marked."""
    precision, recall, _ = multilabel_precision_recall_curve(logits.float(), targets.int(), len(scores.classes))
    fig = Figure(figsize=(6.5, 5), layout="constrained")
    ax = fig.subplots()
    for index, name in enumerate(scores.classes):
        colour = f"C{index % 10}"
        label = f"{name} (AP {scores.average_precision[index]:.3f})"
        ax.plot(recall[index].numpy(), precision[index].numpy(), color=colour, label=label)
        ax.plot(scores.recall[index], scores.precision[index], "o", color=colour)
    ax.set(xlabel="recall", ylabel="precision", xlim=(0, 1.02), ylim=(0, 1.02))
    ax.set_title(f"precision-recall per class (dots: the thresholds), mAP {scores.mean_average_precision:.3f}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small", loc="lower left")
    return fig


@dataclass(frozen=True)
class MultiLabelReport:
    """What `write_multilabel_report` wrote: eval.md's text, the scores, the figure's pixels by file name."""

    text: str
    scores: MultiLabelScores
    figures: dict[str, np.ndarray]

    @property
    def scalars(self) -> dict[str, float]:
        """The numbers beside the logged mAP and F1 at the task's threshold, by TensorBoard name: the macro F1 at the
        tuned thresholds and each class's AP (`ap/<class>`)."""
        per_class = dict(zip(self.scores.classes, self.scores.average_precision, strict=True))
        return {"tuned_f1": self.scores.macro_f1} | {f"ap/{name}": value for name, value in per_class.items()}

    add_figures = Report.add_figures


def write_multilabel_report(
    output_dir: str | os.PathLike,
    logits: torch.Tensor,
    targets: torch.Tensor,
    classes: Sequence[str],
    thresholds: Sequence[float],
    notes: Sequence[str] = (),
) -> MultiLabelReport:
    """Writes `eval.md` (mAP, macro F1 at the thresholds, per class AP, threshold, precision, recall, F1, support)
    and `precision_recall.png` into `output_dir`; `notes` are listed under the title."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    scores = multilabel_scores(logits, targets, classes, thresholds)
    pixels = render(plot_precision_recall(logits, targets, scores))
    Image.fromarray(pixels).save(output_dir / "precision_recall.png")
    summary = [
        ["images", str(len(targets))],
        ["mAP (macro)", f"{scores.mean_average_precision:.4f}"],
        ["macro-F1 at the thresholds", f"{scores.macro_f1:.4f}"],
    ]
    rows = zip(
        scores.classes,
        scores.average_precision,
        scores.thresholds,
        scores.precision,
        scores.recall,
        scores.f1,
        scores.support,
        strict=True,
    )
    table = markdown_table(
        ["class", "AP", "threshold", "precision", "recall", "F1", "support"],
        [[name, *(f"{v:.3f}" for v in values), str(n)] for name, *values, n in rows],
    )
    parts = ["# Evaluation (multi-label)", "", *(f"- {note}" for note in notes), *([""] if notes else [])]
    parts += [markdown_table(["metric", "value"], summary), "", "## Per class", "", table]
    parts += ["", "## Precision-recall curves", "", "![precision_recall.png](precision_recall.png)"]
    text = "\n".join(parts) + "\n"
    (output_dir / "eval.md").write_text(text)
    return MultiLabelReport(text, scores, {"precision_recall.png": pixels})

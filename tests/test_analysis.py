"""Error analysis: metrics against values worked out by hand, temperature scaling, the figures and eval.md."""

from __future__ import annotations

import csv

import pytest
import torch
from PIL import Image
from torch import nn

from finetune import analysis
from finetune.errors import ConfigError

CLASSES = ["cat", "dog", "bird"]
# Eight images: true label and the softmax the model gives (its logits are their logs).
#   #  true  probs               predicted  confidence  correct
#   1  cat   .90  .05  .05       cat        .90         yes
#   2  cat   .70  .20  .10       cat        .70         yes
#   3  cat   .30  .65  .05       dog        .65         no
#   4  dog   .10  .75  .15       dog        .75         yes
#   5  dog   .20  .30  .50       bird       .50         no
#   6  bird  .025 .025 .95       bird       .95         yes
#   7  bird  .25  .20  .55       bird       .55         yes
#   8  bird  .30  .45  .25       dog        .45         no
LABELS = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2])
PROBS = torch.tensor(
    [
        [0.90, 0.05, 0.05],
        [0.70, 0.20, 0.10],
        [0.30, 0.65, 0.05],
        [0.10, 0.75, 0.15],
        [0.20, 0.30, 0.50],
        [0.025, 0.025, 0.95],
        [0.25, 0.20, 0.55],
        [0.30, 0.45, 0.25],
    ]
)
LOGITS = PROBS.log()


def test_per_class_metrics_match_the_hand_computed_values():
    metrics = analysis.classification_metrics(LOGITS, LABELS, CLASSES, bins=5)
    # rows true, columns predicted: cat->cat 2, cat->dog 1; dog->dog 1, dog->bird 1; bird->dog 1, bird->bird 2
    assert metrics.confusion == [[2, 1, 0], [0, 1, 1], [0, 1, 2]]
    assert metrics.support == [3, 2, 3]
    # precision = correct / predicted as the class: cat 2/2, dog 1/3, bird 2/3
    assert metrics.precision == pytest.approx([1.0, 1 / 3, 2 / 3])
    # recall = correct / true members: cat 2/3, dog 1/2, bird 2/3
    assert metrics.recall == pytest.approx([2 / 3, 1 / 2, 2 / 3])
    # F1 = 2PR / (P + R): cat (4/3)/(5/3) = 0.8, dog (1/3)/(5/6) = 0.4, bird 2/3
    assert metrics.f1 == pytest.approx([0.8, 0.4, 2 / 3])
    assert metrics.accuracy == pytest.approx(5 / 8)
    assert metrics.macro_f1 == pytest.approx((0.8 + 0.4 + 2 / 3) / 3)
    assert metrics.balanced_accuracy == pytest.approx((2 / 3 + 1 / 2 + 2 / 3) / 3)  # 11/18, not the accuracy 5/8


def test_ece_and_reliability_bins_match_the_hand_computed_values():
    # 5 bins [0, .2), [.2, .4), [.4, .6), [.6, .8), [.8, 1]:
    #   [.4, .6): .50 no, .55 yes, .45 no  -> confidence .5,  accuracy 1/3, gap 1/6
    #   [.6, .8): .70 yes, .65 no, .75 yes -> confidence .7,  accuracy 2/3, gap 1/30
    #   [.8, 1]:  .90 yes, .95 yes         -> confidence .925, accuracy 1,  gap .075
    # ECE = (3 * 1/6 + 3 * 1/30 + 2 * .075) / 8 = .75 / 8
    assert analysis.expected_calibration_error(PROBS, LABELS, bins=5) == pytest.approx(0.09375, abs=1e-6)
    bins = analysis.reliability_bins(PROBS, LABELS, bins=5)
    assert bins.edges == pytest.approx([0, 0.2, 0.4, 0.6, 0.8, 1.0])
    assert bins.count == [0, 0, 3, 3, 2]
    assert bins.confidence[2:] == pytest.approx([0.5, 0.7, 0.925])
    assert bins.accuracy[2:] == pytest.approx([1 / 3, 2 / 3, 1.0])
    assert all(v != v for v in bins.confidence[:2] + bins.accuracy[:2])  # NaN in empty bins
    # 15 bins of width 1/15 put each confidence in a bin of its own: ECE = mean |correct - confidence|
    # = (.45 + .50 + (1 - .55) + .65 + (1 - .70) + (1 - .75) + (1 - .90) + (1 - .95)) / 8 = 2.75 / 8
    assert analysis.expected_calibration_error(PROBS, LABELS) == pytest.approx(0.34375, abs=1e-6)
    assert analysis.classification_metrics(LOGITS, LABELS, CLASSES).ece == pytest.approx(0.34375, abs=1e-6)


def overconfident(scale: float = 5.0, count: int = 4000) -> tuple[torch.Tensor, torch.Tensor]:
    """Calibrated logits (labels drawn from their softmax: right about 70 % of the time), times `scale`."""
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(count, 4, generator=generator) * 2
    labels = torch.multinomial(logits.softmax(dim=1), 1, generator=generator).flatten()
    return logits * scale, labels


def test_temperature_scaling_recovers_the_scale_and_lowers_the_ece():
    logits, labels = overconfident()
    assert 0.65 < (logits.argmax(dim=1) == labels).float().mean() < 0.75
    temperature = analysis.fit_temperature(logits, labels)
    assert temperature == pytest.approx(5.0, rel=0.05)
    assert analysis.fit_temperature(logits, labels) == temperature  # deterministic
    before = analysis.expected_calibration_error(logits.softmax(dim=1), labels)
    after = analysis.expected_calibration_error((logits / temperature).softmax(dim=1), labels)
    assert before > 0.2 and after < 0.03
    with torch.inference_mode():  # as an eval loop would gather the logits and call it
        assert analysis.fit_temperature(logits.clone(), labels.clone()) == temperature


def test_flip_tta_is_the_mean_of_both_views():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3)).eval()
    images = torch.randn(5, 3, 8, 8)
    with torch.no_grad():
        plain, flipped = model(images), model(images.flip(-1))
        assert not torch.allclose(plain.softmax(dim=1), flipped.softmax(dim=1))  # not flip-invariant: can fail
        mean = (plain.softmax(dim=1) + flipped.softmax(dim=1)) / 2
        logits = analysis.tta_logits(model, images, tta="flip")
        assert torch.allclose(logits.softmax(dim=1), mean, atol=1e-6)  # the logits of the mean prediction
        assert torch.allclose(analysis.softmax_probs(model, images, tta="flip"), mean, atol=1e-6)
        # a temperature divides those logits, as it divides plain ones
        assert torch.allclose(analysis.softmax_probs(model, images, 2.0, "flip"), (logits / 2).softmax(dim=1))
        assert torch.allclose(analysis.softmax_probs(model, images, 2.0), (plain / 2).softmax(dim=1), atol=1e-6)
    with pytest.raises(ConfigError, match="eval.tta: unknown test-time augmentation 'five_crop'"):
        analysis.check_tta("five_crop", "eval.tta")
    with pytest.raises(ConfigError, match="tta"):
        analysis.softmax_probs(model, images, tta="five_crop")


def test_most_confident_errors_come_first():
    # wrong: #3 (.65), #5 (.50), #8 (.45)
    assert analysis.most_confident_errors(PROBS, LABELS, k=2) == [2, 4]
    assert analysis.most_confident_errors(PROBS, LABELS, k=10) == [2, 4, 7]


def test_report_writes_its_figures_csv_and_markdown(tmp_path):
    colours = [(200, 30, 30), (30, 200, 30), (30, 30, 200)]
    paths = []
    for index, label in enumerate(LABELS.tolist()):
        paths.append(tmp_path / f"{index}.png")
        Image.new("RGB", (64 if index % 2 else 300, 48), colours[label]).save(paths[-1])
    images = [Image.open(p) if i < 4 else p for i, p in enumerate(paths)]  # PIL images and file paths alike
    out = tmp_path / "eval"
    notes = ["checkpoint: last.ckpt"]
    report = analysis.write_report(out, LOGITS, LABELS, CLASSES, image=images.__getitem__, temperature=1.5, notes=notes)
    text = report.text

    for name in ("confusion_matrix.png", "reliability.png", "top_errors.png"):
        with Image.open(out / name) as figure:
            assert figure.width >= 400 and figure.height >= 300, name
            assert figure.getextrema() != ((255, 255),) * len(figure.getbands()), name  # not blank
    with open(out / "confusion_matrix.csv", newline="") as file:
        rows = list(csv.reader(file))
    assert rows[0] == ["true \\ predicted", *CLASSES]
    assert [[row[0], *map(int, row[1:])] for row in rows[1:]] == [
        ["cat", 2, 1, 0],
        ["dog", 0, 1, 1],
        ["bird", 0, 1, 2],
    ]
    assert (out / "eval.md").read_text() == text
    assert "| accuracy | 0.6250 |" in text
    assert "| balanced accuracy | 0.6111 |" in text
    assert "| dog | 0.333 | 0.500 | 0.400 | 2 |" in text
    after = analysis.expected_calibration_error((LOGITS / 1.5).softmax(dim=1), LABELS)
    assert f"0.344 before, {after:.3f} after temperature scaling (T = 1.500)" in text
    assert text.startswith("# Evaluation\n\n- checkpoint: last.ckpt\n\n| metric | value |")
    assert report.scalars == pytest.approx(
        {"macro_f1": (0.8 + 0.4 + 2 / 3) / 3, "balanced_acc": 11 / 18, "ece": 0.34375, "ece_calibrated": after}
    )
    assert sorted(report.figures) == ["confusion_matrix.png", "reliability.png", "top_errors.png"]
    for link in ("(confusion_matrix.png)", "(confusion_matrix.csv)", "(reliability.png)", "(top_errors.png)"):
        assert link in text


def test_report_without_errors_or_images_leaves_out_the_error_grid(tmp_path):
    labels = PROBS.argmax(dim=1)  # every prediction right

    def never_read(index: int) -> None:
        raise AssertionError(f"image {index} read, but no prediction is wrong")

    text = analysis.write_report(tmp_path, LOGITS, labels, CLASSES, image=never_read).text
    assert "| accuracy | 1.0000 |" in text and "after temperature scaling" not in text
    assert not (tmp_path / "top_errors.png").exists() and "top_errors" not in text
    assert (tmp_path / "reliability.png").is_file()

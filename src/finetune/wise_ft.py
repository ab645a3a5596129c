"""WiSE-FT (Wortsman et al. 2022, "Robust fine-tuning of zero-shot models"): the weights on the line from the start
of fine-tuning to its end, theta(alpha) = (1 - alpha) * theta_0 + alpha * theta_1, alpha chosen on validation.

`python wise_ft.py ckpt_path=<run>/checkpoints/last.ckpt` (`main`) scores each alpha of `wise_ft.alphas` (0 and 1,
the two checkpoints, always) on the run's validation split, tests the best (a tie: the lower validation loss) and
both ends on its test split, prints the table and writes it (`wise_ft.md`) with the chosen weights as a stand-alone
checkpoint (`checkpoints/wise_ft.ckpt`) into its run folder: eval.py, predict.py and export.py take it.

The start theta_0: the paper's is a zero-shot model, which a new head does not have; here it is LP-FT's linear
probe, the pretrained backbone with a head trained alone, which train.py saves when the head-only phase of the
default strategy ends (`checkpoints/probe.ckpt`, `finetune.checkpoint.ProbeCheckpoint`), or any checkpoint of the
same start that `wise_ft.start` names (a `strategy=freeze` run of the same data). BatchNorm's running statistics
are interpolated as the weights are (`finetune.weight_space`).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import hydra
import torch
from omegaconf import DictConfig

from finetune.builders import rebuild
from finetune.checkpoint import PROBE, checkpoint_file
from finetune.config import CONFIG_DIR
from finetune.errors import ConfigError, MissingFileError, exit_on_user_error
from finetune.models.backbones import load_checkpoint_file
from finetune.predict import default_device
from finetune.report import markdown_table
from finetune.settings import plain
from finetune.validation import missing_values, number, validate
from finetune.weight_space import Score, average, differences, score, start, write_checkpoint


@dataclass(frozen=True)
class Point:
    alpha: float
    val: Score
    test: Score | None = None  # tested: the chosen alpha and both ends


@dataclass(frozen=True)
class WiseFT:
    points: list[Point]  # by alpha, from the start (0) to the end (1)
    chosen: Point
    checkpoint: Path


def alpha_grid(alphas: Any) -> list[float]:
    """`wise_ft.alphas` in order, with 0 and 1 (the two checkpoints)."""
    if not isinstance(alphas, list) or not all(number(a) and 0 <= a <= 1 for a in alphas):
        raise ConfigError(f"wise_ft.alphas={alphas} must be a list of numbers from 0 to 1, e.g. [0,0.25,0.5,0.75,1]")
    return sorted({0.0, 1.0, *map(float, alphas)})


def find_start(ckpt_path: Path, named: str | None) -> Path:
    """`wise_ft.start`, or the probe beside `ckpt_path`."""
    if named:
        if not (path := Path(named).expanduser()).is_file():
            raise MissingFileError(f"wise_ft.start: no such file: {path}")
        return path
    if not (path := ckpt_path.resolve().parent / PROBE).is_file():
        raise MissingFileError(
            f"WiSE-FT needs the start of fine-tuning, and no {PROBE} is beside {ckpt_path}: train.py writes it when "
            "the head-only phase ends (strategy=freeze_unfreeze, the default, or gradual). Train the run so, or name "
            "a linear probe of the same data, classes and backbone: wise_ft.start=<a strategy=freeze run>/checkpoints/"
            "last.ckpt"
        )
    return path


def table(points: list[Point], chosen: Point) -> str:
    notes = [(0.0, "start"), (1.0, "end"), (chosen.alpha, "chosen")]
    rows = [
        [
            f"{p.alpha:g}",
            f"{p.val.acc:.4f}",
            f"{p.val.loss:.4f}",
            f"{p.test.acc:.4f}" if p.test else "",
            ", ".join(note for alpha, note in notes if alpha == p.alpha),
        ]
        for p in points
    ]
    return markdown_table(["alpha", "val acc", "val loss", "test acc", ""], rows)


def wise_ft(cfg: DictConfig) -> WiseFT:
    """Scores the alphas on validation, tests the chosen one and both ends, writes the report and the checkpoint."""
    validate(cfg, missing_values)
    options = cfg.wise_ft
    alphas = alpha_grid(plain(options.alphas))
    end_path = checkpoint_file(cfg.ckpt_path)
    start_path = find_start(end_path, options.start)
    if start_path.resolve() == end_path.resolve():
        raise ConfigError(f"wise_ft.start and ckpt_path are the same file ({end_path}): WiSE-FT needs two checkpoints")
    end, begin = load_checkpoint_file(end_path, key="ckpt_path"), load_checkpoint_file(start_path, key="wise_ft.start")
    if problems := differences(start(end, end_path), start(begin, start_path)):
        raise ConfigError(
            f"{start_path} is no start of {end_path}: they differ in {problems}. The start must have the classes, "
            "backbone and data splits of the end (a linear probe of the same data: the run's own probe.ckpt, or a "
            "strategy=freeze run of the same seed and data)"
        )
    datamodule, model = rebuild(end_path, list(cfg.overrides))
    datamodule.prepare_data()
    datamodule.setup("validate")
    device = torch.device(options.device) if options.device else default_device()
    states = (end["state_dict"], begin["state_dict"])  # the end first: what is not averaged comes from it

    def weights(alpha: float) -> dict[str, torch.Tensor]:
        return average(states, (alpha, 1 - alpha))

    val, test = datamodule.val_dataloader(), datamodule.test_dataloader()
    points = [Point(a, score(model, weights(a), val, device, f"validation, alpha {a:g}")) for a in alphas]
    chosen = max(points, key=lambda p: p.val.key())  # the first of equals: the smaller alpha
    tested = {a: score(model, weights(a), test, device, f"test, alpha {a:g}") for a in {0.0, chosen.alpha, 1.0}}
    points = [replace(p, test=tested.get(p.alpha)) for p in points]
    chosen = next(p for p in points if p.alpha == chosen.alpha)
    output_dir = Path(cfg.paths.output_dir)
    record = {
        "start": str(start_path.resolve()),
        "end": str(end_path.resolve()),
        "alpha": chosen.alpha,
        "alphas": alphas,
        "val_acc": [p.val.acc for p in points],
    }
    checkpoint = write_checkpoint(
        end, weights(chosen.alpha), {"wise_ft": record}, output_dir / "checkpoints" / "wise_ft.ckpt"
    )
    first, last = points[0], points[-1]
    summary = (
        f"WiSE-FT: alpha {chosen.alpha:g} chosen on the validation split (acc {chosen.val.acc:.4f}; start "
        f"{first.val.acc:.4f}, end {last.val.acc:.4f}); test accuracy {chosen.test.acc:.4f} (start "
        f"{first.test.acc:.4f}, end {last.test.acc:.4f})"
    )
    notes = [
        f"start (alpha 0): {start_path}",
        f"end (alpha 1): {end_path}",
        "BatchNorm running statistics interpolated as the weights are",
    ]
    if datamodule.validates_on_test:
        notes.append(
            "the validation split is the test split (data.val_fraction=0): the chosen test accuracy is optimistic"
        )
    text = table(points, chosen)
    report = output_dir / "wise_ft.md"
    report.write_text(
        "# WiSE-FT: (1 - alpha) * start + alpha * end\n\n"
        + "".join(f"- {note}\n" for note in notes)
        + f"\n{text}\n\n{summary}\n\nCheckpoint: {checkpoint}\n"
    )
    print(f"{text}\n{summary}\nCheckpoint: {checkpoint}\nReport: {report}")
    return WiseFT(points, chosen, checkpoint)


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="wise_ft")
def main(cfg: DictConfig) -> None:
    exit_on_user_error(wise_ft, cfg)

"""The evaluation task: test a checkpoint on its run's data, rebuilt from the checkpoint alone, and analyse the errors."""

from __future__ import annotations

from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig
from rich.console import Console
from rich.progress import track
from torch.utils.data import DataLoader
from torch.utils.tensorboard import SummaryWriter

from finetune.analysis import (
    MultiLabelReport,
    Report,
    check_tta,
    fit_temperature,
    multilabel_scores,
    tta_logits,
    write_multilabel_report,
    write_report,
)
from finetune.builders import rebuild
from finetune.checkpoint import AtomicCheckpointIO, checkpoint_file
from finetune.config import CONFIG_DIR
from finetune.data.datamodule import ImageFolderDataModule
from finetune.errors import ConfigError, exit_on_user_error
from finetune.models.backbones import load_checkpoint_file
from finetune.models.module import FineTuneModule
from finetune.predict import default_device
from finetune.validation import missing_values, validate


def run_folder(ckpt_path: Path) -> Path:
    """The run a checkpoint belongs to (`<run>/checkpoints/<file>`), or the folder it was moved into."""
    folder = ckpt_path.resolve().parent
    return folder.parent if folder.name == "checkpoints" else folder


def gather_logits(
    model: FineTuneModule, loader: DataLoader, device: torch.device, tta: str, split: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """The logits (`analysis.tta_logits`) and labels of every batch, in order, on the CPU."""
    model.eval().to(device)
    logits, labels = [], []
    with torch.inference_mode():
        for images, targets in track(loader, description=split, console=Console(stderr=True)):
            logits.append(tta_logits(model, images.to(device), tta).cpu())
            labels.append(targets)
    return torch.cat(logits), torch.cat(labels)


def store_temperature(ckpt_path: Path, temperature: float) -> None:
    """Writes the temperature into the checkpoint's `hyper_parameters`, atomically (a kill leaves the old file)."""
    checkpoint = load_checkpoint_file(ckpt_path, key="ckpt_path")
    checkpoint.setdefault("hyper_parameters", {})["temperature"] = temperature
    AtomicCheckpointIO().save_checkpoint(checkpoint, ckpt_path)


def evaluate(cfg: DictConfig) -> dict[str, float]:
    """Tests the checkpoint on its run's test split and writes the error analysis; `eval.calibrate` first fits
    a temperature on the validation split and stores it in the checkpoint. A multi-label checkpoint:
    `evaluate_multilabel`."""
    validate(cfg, missing_values)
    options = cfg.eval
    tta = check_tta(options.tta, "eval.tta")
    ckpt_path = checkpoint_file(cfg.ckpt_path)
    batch_size = [f"data.batch_size={options.batch_size}"] if options.batch_size else []
    datamodule, model = rebuild(ckpt_path, [*cfg.overrides, *batch_size])
    datamodule.prepare_data()
    datamodule.setup("test")
    device = torch.device(options.device) if options.device else default_device()
    if model.task.multilabel:
        return evaluate_multilabel(cfg, ckpt_path, model, datamodule, device)
    logits, labels = gather_logits(model, datamodule.test_dataloader(), device, tta, "test")
    notes = [f"checkpoint: {ckpt_path}", f"test-time augmentation: {tta}"]
    temperature = float(model.hparams.temperature)
    if options.calibrate:
        temperature = fit_temperature(*gather_logits(model, datamodule.val_dataloader(), device, tta, "validation"))
        store_temperature(ckpt_path, temperature)
        notes.append(f"temperature fitted on the validation split and stored in {ckpt_path.name}")
        if datamodule.validates_on_test:
            notes.append(
                "the validation split is the test split (data.val_fraction=0): the ECE after scaling is optimistic"
            )
    output_dir = Path(options.output_dir) if options.output_dir else run_folder(ckpt_path) / "eval"
    report = write_report(
        output_dir,
        logits,
        labels,
        model.classes,
        image=datamodule.datasets["test"].image,
        temperature=temperature if temperature != 1.0 else None,
        notes=notes,
    )
    metrics = {"eval/acc": report.metrics.accuracy} | {f"eval/{k}": v for k, v in report.scalars.items()}
    write_events(output_dir, metrics, report)
    calibrated = f" ({report.ece_calibrated:.4f} at T = {temperature:.3f})" if report.ece_calibrated is not None else ""
    print(
        f"Test accuracy: {report.metrics.accuracy:.4f}  macro-F1: {report.metrics.macro_f1:.4f}  "
        f"balanced accuracy: {report.metrics.balanced_accuracy:.4f}  ECE: {report.metrics.ece:.4f}{calibrated}  "
        f"(checkpoint {ckpt_path})"
    )
    print(f"Report: {output_dir / 'eval.md'}")
    return metrics


def write_events(output_dir: Path, metrics: dict[str, float], report: Report | MultiLabelReport) -> None:
    """The numbers and the report's figures as TensorBoard events in `<output_dir>/tensorboard`."""
    with SummaryWriter(output_dir / "tensorboard") as writer:
        for name, value in metrics.items():
            writer.add_scalar(name, value)
        report.add_figures(writer, "eval")


def evaluate_multilabel(
    cfg: DictConfig, ckpt_path: Path, model: FineTuneModule, datamodule: ImageFolderDataModule, device: torch.device
) -> dict[str, float]:
    """`evaluate` of a multi-label model: mAP, macro F1 at its thresholds (tuned on validation in training) and
    per class (`finetune.analysis.write_multilabel_report`). Calibration and test-time augmentation average
    softmax predictions: single-label only."""
    for key in ("calibrate", "tta"):
        if cfg.eval[key] not in (False, "none"):
            raise ConfigError(f"eval.{key}={cfg.eval[key]} is for single-label models; {ckpt_path} is multi-label")
    logits, targets = gather_logits(model, datamodule.test_dataloader(), device, "none", "test")
    output_dir = Path(cfg.eval.output_dir) if cfg.eval.output_dir else run_folder(ckpt_path) / "eval"
    thresholds = model.meta["thresholds"]
    report = write_multilabel_report(
        output_dir, logits, targets, model.classes, thresholds, [f"checkpoint: {ckpt_path}"]
    )
    at_default = multilabel_scores(logits, targets, model.classes, [model.task.threshold] * len(thresholds))
    metrics = {"eval/map": report.scores.mean_average_precision, "eval/f1": at_default.macro_f1}
    metrics |= {f"eval/{k}": v for k, v in report.scalars.items()}
    write_events(output_dir, metrics, report)
    print(
        f"Test mAP: {report.scores.mean_average_precision:.4f}  macro-F1 at the tuned thresholds: "
        f"{report.scores.macro_f1:.4f} (at {model.task.threshold}: {at_default.macro_f1:.4f})  (checkpoint {ckpt_path})"
    )
    print(f"Report: {output_dir / 'eval.md'}")
    return metrics


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="eval")
def main(cfg: DictConfig) -> None:
    exit_on_user_error(evaluate, cfg)

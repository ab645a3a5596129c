"""The training task: validate the config, build, fit, test, return the metric a sweeper optimizes."""

from __future__ import annotations

import logging
import resource
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import hydra
import lightning as L
import torch
from hydra.core.hydra_config import HydraConfig
from lightning.pytorch.loggers import Logger, TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig

from finetune.builders import build, build_fit_trainer
from finetune.callbacks import ErrorAnalysis
from finetune.checkpoint import check_resumable, resolve_ckpt_path
from finetune.config import CONFIG_DIR
from finetune.errors import UserError
from finetune.finetuning import StageUnfreezing
from finetune.loggers import close, hparams, log_hparams_tab, varied_keys
from finetune.run_status import interruption, recorded, resume_hint
from finetune.validation import validate

log = logging.getLogger(__name__)


@contextmanager
def finalized(loggers: list[Logger]) -> Iterator[None]:
    """Flushes and closes every logger when the block ends, however it ends.

    Lightning finalizes loggers when `fit` and `test` end, but whatever is logged after that (the HPARAMS
    entry) reopens the writer, and a buffered writer that is never closed loses its tail at process exit.
    The status is in Lightning's words: "failed" for any run that did not complete (Lightning says so of Ctrl-C too).
    """
    status = "failed"
    try:
        yield
        status = "success"
    finally:
        for logger in loggers:
            close(logger, status)


def peak_memory_mb() -> dict[str, float]:
    """The process's peak resident memory (its loader workers' largest too) and, on a GPU, the peak allocated."""
    record = {
        "peak_memory_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "peak_worker_memory_mb": round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024, 1),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        record["peak_gpu_memory_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    return record


def fit_record(trainer: L.Trainer, datamodule: object, seconds: float) -> dict[str, object]:
    """What the fit cost and trained on: its wall time (the resumed part after a resume), optimizer steps, epochs,
    training images (a few-shot subset's), peak memory."""
    train = getattr(datamodule, "datasets", {}).get("train")
    return {
        "fit_time_s": round(seconds, 2),
        "steps": trainer.global_step,
        "epochs": trainer.current_epoch,
        "train_images": len(train) if train is not None else None,
        **peak_memory_mb(),
    }


def train(cfg: DictConfig, status: dict[str, object] | None = None) -> dict[str, float]:
    """`status`: the run's status.json record, which gets `collapsed` when the test predictions collapsed."""
    validate(cfg)  # before anything is downloaded or built
    if cfg.get("seed") is not None:
        L.seed_everything(cfg.seed, workers=True, verbose=rank_zero_only.rank == 0)
    datamodule, model = build(cfg)
    trainer = build_fit_trainer(cfg)
    ckpt_path = resolve_ckpt_path(cfg.get("ckpt_path"), cfg.paths.output_dir, Path(cfg.paths.log_dir) / cfg.task_name)
    if ckpt_path:  # before anything is logged or computed: a damaged file, other classes
        check_resumable(ckpt_path, datamodule.classes)
    # what trains at some epoch, for the log, HPARAMS and status.json (a comparison's cost table)
    schedule = next(callback for callback in trainer.callbacks if isinstance(callback, StageUnfreezing))
    counts = schedule.parameter_counts(model, trainer.max_epochs)
    log.info("Trainable parameters: %s", counts)
    with finalized(trainer.loggers):
        settings = hparams(cfg) | counts.record()
        for logger in trainer.loggers:  # at the start, so a failed run is listed with its settings too
            logger.log_hyperparams(settings)
        if ckpt_path:
            log.info("Resuming from %s", ckpt_path)
        elif cfg.get("validate_first"):  # val/acc of the initial weights, logged at step 0
            (start,) = trainer.validate(model, datamodule=datamodule, verbose=False)
            log.info("Before training: %s", {k: round(v, 4) for k, v in start.items()})
        # weights_only: a checkpoint to resume from runs no code (Lightning would unpickle a URL fully)
        start = time.perf_counter()
        trainer.fit(model, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=True)
        if status is not None:  # the cost side of a comparison (finetune.comparison)
            status |= fit_record(trainer, datamodule, time.perf_counter() - start) | counts.record()
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
        trainer.test(model, datamodule=datamodule)  # the final weights, as d2l reports them
        metrics |= {k: float(v) for k, v in trainer.callback_metrics.items()}
        verdicts = [c.collapse for c in trainer.callbacks if isinstance(c, ErrorAnalysis) and c.collapse]
        if verdicts and status is not None:
            status["collapsed"] = verdicts[0]
        final = {f"hp/{k}": v for k, v in metrics.items() if k.endswith(("acc", "loss", "f1", "ece", "map"))}
        for logger in trainer.loggers:  # the HPARAMS tab pairs each run's settings with these; other loggers have them
            if isinstance(logger, TensorBoardLogger):
                log_hparams_tab(logger, settings, final, varied_keys())
    if trainer.is_global_zero:  # DDP: every rank holds the same reduced metrics
        key, name = model.task.headline  # test/acc, accuracy
        print(f"Test {name}: {metrics.get(f'test/{key}', float('nan')):.4f}  (outputs in {cfg.paths.output_dir})")
    return metrics


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="train")
def main(cfg: DictConfig) -> float | None:
    multirun = HydraConfig.get().mode.name == "MULTIRUN"
    try:
        with recorded(cfg.paths.output_dir) as status:  # status.json: completed or failed, wall time
            metrics = train(cfg, status)
    except Exception as err:
        user_error = isinstance(err, UserError)  # bad config, data or files: the message says what to change
        if not multirun:
            if user_error:
                sys.exit(f"Error: {err}")  # a traceback would only hide the message
            raise
        # One failed job must not end the sweep: it is in the run's status.json and the report.
        log.error("job %s failed, the sweep goes on: %s", HydraConfig.get().job.num, err, exc_info=not user_error)
        return None  # not a number: Optuna records a failed trial
    except BaseException as err:  # Ctrl-C, SIGTERM: recorded as interrupted; say how to go on
        if not interruption(err):
            raise
        sys.exit(resume_hint(cfg.paths.output_dir) if rank_zero_only.rank == 0 else 1)
    if multirun:
        log.info("job %s: %s", HydraConfig.get().job.num, {k: round(v, 4) for k, v in metrics.items()})
    return metrics.get(cfg.get("optimized_metric"))

"""A run whose predictions collapsed (one class for nearly every image, or chance accuracy) is said to be so: in the
log, its status.json and the sweep report, where it is no candidate for the best run; the shipped lr search stays
where the recipe's optimizer fine-tunes."""

from __future__ import annotations

import json
import logging
import re

import pytest
import torch
from omegaconf import OmegaConf

from finetune import report
from finetune.analysis import classification_metrics, collapse
from finetune.run_status import STATUS_FILE, recorded
from finetune.train import train
from tests.helpers import compose_train

pytestmark = pytest.mark.usefixtures("one_thread")


def verdict(predicted: list[int], labels: list[int], classes: int = 2) -> str | None:
    logits = torch.nn.functional.one_hot(torch.tensor(predicted), classes).float()
    return collapse(classification_metrics(logits, torch.tensor(labels), [f"c{k}" for k in range(classes)]))


def test_one_class_for_nearly_everything_or_chance_accuracy_is_a_collapse():
    assert "'c0' for 100% of the 4 test images (it is 50% of them)" in verdict([0, 0, 0, 0], [0, 0, 1, 1])
    assert verdict([0, 0, 1, 1], [0, 0, 1, 1]) is None
    # a test split that is 90% one class, predicted as it is: no collapse
    assert verdict([0] * 9 + [1], [0] * 9 + [1]) is None
    # 10 classes, the trials: one class for every image, test acc 0.100
    assert "test acc 0.100" in verdict([3] * 10, list(range(10)), classes=10)
    # no class dominates, but no better than chance
    assert "no better than chance (0.333)" in verdict([1, 2, 0, 1, 2, 0], [0, 0, 1, 1, 2, 2], classes=3)


def test_a_collapsed_run_is_said_so_in_the_log_its_status_and_the_report(tmp_path, image_folder, caplog):
    """AdamW at lr 1.0 (the old search space reached 0.1 from AdamW's 3e-4): 'blue' for every test image."""
    overrides = ["data=imagefolder", f"data.root={image_folder}", "debug=tiny", "strategy=finetune"]
    overrides += ["model=timm", "model.name=mobilenetv3_small_050", "strategy.pretrained=false", "optimizer.lr=1.0"]
    cfg = compose_train(tmp_path, overrides)
    run = tmp_path / "run"
    (run / ".hydra").mkdir(parents=True)
    OmegaConf.save(OmegaConf.create(list(cfg.hydra.overrides.task)), run / ".hydra" / "overrides.yaml")
    with caplog.at_level(logging.WARNING), recorded(run) as status:  # as train.py's main records a run
        metrics = train(cfg, status)
    assert metrics["test/collapsed"] == 1.0 and "predictions collapsed: 'blue' for 100%" in caplog.text
    record = json.loads((run / STATUS_FILE).read_text())
    assert record["status"] == "completed" and record["collapsed"].startswith("predictions collapsed: 'blue'")
    text = report.write_report(run)
    assert "| completed, collapsed |" in text and f"- run: {record['collapsed']}" in text
    assert report.best_run(report.load_runs(run)) is None  # not a candidate


def test_the_lr_search_stays_where_the_recipes_optimizer_fine_tunes(tmp_path):
    cfg = compose_train(tmp_path, ["hparams_search=lr_optuna"])
    low, high = map(
        float, re.findall(r"interval\(([\d.e-]+), ([\d.e-]+)\)", cfg.hydra.sweeper.params["optimizer.lr"])[0]
    )
    assert cfg.optimizer._target_.endswith("AdamW") and low < cfg.optimizer.lr < high <= 1e-3

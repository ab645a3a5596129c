"""A checkpoint written by an earlier version still loads, and gives the logits it gave then: in
`FineTuneModule.from_checkpoint`, eval.py and predict.py (tests/fixtures/checkpoint_before_seam/README.md says
what wrote it)."""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import pytest
import torch

from finetune.builders import rebuild
from finetune.data.images import read_rgb
from finetune.data.transforms import eval_transform
from finetune.eval import evaluate, gather_logits
from finetune.models.module import FineTuneModule
from finetune.predict import predict_files
from tests.helpers import compose_train

FIXTURE = Path(__file__).parent / "fixtures" / "checkpoint_before_seam"
EXPECTED = torch.load(FIXTURE / "logits.pt", weights_only=True)  # files (relative to FIXTURE), logits


@pytest.fixture
def ckpt(tmp_path: Path) -> Path:
    """A copy of the fixture's checkpoint (the tasks may write beside it)."""
    return Path(shutil.copy(FIXTURE / "last.ckpt", tmp_path / "last.ckpt"))


def test_the_module_loads_it_with_its_settings_and_logits(ckpt):
    model = FineTuneModule.from_checkpoint(ckpt)
    assert model.classes == ["blue", "red"] and model.input_config.image_size == 32
    assert model.strategy.group_by_stage and model.strategy.layer_decay == 0.385 and model.strategy.bn == "eval"
    assert model.criterion.label_smoothing == 0.1 and model.criterion.class_weights.tolist() == [1.0, 2.0]
    images = torch.stack([eval_transform(model.input_config)(read_rgb(FIXTURE / file)) for file in EXPECTED["files"]])
    with torch.no_grad():
        torch.testing.assert_close(model(images), EXPECTED["logits"])


def test_eval_rebuilds_its_run_and_gives_its_logits(ckpt, tmp_path, capsys):
    data = [f"data.root={FIXTURE / 'images'}"]
    datamodule, model = rebuild(ckpt, data)  # what eval.py runs on
    datamodule.setup("test")
    logits, labels = gather_logits(model, datamodule.test_dataloader(), torch.device("cpu"), "none", "test")
    torch.testing.assert_close(logits, EXPECTED["logits"])  # the test split lists the files in the same order
    overrides = [f"ckpt_path={ckpt}", f'overrides=["{data[0]}"]', f"eval.output_dir={tmp_path / 'eval'}"]
    metrics = evaluate(compose_train(tmp_path, overrides, "eval"))
    assert metrics["eval/acc"] == (EXPECTED["logits"].argmax(1) == labels).float().mean().item()


def test_predict_gives_its_probabilities(ckpt, tmp_path):
    output = tmp_path / "predictions.csv"
    overrides = [f"ckpt_path={ckpt}", f"input={FIXTURE / 'images' / 'test'}", f"predict.output={output}"]
    predict_files(compose_train(tmp_path, [*overrides, "predict.num_workers=0"], "predict"))
    with open(output, newline="") as file:
        rows = {Path(row["path"]).relative_to(FIXTURE).as_posix(): row for row in csv.DictReader(file)}
    probs = EXPECTED["logits"].softmax(1)  # temperature 1
    for file, expected in zip(EXPECTED["files"], probs, strict=True):
        top = int(expected.argmax())
        assert rows[file]["top1_class"] == ["blue", "red"][top]
        assert float(rows[file]["top1_prob"]) == pytest.approx(float(expected[top]), abs=1e-6)

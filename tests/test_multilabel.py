"""Multi-label classification (`data=multilabel`): CSVs of images with several labels each, read with the image
folders' splits, subsets, seeded batches, store and bad-image handling; the loss, metrics and thresholds a config
of `data=multilabel` alone chooses; a run that trains, evaluates, predicts and exports, resumes exactly, and is
reported."""

from __future__ import annotations

import csv
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from omegaconf import open_dict
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from finetune import report
from finetune.builders import build, rebuild
from finetune.config import CONFIG_DIR
from finetune.data.images import ImageReadError, read_rgb
from finetune.data.multilabel import MultiLabelDataModule
from finetune.data.synthetic import SHAPES, generate_multilabel_shapes
from finetune.data.transforms import eval_transform
from finetune.demo import class_probabilities
from finetune.errors import ConfigError, DataError, MissingFileError
from finetune.eval import evaluate
from finetune.export import export_checkpoint, read_sidecar
from finetune.models import InputConfig
from finetune.models.losses import BCEWithLogits
from finetune.models.module import FineTuneModule
from finetune.models.tasks import tune_thresholds
from finetune.predict import predict_files
from finetune.run_status import recorded
from finetune.train import train
from finetune.validation import validate
from tests.helpers import SMALL_MODEL, compose_train, doc_commands, event_dir, run_cli

CONFIG = InputConfig(32, (0.5,) * 3, (0.5,) * 3)


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> Path:
    """40 training and 12 test images of two or three of the four shapes each."""
    return generate_multilabel_shapes(tmp_path_factory.mktemp("multilabel"), train=40, test=12, size=48)


def datamodule(root: Path, **settings) -> MultiLabelDataModule:
    data = MultiLabelDataModule(input_config=CONFIG, root=root, batch_size=8, num_workers=0, **settings)
    data.setup()
    return data


def write_csv(root: Path, split: str, *rows: str, header: str = "path,labels") -> None:
    (root / f"{split}.csv").write_text("\n".join([header, *rows]) + "\n")


def test_targets_are_multi_hot_vectors_over_the_sorted_labels(shapes):
    data = datamodule(shapes)
    assert data.classes == sorted(SHAPES) == ["circle", "cross", "square", "triangle"]
    first = (shapes / "train.csv").read_text().splitlines()[1]  # images/train_0000.png,circle|cross|square
    path, labels = first.split(",")
    dataset = data.read_split("train")
    image, target = dataset[0]
    assert dataset.samples[0][0] == shapes / path and image.size == (48, 48)
    assert target.dtype == torch.float32
    assert [data.classes[i] for i in target.nonzero().flatten().tolist()] == labels.split("|")
    assert data.class_counts() == [sum(t.tolist()[i] for _, t in data.datasets["train"]) for i in range(4)]
    images, targets = next(iter(data.train_dataloader()))
    assert images.shape == (8, 3, 32, 32) and targets.shape == (8, 4) and set(targets.unique().tolist()) == {0.0, 1.0}


def test_an_image_without_labels_and_paths_relative_to_root(tmp_path, shapes):
    root = tmp_path / "data"
    root.mkdir()
    (root / "photos").symlink_to(shapes / "images")
    write_csv(
        root, "train", "photos/train_0000.png,dog|grass", "photos/train_0001.png,", " photos/train_0002.png , grass "
    )
    write_csv(root, "test", "photos/test_0000.png,grass")
    data = datamodule(root, val_fraction=0)
    assert data.classes == ["dog", "grass"]
    assert [t.tolist() for _, t in data.read_split("train")] == [[1.0, 1.0], [0.0, 0.0], [0.0, 1.0]]
    assert data.class_counts() == [1, 2]


def test_missing_csv_column_and_image_are_named(tmp_path, shapes):
    root = tmp_path / "data"
    root.mkdir()
    with pytest.raises(MissingFileError, match=r"no train.csv in .*data.*columns path,labels"):
        datamodule(root)
    write_csv(root, "train", f"{shapes}/images/train_0000.png,a,b", header="path,labels,notes")
    with pytest.raises(DataError, match=r"unknown: \['notes'\], missing: \[\]\): expected exactly path,labels"):
        datamodule(root)
    write_csv(root, "train", f"{shapes}/images/train_0000.png,a", "gone.png,b", "also_gone.png,a")
    write_csv(root, "test", f"{shapes}/images/test_0000.png,a")
    with pytest.raises(MissingFileError, match=r"2 images listed in .*train.csv are not there(.|\n)*gone.png"):
        datamodule(root)
    write_csv(root, "train", f"{shapes}/images/train_0000.png,a", f"{shapes}/images/train_0001.png,b")
    write_csv(root, "test", f"{shapes}/images/test_0000.png,a|c")
    with pytest.raises(DataError, match=r"test.csv has labels that train.csv has not: \['c'\]"):
        datamodule(root)


def test_bad_and_missing_images_are_skipped_with_skip_bad_images(tmp_path, shapes, caplog, decoded_images):
    """Each run as the check's record (`data.checked_dir`) sees the files: a listed file that appears or goes is a
    new set of files, checked again; the same set is decoded once."""
    root, records = tmp_path / "data", tmp_path / "checked"
    root.mkdir()
    (root / "broken.png").write_bytes(b"not a png")
    rows = [f"{shapes}/images/train_{i:04d}.png,a|b" for i in range(4)]
    write_csv(root, "train", *rows, "broken.png,a", "gone.png,b")
    write_csv(root, "test", f"{shapes}/images/test_0000.png,a")
    with pytest.raises(MissingFileError, match="gone.png"):
        datamodule(root, checked_dir=records)
    (root / "gone.png").write_bytes(b"")
    with pytest.raises(ImageReadError, match=r"2 images in .* cannot be read(.|\n)*broken.png(.|\n)*gone.png"):
        datamodule(root, checked_dir=records)
    (root / "gone.png").unlink()
    data = datamodule(root, skip_bad_images=True, val_fraction=0, checked_dir=records)
    assert len(data.datasets["train"]) == 4
    assert "broken.png" in caplog.text and "gone.png" in caplog.text
    decoded_images.clear()
    caplog.clear()
    again = datamodule(root, skip_bad_images=True, val_fraction=0, checked_dir=records)
    assert decoded_images == [] and again.datasets["train"].indices == data.datasets["train"].indices
    assert "broken.png" in caplog.text and "gone.png" in caplog.text  # the record's problems are listed again


def test_few_shot_gives_every_class_at_least_k_images_in_nested_subsets(shapes):
    small, large = (datamodule(shapes, shots=k) for k in (3, 6))
    for data, k in ((small, 3), (large, 6)):
        assert min(data.class_counts()) >= k
        assert len(data.datasets["train"]) < 36  # fewer than the training part of the split
    assert set(small.datasets["train"].indices) <= set(large.datasets["train"].indices)
    assert small.datasets["val"].indices == large.datasets["val"].indices == datamodule(shapes).datasets["val"].indices


def test_folds_partition_the_training_images(shapes):
    folds = [datamodule(shapes, folds=4, fold=k).datasets["val"].indices for k in range(4)]
    assert sorted(i for fold in folds for i in fold) == list(range(40))


def test_batches_resume_mid_epoch_and_the_store_gives_the_same_targets(tmp_path, shapes):
    def epoch(data: MultiLabelDataModule, number: int, state: dict | None = None) -> list[torch.Tensor]:
        loader = data.train_dataloader()
        if state:
            loader.load_state_dict(state)
        loader.sampler.set_epoch(number)
        return [batch[-1] for batch in loader]  # the stored images' batches are CropSamples, label last

    files = datamodule(shapes)
    whole = epoch(files, 1)
    torch.testing.assert_close(epoch(datamodule(shapes), 1, {"epoch": 1, "batches": 2}), whole[2:], rtol=0, atol=0)
    stored = datamodule(shapes, store=True, store_dir=tmp_path, augment_on="device")
    torch.testing.assert_close(epoch(stored, 1), whole, rtol=0, atol=0)


def multilabel_cfg(tmp_path: Path, root: Path, *overrides: str):
    return compose_train(tmp_path, ["data=multilabel", f"data.root={root}", *overrides])


def test_data_multilabel_chooses_the_loss_task_and_the_metric_to_follow(tmp_path, shapes):
    cfg = multilabel_cfg(tmp_path, shapes)
    assert cfg.loss._target_ == "finetune.models.losses.BCEWithLogits" and cfg.task.threshold == 0.5
    assert cfg.optimized_metric == cfg.callbacks.model_checkpoint.monitor == "val/map"
    assert cfg.callbacks.early_stopping.monitor == "val/map"
    single = compose_train(tmp_path, ["data=imagefolder", f"data.root={shapes}"])
    assert single.optimized_metric == single.callbacks.model_checkpoint.monitor == "val/acc"
    assert single.task._target_ == "finetune.models.tasks.SingleLabel"


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["loss=default"], "loss=default (cross-entropy) is for one class per image"),
        (["data.mixup=0.2", "data.cutmix=1.0"], "data.mixup and data.cutmix mix single-label images"),
        (["data.sampler=balanced"], "data.sampler=balanced draws by an image's one class"),
        (["task=single_label"], "data=multilabel trains with task=multilabel"),
    ],
)
def test_what_is_for_single_labels_is_refused_with_what_to_do(tmp_path, shapes, overrides, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        validate(multilabel_cfg(tmp_path, shapes, *overrides))


def test_the_multilabel_loss_or_task_on_single_label_data_is_refused(tmp_path, shapes):
    for override, message in (
        ("loss=multilabel", "loss=multilabel takes multi-hot targets (data=multilabel)"),
        ("task=multilabel", "task=multilabel needs multi-label data: data=multilabel"),
    ):
        with pytest.raises(ConfigError, match=re.escape(message)):
            validate(compose_train(tmp_path, ["data=imagefolder", f"data.root={shapes}", override]))


def test_balanced_class_weights_are_bce_pos_weights(tmp_path, shapes):
    datamodule, model = build(multilabel_cfg(tmp_path, shapes, *SMALL_MODEL, "loss.class_weights=balanced"))
    counts, images = datamodule.class_counts(), len(datamodule.datasets["train"])
    expected = torch.tensor([(images - count) / count for count in counts])
    torch.testing.assert_close(model.criterion.class_weights, expected)
    assert isinstance(model.criterion, BCEWithLogits) and images == 36 and counts != [images / 2] * 4
    logits, targets = torch.randn(5, 4), torch.randint(0, 2, (5, 4)).float()
    by_torch = F.binary_cross_entropy_with_logits(logits, targets, pos_weight=expected)
    torch.testing.assert_close(model.criterion(logits, targets), by_torch)


@pytest.mark.parametrize("experiment", sorted(p.stem for p in (Path(CONFIG_DIR) / "experiment").glob("*.yaml")))
def test_every_experiment_applies_to_multilabel_data_with_its_label_smoothing(tmp_path, shapes, experiment):
    """An experiment's recipe (its optimizer, schedule, `loss.label_smoothing`) on multi-label data: the binary
    cross-entropy with each 0/1 target smoothed toward 1/2 as the cross-entropy smooths two classes."""
    cfg = multilabel_cfg(tmp_path, shapes, f"experiment={experiment}", "data=multilabel", f"data.root={shapes}")
    validate(cfg)
    criterion = instantiate(cfg.loss)
    assert isinstance(criterion, BCEWithLogits)
    e = criterion.label_smoothing
    logits, targets = torch.randn(5, 4), torch.randint(0, 2, (5, 4)).float()
    by_torch = F.binary_cross_entropy_with_logits(logits, targets * (1 - e) + e / 2)
    torch.testing.assert_close(criterion(logits, targets), by_torch)
    two_classes = torch.stack([torch.zeros_like(logits), logits], dim=-1).flatten(0, 1)  # sigmoid = a 2-class softmax
    smoothed_ce = F.cross_entropy(two_classes, targets.long().flatten(), label_smoothing=e)
    torch.testing.assert_close(criterion(logits, targets), smoothed_ce)


def test_thresholds_maximise_each_class_f1_among_all_thresholds():
    generator = torch.Generator().manual_seed(0)
    probs = torch.rand(40, 3, generator=generator)
    targets = (probs + 0.4 * torch.rand(40, 3, generator=generator) > 0.7).float()
    targets[:, 2] = 0  # no positive: the default threshold
    thresholds = tune_thresholds(probs, targets, default=0.5)
    assert thresholds[2] == 0.5

    def f1(c: int, threshold: float) -> float:
        predicted, truth = probs[:, c] >= threshold, targets[:, c].bool()
        return float(2 * (predicted & truth).sum() / (predicted.sum() + truth.sum()))

    for c in (0, 1):
        best = max(f1(c, float(t)) for t in probs[:, c])  # every threshold that changes a prediction
        assert f1(c, thresholds[c]) == pytest.approx(best) and best > 0.5
        assert not (probs[:, c] == thresholds[c]).any()  # halfway between two probabilities


@pytest.fixture(scope="module")
def trained(tmp_path_factory, shapes) -> tuple[Path, dict[str, float]]:
    """A multi-label run with the defaults a user gets (the recommended recipe), tiny (32 px, the small backbone,
    2 epochs): its run folder and metrics."""
    root = tmp_path_factory.mktemp("trained")
    return root / "run", train(multilabel_cfg(root, shapes, "debug=tiny", *SMALL_MODEL, "trainer.max_epochs=2"))


def test_a_run_logs_map_and_f1_and_stores_its_thresholds_and_task(trained, shapes):
    run, metrics = trained
    checkpoint = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    settings = checkpoint["hyper_parameters"]
    assert settings["task"] == {"_target_": "finetune.models.tasks.MultiLabel", "threshold": 0.5}
    assert len(settings["thresholds"]) == 4 and all(isinstance(t, float) for t in settings["thresholds"])
    assert len(list((run / "checkpoints").glob("epoch_*.ckpt"))) == 1  # the best epoch by val/map
    events = EventAccumulator(str(event_dir(run)))
    events.Reload()
    logged = set(events.Tags()["scalars"])
    assert {"val/map", "val/f1", "test/map", "test/f1", "test/tuned_f1", "hp/test/map"} <= logged
    assert {f"test/ap/{name}" for name in SHAPES} <= logged and "test/acc" not in logged
    assert 0 < metrics["test/map"] <= 1
    text = (run / "eval" / "eval.md").read_text()
    assert f"| mAP (macro) | {metrics['test/map']:.4f} |" in text  # torchmetrics' mAP, as the test logged it
    assert f"| macro-F1 at the thresholds | {metrics['test/tuned_f1']:.4f} |" in text
    assert "| class | AP | threshold | precision | recall | F1 | support |" in text
    assert (run / "eval" / "precision_recall.png").is_file()


def test_the_stored_thresholds_are_tuned_on_validation_for_the_stored_weights(trained):
    run, _ = trained
    ckpt = run / "checkpoints" / "last.ckpt"
    datamodule, model = rebuild(ckpt, [])
    datamodule.setup()
    with torch.inference_mode():
        logits, targets = zip(*((model(images), labels) for images, labels in datamodule.val_dataloader()), strict=True)
    tuned = tune_thresholds(torch.cat(logits).sigmoid(), torch.cat(targets), default=0.5)
    assert model.meta["thresholds"] == pytest.approx(tuned, abs=1e-6)
    assert model.meta["multilabel"] is True and tuned != [0.5] * 4


def test_eval_predict_and_export_use_the_stored_thresholds(trained, shapes, tmp_path, capsys):
    run, metrics = trained
    ckpt = tmp_path / "last.ckpt"
    checkpoint = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    checkpoint["hyper_parameters"]["thresholds"] = [0.0, 1.0, 0.5, 0.5]  # circle always, cross never
    torch.save(checkpoint, ckpt)

    scores = evaluate(compose_train(tmp_path, [f"ckpt_path={ckpt}"], "eval"))
    assert scores["eval/map"] == pytest.approx(metrics["test/map"], abs=1e-6)  # thresholds do not change the AP
    assert "Test mAP: " in capsys.readouterr().out
    assert "| circle | " in (tmp_path / "eval" / "eval.md").read_text()
    with pytest.raises(ConfigError, match="eval.calibrate=True is for single-label models"):
        evaluate(compose_train(tmp_path, [f"ckpt_path={ckpt}", "eval.calibrate=true"], "eval"))

    options = [f"ckpt_path={ckpt}", f"input={shapes / 'images'}", "predict.num_workers=0"]
    summary = predict_files(compose_train(tmp_path, options, "predict"))
    with open(tmp_path / "run" / "predictions.csv", newline="") as file:
        rows = list(csv.DictReader(file))
    assert list(rows[0]) == ["path", "labels", *(f"prob_{name}" for name in sorted(SHAPES)), "error"]
    assert len(rows) == summary.images == 52 and summary.per_class["circle"] == 52 and summary.per_class["cross"] == 0
    for row in rows:
        above = [name for name in ("square", "triangle") if float(row[f"prob_{name}"]) >= 0.5]
        assert row["labels"].split("|") == ["circle", *above]

    model = FineTuneModule.from_checkpoint(ckpt)  # the demo page shows what predict.py's labels say
    image = eval_transform(model.input_config)(read_rgb(rows[0]["path"]))
    with torch.inference_mode():
        shown = class_probabilities(model, image)
    assert list(shown) == rows[0]["labels"].split("|")
    assert list(shown.values()) == pytest.approx([float(rows[0][f"prob_{name}"]) for name in shown], abs=1e-6)

    path, parity = export_checkpoint(compose_train(tmp_path, [f"ckpt_path={ckpt}", "format=onnx"], "export"))
    sidecar = read_sidecar(path)
    assert sidecar["multilabel"] is True and sidecar["thresholds"] == [0.0, 1.0, 0.5, 0.5]
    assert parity.max_abs_diff < 1e-4 and parity.labels_agree
    assert "labels above the thresholds the same" in capsys.readouterr().out


def test_the_exported_model_gives_predict_s_labels_without_this_project(trained, shapes, tmp_path):
    """ONNX, its sidecar and numpy: sigmoid(logits / temperature) >= each class's threshold, as predict.py labels."""
    import onnxruntime

    run, _ = trained
    ckpt = run / "checkpoints" / "last.ckpt"
    path, _ = export_checkpoint(compose_train(tmp_path, [f"ckpt_path={ckpt}", "format=onnx"], "export"))
    options = [f"ckpt_path={ckpt}", f"input={shapes / 'images' / 'test_0000.png'}", "predict.num_workers=0"]
    predict_files(compose_train(tmp_path, options, "predict"))
    with open(tmp_path / "run" / "predictions.csv", newline="") as file:
        (row,) = csv.DictReader(file)
    meta = json.loads(path.with_name("model.onnx.json").read_text())
    image = eval_transform(InputConfig.from_dict(meta))(read_rgb(shapes / "images" / "test_0000.png"))
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    logits = session.run(None, {"images": image[None].numpy()})[0][0] / meta["temperature"]
    probs = 1 / (1 + np.exp(-logits))
    labels = [name for name, p, t in zip(meta["classes"], probs, meta["thresholds"], strict=True) if p >= t]
    assert "|".join(labels) == row["labels"]
    assert [float(row[f"prob_{name}"]) for name in meta["classes"]] == pytest.approx(probs.tolist(), abs=1e-5)


def test_a_resumed_run_ends_where_an_uninterrupted_one_ends(tmp_path, shapes):
    steps = [
        "+callbacks.every_step._target_=lightning.pytorch.callbacks.ModelCheckpoint",
        f"+callbacks.every_step.dirpath={tmp_path / 'steps'}",
        "+callbacks.every_step.filename='step_{step}'",
        "+callbacks.every_step.auto_insert_metric_name=false",
        "+callbacks.every_step.every_n_train_steps=3",
        "+callbacks.every_step.save_top_k=-1",
    ]
    overrides = ["debug=tiny", *SMALL_MODEL, "trainer.max_epochs=2", "trainer.deterministic=true"]
    cfg = multilabel_cfg(tmp_path, shapes, *overrides, *steps)
    try:
        uninterrupted = train(cfg)
        with open_dict(cfg):
            cfg.paths.output_dir = str(tmp_path / "resumed")
            cfg.ckpt_path = str(tmp_path / "steps" / "step_3.ckpt")  # in the middle of epoch 0 (5 batches)
        resumed = train(cfg)
    finally:
        torch.use_deterministic_algorithms(False)
    a, b = (
        torch.load(p / "checkpoints" / "last.ckpt", weights_only=True) for p in (tmp_path / "run", tmp_path / "resumed")
    )
    assert a["global_step"] == b["global_step"] == 10
    torch.testing.assert_close(a["state_dict"], b["state_dict"], rtol=0, atol=0)
    assert a["hyper_parameters"]["thresholds"] == b["hyper_parameters"]["thresholds"]
    for key in ("val/map", "val/f1", "test/map", "test/tuned_f1"):
        assert resumed[key] == uninterrupted[key], key


def test_an_older_single_label_checkpoint_rebuilds_as_single_label():
    model = FineTuneModule.from_checkpoint(next(Path(__file__).parent.glob("fixtures/*/*.ckpt")))
    assert not model.task.multilabel and "thresholds" not in model.meta and "multilabel" not in model.meta


def test_report_of_a_multilabel_run_has_map_columns(trained, tmp_path):
    run, metrics = trained
    folder = shutil.copytree(run, tmp_path / "run", ignore=shutil.ignore_patterns("*.ckpt"))
    (folder / ".hydra").mkdir()
    (folder / ".hydra" / "overrides.yaml").write_text("- data=multilabel\n")  # what Hydra writes of a run
    with recorded(folder):  # status.json: completed
        pass
    text = report.write_report(folder)
    assert "| run | best val mAP | test mAP | test macro-F1 | epochs | wall time (s) | status |" in text
    (loaded,) = report.load_runs(folder)
    assert loaded.test == pytest.approx(metrics["test/map"]) and loaded.epochs == 2
    assert loaded.test_macro_f1 == pytest.approx(metrics["test/tuned_f1"])
    assert f"(best val mAP {loaded.best_val:.3f}, test mAP {metrics['test/map']:.3f})" in text
    assert "![Precision-recall curves](eval/precision_recall.png)" in text and (folder / "curves.png").is_file()


@pytest.mark.slow  # a run and a two-job sweep through the command line (a minute); the same in-process: `trained`
def test_the_documented_commands_train_sweep_and_report(tmp_path, shapes):
    commands = doc_commands("docs/training.md", "## Multi-label data")
    assert commands == [
        "python train.py data=multilabel data.root=/path/to/images",
        "python train.py -m data=multilabel data.root=/path/to/images seed=1,2",
        "python -m finetune.report logs/train/multiruns/<timestamp>",
    ]
    tiny = ["debug=tiny", *SMALL_MODEL]  # the documented commands, at 32 px on the small backbone
    for command in commands[:2]:
        typed = command.replace("/path/to/images", str(shapes)).split()[1:]
        result = run_cli([*typed, *tiny], tmp_path)
        assert result.returncode == 0, result.output[-3000:]
        assert re.search(r"Test mAP: 0\.\d{4}", result.output)
    (folder,) = (tmp_path / "logs" / "train" / "multiruns").iterdir()
    typed = commands[2].replace("logs/train/multiruns/<timestamp>", str(folder)).split()[1:]
    result = run_cli(typed, tmp_path)
    assert result.returncode == 0, result.output
    assert "| run | seed | best val mAP | test mAP | test macro-F1 | epochs | wall time (s) | status |" in result.output
    assert "## Best run: " in result.output and "test mAP" in result.output

"""eval.py, predict.py and export.py on a real (tiny) trained run: the commands of docs/after-training.md as typed,
a checkpoint out of its run folder, a default changed after training, an older checkpoint, calibration, the figures."""

from __future__ import annotations

import csv
import io
import re
import shutil
from pathlib import Path

import pytest
import torch
from hydra import initialize_config_dir
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams import plugin_data_pb2

from finetune import builders, export
from finetune.builders import rebuild
from finetune.checkpoint import RUN_SETTINGS
from finetune.config import CONFIG_DIR, PROJECT_ROOT
from finetune.eval import evaluate
from finetune.export import export_checkpoint, read_sidecar
from finetune.models.module import FineTuneModule
from finetune.predict import predict_files
from finetune.train import train
from tests.helpers import (
    SMALL_MODEL,
    TINY,
    compose_train,
    doc_commands,
    doc_section,
    event_dir,
    make_image_folder,
    run_cli,
)

HOTDOG64 = PROJECT_ROOT.parent / "shared" / "datasets" / "hotdog64"
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit:FutureWarning")  # TorchScript is deprecated, and asked for


def printed_accuracy(output: str) -> float:
    return float(re.search(r"Test accuracy: ([0-9.]+)", output).group(1))


def assert_image(path: Path, min_width: int = 400, min_height: int = 300) -> None:
    """A real picture: it opens as an image, is large enough and not blank."""
    with Image.open(path) as image:
        assert image.width >= min_width and image.height >= min_height, path
        assert len(set(image.convert("L").getdata())) > 2, path


def copy_run(run: Path, target: Path) -> Path:
    """The run's settings and last checkpoint in `target` (a run folder of its own, so tests may change it)."""
    shutil.copytree(run / ".hydra", target / ".hydra")
    (target / "checkpoints").mkdir(parents=True)
    shutil.copy(run / "checkpoints" / "last.ckpt", target / "checkpoints" / "last.ckpt")
    return target / "checkpoints" / "last.ckpt"


def as_older_version(ckpt: Path) -> None:
    """What an older version wrote: weights and training state, without the model's settings or the run's."""
    checkpoint = torch.load(ckpt, map_location="cpu", weights_only=True)
    del checkpoint["hyper_parameters"], checkpoint[RUN_SETTINGS]
    torch.save(checkpoint, ckpt)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, image_folder) -> tuple[Path, float]:
    """`python train.py` on a generated folder, tiny settings: its run folder and printed test accuracy."""
    root = tmp_path_factory.mktemp("trained")
    args = ["data=imagefolder", f"data.root={image_folder}", *TINY, *SMALL_MODEL]
    result = run_cli(["train.py", *args], root)
    assert result.returncode == 0, result.output
    (run,) = (root / "logs" / "train" / "runs").iterdir()
    return run, printed_accuracy(result.output)


def refuse_config_reads(monkeypatch: pytest.MonkeyPatch) -> None:
    """From now on, any attempt to compose a config from conf/ fails the test."""

    def refuse(*args, **kwargs):
        raise AssertionError(f"conf/ was read: compose{args}")

    monkeypatch.setattr(builders, "compose", refuse)


def test_train_analyses_its_test(trained):
    run, accuracy = trained
    text = (run / "eval" / "eval.md").read_text()
    assert f"| accuracy | {accuracy:.4f} |" in text and "| macro-F1 |" in text and "| ECE (15 bins) |" in text
    assert_image(run / "eval" / "confusion_matrix.png")
    assert_image(run / "eval" / "reliability.png")
    events = EventAccumulator(str(event_dir(run)))
    events.Reload()
    scalars = set(events.Tags()["scalars"])
    assert {"test/macro_f1", "test/balanced_acc", "test/ece", "hp/test/macro_f1", "hp/test/ece"} <= scalars
    macro_f1 = events.Scalars("test/macro_f1")[-1].value
    assert f"| macro-F1 | {macro_f1:.4f} |" in text
    assert {"test/confusion_matrix", "test/reliability"} <= set(events.Tags()["images"])
    content = events.PluginTagToContent("hparams")["_hparams_/experiment"]
    experiment = plugin_data_pb2.HParamsPluginData.FromString(content).experiment  # TensorBoard's HPARAMS tab
    assert {"hp/test/macro_f1", "hp/test/balanced_acc", "hp/test/ece"} <= {m.name.tag for m in experiment.metric_infos}


def test_the_documented_commands_run_as_written(trained, tmp_path):
    run, accuracy = trained
    ckpt = copy_run(run, tmp_path / "run")
    photos = make_image_folder(tmp_path / "photos", train=0, test=3) / "test"
    jpeg = io.BytesIO()
    Image.new("RGB", (64, 48), (200, 30, 30)).save(jpeg, format="JPEG")
    (photos / "truncated.jpg").write_bytes(jpeg.getvalue()[: len(jpeg.getvalue()) // 2])
    (photos / "text.jpg").write_text("not an image\n")
    (photos / "notes.txt").write_text("not an image by name: no row\n")
    commands = doc_commands("docs/after-training.md", "# After training: evaluate, predict, export")
    assert [c.split()[:2] for c in commands] == [
        ["python", "eval.py"],
        ["python", "predict.py"],
        ["python", "export.py"],
    ]
    outputs = []
    for command in commands:
        typed = command.replace("logs/train/runs/<run>", str(tmp_path / "run")).replace("path/to/folder", str(photos))
        result = run_cli(typed.split()[1:], tmp_path)
        assert result.returncode == 0, f"{command}\n{result.output}"
        outputs.append(result.output)
    evaluated, predicted, exported = outputs

    # eval.py eval.calibrate=true: the printed accuracy, the report, the temperature stored in the checkpoint
    assert printed_accuracy(evaluated) == accuracy
    temperature = float(re.search(r"at T = ([0-9.]+)\)", evaluated).group(1))
    stored = torch.load(ckpt, map_location="cpu", weights_only=True)["hyper_parameters"]["temperature"]
    assert stored == pytest.approx(temperature, abs=5e-4)  # printed to 3 decimals
    assert FineTuneModule.from_checkpoint(ckpt).meta["temperature"] == stored
    report = tmp_path / "run" / "eval"
    assert f"(T = {temperature:.3f})" in (report / "eval.md").read_text()
    assert_image(report / "confusion_matrix.png")
    assert_image(report / "reliability.png")
    events = EventAccumulator(str(report / "tensorboard"))
    events.Reload()
    assert {"eval/acc", "eval/macro_f1", "eval/balanced_acc", "eval/ece", "eval/ece_calibrated"} <= set(
        events.Tags()["scalars"]
    )
    assert events.Scalars("eval/acc")[0].value == pytest.approx(accuracy, abs=1e-4)

    # predict.py: a row per image file, the unreadable ones with their reason; the count per class printed
    csv_path = Path(re.search(r"Predictions: (\S+)", predicted).group(1))
    with open(csv_path, newline="") as file:
        rows = {Path(row["path"]).relative_to(photos).as_posix(): row for row in csv.DictReader(file)}
    assert sorted(rows) == [
        *(f"{c}/{i:03d}.png" for c in ("blue", "red") for i in range(3)),
        "text.jpg",
        "truncated.jpg",
    ]
    assert "truncated" in rows["truncated.jpg"]["error"].lower() and rows["truncated.jpg"]["top1_class"] == ""
    assert "UnidentifiedImageError" in rows["text.jpg"]["error"] and "notes.txt" not in rows
    good = [row for name, row in rows.items() if name.endswith(".png")]
    assert len(good) == 6 and all(row["error"] == "" and row["top1_class"] in ("blue", "red") for row in good)
    counts = {c: sum(row["top1_class"] == c for row in good) for c in ("blue", "red")}
    assert f"Predicted 6 of 8 files: blue {counts['blue']}, red {counts['red']}" in predicted
    assert "2 files could not be read" in predicted

    # export.py format=onnx: the file, its sidecar, the parity printed
    onnx = Path(re.search(r"Exported (\S+\.onnx) ", exported).group(1))
    assert read_sidecar(onnx) == FineTuneModule.from_checkpoint(ckpt).meta  # with the stored temperature
    difference = float(re.search(r"on 6 test images: max \|logit difference\| (\S+),", exported).group(1))
    assert difference < 1e-4 and "top-1 the same" in exported


def test_the_documented_snippet_is_the_tested_one():
    text = doc_section("docs/after-training.md", "## The exported model without this project")
    documented = re.search(r"```python\n(.*?)```", text, flags=re.S).group(1)
    assert documented == re.search(r"```python\n(.*?)```", export.__doc__, flags=re.S).group(1)  # run by test_export


def test_a_moved_checkpoint_evaluates_predicts_and_exports(trained, image_folder, tmp_path, capsys, monkeypatch):
    run, accuracy = trained
    moved = tmp_path / "elsewhere" / "model.ckpt"
    moved.parent.mkdir()
    shutil.copy(run / "checkpoints" / "last.ckpt", moved)
    evaluation = compose_train(tmp_path, [f"ckpt_path={moved}"], "eval")
    prediction = compose_train(
        tmp_path, [f"ckpt_path={moved}", f"input={image_folder / 'test'}", "predict.num_workers=0"], "predict"
    )
    exporting = compose_train(tmp_path, [f"ckpt_path={moved}", "format=torchscript"], "export")
    refuse_config_reads(monkeypatch)  # all from the checkpoint

    evaluate(evaluation)
    assert printed_accuracy(capsys.readouterr().out) == accuracy
    assert f"| accuracy | {accuracy:.4f} |" in (moved.parent / "eval" / "eval.md").read_text()

    summary = predict_files(prediction)
    assert summary.images == 12 and summary.errors == 0
    with open(moved.parent / "eval" / "confusion_matrix.csv") as file:  # the test images are predict's input
        header, *rows = list(csv.reader(file))
    predicted = {name: sum(int(row[i]) for row in rows) for i, name in enumerate(header[1:], start=1)}
    assert summary.per_class == predicted  # what eval.py predicted for the same images

    path, parity = export_checkpoint(exporting)
    assert path == tmp_path / "run" / "model.pt" and (tmp_path / "run" / "model.pt.json").is_file()
    assert parity.max_abs_diff < 1e-5 and parity.top1_agrees
    assert "on 6 test images" in capsys.readouterr().out


def test_a_default_changed_after_training_does_not_change_what_eval_evaluates(trained, tmp_path, capsys):
    """conf/ as it might be edited after training (the tiny image size 32 -> 48): replaying the run's overrides
    against it, as eval.py used to, rebuilds another model input; the stored settings rebuild the trained one."""
    run, accuracy = trained
    conf = shutil.copytree(CONFIG_DIR, tmp_path / "conf")
    tiny = conf / "debug" / "tiny.yaml"
    tiny.write_text(tiny.read_text().replace("image_size: 32", "image_size: 48"))
    older = copy_run(run, tmp_path / "older")
    as_older_version(older)
    ckpt = run / "checkpoints" / "last.ckpt"
    cfg = compose_train(tmp_path, [f"ckpt_path={ckpt}", f"eval.output_dir={tmp_path / 'eval'}"], "eval")
    with initialize_config_dir(config_dir=str(conf), version_base="1.3"):  # what `compose` would now read
        datamodule, model = rebuild(ckpt, [])
        assert datamodule.input_config.image_size == model.input_config.image_size == 32
        assert rebuild(older, [])[0].input_config.image_size == 48  # the control: the old way sees the edit
        evaluate(cfg)
    assert printed_accuracy(capsys.readouterr().out) == accuracy
    assert "| images | 12 |" in (tmp_path / "eval" / "eval.md").read_text()


def test_an_older_checkpoint_evaluates_through_its_run_folder_with_a_note(trained, tmp_path, capsys, caplog):
    run, accuracy = trained
    older = copy_run(run, tmp_path / "run")
    as_older_version(older)
    moved = tmp_path / "model.ckpt"
    shutil.copy(older, moved)
    in_run, out_of_run = (compose_train(tmp_path, [f"ckpt_path={path}"], "eval") for path in (older, moved))
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        evaluate(in_run)
        assert printed_accuracy(capsys.readouterr().out) == accuracy
        assert "holds no run settings (an older version wrote it): rebuilding from its run folder" in caplog.text
        with pytest.raises(FileNotFoundError, match=r"model.ckpt holds no run settings .* evaluate it inside its"):
            evaluate(out_of_run)


def noisy_folder(root: Path) -> Path:
    """Blue and red images as `make_image_folder` draws them, a third of each class filed under the other."""
    make_image_folder(root, train=30, test=30)
    for split in ("train", "test"):
        for name, other in (("blue", "red"), ("red", "blue")):
            for path in sorted((root / split / name).glob("*.png"))[::3]:
                path.rename(root / split / other / f"{name}-{path.name}")
    return root


def test_calibration_lowers_the_ece_of_an_over_confident_model(trained, tmp_path, capsys):
    """The tiny model with its logits x 100 (certain of every answer) on images a third of which are labelled
    the other class: right 2/3 of the time at ~100 % confidence. Temperature scaling on the validation half of
    the training images brings its confidence down to its accuracy."""
    run, _ = trained
    ckpt = copy_run(run, tmp_path / "run")
    checkpoint = torch.load(ckpt, map_location="cpu", weights_only=True)
    for name in ("head.weight", "head.bias"):
        checkpoint["state_dict"][name] *= 100
    torch.save(checkpoint, ckpt)
    data = noisy_folder(tmp_path / "noisy")
    overrides = [f"ckpt_path={ckpt}", f'overrides=["data.root={data}","data.val_fraction=0.5"]', "eval.calibrate=true"]
    metrics = evaluate(compose_train(tmp_path, overrides, "eval"))
    assert 0.55 < metrics["eval/acc"] < 0.8
    assert metrics["eval/ece"] > 0.2 and metrics["eval/ece_calibrated"] < metrics["eval/ece"] / 2
    temperature = torch.load(ckpt, weights_only=True)["hyper_parameters"]["temperature"]
    assert temperature > 5
    assert f"at T = {temperature:.3f})" in capsys.readouterr().out
    report = tmp_path / "run" / "eval"
    assert_image(report / "top_errors.png")  # wrong answers now: the grid of the most confident ones
    text = (report / "eval.md").read_text()
    assert f"{metrics['eval/ece']:.3f} before, {metrics['eval/ece_calibrated']:.3f} after" in text
    assert "- temperature fitted on the validation split and stored in last.ckpt" in text


@pytest.mark.slow
@pytest.mark.skipif(not HOTDOG64.is_dir(), reason=f"{HOTDOG64} is not there")
def test_efficientnet_exports_match_pytorch_on_real_photos(tmp_path, capsys):
    """EfficientNet-Lite0 with its ImageNet weights, fine-tuned a few steps on hotdog64 photos at 64 px, exported
    from its checkpoint: both formats agree with PyTorch within 1e-4 on 8 of its test photos."""
    overrides = ["model=efficientnet_lite0", "data=imagefolder", f"data.root={HOTDOG64}", *TINY, "data.image_size=64"]
    train(compose_train(tmp_path, [*overrides, "+trainer.limit_train_batches=3", "+trainer.limit_val_batches=2"]))
    ckpt = tmp_path / "run" / "checkpoints" / "last.ckpt"
    for fmt in ("onnx", "torchscript"):
        _, parity = export_checkpoint(compose_train(tmp_path / fmt, [f"ckpt_path={ckpt}", f"format={fmt}"], "export"))
        assert parity.max_abs_diff < 1e-4 and parity.top1_agrees, (fmt, parity)
    assert capsys.readouterr().out.count("on 8 test images") == 2

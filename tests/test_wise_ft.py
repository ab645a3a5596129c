"""WiSE-FT (`wise_ft.py`) and the linear probe it starts from (`checkpoints/probe.ckpt`), on tiny runs of the default
recipe: the probe saved at the unfreeze with the pretrained backbone, the two ends reproduced exactly, alpha chosen
on validation, its checkpoint taken by eval.py and export.py, a missing or foreign start refused."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest
import timm
import torch
from torch.utils.data import DataLoader, TensorDataset

from finetune.builders import rebuild
from finetune.checkpoint import PROBE, ProbeCheckpoint
from finetune.config import compose_config
from finetune.eval import evaluate, gather_logits
from finetune.export import export_checkpoint
from finetune.finetuning import StageUnfreezing
from finetune.models.backbones import timm_backbone
from finetune.models.module import FineTuneModule
from finetune.settings import plain
from finetune.train import train
from finetune.weight_space import average, score, start
from finetune.wise_ft import alpha_grid, wise_ft
from tests.helpers import compose_train, doc_commands, run_cli

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit:FutureWarning")  # TorchScript is deprecated, and asked for
STRATEGIES = ["freeze_unfreeze", "gradual", "freeze", "finetune", "llrd", "scratch"]


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory) -> Path:
    """timm's test_resnet weights as a pretrained weights file (model.weights_path): offline, and `pretrained`,
    so the default `strategy.bn=eval` keeps their BatchNorm statistics."""
    path = tmp_path_factory.mktemp("weights") / "test_resnet.pth"
    torch.save(timm.create_model("test_resnet").state_dict(), path)
    return path


@pytest.fixture(scope="module")
def runs(tmp_path_factory, image_folder, pretrained) -> dict[str, Path]:
    """Two epochs of the default recipe (strategy=freeze_unfreeze: the head alone in epoch 0) and one of a linear
    probe (strategy=freeze) of the same seed and data, on the small backbone with the weights above: their run
    folders."""
    root = tmp_path_factory.mktemp("wise_ft")
    overrides = [
        "debug=tiny",
        "data.min_steps_per_epoch=20",  # the default budget (debug=tiny's is one pass)
        "data.val_fraction=0.5",
        "data=imagefolder",
        f"data.root={image_folder}",
        "model=timm",
        "model.name=test_resnet",
        f"model.weights_path={pretrained}",
        "trainer.max_epochs=2",
    ]
    train(compose_train(root / "freeze_unfreeze", overrides))
    train(compose_train(root / "freeze", [*overrides, "strategy=freeze", "trainer.max_epochs=1"]))
    return {strategy: root / strategy / "run" for strategy in ("freeze_unfreeze", "freeze")}


def logits(ckpt: Path | FineTuneModule, images: torch.Tensor) -> torch.Tensor:
    model = FineTuneModule.from_checkpoint(ckpt) if isinstance(ckpt, Path) else ckpt
    with torch.inference_mode():
        return model.eval()(images)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_the_probe_is_saved_when_a_head_only_phase_ends(strategy, tmp_path):
    schedule = compose_config([f"strategy={strategy}"], tmp_path).strategy
    unfreezing = StageUnfreezing(**{k: plain(schedule[k]) for k in ("trainable", "unfreeze_at", "unfreeze_step")})
    saved_after = [epoch for epoch in range(6) if ProbeCheckpoint.ends_head_only_phase(unfreezing, epoch, 5)]
    assert saved_after == ([0] if strategy in ("freeze_unfreeze", "gradual") else [])


def test_the_default_run_saves_the_probe_with_the_pretrained_backbone(runs, pretrained):
    checkpoints = runs["freeze_unfreeze"] / "checkpoints"
    probe = torch.load(checkpoints / PROBE, map_location="cpu", weights_only=True)
    last = torch.load(checkpoints / "last.ckpt", map_location="cpu", weights_only=True)
    assert probe["epoch"] == 0 and "optimizer_states" not in probe and probe["run_settings"] == last["run_settings"]
    source = timm_backbone("test_resnet", weights_path=str(pretrained)).state_dict()
    backbone = {k.removeprefix("backbone."): v for k, v in probe["state_dict"].items() if k.startswith("backbone.")}
    assert backbone.keys() == source.keys()
    assert all(torch.equal(backbone[k], source[k]) for k in source)  # weights and BatchNorm statistics
    weights = [k for k in source if k.endswith(".weight")]
    moved = [k for k in weights if not torch.equal(last["state_dict"][f"backbone.{k}"], source[k])]
    assert len(moved) == len(weights)  # the end fine-tuned every layer after the probe
    assert not torch.equal(probe["state_dict"]["head.weight"], last["state_dict"]["head.weight"])
    statistics = [k for k in source if k.endswith(("running_mean", "running_var"))]
    assert statistics and all(
        torch.equal(last["state_dict"][f"backbone.{k}"], source[k]) for k in statistics
    )  # bn=eval
    assert not list(runs["freeze"].rglob(PROBE))  # a linear probe's last.ckpt is its probe


def test_alpha_0_and_1_reproduce_the_two_checkpoints_exactly(runs):
    checkpoints = runs["freeze_unfreeze"] / "checkpoints"
    end, probe = (torch.load(checkpoints / name, weights_only=True)["state_dict"] for name in ("last.ckpt", PROBE))
    model = FineTuneModule.from_checkpoint(checkpoints / "last.ckpt")
    images = torch.randn(4, 3, 32, 32)
    for alpha, ckpt in ((0.0, checkpoints / PROBE), (1.0, checkpoints / "last.ckpt")):
        model.load_state_dict(average((end, probe), (alpha, 1 - alpha)))
        assert torch.equal(logits(model, images), logits(ckpt, images)), alpha
    model.load_state_dict(average((end, probe), (0.5, 0.5)))
    assert not torch.equal(logits(model, images), logits(checkpoints / "last.ckpt", images))


def test_the_average_interpolates_batchnorm_statistics_and_keeps_integer_and_training_tensors():
    end = {
        "backbone.bn.running_mean": torch.tensor([4.0]),
        "backbone.bn.num_batches_tracked": torch.tensor(9),
        "head.weight": torch.tensor([[8.0]]),
        "loss_terms.l2sp.source": torch.tensor([1.0]),  # a loss term's buffer: training only
    }
    probe = {
        "backbone.bn.running_mean": torch.tensor([0.0]),
        "backbone.bn.num_batches_tracked": torch.tensor(3),
        "head.weight": torch.tensor([[0.0]]),
        "loss_terms.l2sp.source": torch.tensor([5.0]),
    }
    averaged = average((end, probe), (0.25, 0.75))
    assert averaged["backbone.bn.running_mean"].item() == 1.0 and averaged["head.weight"].item() == 2.0
    assert averaged["backbone.bn.num_batches_tracked"].item() == 9  # a count: the end's
    assert averaged["loss_terms.l2sp.source"].item() == 1.0


def table(output: str) -> dict[float, tuple[float, str]]:
    """alpha -> (val acc, test acc) of the printed table."""
    rows = re.findall(r"^\| ([0-9.]+) \| ([0-9.]+) \| [0-9.]+ \| ([0-9.]*) \|", output, flags=re.M)
    return {float(alpha): (float(val), test) for alpha, val, test in rows}


def test_the_documented_command_chooses_alpha_on_validation_and_its_checkpoint_evaluates_and_exports(
    runs, tmp_path, capsys
):
    (command,) = doc_commands("docs/after-training.md", "## WiSE-FT: `wise_ft.py`")
    typed = command.replace("logs/train/runs/<run>", str(runs["freeze_unfreeze"]))
    result = run_cli(typed.split()[1:], tmp_path)
    assert result.returncode == 0, result.output
    points = table(result.output)
    assert sorted(points) == [a / 10 for a in range(11)]
    alpha = float(re.search(r"WiSE-FT: alpha ([0-9.]+) chosen", result.output).group(1))
    assert points[alpha][0] == max(val for val, _ in points.values()) >= max(points[0.0][0], points[1.0][0])
    assert [a for a, (_, test) in points.items() if test] == sorted({0.0, alpha, 1.0})
    ckpt = Path(re.search(r"Checkpoint: (\S+)", result.output).group(1))
    assert ckpt.parents[2] == tmp_path / "logs" / "wise_ft" / "runs"  # its own run folder
    saved = torch.load(ckpt, map_location="cpu", weights_only=True)
    assert saved["wise_ft"]["alpha"] == alpha and saved["hyper_parameters"]["temperature"] == 1.0
    printed = [line for line in result.output.splitlines() if line.startswith("|")]
    assert "\n".join(printed) in (ckpt.parent.parent / "wise_ft.md").read_text()

    metrics = evaluate(compose_train(tmp_path, [f"ckpt_path={ckpt}"], "eval"))
    assert metrics["eval/acc"] == pytest.approx(float(points[alpha][1]), abs=1e-4)
    assert (ckpt.parent.parent / "eval" / "eval.md").is_file()
    _, parity = export_checkpoint(
        compose_train(tmp_path / "export", [f"ckpt_path={ckpt}", "format=torchscript"], "export")
    )
    assert parity.max_abs_diff < 1e-5 and parity.top1_agrees


def test_a_linear_probe_run_is_a_start_too(runs, tmp_path):
    probe_run = runs["freeze"] / "checkpoints" / "last.ckpt"
    overrides = [f"ckpt_path={runs['freeze_unfreeze'] / 'checkpoints' / 'last.ckpt'}", f"wise_ft.start={probe_run}"]
    result = wise_ft(compose_train(tmp_path, [*overrides, "wise_ft.alphas=[0.5]"], "wise_ft"))
    assert [p.alpha for p in result.points] == [0.0, 0.5, 1.0]
    datamodule, model = rebuild(probe_run, [])
    datamodule.setup("validate")
    predicted, labels = gather_logits(model, datamodule.val_dataloader(), torch.device("cpu"), "none", "validation")
    assert result.points[0].val.acc == float((predicted.argmax(1) == labels).float().mean())  # alpha 0: that run
    assert torch.load(result.checkpoint, weights_only=True)["wise_ft"]["start"] == str(probe_run.resolve())


def test_without_a_start_it_says_how_to_get_one(runs, tmp_path):
    moved = tmp_path / "model.ckpt"
    shutil.copy(runs["freeze_unfreeze"] / "checkpoints" / "last.ckpt", moved)
    with pytest.raises(FileNotFoundError, match=r"no probe.ckpt is beside .*strategy=freeze_unfreeze.*wise_ft.start="):
        wise_ft(compose_train(tmp_path, [f"ckpt_path={moved}"], "wise_ft"))


def test_a_start_of_other_data_is_refused(runs, tmp_path):
    checkpoints = runs["freeze_unfreeze"] / "checkpoints"
    other = torch.load(checkpoints / PROBE, weights_only=True)
    other["run_settings"]["data"]["seed"] = 7  # another validation split
    torch.save(other, tmp_path / "other.ckpt")
    overrides = [f"ckpt_path={checkpoints / 'last.ckpt'}", f"wise_ft.start={tmp_path / 'other.ckpt'}"]
    with pytest.raises(ValueError, match=r"no start of .* they differ in data.seed: 42 vs 7"):
        wise_ft(compose_train(tmp_path, overrides, "wise_ft"))


def test_alphas_out_of_range_are_refused():
    assert alpha_grid([0.5, 0.25]) == [0.0, 0.25, 0.5, 1.0]
    with pytest.raises(ValueError, match=r"wise_ft.alphas=\[0.5, 2\] must be a list of numbers from 0 to 1"):
        alpha_grid([0.5, 2])


def test_lora_checkpoints_are_refused(runs):
    """The average of LoRA's factors is not the average of its updates."""
    checkpoint = torch.load(runs["freeze_unfreeze"] / "checkpoints" / PROBE, weights_only=True)
    checkpoint["state_dict"]["backbone.stages.4.conv1.lora_A.default.weight"] = torch.zeros(8, 16, 1, 1)
    with pytest.raises(ValueError, match=r"x.ckpt holds LoRA adapters \(peft=lora\)"):
        start(checkpoint, "x.ckpt")


def test_multi_label_runs_are_refused(runs):
    model = FineTuneModule.from_checkpoint(runs["freeze_unfreeze"] / "checkpoints" / "last.ckpt")
    loader = DataLoader(TensorDataset(torch.randn(2, 3, 32, 32), torch.tensor([[1.0, 0.0], [1.0, 1.0]])))
    with pytest.raises(ValueError, match="single-label accuracy: a multi-label run's are not taken"):
        score(model, model.state_dict(), loader, torch.device("cpu"), "validation")

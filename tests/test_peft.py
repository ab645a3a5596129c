"""Parameter-efficient fine-tuning (`peft=bitfit|norm_only|lora`, finetune.models.parameter_efficient): each method
of docs/strategies.md, with the default strategy, trains its parameters and leaves every other tensor bit-identical;
LoRA merges to the adapted logits, its checkpoint rebuilds alone (from_checkpoint, eval.py, predict.py) and exports
merged, and its resume stays exact; the trainable parameter counts, by hand; the config rules.

The backbone is timm's test_resnet (tests/helpers.py's SMALL_MODEL) with its random init saved as "pretrained"
weights (`model.weights_path`): peft adapts pretrained weights (`strategy.pretrained=false` is an error), and with
them the default `strategy.bn=eval` holds."""

from __future__ import annotations

import copy
import csv
import logging
import shlex
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import onnx
import pytest
import timm
import torch
from peft.tuners.lora import LoraLayer
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams import plugin_data_pb2
from torch import nn

from finetune.builders import build, rebuild
from finetune.compare import plan, with_setting
from finetune.errors import exit_on_user_error
from finetune.eval import evaluate, gather_logits
from finetune.export import export_checkpoint
from finetune.finetuning import ParameterCounts, StageUnfreezing
from finetune.models.module import FineTuneModule
from finetune.models.parameter_efficient import merged
from finetune.predict import predict_files
from finetune.settings import plain
from finetune.train import train
from finetune.validation import config_problems, validate
from tests.helpers import compose_train, doc_commands, event_dir, make_image_folder
from tests.test_resume import (  # noqa: F401 (an autouse fixture)
    RUN,
    STEPS_PER_EPOCH,
    _restore_determinism,
    kill_mid_epoch,
    resume_and_run_uninterrupted,
)

pytestmark = pytest.mark.usefixtures("one_thread")

# test_resnet with 2 classes, counted by hand: its BatchNorm layers have 16, 16, 32 (stem), 32, 32 (layer1),
# 48, 48, 48 (layer2 and its downsample), 48, 48, 192, 192 (layer3), 96, 96, 96 (layer4) channels
BACKBONE, NORM_CHANNELS, HEAD = 372_688, 16 + 16 + 32 + 32 + 32 + 48 * 3 + 48 * 2 + 192 * 2 + 96 * 3, 96 * 2 + 2
# LoRA of rank 8 on the blocks' conv1 and conv2: r x (in x k x k + out) each (A: in x k x k -> r, B: r -> out)
LORA_BLOCKS = 8 * sum(
    cin * k * k + cout
    for cin, cout, k in [
        (32, 32, 3), (32, 32, 3),  # layer1
        (32, 48, 3), (48, 48, 3),  # layer2
        (48, 48, 1), (48, 48, 3),  # layer3 (conv3, the 1x1 projection, is not a target)
        (192, 96, 3), (96, 96, 3),  # layer4
    ]
)  # fmt: skip
# layer3 and layer4 (the top 2 stages), weights and BatchNorm (weight and bias per channel)
TOP_TWO_STAGES = (48 * 48 + 48 * 48 * 9 + 48 * 192 * 2 + 2 * (48 + 48 + 192 + 192)) + (
    192 * 96 * 9 + 96 * 96 * 9 + 192 * 96 + 2 * 96 * 3
)


def documented(command: str) -> list[list[str]]:
    """The arguments of each `python <command>` line of the docs' block, as typed."""
    lines = doc_commands("docs/strategies.md", "## Parameter-efficient fine-tuning")
    commands = [shlex.split(line, comments=True) for line in lines]
    return [words[2:] for words in commands if words[1] == command]


def methods() -> dict[str, list[str]]:
    """The documented train.py commands by method (`peft=<method>` comes first)."""
    return {args[0].removeprefix("peft="): args for args in documented("train.py")}


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> list[str]:
    """test_resnet with "pretrained" weights from a file, and the image folder it trains on (2 classes)."""
    folder = tmp_path_factory.mktemp("source")
    torch.manual_seed(0)
    model = timm.create_model("test_resnet")
    for module in model.modules():  # as trained BatchNorm layers look: no zero scales (timm's zero_init_last)
        if isinstance(module, nn.BatchNorm2d):
            nn.init.uniform_(module.weight, 0.5, 1.5)
            nn.init.normal_(module.bias, 0, 0.1)
            nn.init.normal_(module.running_mean, 0, 0.1)
            nn.init.uniform_(module.running_var, 0.5, 1.5)
    torch.save(model.state_dict(), folder / "test_resnet.pth")
    images = make_image_folder(folder / "images")
    return [
        "data=imagefolder",
        f"data.root={images}",
        "debug=tiny",
        "model=timm",
        "model.name=test_resnet",
        f"model.weights_path={folder / 'test_resnet.pth'}",
    ]


@dataclass
class Run:
    start: dict[str, torch.Tensor]  # the weights of the built model, before training
    trainable: set[str]  # the backbone parameters that require grad in the built model
    ckpt: Path
    status: dict[str, object]
    log: str


class Lines(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


@pytest.fixture(scope="module")
def runs(source, tmp_path_factory) -> dict[str, Run]:
    """Each documented method trained with the defaults a user gets (freeze_unfreeze: the head alone in epoch 0,
    then the method's parameters in epoch 1), tiny, 2 epochs."""
    found = {}
    for method, overrides in methods().items():
        cfg = compose_train(tmp_path_factory.mktemp(method), [*source, "trainer.max_epochs=2", *overrides])
        L.seed_everything(cfg.seed, workers=True)  # as train() builds it
        _, model = build(cfg)
        start = {key: value.clone() for key, value in model.state_dict().items()}
        trainable = {name for name, p in model.backbone.named_parameters() if p.requires_grad}
        handler, status, logger = Lines(), {}, logging.getLogger("finetune.train")
        level = logger.level
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        try:
            train(cfg, status)
        finally:
            logger.removeHandler(handler)
            logger.setLevel(level)
        ckpt = Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt"
        found[method] = Run(start, trainable, ckpt, status, "\n".join(handler.lines))
    return found


def norm_parameters(model: nn.Module) -> set[str]:
    return {
        f"{name}.{key}"
        for name, module in model.named_modules()
        if isinstance(module, nn.BatchNorm2d)
        for key, _ in module.named_parameters(recurse=False)
    }


def expected_trainable(method: str, backbone: nn.Module) -> set[str]:
    """What the method trains of the backbone, by its definition."""
    names = {name for name, _ in backbone.named_parameters()}
    if method == "bitfit":
        return {name for name in names if name.endswith(".bias")}
    if method == "norm_only":
        return norm_parameters(backbone)
    return {name for name in names if ".lora_" in name}


def test_the_docs_list_the_three_methods():
    assert set(methods()) == {"bitfit", "norm_only", "lora"}


@pytest.mark.parametrize("method", ["bitfit", "norm_only", "lora"])
def test_a_method_trains_its_parameters_and_every_other_tensor_stays_bit_identical(runs, method):
    run = runs[method]
    model = FineTuneModule.from_checkpoint(run.ckpt)
    trains = expected_trainable(method, model.backbone)
    assert run.trainable == trains and trains  # the others get no gradient (requires_grad=False)
    end = torch.load(run.ckpt, map_location="cpu", weights_only=True)["state_dict"]
    assert end.keys() == run.start.keys()
    changed = {key.removeprefix("backbone.") for key in end if not torch.equal(end[key], run.start[key])}
    # the head and exactly the method's parameters moved; every other weight, and the BatchNorm statistics, did not
    assert changed - trains == {"head.weight", "head.bias"}
    assert changed & trains == trains, trains - changed
    if method == "lora":  # the documented targets: the blocks' conv1 and conv2, no stem or 1x1 downsample conv
        adapted = {name for name, module in model.backbone.named_modules() if isinstance(module, LoraLayer)}
        assert adapted and all(name.endswith((".conv1", ".conv2")) for name in adapted)
        assert len(adapted) == 8 and run.start.keys() >= {f"backbone.{name}.base_layer.weight" for name in adapted}


def test_a_method_gives_no_gradient_to_what_it_keeps(source, tmp_path):
    cfg = compose_train(tmp_path, [*source, "peft=bitfit", "strategy=finetune"])
    _, model = build(cfg)
    model.train()
    model(torch.randn(4, 3, 32, 32)).sum().backward()
    grads = {name for name, p in model.backbone.named_parameters() if p.grad is not None}
    assert grads == expected_trainable("bitfit", model.backbone)


def randomise_lora(state: dict[str, torch.Tensor]) -> None:
    """LoRA's B away from its 0 start, so that the updates change the logits clearly."""
    generator = torch.Generator().manual_seed(0)
    for key, value in state.items():
        if ".lora_B." in key:
            value.copy_(torch.randn(value.shape, generator=generator) * 0.05)


def test_the_merged_network_gives_the_adapted_logits(source, tmp_path):
    _, model = build(compose_train(tmp_path, [*source, "peft=lora"]))
    model.eval()
    images = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        base = model(images)
        randomise_lora(model.state_dict())
        adapted = model(images)
        network = merged(model.network())
        merged_logits = network(images)
    assert (adapted - base).abs().max() > 1e-2  # the updates matter
    assert (merged_logits - adapted).abs().max() < 1e-5
    assert not any(isinstance(module, LoraLayer) for module in network.modules())
    assert any(isinstance(module, LoraLayer) for module in model.modules())  # the model keeps its adapters
    _, plain_model = build(compose_train(tmp_path, source))
    assert network.state_dict().keys() == plain_model.network().state_dict().keys()  # the backbone's own layers


@pytest.fixture
def lora_ckpt(runs, tmp_path) -> Path:
    """The LoRA run's checkpoint with updates that change the logits clearly (tiny training barely moves B)."""
    checkpoint = torch.load(runs["lora"].ckpt, map_location="cpu", weights_only=True)
    randomise_lora(checkpoint["state_dict"])
    torch.save(checkpoint, tmp_path / "last.ckpt")
    return tmp_path / "last.ckpt"


def test_the_lora_checkpoint_rebuilds_alone_evaluates_predicts_and_exports_merged(lora_ckpt, tmp_path):
    model = FineTuneModule.from_checkpoint(lora_ckpt)
    stored = torch.load(lora_ckpt, map_location="cpu", weights_only=True)["state_dict"]
    torch.testing.assert_close(model.state_dict(), stored, rtol=0, atol=0)
    datamodule, rebuilt = rebuild(lora_ckpt, [])  # what eval.py and predict.py run on
    datamodule.setup("test")
    logits, labels = gather_logits(rebuilt, datamodule.test_dataloader(), torch.device("cpu"), "none", "test")
    without = copy.deepcopy(model)
    without.load_state_dict({k: v.zero_() if ".lora_B." in k else v for k, v in without.state_dict().items()})
    base, _ = gather_logits(without, datamodule.test_dataloader(), torch.device("cpu"), "none", "test")
    assert (logits - base).abs().max() > 1e-2  # the adapters are loaded and used

    metrics = evaluate(
        compose_train(tmp_path, [f"ckpt_path={lora_ckpt}", f"eval.output_dir={tmp_path / 'eval'}"], "eval")
    )
    assert metrics["eval/acc"] == (logits.argmax(1) == labels).float().mean().item()

    output = tmp_path / "predictions.csv"
    predict = [f"ckpt_path={lora_ckpt}", f"input={datamodule.root / 'test'}", f"predict.output={output}"]
    predict_files(compose_train(tmp_path, [*predict, "predict.num_workers=0"], "predict"))
    with open(output, newline="") as file:
        rows = {Path(row["path"]).resolve(): row for row in csv.DictReader(file)}
    test = datamodule.datasets["test"]
    paths = [Path(test.dataset.samples[index][0]).resolve() for index in test.indices]
    for path, expected in zip(paths, logits.softmax(1), strict=True):
        assert float(rows[path]["top1_prob"]) == pytest.approx(float(expected.max()), abs=1e-6)

    path, parity = export_checkpoint(
        compose_train(
            tmp_path, [f"ckpt_path={lora_ckpt}", "format=onnx", f"output={tmp_path / 'model.onnx'}"], "export"
        )
    )
    assert parity.max_abs_diff < 1e-4 and parity.top1_agrees  # the merged ONNX against the adapted model
    assert not [w.name for w in onnx.load(str(path)).graph.initializer if "lora" in w.name]


@pytest.mark.slow  # 40 s: a run killed by SIGKILL, resumed, and run again uninterrupted
def test_a_lora_run_killed_mid_epoch_resumes_to_the_same_weights_and_optimizer_state(source, tmp_path):
    images = make_image_folder(tmp_path / "images", train=24, test=6)  # 6 steps per epoch, as RUN counts them
    run = [*RUN, *source[3:], "strategy.pretrained=true", "peft=lora", f"data.root={images}", "data.num_workers=0"]
    killed = kill_mid_epoch(tmp_path, run)
    assert killed["epoch"] == 2 and killed["global_step"] % STEPS_PER_EPOCH  # after the unfreeze, mid-epoch

    a, b, resumed, uninterrupted = resume_and_run_uninterrupted(tmp_path, run)
    assert a["global_step"] == b["global_step"] == 3 * STEPS_PER_EPOCH
    assert any(".lora_A." in key for key in a["state_dict"])
    torch.testing.assert_close(a["state_dict"], b["state_dict"], rtol=0, atol=0)
    (optimizer_a,), (optimizer_b,) = a["optimizer_states"], b["optimizer_states"]
    torch.testing.assert_close(optimizer_a["state"], optimizer_b["state"], rtol=0, atol=0)  # momentum buffers
    assert optimizer_a["param_groups"] == optimizer_b["param_groups"]
    for key in ("val/acc", "val/loss", "test/acc", "test/loss"):
        assert resumed[key] == uninterrupted[key], key


def counts(source: list[str], tmp_path: Path, overrides: list[str]) -> ParameterCounts:
    cfg = compose_train(tmp_path, [*source, "trainer.max_epochs=5", *overrides])  # debug=tiny's 1: conf's 5
    _, model = build(cfg)
    schedule = StageUnfreezing(
        **{key: plain(cfg.strategy[key]) for key in ("trainable", "unfreeze_at", "unfreeze_step")}
    )
    return schedule.parameter_counts(model, cfg.trainer.max_epochs)


@pytest.mark.parametrize(
    ("overrides", "trainable", "total"),
    [
        ([], BACKBONE + HEAD, BACKBONE + HEAD),  # the default: everything after the unfreeze at epoch 1
        (["trainer.max_epochs=1"], HEAD, BACKBONE + HEAD),  # the unfreeze never comes: a linear probe
        (["strategy=freeze"], HEAD, BACKBONE + HEAD),
        (["strategy=gradual", "trainer.max_epochs=3"], TOP_TWO_STAGES + HEAD, BACKBONE + HEAD),  # stage 4, then 3
        (["peft=bitfit"], NORM_CHANNELS + HEAD, BACKBONE + HEAD),  # its biases are the BatchNorm shifts
        (["peft=norm_only"], 2 * NORM_CHANNELS + HEAD, BACKBONE + HEAD),
        (["peft=lora", "peft.target_modules=[conv1,conv2]"], LORA_BLOCKS + HEAD, BACKBONE + LORA_BLOCKS + HEAD),
        (["peft=bitfit", "strategy=gradual", "trainer.max_epochs=3"], 48 + 48 + 192 + 192 + 96 * 3 + HEAD, None),
    ],
)
def test_the_trainable_parameters_counted_by_hand(source, tmp_path, overrides, trainable, total):
    found = counts(source, tmp_path, overrides)
    assert found.trainable == trainable
    assert found.total == (total or BACKBONE + HEAD)


def test_each_run_logs_its_trainable_parameters_and_writes_them_into_hparams_and_status(runs):
    run = runs["bitfit"]
    assert f"Trainable parameters: {NORM_CHANNELS + HEAD:,} of {BACKBONE + HEAD:,} (0.33 %)" in run.log
    record = {"trainable_params": NORM_CHANNELS + HEAD, "total_params": BACKBONE + HEAD}
    assert run.status.items() >= record.items()
    assert run.status["trainable_share"] == pytest.approx((NORM_CHANNELS + HEAD) / (BACKBONE + HEAD))
    events = EventAccumulator(str(event_dir(run.ckpt.parents[1])))
    events.Reload()
    content = events.PluginTagToContent("hparams")
    hparams = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/session_start_info"])
    values = hparams.session_start_info.hparams
    assert values["trainable_params"].number_value == NORM_CHANNELS + HEAD and values["peft"].string_value == "bitfit"


RULES = {
    "peft=bitfit strategy=freeze": (
        "peft=bitfit trains a few parameters of the pretrained backbone, but strategy=freeze never trains the "
        "backbone (strategy.trainable=0 and no strategy.unfreeze_at): use peft=none, or strategy=freeze_unfreeze "
        "(the default: the head alone first, then the backbone) or strategy=finetune"
    ),
    "peft=lora strategy=scratch": (
        "peft=lora trains a few parameters of the pretrained backbone, but strategy.pretrained=false "
        "(strategy=scratch) starts from a random init: use peft=none, or a strategy that fine-tunes the pretrained "
        "backbone (freeze_unfreeze, finetune, gradual, llrd)"
    ),
    "peft=lora peft.r=0": "peft.r=0 must be an integer >= 1",
    "peft=lora peft.alpha=0": "peft.alpha=0 must be > 0",
    "peft=lora peft.dropout=1.0": "peft.dropout=1.0 must be in [0, 1) (0 = off)",
}


@pytest.mark.parametrize("overrides", RULES)
def test_a_method_where_it_makes_no_sense_stops_before_any_work(tmp_path, overrides):
    assert config_problems(compose_train(tmp_path, overrides.split())) == [RULES[overrides]]


def test_unknown_lora_targets_are_one_error_naming_the_key(source, tmp_path):
    cfg = compose_train(tmp_path, [*source, "peft=lora", "peft.target_modules=[conv_dw,conv2]"])
    with pytest.raises(SystemExit) as stopped:
        exit_on_user_error(train, cfg)
    message = str(stopped.value.code)
    assert message.startswith("Error: peft.target_modules: conv_dw names no dense convolution or linear layer")


def test_the_documented_comparison_composes_each_job(tmp_path):
    (args,) = documented("compare.py")
    cfg = compose_train(tmp_path, args, "compare")
    jobs = plan(cfg)
    assert {job.setting for job in jobs} == {"freeze_unfreeze", "bitfit", "norm_only", "lora"}
    for job in jobs:
        job_cfg = compose_train(tmp_path, with_setting(["data=imagefolder", "data.root=/path/to/images"], job))
        validate(job_cfg)
        assert (job_cfg.strategy.name, job_cfg.peft and job_cfg.peft._target_.rpartition(".")[2]) == (
            "freeze_unfreeze",
            None if job.setting == "freeze_unfreeze" else job.setting,
        )

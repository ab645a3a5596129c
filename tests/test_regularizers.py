"""The regularisers toward the source (`regularizer=l2sp|bss|co_tuning`, finetune.methods): each one's defining
property on fixed tensors, each trained end to end with the recommended recipe, resumed exactly, loaded by
`from_checkpoint` and eval.py, refused with a strategy it makes no sense with, and raced by compare.py."""

from __future__ import annotations

import shlex
from pathlib import Path

import pytest
import timm
import torch

from finetune.builders import build
from finetune.errors import ConfigError
from finetune.eval import evaluate
from finetune.methods.bss import BSS
from finetune.methods.co_tuning import class_relationship
from finetune.models.losses import StepOutput
from finetune.models.module import FineTuneModule
from finetune.train import train
from finetune.validation import validate
from tests.helpers import SMALL_MODEL, compose_train, doc_commands, make_image_folder
from tests.test_resume import (  # noqa: F401 (an autouse fixture)
    RUN,
    STEPS_PER_EPOCH,
    _restore_determinism,
    kill_mid_epoch,
    load,
    resume_and_run_uninterrupted,
)

pytestmark = pytest.mark.usefixtures("one_thread")

REGULARIZERS = ["l2sp", "bss", "co_tuning"]
# debug=tiny's size and speed, 2 epochs: freeze_unfreeze's head-only epoch and its fine-tuning epoch
DEFAULTS = ["debug=tiny", "trainer.max_epochs=2"]


@pytest.fixture(scope="module")
def source_weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The small backbone's "pretrained" weights: a seeded state dict with its 1000-class classifier."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("weights") / "test_resnet.pth"
    torch.save(timm.create_model("test_resnet").state_dict(), path)
    return path


@pytest.fixture(scope="module")
def pretrained(source_weights: Path) -> list[str]:
    """The small backbone loaded with its source weights and classifier (a pretrained backbone for the methods)."""
    return [*SMALL_MODEL, "strategy.pretrained=true", f"model.weights_path={source_weights}"]


def regularized(tmp_path: Path, image_folder: Path, *overrides: str):
    return compose_train(tmp_path, ["data=imagefolder", f"data.root={image_folder}", *DEFAULTS, *overrides])


def test_l2sp_is_zero_at_the_start_and_its_gradient_points_to_the_source(tmp_path, image_folder, pretrained):
    cfg = regularized(tmp_path, image_folder, *pretrained, "regularizer=l2sp", "regularizer.alpha=0.5")
    _, model = build(cfg)
    term, output = model.loss_terms["l2sp"], StepOutput(torch.zeros(0), torch.zeros(0), torch.zeros(0))
    head = sum(w.pow(2).sum() for w in model.head.parameters())
    assert term(model, output) == 0.01 / 2 * head  # the backbone at its source: beta's L2 on the new head alone

    source = {name: weight.detach().clone() for name, weight in model.backbone.named_parameters()}
    torch.manual_seed(1)
    with torch.no_grad():
        for weight in model.backbone.parameters():
            weight.add_(torch.randn_like(weight))
    model.backbone.frozen_stages = 2
    term(model, output).backward()
    for index, stage in enumerate(model.backbone.stages):
        for name, weight in stage.named_parameters(prefix=f"stages.{index}"):
            if index < 2:  # frozen: no gradient, which AdamW's decay would act on too
                assert weight.grad is None, name
            else:  # alpha (w - w0): a step against it moves toward the source
                torch.testing.assert_close(weight.grad, 0.5 * (weight - source[name]))
    torch.testing.assert_close(model.head.weight.grad, 0.01 * model.head.weight)


def test_bss_is_eta_times_the_smallest_squared_singular_values():
    """Features built from known singular values, U diag(s) V^T with orthonormal U and V."""
    torch.manual_seed(0)
    singular = torch.tensor([5.0, 3.0, 2.0, 0.5], dtype=torch.float64)
    left, _ = torch.linalg.qr(torch.randn(8, 4, dtype=torch.float64))
    right, _ = torch.linalg.qr(torch.randn(4, 4, dtype=torch.float64))
    features = (left * singular) @ right.T
    output = StepOutput(features, torch.zeros(0), torch.zeros(0))
    assert BSS(None, eta=0.1, k=1)(None, output).item() == pytest.approx(0.1 * 0.5**2)
    assert BSS(None, eta=0.1, k=2)(None, output).item() == pytest.approx(0.1 * (2.0**2 + 0.5**2))


def test_co_tuning_relationship_is_the_mean_source_prediction_of_each_class():
    probabilities = torch.tensor([[0.7, 0.2, 0.1], [0.5, 0.3, 0.2], [0.0, 0.0, 1.0], [0.0, 0.0, 1.0]])
    relationship = class_relationship(probabilities, torch.tensor([0, 0, 1, 1]), num_classes=3)
    torch.testing.assert_close(relationship[0], torch.tensor([0.6, 0.25, 0.15]))
    torch.testing.assert_close(relationship[1], torch.tensor([0.0, 0.0, 1.0]))  # one source class: it gets it
    assert relationship[2].sum() == 0  # no training images: never a target


def test_co_tuning_learns_the_relationship_once_from_the_training_images(tmp_path, image_folder, pretrained):
    """A source head that tells the two classes apart (source class 5 for blue, 9 for red): each target class gets
    its source class; the relationship is kept once learned; soft targets mix its rows."""
    data, model = build(regularized(tmp_path, image_folder, *pretrained, "regularizer=co_tuning"))
    data.setup("fit")
    term = model.loss_terms["co_tuning"]
    model.eval()
    with torch.no_grad():
        pairs = [(model.backbone(images), labels) for images, labels in data.train_eval_dataloader()]
        features, labels = torch.cat([f for f, _ in pairs]), torch.cat([y for _, y in pairs])
        means = torch.stack([features[labels == c].mean(0) for c in (0, 1)])
        direction, middle = means[1] - means[0], means.mean(0)
        margin = (features - middle) @ direction * (2 * labels - 1)
        assert margin.min() > 0  # the classes lie on either side of the middle
        scale = 50 / margin.min()
        term.source_head.weight.zero_()
        term.source_head.bias.zero_()
        term.source_head.weight[[5, 9]] = torch.stack([-direction, direction]) * scale
        term.source_head.bias[[5, 9]] = torch.stack([direction @ middle, -direction @ middle]) * scale
    model.train()
    term.prepare(model, data)
    assert model.training and data.classes == ["blue", "red"]
    torch.testing.assert_close(term.relationship.sum(1), torch.ones(2))
    assert term.relationship.argmax(1).tolist() == [5, 9] and term.relationship[:, [5, 9]].diag().min() > 0.99

    learned = term.relationship.clone()
    with torch.no_grad():
        term.source_head.weight.zero_()
    term.prepare(model, data)  # a resumed run: the relationship is in its checkpoint, not learned again
    torch.testing.assert_close(term.relationship, learned, rtol=0, atol=0)

    features = torch.randn(2, model.backbone.num_features)
    hard = term(model, StepOutput(features, torch.zeros(0), torch.tensor([0, 1])))
    soft = term(model, StepOutput(features, torch.zeros(0), torch.tensor([[1.0, 0.0], [0.0, 1.0]])))
    torch.testing.assert_close(hard, soft)  # one-hot targets: the rows of their classes
    mixed = torch.tensor([[0.3, 0.7], [0.3, 0.7]])
    log_probabilities = term.source_head(features).log_softmax(1)
    expected = -(mixed @ learned * log_probabilities).sum(1).mean() * 2.3
    torch.testing.assert_close(term(model, StepOutput(features, torch.zeros(0), mixed)), expected)


@pytest.mark.parametrize("name", REGULARIZERS)
def test_each_trains_with_the_recommended_recipe_and_its_checkpoint_loads(tmp_path, image_folder, name):
    """On EfficientNet-Lite0's ImageNet weights and classifier (they ship as a package: offline)."""
    cfg = regularized(tmp_path, image_folder, "model=efficientnet_lite0", f"regularizer={name}")
    assert cfg.strategy.name == "freeze_unfreeze" and cfg.optimizer._target_.endswith("AdamW")
    metrics = train(cfg)
    assert metrics[f"train/loss_{name}_epoch"] > 0
    assert metrics["train/loss_epoch"] == pytest.approx(
        metrics["train/loss_cls_epoch"] + metrics[f"train/loss_{name}_epoch"], rel=1e-5
    )
    ckpt = tmp_path / "run" / "checkpoints" / "last.ckpt"
    model = FineTuneModule.from_checkpoint(ckpt)
    term, (_, start) = model.loss_terms[name], build(cfg)  # `start`: the model as built, before training
    if name == "l2sp":  # the source weights, not the fine-tuned ones copied again
        moved = 0
        for key, pretrained in start.backbone.stages.named_parameters():
            torch.testing.assert_close(getattr(term, "source:" + key.replace(".", ":")), pretrained, rtol=0, atol=0)
            moved += not torch.equal(model.backbone.stages.get_parameter(key), pretrained)
        assert moved  # the backbone fine-tuned
    if name == "co_tuning":  # the learned relationship, and the source head as it trained, beside the backbone
        torch.testing.assert_close(term.relationship.sum(1), torch.ones(2))
        assert not torch.equal(term.source_head.weight, start.loss_terms[name].source_head.weight)
        groups = {g["name"]: g for g in load(ckpt)["optimizer_states"][0]["param_groups"]}
        assert len(groups["loss_terms"]["params"]) == len(groups["loss_terms_no_decay"]["params"]) == 1
        assert groups["loss_terms"]["lr_mult"] == groups["backbone"]["lr_mult"]
    eval_cfg = compose_train(tmp_path, [f"ckpt_path={ckpt}", f"eval.output_dir={tmp_path / 'eval'}"], "eval")
    assert evaluate(eval_cfg)["eval/acc"] == metrics["test/acc"]


@pytest.mark.slow  # 30 s; what it rests on is in the default suite: the relationship kept by `prepare`, the terms'
# tensors in the state dict (test_each_trains_...), the `loss_terms` group, and test_resume's exactness
def test_a_run_with_co_tuning_resumes_to_the_same_weights(tmp_path, pretrained):
    """Killed mid-epoch and resumed (tests/test_resume.py): the relationship and the source head come from the
    checkpoint, and the source head's optimizer state with them."""
    images = make_image_folder(tmp_path / "images", train=24, test=6)
    base = [o for o in RUN if o not in ("model=mobilenet_v2", "strategy.pretrained=false")]
    run = [*base, *pretrained, f"data.root={images}", "data.num_workers=0", "regularizer=co_tuning"]
    killed = kill_mid_epoch(tmp_path, run)
    assert killed["epoch"] == 2 and killed["global_step"] % STEPS_PER_EPOCH
    assert killed["state_dict"]["loss_terms.co_tuning.relationship"].any()

    a, b, _, _ = resume_and_run_uninterrupted(tmp_path, run)
    torch.testing.assert_close(a["state_dict"], b["state_dict"], rtol=0, atol=0)
    (optimizer_a,), (optimizer_b,) = a["optimizer_states"], b["optimizer_states"]
    torch.testing.assert_close(optimizer_a["state"], optimizer_b["state"], rtol=0, atol=0)
    assert [g["name"] for g in optimizer_a["param_groups"]] == ["backbone", "head", "loss_terms"]


@pytest.mark.parametrize("name", REGULARIZERS)
@pytest.mark.parametrize("strategy", ["freeze", "scratch"])
def test_a_strategy_without_a_source_to_stay_near_is_refused(tmp_path, name, strategy):
    with pytest.raises(ConfigError, match=rf"regularizer={name} .*strategy={strategy}.*use regularizer=none"):
        validate(compose_train(tmp_path, [f"strategy={strategy}", f"regularizer={name}"]))


def test_co_tuning_without_a_pretrained_classifier_is_refused(tmp_path, image_folder, source_weights):
    state = torch.load(source_weights, weights_only=True)
    headless = tmp_path / "headless.pth"
    torch.save({k: v for k, v in state.items() if not k.startswith("fc.")}, headless)
    overrides = [*SMALL_MODEL, "strategy.pretrained=true", f"model.weights_path={headless}", "regularizer=co_tuning"]
    with pytest.raises(ConfigError, match="regularizer=co_tuning needs the pretrained classifier"):
        build(regularized(tmp_path, image_folder, *overrides))


def test_l2sp_turns_weight_decay_off_and_a_term_keeps_its_name(tmp_path):
    assert compose_train(tmp_path, ["regularizer=l2sp"]).optimizer.weight_decay == 0
    assert compose_train(tmp_path, ["regularizer=l2sp", "optimizer.weight_decay=0.05"]).optimizer.weight_decay == 0.05
    assert compose_train(tmp_path, ["regularizer=bss"]).optimizer.weight_decay == 0.05
    clash = "+loss_terms.bss={_target_:finetune.methods.bss.BSS,_partial_:true}"
    with pytest.raises(ConfigError, match="two loss terms of one name"):
        validate(compose_train(tmp_path, ["regularizer=bss", clash]))


def test_the_documented_commands_compose_as_typed(tmp_path):
    """docs/strategies.md's commands: train.py's pass the config rules with the regulariser's settings;
    compare.py's plans a job per regulariser and seed, each composing as its job will."""
    from finetune.compare import plan, shared_overrides, with_setting

    commands = doc_commands("docs/strategies.md", "## Regularisers toward the source")
    for line in commands[:-1]:
        words = shlex.split(line.split("#")[0])
        assert words[:2] == ["python", "train.py"], line
        cfg = compose_train(tmp_path, words[2:])
        validate(cfg)
        assert cfg.regularizer.name in REGULARIZERS
    words = shlex.split(commands[-1])
    assert words[:2] == ["python", "compare.py"]
    cfg = compose_train(tmp_path, words[2:], "compare")
    validate(cfg)
    jobs = plan(cfg)  # 4 settings x 3 seeds x 2 shots
    assert sorted({job.setting for job in jobs}) == ["bss", "co_tuning", "freeze_unfreeze", "l2sp"] and len(jobs) == 24
    shared, clash = shared_overrides([w for w in words[2:] if not w.startswith("compare.")], jobs)
    for job in {job.setting: job for job in jobs}.values():  # one job of each setting (the others differ in seed)
        job_cfg = compose_train(tmp_path, with_setting(shared + clash, job))
        validate(job_cfg)
        assert job_cfg.regularizer.name == ("none" if job.setting == "freeze_unfreeze" else job.setting)

"""Files from users load weights only: a crafted pickle that would run code is refused everywhere."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hydra import initialize_config_dir
from omegaconf import OmegaConf

from finetune.config import CONFIG_DIR
from finetune.errors import ConfigError, DownloadError
from finetune.eval import evaluate
from finetune.models.backbones import load_checkpoint_file, torchvision_backbone
from finetune.train import build, train
from tests.helpers import SMALL_MODEL, TINY, compose_train


class RunsCode:
    """Unpickling this creates `marker`: what a malicious weights file or checkpoint does."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').close()",)


@pytest.fixture(autouse=True)
def unsafe_default(monkeypatch):
    """torch.load's default turns unsafe with this variable: only an explicit weights_only=True still refuses."""
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")


@pytest.fixture
def marker(tmp_path):
    return tmp_path / "code-ran"


def test_the_crafted_file_really_runs_code_when_fully_unpickled(tmp_path, marker):
    """The control for every test below: without weights_only the payload runs."""
    torch.save({"payload": RunsCode(marker)}, tmp_path / "evil.pth")
    torch.load(tmp_path / "evil.pth", weights_only=False)
    assert marker.exists()


def test_model_weights_path_refuses_code(tmp_path, image_folder, marker):
    evil = tmp_path / "weights.pth"
    torch.save({"conv1.weight": torch.zeros(1), "payload": RunsCode(marker)}, evil)
    cfg = compose_train(tmp_path, ["data=imagefolder", f"data.root={image_folder}", f"model.weights_path={evil}"])
    with pytest.raises(
        ConfigError,
        match=r"model.weights_path: refusing to load .*weights.pth: .*GLOBAL (builtins\.)?exec was not an allowed global by default\.$",
    ):
        build(cfg)
    assert not marker.exists()


def test_the_refusal_names_a_dotted_global_whole(tmp_path):
    """A NumPy array saved in a weights file is refused by its full name (torch 2.6 names exec builtins.exec):
    the reason is torch's sentence, not cut at the first dot of the name."""
    saved = tmp_path / "weights.pth"
    torch.save({"conv1.weight": torch.zeros(1), "stats": np.zeros(2)}, saved)
    with pytest.raises(
        ConfigError, match=r"GLOBAL numpy\.(_core|core)\.multiarray\._reconstruct was not an allowed global"
    ):
        load_checkpoint_file(saved)


def test_a_crafted_file_in_the_torch_hub_cache_is_refused(tmp_path, marker, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    cached = tmp_path / "hub" / "checkpoints" / "resnet18-f37072fd.pth"
    cached.parent.mkdir(parents=True)
    torch.save({"payload": RunsCode(marker)}, cached)
    with pytest.raises(
        DownloadError, match=r"weights of 'resnet18'.*GLOBAL (builtins\.)?exec was not an allowed global by default\.\)"
    ):
        torchvision_backbone("resnet18", pretrained=True)
    assert not marker.exists()


def test_eval_refuses_a_checkpoint_that_runs_code(tmp_path, image_folder, marker):
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / ".hydra").mkdir()
    overrides = ["data=imagefolder", f"data.root={image_folder}", *TINY, *SMALL_MODEL]
    OmegaConf.save(OmegaConf.create(overrides), run / ".hydra" / "overrides.yaml")
    ckpt = run / "checkpoints" / "last.ckpt"
    torch.save({"state_dict": {}, "payload": RunsCode(marker)}, ckpt)
    cfg = compose_train(tmp_path, [f"ckpt_path={ckpt}"], config_name="eval")
    refused = pytest.raises(
        ConfigError,
        match=r"ckpt_path: refusing to load .*last.ckpt: .*GLOBAL (builtins\.)?exec was not an allowed global by default\.$",
    )
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"), refused:
        evaluate(cfg)
    assert not marker.exists()


def test_resuming_loads_weights_only(tmp_path, image_folder, marker):
    """train.py reads `ckpt_path` before any work (finetune.checkpoint.check_resumable), and Lightning again before
    the first step, weights-only too (test_training)."""
    torch.save({"epoch": 0, "payload": RunsCode(marker)}, tmp_path / "evil.ckpt")
    overrides = ["data=imagefolder", f"data.root={image_folder}", *TINY, *SMALL_MODEL]
    with pytest.raises(
        ConfigError,
        match=r"ckpt_path: refusing to load .*evil.ckpt: .*GLOBAL (builtins\.)?exec was not an allowed global by default\.$",
    ):
        train(compose_train(tmp_path, [*overrides, f"ckpt_path={tmp_path / 'evil.ckpt'}"]))
    assert not marker.exists()

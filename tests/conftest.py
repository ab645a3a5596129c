"""Shared fixtures: generated image folders, composed configs and CLI runs, all offline."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, open_dict
from PIL import Image
from torch import nn

from finetune.models.backbones import IMAGENET_MEAN, IMAGENET_STD
from finetune.train import CONFIG_DIR, PROJECT_ROOT

sys.path.insert(0, str(PROJECT_ROOT / "benchmarks"))  # the benchmarks' tiny runs are tests too

# Small, fast, offline: generated data, no downloads, no workers, tiny images.
TINY = [
    "data.image_size=32",
    "data.batch_size=8",
    "data.num_workers=0",
    "trainer.max_epochs=1",
    "trainer.accelerator=cpu",
    "trainer.log_every_n_steps=1",
    "~callbacks.progress_bar",
    "~callbacks.model_summary",
]


def make_image_folder(root: Path, classes: tuple[str, ...] = ("blue", "red"), train: int = 12, test: int = 6) -> Path:
    """`root/{train,test}/<class>/*.png`: each class a distinct colour with noise (learnable in one epoch)."""
    import numpy as np

    rng = np.random.default_rng(0)
    for split, count in (("train", train), ("test", test)):
        for index, name in enumerate(classes):
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                base = np.zeros((40, 40, 3))
                base[..., index % 3] = 200
                pixels = np.clip(base + rng.normal(0, 30, base.shape), 0, 255).astype("uint8")
                Image.fromarray(pixels).save(folder / f"{i:03d}.png")
    return root


@pytest.fixture(scope="session")
def image_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_image_folder(tmp_path_factory.mktemp("images"))


def compose_train(tmp_path: Path, overrides: list[str], config_name: str = "train") -> DictConfig:
    """The real config as train.py would compose it, writing into `tmp_path`."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose(config_name, overrides=[f"paths.root_dir={tmp_path}", *overrides], return_hydra_config=True)
    HydraConfig().set_config(cfg)
    with open_dict(cfg):
        cfg.paths.output_dir = str(tmp_path / "run")
    return cfg


def run_cli(args: list[str], root: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    """Runs a project command (`train.py ...`) as a user types it, with logs and data under `root`."""
    env = {**os.environ, "FINETUNE_ROOT": str(root), "PYTHONUNBUFFERED": "1"}
    result = subprocess.run(
        [sys.executable, *args], cwd=PROJECT_ROOT, env=env, capture_output=True, text=True, timeout=timeout
    )
    result.output = result.stdout + result.stderr
    return result


@pytest.fixture(scope="session")
def strategy_sweep(tmp_path_factory: pytest.TempPathFactory, image_folder: Path) -> tuple[Path, str]:
    """`train.py -m strategy=freeze,finetune seed=1,2`, tiny, 2 epochs: its multirun folder and printed output."""
    root = tmp_path_factory.mktemp("sweep")
    args = ["-m", "strategy=freeze,finetune", "seed=1,2", "data=imagefolder", f"data.root={image_folder}"]
    result = run_cli(["train.py", *args, "model.pretrained=false", *TINY, "trainer.max_epochs=2"], root)
    assert result.returncode == 0, result.output
    (folder,) = (root / "logs" / "train" / "multiruns").iterdir()
    return folder, result.output


def tiny_classifier(classes: int = 3, seed: int = 0) -> nn.Module:
    """A small conv net (normalised images of any size -> logits), in eval mode, as an exported model would be."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, stride=2),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, classes),
    ).eval()


def tiny_meta(image_size: int = 32, temperature: float = 1.0) -> dict:
    """The metadata of `tiny_classifier`: classes, eval transform and temperature."""
    return {
        "classes": ["red", "green", "blue"],
        "image_size": image_size,
        "resize": round(image_size * 256 / 224),  # as finetune.data.transforms.eval_transform
        "mean": IMAGENET_MEAN,
        "std": IMAGENET_STD,
        "interpolation": "bilinear",
        "temperature": temperature,
    }

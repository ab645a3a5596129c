"""What the tests share: generated image folders, composed configs and CLI runs, all offline."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from omegaconf import DictConfig
from PIL import Image

from finetune.builders import PROJECT_ROOT, compose_config

# Small, fast, offline: 32 px, batch 8, one epoch on the CPU, no workers (conf/debug/tiny.yaml).
TINY = ["debug=tiny"]


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


def compose_train(tmp_path: Path, overrides: list[str], config_name: str = "train") -> DictConfig:
    """The real config as train.py (or eval.py) would compose it, writing into `tmp_path` (the run into `run/`)."""
    return compose_config(overrides, tmp_path, config_name)


def run_cli(args: list[str], root: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    """Runs a project command (`train.py ...`) as a user types it, with logs and data under `root`."""
    env = {**os.environ, "FINETUNE_ROOT": str(root), "PYTHONUNBUFFERED": "1"}
    result = subprocess.run(
        [sys.executable, *args], cwd=PROJECT_ROOT, env=env, capture_output=True, text=True, timeout=timeout
    )
    result.output = result.stdout + result.stderr
    return result

"""Shared fixtures: generated image folders and a tiny sweep (helpers in `tests/helpers.py`)."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest
import torch

from tests.helpers import SMALL_MODEL, TINY, make_image_folder, run_cli


def pytest_configure(config: pytest.Config) -> None:
    """Under pytest-xdist (`-n auto` in pyproject.toml) each worker gets its share of the cores: N workers with
    all cores' threads each wait for one another at every small op (see `one_thread`)."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1:
        threads = max(1, (os.cpu_count() or 1) // workers)
        torch.set_num_threads(threads)
        os.environ["OMP_NUM_THREADS"] = str(threads)  # the command-line runs the tests start
    # A suite started in the background (`nohup ... &`) ignores Ctrl-C, and so would the commands its tests start
    # (Python installs no KeyboardInterrupt handler then): the Ctrl-C tests need a terminal's Ctrl-C
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)


@pytest.fixture
def one_thread(monkeypatch: pytest.MonkeyPatch):
    """Tiny runs on one intra-op thread: on a busy 2-core machine two OpenMP threads wait for each other at
    every small op (a tiny fit took 50 s instead of 4 s here). Results do not depend on it."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # for the command-line runs
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def decoded_images(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    """The files the start-up check of every image (`finetune.data.images.find_bad_images`) decodes, in order."""
    from finetune.data import images

    decoded: list[Path] = []
    check = images.find_bad_images

    def counted(paths: list[Path]) -> dict[Path, str]:
        decoded.extend(paths)
        return check(paths)

    monkeypatch.setattr(images, "find_bad_images", counted)
    return decoded


@pytest.fixture(scope="session")
def image_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_image_folder(tmp_path_factory.mktemp("images"))


@pytest.fixture(scope="session")
def strategy_sweep(tmp_path_factory: pytest.TempPathFactory, image_folder: Path) -> tuple[Path, str]:
    """`train.py -m strategy=freeze,finetune seed=1,2`, tiny, 2 epochs: its multirun folder and printed output."""
    root = tmp_path_factory.mktemp("sweep")
    args = ["-m", *TINY, "strategy=freeze,finetune", "seed=1,2", "data=imagefolder", f"data.root={image_folder}"]
    result = run_cli(["train.py", *args, *SMALL_MODEL, "trainer.max_epochs=2"], root)
    assert result.returncode == 0, result.output
    (folder,) = (root / "logs" / "train" / "multiruns").iterdir()
    return folder, result.output

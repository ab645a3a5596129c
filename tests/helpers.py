"""What the tests share: generated image folders, composed configs and CLI runs, all offline."""

from __future__ import annotations

import atexit
import contextlib
import multiprocessing
import os
import re
import runpy
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from omegaconf import DictConfig
from PIL import Image
from torch import nn

from finetune.config import PROJECT_ROOT, compose_config
from finetune.models.backbones import IMAGENET_MEAN, IMAGENET_STD, InputConfig

# Small, fast, offline: 32 px, batch 8, one epoch on the CPU, no workers (conf/debug/tiny.yaml); with d2l's plain
# recipe (every weight trains from the first step at a constant lr, plain cross-entropy), which the mechanisms under
# test were written against. Overrides after these win; tests of the default recipe compose without them, and
# tests/test_defaults.py runs every documented feature once with the defaults (a feature tested only here can break
# with them unseen, as the feature cache did: issue 26).
TINY = ["debug=tiny", "strategy=finetune", "optimizer=sgd", "scheduler=none", "loss.label_smoothing=0"]
# A backbone of 0.4 M parameters (timm's test_resnet, random init, 4 stages): for the tests of a mechanism that any
# backbone shows, 2-4x faster to fit and 30x smaller to checkpoint than ResNet-18
SMALL_MODEL = ["model=timm", "model.name=test_resnet", "strategy.pretrained=false"]


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


def event_dir(run_dir: Path) -> Path:
    """The folder of a run's TensorBoard events, `<run>/tensorboard/<run name>/` (`run_name` in conf/train.yaml)."""
    (folder,) = (run_dir / "tensorboard").iterdir()
    return folder


def doc_section(page: str, heading: str) -> str:
    """The text under the line `heading` (e.g. "## Sweeps and the report") of `page` (a path from the project root,
    e.g. "docs/sweeps.md"), up to the next heading of its level or above; `#` lines inside code blocks are not
    headings."""
    lines = (PROJECT_ROOT / page).read_text().splitlines()
    level = len(heading) - len(heading.lstrip("#"))
    start = lines.index(heading) + 1
    fenced, end = False, len(lines)
    for index in range(start, len(lines)):
        line = lines[index]
        fenced ^= line.lstrip().startswith("```")
        if not fenced and re.match(rf"#{{1,{level}}} ", line):
            end = index
            break
    return "\n".join(lines[start:end])


def doc_commands(page: str, heading: str, block: int = 0) -> list[str]:
    """The commands of bash block number `block` (0: the first) under `heading` of `page` (see `doc_section`), as
    typed: comments included, a block indented in a list item dedented, a line continued with `\\` joined to the
    next. tests/test_docs.py finds these calls to check that every block of README.md and docs/ is tested."""
    found = re.findall(r"```bash\n(.*?)```", doc_section(page, heading), flags=re.S)[block]
    return [line.strip() for line in re.sub(r"\\\n\s*", "", found).strip().splitlines()]


def run_cli(args: list[str], root: Path, timeout: int = 300, fresh: bool = False) -> subprocess.CompletedProcess:
    """Runs a project command (`train.py ...`, `-m module ...`, `-c code ...`, a console script's path) as a user
    types it, with logs and data under `root`, in a process of its own: forked from a server that has imported the
    project (a new interpreter spends about 6 s of CPU importing torch, Lightning, torchmetrics and timm before the
    command starts; tests/test_imports.py imports every module in a new interpreter), or, `fresh`, a new
    interpreter: for what a library reads from the environment when it is imported (the Hugging Face hub's
    folders and offline mode)."""
    if not fresh:
        return start_cli(args, root).wait(timeout)
    result = subprocess.run(
        [sys.executable, *args], cwd=PROJECT_ROOT, env=_cli_env(root), capture_output=True, text=True, timeout=timeout
    )
    result.output = result.stdout + result.stderr
    return result


class Started:
    """A command that `start_cli` started and nobody has waited for yet."""

    def __init__(self, command: list[str], env: dict[str, str]):
        self.command = command
        self._folder = tempfile.TemporaryDirectory()
        self._out, self._err = Path(self._folder.name) / "stdout", Path(self._folder.name) / "stderr"
        self._process = _FORKS.Process(target=_run_command, args=(command[1:], env, str(self._out), str(self._err)))
        self._process.start()

    @property
    def running(self) -> bool:
        return self._process.is_alive()

    def send_signal(self, number: int) -> None:
        """To every process of the command (its session), as a terminal's Ctrl-C or a scheduler's SIGTERM reaches
        the processes it started too (DataLoader workers, DDP's other ranks); no error once they have ended."""
        try:
            os.killpg(self._process.pid, number)
        except ProcessLookupError:  # not yet in a session of its own: the process alone
            with contextlib.suppress(ProcessLookupError):
                os.kill(self._process.pid, number)

    def wait(self, timeout: int = 300) -> subprocess.CompletedProcess:
        """Its result, as `run_cli`'s (`output`: stdout then stderr); killed after `timeout` seconds."""
        with self._folder:
            self._process.join(timeout)
            if self._process.is_alive():
                self.send_signal(signal.SIGKILL)
                self._process.join()
                raise subprocess.TimeoutExpired(self.command, timeout)
            result = subprocess.CompletedProcess(
                self.command, self._process.exitcode, self._out.read_text(), self._err.read_text()
            )
        result.output = result.stdout + result.stderr
        return result


def start_cli(args: list[str], root: Path, **env: str) -> Started:
    """`run_cli`'s command started in a process forked from its server (with `env` added to the environment), not
    waited for: for commands that must run at the same time (parallel jobs, races)."""
    return Started([sys.executable, *args], _cli_env(root, **env))


def _cli_env(root: Path, **env: str) -> dict[str, str]:
    """A command's environment: this one's, with its logs and data under `root` and its output unbuffered."""
    return {**os.environ, "FINETUNE_ROOT": str(root), "PYTHONUNBUFFERED": "1", **env}


def _run_command(args: list[str], env: dict[str, str], out: str, err: str) -> None:
    """What `python *args` does, in a process forked from run_cli's server: the environment, the working directory,
    `sys.path` and `sys.argv` as a new interpreter would set them, stdout and stderr into files, the exit code as
    the command's (an uncaught exception: its traceback and 1), threads joined and exit handlers run at the end."""
    os.setsid()  # a session of its own, as in a terminal of its own: `Started.send_signal` reaches all it starts
    os.environ.clear()
    os.environ.update(env)
    os.chdir(PROJECT_ROOT)
    if "OMP_NUM_THREADS" in env:  # OpenMP read it when the server loaded it
        torch.set_num_threads(int(env["OMP_NUM_THREADS"]))
    for fd, path in ((1, out), (2, err)):
        os.dup2(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC), fd)
    option = args[0] if args[0] in ("-m", "-c") else None
    sys.path[:0] = [str(PROJECT_ROOT) if option else str(Path(args[0]).resolve().parent)]
    sys.path[1:1] = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    sys.argv = ["-c", *args[2:]] if option == "-c" else args[1:] if option else list(args)
    code = 0
    try:
        if option == "-m":
            runpy.run_module(args[1], run_name="__main__", alter_sys=True)
        elif option == "-c":
            exec(compile(args[1], "<string>", "exec"), {"__name__": "__main__"})
        else:
            runpy.run_path(args[0], run_name="__main__")
    except SystemExit as exit:
        if exit.code is None or isinstance(exit.code, int):
            code = exit.code or 0
        else:
            print(exit.code, file=sys.stderr)
            code = 1
    except BaseException:
        traceback.print_exc()
        code = 1
    threading._shutdown()  # as an interpreter's exit: non-daemon threads, then the exit handlers
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


_FORKS = multiprocessing.get_context("forkserver")
_FORKS.set_forkserver_preload(["tests.helpers", "finetune.train"])


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
    """The metadata of `tiny_classifier`: classes, what it expects of an image, and its temperature."""
    input_config = InputConfig(image_size, IMAGENET_MEAN, IMAGENET_STD)
    return {"classes": ["red", "green", "blue"], **input_config.to_dict(), "temperature": temperature}


def meet_in(monkeypatch: pytest.MonkeyPatch, module: object, name: str, calls: Path) -> None:
    """Makes `module.name` note each call as a line of `calls` and wait half a second before it works, so that
    processes started together are all asking for its result meanwhile."""
    function = getattr(module, name)

    def slowed(*args: object, **kwargs: object) -> object:
        with open(calls, "a") as out:
            out.write(f"{os.getpid()}\n")
        time.sleep(0.5)
        return function(*args, **kwargs)

    monkeypatch.setattr(module, name, slowed)


@contextlib.contextmanager
def within(seconds: int, what: str) -> Iterator[None]:
    """Fails the test with `what` when its block runs past `seconds` (SIGALRM): for code that could wait for ever."""

    def too_long(*_: object) -> None:
        pytest.fail(f"{what} after {seconds} s")

    previous = signal.signal(signal.SIGALRM, too_long)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)

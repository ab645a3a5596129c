"""Composes the config of each command, as the command would, without running it: the dry run of gpu_check.sh.

    python -m benchmarks.compose_check < commands.txt     # one command a line, as a shell types it

`python train.py <overrides>`: Hydra composes the train config and the project checks it (`finetune.validation`),
all before train.py would build or download anything; `python -m benchmarks.throughput ...`: its `--dry-run`.
One process for all of them: each start of train.py costs seconds of imports.
"""

from __future__ import annotations

import shlex
import sys
import tempfile
from pathlib import Path

from benchmarks import throughput
from finetune.config import compose_config
from finetune.validation import validate


def check(command: str, tmp: Path) -> None:
    """Raises whatever the command's config composition or validation would raise."""
    words = shlex.split(command)[1:]  # after `python`
    if words[0] == "train.py":
        validate(compose_config(words[1:], tmp))
    elif words[:2] == ["-m", "benchmarks.throughput"]:
        throughput.main([*words[2:], "--dry-run"])
    else:
        raise ValueError(f"no dry run for {' '.join(words[:2])}")


def main(commands: list[str]) -> int:
    """Checks every command; the number that fail."""
    failed = 0
    with tempfile.TemporaryDirectory() as tmp:
        for command in commands:
            try:
                check(command, Path(tmp))
            except Exception as err:
                failed += 1
                print(f"FAILED: {command}\n  {type(err).__name__}: {err}", flush=True)
            else:
                print(f"composes: {command}", flush=True)
    return failed


if __name__ == "__main__":
    sys.exit(1 if main([line.strip() for line in sys.stdin if line.strip()]) else 0)

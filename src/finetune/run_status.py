"""Each run's outcome in its folder (`status.json`), so a sweep's report lists failed jobs beside finished ones; the
command line that runs it again."""

from __future__ import annotations

import json
import os
import shlex
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from lightning.pytorch.utilities import rank_zero_only
from lightning.pytorch.utilities.exceptions import SIGTERMException

from finetune.checkpoint import LAST

STATUS_FILE = "status.json"


@contextmanager
def recorded(run_dir: str | os.PathLike) -> Iterator[dict[str, object]]:
    """Times the block and writes `completed`, or `failed`/`interrupted` with the error (which still propagates).
    The block may add notes to the record it is given (`collapsed`: see `finetune.analysis.collapse`)."""
    start = time.perf_counter()
    record: dict[str, object] = {"status": "completed"}
    try:
        yield record
    except BaseException as err:
        record = {
            "status": "failed" if isinstance(err, Exception) else "interrupted",
            # Lightning turns Ctrl-C into SystemExit(1) and SIGTERM into SIGTERMException: named by what was sent
            "error": interruption(err) or f"{type(err).__name__}: {err}",
        }
        raise
    finally:
        record["wall_time_s"] = round(time.perf_counter() - start, 2)
        if rank_zero_only.rank == 0:  # DDP: one record per run
            Path(run_dir).mkdir(parents=True, exist_ok=True)
            (Path(run_dir) / STATUS_FILE).write_text(json.dumps(record, indent=2) + "\n")


def read_status(run_dir: str | os.PathLike) -> dict[str, object]:
    """The recorded outcome, or `{}` for a run that wrote none (still running, killed, or older code)."""
    path = Path(run_dir) / STATUS_FILE
    return json.loads(path.read_text()) if path.is_file() else {}


def command_line(*extra: str, script: str | None = None, own_keys: str | None = None) -> str:
    """This run's command as it was typed (`python train.py` and Hydra's overrides), with `extra` overrides
    replacing those of the same keys; or another command (`script`) with the same overrides, less those of this
    command's own keys (`own_keys`, a prefix such as `lr_find.`)."""
    keys = {override.split("=", 1)[0].lstrip("+~") for override in extra}
    typed = list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []
    kept = [
        override
        for override in typed
        if (key := override.split("=", 1)[0].lstrip("+~")) not in keys and not (own_keys and key.startswith(own_keys))
    ]
    return shlex.join(["python", script or sys.argv[0], *kept, *extra])


def interruption(err: BaseException) -> str | None:
    """What stopped the run from outside, or None: Ctrl-C (a KeyboardInterrupt, or the SystemExit(1) that Lightning's
    fit and test turn it into) or SIGTERM (a SLURM preemption or time limit, `timeout`, `kill`: Lightning's fit and
    test stop at the next batch with a SIGTERMException)."""
    if isinstance(err, KeyboardInterrupt) or (
        isinstance(err, SystemExit) and isinstance(err.__context__, KeyboardInterrupt)
    ):
        return "KeyboardInterrupt (Ctrl-C)"
    if isinstance(err, SIGTERMException):
        return "SIGTERM (a preemption, a time limit or kill)"
    return None


def resume_hint(run_dir: str | os.PathLike) -> str:
    """What to type after Ctrl-C or SIGTERM: the same command, resumed from the run's last.ckpt if it saved one."""
    if (Path(run_dir) / "checkpoints" / LAST).is_file():
        return f"Interrupted: resume the run with\n  {command_line(f'ckpt_path={run_dir}')}"
    return f"Interrupted before the run saved a checkpoint: start it again with\n  {command_line()}"

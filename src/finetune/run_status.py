"""Each run's outcome in its folder (`status.json`), so a sweep's report lists failed jobs beside finished ones."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from lightning.pytorch.utilities import rank_zero_only

STATUS_FILE = "status.json"


@contextmanager
def recorded(run_dir: str | os.PathLike) -> Iterator[None]:
    """Times the block and writes `completed`, or `failed`/`interrupted` with the error (which still propagates)."""
    start = time.perf_counter()
    record: dict[str, object] = {"status": "completed"}
    try:
        yield
    except BaseException as err:
        record = {
            "status": "failed" if isinstance(err, Exception) else "interrupted",
            "error": f"{type(err).__name__}: {err}",
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

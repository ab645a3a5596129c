"""Run folders that are never shared: `${unique_dir:<path>}` in `conf/hydra/default.yaml`.

Two runs started in the same second (a shell loop, two terminals, a job array) would otherwise get the
same timestamped folder and mix their checkpoints and event files. The folder is created here with
`mkdir`, which succeeds for exactly one process; the others take the next free suffix (`_1`, `_2`, ...).
Registered with `use_cache=True` (`finetune.config.register_resolvers`): Hydra copies that cache into every job
of a sweep, so a run asks once.
"""

from __future__ import annotations

import os
from pathlib import Path


def unique_dir(path: str) -> str:
    """Creates `path`, or `path_1`, `path_2`, ... whichever is free first, and returns the one created."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    for suffix in range(10_000):
        candidate = path if suffix == 0 else f"{path}_{suffix}"
        try:
            os.mkdir(candidate)
        except FileExistsError:
            continue
        return candidate
    raise FileExistsError(f"No free run folder next to {path}")

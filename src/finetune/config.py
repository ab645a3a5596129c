"""The config bootstrap every task shares: where `conf/` is, the resolvers it uses, and a config composed exactly
as `python <task>.py <overrides>` composes it.

Importing it prepares what Hydra needs before a task's `main` composes its config: `FINETUNE_ROOT` (the project
root unless set: logs/ and data/ land there, `conf/paths/default.yaml`) and the resolvers. It imports none of the
builders, so that the run-folder and logger helpers below it never reach back up (no import circle).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf, open_dict

from finetune.loggers import overrides_name
from finetune.run_dirs import unique_dir

PROJECT_ROOT = Path(__file__).resolve().parents[2]
CONFIG_DIR = str(PROJECT_ROOT / "conf")


def register_resolvers() -> None:
    """The resolvers conf/ uses: `${unique_dir:}` (run folders) and `${overrides_name:}` (run names, `run_name`).

    `unique_dir` with `use_cache=True`: Hydra copies that cache into every job of a sweep, so a run asks once."""
    OmegaConf.register_new_resolver("unique_dir", unique_dir, use_cache=True, replace=True)
    OmegaConf.register_new_resolver("overrides_name", overrides_name, replace=True)


os.environ.setdefault("FINETUNE_ROOT", str(PROJECT_ROOT))
register_resolvers()


def compose_config(overrides: Sequence[str], root: str | os.PathLike, task: str = "train") -> DictConfig:
    """The config exactly as `python <task>.py <overrides>` composes it, with data and logs under `root` and
    the run's output in `root/run` (for the tests and benchmarks, which build runs without Hydra's launcher)."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose(task, overrides=[f"paths.root_dir={root}", *overrides], return_hydra_config=True)
    HydraConfig().set_config(cfg)
    with open_dict(cfg):
        cfg.paths.output_dir = str(Path(root) / "run")
    return cfg

"""One job of a parallel start (tests/test_loggers.py): the run's tracker built from the config as train.py builds it,
once every job is ready; a metric logged, the run ended. `python -m tests.parallel_logger <root> <logger> <job> <jobs>`"""

import sys
import time
from pathlib import Path

from omegaconf import open_dict

from finetune.builders import instantiate_loggers
from finetune.config import compose_config
from finetune.loggers import close

root, logger, job, jobs = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
cfg = compose_config([f"logger={logger}", f"run_name=job{job}"], root)
with open_dict(cfg):
    cfg.paths.output_dir = f"{root}/run{job}"
ready = Path(root) / "ready"
ready.mkdir(exist_ok=True)
(ready / str(job)).touch()
while len(list(ready.iterdir())) < jobs:  # all start together, as a parallel launcher or a SLURM array does
    time.sleep(0.01)
(tracker,) = [t for t in instantiate_loggers(cfg.logger) if type(t).__name__ != "CSVLogger"]
tracker.log_hyperparams({"job": job})
tracker.log_metrics({"val/acc": 0.5}, step=0)
close(tracker, "success")

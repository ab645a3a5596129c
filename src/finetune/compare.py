"""`python compare.py data=imagefolder data.root=DIR`: which strategy transfers best to this data, with statistics.

Plans settings x seeds (x few-shot sizes), runs the jobs that have no completed run yet as one `train.py -m`
multirun (so any Hydra launcher runs them: local, submitit_slurm), prints a progress line while they run, then
writes compare.md, plots and a summary (`finetune.comparison`). Each job is a config of its own, written into the
comparison folder (`.jobs/compare_job/<job>.yaml`, a config group on the multirun's search path): one value of
`+compare_job=...` per job, whatever its setting's overrides, so the multirun holds exactly the jobs left to run.
The folder is `logs/compare/<data>-<hash of the overrides>` (`hydra.sweep.dir=` sets it): the same command finds it
again, skips the completed jobs (their status.json) and runs the rest; a job with a folder but no completed run
(killed, failed) is moved to `.incomplete/` and run again from the start.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import hydra
import torch
from filelock import FileLock, Timeout
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from lightning.fabric.utilities.apply_func import move_data_to_device
from omegaconf import DictConfig, ListConfig, OmegaConf

from finetune.builders import build, build_datamodule
from finetune.comparison import JOBS_DIR, PLAN_FILE, REPORT_FILE, Job, write_comparison
from finetune.config import CONFIG_DIR, PROJECT_ROOT, compose_config
from finetune.errors import ConfigError, UserError
from finetune.run_status import read_status
from finetune.validation import validate

log = logging.getLogger(__name__)

JOB_GROUP = "compare_job"
CONFIGS_DIR = ".jobs"  # the job configs: <folder>/.jobs/compare_job/<job>.yaml
# Keys compare.py sets per job: given on the command line they would silently override every job's value
MANAGED = {"seed": "compare.seeds", "data.shots": "compare.shots"}
# Hydra's own overrides that compare.py sets for the multirun (the others, e.g. a launcher, pass through)
OWN_HYDRA = ("hydra.mode", "hydra.run.", "hydra.sweep.", "hydra.searchpath", "hydra.output_subdir")


def _name(text: str) -> str:
    """A job name part: letters, digits, `_`, `.` and `-` only (a config name and a folder name)."""
    return re.sub(r"[^A-Za-z0-9_.-]", "_", str(text))


def comparison_name() -> str:
    """`${comparison_name:}`: the comparison folder's name, `<data>-<hash>`: the data's folder (or config) and a
    hash of the command's overrides but the compare.* keys, so that adding seeds or settings finds the same folder."""
    overrides = list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []
    kept = sorted(o for o in overrides if not o.lstrip("+~").startswith("compare."))
    values = dict(o.split("=", 1) for o in kept if "=" in o)
    data = Path(values["data.root"]).name if values.get("data.root") else values.get("data", "hotdog")
    digest = hashlib.sha1("\n".join(kept).encode()).hexdigest()[:8]
    return f"{_name(data)}-{digest}"


# conf/compare.yaml's folder name; finetune.config registered the resolvers every config uses when imported
OmegaConf.register_new_resolver("comparison_name", comparison_name, replace=True)


def settings(cfg: DictConfig) -> dict[str, list[str]]:
    """The raced settings, by name: each strategy of compare.strategies, then compare.settings."""
    compare = cfg.compare
    found: dict[str, list[str]] = {}
    for strategy in compare.strategies or []:
        overrides = [f"strategy={strategy}"]
        if strategy == "freeze" and compare.feature_cache and not (cfg.data.get("mixup") or cfg.data.get("cutmix")):
            overrides.append("callbacks.feature_cache.enabled=true")  # the linear probe on cached features
        found[_name(strategy)] = overrides
    extra = compare.settings if compare.settings is not None else {}
    if not isinstance(extra, (dict, DictConfig)):
        raise ConfigError(
            f"compare.settings={extra} must name each setting: {{name: [override, ...]}}, "
            'e.g. \'compare.settings={sgd: ["optimizer=sgd", "scheduler=none"]}\''
        )
    for name, overrides in extra.items():
        listed = overrides.split() if isinstance(overrides, str) else [str(o) for o in overrides or []]
        bad = [o for o in listed if "=" not in o or o.startswith("~")]
        if bad:
            raise ConfigError(
                f"compare.settings.{name}: {bad} are not key=value overrides (deletions are not supported)"
            )
        found[_name(name)] = listed
    if not found:
        raise ConfigError("Nothing to compare: compare.strategies=[] and no compare.settings")
    return found


def seeds(cfg: DictConfig) -> list[int]:
    value = cfg.compare.seeds
    listed = (
        list(value) if isinstance(value, ListConfig) else list(range(1, value + 1)) if isinstance(value, int) else None
    )
    if not listed or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in listed):
        raise ConfigError(f"compare.seeds={value} must be a number of seeds >= 1 (seeds 1..N) or a list of seeds >= 0")
    return listed


def shots(cfg: DictConfig) -> list[int | None]:
    value = cfg.compare.shots
    listed = list(value) if isinstance(value, ListConfig) else [value]
    parsed = [None if k in ("all", None) else k for k in listed]
    if not parsed or not all(k is None or (isinstance(k, int) and not isinstance(k, bool) and k >= 1) for k in parsed):
        raise ConfigError(
            f"compare.shots={value} must list images per class (integers >= 1) and/or all, e.g. [5,10,all]"
        )
    return list(dict.fromkeys(parsed))


def plan(cfg: DictConfig) -> list[Job]:
    """Every job: settings x seeds x shots, named `<setting>-seed<s>` on all images, `<setting>-seed<s>-shots<K>`
    on K per class (so adding seeds, settings or shots later keeps the names, and the runs, of the others)."""
    raced, seed_list, shot_list = settings(cfg), seeds(cfg), shots(cfg)
    jobs = []
    for k in shot_list:
        for seed in seed_list:
            for name, overrides in raced.items():
                few = [f"data.shots={k}"] if k is not None else []
                suffix = f"-shots{k}" if k is not None else ""
                jobs.append(Job(f"{name}-seed{seed}{suffix}", name, seed, k, [*overrides, f"seed={seed}", *few]))
    return jobs


def _is_group(key: str) -> bool:
    return "." not in key and (Path(CONFIG_DIR) / key).is_dir()


def _key(override: str) -> str:
    return override.split("=", 1)[0].lstrip("+~")


def with_setting(task: Sequence[str], job: Job) -> list[str]:
    """The command's overrides then the job's: a key the job's setting sets is the setting's (its group choice,
    its value), whatever the command says."""
    own = {_key(o) for o in job.overrides}
    return [o for o in task if _key(o) not in own] + list(job.overrides)


def shared_overrides(task: Sequence[str], jobs: Sequence[Job]) -> tuple[list[str], list[str]]:
    """The command's overrides split in two: those no setting sets (on the multirun's command line, for every
    job) and those some setting sets too (in each job's config, before the setting's, which win there)."""
    set_by_settings = {_key(o) for job in jobs for o in job.overrides}
    clash = [o for o in task if _key(o) in set_by_settings and "=" in o and not o.startswith("~")]
    return [o for o in task if o not in clash], clash


def job_config(job: Job, clash: Sequence[str] = ()) -> str:
    """The job's settings as a config of the `compare_job` group: group choices as `override /group: option`,
    values as nested keys (applied after conf/train.yaml's own, as an experiment's are). `clash`: the command's
    overrides of keys that settings set, applied here first (the job's own win)."""
    defaults: list[object] = []
    values = OmegaConf.create()
    for override in with_setting(clash, job):
        key, value = override.split("=", 1)
        key = key.lstrip("+")
        if _is_group(key):
            defaults.append({f"override /{key}": value})
        else:
            values = OmegaConf.merge(values, OmegaConf.from_dotlist([f"{key}={value}"]))
    if job.shots is None:
        values = OmegaConf.merge(values, {"data": {"shots": None}})
    body = OmegaConf.to_container(values)
    text = OmegaConf.to_yaml(OmegaConf.create({"defaults": [*defaults, "_self_"], **body}))
    return f"# @package _global_\n# compare.py's job {job.name}: {' '.join(job.overrides)}\n{text}"


def user_overrides(cfg: DictConfig) -> tuple[list[str], list[str]]:
    """The command's train.py overrides (compare.* left out) and its Hydra overrides that pass on to the multirun."""
    hydra_cfg = HydraConfig.get()
    task = [o for o in hydra_cfg.overrides.task if not o.lstrip("+~").startswith("compare.")]
    for override in task:
        key = override.split("=", 1)[0].lstrip("+~")
        if key in MANAGED:
            raise ConfigError(f"{override}: compare.py sets {key} per job; use {MANAGED[key]}=...")
        if key == "strategy" and cfg.compare.strategies:
            raise ConfigError(
                f"{override}: compare.py races compare.strategies={list(cfg.compare.strategies)}; list the strategies "
                "there, or set compare.strategies=[] to race compare.settings under one strategy"
            )
    passed = [o for o in hydra_cfg.overrides.hydra if not o.lstrip("+~").startswith(OWN_HYDRA)]
    return task, passed


def check_single_label(cfg: DictConfig) -> None:
    """compare.md ranks by test accuracy, which a multi-label run does not have."""
    if instantiate(cfg.task).multilabel:
        raise ConfigError(
            "compare.py ranks settings by single-label test accuracy: compare multi-label runs (test/map) with a "
            "sweep, python train.py -m data=multilabel ..., and python -m finetune.report on its folder"
        )


def status_of(run_dir: Path) -> str:
    """`completed`, `failed`, `interrupted`, `unfinished` (a folder without status.json) or `not started`."""
    if not run_dir.is_dir():
        return "not started"
    return str(read_status(run_dir).get("status", "unfinished"))


def pending(folder: Path, jobs: Sequence[Job]) -> list[Job]:
    """The jobs to run: those without a completed run of the same overrides. A folder of a run that did not
    complete (killed mid-way, failed) is moved to `.incomplete/` so the job starts afresh."""
    previous = {}
    if (folder / PLAN_FILE).is_file():
        previous = {job["name"]: job["overrides"] for job in json.loads((folder / PLAN_FILE).read_text())["jobs"]}
    todo = []
    for job in jobs:
        run_dir = folder / JOBS_DIR / job.name
        same = previous.get(job.name, job.overrides) == job.overrides
        if status_of(run_dir) == "completed" and same:
            continue
        if run_dir.exists():
            aside = folder / ".incomplete" / f"{job.name}-{time.strftime('%Y%m%d-%H%M%S')}"
            aside.parent.mkdir(parents=True, exist_ok=True)
            shutil.move(run_dir, aside)
            log.info("%s did not complete (%s): moved to %s, run again", job.name, status_of(aside), aside)
        todo.append(job)
    return todo


def warm_up(cfg: DictConfig, task: Sequence[str], job: Job, steps: int) -> dict[str, float]:
    """Times a few training steps (every weight training: the most costly strategies) and evaluation batches on
    the data (on the GPU when the jobs get one), and counts its images: what the estimate of the comparison's time
    is made of. `cfg`: the job's composed config."""
    start = time.perf_counter()
    root = cfg.paths.root_dir
    # every weight training (the costliest strategies), on all the images (their class counts)
    chosen = ("strategy=", "data.shots=", "callbacks.feature_cache.")
    kept = [o for o in with_setting(task, job) if not o.lstrip("+").startswith(chosen)]
    timing_cfg = compose_config([*kept, "strategy=finetune", "data.shots=null"], root)
    datamodule, model = build(timing_cfg)
    datamodule.prepare_data()
    datamodule.setup()
    built = time.perf_counter() - start
    on_gpu = torch.cuda.is_available() and cfg.trainer.accelerator in ("auto", "gpu", "cuda")
    device = torch.device("cuda" if on_gpu else "cpu")
    model.to(device).train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-7)
    train_times, eval_times = [], []
    loader = datamodule.train_dataloader()
    for index, batch in enumerate(loader):
        tic = time.perf_counter()
        # as Lightning does: to the device, where the datamodule finishes what the workers left (uint8 images)
        images, labels = datamodule.on_after_batch_transfer(move_data_to_device(batch, device), 0)
        loss = torch.nn.functional.cross_entropy(model(images), labels.long() if labels.dim() == 1 else labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if on_gpu:
            torch.cuda.synchronize()
        if index > 0:  # the first step pays for allocations
            train_times.append(time.perf_counter() - tic)
        if index >= steps:
            break
    del loader
    model.eval()
    with torch.no_grad():
        for index, (images, _) in enumerate(datamodule.val_dataloader()):
            tic = time.perf_counter()
            model(images.to(device))
            if on_gpu:
                torch.cuda.synchronize()
            eval_times.append(time.perf_counter() - tic)
            if index >= 1:
                break
    counts = datamodule.class_counts("train")
    return {
        "overhead_s": built,
        "train_step_s": sum(train_times) / max(1, len(train_times)),
        "eval_batch_s": sum(eval_times) / max(1, len(eval_times)),
        "counts": counts,
        "val": len(datamodule.datasets["val"]),
        "test": len(datamodule.datasets["test"]),
        "batch_size": datamodule.batch_size,
        "epochs": cfg.trainer.max_epochs,
        # an epoch's least number of batches: the step budget, each optimizer step of accumulate_grad_batches
        "min_batches": (cfg.data.get("min_steps_per_epoch") or 0) * cfg.trainer.get("accumulate_grad_batches", 1),
        "classes": len(counts),
    }


def job_seconds(warm: dict, shots: int | None) -> float:
    """A job's time by the warm-up's measures: its batches (the few-shot subset's, at least min_steps_per_epoch
    optimizer steps per epoch), a validation per epoch and one before, the test, and the start-up."""
    images = sum(c if shots is None else min(c, shots) for c in warm["counts"])
    batches = max(math.ceil(images / warm["batch_size"]), warm["min_batches"]) * warm["epochs"]
    evals = (warm["epochs"] + 1) * math.ceil(warm["val"] / warm["batch_size"]) + math.ceil(
        warm["test"] / warm["batch_size"]
    )
    return warm["overhead_s"] + 5 + batches * warm["train_step_s"] + evals * warm["eval_batch_s"]


def _minutes(seconds: float) -> str:
    return "?" if math.isnan(seconds) else f"{seconds / 60:.1f} min"


class Progress:
    """One line per change: done / failed / left, elapsed, and the time left at the mean time of a finished job
    (the warm-up's estimate until one has)."""

    def __init__(self, folder: Path, jobs: Sequence[Job], estimate: float):
        self.folder, self.jobs, self.estimate = folder, list(jobs), estimate
        self.start = time.perf_counter()
        self.last: tuple[int, int] | None = None

    def counts(self) -> tuple[int, int]:
        states = [status_of(self.folder / JOBS_DIR / job.name) for job in self.jobs]
        return states.count("completed"), sum(s in ("failed", "interrupted") for s in states)

    def update(self, force: bool = False) -> None:
        done, failed = self.counts()
        if (done, failed) == self.last and not force:
            return
        self.last = (done, failed)
        elapsed = time.perf_counter() - self.start
        finished = done + failed
        left = len(self.jobs) - finished
        per_job = elapsed / finished if finished else self.estimate
        print(
            f"[compare] {done} done, {failed} failed, {left} left of {len(self.jobs)} | elapsed {_minutes(elapsed)}"
            f" | remaining ~{_minutes(left * per_job)}",
            flush=True,
        )


def launch(
    folder: Path, jobs: Sequence[Job], task: Sequence[str], passed: Sequence[str], poll_s: float, estimate: float
) -> int:
    """Runs the jobs as one `train.py -m` multirun into the comparison folder; returns its exit status."""
    configs = folder / CONFIGS_DIR / JOB_GROUP
    configs.mkdir(parents=True, exist_ok=True)
    task, clash = shared_overrides(task, jobs)
    for job in jobs:
        (configs / f"{job.name}.yaml").write_text(job_config(job, clash))
    command = [
        sys.executable,
        str(PROJECT_ROOT / "train.py"),
        "-m",
        f"+{JOB_GROUP}={','.join(job.name for job in jobs)}",
        *task,
        *passed,
        f"hydra.searchpath=['file://{(folder / CONFIGS_DIR).resolve()}']",
        f"hydra.sweep.dir='{folder}'",
        f"hydra.sweep.subdir={JOBS_DIR}/${{hydra.runtime.choices.{JOB_GROUP}}}",
    ]
    log_file = folder / "multirun.log"
    progress = Progress(folder, jobs, estimate)
    progress.update(force=True)
    with log_file.open("a") as out:
        out.write("$ " + " ".join(command) + "\n")
        out.flush()
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)
        try:
            while process.poll() is None:
                time.sleep(poll_s)
                progress.update()
        except KeyboardInterrupt:
            process.wait()  # the multirun gets Ctrl-C too and records its job as interrupted
            raise
    progress.update()
    if process.returncode:
        tail = log_file.read_text().splitlines()[-15:]
        print(f"The multirun ended with exit status {process.returncode}; the end of {log_file}:", *tail, sep="\n")
    return process.returncode


def write_plan(folder: Path, jobs: Sequence[Job], command: str, classes: int | None) -> None:
    previous = json.loads((folder / PLAN_FILE).read_text()) if (folder / PLAN_FILE).is_file() else {}
    plan_data = {
        "command": command,
        "classes": classes or previous.get("classes"),
        "jobs": [job.to_dict() for job in jobs],
    }
    (folder / PLAN_FILE).write_text(json.dumps(plan_data, indent=2) + "\n")


def run(cfg: DictConfig) -> Path:
    """Plans, runs what is left, writes the comparison; one compare.py at a time per folder (a second would take
    the first one's running jobs for killed ones)."""
    folder = Path(HydraConfig.get().runtime.output_dir)
    lock = FileLock(folder / ".compare.lock")
    try:
        lock.acquire(timeout=0)
    except Timeout:
        raise ConfigError(f"Another compare.py is running on {folder}: wait for it, or set hydra.sweep.dir=") from None
    try:
        return _run(cfg, folder)
    finally:
        lock.release()


def _run(cfg: DictConfig, folder: Path) -> Path:
    command = " ".join(["python compare.py", *HydraConfig.get().overrides.task])
    task, passed = user_overrides(cfg)
    jobs = plan(cfg)
    todo = pending(folder, jobs)
    seeds_n, settings_n, shots_n = (len({getattr(job, key) for job in jobs}) for key in ("seed", "setting", "shots"))
    print(
        f"[compare] {len(jobs)} jobs ({settings_n} settings x {seeds_n} seeds"
        + (f" x {shots_n} shots" if shots_n > 1 else "")
        + f") in {folder}: {len(jobs) - len(todo)} completed already, {len(todo)} to run",
        flush=True,
    )
    classes = None
    estimate = math.nan
    if todo:
        root = cfg.paths.root_dir
        first = compose_config(with_setting(task, todo[0]), root)
        validate(first)
        check_single_label(first)
        classes = len(build_datamodule(first).classes)  # a missing data folder stops here, not in every job
        warm = None
        if cfg.compare.estimate:
            try:
                warm = warm_up(first, task, todo[0], cfg.compare.warmup_steps)
            except UserError:
                raise
            except Exception as err:  # an unusual data path: no estimate, the comparison goes on
                print(f"[compare] no estimate: the timed warm-up failed ({type(err).__name__}: {err})", flush=True)
        if warm is not None:
            seconds = [job_seconds(warm, job.shots) for job in todo]
            estimate = sum(seconds) / len(seconds)
            print(
                f"[compare] warm-up on the data: a training step {warm['train_step_s']:.2f} s, an evaluation batch "
                f"{warm['eval_batch_s']:.2f} s; estimate: at most ~{_minutes(sum(seconds))} for the {len(todo)} jobs "
                "one after another (a parallel launcher divides it)",
                flush=True,
            )
        write_plan(folder, jobs, command, classes)
        launch(folder, todo, task, passed, cfg.compare.poll_s, estimate)
    else:
        write_plan(folder, jobs, command, classes)
    summary = write_comparison(folder, command)
    print(summary)
    print(f"Wrote {folder / REPORT_FILE} and its plots.")
    return folder


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="compare")
def main(cfg: DictConfig) -> None:
    if HydraConfig.get().mode.name == "MULTIRUN":
        sys.exit("Error: compare.py runs its own multirun: leave out -m (compare.strategies/seeds/shots list the jobs)")
    try:
        run(cfg)
    except UserError as err:
        sys.exit(f"Error: {err}")
    except KeyboardInterrupt:  # the running job is recorded as interrupted and runs again next time
        sys.exit("Interrupted: the same command again runs the jobs that did not complete, and the comparison")

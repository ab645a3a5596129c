"""Model soups (Wortsman et al. 2022, "Model soups: averaging weights of multiple fine-tuned models improves
accuracy without increasing inference time"): one network, the average of the weights of a sweep's runs.

`python soup.py sweep_dir=logs/train/multiruns/<sweep>` (`main`) takes the checkpoint of every completed run of the
sweep (`soup.checkpoint`: last.ckpt, or the best epoch's), scores each on its validation split and keeps the runs
that share the start of the best one (`finetune.weight_space.start`, and the same seed: the new head's first draw);
a sweep over lr, augmentation or strategy at one seed does. The others are named, and why they are left out.
`soup.recipe=greedy` (the paper's): the runs by validation accuracy, best first, each added to the average only if
the soup's validation accuracy does not drop, so the soup is never below the best run on validation; `uniform`: the
average of all. It tests the soup and the best run, prints the tables and writes them (`soup.md`) with the soup as
a stand-alone checkpoint (`checkpoints/soup.ckpt`) into its run folder: eval.py, predict.py and export.py take it.
BatchNorm's running statistics are averaged as the weights are (`finetune.weight_space`).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import hydra
import torch
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader

from finetune.builders import rebuild
from finetune.checkpoint import LAST, RUN_SETTINGS, standalone
from finetune.config import CONFIG_DIR
from finetune.data.datamodule import ImageFolderDataModule
from finetune.errors import ConfigError, MissingFileError, UserError, exit_on_user_error
from finetune.models.backbones import load_checkpoint_file
from finetune.models.module import FineTuneModule
from finetune.predict import default_device
from finetune.report import markdown_table
from finetune.run_status import read_status
from finetune.validation import missing_values, validate
from finetune.weight_space import Score, average, differences, score, start, write_checkpoint

RECIPES = ("greedy", "uniform")
CHECKPOINTS = {"last": LAST, "best": "epoch_*.ckpt"}  # conf/callbacks/default.yaml's file names


@dataclass
class Ingredient:
    name: str  # the run's folder, relative to the sweep's
    label: str  # its overrides that differ between the sweep's runs
    path: Path
    checkpoint: dict[str, Any]  # stand-alone: weights and settings
    start: dict[str, Any]
    val: Score | None = None
    with_it: Score | None = None  # greedy: the soup's validation score with this run added
    kept: bool = False


@dataclass(frozen=True)
class Soup:
    ingredients: list[Ingredient]  # the runs of the best run's start, best first
    left_out: dict[str, str]  # run -> why
    val: Score
    test: Score
    best_test: Score  # the best run's
    checkpoint: Path


def job_order(parts: Sequence[str]) -> list[tuple[int, str]]:
    """A sort key of a run's folder names: job 2 before job 10."""
    return [(len(part), part) if part.isdigit() else (0, part) for part in parts]


def run_folders(sweep_dir: Path) -> list[Path]:
    """The runs under `sweep_dir` (folders with `.hydra/overrides.yaml`), in job order."""
    found = {path.parent.parent for path in sweep_dir.rglob(".hydra/overrides.yaml")}
    return sorted(found, key=lambda run: job_order(run.relative_to(sweep_dir).parts))


def overrides_of(run: Path) -> dict[str, str]:
    """The run's command-line overrides, key -> value."""
    pairs = (str(override).partition("=") for override in OmegaConf.load(run / ".hydra" / "overrides.yaml"))
    return {key: value for key, _, value in pairs}


def labels(runs: Sequence[Path]) -> dict[Path, str]:
    """Each run's overrides whose value is not the same in every run (what the sweep varies)."""
    overrides = {run: overrides_of(run) for run in runs}
    keys = list(dict.fromkeys(key for values in overrides.values() for key in values))
    varied = [key for key in keys if len({values.get(key) for values in overrides.values()}) > 1]
    return {run: " ".join(f"{key}={overrides[run].get(key, 'default')}" for key in varied) for run in runs}


def checkpoint_of(run: Path, which: str) -> Path:
    """The run's checkpoint `which` (`soup.checkpoint`), or a MissingFileError that says why there is none."""
    status = read_status(run)
    if status.get("status") != "completed":
        error = f": {status['error']}" if status.get("error") else ""
        raise MissingFileError(f"{status.get('status', 'unfinished (no status.json)')}{error}")
    found = sorted((run / "checkpoints").glob(CHECKPOINTS[which]))
    if len(found) != 1:
        raise MissingFileError(f"{len(found)} checkpoints/{CHECKPOINTS[which]}, not one")
    return found[0]


def read_ingredients(sweep_dir: Path, which: str) -> tuple[list[Ingredient], dict[str, str]]:
    """The completed runs with their checkpoint, and the others with why they are left out."""
    runs = run_folders(sweep_dir)
    if not runs:
        raise MissingFileError(f"sweep_dir: no runs under {sweep_dir} (a run folder holds .hydra/overrides.yaml)")
    named = labels(runs)
    ingredients, left_out = [], {}
    for run in runs:
        name = run.relative_to(sweep_dir).as_posix() or run.name
        try:
            path = checkpoint_of(run, which)
            checkpoint = standalone(load_checkpoint_file(path, key="sweep_dir"))
            shared = start(checkpoint, path)
            shared = {"seed": checkpoint[RUN_SETTINGS]["seed"], **shared}
        except UserError as err:
            left_out[name] = str(err)
            continue
        ingredients.append(Ingredient(name, named[run], path, checkpoint, shared))
    if not ingredients:
        raise MissingFileError(f"sweep_dir: no completed run with a checkpoint under {sweep_dir}: {left_out}")
    return ingredients, left_out


def soup_state(ingredients: Sequence[Ingredient]) -> dict[str, torch.Tensor]:
    """The uniform average of the ingredients' weights (integer buffers: the first's)."""
    return average([i.checkpoint["state_dict"] for i in ingredients], [1 / len(ingredients)] * len(ingredients))


def start_key(ingredient: Ingredient) -> str:
    return json.dumps(ingredient.start, sort_keys=True, default=str)


def score_runs(
    ingredients: Sequence[Ingredient], overrides: list[str], device: torch.device
) -> dict[str, tuple[ImageFolderDataModule, FineTuneModule]]:
    """Scores each run on the validation split of its start; the data and a model of each start, by `start_key`."""
    built = {}
    for ingredient in ingredients:
        if (key := start_key(ingredient)) not in built:
            built[key] = rebuild(ingredient.path, overrides)
            built[key][0].prepare_data()
            built[key][0].setup("validate")
        datamodule, model = built[key]
        state = ingredient.checkpoint["state_dict"]
        ingredient.val = score(model, state, datamodule.val_dataloader(), device, ingredient.name)
    return built


def cook(
    recipe: str, ingredients: Sequence[Ingredient], model: FineTuneModule, val: DataLoader, device: torch.device
) -> tuple[list[Ingredient], Score]:
    """The ingredients of the soup (best first) and its validation score; each ingredient marked `kept` or not."""
    best, *others = ingredients
    best.kept, soup, soup_val = True, [best], best.val
    for candidate in others:
        if recipe == "greedy":
            candidate.with_it = score(model, soup_state([*soup, candidate]), val, device, f"soup with {candidate.name}")
            if candidate.with_it.acc < soup_val.acc:
                continue
            soup_val = candidate.with_it
        candidate.kept, soup = True, [*soup, candidate]
    if recipe == "uniform" and others:
        soup_val = score(model, soup_state(soup), val, device, "uniform soup")
    return soup, soup_val


def make_soup(cfg: DictConfig) -> Soup:
    """Scores the runs, makes the soup of the best run's start, tests it and the best run, writes the report and
    the checkpoint."""
    validate(cfg, missing_values)
    options = cfg.soup
    if options.recipe not in RECIPES:
        raise ConfigError(f"soup.recipe={options.recipe}: unknown, expected one of {', '.join(RECIPES)}")
    if options.checkpoint not in CHECKPOINTS:
        raise ConfigError(f"soup.checkpoint={options.checkpoint}: unknown, expected one of {', '.join(CHECKPOINTS)}")
    sweep_dir = Path(cfg.sweep_dir).expanduser()
    if not sweep_dir.is_dir():
        raise MissingFileError(f"sweep_dir: no such folder: {sweep_dir}")
    ingredients, left_out = read_ingredients(sweep_dir, options.checkpoint)
    device = torch.device(options.device) if options.device else default_device()
    built = score_runs(ingredients, list(cfg.overrides), device)
    best, *others = sorted(ingredients, key=lambda i: i.val.key(), reverse=True)
    for other in others:
        if problems := differences(best.start, other.start):
            left_out[other.name] = f"another start than run {best.name}: {problems}"
    ingredients = [best, *(other for other in others if other.name not in left_out)]
    left_out = dict(sorted(left_out.items(), key=lambda item: job_order(Path(item[0]).parts)))
    datamodule, model = built[start_key(best)]
    soup, soup_val = cook(options.recipe, ingredients, model, datamodule.val_dataloader(), device)
    state = soup_state(soup)
    test = datamodule.test_dataloader()
    soup_test = score(model, state, test, device, "test, soup")
    best_test = score(model, best.checkpoint["state_dict"], test, device, f"test, run {best.name}")
    record = {"recipe": options.recipe, "ingredients": [str(i.path.resolve()) for i in soup], "val_acc": soup_val.acc}
    output_dir = Path(cfg.paths.output_dir)
    checkpoint = write_checkpoint(best.checkpoint, state, {"soup": record}, output_dir / "checkpoints" / "soup.ckpt")
    result = Soup(ingredients, left_out, soup_val, soup_test, best_test, checkpoint)
    text = tables(result, options.recipe, sweep_dir)
    report = output_dir / "soup.md"
    report.write_text(f"# Model soup ({options.recipe}) of {sweep_dir}\n\n{text}\n\nCheckpoint: {checkpoint}\n")
    print(f"{text}\nCheckpoint: {checkpoint}\nReport: {report}")
    return result


def tables(soup: Soup, recipe: str, sweep_dir: Path) -> str:
    """The ingredients, the runs left out, and the soup against the best run."""
    kept = [i for i in soup.ingredients if i.kept]
    best = soup.ingredients[0]
    runs = markdown_table(
        ["run", "overrides", "val acc", "soup's val acc with it", "in the soup"],
        [
            [
                i.name,
                i.label,
                f"{i.val.acc:.4f}",
                f"{i.with_it.acc:.4f}" if i.with_it else "",
                "yes" if i.kept else "no",
            ]
            for i in soup.ingredients
        ],
    )
    left_out = markdown_table(["run", "left out because"], [[name, why] for name, why in soup.left_out.items()])
    results = markdown_table(
        ["model", "runs", "val acc", "test acc"],
        [
            [f"soup ({recipe})", str(len(kept)), f"{soup.val.acc:.4f}", f"{soup.test.acc:.4f}"],
            [f"best run ({best.name})", "1", f"{best.val.acc:.4f}", f"{soup.best_test.acc:.4f}"],
        ],
    )
    parts = [f"Runs of {sweep_dir} that share the start of the best run, by validation accuracy:\n\n{runs}"]
    if soup.left_out:
        parts.append(f"Left out:\n\n{left_out}")
    return "\n\n".join([*parts, results])


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="soup")
def main(cfg: DictConfig) -> None:
    exit_on_user_error(make_soup, cfg)

"""Model soups (`soup.py`) of the shared tiny sweep (strategy=freeze,finetune seed=1,2): the runs of another start
named and left out, greedy never below its first ingredient on validation, uniform averaging all, the checkpoint
taken by eval.py."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch

from finetune.errors import UserError
from finetune.eval import evaluate
from finetune.soup import make_soup
from tests.helpers import compose_train, doc_commands, run_cli


def rows(output: str, columns: int) -> list[list[str]]:
    """The rows of the printed tables with `columns` columns, header and rules left out."""
    found = [[cell.strip() for cell in line.strip("|").split("|")] for line in output.splitlines()]
    return [row for row in found if len(row) == columns and row[0] not in ("run", "model") and "---" not in row[0]]


def test_the_documented_command_soups_the_runs_of_one_start_and_names_the_others(strategy_sweep, tmp_path):
    folder, _ = strategy_sweep
    (command,) = doc_commands("docs/after-training.md", "## Model soups: `soup.py`")
    result = run_cli(command.replace("logs/train/multiruns/<sweep>", str(folder)).split()[1:], tmp_path)
    assert result.returncode == 0, result.output
    ingredients, left_out = rows(result.output, 5), rows(result.output, 2)
    (seed,) = {re.search(r"seed=(\d)", label).group(1) for _, label, *_ in ingredients}  # one start: one seed
    assert sorted(run for run, *_ in ingredients) == (["0", "2"] if seed == "1" else ["1", "3"])
    assert [run for run, _ in left_out] == (["1", "3"] if seed == "1" else ["0", "2"])
    other = "2" if seed == "1" else "1"
    assert all(f"seed: {seed} vs {other}" in why for _, why in left_out), left_out
    first = ingredients[0]
    assert first[4] == "yes" and float(first[2]) == max(float(row[2]) for row in ingredients)
    (soup, best) = rows(result.output, 4)
    assert soup[0] == "soup (greedy)" and best[0] == f"best run ({first[0]})"
    assert float(soup[2]) >= float(best[2]) == float(first[2])

    ckpt = Path(re.search(r"Checkpoint: (\S+)", result.output).group(1))
    saved = torch.load(ckpt, map_location="cpu", weights_only=True)
    kept = [folder / run / "checkpoints" / "last.ckpt" for run, *_, used in ingredients if used == "yes"]
    assert saved["soup"]["ingredients"] == [str(path.resolve()) for path in kept]
    metrics = evaluate(compose_train(tmp_path, [f"ckpt_path={ckpt}"], "eval"))
    assert metrics["eval/acc"] == pytest.approx(float(soup[3]), abs=1e-4)


def fake_sweep(strategy_sweep: tuple[Path, str], root: Path) -> tuple[Path, torch.Tensor]:
    """A sweep of run 0 of the shared sweep, a copy of it whose head is -3x its own (alone it gets every answer
    it got right wrong, and averaged with run 0 too: the average's head is -1x), and a copy that failed."""
    source = strategy_sweep[0] / "0"
    for name in ("0", "1", "2"):
        shutil.copytree(source, root / name)
    ckpt = root / "1" / "checkpoints" / "last.ckpt"
    checkpoint = torch.load(ckpt, weights_only=True)
    head = checkpoint["state_dict"]["head.weight"].clone()
    for key in ("head.weight", "head.bias"):
        checkpoint["state_dict"][key] *= -3
    torch.save(checkpoint, ckpt)
    (root / "2" / "status.json").write_text(json.dumps({"status": "failed", "error": "ValueError: boom"}))
    return root, head


def test_greedy_leaves_out_a_run_that_lowers_validation_and_uniform_takes_it(strategy_sweep, tmp_path):
    sweep, head = fake_sweep(strategy_sweep, tmp_path / "sweep")
    greedy = make_soup(compose_train(tmp_path / "greedy", [f"sweep_dir={sweep}"], "soup"))
    first, flipped = greedy.ingredients
    assert first.name == "0" and first.val.acc > 0.5, "run 0 of the shared sweep should learn its 2 validation images"
    assert flipped.name == "1" and flipped.val.acc == 1 - first.val.acc and not flipped.kept
    assert flipped.with_it.acc == 1 - first.val.acc  # the soup with it answers as the flipped run
    assert greedy.val == first.val and greedy.left_out == {"2": "failed: ValueError: boom"}

    uniform = make_soup(compose_train(tmp_path / "uniform", [f"sweep_dir={sweep}", "soup.recipe=uniform"], "soup"))
    assert all(i.kept for i in uniform.ingredients) and uniform.val.acc == 1 - first.val.acc < greedy.val.acc
    state = torch.load(uniform.checkpoint, weights_only=True)["state_dict"]
    original = torch.load(sweep / "0" / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    assert torch.allclose(state["head.weight"], -head, rtol=0, atol=1e-7)  # (w - 3w) / 2
    counts = [key for key in state if key.endswith("num_batches_tracked")]
    assert counts and all(torch.equal(state[key], original[key]) for key in counts)


def test_the_best_epochs_checkpoints_make_a_soup_too(strategy_sweep, tmp_path):
    folder, _ = strategy_sweep
    soup = make_soup(compose_train(tmp_path, [f"sweep_dir={folder}", "soup.checkpoint=best"], "soup"))
    assert {i.path.name for i in soup.ingredients} <= {"epoch_000.ckpt", "epoch_001.ckpt"}
    assert soup.val.acc >= soup.ingredients[0].val.acc


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["sweep_dir=/no/such/sweep"], r"sweep_dir: no such folder: /no/such/sweep"),
        (["sweep_dir=."], r"sweep_dir: no runs under \. \(a run folder holds .hydra/overrides.yaml\)"),
        (["sweep_dir=.", "soup.recipe=best"], r"soup.recipe=best: unknown, expected one of greedy, uniform"),
        (["sweep_dir=.", "soup.checkpoint=first"], r"soup.checkpoint=first: unknown, expected one of last, best"),
    ],
)
def test_wrong_values_say_what_is_wrong(overrides, message, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UserError, match=message):
        make_soup(compose_train(tmp_path, overrides, "soup"))

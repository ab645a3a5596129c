"""The report and the review notebook, on the event files of a real tiny sweep."""

from __future__ import annotations

import re

import matplotlib.image
import nbformat
import pytest
import torch
from nbclient import NotebookClient

from finetune import report
from finetune.config import PROJECT_ROOT


def printed_test_accuracy(output: str) -> dict[str, float]:
    """What each job printed: `Test accuracy: 0.5000  (outputs in .../<job>)`."""
    return {job: float(acc) for acc, job in re.findall(r"Test accuracy: ([\d.]+)\s+\(outputs in \S+/(\d+)\)", output)}


def test_runs_are_read_from_their_event_files(strategy_sweep):
    folder, output = strategy_sweep
    runs = report.load_runs(folder)
    assert [r.name for r in runs] == ["0", "1", "2", "3"]
    assert [(r.strategy, r.overrides["seed"]) for r in runs] == [
        ("freeze", "1"),
        ("freeze", "2"),
        ("finetune", "1"),
        ("finetune", "2"),
    ]
    printed = printed_test_accuracy(output)
    for run in runs:
        assert run.status == "completed" and run.wall_time_s > 0 and run.lr == pytest.approx(6.4e-3)
        assert run.epochs == 2 and all(len(run.curves[tag]) == 2 for tag in report.CURVES)
        assert run.test_acc == pytest.approx(printed[run.name], abs=5e-5)
        assert 0 <= run.test_macro_f1 <= 1  # logged by the test's error analysis (test/macro_f1)
        assert f"| macro-F1 | {run.test_macro_f1:.4f} |" in (run.folder / "eval" / "eval.md").read_text()
        checkpoint = torch.load(folder / run.name / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
        (best,) = (v["best_model_score"] for k, v in checkpoint["callbacks"].items() if "val/acc" in k)
        assert run.best_val_acc == pytest.approx(float(best))  # what ModelCheckpoint saw as the best val/acc


def test_tables_show_what_differs_and_group_the_seeds(strategy_sweep):
    runs = report.load_runs(strategy_sweep[0])
    assert report.varying_keys(runs) == ["strategy", "seed"]
    table = report.runs_table(runs).splitlines()
    header = "| run | strategy | seed | best val acc | test acc | test macro-F1 | epochs | wall time (s) | status |"
    assert table[0] == header
    first = runs[0]
    assert table[2].startswith(
        f"| 0 | freeze | 1 | {first.best_val_acc:.3f} | {first.test_acc:.3f} | {first.test_macro_f1:.3f} | 2 | "
    )
    status = "completed, collapsed" if first.collapsed else "completed"  # a random-init probe may predict one class
    assert table[2].endswith(f" | {status} |") and len(table) == 2 + len(runs)

    summary = report.summary_table(runs).splitlines()
    freeze = [r.test_acc for r in runs if r.strategy == "freeze"]
    mean, std = sum(freeze) / 2, abs(freeze[0] - freeze[1]) / 2**0.5  # sample std of two values
    assert summary[2].startswith("| strategy=freeze | 2/2 | ")
    assert f"| {mean:.3f} ± {std:.3f} |" in summary[2]
    assert summary[3].startswith("| strategy=finetune | 2/2 | ") and len(summary) == 4


def test_report_writes_markdown_and_plots_into_the_folder(strategy_sweep):
    folder = strategy_sweep[0]
    text = report.write_report(folder)
    assert (folder / "report.md").read_text() == text
    assert "## Runs" in text and "## Summary (mean ± std over seeds)" in text
    assert "![curves.png](curves.png)" in text and "![strategies.png](strategies.png)" in text
    assert "acc_vs_lr" not in text and not (folder / "acc_vs_lr.png").exists()  # the lr did not vary
    for name in ("curves.png", "strategies.png"):
        height, width, _ = matplotlib.image.imread(folder / name).shape
        assert height > 300 and width > 500
    best = max(report.load_runs(folder), key=lambda run: run.best_val_acc)  # the first of equals, as max keeps it
    assert f"## Best run: {best.name} (best val acc {best.best_val_acc:.3f}, " in text
    assert f"![Confusion matrix]({best.name}/eval/confusion_matrix.png)" in text
    errors = (folder / best.name / "eval" / "top_errors.png").is_file()
    assert (f"![Most confidently wrong]({best.name}/eval/top_errors.png)" in text) == errors
    assert ("No test image was wrong." in text) == (not errors)
    height, width, _ = matplotlib.image.imread(folder / best.name / "eval" / "confusion_matrix.png").shape
    assert height > 300 and width > 500


def test_the_notebook_runs_top_to_bottom_on_a_sweep(strategy_sweep):
    notebook = nbformat.read(PROJECT_ROOT / "notebooks" / "review.ipynb", as_version=4)
    (cell,) = (c for c in notebook.cells if c.source.startswith("# the folder to review"))
    cell.source = f"MULTIRUN = {str(strategy_sweep[0])!r}"
    NotebookClient(notebook, timeout=120, resources={"metadata": {"path": str(PROJECT_ROOT / "notebooks")}}).execute()
    outputs = [o for c in notebook.cells if c.cell_type == "code" for o in c.outputs]
    markdown = "".join(o.get("data", {}).get("text/markdown", "") for o in outputs)
    assert "| run | strategy | seed |" in markdown and "| strategy=finetune | 2/2 |" in markdown
    assert "The lr did not vary" in markdown
    best = report.best_run(report.load_runs(strategy_sweep[0]))
    assert f"**{best.name}**: best val acc" in markdown
    figures = len(report.error_figures(best))  # the confusion matrix, and the wrong images if any
    assert figures >= 1 and sum("image/png" in o.get("data", {}) for o in outputs) == 2 + figures

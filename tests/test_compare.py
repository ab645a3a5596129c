"""compare.py (issue 25): the paired statistics against values worked out by hand, nested few-shot subsets, the
step budget, pairing across settings of a seed, and the command as README types it (rerun, killed and failed
jobs). The t distribution with 2 degrees of freedom (3 seeds) has a closed form, which the hand values use:
two-sided p = 1 - |t| / sqrt(t^2 + 2), and its 97.5 % quantile is 4.3027."""

from __future__ import annotations

import json
import math
import shlex
from pathlib import Path

import pytest
from omegaconf import OmegaConf
from PIL import Image

from finetune.builders import build_datamodule
from finetune.compare import warm_up, with_setting
from finetune.comparison import Job, compare, holm, recommendation
from finetune.comparison import main as comparison_main
from finetune.config import compose_config
from finetune.data.datamodule import ImageFolderDataModule, few_shot
from finetune.data.sampling import SeededSampler
from finetune.models.backbones import InputConfig
from tests.helpers import SMALL_MODEL, TINY, compose_train, doc_commands, make_image_folder, run_cli

T_975_DF2 = 4.302653


def p_df2(t: float) -> float:
    return 1 - abs(t) / math.sqrt(t * t + 2)


# Test accuracies by setting and seed: `a` leads, `b` is 3 points worse with little spread, `c` is within noise
TABLE = {
    "a": {1: 0.80, 2: 0.82, 3: 0.81},
    "b": {1: 0.77, 2: 0.795, 3: 0.775},  # differences -0.03, -0.025, -0.035
    "c": {1: 0.81, 2: 0.80, 3: 0.815},  # differences +0.01, -0.02, +0.005
}


def test_paired_statistics_by_hand():
    result = compare(TABLE)
    assert [row.setting for row in result.rows] == ["a", "c", "b"]
    a, c, b = result.rows
    assert a.best and a.mean == pytest.approx(0.81) and a.half == pytest.approx(T_975_DF2 * 0.01 / math.sqrt(3))
    # b: mean difference -0.03, sd 0.005: t = -0.03 / (0.005 / sqrt 3)
    t_b = -0.03 / (0.005 / math.sqrt(3))
    assert b.diff == pytest.approx(-0.03) and b.diff_half == pytest.approx(T_975_DF2 * 0.005 / math.sqrt(3))
    assert b.p == pytest.approx(p_df2(t_b), rel=1e-6)  # 0.0091: a known lead with small spread
    # c: differences +0.01, -0.02, +0.005: mean -1/600, sd sqrt(((0.07/6)^2 + (0.11/6)^2 + (0.04/6)^2) / 2)
    sd_c = math.sqrt(((0.07 / 6) ** 2 + (0.11 / 6) ** 2 + (0.04 / 6) ** 2) / 2)
    t_c = (-1 / 600) / (sd_c / math.sqrt(3))
    assert c.diff == pytest.approx(-1 / 600) and c.p == pytest.approx(p_df2(t_c), rel=1e-6)  # 0.87: within noise
    # Holm over the two comparisons: the smaller p x 2, the larger x 1 (never below the one before)
    assert b.p_holm == pytest.approx(2 * b.p) and c.p_holm == pytest.approx(max(2 * b.p, c.p))
    assert b.significant and not c.significant
    assert (a.rank, c.rank, b.rank) == (pytest.approx(5 / 3), pytest.approx(4 / 3), 3.0)  # c beats a on seeds 1, 3


def test_holm_turns_a_borderline_p():
    # d and e: differences (-0.02, -0.03, -0.04) and (-0.03, -0.02, -0.04): t = -0.03 / (0.01 / sqrt 3) each
    table = {"a": TABLE["a"], "d": {1: 0.78, 2: 0.79, 3: 0.77}, "e": {1: 0.77, 2: 0.80, 3: 0.77}}
    result = compare(table)
    raw = p_df2(-0.03 / (0.01 / math.sqrt(3)))  # 0.035: below 0.05 alone
    for row in result.rows[1:]:
        assert row.p == pytest.approx(raw, rel=1e-6) and row.p < 0.05
        assert row.p_holm == pytest.approx(2 * raw, rel=1e-6) and not row.significant  # 0.070 for two comparisons
    assert holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])
    assert holm([0.2, math.nan]) == pytest.approx([0.2, math.nan], nan_ok=True)


def test_recommendation_sentence():
    text = recommendation(compare(TABLE), cost={"a": 100.0, "b": 50.0, "c": 40.0})
    assert text.startswith(
        "`a` is best (test accuracy 0.810 ± 0.025 over 3 seeds); `c` is within noise of it (-0.2 ± 4.0 points, "
        "Holm p = 0.87); `b` is 3.0 ± 1.2 points worse (Holm p = 0.018)."
    ), text
    assert "With 3 seeds, `c` cannot be told apart from `a`: more seeds would be needed to decide" in text
    assert "`c` fits in 40% of the time" in text
    clear = recommendation(compare({"a": TABLE["a"], "b": TABLE["b"]}))
    assert clear.endswith("Every other setting is worse beyond the seed-to-seed noise: use `a`.")
    one_seed = recommendation(compare({"a": {1: 0.8}, "b": {1: 0.7}}))
    assert "one seed gives no confidence interval" in one_seed


def test_a_lead_lost_to_the_correction_is_not_called_noise_nor_offered_as_the_cheaper_choice():
    # d: p 0.035 alone, Holm 0.070 over the two comparisons (test_holm_turns_a_borderline_p); c within noise
    table = {"a": TABLE["a"], "d": {1: 0.78, 2: 0.79, 3: 0.77}, "c": TABLE["c"]}
    text = recommendation(compare(table), cost={"a": 100.0, "c": 60.0, "d": 10.0})
    assert (
        "`d` is 3.0 ± 2.5 points lower alone (p = 0.035), but not beyond the correction for 2 comparisons "
        "(Holm p = 0.07)" in text
    ), text
    assert "With 3 seeds, `c`, `d` cannot be told apart from `a`" in text
    assert text.endswith("Of those, `c` fits in 60% of the time: the cheaper choice within noise."), text


def test_statistics_use_the_seeds_every_setting_completed():
    table = {"a": dict(TABLE["a"]), "b": {1: 0.77, 2: 0.795}, "c": {}}  # b's seed 3 failed, c never ran
    result = compare(table, f1=table)
    assert result.seeds == [1, 2] and result.dropped == {"a": [3]}
    assert [row.setting for row in result.rows] == ["a", "b", "c"] and math.isnan(result.rows[-1].mean)


def test_few_shot_subsets_are_nested_and_validation_stays(tmp_path: Path):
    folder = make_image_folder(tmp_path, classes=("blue", "red", "green"), train=20, test=2)
    splits = {}
    for shots in (None, 5, 10):
        data = ImageFolderDataModule(InputConfig(32), folder, val_fraction=0.2, num_workers=0, shots=shots, seed=1)
        data.setup()
        splits[shots] = (data.datasets["train"].indices, data.datasets["val"].indices, data.class_counts())
    (all_train, val, _), (five, val5, counts5), (ten, val10, counts10) = splits[None], splits[5], splits[10]
    assert val == val5 == val10  # the validation split does not change with K
    assert set(five) < set(ten) < set(all_train) and not set(ten) & set(val)
    assert counts5 == [5, 5, 5] and counts10 == [10, 10, 10]
    labels = [i % 3 for i in range(60)]
    assert few_shot(labels, 5, seed=1) != few_shot(labels, 5, seed=2)  # seeded
    assert sorted(few_shot([0, 0, 1], 2, seed=1)) == [0, 1, 2]  # a class with fewer: all of it


def test_step_budget_holds_on_small_data():
    sampler = SeededSampler(list(range(10)), seed=3, min_draws=25)
    plain = SeededSampler(list(range(10)), seed=3)
    for epoch in (0, 1):
        sampler.set_epoch(epoch)
        plain.set_epoch(epoch)
        draws = sampler.draws()
        assert len(draws) == len(sampler) == 25
        assert draws[:10] == plain.draws()  # the first pass is the plain epoch
        assert sorted(index for index, _ in draws[10:20]) == list(range(10))  # then whole passes, reshuffled
        assert len({seed for _, seed in draws}) == 25  # each draw its own augmentation
    ranks = [SeededSampler(list(range(10)), 2, rank, seed=3, min_draws=25).draws() for rank in (0, 1)]
    assert len(ranks[0]) == len(ranks[1]) == 13


def test_settings_of_a_seed_see_the_same_data(tmp_path: Path, image_folder: Path):
    """What pairs the runs: for one seed, freeze and finetune get the same split, subset and batches."""
    seen = []
    for strategy in ("freeze", "finetune"):
        overrides = [*TINY, "data=imagefolder", f"data.root={image_folder}", f"strategy={strategy}", "seed=4"]
        data = build_datamodule(compose_train(tmp_path, [*overrides, "data.shots=4", "data.num_workers=0"]))
        data.setup()
        loader = data.train_dataloader()
        loader.sampler.set_epoch(1)
        seen.append((data.datasets["train"].indices, data.datasets["val"].indices, loader.sampler.draws()))
    assert seen[0] == seen[1]


def readme_command(image_folder: Path) -> list[str]:
    """README's compare.py command on the tiny folder, with the tiny recipe (the small backbone, one epoch)."""
    lines = doc_commands("README.md", "## Compare strategies on your data")
    (command,) = [line for line in lines if "compare.py" in line]
    args = command.split()[1:]  # python compare.py ... as typed
    args = [f"data.root={image_folder}" if a.startswith("data.root=") else a for a in args]
    return [*args, *TINY[:1], "optimizer=sgd", "scheduler=none", *SMALL_MODEL, "trainer.max_epochs=1"]


@pytest.mark.parametrize("data", [[], ["data.store=true"]], ids=["files", "store"])
def test_the_warm_up_times_the_batches_the_device_finishes(tmp_path: Path, image_folder: Path, data: list[str]):
    """With `data.augment_on=device` the loader yields uint8 images (or the store's crop boxes): the warm-up
    finishes them as Lightning does, and its estimate stands."""
    task = ["data=imagefolder", f"data.root={image_folder}", *SMALL_MODEL, "data.num_workers=0", *data]
    task += ["data.augment_on=device"]
    job = Job("finetune-seed1", "finetune", 1, None, ["strategy=finetune", "seed=1"])
    warm = warm_up(compose_config(with_setting(task, job), tmp_path), task, job, steps=2)
    assert warm["train_step_s"] > 0 and warm["eval_batch_s"] > 0 and sum(warm["counts"]) > 0


def test_compare_cli_as_readme_types_it(tmp_path: Path, image_folder: Path, one_thread):
    """The README command on a tiny folder: a comparison with its estimate and progress line; the same command
    again runs no job."""
    args = readme_command(image_folder)
    quick = ["compare.strategies=[freeze,finetune]", "compare.seeds=2", "compare.poll_s=0.5"]
    first = run_cli([*args, *quick], tmp_path)
    assert first.returncode == 0, first.output
    assert "[compare] 4 jobs (2 settings x 2 seeds)" in first.output and "estimate: at most" in first.output
    assert "[compare] 4 done, 0 failed, 0 left of 4" in first.output
    (folder,) = (tmp_path / "logs" / "compare").iterdir()
    report = (folder / "compare.md").read_text()
    assert "vs best (points, 95% CI)" in report and "is best (test accuracy" in first.output
    assert (folder / "differences.png").is_file()
    config = OmegaConf.load(folder / "jobs" / "freeze-seed2" / ".hydra" / "config.yaml")
    assert (config.strategy.name, config.seed, config.callbacks.feature_cache.enabled) == ("freeze", 2, True)
    stamps = {p: p.stat().st_mtime for p in folder.glob("jobs/*/status.json")}
    assert len(stamps) == 4

    again = run_cli([*args, *quick], tmp_path)
    assert again.returncode == 0, again.output
    assert "4 completed already, 0 to run" in again.output
    assert {p: p.stat().st_mtime for p in folder.glob("jobs/*/status.json")} == stamps


@pytest.mark.slow
def test_compare_cli_reruns_a_killed_job_and_lists_a_failed_one(tmp_path: Path, image_folder: Path, one_thread):
    """End to end (test_rerun_plan_and_report_of_fake_runs checks the same without training): a job killed mid-way runs again, a failing
    setting is listed, few-shot points add a learning curve and their budget."""
    args = readme_command(image_folder)
    first = run_cli([*args, "compare.strategies=[finetune]", "compare.seeds=[1]", "compare.estimate=false"], tmp_path)
    assert first.returncode == 0, first.output
    (folder,) = (tmp_path / "logs" / "compare").iterdir()
    (folder / "jobs" / "finetune-seed1" / "status.json").unlink()  # killed mid-way: no status written
    bad = 'compare.settings={bad: ["strategy=finetune", "data.batch_size=64", "data.drop_last=true"]}'
    more = [*args, "compare.strategies=[finetune]", "compare.seeds=[1]", "compare.shots=[3,all]"]
    third = run_cli([*more, bad, "compare.estimate=false"], tmp_path)
    assert third.returncode == 0, third.output
    assert "4 jobs (2 settings x 1 seeds x 2 shots)" in third.output and "0 completed already, 4 to run" in third.output
    assert list((folder / ".incomplete").iterdir())[0].name.startswith("finetune-seed1-")
    assert json.loads((folder / "jobs" / "finetune-seed1" / "status.json").read_text())["status"] == "completed"
    report = (folder / "compare.md").read_text()
    assert "- bad-seed1: failed: ConfigError" in report and "- bad-seed1-shots3: failed" in report
    assert (folder / "learning_curve.png").is_file() and "## shots=3" in report
    assert "6 images, 1 epochs" in report  # the 3-shot budget: 3 images per class of 2


def fake_run(
    run_dir: Path, status: str | None, acc: float = math.nan, steps: int = 40, fit_time_s: float = 10.0
) -> None:
    """A job folder as train.py leaves it: overrides, status.json (None: killed before writing it), test events."""
    from torch.utils.tensorboard import SummaryWriter

    (run_dir / ".hydra").mkdir(parents=True)
    (run_dir / ".hydra" / "overrides.yaml").write_text("- +compare_job=x\n")
    if status is not None:
        record = {"status": status, "fit_time_s": fit_time_s, "steps": steps, "epochs": 5, "train_images": 8}
        record |= {"trainable_params": 1234, "total_params": 372_882, "trainable_share": 1234 / 372_882}
        (run_dir / "status.json").write_text(json.dumps(record))
    if not math.isnan(acc):
        with SummaryWriter(run_dir / "tensorboard" / "x") as writer:
            writer.add_scalar("test/acc", acc, steps)
            writer.add_scalar("test/macro_f1", acc - 0.1, steps)


def test_rerun_plan_and_report_of_fake_runs(tmp_path: Path):
    """Which jobs run again (killed, failed, changed), and compare.md from the runs' event files: failed jobs
    listed, the learning curve, each point's budget."""
    from finetune.compare import pending
    from finetune.comparison import Job, build_report, write_comparison

    jobs = [
        Job(f"{s}-seed{seed}{'' if k is None else f'-shots{k}'}", s, seed, k, [f"strategy={s}", f"seed={seed}"])
        for k in (2, None)
        for seed in (1, 2, 3)
        for s in ("a", "b")
    ]
    accs = {"a": [0.80, 0.82, 0.81], "b": [0.77, 0.795, 0.775]}
    for job in jobs:
        acc = accs[job.setting][job.seed - 1] - (0.1 if job.shots else 0)
        slowed = job.name == "a-seed1-shots2"  # beside other work on the machine
        fake_run(tmp_path / "jobs" / job.name, "completed", acc, 20 if job.shots else 40, 100.0 if slowed else 10.0)
    (tmp_path / "jobs" / "a-seed3" / "status.json").unlink()  # killed mid-way
    (tmp_path / "jobs" / "b-seed2" / "status.json").write_text('{"status": "failed", "error": "ValueError: boom"}')
    plan = {"command": "python compare.py ...", "classes": 2, "jobs": [job.to_dict() for job in jobs]}
    (tmp_path / "jobs.json").write_text(json.dumps(plan))
    (line,) = doc_commands("docs/compare.md", "## Rewriting the report")
    words = shlex.split(line.replace("logs/compare/<folder>", str(tmp_path)))
    assert words[:3] == ["python", "-m", "finetune.comparison"]
    comparison_main(words[3:])
    text = write_comparison(tmp_path)
    report = (tmp_path / "compare.md").read_text()
    assert "- a-seed3: unfinished" in report and "- b-seed2: failed: ValueError: boom" in report
    assert "(1 seed: [1])" in report  # the statistics use the seeds every setting completed
    assert "`a` has the highest test accuracy (0.800)" in text
    assert "## shots=2 (3 seeds)" in report and "`a` is best (test accuracy 0.710 ± 0.025 over 3 seeds)" in report
    assert "8 images, 5 epochs, 20 steps" in report and (tmp_path / "learning_curve.png").is_file()
    assert "| trainable params |" in report and "| 1,234 (0.33 %) |" in report  # train.py's counts
    assert build_report(tmp_path).cost(2) == {"a": 10.0, "b": 10.0}  # the median fit time: the slowed job moves none

    changed = [
        job if job.name != "b-seed1" else Job(job.name, "b", 1, None, ["strategy=b", "optimizer=sgd"]) for job in jobs
    ]
    again = pending(tmp_path, changed)
    assert sorted(job.name for job in again) == ["a-seed3", "b-seed1", "b-seed2"]
    assert not (tmp_path / "jobs" / "a-seed3").exists() and len(list((tmp_path / ".incomplete").iterdir())) == 3


def test_the_budget_counts_in_words():
    """'1 epoch' and '2 steps': the count as it is printed decides the plural."""
    from finetune.comparison import Result, budget

    def run(images: float, epochs: float, steps: float) -> Result:
        return Result(Job("j", "a", 1, None, []), "completed", steps=steps, epochs=epochs, train_images=images)

    assert budget([run(32, 1, 1)]) == "32 images, 1 epoch, 1 step"
    assert budget([run(1, 1, 2), run(1, 2, 2)]) == "1 image, 2 epochs, 2 steps"  # 1.5 epochs prints as 2
    assert budget([run(8, 1, math.nan)]) == "-"


def test_a_setting_wins_over_the_command(tmp_path: Path):
    """A key both the command and a setting set is the setting's in that setting's jobs, the command's elsewhere."""
    from finetune.compare import job_config, shared_overrides, with_setting
    from finetune.comparison import Job

    jobs = [
        Job("a-seed1", "a", 1, None, ["strategy=finetune", "seed=1"]),
        Job("b-seed1", "b", 1, 5, ["strategy=scratch", "optimizer.lr=0.003", "seed=1", "data.shots=5"]),
    ]
    task = ["model=resnet18", "optimizer.lr=0.0003", "~callbacks.progress_bar"]
    shared, clash = shared_overrides(task, jobs)
    assert shared == ["model=resnet18", "~callbacks.progress_bar"] and clash == ["optimizer.lr=0.0003"]
    assert with_setting(task, jobs[1])[-4:] == jobs[1].overrides and "optimizer.lr=0.0003" not in with_setting(
        task, jobs[1]
    )
    configs = [OmegaConf.create(job_config(job, clash)) for job in jobs]
    assert [c.optimizer.lr for c in configs] == [0.0003, 0.003]
    assert configs[1].defaults[0] == {"override /strategy": "scratch"} and configs[1].data.shots == 5
    assert configs[0].data.shots is None and configs[0].seed == 1
    for job in jobs:  # each composes as train.py would (the job's config given as its overrides)
        cfg = compose_train(tmp_path, with_setting(shared + clash, job))
        assert cfg.optimizer.lr == (0.003 if job.setting == "b" else 0.0003)


def test_the_documented_commands_compose_and_plan(tmp_path: Path):
    """docs/compare.md's commands: each composes as compare.py composes it, passes the config rules, and plans its
    jobs (settings x seeds x shots)."""
    from finetune.compare import plan
    from finetune.validation import validate

    counts = []
    for line in doc_commands("docs/compare.md", "# Compare strategies on your data: compare.py"):
        words = shlex.split(line)
        assert words[:2] == ["python", "compare.py"], line
        cfg = compose_train(tmp_path, words[2:], "compare")
        validate(cfg)
        counts.append(len(plan(cfg)))
    assert counts == [15, 60, 15, 6, 15]


def test_the_far_data_set_is_written_from_the_package(tmp_path: Path):
    """benchmarks/digits.py: scikit-learn's copy of the UCI digits as an image folder (never in the repository)."""
    pytest.importorskip("sklearn")
    from benchmarks.digits import write_digits

    root = write_digits(tmp_path / "digits")
    counts = {split: len(list((root / split).rglob("*.png"))) for split in ("train", "test")}
    assert counts == {"train": 1438, "test": 359} and len(list((root / "train").iterdir())) == 10
    with Image.open(next((root / "train" / "7").iterdir())) as image:
        assert (image.size, image.mode) == ((32, 32), "RGB")


def test_the_new_data_keys_are_checked(tmp_path: Path, image_folder: Path):
    from finetune.validation import config_problems

    base = ["data=imagefolder", f"data.root={image_folder}"]
    problems = config_problems(compose_train(tmp_path, [*base, "data.shots=0", "data.min_steps_per_epoch=-1"]))
    assert "data.shots=0 must be an integer >= 1" in problems
    assert "data.min_steps_per_epoch=-1 must be an integer >= 0" in problems
    assert not config_problems(compose_train(tmp_path, [*base, "data.shots=5", "data.min_steps_per_epoch=0"]))


def test_multi_label_data_is_refused(tmp_path: Path):
    from finetune.compare import check_single_label
    from finetune.errors import ConfigError

    check_single_label(compose_train(tmp_path, []))
    with pytest.raises(ConfigError, match="compare.py ranks settings by single-label test accuracy"):
        check_single_label(compose_train(tmp_path, ["data=multilabel", f"data.root={tmp_path}"]))

"""README.md and docs/: the front page's size, the generated config reference, the links between pages, and every
bash block run or composed by a test, or listed with the reason it cannot run offline."""

from __future__ import annotations

import ast
import importlib.util
import itertools
import re
import shlex
import shutil
import sys
from pathlib import Path

import pytest
from hydra.core.override_parser.overrides_parser import OverridesParser

from finetune import report
from finetune.validation import validate
from tests.helpers import PROJECT_ROOT, compose_train, doc_commands, doc_section

PAGES = ["README.md", *(f"docs/{p.name}" for p in sorted((PROJECT_ROOT / "docs").glob("*.md")))]
GENERATED = "docs/config.md"
Block = tuple[str, str, int]  # page, heading, index of the bash block under it: doc_commands' arguments

# Blocks whose commands each compose (every value of a sweep once) and pass the config rules, without training:
# what they run is run tiny elsewhere (tests/test_cli.py trains on an image folder, tests/conftest.py's
# strategy_sweep is a sweep of strategies and seeds, tests/test_distributed.py runs DDP on 2 CPU processes and
# renders the SLURM job); `python -m finetune.report` runs here on that sweep.
COMPOSED: list[Block] = [
    ("README.md", "## Your own images", 0),
    ("docs/training.md", "# Training and the config groups", 0),
    ("docs/strategies.md", "# Strategies and recipes", 0),
    ("docs/strategies.md", "## A linear probe on cached features", 0),
    ("docs/sweeps.md", "# Sweeps, the report, experiment trackers, cross-validation", 0),
    ("docs/sweeps.md", "## Cross-validation", 0),
    ("docs/scaling-out.md", "# Scaling out: DDP, SLURM, the GPU check", 0),
    ("docs/troubleshooting.md", "# When things go wrong", 0),
]
# Blocks no test runs, and why.
NOT_RUN: dict[Block, str] = {
    ("docs/results.md", "# Results", 0): "the benchmarks: 20 min to hours each on ../shared/datasets",
    ("docs/results.md", "## Which recipe: ours against fastai's one-liner", 0): "pip install (network); a benchmark "
    "of hours (its --tiny run: tests/test_peers.py)",
    ("docs/results.md", "## Which strategy transfers best: real numbers", 0): "a benchmark of 30-46 min per data set",
    ("docs/results.md", "## Which backbone", 0): "a benchmark of 20 min (its --tiny run: tests/test_backbones.py)",
    ("docs/results.md", "## Transfer methods on top of the recipe", 0): "benchmarks of 16-30 min per data set (their "
    "plan and a tiny weight_space run: tests/test_sweeps.py)",
}
COMMANDS = {"train.py", "eval.py", "predict.py", "export.py", "compare.py"}
# Servers a block starts: checked installed; what they show is tested from the files they read.
SERVERS = {"tensorboard": "tests/test_sweeps.py reads the runs and HPARAMS tab TensorBoard shows from the events"}


def bash_blocks(page: str) -> list[int]:
    """The line numbers (from 0) of the page's bash blocks."""
    return [i for i, line in enumerate((PROJECT_ROOT / page).read_text().splitlines()) if line.strip() == "```bash"]


def block_line(page: str, heading: str, block: int) -> int:
    """Where the block that `doc_commands(page, heading, block)` reads starts."""
    section = doc_section(page, heading)
    offsets = [m.start() for m in re.finditer(r"^ *```bash$", section, flags=re.M)]
    start = (PROJECT_ROOT / page).read_text().splitlines().index(heading) + 1
    return start + section[: offsets[block]].count("\n")


def blocks_read_by_tests() -> set[Block]:
    """The literal `doc_commands("<page>", "<heading>", <block>)` calls in tests/."""
    calls = set()
    for path in (PROJECT_ROOT / "tests").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "doc_commands":
                args = [a.value for a in node.args if isinstance(a, ast.Constant)]
                args += [k.value.value for k in node.keywords if isinstance(k.value, ast.Constant)]
                if len(args) == len(node.args) + len(node.keywords):
                    calls.add((*args, 0)[:3])
    return calls


def test_the_readme_is_a_front_page():
    text = (PROJECT_ROOT / "README.md").read_text()
    assert len(text) <= 10_000, f"README.md has {len(text):,} characters: move sections to docs/"
    for page in PAGES[1:]:
        assert f"({page})" in text, f"README's map of the documentation lacks {page}"


@pytest.mark.parametrize("page", [p for p in PAGES[1:] if p != GENERATED])
def test_each_page_opens_with_the_commands_it_explains(page):
    lines = [line for line in (PROJECT_ROOT / page).read_text().splitlines() if line.strip()]
    assert lines[0].startswith("# ") and lines[1] == "```bash", page


def test_every_bash_block_is_run_by_a_test_or_says_why_not():
    read = blocks_read_by_tests()
    listed = [*read, *COMPOSED, *NOT_RUN]
    for page, heading, block in listed:  # each entry names a block that exists
        assert heading in (PROJECT_ROOT / page).read_text().splitlines(), (page, heading)
        block_line(page, heading, block)
    covered = {(page, block_line(page, heading, block)) for page, heading, block in listed}
    untested = [(page, line + 1) for page in PAGES for line in bash_blocks(page) if (page, line) not in covered]
    assert not untested, f"bash blocks (page, line) no test reads: {untested}; run them in a test or add to NOT_RUN"


def markdown_links(page: str) -> list[str]:
    text = re.sub(r"```.*?```", "", (PROJECT_ROOT / page).read_text(), flags=re.S)
    return [t for t in re.findall(r"\]\(([^)\s]+)\)", text) if not t.startswith(("http://", "https://"))]


def anchors(page: Path) -> set[str]:
    """GitHub's anchors of the page's headings."""
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
    found: set[str] = set()
    for heading in re.findall(r"^#{1,6} (.+)$", text, flags=re.M):
        slug = re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-")
        found.add(
            next(s for s in itertools.chain([slug], (f"{slug}-{i}" for i in itertools.count(1))) if s not in found)
        )
    return found


@pytest.mark.parametrize("page", PAGES)
def test_links_lead_to_files_and_headings_that_exist(page):
    broken = []
    for link in markdown_links(page):
        path, _, anchor = link.partition("#")
        target = (PROJECT_ROOT / page).parent / path if path else PROJECT_ROOT / page
        if not target.exists() or (anchor and target.suffix == ".md" and anchor not in anchors(target)):
            broken.append(link)
    assert not broken, f"{page}: {broken}"


def test_the_config_reference_is_what_make_docs_writes_now():
    spec = importlib.util.spec_from_file_location(
        "make_config_reference", PROJECT_ROOT / "docs/make_config_reference.py"
    )
    script = sys.modules[spec.name] = importlib.util.module_from_spec(spec)  # its dataclasses look themselves up
    spec.loader.exec_module(script)
    assert (PROJECT_ROOT / GENERATED).read_text() == script.make_page(), f"{GENERATED} is stale: run `make docs`"


def test_the_contributor_commands_are_make_targets():
    targets = set(re.findall(r"^([\w-]+):", (PROJECT_ROOT / "Makefile").read_text(), flags=re.M))
    phony = set(re.search(r"^\.PHONY: (.+)$", (PROJECT_ROOT / "Makefile").read_text(), flags=re.M).group(1).split())
    commands = [shlex.split(line, comments=True) for line in doc_commands("docs/contributing.md", "# Contributing")]
    made = [words[1] for words in commands if words[0] == "make"]
    assert made and set(made) <= targets & phony, set(made) - targets
    assert ["pre-commit", "install"] in commands and (PROJECT_ROOT / ".pre-commit-config.yaml").is_file()


def jobs(args: list[str]) -> list[list[str]]:
    """The overrides of a multirun's jobs, each value of a swept key once (with the others' first values)."""
    parsed = OverridesParser.create().parse_overrides(args)
    values = [list(o.sweep_string_iterator()) if o.is_sweep_override() else [o.input_line] for o in parsed]
    keys = [o.get_key_element() for o in parsed]
    picks = {tuple(v[0] for v in values)}
    for index, options in enumerate(values):
        picks |= {tuple(v[0] if i != index else option for i, v in enumerate(values)) for option in options}
    return [
        [f"{key}={value}" if "=" not in value else value for key, value in zip(keys, pick, strict=True)]
        for pick in sorted(picks)
    ]


@pytest.mark.parametrize(("page", "heading", "block"), COMPOSED)
def test_commands_compose_and_pass_the_config_rules(page, heading, block, tmp_path, request):
    for line in doc_commands(page, heading, block):
        words = shlex.split(re.sub(r"<[\w ]+>", "2026-01-01_00-00-00", line), comments=True)  # what the user fills in
        if words[:3] == ["python", "-m", "finetune.report"]:
            folder = tmp_path / "sweep"
            shutil.copytree(
                request.getfixturevalue("strategy_sweep")[0], folder, ignore=shutil.ignore_patterns("*.ckpt")
            )
            report.main([str(folder)])
            assert (folder / "report.md").is_file()
            continue
        if words[0] in SERVERS:
            assert Path(sys.executable).with_name(words[0]).is_file(), words[0]
            continue
        assert words[0] == "python" and words[1] in COMMANDS, f"{line}: not a command this test runs"
        args = [word for word in words[2:] if word != "-m"]
        for overrides in jobs(args) if "-m" in words else [args]:
            cfg = compose_train(tmp_path, overrides, words[1].removesuffix(".py"))
            if words[1] in ("train.py", "compare.py"):  # compare.py's config is train.py's and its own keys
                validate(cfg)

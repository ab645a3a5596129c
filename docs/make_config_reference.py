"""Writes docs/config.md, the config reference, from the YAML files in conf/ (`make docs`).

Each group, its options and, for every key a file sets, its default and the comment above or beside it. A
file's first comment block describes the file when a blank line, `defaults:` or `_target_:` follows it; any
other comment block belongs to the key below it. tests/test_docs.py fails when docs/config.md differs from what
this script writes.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
PAGE = ROOT / "docs" / "config.md"
FILE_KEYS = ("defaults", "_target_", "_partial_")  # a comment block above one of these at the top: the file's


@dataclass
class Key:
    name: str  # dotted, from the file's package
    default: str  # as written (flow style for lists and mappings)
    comment: str


@dataclass
class ConfigFile:
    path: Path
    description: str = ""
    package: str = ""  # `# @package ...`, if any
    defaults: list[str] = field(default_factory=list)  # as on a command line: `_loader`, `strategy=freeze_unfreeze`
    keys: list[Key] = field(default_factory=list)


def is_comment(line: str) -> bool:
    return line.strip().startswith("#") and not line.strip().startswith("# @package")


def comment_text(lines: list[str]) -> str:
    return " ".join(line.strip().lstrip("#").strip() for line in lines).strip()


def render(node: yaml.Node) -> str:
    """A value as one line of YAML: scalars as written, lists and mappings in flow style."""
    if isinstance(node, yaml.ScalarNode):
        return f'"{node.value}"' if node.style in ('"', "'") or node.value == "" and node.style else node.value
    if isinstance(node, yaml.SequenceNode):
        return "[" + ", ".join(render(item) for item in node.value) + "]"
    assert isinstance(node, yaml.MappingNode)
    return "{" + ", ".join(f"{render(k)}: {render(v)}" for k, v in node.value) + "}"


def read(path: Path) -> ConfigFile:
    text = path.read_text()
    lines = text.splitlines()
    config = ConfigFile(path)
    if lines and lines[0].startswith("# @package"):
        config.package = lines[0].split(maxsplit=2)[2]
    used: set[int] = set()  # comment lines already given to the file

    top = [i for i, line in enumerate(lines) if line.strip()]
    start = next((i for i in top if not lines[i].startswith("# @package")), len(lines))
    end = start
    while end < len(lines) and is_comment(lines[end]):
        end += 1
    if end > start and (end == len(lines) or not lines[end].strip() or lines[end].split(":")[0] in FILE_KEYS):
        config.description = "\n".join(comment_text([line]) for line in lines[start:end])
        used.update(range(start, end))

    def above(line: int) -> str:
        first = line
        while first > 0 and is_comment(lines[first - 1]) and first - 1 not in used:
            first -= 1
        return comment_text(lines[first:line])

    def beside(node: yaml.Node) -> str:
        rest = lines[node.end_mark.line][node.end_mark.column :].lstrip(" :")
        return rest.lstrip("#").strip() if rest.startswith("#") else ""

    def walk(mapping: yaml.MappingNode, prefix: str) -> Iterator[Key]:
        for key_node, value in mapping.value:
            name = prefix + key_node.value
            inline = value if value.start_mark.line == key_node.start_mark.line else key_node
            comment = " ".join(c for c in (above(key_node.start_mark.line), beside(inline)) if c)
            if isinstance(value, yaml.MappingNode) and value.value and value.flow_style is False:
                if comment:
                    yield Key(name, "", comment)
                yield from walk(value, name + ".")
            else:
                yield Key(name, render(value), comment)

    root = yaml.compose(text)
    if isinstance(root, yaml.MappingNode):
        for key in walk(root, ""):
            if key.name == "defaults":
                continue
            config.keys.append(key)
        for key_node, value in root.value:
            if key_node.value == "defaults" and isinstance(value, yaml.SequenceNode):
                config.defaults = [default_entry(item) for item in value.value]
    return config


def default_entry(node: yaml.Node) -> str:
    if isinstance(node, yaml.ScalarNode):
        return node.value
    assert isinstance(node, yaml.MappingNode)
    ((group, choice),) = node.value
    return f"{group.value.removeprefix('override ').lstrip('/')}={render(choice)}"


def cell(text: str, code: bool = False) -> str:
    """A table cell: in a code span, or as text with what Markdown would take for HTML or emphasis escaped."""
    text = text.replace("|", "\\|")
    if code:
        return f"`{text}`" if text else ""
    parts = text.split("`")  # code spans (odd parts) stay as written
    return "`".join(p if i % 2 else p.replace("<", "&lt;").replace("*", "\\*") for i, p in enumerate(parts))


def paragraphs(description: str) -> list[str]:
    """A file's description; a command it opens with (`python train.py ...`) on a line of its own, as code."""
    out: list[str] = []
    for line in description.splitlines():
        if line.startswith("python ") and not out:
            out += [f"`{line}`", ""]
        else:
            out.append(cell(line))
    return [*out, ""]


def key_table(keys: list[Key], prefix: str) -> list[str]:
    if not keys:
        return []
    rows = ["| key | default | what it is |", "| --- | --- | --- |"]
    rows += [f"| {cell(prefix + k.name, True)} | {cell(k.default, True)} | {cell(k.comment)} |" for k in keys]
    return [*rows, ""]


def file_section(config: ConfigFile, heading: str, prefix: str) -> list[str]:
    out = [heading, ""]
    if config.description:
        out += paragraphs(config.description)
    notes = []
    extends = [d for d in config.defaults if d != "_self_" and "=" not in d]
    sets = [d for d in config.defaults if "=" in d and not d.endswith("=null")]
    if extends:
        notes.append("extends " + ", ".join(f"`{d}`" for d in extends))
    if sets:
        notes.append("sets " + ", ".join(f"`{d}`" for d in sets))
    if config.package:
        notes.append("keys at the top level" if config.package == "_global_" else f"keys under `{config.package}`")
    if notes:
        out += ["(" + "; ".join(notes) + ")", ""]
    return out + key_table(config.keys, prefix)


def groups(conf: Path) -> list[str]:
    return sorted(str(d.relative_to(conf)) for d in conf.rglob("*") if d.is_dir() and any(d.glob("*.yaml")))


def make_page(conf: Path = CONF) -> str:
    train = read(conf / "train.yaml")
    chosen = dict(d.split("=", 1) for d in train.defaults if "=" in d)
    out = [
        "# Config reference",
        "",
        "<!-- Generated by `make docs` (docs/make_config_reference.py) from conf/: edit the YAML files and their",
        "comments, then run `make docs`; tests/test_docs.py fails when this page is stale. -->",
        "",
        "Every key below is set on the command line as `key=value` (`python train.py optimizer.lr=1e-3`), every",
        "group's option as `group=option` (`python train.py model=efficientnet_lite0`). Each group's shared file",
        "(a name starting with `_`) holds the keys every option of it has; each option lists only the keys it sets.",
        "How the groups fit together: [training.md](training.md).",
        "",
        "Groups: " + ", ".join(f"[`{g}`](#{g.replace('/', '')})" for g in groups(conf)) + ".",
        "",
    ]
    for path in sorted(conf.glob("*.yaml"), key=lambda p: (p.stem != "train", p.stem)):
        out += file_section(read(path), f"## `{path.stem}.py` (`conf/{path.name}`)", "")
    for group in groups(conf):
        files = sorted((conf / group).glob("*.yaml"), key=lambda p: (not p.name.startswith("_"), p.name))
        options = [p.stem for p in files if not p.stem.startswith("_")]
        default = chosen.get(group, "null")
        out += [f"## {group}", ""]
        out += ["Options: " + ", ".join(f"`{o}`" + (" (default)" if o == default else "") for o in options) + ".", ""]
        for path in files:
            config = read(path)
            if path.stem.startswith("_"):
                heading = f"### Shared: `conf/{group}/{path.name}`"
            else:
                heading = f"### `{group}={path.stem}`" + (" (default)" if path.stem == default else "")
            prefix = group.replace("/", ".") + "." if not config.package else config.package + "."
            prefix = "" if config.package == "_global_" else prefix
            out += file_section(config, heading, prefix)
    return "\n".join(out).rstrip() + "\n"


def main() -> None:
    page = make_page()
    PAGE.write_text(page)
    print(f"wrote {PAGE.relative_to(ROOT)} ({len(page):,} characters)")


if __name__ == "__main__":
    main()

"""The docs stay true to the CLI and to themselves.

Every command (nested groups too) has a section in docs/commands.md and a row in README's
command table, every option is named in its command's section, README stays short, every page
under docs/ is linked from README, and every relative link and anchor resolves. Each checker
returns its problems as a list; the last tests feed it broken text to show it can fail.
"""

from __future__ import annotations

import re
import unicodedata
from pathlib import Path

import click

from edgetransfer.cli import cli

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = ROOT / "docs"
COMMANDS_MD = DOCS / "commands.md"
MAX_README_LINES = 250
GLOBAL_SECTION = "Global options"  # commands.md's section for the group's own options

Command = tuple[tuple[str, ...], click.Command]


def walk(group: click.Group, path: tuple[str, ...] = ()) -> list[Command]:
    """Every visible command under `group` as (path, command), nested groups included."""
    ctx = click.Context(group, info_name="edgetransfer")
    found: list[Command] = []
    for name in group.list_commands(ctx):
        cmd = group.get_command(ctx, name)
        if cmd is None or cmd.hidden:
            continue
        found.append(((*path, name), cmd))
        if isinstance(cmd, click.Group):
            found += walk(cmd, (*path, name))
    return found


def option_names(cmd: click.Command) -> list[str]:
    """Every spelling (`-q`, `--quiet`, `--no-x`) of the visible options; --help is not a param."""
    names: list[str] = []
    for p in cmd.params:
        if isinstance(p, click.Option) and not p.hidden:
            names += [*p.opts, *p.secondary_opts]
    return names


def prose_lines(text: str) -> list[tuple[int, str]]:
    """(line number, line) outside fenced code blocks."""
    out, fenced = [], False
    for i, line in enumerate(text.splitlines(), 1):
        if line.lstrip().startswith("```"):
            fenced = not fenced
        elif not fenced:
            out.append((i, line))
    return out


def headings(text: str) -> list[tuple[int, str]]:
    """(level, title) of the ATX headings outside code blocks."""
    found = []
    for _, line in prose_lines(text):
        m = re.match(r"(#{1,6})\s+(.*?)\s*#*\s*$", line)
        if m:
            found.append((len(m.group(1)), m.group(2)))
    return found


def sections(text: str, level: int = 2) -> dict[str, str]:
    """Heading title (backticks and a leading `edgetransfer ` removed) -> its text, up to the
    next heading of the same or a higher level."""
    out: dict[str, str] = {}
    title, body, fenced = None, [], False
    for line in text.splitlines():
        if line.lstrip().startswith("```"):
            fenced = not fenced
        m = None if fenced else re.match(r"(#{1,6})\s+(.*?)\s*$", line)
        if m and len(m.group(1)) <= level:
            if title is not None:
                out[title] = "\n".join(body)
            title, body = None, []
            if len(m.group(1)) == level:
                title = m.group(2).replace("`", "").removeprefix("edgetransfer ").strip()
        elif title is not None:
            body.append(line)
    if title is not None:
        out[title] = "\n".join(body)
    return out


def slug(title: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    title = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", title)  # a link keeps its text
    kept = "".join(c for c in title.lower() if c in " -_" or unicodedata.category(c)[0] in "LN")
    return kept.replace(" ", "-")


def anchors(text: str) -> set[str]:
    seen: dict[str, int] = {}
    out = set()
    for _, title in headings(text):
        s = slug(title)
        n = seen.get(s, 0)
        seen[s] = n + 1
        out.add(s if n == 0 else f"{s}-{n}")
    return out


def links(text: str) -> list[tuple[int, str]]:
    """(line number, target) of inline links outside code blocks and code spans."""
    out = []
    for i, line in prose_lines(text):
        line = re.sub(r"`[^`]*`", "", line)
        out += [(i, m.group(1)) for m in re.finditer(r"\]\(\s*<?([^)\s>]+)>?[^)]*\)", line)]
    return out


# --- the checkers: each returns a list of problems, empty when the docs are right -----------


def command_doc_problems(commands: list[Command], commands_md: str, readme: str) -> list[str]:
    problems = []
    secs = sections(commands_md)
    rows = [
        m.group(1).split()
        for _, line in prose_lines(readme)
        if (m := re.match(r"\|\s*`edgetransfer\s+([^`]*)`", line))
    ]
    names = {" ".join(path) for path, _ in commands}
    for path, _ in commands:
        name = " ".join(path)
        if name not in secs:
            problems.append(f"docs/commands.md has no '## {name}' section")
        if not any(row[: len(path)] == list(path) for row in rows):
            problems.append(f"README's command table has no row for `edgetransfer {name}`")
    for title in secs:
        if title not in names and title != GLOBAL_SECTION:
            problems.append(f"docs/commands.md documents '{title}', which is not a command")
    return problems


def option_doc_problems(group: click.Group, commands: list[Command], commands_md: str) -> list[str]:
    problems = []
    secs = sections(commands_md)
    for path, cmd in [((GLOBAL_SECTION,), group), *commands]:
        name = " ".join(path)
        if name not in secs:
            continue  # command_doc_problems reports the missing section
        # described in the text, not just used in an example
        body = "\n".join(line for _, line in prose_lines(secs[name]))
        for opt in option_names(cmd):
            if not re.search(rf"(?<![\w-]){re.escape(opt)}(?![\w-])", body):
                problems.append(f"docs/commands.md '## {name}' does not mention {opt}")
    return problems


def link_problems(files: list[Path], root: Path = ROOT) -> list[str]:
    problems = []
    for f in files:
        for line, target in links(f.read_text(encoding="utf-8")):
            if re.match(r"[a-z][a-z0-9+.-]*:", target, re.I):  # https:, mailto:
                continue
            path, _, anchor = target.partition("#")
            dest = (f.parent / path).resolve() if path else f
            where = f"{f.relative_to(root)}:{line}: {target}"
            if not dest.exists():
                problems.append(f"{where}: no such file")
            elif anchor and dest.suffix == ".md" and anchor not in anchors(dest.read_text()):
                problems.append(f"{where}: no heading with that anchor")
    return problems


def unlinked_pages(readme: Path, pages: list[Path], root: Path = ROOT) -> list[str]:
    linked = {
        (readme.parent / t.partition("#")[0]).resolve()
        for _, t in links(readme.read_text(encoding="utf-8"))
    }
    return [
        f"README does not link {p.relative_to(root)}" for p in pages if p.resolve() not in linked
    ]


# --- the real docs --------------------------------------------------------------------------

COMMANDS = walk(cli)
PAGES = sorted(DOCS.glob("*.md"))


def test_walk_finds_every_command():
    names = {" ".join(p) for p, _ in COMMANDS}
    expected = "adapt export verify predict evaluate bench info archs demo".split()
    assert set(expected) <= names


def test_every_command_in_commands_md_and_readme_table():
    assert command_doc_problems(COMMANDS, COMMANDS_MD.read_text(), README.read_text()) == []


def test_every_option_in_commands_md():
    assert option_doc_problems(cli, COMMANDS, COMMANDS_MD.read_text()) == []


def test_readme_is_short():
    n = len(README.read_text().splitlines())
    assert n < MAX_README_LINES, f"README.md has {n} lines; move reference text to docs/"


def test_relative_links_and_anchors_resolve():
    assert link_problems([README, *PAGES]) == []


def test_every_docs_page_linked_from_readme():
    assert PAGES, "no docs/*.md pages"
    assert unlinked_pages(README, PAGES) == []


# --- the checkers can fail ------------------------------------------------------------------


@click.group()
@click.option("--verbose")
def _toy():
    """A CLI with a nested group, to show the checkers fail on each kind of gap."""


@_toy.group()
def remote():
    """A nested group."""


@remote.command()
@click.option("-f", "--force", is_flag=True)
@click.option("--secret", hidden=True)
def add():
    """A nested command."""


TOY_DOC = """# Commands

## Global options

`--verbose`

## remote

## remote add

```
toy remote add --force x  # an example is not a description
```

`-f, --force` replaces.

```
## not a heading: inside a code block
```
"""
TOY_README = """| command | what |
|---|---|
| `edgetransfer remote` | remotes |
| `edgetransfer remote add NAME` | add one |
"""


def test_checkers_pass_on_complete_toy_docs():
    toy = walk(_toy)
    assert [p for p, _ in toy] == [("remote",), ("remote", "add")]
    assert command_doc_problems(toy, TOY_DOC, TOY_README) == []
    assert option_doc_problems(_toy, toy, TOY_DOC) == []  # --secret is hidden: exempt


def test_missing_section_row_or_stale_section_is_reported():
    toy = walk(_toy)
    doc = TOY_DOC.replace("## remote add\n", "## remove\n")
    readme = TOY_README.replace("| `edgetransfer remote add NAME` | add one |\n", "")
    assert command_doc_problems(toy, doc, readme) == [
        "docs/commands.md has no '## remote add' section",
        "README's command table has no row for `edgetransfer remote add`",
        "docs/commands.md documents 'remove', which is not a command",
    ]


def test_missing_option_is_reported():
    toy = walk(_toy)
    doc = TOY_DOC.replace("`-f, --force` replaces.", "`--forced` replaces.").replace(
        "`--verbose`", ""
    )
    assert option_doc_problems(_toy, toy, doc) == [
        "docs/commands.md '## Global options' does not mention --verbose",
        "docs/commands.md '## remote add' does not mention -f",
        "docs/commands.md '## remote add' does not mention --force",
    ]


def test_broken_links_and_anchors_are_reported(tmp_path):
    (tmp_path / "docs").mkdir()
    page = tmp_path / "docs" / "a.md"
    page.write_text("# A\n\n## Set up — fast\n\ntext\n")
    readme = tmp_path / "README.md"
    readme.write_text(
        "[ok](docs/a.md#set-up--fast) [self](#top) [web](https://example.org/x)\n"
        "[gone](docs/b.md) [bad anchor](docs/a.md#nope) `[code](docs/c.md)`\n\n# Top\n"
    )
    assert link_problems([readme, page], tmp_path) == [
        "README.md:2: docs/b.md: no such file",
        "README.md:2: docs/a.md#nope: no heading with that anchor",
    ]
    assert unlinked_pages(readme, [page], tmp_path) == []
    readme.write_text("no links\n")
    assert unlinked_pages(readme, [page], tmp_path) == ["README does not link docs/a.md"]

"""The README and docs/ point only at what exists, and the README stays a short entry with a way to every page.

Checked over README.md and every docs/*.md: relative links resolve to files of the repository and their #anchors to
headings of the target page (GitHub's rule); repository paths named in backticks exist; every `--flag` of a
`distill COMMAND` line is an option of that command; the README's "five commands" parse (the train line's
overrides validate against the config) and name only flags and keys that exist. Each checker is also run on a
small bad text, so it can fail.
"""

from __future__ import annotations

import argparse
import re
import shlex
from pathlib import Path

import pytest

from distill.cli import build_parser
from distill.config.train_config import Config

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
PAGES = [README, *sorted((ROOT / "docs").glob("*.md"))]
MAX_README_LINES = 200
# The reference pages the README must link (issue 19): where its prose moved.
LINKED_FROM_README = (
    "cache",
    "train",
    "eval",
    "corpus",
    "teachers",
    "scale",
    "multi-gpu",
    "reliability",
    "architecture",
    "benchmarks",
)
# Documents that are not in the repository (or no longer): nothing may name them.
GONE = ("RELIABILITY.md", "DESIGN.md", "STYLE.md")
ROOMS = ("cache", "distill", "student", "teachers", "tests", "benchmarks", "configs", "docs")
GLOBAL_OPTIONS = ("-v", "--verbose", "--version", "-h", "--help")

LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
HEADING = re.compile(r"^#{1,6}\s+(.*?)\s*#*\s*$")
REPO_PATH = re.compile(r"`((?:{})/[^`\s]*)`".format("|".join(ROOMS)))


# -- checkers ------------------------------------------------------------------------------------------------
def slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation (backticks, dots, slashes, ...) dropped, spaces -> -."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def prose_lines(text: str) -> list[str]:
    """The lines outside fenced code blocks (``` ... ```)."""
    out, fenced = [], False
    for line in text.splitlines():
        if line.lstrip().startswith("```"):
            fenced = not fenced
            continue
        if not fenced:
            out.append(line)
    return out


def anchors(text: str) -> set[str]:
    """Every heading anchor of a page, with GitHub's -1, -2 suffixes for repeated headings."""
    seen: dict[str, int] = {}
    out = set()
    for line in prose_lines(text):
        m = HEADING.match(line)
        if not m:
            continue
        s = slug(m.group(1))
        n = seen.get(s, 0)
        seen[s] = n + 1
        out.add(s if n == 0 else f"{s}-{n}")
    return out


def broken_links(page: Path, text: str, root: Path = ROOT) -> list[str]:
    """Relative links of `text` (as written in `page`) whose file is missing or outside `root`, or whose anchor is
    not a heading of the target page."""
    bad = []
    for target in LINK.findall(text):
        if re.match(r"[a-z]+:", target):  # https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        if not dest.exists() or root.resolve() not in (dest, *dest.parents):
            bad.append(f"{page.name}: {target} (no such file)")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest.read_text(encoding="utf-8")):
            bad.append(f"{page.name}: {target} (no heading with that anchor in {dest.name})")
    return bad


def missing_paths(text: str, root: Path = ROOT) -> list[str]:
    """Repository paths named in backticks (`cache/store/layout.py`, `tests/test_x.py::test_y`) that do not exist;
    placeholders (NAME, STEP, *, {..}, ...) and files a worked example creates (`x.py` (new)) are skipped."""
    bad = []
    for m in REPO_PATH.finditer(text):
        raw = m.group(1)
        path = raw.split("::")[0].rstrip(".,;:)")
        if re.search(r"[A-Z]{2,}|[*{}]|\.\.\.", path) or text.startswith(" (new", m.end()):
            continue  # a placeholder, or a file a worked example creates
        if not (root / path).exists():
            bad.append(raw)
    return sorted(set(bad))


def subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    return next(a.choices for a in parser._actions if isinstance(a, argparse._SubParsersAction))


def distill_commands(text: str) -> list[list[str]]:
    """Every `distill COMMAND ...` line (with its `\\` continuations) in code blocks and inline code, as tokens."""
    lines = text.splitlines()
    spans = [s for line in lines for s in re.findall(r"`(distill [^`]+)`", line)]
    i = 0
    while i < len(lines):
        line = lines[i].strip()
        if line.startswith("distill ") and "`" not in line:
            while line.endswith("\\") and i + 1 < len(lines):
                i += 1
                line = line[:-1] + " " + lines[i].strip()
            spans.append(line)
        i += 1
    out = []
    for span in spans:
        try:
            out.append(shlex.split(span, comments=True))
        except ValueError:  # an unclosed quote in prose: take the words as they are
            out.append(span.split())
    return out


def unknown_flags(text: str, parser: argparse.ArgumentParser) -> list[str]:
    """`distill COMMAND --flag` uses in `text` where --flag is not an option of COMMAND."""
    commands = subcommands(parser)
    bad = []
    for tokens in distill_commands(text):
        rest = [t for t in tokens[1:] if t not in GLOBAL_OPTIONS]
        if not rest or rest[0] not in commands:
            continue
        cmd = rest[0]
        known = {s for a in commands[cmd]._actions for s in a.option_strings}
        if cmd == "train":
            known |= {"--config", "--help", "-h"}
        for t in rest[1:]:
            flag = t.strip("[]()|,").split("=")[0]
            if flag.startswith("--") and len(flag) > 2 and flag not in known:
                bad.append(f"distill {cmd} {flag}")
    return sorted(set(bad))


def five_commands(readme: str) -> list[list[str]]:
    """The `distill` commands of the README's "Your own data in five commands" section, in order."""
    section = readme.split("## Your own data in five commands", 1)[1].split("\n## ", 1)[0]
    blocks = "\n".join(line for line in section.splitlines() if line.startswith("    "))
    return distill_commands(blocks)


# -- the project's pages -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def texts() -> dict[Path, str]:
    return {p: p.read_text(encoding="utf-8") for p in PAGES}


def test_readme_is_short():
    n = len(README.read_text(encoding="utf-8").splitlines())
    assert n <= MAX_README_LINES, f"README.md has {n} lines; move reference prose into docs/ and link it"


def test_readme_links_every_reference_page(texts):
    linked = {Path(t.partition("#")[0]).stem for t in LINK.findall(texts[README]) if t.startswith("docs/")}
    missing = [p for p in LINKED_FROM_README if p not in linked or not (ROOT / "docs" / f"{p}.md").is_file()]
    assert not missing, f"README.md links no docs/ page for: {missing}"
    unlinked = [p.name for p in PAGES[1:] if p.stem not in linked]
    assert not unlinked, f"docs/ pages the README does not link: {unlinked}"


def test_links_and_anchors_resolve(texts):
    bad = [b for page, text in texts.items() for b in broken_links(page, text)]
    assert not bad, "broken links:\n" + "\n".join(bad)


def test_named_repository_paths_exist(texts):
    bad = {page.name: missing for page, text in texts.items() if (missing := missing_paths(text))}
    assert not bad, f"README/docs name files that are not in the repository: {bad}"


def test_distill_flags_in_the_docs_exist(texts):
    parser = build_parser()
    bad = {page.name: u for page, text in texts.items() if (u := unknown_flags(text, parser))}
    assert not bad, f"flags the commands do not have (check `distill CMD --help`): {bad}"


def test_the_five_commands_parse(texts):
    commands = five_commands(texts[README])
    assert [c[1] for c in commands] == ["corpus", "cache", "train", "export", "eval"]
    parser = build_parser()
    for tokens in commands:
        if tokens[1] == "train":
            config = tokens[tokens.index("--config") + 1]
            overrides = [t for t in tokens[2:] if "=" in t and not t.startswith("-")]
            cfg = Config.from_yaml(ROOT / config, overrides, static=True)  # a mistyped key raises, naming it
            assert cfg.data.features == "features.h5" and cfg.train.output_dir == "runs/mine"
        else:
            parser.parse_args(tokens[1:])  # an unknown flag or a missing required one exits


def test_no_page_names_a_document_that_is_gone(texts):
    bad = [f"{page.name}: {name}" for page, text in texts.items() for name in GONE if name in text]
    assert not bad, bad


def test_no_file_names_a_document_that_is_gone():
    """Code, tests, configs and benchmarks name docs/reliability.md, not RELIABILITY.md, and cite nothing outside the
    repository (DESIGN.md, STYLE.md)."""
    files = [p for room in ROOMS for p in (ROOT / room).rglob("*") if p.suffix in (".py", ".md", ".yaml", ".sh")]
    files += [ROOT / "Makefile", ROOT / "pyproject.toml"]
    me = Path(__file__).resolve()
    bad = [
        f"{p.relative_to(ROOT)}: {name}"
        for p in files
        if p.resolve() != me and p.is_file()
        for name in GONE
        if name in p.read_text(encoding="utf-8", errors="replace")
    ]
    assert not bad, (
        "stale document names (reliability: docs/reliability.md; design: docs/architecture.md):\n"
        + "\n".join(sorted(bad))
    )


# -- the checkers can fail ------------------------------------------------------------------------------------
def test_slug_follows_github():
    assert (
        slug("`distill train` / `accelerate launch -m distill.train`")
        == "distill-train--accelerate-launch--m-distilltrain"
    )
    assert (
        slug("Does the student beat its teachers? (`benchmarks/multi_teacher.py`)")
        == "does-the-student-beat-its-teachers-benchmarksmulti_teacherpy"
    )
    assert anchors("# A\n## A\n```\n# not a heading\n```\n") == {"a", "a-1"}


def test_checkers_find_broken_links_missing_paths_and_unknown_flags(tmp_path):
    page = tmp_path / "docs" / "x.md"
    page.parent.mkdir()
    (tmp_path / "docs" / "y.md").write_text("# Real heading\n")
    text = (
        "[ok](y.md#real-heading) [gone](nope.md) [bad anchor](y.md#other) [out](../../outside.md) "
        "[web](https://example.org)"
    )
    assert broken_links(page, text, tmp_path) == [
        "x.md: nope.md (no such file)",
        "x.md: y.md#other (no heading with that anchor in y.md)",
        "x.md: ../../outside.md (no such file)",
    ]
    assert missing_paths(
        "`cache/no_such.py` `cache/store/layout.py` `teachers/NAME/text` `tests/x.py::t` `distill/data/mine.py` (new)"
    ) == ["cache/no_such.py", "tests/x.py::t"]
    text = (
        "    distill cache --data c.csv --teacher a=b --out f.h5 \\\n"
        "                  --no-such-flag 3 [--views K]\n"
        "run `distill -v eval --modle x=y` or `distill train --config c.yaml --bogus`\n"
    )
    assert unknown_flags(text, build_parser()) == [
        "distill cache --no-such-flag",
        "distill eval --modle",
        "distill train --bogus",
    ]


def test_the_five_commands_checker_reads_the_section():
    readme = (
        "# x\n## Your own data in five commands\n\n    distill corpus --source a.csv --template t\n"
        "    # a comment\n    distill cache --data a --teacher a=b \\\n        --out f.h5\n\n## Next\n"
        "    distill eval --model a=b\n"
    )
    assert five_commands(readme) == [
        ["distill", "corpus", "--source", "a.csv", "--template", "t"],
        ["distill", "cache", "--data", "a", "--teacher", "a=b", "--out", "f.h5"],
    ]

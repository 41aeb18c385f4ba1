"""The documentation says what the checkout holds and does.

- docs/configuration.md is what hvcodistill/configref.py renders from hvcodistill/config.py now,
  and names every key of every config section with its default;
- every relative link (and its #anchor) and every repository path that README.md or a page under
  docs/ names, in a link, in backticks or in a code block, exists;
- every command README.md shows in a `sh` block runs as printed (`python` being the interpreter of
  the venv, as after `source .venv/bin/activate`) and exits 0, unless SKIPPED names it with the
  reason it is too expensive for a test. A new command is run until it is added there.
"""

from __future__ import annotations

import dataclasses
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from hvcodistill import configref
from hvcodistill.config import Config

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
DOCS = ROOT / "docs"
PAGES = [README, *sorted(DOCS.rglob("*.md"))]

# README commands not run here, each with the reason. Every key must be a command README shows.
SKIPPED = {
    "make demo": "a training run of 4 MPI ranks, about a minute (the MPI tests run its config)",
    "make test": "the whole test suite",
    "python -m hvcodistill.launch -np 4 python -m hvcodistill.train --config "
    "configs/digits_codistill.yaml": "a training run of 4 MPI ranks (the MPI tests run it)",
    "python -m hvcodistill.launch -np 4 python -m hvcodistill.train --config "
    "configs/digits_codistill.yaml codistill.mode=weights codistill.every=50 "
    "run.dir=runs/weights": "a training run of 4 MPI ranks",
    "mpirun -np 16 python -m hvcodistill.train --config configs/imagenet_resnet50_codistill.yaml "
    "data.path=/data/imagenet": "16 GPUs and ImageNet",
    "sbatch slurm/codistill.sbatch": "a SLURM cluster with GPUs",
    "python -m hvcodistill.sweep studies/paper_miniature.yaml": "40 training runs, about 12 min",
    "python -m hvcodistill.report runs/studies/paper_miniature": "needs the study's 40 runs",
}
LANGUAGES = ("sh", "text")  # every fenced block in README.md says which it is
COMMAND_TIMEOUT_S = 180

# A repository path as the pages write it: under one of these folders, or a file at the root.
PATH_RE = re.compile(r"^(?:hvcodistill|configs|slurm|studies|scripts|docs|tests)/[\w.*/-]*$")
ROOT_FILES = {"Makefile", "Dockerfile", "pyproject.toml", "README.md"}
LINK_RE = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
CODE_SPAN_RE = re.compile(r"`([^`\n]+)`")
FENCE_RE = re.compile(r"^\s*```(.*)$")
HEADING_RE = re.compile(r"^#{1,6}\s+(.*?)\s*#*\s*$")


def split(text: str) -> tuple[list[str], list[tuple[str, list[str]]]]:
    """(prose lines, fenced blocks as (info string, lines))."""
    prose, blocks, block = [], [], None
    for line in text.splitlines():
        fence = FENCE_RE.match(line)
        if fence and block is None:
            block = (fence.group(1).strip(), [])
        elif fence:
            blocks.append(block)
            block = None
        elif block is not None:
            block[1].append(line)
        else:
            prose.append(line)
    assert block is None, "a code block is not closed"
    return prose, blocks


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    prose, _ = split(page.read_text(encoding="utf-8"))
    return {slug(m.group(1)) for line in prose if (m := HEADING_RE.match(line))}


def repo_path_problem(candidate: str) -> str | None:
    """None when `candidate` is no repository path, or one that exists; else what is wrong."""
    candidate = candidate.strip().rstrip(".,;:)")
    if candidate not in ROOT_FILES and not PATH_RE.match(candidate):
        return None
    if "*" in candidate:
        return None if list(ROOT.glob(candidate)) else f"{candidate} matches no file"
    return None if (ROOT / candidate).exists() else f"{candidate} does not exist"


def page_problems(page: Path) -> list[str]:
    prose, blocks = split(page.read_text(encoding="utf-8"))
    problems = []
    text = "\n".join(prose)
    for target in LINK_RE.findall(text):
        if re.match(r"^[a-z]+:", target):  # https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        if not dest.exists():
            problems.append(f"link {target}: {dest} does not exist")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            problems.append(f"link {target}: no heading #{anchor} in {dest.name}")
    for span in CODE_SPAN_RE.findall(text):
        if problem := repo_path_problem(span):
            problems.append(f"`{span}`: {problem}")
    for _, lines in blocks:
        for token in " ".join(lines).split():
            token = token.strip("\"'").rpartition("=")[2]
            if problem := repo_path_problem(token):
                problems.append(f"code block: {problem}")
    return problems


# ---------------------------------------------------------------- the configuration reference


def test_configuration_reference_is_current():
    page = ROOT / configref.PAGE
    assert page.read_text(encoding="utf-8") == configref.render(), (
        f"{configref.PAGE} is not what hvcodistill/config.py gives now: run `make docs`"
    )


def test_configuration_reference_names_every_key_with_its_default():
    text = (ROOT / configref.PAGE).read_text(encoding="utf-8")
    rows = {}
    for line in text.splitlines():
        m = re.match(r"^\| `(\w+\.\w+)` \| [^|]+ \| `([^`]*)` \| (.+) \|$", line)
        if m:
            rows[m.group(1)] = (m.group(2), m.group(3))
    for section in dataclasses.fields(Config):
        for f in dataclasses.fields(section.default_factory):
            key = f"{section.name}.{f.name}"
            assert key in rows, f"{key} is missing from {configref.PAGE}"
            default = getattr(section.default_factory(), f.name)
            shown, meaning = rows[key]
            assert yaml.safe_load(shown) == default, f"{key}: the page says {shown}, not {default}"
            assert meaning.strip(), f"{key} has no meaning on the page"


# ---------------------------------------------------------------- links and paths


@pytest.mark.parametrize("page", PAGES, ids=[str(p.relative_to(ROOT)) for p in PAGES])
def test_links_and_paths_exist(page):
    assert page_problems(page) == []


def test_readme_links_every_page():
    linked = {(ROOT / t.partition("#")[0]).resolve() for t in LINK_RE.findall(README.read_text())}
    missing = [p.name for p in sorted(DOCS.glob("*.md")) if p.resolve() not in linked]
    assert not missing, f"README.md links no {missing}"


def test_readme_is_a_landing_page():
    lines = len(README.read_text(encoding="utf-8").splitlines())
    assert lines <= 250, f"README.md has {lines} lines: move the manual's parts to docs/"


def test_the_checks_find_what_is_missing(tmp_path):
    page = tmp_path / "page.md"
    page.write_text(
        "# Title\n[a](missing.md) [b](#title) [c](#nowhere) `configs/none.yaml` `runs/x`\n"
        "```sh\npython -m hvcodistill.train --config configs/gone.yaml\n```\n"
    )
    problems = page_problems(page)
    assert len(problems) == 4, problems
    for what in ("missing.md", "#nowhere", "configs/none.yaml", "configs/gone.yaml"):
        assert any(what in p for p in problems), (what, problems)


# ---------------------------------------------------------------- README commands


def readme_commands() -> list[str]:
    _, blocks = split(README.read_text(encoding="utf-8"))
    commands = []
    for info, lines in blocks:
        assert info in LANGUAGES, f"README.md: a code block marked {info!r}, not one of {LANGUAGES}"
        if info != "sh":
            continue
        joined = "\n".join(lines).replace("\\\n", " ")
        for line in joined.splitlines():
            command = " ".join(re.sub(r"(^|\s)#\s.*$", "", line).split())
            if command:
                commands.append(command)
    return commands


COMMANDS = readme_commands()


def test_skipped_commands_are_shown():
    stale = sorted(set(SKIPPED) - set(COMMANDS))
    assert not stale, f"SKIPPED names commands README.md no longer shows: {stale}"


@pytest.mark.parametrize("command", COMMANDS, ids=COMMANDS)
def test_readme_command_runs_as_printed(command):
    if command in SKIPPED:
        pytest.skip(SKIPPED[command])
    venv_bin = Path(sys.executable).parent
    if command.startswith("source .venv/") and not (ROOT / ".venv").is_dir():
        pytest.skip("no .venv here (the set-up went elsewhere: VENV=...)")
    env = dict(os.environ, PATH=f"{venv_bin}{os.pathsep}{os.environ.get('PATH', '')}")
    env["VIRTUAL_ENV"] = str(venv_bin.parent)
    done = subprocess.run(
        ["bash", "-c", command],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=COMMAND_TIMEOUT_S,
    )
    assert done.returncode == 0, (
        f"{command}\nexit {done.returncode}\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}"
    )

"""README.md against the code it describes: the shipped config, the flags of --help, the commands, the length.

The README is a user guide that must not drift: config.yaml explains every key, every flag that
`python src/main.py --help` prints is documented, the quick start and test commands are the ones CI runs, and
measured results live in tables (bench/RESULTS.md), never in a diary of runs.
"""

from __future__ import annotations

import re
import subprocess
import sys

import pytest
from helpers import MAIN, ROOT

README_PATH = ROOT / "README.md"
README = README_PATH.read_text(encoding="utf-8")
MAX_LINES = 300

# A lab notebook, not a user guide: times of day, sessions, runs counted between times.
NOTEBOOK_PATTERNS = [
    re.compile(r"\b(at|between) [0-2][0-9]:[0-5][0-9]\b", re.IGNORECASE),
    re.compile(r"\bthis session\b", re.IGNORECASE),
    re.compile(r"\blast session\b", re.IGNORECASE),
    re.compile(r"\bruns between\b", re.IGNORECASE),
]


def section(heading: str) -> str:
    """The text of the README's `## heading` section, up to the next `## ` heading."""
    match = re.search(rf"^## {re.escape(heading)}[^\n]*\n(.*?)(?=^## |\Z)", README, re.MULTILINE | re.DOTALL)
    assert match, f"README.md has no '## {heading}' section"
    return match.group(1)


def strip_trailing(text: str) -> list[str]:
    """Lines without trailing whitespace, and without blank lines at the end."""
    lines = [line.rstrip() for line in text.splitlines()]
    while lines and not lines[-1]:
        lines.pop()
    return lines


@pytest.fixture(scope="module")
def help_text() -> str:
    run = subprocess.run([sys.executable, str(MAIN.relative_to(ROOT)), "--help"], cwd=ROOT, capture_output=True,
                         text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    return run.stdout


def test_configuration_points_to_a_config_yaml_that_comments_every_key() -> None:
    """The README sends the reader to config.yaml for the keys, so config.yaml must explain each one: every key
    line (`key: value`) carries a comment, on its line or on a line of its own just above it."""
    assert "[`config.yaml`](config.yaml)" in section("Configuration")
    lines = (ROOT / "config.yaml").read_text(encoding="utf-8").splitlines()
    bare = [line for number, line in enumerate(lines)
            if re.match(r"^\s+[a-z_]+:\s*\S", line) and "#" not in line
            and not (number and lines[number - 1].strip().startswith("#"))
            and not line.strip().startswith("- ")]
    assert not bare, "config.yaml keys without a comment:\n" + "\n".join(bare)


def test_every_flag_of_help_is_in_the_readme(help_text: str) -> None:
    flags = sorted(set(re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", help_text)))
    assert len(flags) >= 10, f"could not read the flags from --help:\n{help_text}"
    missing = [flag for flag in flags if not re.search(rf"(?<![\w-]){re.escape(flag)}(?![\w-])", README)]
    assert not missing, f"flags of --help missing from README.md: {', '.join(missing)}"


def test_quick_start_commands() -> None:
    quick_start = section("Quick start")
    venv = quick_start.find("python3 -m venv .venv && source .venv/bin/activate")
    install = quick_start.find("pip install -r requirements.txt")
    assert venv >= 0, "the quick start should create and activate a venv"
    assert install > venv, "the quick start should create the venv before pip install"
    commands = [line.split("#")[0].strip() for line in quick_start.splitlines()]
    assert "python src/main.py" in commands
    assert "pytest tests/" in commands


def test_test_command() -> None:
    commands = [line.split("#")[0].strip() for line in section("Tests").splitlines()]
    assert "pytest tests/" in commands


def test_readme_is_short() -> None:
    lines = README.splitlines()
    assert len(lines) <= MAX_LINES, f"README.md has {len(lines)} lines; at most {MAX_LINES}"


@pytest.mark.parametrize("pattern", NOTEBOOK_PATTERNS, ids=lambda p: p.pattern)
def test_no_lab_notebook_lines(pattern: re.Pattern) -> None:
    hits = [f"{number}: {line}" for number, line in enumerate(README.splitlines(), start=1) if pattern.search(line)]
    assert not hits, "lab-notebook lines in README.md (measured results go in bench/RESULTS.md tables):\n" \
        + "\n".join(hits)

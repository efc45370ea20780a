"""The test suite's own machinery: the hand-made mutants still fit the code, and the slow tests find their data
through environment variables and fail, naming the variable, where it is missing."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import mutants
import pytest
from helpers import DATA_SETS, ROOT, find_data, write_idx_folder


@pytest.mark.parametrize("mutant", mutants.MUTANTS, ids=lambda mutant: mutant.name)
def test_every_mutant_still_applies_to_the_source(mutant: mutants.Mutant) -> None:
    """Each original text occurs exactly once where the mutant edits it, and the edited source still compiles
    (python tests/mutants.py runs them; this keeps the list from rotting as the code changes)."""
    source = (ROOT / mutant.path).read_text()
    assert mutants.mutated(source, mutant) != source
    for name in mutant.tests:
        file_name, _, test_name = name.partition("::")
        assert (ROOT / "tests" / file_name).is_file(), name
        assert not test_name or f"def {test_name}(" in (ROOT / "tests" / file_name).read_text(), name


def test_a_mutant_whose_text_is_gone_is_refused() -> None:
    gone = mutants.Mutant("gone", "a formula the code no longer has", (("x = y + 1", "x = y"),), ("test_layers.py",))
    with pytest.raises(mutants.OutdatedMutantError, match="occurs 0 times"):
        mutants.mutated("x = y - 1\n", gone)
    with pytest.raises(mutants.OutdatedMutantError, match="occurs 2 times"):
        mutants.mutated("x = y + 1\nx = y + 1\n", gone)


def test_mutant_names_are_unique() -> None:
    names = [mutant.name for mutant in mutants.MUTANTS]
    assert len(names) == len(set(names)) >= 20


def test_data_folders_come_from_the_environment_first(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """$NUMPY_CNN_MNIST names the folder when set; a folder without the IDX files is reported, not used."""
    folder = write_idx_folder(tmp_path / "mnist")
    monkeypatch.setenv("NUMPY_CNN_MNIST", str(folder))
    assert find_data("NUMPY_CNN_MNIST") == (folder, "")
    monkeypatch.setenv("NUMPY_CNN_MNIST", str(tmp_path))
    found, missing = find_data("NUMPY_CNN_MNIST")
    assert found is None and f"NUMPY_CNN_MNIST={tmp_path}" in missing and "train-images-idx3-ubyte" in missing


def test_slow_tests_without_their_data_fail_and_say_which_variable_to_set(tmp_path: Path) -> None:
    """`pytest -m slow` where neither data set is found does not pass by skipping: every test that needs data
    fails at once, saying which variable to set."""
    env = {**os.environ, "NUMPY_CNN_MNIST": str(tmp_path), "NUMPY_CNN_FASHION": str(tmp_path),
           "PYTHONDONTWRITEBYTECODE": "1"}
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-m", "slow", "-k", "mnist", "-p", "no:cacheprovider",
                          "tests/test_slow.py"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 1, run.stdout + run.stderr
    summary = run.stdout.strip().splitlines()[-1]
    errors = re.search(r"(\d+) errors? in", summary)
    assert errors and int(errors.group(1)) >= 5, run.stdout
    assert "passed" not in summary and "skipped" not in summary and "failed" not in summary, summary
    assert run.stdout.count("set NUMPY_CNN_MNIST to a folder") >= 4
    assert "set NUMPY_CNN_FASHION to a folder" in run.stdout


def test_the_readme_names_every_data_variable() -> None:
    """The README's Tests section says how to point the slow tests at their data."""
    tests_section = (ROOT / "README.md").read_text(encoding="utf-8").split("\n## Tests\n", 1)[1].split("\n## ", 1)[0]
    for variable in DATA_SETS:
        assert f"{variable}=DIR" in tests_section, variable

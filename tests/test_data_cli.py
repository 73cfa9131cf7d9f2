"""`fedpact data check` shows the layout a node announces and how to complete a mapping;
`fedpact data compare` names the partner, column and value where mappings' layouts differ."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pandas as pd
from test_mapping_strict import MAPPING, churn_csv, latin1_csv, write

from fedpact.models.datasets import load_mapping
from fedpact.models.features import FeaturePipeline

FEDPACT_CLI = Path(sys.executable).with_name("fedpact")
# The same mapping without its [bounds] and without the Geography categories.
UNDECLARED = (MAPPING.split("\n[bounds]\n")[0]
              .replace('Geography = ["France", "Germany", "Spain"]\n', ""))


def run_cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "COLUMNS": "120", "NO_COLOR": "1"}
    result = subprocess.run([str(FEDPACT_CLI), *map(str, args)], capture_output=True, text=True,
                            env=env, timeout=60)
    assert "Traceback" not in result.stdout + result.stderr, result.stderr
    return result


def between(text: str, start: str, end: str) -> str:
    """The lines after the line holding `start` and before the next line holding `end`."""
    lines = text.splitlines()
    first = next(i for i, line in enumerate(lines) if start in line)
    last = next(i for i in range(first + 1, len(lines)) if end in lines[i])
    return "\n".join(lines[first + 1:last])


def test_check_prints_the_exact_layout_the_node_announces(tmp_path):
    """The layout block is JSON equal to FeaturePipeline.public(spec).layout(), printed unwrapped."""
    mapping = write(tmp_path, "churn.toml", MAPPING)
    result = run_cli("data", "check", write(tmp_path, "churn.csv", churn_csv()), "--mapping", mapping)
    assert result.returncode == 0, result.stderr
    assert "valid" in result.stdout and "40" in result.stdout
    shown = between(result.stdout, "BEGIN LAYOUT", "END LAYOUT")
    assert json.loads(shown) == FeaturePipeline.public(load_mapping(mapping)).layout()
    assert '"Geography": ["France", "Germany", "Spain"]' in shown  # one column per line
    assert "15 model inputs" in result.stdout
    assert "suggested" not in result.stdout.lower()


def test_check_of_an_undeclared_mapping_lists_what_to_declare_and_suggests_it(tmp_path):
    """No layout yet: every undeclared column is named, and a TOML block computed from the file
    (labelled as such, bounds rounded outward) completes the mapping."""
    csv = write(tmp_path, "churn.csv", churn_csv())
    mapping = write(tmp_path, "churn.toml", UNDECLARED)
    result = run_cli("data", "check", csv, "--mapping", mapping)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "BEGIN LAYOUT" not in out
    assert "a node will refuse this mapping" in out
    for col in ("CreditScore", "Age", "Tenure", "Balance", "NumOfProducts", "EstimatedSalary"):
        assert f"numeric column {col!r} has no declared bounds" in out, col
    assert "categorical column 'Geography' has no declared categories" in out
    assert "from your file — prefer your domain's ranges; rounded outward" in out
    block = between(out, "BEGIN SUGGESTED", "END SUGGESTED")
    doc = tomllib.loads(block)
    assert doc["categories"] == {"Geography": ["France", "Germany", "Spain"]}
    frame = pd.read_csv(csv)
    for col, (low, high) in doc["bounds"].items():
        assert low <= frame[col].min() and high >= frame[col].max(), col
        for value in (low, high):
            assert float(f"{value:.2g}") == value, (col, value)  # two significant figures
    assert doc["bounds"]["Balance"][0] == 0 and doc["bounds"]["NumOfProducts"] == [1, 4]
    # Pasted into the mapping, the block makes it public, and the layout is then shown.
    head, tables = UNDECLARED.split("\n[categories]\n")
    completed = write(tmp_path, "completed.toml", head + "\n[categories]\n" + tables
                      + 'Geography = ["France", "Germany", "Spain"]\n\n'
                      + block.split("[categories]")[0])
    again = run_cli("data", "check", csv, "--mapping", completed)
    assert again.returncode == 0 and "BEGIN LAYOUT" in again.stdout, again.stdout


def test_check_shows_unmapped_and_missing_drop_columns(tmp_path):
    mapping = write(tmp_path, "churn.toml", MAPPING.replace('drop = ["RowNumber", "Surname"]',
                                                            'drop = ["Surname", "Notes"]'))
    result = run_cli("data", "check", write(tmp_path, "churn.csv", churn_csv()), "--mapping", mapping)
    assert result.returncode == 0, result.stderr
    flat = " ".join(result.stdout.split())
    assert "1 unmapped column" in flat and "'RowNumber'" in flat
    assert "drop: 'Notes' is not a column of the file" in flat


def test_check_of_a_strict_mapping_error_exits_nonzero(tmp_path):
    mapping = write(tmp_path, "churn.toml", MAPPING.replace("\nGeography = [", "\nGeograpy = ["))
    result = run_cli("data", "check", write(tmp_path, "churn.csv", churn_csv()), "--mapping", mapping)
    assert result.returncode != 0
    flat = " ".join(result.stderr.split())
    assert "error" in flat and "categories.Geograpy" in flat and "did you mean 'Geography'?" in flat


def test_check_of_a_latin1_file_exits_nonzero_naming_the_line(tmp_path):
    result = run_cli("data", "check", write(tmp_path, "churn.csv", latin1_csv()), "--mapping",
                     write(tmp_path, "churn.toml", MAPPING))
    assert result.returncode != 0
    flat = " ".join(result.stderr.split())
    assert "line 4, column" in flat and 'try encoding = "latin-1"' in flat


def test_compare_identical_mappings_exits_zero(tmp_path):
    a = write(tmp_path, "north.toml", MAPPING)
    b = write(tmp_path, "south.toml", MAPPING.replace("northbank-churn", "southbank-churn")
              .replace('drop = ["RowNumber", "Surname"]', "drop = []"))
    result = run_cli("data", "compare", a, b)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "identical" in result.stdout and "northbank-churn" in result.stdout


def test_compare_names_mapping_column_and_value(tmp_path):
    a = write(tmp_path, "north.toml", MAPPING)
    b = write(tmp_path, "south.toml", MAPPING.replace("northbank-churn", "southbank-churn")
              .replace(', "Spain"]', "]"))
    c = write(tmp_path, "east.toml", MAPPING.replace("northbank-churn", "eastbank-churn")
              .replace("Balance = [0, 300000]", "Balance = [0, 250000]"))
    result = run_cli("data", "compare", a, b, c)
    assert result.returncode == 1, result.stdout + result.stderr
    flat = " ".join(result.stdout.split())
    assert ("column 'Geography': category 'Spain' is declared by northbank-churn, eastbank-churn "
            "but not by southbank-churn") in flat
    assert ("column 'Balance': bounds differ: [0, 300000] in northbank-churn, southbank-churn; "
            "[0, 250000] in eastbank-churn") in flat


def test_compare_of_an_undeclared_mapping_says_what_is_missing(tmp_path):
    a = write(tmp_path, "north.toml", MAPPING)
    b = write(tmp_path, "south.toml", UNDECLARED.replace("northbank-churn", "southbank-churn"))
    result = run_cli("data", "compare", a, b)
    assert result.returncode != 0
    flat = " ".join((result.stdout + result.stderr).split())
    assert "southbank-churn" in flat and "numeric column 'Balance' has no declared bounds" in flat


def test_compare_of_two_mappings_with_the_same_name_uses_the_file_names(tmp_path):
    a = write(tmp_path, "north.toml", MAPPING)
    b = write(tmp_path, "south.toml", MAPPING.replace(', "Spain"]', "]"))
    result = run_cli("data", "compare", a, b)
    assert result.returncode == 1
    flat = " ".join(result.stdout.split())
    assert "declared by northbank-churn (north.toml) but not by northbank-churn (south.toml)" in flat

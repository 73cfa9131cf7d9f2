"""Shared fixtures: where the real public data sets live (../shared/data)."""

from __future__ import annotations

import os
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

"""Parallel verification has a bounded wait and a sequential fallback that is reported.

`verify_log` checks a large SQLite ledger with worker processes (`_start_parallel_check`). A
fresh-clone test run once hung there: a worker that never answers (or dies) left the parent
waiting forever. Now the parent waits at most a time derived from the work size; if the workers
cannot start, die or run past it, the sequential check decides, with the same verdict, and the
result says so (`ChainVerification.notes`, plus a logged warning) — never silently.

The worker cases run in a fresh interpreter: workers are forked only from a single-threaded
process, and this test process may hold threads from earlier tests.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from ledger_tamper import tamper

import fedpact.audit.ledger as ledger_module
from fedpact.audit import EventType, Ledger

ACCESS = {"node": "bank-a", "dataset": "customers", "rows": 10, "columns": ["age"],
          "purpose": "churn model"}
EVENTS = 9_000  # two ranges of 4,096 leaves and a partial one: both workers get work


@pytest.fixture
def db(tmp_path: Path) -> Path:
    path = tmp_path / "l.db"
    with Ledger.open(path, checkpoint_every=1000) as ledger:
        for start in range(0, EVENTS, 3000):
            ledger.append_many(
                (EventType.DATA_ACCESSED, {**ACCESS, "rows": i}, "node:bank-a", "job")
                for i in range(start, start + 3000)
            )
    return path


def _sequential(path: Path) -> Any:
    with Ledger.open(path, read_only=True) as ledger:
        original = ledger_module._start_parallel_check
        ledger_module._start_parallel_check = lambda *args: None  # not applicable: sequential
        try:
            return ledger.verify()
        finally:
            ledger_module._start_parallel_check = original


_FRESH = """
import json, os, signal, sys, time
import fedpact.audit.ledger as m
from fedpact.audit import Ledger
mode = sys.argv[2]
m.PARALLEL_VERIFY_MIN_EVENTS = 1000
m.PARALLEL_VERIFY_TIMEOUT_BASE_S = 0.5
m.PARALLEL_VERIFY_TIMEOUT_PER_EVENT_S = 0.0
started = []
real = m._start_parallel_check
def spy(*args):
    check = real(*args)
    started.append(check is not None)
    return check
m._start_parallel_check = spy
if mode == "hang":
    def worker(job):
        time.sleep(3600)
    m._verify_range = worker
elif mode == "die":
    def worker(job):
        os.kill(os.getpid(), signal.SIGKILL)
    m._verify_range = worker
t0 = time.monotonic()
with Ledger.open(sys.argv[1], read_only=True) as ledger:
    r = ledger.verify()
print(json.dumps({"started": started, "seconds": time.monotonic() - t0, "ok": r.ok,
                  "first_bad_seq": r.first_bad_seq, "reason": r.reason,
                  "events_checked": r.events_checked, "head_hash": r.head_hash,
                  "checkpoints_checked": r.checkpoints_checked,
                  "notes": list(getattr(r, "notes", ()))}))
"""


def _fresh(path: Path, mode: str) -> dict:
    out = subprocess.run([sys.executable, "-c", _FRESH, str(path), mode], capture_output=True,
                         text=True, timeout=30, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def _same(fresh: dict, expected: Any) -> None:
    got = {k: fresh[k] for k in ("ok", "first_bad_seq", "reason", "events_checked",
                                 "head_hash", "checkpoints_checked")}
    assert got == {"ok": expected.ok, "first_bad_seq": expected.first_bad_seq,
                   "reason": expected.reason, "events_checked": expected.events_checked,
                   "head_hash": expected.head_hash,
                   "checkpoints_checked": expected.checkpoints_checked}


@pytest.mark.parametrize("tampered", [False, True], ids=["intact", "tampered"])
@pytest.mark.parametrize("mode", ["hang", "die"])
def test_workers_that_hang_or_die_fall_back_to_the_sequential_check(
    db: Path, mode: str, tampered: bool
) -> None:
    if tampered:
        tamper(db, "UPDATE ledger_events SET actor = 'node:mallory' WHERE seq = 5000")
    expected = _sequential(db)
    assert expected.ok is not tampered and expected.notes == ()
    if tampered:
        assert expected.first_bad_seq == 5000
    fresh = _fresh(db, mode)
    assert fresh["started"] == [True]  # the workers were started (and then hung or died)
    _same(fresh, expected)
    assert fresh["seconds"] < 10
    assert len(fresh["notes"]) == 1 and "verified sequentially" in fresh["notes"][0]
    assert ("did not answer within" if mode == "hang" else "died") in fresh["notes"][0]


def test_the_workers_agree_and_report_nothing(db: Path) -> None:
    """Workers that answer: the parallel verdict, no note (and the same verdict)."""
    fresh = _fresh(db, "normal")
    assert fresh["started"] == [True] and fresh["notes"] == []
    _same(fresh, _sequential(db))


def test_workers_that_cannot_start_fall_back_and_say_so(
    db: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def refuse(*args: Any) -> Any:
        raise OSError("cannot fork: resource temporarily unavailable")

    intact = _sequential(db)
    monkeypatch.setattr(ledger_module, "_start_parallel_check", refuse)
    with caplog.at_level(logging.WARNING, logger="fedpact.audit.ledger"), \
            Ledger.open(db, read_only=True) as ledger:
        result = ledger.verify()
    assert result == intact and result.ok
    assert len(result.notes) == 1 and "could not start" in result.notes[0]
    assert "cannot fork" in result.notes[0] and "verified sequentially" in result.notes[0]
    assert "verified sequentially" in caplog.text

    monkeypatch.undo()
    tamper(db, "UPDATE ledger_events SET payload = '{}' WHERE seq = 7777")
    broken = _sequential(db)
    monkeypatch.setattr(ledger_module, "_start_parallel_check", refuse)
    with Ledger.open(db, read_only=True) as ledger:
        result = ledger.verify()
    assert result == broken and not result.ok and result.first_bad_seq == 7777
    assert "could not start" in result.notes[0]


def test_the_wait_grows_with_the_work() -> None:
    small = ledger_module.parallel_verify_timeout(200_000)
    big = ledger_module.parallel_verify_timeout(10_000_000)
    assert 30 <= small < big
    assert big >= 10_000_000 / 50_000  # far slower than any worker has run (≈ 200k events/s)

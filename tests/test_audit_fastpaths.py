"""The ledger's fast paths give the same answers as the plain ones.

- the SQLite writer caches the chain head, the Merkle frontier and unsigned hashes between
  transactions; another connection's commit (another process, a tamperer) must invalidate them;
- large ledgers are verified by worker processes over aligned ranges; any anomaly falls back to
  the sequential check, which names the first bad event exactly as before.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from ledger_tamper import tamper

import fedpact.audit.ledger as ledger_module
from fedpact.audit import EventType, Ledger
from fedpact.audit.chain import canonical_json, event_hash
from fedpact.audit.merkle import MerkleFrontier, root_hash
from fedpact.audit.verifier import verify_inclusion_bundle

ACCESS = {"node": "bank-a", "dataset": "customers", "rows": 10, "columns": ["age"],
          "purpose": "churn model"}


def _fill(ledger: Ledger, start: int, n: int) -> None:
    ledger.append_many(
        (EventType.DATA_ACCESSED, {**ACCESS, "rows": i}, "node:bank-a", "job") for i in range(start, start + n)
    )


def test_bulk_frontier_matches_one_by_one() -> None:
    import os

    for sizes in ([1], [3, 5], [7, 1, 8, 16], [1000, 24, 1]):
        collected: list[tuple[int, int, bytes]] = []
        one = MerkleFrontier(on_node=lambda level, index, digest, out=collected: out.append(
            (level, index, digest)))
        bulk, nodes = MerkleFrontier(), []
        leaves_all: list[bytes] = []
        for size in sizes:
            leaves = [os.urandom(32) for _ in range(size)]
            leaves_all += leaves
            one.extend(leaves)
            nodes += bulk.extend_level_by_level(leaves, collect=True)
            assert bulk.stack == one.stack and bulk.root() == root_hash(leaves_all)
        assert sorted(nodes) == sorted(collected)


def test_writer_cache_follows_other_writers(tmp_path: Path) -> None:
    """Two ledgers on one file (as two processes would be) interleave into one chain."""
    path = tmp_path / "l.db"
    with Ledger.open(path, checkpoint_every=7) as first, Ledger.open(path, checkpoint_every=5) as second:
        for round_ in range(6):
            _fill(first, round_ * 10, 4)
            second.append(EventType.JOB_FAILED, {"reason": "test", "round": round_}, actor="other")
            _fill(second, 100 + round_ * 10, 3)
            first.append(EventType.JOB_FAILED, {"reason": "test", "round": round_}, actor="first")
        first.checkpoint()
        result = first.verify()
        assert result.ok and result.events_checked == 6 * 9 == result.signed_tree_size
        sizes = [c.tree_size for c in first.checkpoints()]
        assert sizes == sorted(set(sizes)) and len(sizes) > 4
        bundle = second.prove(23)
        assert verify_inclusion_bundle(bundle, first.verifier_key).seq == 23


def test_cached_unsigned_hashes_are_not_trusted_after_a_tamper(tmp_path: Path) -> None:
    path = tmp_path / "l.db"
    with Ledger.open(path, checkpoint_every=1000) as ledger:
        _fill(ledger, 0, 5)
        ledger.checkpoint()
        _fill(ledger, 5, 5)  # hashes of 6..10 cached for the next checkpoint
        tamper(path, "UPDATE ledger_events SET actor = 'x' WHERE seq = 8")
        with pytest.raises(ledger_module.LedgerError, match="refusing to sign.*event 8"):
            ledger.checkpoint()
        ledger.close()


@pytest.fixture
def big(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """12,345 events in checkpoints of 1,000, verified in parallel (threshold lowered)."""
    monkeypatch.setattr(ledger_module, "PARALLEL_VERIFY_MIN_EVENTS", 1000)
    path = tmp_path / "big.db"
    with Ledger.open(path, checkpoint_every=1000) as ledger:
        for start in range(0, 12_000, 2000):
            _fill(ledger, start, 2000)
        _fill(ledger, 12_000, 345)
    return path


def _verify(path: Path, used: list[Any]) -> Any:
    real = ledger_module._start_parallel_check

    def spy(*args: Any) -> Any:
        check = real(*args)
        used.append(check)
        return check

    ledger_module._start_parallel_check = spy
    try:
        with Ledger.open(path) as ledger:
            return ledger.verify()
    finally:
        ledger_module._start_parallel_check = real


_FRESH = """
import json, sys
import fedpact.audit.ledger as m
from fedpact.audit import Ledger
m.PARALLEL_VERIFY_MIN_EVENTS = 1000
used = []
real = m._start_parallel_check
def spy(*args):
    check = real(*args)
    used.append(check)
    return check
m._start_parallel_check = spy
with Ledger.open(sys.argv[1]) as ledger:
    r = ledger.verify()
print(json.dumps({"parallel": bool(used) and used[0] is not None, "ok": r.ok,
                  "first_bad_seq": r.first_bad_seq, "reason": r.reason}))
"""


def _verify_in_fresh_process(path: Path) -> dict:
    """Parallel verification forks workers only from a single-threaded process; the test process
    may hold threads from earlier tests (API runner, gRPC), so check it from a fresh one."""
    import json
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", _FRESH, str(path)], capture_output=True,
                         text=True, timeout=300, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def test_parallel_verification_of_an_intact_log(big: Path) -> None:
    fresh = _verify_in_fresh_process(big)
    assert fresh["parallel"] and fresh["ok"]  # the worker processes ran, and agree
    used: list[Any] = []
    result = _verify(big, used)
    assert result.ok and result.events_checked == 12_345 and result.signed_tree_size == 12_345
    assert result.checkpoints_checked == 7  # one per batch of 2,000, and one on close
    with Ledger.open(big) as ledger:
        assert result.head_hash == ledger.head().hash
    sequential = _verify_sequential(big)
    assert sequential == result


def _verify_sequential(path: Path) -> Any:
    import os

    os.environ["FEDPACT_AUDIT_VERIFY_PROCESSES"] = "1"
    try:
        with Ledger.open(path) as ledger:
            return ledger.verify()
    finally:
        del os.environ["FEDPACT_AUDIT_VERIFY_PROCESSES"]


def test_parallel_verification_falls_back_to_name_the_bad_event(big: Path) -> None:
    tamper(big, "UPDATE ledger_events SET actor = 'node:mallory' WHERE seq = 9000")
    fresh = _verify_in_fresh_process(big)
    assert fresh["parallel"] and not fresh["ok"] and fresh["first_bad_seq"] == 9000
    result = _verify(big, [])
    assert not result.ok and result.first_bad_seq == 9000 and result.reason.startswith("event 9000:")


def test_parallel_verification_catches_a_rehashed_history(big: Path) -> None:
    with Ledger.open(big) as ledger:
        events = ledger.events(since_seq=7998)
    prev = events[0].hash
    for original in events[1:]:
        payload = {**original.payload, "purpose": "rewritten"} if original.seq == 8000 else original.payload
        digest = event_hash(prev, original.seq, original.timestamp, original.event_type,
                            original.actor, original.job_id, payload)
        tamper(big, "UPDATE ledger_events SET payload = ?, prev_hash = ?, hash = ? WHERE seq = ?",
                (canonical_json(payload).decode(), prev, digest, original.seq))
        prev = digest
    result = _verify(big, [])
    assert not result.ok and result.first_bad_seq == 8000
    assert "checkpoint at tree size 8000" in result.reason


def test_parallel_verification_catches_truncation(big: Path) -> None:
    tamper(big, "DELETE FROM ledger_events WHERE seq > 12000")
    result = _verify(big, [])
    assert not result.ok and result.first_bad_seq == 12_001 and "truncated" in result.reason


def test_an_interrupted_waiter_passes_on_the_lead(tmp_path: Path) -> None:
    """A queued appender interrupted while waiting withdraws its event and hands on the lead."""
    import threading
    import time

    with Ledger.open(tmp_path / "l.db") as ledger:
        first = ledger._prepare(EventType.JOB_FAILED, {"reason": "test", "i": 1}, "a", None)
        ledger._leader = True  # someone else is writing
        interrupted = ledger._prepare(EventType.JOB_FAILED, {"reason": "test", "i": 2}, "a", None)
        follower = ledger._prepare(EventType.JOB_FAILED, {"reason": "test", "i": 3}, "a", None)

        class Interrupt(BaseException):
            pass

        real_lock = ledger_module._allocate_lock

        class Gate:
            def __init__(self) -> None:
                self.lock, self.calls = real_lock(), 0

            def acquire(self) -> bool:
                self.calls += 1
                if self.calls == 2:
                    raise Interrupt
                return self.lock.acquire()

            def release(self) -> None:
                self.lock.release()

        ledger_module._allocate_lock = Gate
        try:
            with pytest.raises(Interrupt):
                ledger._group_commit(interrupted)
        finally:
            ledger_module._allocate_lock = real_lock
        assert ledger._queue == []
        # the leader finishes; a queued appender is then promoted and commits its own event
        thread = threading.Thread(target=ledger._group_commit, args=(follower,))
        thread.start()
        while follower not in ledger._queue:
            time.sleep(0.001)
        ledger._leader = False
        ledger._group_commit(first)
        thread.join(timeout=10)
        assert first.done and follower.done and not thread.is_alive()
        assert sorted(e.payload["i"] for e in ledger.events()) == [1, 3]


@pytest.mark.parametrize(("sql", "seq"), [
    ("UPDATE ledger_events SET actor = 'node:\"bank-a' WHERE seq = 4321", 4321),  # a quote
    ("UPDATE ledger_events SET actor = 'node:bank\\a' WHERE seq = 4321", 4321),  # a backslash
    ("UPDATE ledger_events SET job_id = NULL WHERE seq = 4321", 4321),
    ("UPDATE ledger_events SET payload = X'7b7d' WHERE seq = 4321", 4321),  # a BLOB
    ("UPDATE ledger_events SET timestamp = 7 WHERE seq = 4321", 4321),
    ("UPDATE ledger_events SET prev_hash = '\"' || substr(prev_hash, 2) WHERE seq = 4321", 4321),
    ("UPDATE ledger_events SET prev_hash = '\"' || substr(prev_hash, 2) WHERE seq = 4097", 4097),
])
def test_records_rendered_for_verification_catch_odd_columns(big: Path, sql: str, seq: int) -> None:
    """The fast path hashes each record as SQL renders it from its columns (4097 starts a
    parallel range); quotes, backslashes, NULLs and non-text values must be caught at their
    event, in parallel and sequentially."""
    tamper(big, sql)
    fresh = _verify_in_fresh_process(big)
    assert fresh["parallel"] and not fresh["ok"] and fresh["first_bad_seq"] == seq
    result = _verify_sequential(big)
    assert not result.ok and result.first_bad_seq == seq

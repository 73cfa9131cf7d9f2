"""What bounds a durable append on this machine (`make bench`): the measurements behind the
missed single-writer target in docs/audit.md § Benchmarks.

- the disk's `pwrite` + `fdatasync` latency, over existing file space and on a growing file
  (SQLite's WAL is reused after each checkpoint, so steady-state commits overwrite);
- fedpact's append with `synchronous=OFF` (everything but the fsync) and with FULL;
- the same appends without any secondary indexing (the three secondary indexes of
  `ledger_events` dropped, no `event_index` rows): how much the indexes cost a single writer;
- the naive one-table append of bench/test_bench_audit.py, in the same run.

Every figure printed is measured here; the experiment variants patch a scratch ledger only.
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest
from test_bench_audit import ACCESS, _naive_append, _naive_sqlite

import fedpact.audit.ledger as ledger_module
from fedpact.audit import EventType, Ledger

pytestmark = pytest.mark.bench

N = 3000
SECONDARY = ("ix_ledger_events_type_seq", "ix_ledger_events_timestamp", "ix_ledger_events_job_id")


def _fsync_us(path: Path, pages: int, grow: bool, reps: int = 400) -> float:
    fd = os.open(path, os.O_RDWR | os.O_CREAT)
    try:
        span = 4096 * 2000
        if not grow:
            os.pwrite(fd, bytes(span), 0)
            os.fsync(fd)
        block = b"x" * (4096 * pages)
        start = time.perf_counter()
        for i in range(reps):
            offset = span + i * len(block) if grow else (i * len(block)) % (span - len(block))
            os.pwrite(fd, block, offset)
            os.fdatasync(fd)
        return (time.perf_counter() - start) / reps * 1e6
    finally:
        os.close(fd)


def _append_us(folder: Path, *, sync: str = "FULL", indexed: bool = True) -> float:
    ledger = Ledger.open(folder / f"l-{sync}-{indexed}-{time.monotonic_ns()}.db")
    saved = ledger_module.index_keys
    try:
        writer = ledger._writer()
        writer.execute(f"PRAGMA synchronous={sync}")
        if not indexed:
            for name in SECONDARY:
                writer.execute(f"DROP INDEX IF EXISTS {name}")
            ledger._invalidate_state()
            ledger_module.index_keys = lambda *args: []
        for i in range(300):  # warm: past the first WAL growth
            ledger.append(EventType.DATA_ACCESSED, {**ACCESS, "rows": i}, actor="node:a", job_id="j")
        start = time.perf_counter()
        for i in range(N):
            ledger.append(EventType.DATA_ACCESSED, {**ACCESS, "rows": i}, actor="node:a", job_id="j")
        return (time.perf_counter() - start) / N * 1e6
    finally:
        ledger_module.index_keys = saved
        ledger.close()


def _batch_rate(folder: Path, *, indexed: bool = True, batches: int = 30) -> float:
    ledger = Ledger.open(folder / f"b-{indexed}-{time.monotonic_ns()}.db")
    saved = ledger_module.index_keys
    try:
        if not indexed:
            writer = ledger._writer()
            for name in SECONDARY:
                writer.execute(f"DROP INDEX IF EXISTS {name}")
            ledger._invalidate_state()
            ledger_module.index_keys = lambda *args: []
        start = time.perf_counter()
        for b in range(batches):
            ledger.append_many(
                (EventType.DATA_ACCESSED, {**ACCESS, "rows": b * 1000 + i}, "node:a", "j")
                for i in range(1000)
            )
        return batches * 1000 / (time.perf_counter() - start)
    finally:
        ledger_module.index_keys = saved
        ledger.close()


def test_batch_floor_without_indexing(tmp_path: Path) -> None:
    indexed = _batch_rate(tmp_path)
    bare = _batch_rate(tmp_path, indexed=False)
    print(f"\nbatches of 1,000 (30 batches): {indexed:,.0f} events/s; without secondary indexing "
          f"{bare:,.0f} events/s ({bare / indexed:.2f}x)")
    assert bare > 0 and indexed > 0


def test_durable_append_floors(tmp_path: Path) -> None:
    for pages in (1, 9):
        print(f"\npwrite {pages} page(s) + fdatasync: over existing space "
              f"{_fsync_us(tmp_path / f'o{pages}', pages, grow=False):.0f} us, growing file "
              f"{_fsync_us(tmp_path / f'g{pages}', pages, grow=True, reps=200):.0f} us")
    connection, lock = _naive_sqlite(tmp_path / "naive.db"), threading.Lock()
    for i in range(300):
        _naive_append(connection, lock, {**ACCESS, "rows": i})
    start = time.perf_counter()
    for i in range(N):
        _naive_append(connection, lock, {**ACCESS, "rows": i})
    naive = (time.perf_counter() - start) / N * 1e6
    off = _append_us(tmp_path, sync="OFF")
    full = _append_us(tmp_path)
    bare = _append_us(tmp_path, indexed=False)
    print(f"naive one-table append (FULL): {naive:.0f} us = {1e6 / naive:,.0f}/s")
    print(f"fedpact append, synchronous=OFF: {off:.0f} us = {1e6 / off:,.0f}/s (all but the fsync)")
    print(f"fedpact append, FULL: {full:.0f} us = {1e6 / full:,.0f}/s")
    print(f"fedpact append, FULL, no secondary indexing: {bare:.0f} us = {1e6 / bare:,.0f}/s "
          f"({full / bare:.2f}x the indexed append)")
    assert off < full


def test_batch_append_python_floor() -> None:
    """Per-event Python work of `append_many` before SQLite sees a row, stage by stage (best of 5
    over 20,000 events): what a batch of 1,000 costs even with free storage."""
    import hashlib

    from fedpact.audit.chain import _ENCODER, _plain_copy, canonical_text_and_value
    from fedpact.audit.events import validate_payload

    n = 20_000
    payloads = [{**ACCESS, "rows": i} for i in range(n)]
    kind = EventType.DATA_ACCESSED

    def best(fn) -> float:
        times = []
        for _ in range(5):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        return min(times) / n * 1e6

    pending = [Ledger._prepare(kind, p, "node:bank-a", "j") for p in payloads]
    stages = {
        "validate_payload": best(lambda: [validate_payload(kind, p) for p in payloads]),
        "canonical JSON (C encoder)": best(lambda: [_ENCODER.encode(p) for p in payloads]),
        "plain copy of the payload": best(lambda: [_plain_copy(p) for p in payloads]),
        "canonical_text_and_value": best(lambda: [canonical_text_and_value(p) for p in payloads]),
        "index keys": best(lambda: [ledger_module.index_keys(kind.value, p, "node:a") for p in payloads]),
        "SHA-256 of a 330-byte record": best(lambda: [hashlib.sha256(b"x" * 330).hexdigest() for _ in payloads]),
        "_prepare (validate + canonicalise)": best(
            lambda: [Ledger._prepare(kind, p, "node:bank-a", "j") for p in payloads]),
        "_build_rows (chain, hash, rows, index keys, events)": best(
            lambda: ledger_module._build_rows(pending, 0, "0" * 64)),
    }
    for name, us in stages.items():
        print(f"\n{name}: {us:.2f} us/event", end="")
    total = stages["_prepare (validate + canonicalise)"] + stages[
        "_build_rows (chain, hash, rows, index keys, events)"]
    print(f"\nPython before any insert: {total:.1f} us/event -> at most {1e6 / total:,.0f} events/s "
          "with free storage")
    assert total > 0

"""Audit-ledger benchmarks (`make bench`): each figure printed beside a naive one from the same run.

Targets (SQLite on 2 cores): single durable appends ≥ 5,000/s (one writer) and ≥ 10,000/s
(8 writers, group commit); batches of 1,000 ≥ 100,000 events/s; full verification (chain +
Merkle root + signatures) ≥ 500,000 events/s; inclusion proof generation + check ≤ 5 ms and
subject query p50 ≤ 0.5 ms / p99 ≤ 5 ms at 1M events. PostgreSQL is measured too when
scripts/pg-test-server.sh can start a server. FEDPACT_BENCH_EVENTS changes the 1M.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import sqlite3
import statistics
import subprocess
import tempfile
import threading
import time
import uuid
from pathlib import Path

import pytest

from fedpact.audit import EventType, Ledger
from fedpact.audit.chain import canonical_json, event_hash, verify_chain
from fedpact.audit.merkle import leaf_hash, root_hash
from fedpact.audit.query import EventFilter, query_events
from fedpact.audit.subjects import SubjectKeys
from fedpact.audit.verifier import verify_inclusion_bundle

pytestmark = pytest.mark.bench

N_EVENTS = int(os.environ.get("FEDPACT_BENCH_EVENTS", "1000000"))
SUBJECTS = 50_000
ACCESS = {"node": "bank-a", "dataset": "customers_2024", "rows": 41188,
          "columns": ["age", "balance", "tenure"], "purpose": "churn propensity model"}
RESULTS: list[str] = []


def _report(name: str, value: str, naive: str, target: str) -> None:
    line = f"| {name} | {value} | {naive} | {target} |"
    RESULTS.append(line)
    print("\n" + line, flush=True)


@pytest.fixture(scope="module", autouse=True)
def table():
    yield
    print("\n\n| measure | fedpact | naive, same run | target |\n|---|---|---|---|")
    print("\n".join(RESULTS))


def _naive_sqlite(path: Path) -> sqlite3.Connection:
    connection = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    connection.execute("PRAGMA journal_mode=WAL")
    connection.execute("PRAGMA synchronous=FULL")
    connection.execute("CREATE TABLE IF NOT EXISTS e (seq INTEGER PRIMARY KEY, payload TEXT, "
                       "prev_hash TEXT, hash TEXT)")
    return connection


def _naive_append(connection: sqlite3.Connection, lock: threading.Lock, payload: dict) -> None:
    """The straightforward way: one transaction (one fsync) per event, tip read inside it."""
    with lock:
        connection.execute("BEGIN IMMEDIATE")
        row = connection.execute("SELECT seq, hash FROM e ORDER BY seq DESC LIMIT 1").fetchone()
        seq, prev = (row[0] + 1, row[1]) if row else (1, "0" * 64)
        text = json.dumps(payload, sort_keys=True)
        digest = hashlib.sha256((prev + text).encode()).hexdigest()
        connection.execute("INSERT INTO e VALUES (?, ?, ?, ?)", (seq, text, prev, digest))
        connection.execute("COMMIT")


def _targets(kind: str) -> str:
    return "(reported)" if kind == "postgresql" else ""


def _open(kind: str, folder: Path, pg_url: str | None, **kw) -> Ledger:
    if kind == "sqlite":
        return Ledger.open(folder / f"{uuid.uuid4().hex[:6]}.db", **kw)
    assert pg_url is not None
    import psycopg

    name = f"b_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(pg_url, autocommit=True) as connection:
        connection.execute(f"CREATE DATABASE {name}")
    return Ledger(pg_url.rsplit("/", 1)[0] + f"/{name}", key_dir=folder, **kw)


@pytest.fixture(scope="module")
def pg_url():
    script = Path(__file__).resolve().parents[1] / "scripts" / "pg-test-server.sh"
    folder = tempfile.mkdtemp(prefix="fedpact-pg-bench-")
    started = subprocess.run([str(script), "start", folder], capture_output=True, text=True)
    if started.returncode != 0:
        print(f"\nPostgreSQL not measured: {started.stderr.strip()[-300:]}")
        yield None
    else:
        yield started.stdout.strip()
        subprocess.run([str(script), "stop", folder], capture_output=True)
    shutil.rmtree(folder, ignore_errors=True)


@pytest.mark.parametrize("kind", ["sqlite", "postgresql"])
def test_durable_appends(kind: str, tmp_path: Path, pg_url) -> None:
    if kind == "postgresql" and pg_url is None:
        pytest.skip("no PostgreSQL server")
    n = 3000
    with _open(kind, tmp_path, pg_url) as ledger:
        start = time.perf_counter()
        for i in range(n):
            ledger.append(EventType.DATA_ACCESSED, {**ACCESS, "rows": i}, actor="node:bank-a", job_id="j")
        single = n / (time.perf_counter() - start)

        per_thread = 1500
        barrier = threading.Barrier(8)

        def writer(w: int) -> None:
            barrier.wait()
            for i in range(per_thread):
                ledger.append(EventType.DATA_ACCESSED, {**ACCESS, "rows": i}, actor=f"node:{w}", job_id="j")

        threads = [threading.Thread(target=writer, args=(w,)) for w in range(8)]
        start = time.perf_counter()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        concurrent = 8 * per_thread / (time.perf_counter() - start)
        assert ledger.verify().ok

    naive_single = naive_concurrent = "n/a"
    if kind == "sqlite":
        connection, lock = _naive_sqlite(tmp_path / "naive.db"), threading.Lock()
        start = time.perf_counter()
        for i in range(n):
            _naive_append(connection, lock, {**ACCESS, "rows": i})
        naive_single = f"{n / (time.perf_counter() - start):,.0f}/s"
        barrier = threading.Barrier(8)

        def naive_writer(w: int) -> None:
            barrier.wait()
            for i in range(per_thread // 3):
                _naive_append(connection, lock, {**ACCESS, "rows": i})

        threads = [threading.Thread(target=naive_writer, args=(w,)) for w in range(8)]
        start = time.perf_counter()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        naive_concurrent = f"{8 * (per_thread // 3) / (time.perf_counter() - start):,.0f}/s"
    _report(f"{kind}: durable appends, 1 writer", f"{single:,.0f}/s",
            f"{naive_single} (1 txn/event)", _targets(kind) or "≥ 5,000/s")
    _report(f"{kind}: durable appends, 8 writers", f"{concurrent:,.0f}/s",
            f"{naive_concurrent} (1 txn/event)", _targets(kind) or "≥ 10,000/s")


@pytest.mark.parametrize("kind", ["sqlite", "postgresql"])
def test_batches_of_1000(kind: str, tmp_path: Path, pg_url) -> None:
    if kind == "postgresql" and pg_url is None:
        pytest.skip("no PostgreSQL server")
    batches = 50
    with _open(kind, tmp_path, pg_url) as ledger:
        start = time.perf_counter()
        for b in range(batches):
            ledger.append_many(
                (EventType.DATA_ACCESSED, {**ACCESS, "rows": b * 1000 + i}, "node:bank-a", "j")
                for i in range(1000)
            )
        rate = batches * 1000 / (time.perf_counter() - start)
        start = time.perf_counter()
        for i in range(2000):
            ledger.append(EventType.DATA_ACCESSED, {**ACCESS, "rows": i}, actor="node:bank-a", job_id="j")
        naive = 2000 / (time.perf_counter() - start)
        assert ledger.verify().ok
    _report(f"{kind}: batches of 1,000", f"{rate:,.0f} events/s",
            f"{naive:,.0f} events/s (one append() each)", _targets(kind) or "≥ 100,000 events/s")


def _build_large(ledger: Ledger, n: int) -> list[str]:
    """n events: 1 in 20 a consent grant of one of SUBJECTS subjects (sealed), the rest data access."""
    keys = SubjectKeys(ledger)
    subjects = keys.pseudonyms(f"S-{i}" for i in range(SUBJECTS))
    batch: list = []
    at = "2025-06-01T00:00:00+00:00"
    envelope = {"v": 1, "key": "consent:2025-06", "nonce": "AAAAAAAAAAAAAAAA", "ct": "AAAA"}
    for i in range(n):
        if i % 20 == 0:
            subject = subjects[(i // 20) % SUBJECTS]
            batch.append((EventType.CONSENT_GRANTED,
                          {"subject": subject, "purpose": "churn", "channel": "web",
                           "legal_basis": "consent", "notice_version": "v1", "source": "bench",
                           "timestamp": at, "expires_at": None, "personal": envelope},
                          "consent-registry", None))
        else:
            batch.append((EventType.DATA_ACCESSED, {**ACCESS, "rows": i}, "node:bank-a", f"job-{i // 50000}"))
        if len(batch) == 10_000:
            ledger.append_many(batch)
            batch = []
    if batch:
        ledger.append_many(batch)
    return subjects


@pytest.mark.parametrize("kind", ["sqlite", "postgresql"])
def test_at_one_million_events(kind: str, tmp_path: Path, pg_url) -> None:
    if kind == "postgresql" and pg_url is None:
        pytest.skip("no PostgreSQL server")
    n = N_EVENTS
    with _open(kind, tmp_path, pg_url, checkpoint_every=1000) as ledger:
        start = time.perf_counter()
        subjects = _build_large(ledger, n)
        ledger.checkpoint()
        build = n / (time.perf_counter() - start)

        start = time.perf_counter()
        result = ledger.verify()
        verify_rate = n / (time.perf_counter() - start)
        assert result.ok and result.events_checked == n and result.signed_tree_size == n

        # naive verification: the per-event re-canonicalising check, and a from-scratch root
        sample = min(n, 100_000)
        rows = ledger.events(limit=sample)
        start = time.perf_counter()
        assert verify_chain(rows).ok
        root_hash([leaf_hash(bytes.fromhex(e.hash)) for e in rows])
        naive_verify = sample / (time.perf_counter() - start)

        key = ledger.verifier_key
        times = []
        rng = random.Random(0)
        for _ in range(300):
            seq = rng.randint(1, n)
            start = time.perf_counter()
            bundle = ledger.prove(seq)
            verify_inclusion_bundle(bundle, key)
            times.append((time.perf_counter() - start) * 1000)
        # naive proof: recompute every leaf of the tree to find the audit path's root
        start = time.perf_counter()
        with ledger.store.read() as connection:
            hashes = connection.exec_driver_sql("SELECT hash FROM ledger_events ORDER BY seq").scalars().all()
        naive_root = root_hash([leaf_hash(bytes.fromhex(h)) for h in hashes])
        naive_proof_ms = (time.perf_counter() - start) * 1000
        latest = ledger.latest_checkpoint()
        assert latest.tree_size == n and naive_root.hex() == latest.root_hash

        used = subjects[: max(1, min(SUBJECTS, n // 20))]
        query_ms = []
        for _ in range(1000):
            subject = used[rng.randrange(len(used))]
            start = time.perf_counter()
            page = query_events(ledger, EventFilter(subject=subject))
            query_ms.append((time.perf_counter() - start) * 1000)
            assert page.events
        naive_query = []
        for _ in range(3):
            subject = used[rng.randrange(len(used))]
            start = time.perf_counter()
            found = [e for e in ledger.events(event_type=EventType.CONSENT_GRANTED)
                     if e.payload["subject"] == subject]
            naive_query.append((time.perf_counter() - start) * 1000)
            assert found
    q = statistics.quantiles(query_ms, n=100)
    p = statistics.quantiles(times, n=100)
    _report(f"{kind}: build {n:,} events (batches of 10,000)", f"{build:,.0f} events/s", "", "")
    _report(f"{kind}: full verification at {n:,} (chain + Merkle + {n // 1000:,} signatures)",
            f"{verify_rate:,.0f} events/s", f"{naive_verify:,.0f} events/s (re-canonicalise)",
            _targets(kind) or "≥ 500,000 events/s")
    _report(f"{kind}: inclusion proof + check at {n:,}", f"p50 {p[49]:.2f} ms, p99 {p[98]:.2f} ms",
            f"{naive_proof_ms:,.0f} ms (rehash all leaves)", _targets(kind) or "≤ 5 ms")
    _report(f"{kind}: subject query at {n:,}", f"p50 {q[49]:.3f} ms, p99 {q[98]:.3f} ms",
            f"{statistics.median(naive_query):,.0f} ms (scan consent events)",
            _targets(kind) or "p50 ≤ 0.5 ms, p99 ≤ 5 ms")


def test_event_hash_fast_path_matches_reference() -> None:
    """Not a timing: the bench's fast paths must agree with the reference hash."""
    payload = {**ACCESS, "note": "ü"}
    text = canonical_json(payload).decode()
    from fedpact.audit.chain import event_hash_from_text

    assert event_hash_from_text("0" * 64, 1, "t", "data.accessed", "a", None, text) == event_hash(
        "0" * 64, 1, "t", "data.accessed", "a", None, payload)

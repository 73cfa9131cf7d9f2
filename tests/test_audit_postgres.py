"""The PostgreSQL driver against a real server started for these tests (scripts/pg-test-server.sh).

Skips with the reason when no server can be installed or started, unless FEDPACT_REQUIRE_POSTGRES=1.
"""

from __future__ import annotations

import multiprocessing
import os
from pathlib import Path

import pytest
from ledger_tamper import pg_tamper

from fedpact.audit import EventType, Ledger
from fedpact.audit.consent import ConsentRegistry
from fedpact.audit.dsar import SubjectRequests
from fedpact.audit.query import EventFilter, query_events
from fedpact.audit.verifier import verify_database, verify_inclusion_bundle

if os.environ.get("FEDPACT_REQUIRE_POSTGRES") == "1":
    import psycopg
else:
    psycopg = pytest.importorskip("psycopg", reason="the PostgreSQL driver needs psycopg")
ACCESS = {"node": "bank-a", "dataset": "customers", "rows": 1, "columns": ["age"], "purpose": "churn"}


@pytest.fixture
def url(pg_url: str) -> str:
    """A fresh database on the session's test server (conftest.py) for each test."""
    return pg_url


_tamper = pg_tamper


def _fill(ledger: Ledger, n: int) -> None:
    ledger.append_many((EventType.DATA_ACCESSED, {**ACCESS, "rows": i}, "node:bank-a", "job")
                       for i in range(1, n + 1))


def test_chain_checkpoints_and_proofs(url: str, tmp_path: Path, monkeypatch) -> None:
    import fedpact.audit.ledger as ledger_module

    with Ledger(url, key_dir=tmp_path, checkpoint_every=10) as ledger:
        for _ in range(3):
            _fill(ledger, 10)
        ledger.append(EventType.JOB_FAILED, {"reason": "x"}, actor="server")
        slow = []
        real = ledger_module.check_row
        monkeypatch.setattr(ledger_module, "check_row", lambda *a: slow.append(a) or real(*a))
        result = ledger.verify()
        assert slow == []  # the fast SQL path rebuilt every record exactly
        bundle = ledger.prove(17)
        key = ledger.verifier_key
        assert ledger.prove_consistency(10)["new_checkpoint"]
    assert result.ok and result.events_checked == 31 and result.signed_tree_size == 30
    assert verify_inclusion_bundle(bundle, key).seq == 17
    keys = [key]
    assert verify_database(url, keys).ok


def test_append_only_is_enforced_by_the_server(url: str, tmp_path: Path) -> None:
    with Ledger(url, key_dir=tmp_path) as ledger:
        _fill(ledger, 2)
    with psycopg.connect(url, autocommit=True) as connection:
        for sql in ("UPDATE ledger_events SET actor = 'x'", "DELETE FROM ledger_events",
                    "TRUNCATE ledger_events", "DELETE FROM ledger_checkpoints"):
            with pytest.raises(psycopg.errors.RaiseException, match="append-only"):
                connection.execute(sql)


@pytest.mark.parametrize(
    ("sql", "first_bad", "reason"),
    [
        ("UPDATE ledger_events SET actor = 'node:mallory' WHERE seq = 12", 12, "event 12:"),
        ("DELETE FROM ledger_events WHERE seq = 17", 17, "gap: event 18 follows event 16"),
        ("DELETE FROM ledger_events WHERE seq > 26", 27, "truncated: the signed checkpoint at tree size 30"),
        ("UPDATE ledger_checkpoints SET note = replace(note, substr(note, length(note) - 20, 8), 'AAAAAAAA') "
         "WHERE tree_size = 30", 21, "checkpoint for tree size 30"),
    ],
    ids=["modify", "delete", "truncate", "signature"],
)
def test_tampering_is_named(url: str, tmp_path: Path, sql: str, first_bad: int, reason: str) -> None:
    with Ledger(url, key_dir=tmp_path, checkpoint_every=10) as ledger:
        for _ in range(3):
            _fill(ledger, 10)
    _tamper(url, sql)
    with Ledger(url, key_dir=tmp_path) as ledger:
        result = ledger.verify()
    assert not result.ok and result.first_bad_seq == first_bad
    assert result.reason.startswith(reason) or reason in result.reason


def _pg_writer(url: str, key_dir: str, worker: int, count: int, start) -> None:
    with Ledger(url, key_dir=key_dir, checkpoint_every=20) as ledger:
        start.wait(timeout=60)
        for i in range(count):
            ledger.append(EventType.JOB_FAILED, {"reason": "test", "w": worker, "i": i}, actor=f"p{worker}")


def test_four_processes_one_chain(url: str, tmp_path: Path) -> None:
    Ledger(url, key_dir=tmp_path).close()
    context = multiprocessing.get_context("spawn")
    start = context.Barrier(4)
    workers = [context.Process(target=_pg_writer, args=(url, str(tmp_path), w, 40, start))
               for w in range(4)]
    for process in workers:
        process.start()
    for process in workers:
        process.join(timeout=120)
    assert [p.exitcode for p in workers] == [0, 0, 0, 0]
    with Ledger(url, key_dir=tmp_path) as ledger:
        events = ledger.events()
        result = ledger.verify()
    assert sorted((e.payload["w"], e.payload["i"]) for e in events) == [
        (w, i) for w in range(4) for i in range(40)]
    assert result.ok and result.events_checked == 160 and result.signed_tree_size == 160


def test_consent_erasure_and_queries(url: str, tmp_path: Path) -> None:
    with Ledger(url, key_dir=tmp_path) as ledger:
        registry = ConsentRegistry(ledger)
        for subject in ("A", "B", "C"):
            registry.grant(subject, "churn", channel="web", legal_basis="consent",
                           notice_version="v1", source="s", personal={"email": f"{subject}@x.org"})
        registry.withdraw("B", "churn", channel="app", source="s")
        assert registry.allowed(["A", "B", "C", "D"], "churn").tolist() == [True, False, True, False]
        registry.enforce("job-1", "customers", "churn", ["A", "B", "C"])
        SubjectRequests(ledger).erase("A")
        assert registry.allowed(["A", "C"], "churn").tolist() == [False, True]
        report = SubjectRequests(ledger).report("A")
        assert report.personal_data == {} and report.erased
        page = query_events(ledger, EventFilter(subject="C"))
        assert [e.event_type for e in page.events] == ["consent.granted"]
        assert ledger.verify().ok

"""Ledger hardening: read-only opening, kept checkpoints, closing and timed signing, derived tables,
audit roles with authority, retention planning."""

from __future__ import annotations

import sqlite3
import time
from datetime import UTC, datetime
from pathlib import Path

import pytest
from ledger_tamper import pg_tamper, tamper, write_legacy_ledger

from fedpact.audit import EventType, Ledger, LedgerError
from fedpact.audit.consent import ConsentRegistry
from fedpact.audit.exports import ExportApprovals
from fedpact.audit.query import EventFilter, query_events
from fedpact.audit.retention import enforce_retention, plan_retention
from fedpact.audit.verifier import load_keys

ACCESS = {"node": "bank-a", "dataset": "customers", "rows": 10, "columns": ["age"],
          "purpose": "churn model"}


def _fill(ledger: Ledger, n: int, start: int = 1) -> None:
    ledger.append_many(
        (EventType.DATA_ACCESSED, {**ACCESS, "rows": i}, "node:bank-a", "job-1")
        for i in range(start, start + n)
    )


def _checkpoint_sizes(db: Path) -> list[int]:
    connection = sqlite3.connect(db)
    try:
        return [r[0] for r in connection.execute(
            "SELECT tree_size FROM ledger_checkpoints ORDER BY tree_size")]
    finally:
        connection.close()


@pytest.fixture
def db(tmp_path: Path) -> Path:
    path = tmp_path / "ledger.db"
    with Ledger.open(path, checkpoint_every=10) as ledger:
        for _ in range(3):
            _fill(ledger, 10)  # checkpoints at 10, 20, 30
    return path


def _truncate(db: Path, keep: int) -> None:
    """What an attacker does: drop the tail events, their checkpoints and their Merkle nodes."""
    tamper(db, "DELETE FROM ledger_events WHERE seq > ?", (keep,))
    tamper(db, "DELETE FROM ledger_checkpoints WHERE tree_size > ?", (keep,))
    tamper(db, "DELETE FROM merkle_nodes WHERE ((idx + 1) << level) > ?", (keep,))
    tamper(db, "DELETE FROM event_index WHERE seq > ?", (keep,))


# --- read-only ---------------------------------------------------------------------------------


def test_read_only_open_of_a_missing_database_creates_nothing(tmp_path: Path) -> None:
    missing = tmp_path / "sub" / "missing.db"
    with pytest.raises(LedgerError, match="no ledger database at"):
        Ledger.open(missing, read_only=True)
    with pytest.raises(LedgerError, match="no ledger database at"):
        Ledger(f"sqlite:///{missing}", key_dir=tmp_path / "keys", read_only=True)
    assert not missing.parent.exists() and not (tmp_path / "keys").exists()
    with pytest.raises(LedgerError, match="in-memory"):
        Ledger("sqlite://", read_only=True)


def test_read_only_ledger_never_writes_or_signs(db: Path) -> None:
    _truncate(db, 25)  # events 21..25 now unsigned
    with Ledger.open(db, read_only=True) as ledger:
        assert ledger.read_only and ledger.verifier_key is None
        result = ledger.verify()
        assert result.ok and result.signed_tree_size == 20
        with pytest.raises(LedgerError, match="read-only"):
            ledger.append(EventType.JOB_FAILED, {"reason": "x"}, actor="server")
        with pytest.raises(LedgerError, match="read-only"):
            ledger.checkpoint()
        with pytest.raises(LedgerError, match="not yet covered by a signed checkpoint"):
            ledger.prove(23)  # a read-only prove does not sign one
    assert _checkpoint_sizes(db) == [10, 20]  # close() signed nothing over the truncated log


def test_only_a_ledger_that_wrote_signs_on_close(tmp_path: Path) -> None:
    path = tmp_path / "ledger.db"
    writer = Ledger.open(path, checkpoint_every=1000)
    writer.append(EventType.JOB_FAILED, {"reason": "x"}, actor="server")
    writer.append(EventType.JOB_FAILED, {"reason": "y"}, actor="server")
    with Ledger.open(path):  # only looks
        pass
    assert _checkpoint_sizes(path) == []
    writer.close()  # wrote: signs its pending events
    assert _checkpoint_sizes(path) == [2]
    assert writer.close_error is None


def test_checkpoint_timer_signs_an_idle_writers_events(tmp_path: Path) -> None:
    path = tmp_path / "ledger.db"
    ledger = Ledger.open(path, checkpoint_every=1000, checkpoint_interval_s=3600)
    try:
        ledger.start_checkpoint_timer(0.05)
        ledger.append(EventType.JOB_FAILED, {"reason": "x"}, actor="server")
        deadline = time.monotonic() + 10
        while not ledger.checkpoints() and time.monotonic() < deadline:
            time.sleep(0.02)
        assert [c.tree_size for c in ledger.checkpoints()] == [1]  # no further append needed
    finally:
        ledger.close()
    assert ledger._timer is None
    with Ledger.open(path, read_only=True) as reader, pytest.raises(LedgerError, match="read-only"):
        reader.start_checkpoint_timer()


def test_close_reports_a_checkpoint_the_tampered_database_refuses(tmp_path: Path) -> None:
    path = tmp_path / "ledger.db"
    ledger = Ledger.open(path, checkpoint_every=1000)
    ledger.append(EventType.JOB_FAILED, {"reason": "x"}, actor="server")
    tamper(path, "INSERT INTO merkle_nodes (level, idx, hash) VALUES (0, 0, ?)", (b"\0" * 32,))
    ledger.close()  # must not raise a raw sqlite3.IntegrityError
    assert ledger.close_error is not None
    assert "could not write a checkpoint" in str(ledger.close_error)
    assert "altered outside fedpact" in str(ledger.close_error)


# --- a checkpoint kept elsewhere ---------------------------------------------------------------


def _kept(db: Path) -> str:
    with Ledger.open(db, read_only=True) as ledger:
        latest = ledger.latest_checkpoint()
    assert latest is not None
    return latest.note


def test_truncation_below_a_kept_checkpoint_is_named(db: Path) -> None:
    kept = _kept(db)
    _truncate(db, 25)
    with Ledger.open(db, read_only=True) as ledger:
        assert ledger.verify().ok  # nothing left in the log contradicts itself
        result = ledger.verify_against_checkpoint(kept)
    assert not result.ok and result.first_bad_seq == 26
    assert "truncated: the kept checkpoint" in result.reason
    assert "covers 30 events but the ledger holds only 25" in result.reason


def test_rewritten_history_is_caught_by_a_kept_checkpoint(db: Path) -> None:
    kept = _kept(db)
    _truncate(db, 20)
    with Ledger.open(db, checkpoint_every=1000) as ledger:  # the key holder re-signs a new tail
        _fill(ledger, 15, start=100)
    with Ledger.open(db, read_only=True) as ledger:
        assert ledger.verify().ok and ledger.count() == 35
        result = ledger.verify_against_checkpoint(kept)
    assert not result.ok and result.reason.startswith("rewritten: the ledger's first 30 events")


def test_an_extended_log_is_consistent_with_a_kept_checkpoint(db: Path, tmp_path: Path) -> None:
    kept = _kept(db)
    with Ledger.open(db, checkpoint_every=7) as ledger:
        _fill(ledger, 12, start=100)
    with Ledger.open(db, read_only=True) as ledger:
        result = ledger.verify_against_checkpoint(kept)
        assert result.ok and "consistent with the kept checkpoint at tree size 30" in result.reason
        assert "consistency proof" in result.reason
    # checkpoint rows gone but events intact: the root is recomputed from the events instead
    tamper(db, "DELETE FROM ledger_checkpoints WHERE tree_size > 10")
    with Ledger.open(db, read_only=True) as ledger:
        result = ledger.verify_against_checkpoint(kept)
    assert result.ok and "recomputed" in result.reason
    with Ledger.open(tmp_path / "other.db") as other:
        _fill(other, 3)
    with Ledger.open(tmp_path / "other.db", read_only=True) as other:
        unsigned = other.verify_against_checkpoint(kept)
        both_keys = [*other.trusted_keys(), *load_keys((db.parent / "ledger.db.pub").read_text())]
        foreign = other.verify_against_checkpoint(kept, both_keys)
    assert not unsigned.ok and "does not verify with the given key" in unsigned.reason
    assert not foreign.ok and "but this ledger is fedpact-audit/" in foreign.reason


# --- derived tables ----------------------------------------------------------------------------


def _consents(ledger: Ledger) -> None:
    registry = ConsentRegistry(ledger)
    for subject in ("S-1", "S-2"):
        registry.grant(subject, "churn", channel="web", legal_basis="consent",
                       notice_version="v1", source="x")
    registry.withdraw("S-1", "churn", channel="web", source="x")
    registry.record_subjects_used("job-1", "customers", "churn", ["S-2"])


def test_tampered_derived_tables_are_reported_and_rebuilt(tmp_path: Path) -> None:
    path = tmp_path / "ledger.db"
    with Ledger.open(path) as ledger:
        _fill(ledger, 3)
        _consents(ledger)
        pseudonym = ConsentRegistry(ledger).pseudonym("S-1")
        assert ledger.check_indexes().ok
    tamper(path, "UPDATE consent_state SET status = 'granted' WHERE subject = ?", (pseudonym,))
    tamper(path, "DELETE FROM event_index WHERE kind = 'dataset' AND seq = 2")
    tamper(path, "INSERT INTO event_index (kind, value, seq) VALUES ('partner', 'evil', 1)")
    tamper(path, "INSERT INTO job_subjects (subject, job_id, dataset) VALUES (?, 'job-1', "
                 "'customers')", (pseudonym,))
    with Ledger.open(path, read_only=True) as ledger:
        report = ledger.check_indexes()
        assert ledger.verify().ok  # the chain itself is untouched
    problems = "\n".join(report.problems)
    assert not report.ok and len(report.problems) == 4
    assert "event_index: missing dataset=customers for event 2" in problems
    assert "event_index: extra partner=evil pointing at event 1" in problems
    assert f"consent_state: {pseudonym} / churn: stored status 'granted' (chain: 'withdrawn')" in problems
    assert "job_subjects: job job-1 dataset customers holds 2 subjects" in problems
    with Ledger.open(path) as ledger:
        rebuilt = ledger.rebuild_indexes()
        assert rebuilt.rebuilt and len(rebuilt.problems) == 4
        after = ledger.check_indexes()
        assert [p for p in after.problems] == [p for p in report.problems if p.startswith("job_")]
        assert [r.status for r in ConsentRegistry(ledger).current("S-1")] == ["withdrawn"]
        found = query_events(ledger, EventFilter(dataset="customers")).events
        assert [e.seq for e in found if e.event_type == "data.accessed"] == [1, 2, 3]


def test_rebuild_refuses_a_broken_chain(tmp_path: Path) -> None:
    path = tmp_path / "ledger.db"
    with Ledger.open(path) as ledger:
        _fill(ledger, 3)
    tamper(path, "UPDATE ledger_events SET actor = 'someone' WHERE seq = 2")
    with Ledger.open(path) as ledger, pytest.raises(LedgerError, match="broken chain.*event 2"):
        ledger.rebuild_indexes()


def test_upgrading_a_pre_0002_ledger_derives_its_indexes(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    write_legacy_ledger(path, [("data.accessed", "node:bank-a", "job-1", {**ACCESS, "rows": seq})
                               for seq in (1, 2)])
    with Ledger.open(path) as ledger:
        found = query_events(ledger, EventFilter(dataset="customers", partner="bank-a")).events
        assert [e.seq for e in found] == [1, 2]
        assert ledger.check_indexes().ok
    with sqlite3.connect(path) as connection:  # derived: the upgrade's mark is gone
        assert connection.execute(
            "SELECT count(*) FROM ledger_meta WHERE key = 'indexes_pending'").fetchone() == (0,)


def test_read_only_refuses_a_ledger_that_needs_an_upgrade(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    connection = sqlite3.connect(path)
    connection.execute("CREATE TABLE ledger_events (seq INTEGER PRIMARY KEY)")
    connection.commit()
    connection.close()
    with pytest.raises(LedgerError, match="open it once read-write"):
        Ledger.open(path, read_only=True)
    (tmp_path / "empty.db").write_bytes(b"")
    with pytest.raises(LedgerError, match="not a fedpact audit ledger"):
        Ledger.open(tmp_path / "empty.db", read_only=True)


# --- audit roles -------------------------------------------------------------------------------


def test_roles_need_an_admin_and_one_explicit_bootstrap(tmp_path: Path) -> None:
    with Ledger.open(tmp_path / "ledger.db") as ledger:
        roles = ExportApprovals(ledger)
        with pytest.raises(LedgerError, match="only an admin may grant roles.*--bootstrap"):
            roles.grant_role("carol", "dpo", granted_by="mallory")
        with pytest.raises(LedgerError, match="first admin only"):
            roles.grant_role("carol", "dpo", granted_by="carol", bootstrap=True)
        roles.grant_role("alice", "admin", granted_by="alice", bootstrap=True)
        with pytest.raises(LedgerError, match=r"an admin already exists \(alice\)"):
            roles.grant_role("mallory", "admin", granted_by="mallory", bootstrap=True)
        with pytest.raises(LedgerError, match="role 'analyst' is unknown"):
            roles.grant_role("dave", "analyst", granted_by="alice")
        roles.grant_role("carol", "dpo", granted_by="alice")
        roles.grant_role("bob", "dpo", granted_by="alice")
        # a grant appended around grant_role(), without authority, counts for nothing
        ledger.append(EventType.ROLE_GRANTED,
                      {"principal": "mallory", "role": "dpo", "granted_by": "mallory"},
                      actor="mallory")
        ledger.append(EventType.ROLE_GRANTED,
                      {"principal": "mallory", "role": "admin", "granted_by": "mallory",
                       "bootstrap": True}, actor="mallory")
        assert roles.role_holders() == {"alice": {"admin"}, "carol": {"dpo"}, "bob": {"dpo"}}
        with pytest.raises(LedgerError, match="last admin"):
            roles.revoke_role("alice", "admin", revoked_by="alice")
        with pytest.raises(LedgerError, match="only an admin may revoke"):
            roles.revoke_role("carol", "dpo", revoked_by="bob")

        registry = ConsentRegistry(ledger)
        for subject in ("A", "B"):
            registry.grant(subject, "churn", channel="web", legal_basis="consent",
                           notice_version="v1", source="x")
        request = roles.request(EventFilter(event_types=("consent.granted",)),
                                requested_by="bob", purpose="audit")
        with pytest.raises(LedgerError, match="cannot also approve"):
            roles.approve(request.request_id, approver="bob")  # holds dpo, but asked for it
        with pytest.raises(LedgerError, match="mallory does not hold the dpo role"):
            roles.approve(request.request_id, approver="mallory")
        roles.revoke_role("carol", "dpo", revoked_by="alice")
        with pytest.raises(LedgerError, match="carol does not hold the dpo role"):
            roles.approve(request.request_id, approver="carol")
        roles.grant_role("carol", "dpo", granted_by="alice")
        assert roles.approve(request.request_id, approver="carol").status == "approved"


# --- retention ---------------------------------------------------------------------------------


def test_retention_plan_is_a_dry_run_and_enforcement_reports_progress(tmp_path: Path) -> None:
    with Ledger.open(tmp_path / "ledger.db") as ledger:
        registry = ConsentRegistry(ledger)
        registry.grant("OLD-1", "churn", channel="web", legal_basis="consent", notice_version="v1",
                       source="x", at=datetime(2020, 1, 15, tzinfo=UTC))
        registry.grant("NEW-1", "churn", channel="web", legal_basis="consent", notice_version="v1",
                       source="x")
        now = datetime(2026, 6, 1, tzinfo=UTC)
        plan = {step.retention_class: step.keys_due for step in plan_retention(ledger, now=now)}
        assert plan["consent"] == 1 and sum(plan.values()) == 1
        again = {s.retention_class: s.keys_due for s in plan_retention(ledger, now=now)}
        assert again == plan  # a plan destroys nothing
        seen: list[tuple[str, int]] = []
        event = enforce_retention(ledger, now=now,
                                  progress=lambda step, n: seen.append((step.retention_class, n)))
        assert event.payload["keys_destroyed"] == 1 and ("consent", 1) in seen
        assert len(seen) == len(plan)
        assert sum(step.keys_due for step in plan_retention(ledger, now=now)) == 0


# --- PostgreSQL --------------------------------------------------------------------------------


def test_postgres_read_only_kept_checkpoint_and_reindex(pg_url: str, tmp_path: Path) -> None:
    from fedpact.audit.verifier import verify_database

    url = pg_url

    with Ledger(url, key_dir=tmp_path, checkpoint_every=10) as ledger:
        for _ in range(3):
            _fill(ledger, 10)
        kept = ledger.latest_checkpoint().note
        keys = ledger.trusted_keys()
    pg_tamper(url, "DELETE FROM event_index WHERE kind = 'dataset' AND seq = 4")
    with Ledger(url, key_dir=tmp_path / "nowhere", read_only=True) as reader:
        with pytest.raises(LedgerError, match="read-only"):
            reader.append(EventType.JOB_FAILED, {"reason": "x"}, actor="server")
        assert reader.verify_against_checkpoint(kept, keys).ok
        assert reader.check_indexes().problems == ("event_index: missing dataset=customers for event 4",)
    assert not (tmp_path / "nowhere").exists()
    with Ledger(url, key_dir=tmp_path) as ledger:
        assert len(ledger.rebuild_indexes().problems) == 1 and ledger.check_indexes().ok
    pg_tamper(url, "DELETE FROM ledger_events WHERE seq > 25")
    pg_tamper(url, "DELETE FROM ledger_checkpoints WHERE tree_size > 25")
    with Ledger(url, key_dir=tmp_path, read_only=True) as reader:
        assert reader.verify(keys).ok
        truncated = reader.verify_against_checkpoint(kept, keys)
    assert not truncated.ok and truncated.first_bad_seq == 26 and "truncated" in truncated.reason
    third_party = verify_database(url, keys, kept=kept)
    assert not third_party.ok and "holds only 25" in third_party.reason

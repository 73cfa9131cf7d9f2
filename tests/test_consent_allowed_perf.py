"""Consent decided from verified events, incrementally: a `Ledger` remembers what it proved.

`allowed()` used to verify the whole log on every call (≈ 10× slower on a 30k-event registry).
Now the first call verifies it all; later calls on the same `Ledger` verify only the events
appended since, and re-check the rest cheaply: every event's seq and stored hash (a deleted,
inserted, reordered or re-hashed event), every checkpoint signature and the stored frontier, and
the content of every consent event the decision reads. Any doubt runs the full verification,
which names the event, as before. (bench/test_bench_audit_consent.py measures it.)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from ledger_tamper import tamper

import fedpact.audit.ledger as ledger_module
from fedpact.audit import EventType, Ledger, LedgerError
from fedpact.audit.chain import canonical_json, event_hash
from fedpact.audit.consent import ConsentRegistry
from fedpact.audit.ledger import forget_consent_proofs

PURPOSE = "churn"


def _grant(registry: ConsentRegistry, *subjects: str) -> None:
    for subject in subjects:
        registry.grant(subject, PURPOSE, channel="web", legal_basis="consent",
                       notice_version="v1", source="crm")


@pytest.fixture(autouse=True)
def _no_proofs() -> Any:
    forget_consent_proofs()
    yield
    forget_consent_proofs()


@pytest.fixture
def counted(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """How many events each full verification (verify_log) checked."""
    calls: list[int] = []
    real = ledger_module.verify_log

    def spy(*args: Any, **kwargs: Any) -> Any:
        verdict = real(*args, **kwargs)
        calls.append(verdict.events_checked)
        return verdict

    monkeypatch.setattr(ledger_module, "verify_log", spy)
    return calls


def _registry(path: Path) -> tuple[Ledger, ConsentRegistry]:
    ledger = Ledger.open(path, checkpoint_every=4)
    registry = ConsentRegistry(ledger)
    _grant(registry, "S-1", "S-2", "S-3")
    registry.withdraw("S-1", PURPOSE, channel="web", source="crm")  # seq 4: a checkpoint
    _grant(registry, "S-4")  # seq 5: not yet signed
    return ledger, registry


def test_later_calls_verify_only_the_new_events(tmp_path: Path, counted: list[int]) -> None:
    ledger, registry = _registry(tmp_path / "l.db")
    with ledger:
        ids = ["S-1", "S-2", "S-3", "S-4", "S-5"]
        assert registry.allowed(ids, PURPOSE).tolist() == [False, True, True, True, False]
        assert counted == [5]  # the first call verifies everything
        assert registry.allowed(ids, PURPOSE).tolist() == [False, True, True, True, False]
        _grant(registry, "S-5")
        registry.withdraw("S-2", PURPOSE, channel="web", source="crm")
        ledger.append(EventType.JOB_FAILED, {"reason": "test"}, actor="other")
        assert registry.allowed(ids, PURPOSE).tolist() == [False, False, True, True, True]
        assert [r.status for r in registry.current("S-2")] == ["withdrawn"]
        assert counted == [5]  # no full verification since
        assert registry.index_problems == []
        ledger.checkpoint()  # signs events proven already: their root is checked, no full check
        _grant(registry, "S-6")
        assert registry.allowed(["S-6", "S-1"], PURPOSE).tolist() == [True, False]
        assert counted == [5]
    # another Ledger of this process on the file (a data loader opens one per job) uses the proof
    with Ledger.open(tmp_path / "l.db") as again:
        assert ConsentRegistry(again).allowed(ids, PURPOSE).tolist() == [False, False, True, True, True]
    assert counted == [5]
    forget_consent_proofs()  # without it, everything is proven once again
    with Ledger.open(tmp_path / "l.db", read_only=True) as again:
        assert ConsentRegistry(again).allowed(ids, PURPOSE).tolist() == [False, False, True, True, True]
    assert counted == [5, 9]


def _first_call_then(tmp_path: Path, edit: Any) -> tuple[Ledger, ConsentRegistry, Path]:
    path = tmp_path / "l.db"
    ledger, registry = _registry(path)
    assert registry.allowed(["S-1"], PURPOSE).tolist() == [False]
    edit(path, ledger)
    return ledger, registry, path


@pytest.mark.parametrize("edit,first_bad", [
    # the withdrawal turned into a grant in place (its hash left as it was)
    (lambda p, _l: tamper(p, "UPDATE ledger_events SET event_type = 'consent.granted' "
                             "WHERE seq = 4"), 4),
    # the withdrawal deleted
    (lambda p, _l: tamper(p, "DELETE FROM ledger_events WHERE seq = 4"), 4),
    # an unsigned event deleted (only the chain's stored hashes show it)
    (lambda p, _l: tamper(p, "DELETE FROM ledger_events WHERE seq = 5"), None),
], ids=["withdrawal-edited", "withdrawal-deleted", "tail-deleted"])
def test_tampering_with_events_already_proven_is_still_refused(
        tmp_path: Path, edit: Any, first_bad: int | None) -> None:
    ledger, registry, _ = _first_call_then(tmp_path, edit)
    with ledger:
        if first_bad is None:  # deleting the newest unsigned event: the remembered hashes differ
            with pytest.raises(LedgerError, match="consent cannot be decided|chain"):
                registry.allowed(["S-4"], PURPOSE)
            return
        with pytest.raises(LedgerError, match=f"consent cannot be decided.*event {first_bad}"):
            registry.allowed(["S-1"], PURPOSE)


def test_a_rehashed_rewrite_of_proven_history_is_refused(tmp_path: Path) -> None:
    def rewrite(path: Path, ledger: Ledger) -> None:
        events = ledger.events()
        prev = events[2].hash
        for original in events[3:]:
            kind = "consent.granted" if original.seq == 4 else original.event_type
            payload = original.payload
            if original.seq == 4:
                grant = events[0].payload
                payload = {**grant, "subject": original.payload["subject"]}
            digest = event_hash(prev, original.seq, original.timestamp, kind, original.actor,
                                original.job_id, payload)
            tamper(path, "UPDATE ledger_events SET event_type = ?, payload = ?, prev_hash = ?, "
                         "hash = ? WHERE seq = ?",
                   (kind, canonical_json(payload).decode(), prev, digest, original.seq))
            prev = digest

    ledger, registry, _ = _first_call_then(tmp_path, rewrite)
    with ledger, pytest.raises(LedgerError, match="consent cannot be decided.*event 4"):
        registry.allowed(["S-1"], PURPOSE)


def test_a_forged_new_event_is_refused(tmp_path: Path) -> None:
    def forge(path: Path, ledger: Ledger) -> None:
        head = ledger.head()
        grant = ledger.events()[0]
        payload = {**grant.payload, "subject": ledger.events()[3].payload["subject"]}
        stamp = head.timestamp
        digest = event_hash(head.hash, head.seq + 1, stamp, "consent.granted", grant.actor,
                            None, payload)
        from fedpact.audit.chain import event_id_for
        tamper(path, "INSERT INTO ledger_events (seq, event_id, timestamp, event_type, actor, "
                     "job_id, payload, prev_hash, hash) VALUES (?,?,?,?,?,?,?,?,?)",
               (head.seq + 1, event_id_for(stamp, digest), stamp, "consent.granted",
                grant.actor, None, canonical_json(payload).decode(), head.hash, digest))

    ledger, registry, _ = _first_call_then(tmp_path, forge)
    with ledger, pytest.raises(LedgerError, match="consent cannot be decided.*event 6.*writer"):
        registry.allowed(["S-1"], PURPOSE)


def test_a_replaced_checkpoint_is_refused(tmp_path: Path) -> None:
    def resign(path: Path, _ledger: Ledger) -> None:
        tamper(path, "UPDATE ledger_checkpoints SET note = replace(note, 'fedpact', 'fedpaxt')")

    ledger, registry, _ = _first_call_then(tmp_path, resign)
    with ledger, pytest.raises(LedgerError, match="consent cannot be decided"):
        registry.allowed(["S-1"], PURPOSE)


def test_consent_state_edited_after_the_first_call_is_still_named(tmp_path: Path) -> None:
    def edit(path: Path, ledger: Ledger) -> None:
        pseudonym = ConsentRegistry(ledger).pseudonym("S-1")
        tamper(path, "UPDATE consent_state SET status = 'granted' WHERE subject = ?", (pseudonym,))

    ledger, registry, _ = _first_call_then(tmp_path, edit)
    with ledger:
        assert registry.allowed(["S-1", "S-2"], PURPOSE).tolist() == [False, True]
        assert any("withdrawn" in p for p in registry.index_problems)

"""Issue #15, finding 4: consent is decided from events proven against the chain, never from the
derived `consent_state` table alone (which anyone with write access to the database can edit)."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from ledger_tamper import pg_tamper, tamper

from fedpact.audit import Ledger, LedgerError
from fedpact.audit.consent import ConsentRegistry

PURPOSE = "churn"


def _registry_with_a_withdrawal(ledger: Ledger) -> ConsentRegistry:
    registry = ConsentRegistry(ledger)
    for subject in ("S-1", "S-2"):
        registry.grant(subject, PURPOSE, channel="web", legal_basis="consent",
                       notice_version="v1", source="crm")
    registry.withdraw("S-1", PURPOSE, channel="web", source="crm")
    return registry


def test_a_consent_state_row_edited_to_granted_is_refused_and_named(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "ledger.db"
    with Ledger.open(path) as ledger:
        pseudonym = _registry_with_a_withdrawal(ledger).pseudonym("S-1")
    tamper(path, "UPDATE consent_state SET status = 'granted' WHERE subject = ?", (pseudonym,))
    tamper(path, "DELETE FROM event_index WHERE kind = 'subject' AND value = ? AND seq = 3",
           (pseudonym,))  # and the withdrawal's index row, so no index points at it
    with Ledger.open(path) as ledger, caplog.at_level(logging.WARNING):
        registry = ConsentRegistry(ledger)
        assert registry.allowed(["S-1", "S-2"], PURPOSE).tolist() == [False, True]
        assert any(pseudonym in p and "withdrawn" in p for p in registry.index_problems)
        assert [r.status for r in registry.current("S-1")] == ["withdrawn"]
        mask = registry.enforce("job-1", "customers", PURPOSE, ["S-1", "S-2"])
        assert mask.tolist() == [False, True]
    assert "consent_state" in caplog.text and pseudonym in caplog.text


def test_a_deleted_consent_state_row_does_not_lose_a_grant(tmp_path: Path) -> None:
    path = tmp_path / "ledger.db"
    with Ledger.open(path) as ledger:
        pseudonym = _registry_with_a_withdrawal(ledger).pseudonym("S-2")
    tamper(path, "DELETE FROM consent_state WHERE subject = ?", (pseudonym,))
    with Ledger.open(path, read_only=True) as ledger:
        registry = ConsentRegistry(ledger)
        assert registry.allowed(["S-2"], PURPOSE).tolist() == [True]
        assert any("consent_state" in p and pseudonym in p for p in registry.index_problems)


def test_consent_on_a_broken_chain_is_refused_naming_the_event(tmp_path: Path) -> None:
    path = tmp_path / "ledger.db"
    with Ledger.open(path) as ledger:
        _registry_with_a_withdrawal(ledger)
    tamper(path, "DELETE FROM ledger_events WHERE seq = 3")  # the withdrawal itself
    with Ledger.open(path, read_only=True) as ledger, pytest.raises(
            LedgerError, match="consent cannot be decided.*event 3"):
        ConsentRegistry(ledger).allowed(["S-1"], PURPOSE)


def test_postgres_consent_state_edit_is_refused(pg_url: str, tmp_path: Path) -> None:
    with Ledger(pg_url, key_dir=tmp_path) as ledger:
        pseudonym = _registry_with_a_withdrawal(ledger).pseudonym("S-1")
    pg_tamper(pg_url, "UPDATE consent_state SET status = 'granted' WHERE subject = %s",
              (pseudonym,))
    with Ledger(pg_url, key_dir=tmp_path, read_only=True) as ledger:
        registry = ConsentRegistry(ledger)
        assert registry.allowed(["S-1", "S-2"], PURPOSE).tolist() == [False, True]
        assert any(pseudonym in p for p in registry.index_problems)

"""Fixes from the review of 2026-12-02: each test fails on the code before its fix."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from fedpact.audit import EventType, Ledger
from fedpact.audit.chain import canonical_json, event_hash
from fedpact.audit.events import LedgerError, validate_payload


def _legacy_ledger(path: Path, *, break_chain: bool = False) -> None:
    """A ledger file from before migration 0001 (one table), holding a consent grant."""
    connection = sqlite3.connect(path)
    connection.execute(
        "CREATE TABLE ledger_events (seq INTEGER NOT NULL PRIMARY KEY, event_id TEXT NOT NULL UNIQUE, "
        "timestamp TEXT NOT NULL, event_type TEXT NOT NULL, actor TEXT NOT NULL, job_id TEXT, "
        "payload TEXT NOT NULL, prev_hash TEXT NOT NULL, hash TEXT NOT NULL)"
    )
    prev = "0" * 64
    for seq in (1, 2):
        payload = {"reason": f"old {seq}", "dataset": "customers"}
        ts = f"2024-01-0{seq}T00:00:00.000000+00:00"
        digest = event_hash(prev, seq, ts, "job.failed", "server", None, payload)
        if break_chain and seq == 2:
            payload = {"reason": "rewritten", "dataset": "customers"}
        connection.execute("INSERT INTO ledger_events VALUES (?,?,?,?,?,?,?,?,?)",
                           (seq, f"e{seq}", ts, "job.failed", "server", None,
                            canonical_json(payload).decode(), prev, digest))
        prev = digest
    connection.commit()
    connection.close()


def _meta(path: Path) -> dict[str, str]:
    with sqlite3.connect(path) as connection:
        return dict(connection.execute("SELECT key, value FROM ledger_meta").fetchall())


def test_upgrade_derives_indexes_and_clears_its_mark(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    _legacy_ledger(path)
    with Ledger.open(path) as ledger:
        with sqlite3.connect(path) as connection:
            rows = connection.execute(
                "SELECT seq FROM event_index WHERE kind = 'dataset' AND value = 'customers'"
            ).fetchall()
        assert sorted(rows) == [(1,), (2,)]
        assert ledger.count() == 2
    assert "indexes_pending" not in _meta(path)


def test_failed_index_derivation_after_upgrade_is_retried_on_every_open(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    _legacy_ledger(path, break_chain=True)
    for _ in range(2):  # the first open upgrades; the mark makes the second one try again
        with pytest.raises(LedgerError, match="upgraded from schema.*fedpact audit reindex"):
            Ledger.open(path)
        assert "indexes_pending" in _meta(path)


@pytest.mark.parametrize("payload", [
    {"reason": "x", "metrics": {"alice@example.com": 1}},
    {"reason": "x", "bob@example.com": "seen"},
    {"reason": "x", "per_partner": {"+44 20 7946 0018": 3}},
])
def test_addresses_used_as_keys_are_refused_without_echoing_them(payload) -> None:
    with pytest.raises(LedgerError, match="e-mail address or phone number") as refused:
        validate_payload(EventType.JOB_FAILED, payload)
    assert "example.com" not in str(refused.value) and "7946" not in str(refused.value)


def test_consent_expire_refuses_a_future_time(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from fedpact.service.cli import app

    Ledger.open(tmp_path / "ledger.db").close()
    result = CliRunner().invoke(app, ["audit", "consent", "expire", "--at",
                                      "2999-01-01T00:00:00+00:00", "--home", str(tmp_path)])
    assert result.exit_code != 0
    assert "in the future" in result.output
    with Ledger.open(tmp_path / "ledger.db", read_only=True) as ledger:
        assert ledger.count() == 0


def test_match_job_record_describes_its_noisy_report_not_dp_sgd(tmp_path: Path) -> None:
    from fedpact.audit.records import processing_record

    with Ledger.open(tmp_path / "ledger.db") as ledger:
        ledger.append(EventType.MATCH_COMPLETED, {
            "mode": "psi-cardinality", "parties": ["bank", "retailer"],
            "datasets": ["crm", "pos"], "sizes": {"crm": 200, "pos": 300}, "overlap": 100,
            "purpose": "audience_matching"}, actor="node:bank", job_id="m-1")
        ledger.append(EventType.PRIVACY_SPENT, {
            "dataset": "crm", "epsilon": 0.5, "delta": 0.0, "mechanism": "laplace",
            "purpose": "audience_matching", "released_by": "bank",
            "query": "audience overlap report"}, actor="node:bank", job_id="m-1")
        record = processing_record(ledger, "m-1")
    text = record.pipl_assessment().to_markdown() + record.to_markdown()
    assert "DP-SGD" not in text
    assert "Laplace noise (crm: ε 0.5" in text
    assert record.dp is None and record.match_job

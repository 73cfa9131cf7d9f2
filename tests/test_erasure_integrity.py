"""Issue #15, finding 5: erasure says whether the wrapped key bytes left the database files, and a
key row deleted behind the ledger's back is not mistaken for an erasure."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
from ledger_tamper import tamper
from typer.testing import CliRunner

from fedpact.audit import EventType, Ledger
from fedpact.audit.consent import ConsentRegistry
from fedpact.audit.dsar import ERASED, KEY_MISSING, SubjectRequests
from fedpact.audit.subjects import SubjectKeys


def _grant(ledger: Ledger, subject: str = "S-1") -> str:
    registry = ConsentRegistry(ledger)
    registry.grant(subject, "churn", channel="web", legal_basis="consent", notice_version="v1",
                   source="crm", personal={"name": "Ada"})
    return registry.pseudonym(subject)


def _wrapped(db: Path) -> list[bytes]:
    with sqlite3.connect(db) as connection:
        return [bytes(w) for (w,) in connection.execute(
            "SELECT wrapped FROM subject_keys WHERE wrapped IS NOT NULL")]


def _on_disk(db: Path, blobs: list[bytes]) -> bool:
    files = b"".join(p.read_bytes() for p in (db, db.with_name(db.name + "-wal")) if p.exists())
    return any(blob in files for blob in blobs)


class _Reader:
    """Another process holding a read transaction (a snapshot) on the ledger file."""

    def __init__(self, db: Path) -> None:
        script = (
            "import sqlite3, sys\n"
            f"c = sqlite3.connect({str(db)!r}, isolation_level=None)\n"
            "c.execute('BEGIN'); c.execute('SELECT count(*) FROM subject_keys').fetchone()\n"
            "print('ready', flush=True); sys.stdin.read(); c.execute('COMMIT')\n"
        )
        self.process = subprocess.Popen([sys.executable, "-c", script], stdin=subprocess.PIPE,
                                        stdout=subprocess.PIPE, text=True)
        assert self.process.stdout is not None
        assert self.process.stdout.readline().strip() == "ready"

    def close(self) -> None:
        assert self.process.stdin is not None
        self.process.stdin.close()
        self.process.wait(timeout=30)


def test_erasure_under_a_reader_says_the_key_bytes_may_remain(tmp_path: Path) -> None:
    db = tmp_path / "ledger.db"
    with Ledger.open(db) as ledger:
        _grant(ledger)
        blobs = _wrapped(db)
        assert blobs and _on_disk(db, blobs)
        reader = _Reader(db)
        try:
            report = SubjectRequests(ledger).erase("S-1", purge_timeout_s=1.0)
            assert report.keys_destroyed == 1
            assert report.key_bytes_purged is False
            assert "read transaction" in report.purge_note
            assert _on_disk(db, blobs)  # what the report says: the bytes are still there
            [erased] = ledger.events(event_type=EventType.SUBJECT_ERASED)
            assert erased.payload["key_bytes_purged"] is False
        finally:
            reader.close()
        purge = SubjectKeys.of(ledger).purge(timeout_s=10.0)
        assert purge.complete, purge.detail
    assert not _on_disk(db, blobs)


def test_erasure_without_readers_purges_and_says_so(tmp_path: Path) -> None:
    db = tmp_path / "ledger.db"
    with Ledger.open(db) as ledger:
        _grant(ledger)
        blobs = _wrapped(db)
        report = SubjectRequests(ledger).erase("S-1")
        assert report.key_bytes_purged is True and report.purge_note == ""
        assert not _on_disk(db, blobs)


def test_cli_erasure_fails_loudly_while_a_reader_holds_a_snapshot(tmp_path: Path) -> None:
    from fedpact.service.cli import app

    db = tmp_path / "ledger.db"
    with Ledger.open(db) as ledger:
        _grant(ledger)
    reader = _Reader(db)
    try:
        result = CliRunner().invoke(app, ["audit", "dsar", "erase", "S-1", "--yes", "--home",
                                          str(tmp_path), "--purge-timeout", "1"])
    finally:
        reader.close()
    assert result.exit_code == 1
    assert "may remain" in result.output and "read transaction" in result.output
    purged = CliRunner().invoke(app, ["audit", "dsar", "purge", "--home", str(tmp_path)])
    assert purged.exit_code == 0 and "purged" in purged.output


def test_a_deleted_key_row_is_not_an_erasure(tmp_path: Path) -> None:
    db = tmp_path / "ledger.db"
    with Ledger.open(db) as ledger:
        pseudonym = _grant(ledger)
    tamper(db, "DELETE FROM subject_keys WHERE subject = ?", (pseudonym,))
    with Ledger.open(db) as ledger:
        report = SubjectRequests(ledger).report("S-1")
    assert not report.erased
    [grant] = report.events
    assert grant["personal"] == KEY_MISSING
    assert "key row missing without an erasure event" in grant["personal_status"]
    assert report.key_problems and "subject_keys" in report.key_problems[0]


def test_an_erased_key_names_its_erasure_event(tmp_path: Path) -> None:
    db = tmp_path / "ledger.db"
    with Ledger.open(db) as ledger:
        _grant(ledger)
        requests = SubjectRequests(ledger)
        requests.erase("S-1")
        [erased] = ledger.events(event_type=EventType.SUBJECT_ERASED)
        report = requests.report("S-1")
    assert report.erased and not report.key_problems
    grant = report.events[0]
    assert grant["personal"] == ERASED
    assert grant["personal_status"] == f"erased (event seq {erased.seq})"


def test_a_key_destroyed_without_an_erasure_event_is_named(tmp_path: Path) -> None:
    db = tmp_path / "ledger.db"
    with Ledger.open(db) as ledger:
        pseudonym = _grant(ledger)
    tamper(db, "UPDATE subject_keys SET wrapped = NULL, destroyed_at = '2025-01-01', "
               "destroyed_why = 'erasure request dsar-forged' WHERE subject = ?", (pseudonym,))
    with Ledger.open(db) as ledger:
        report = SubjectRequests(ledger).report("S-1")
    assert report.key_problems
    assert "no subject.erased event" in report.events[0]["personal_status"]


@pytest.mark.parametrize("why", ["retention consent 1095 days"])
def test_a_key_expired_by_retention_says_so(tmp_path: Path, why: str) -> None:
    db = tmp_path / "ledger.db"
    with Ledger.open(db) as ledger:
        pseudonym = _grant(ledger)
        SubjectKeys.of(ledger).destroy(pseudonym, why=why)
        report = SubjectRequests(ledger).report("S-1")
    assert report.events[0]["personal"] == ERASED
    assert report.events[0]["personal_status"].startswith("expired by retention")

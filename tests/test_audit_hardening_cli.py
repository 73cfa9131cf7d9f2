"""`fedpact audit …` hardening, through typer's CliRunner: read-only commands write and sign
nothing, kept checkpoints catch truncation, one-line errors, roles, retention, consent expiry,
derived tables."""

from __future__ import annotations

import json
import sqlite3
from datetime import UTC, datetime
from pathlib import Path

import pytest
from ledger_tamper import tamper
from typer.testing import CliRunner

from fedpact.audit import EventType, Ledger
from fedpact.audit.consent import ConsentRegistry
from fedpact.audit.verifier import main as verifier_main
from fedpact.service.cli_audit import audit_app

runner = CliRunner()
ACCESS = {"node": "bank-a", "dataset": "customers", "rows": 5, "columns": ["age"],
          "purpose": "churn"}


def _run(*args: str):
    result = runner.invoke(audit_app, list(args), env={"COLUMNS": "200"})
    # every failure is one clear line and an exit code, never a traceback
    assert result.exception is None or isinstance(result.exception, SystemExit), result.output
    assert "Traceback" not in result.output
    return result


def _rows(db: Path, sql: str) -> list[tuple]:
    connection = sqlite3.connect(db)
    try:
        return connection.execute(sql).fetchall()
    finally:
        connection.close()


@pytest.fixture
def home(tmp_path: Path) -> Path:
    folder = tmp_path / "run"
    with Ledger.open(folder / "ledger.db", checkpoint_every=10) as ledger:
        for batch in range(3):  # checkpoints at 10, 20, 30
            ledger.append_many(
                (EventType.DATA_ACCESSED, {**ACCESS, "rows": 10 * batch + i}, "node:bank-a", "job-1")
                for i in range(10)
            )
    return folder


def _truncate(db: Path, keep: int) -> None:
    tamper(db, "DELETE FROM ledger_events WHERE seq > ?", (keep,))
    tamper(db, "DELETE FROM ledger_checkpoints WHERE tree_size > ?", (keep,))


def test_verify_signs_nothing_and_a_kept_checkpoint_catches_truncation(home: Path, capsys) -> None:
    db = home / "ledger.db"
    kept = home.parent / "kept.note"
    saved = _run("checkpoint", "--home", str(home), "--no-sign", "--out", str(kept))
    assert saved.exit_code == 0, saved.output
    assert kept.read_text().startswith("fedpact-audit/") and "\n30\n" in kept.read_text()
    bundle = home.parent / "proof.json"
    assert _run("prove", "30", "--home", str(home), "--out", str(bundle)).exit_code == 0

    _truncate(db, 25)  # the tail and the checkpoint that covered it
    plain = _run("verify", "--home", str(home))
    assert plain.exit_code == 0 and "25 events verified" in plain.output
    assert "5 newest not yet in a signed checkpoint" in plain.output
    # verify opened the ledger read-only: it did not sign a checkpoint over the truncated log
    assert _rows(db, "SELECT tree_size FROM ledger_checkpoints ORDER BY 1") == [(10,), (20,)]
    assert _run("prove", "23", "--home", str(home)).exit_code == 2  # prove does not sign either
    assert _rows(db, "SELECT count(*) FROM ledger_checkpoints") == [(2,)]

    for keep_file in (kept, bundle):
        caught = _run("verify", "--home", str(home), "--checkpoint", str(keep_file),
                      "--public-key", str(home / "ledger.db.pub"))
        assert caught.exit_code == 1
        assert "chain broken at event 26" in caught.output
        assert "truncated: the kept checkpoint" in caught.output
        assert "covers 30 events but the ledger holds only 25" in caught.output
    as_json = _run("verify", "--home", str(home), "--checkpoint", str(kept), "--json")
    assert as_json.exit_code == 1 and json.loads(as_json.stdout)["first_bad_seq"] == 26
    # the standalone verifier a third party runs says the same
    pub = str(home / "ledger.db.pub")
    assert verifier_main([str(db), "--public-key", pub]) == 0
    assert verifier_main([str(db), "--public-key", pub, "--checkpoint", str(kept)]) == 1
    assert "truncated" in capsys.readouterr().out
    assert _rows(db, "SELECT count(*) FROM ledger_checkpoints") == [(2,)]


def test_a_kept_checkpoint_passes_on_an_extended_log(home: Path) -> None:
    kept = home.parent / "kept.note"
    assert _run("checkpoint", "--home", str(home), "--out", str(kept)).exit_code == 0
    with Ledger.open(home / "ledger.db") as ledger:
        ledger.append(EventType.JOB_FAILED, {"reason": "later"}, actor="server")
    ok = _run("verify", "--home", str(home), "--checkpoint", str(kept))
    text = " ".join(ok.output.split())
    assert ok.exit_code == 0 and "consistent with the kept checkpoint at tree size 30" in text
    assert "consistency proof to the ledger's signed tree size 31" in text
    garbage = home.parent / "garbage.txt"
    garbage.write_text("not a checkpoint")
    bad = _run("verify", "--home", str(home), "--checkpoint", str(garbage))
    assert bad.exit_code == 2 and "neither a signed note nor a proof bundle" in bad.output


def test_read_only_commands_refuse_a_missing_database_and_create_nothing(tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    missing = tmp_path / "missing.db"
    for command in (["verify"], ["events"], ["query"], ["prove", "1"], ["role", "list"],
                    ["consent", "show", "S-1"], ["checkpoint", "--no-sign"],
                    ["retention", "enforce", "--dry-run"]):
        result = _run(*command, "--db", f"sqlite:///{missing}", "--home", str(keys))
        assert result.exit_code == 2, (command, result.output)
        assert f"no ledger database at {missing}" in result.output
    assert not missing.exists() and not keys.exists()
    # write commands that need an existing ledger refuse too
    access = _run("dsar", "access", "S-1", "--db", f"sqlite:///{missing}", "--home", str(keys))
    assert access.exit_code == 2 and not missing.exists()


def test_bad_paths_and_options_are_one_line_errors(home: Path) -> None:
    no_key = _run("verify", "--home", str(home), "--public-key", str(home / "missing.pub"))
    assert no_key.exit_code == 2 and "public key file" in no_key.output
    assert "missing.pub does not exist" in no_key.output
    nodir = home / "nodir" / "x.csv"
    queried = _run("query", "--home", str(home), "--format", "csv", "--out", str(nodir))
    assert queried.exit_code == 2 and "directory" in queried.output and "does not exist" in queried.output
    assert _run("events", "--home", str(home), "--limit", "-1").exit_code == 2
    xml = _run("query", "--home", str(home), "--format", "xml")
    assert xml.exit_code == 2 and "--format 'xml' is not table, csv or json" in xml.output

    with Ledger.open(home / "ledger.db") as ledger:
        ConsentRegistry(ledger).grant("S-1", "churn", channel="web", legal_basis="consent",
                                      notice_version="v1", source="x")
        before = ledger.count()
    access = _run("dsar", "access", "S-1", "--home", str(home), "--out", str(nodir))
    assert access.exit_code == 2 and "does not exist" in access.output
    with Ledger.open(home / "ledger.db", read_only=True) as ledger:
        assert ledger.count() == before  # neither dsar.received nor dsar.fulfilled was logged
    out = home / "access.json"
    done = _run("dsar", "access", "S-1", "--home", str(home), "--out", str(out))
    assert done.exit_code == 0 and json.loads(out.read_text())["subject"].startswith("ps_")


def test_a_closing_checkpoint_the_tampered_database_refuses_is_reported(home: Path) -> None:
    db = home / "ledger.db"
    tamper(db, "INSERT INTO merkle_nodes (level, idx, hash) VALUES (0, 30, ?)", (b"\0" * 32,))
    result = _run("consent", "grant", "S-9", "churn", "--channel", "app", "--legal-basis",
                  "consent", "--notice-version", "v2", "--source", "app", "--home", str(home))
    assert result.exit_code == 1
    assert "recorded, but the closing checkpoint was not signed" in result.output
    assert "altered outside fedpact" in result.output


def test_role_commands_and_the_four_eyes_rule(home: Path) -> None:
    with Ledger.open(home / "ledger.db") as ledger:
        registry = ConsentRegistry(ledger)
        for subject in ("A", "B"):
            registry.grant(subject, "churn", channel="web", legal_basis="consent",
                           notice_version="v1", source="x")
    h = ("--home", str(home))
    early = _run("role", "grant", "carol", "dpo", "--by", "mallory", *h)
    assert early.exit_code == 2 and "mallory does not hold the admin role" in early.output
    assert _run("role", "grant", "alice", "admin", "--by", "alice", "--bootstrap", *h).exit_code == 0
    again = _run("role", "grant", "mallory", "admin", "--by", "mallory", "--bootstrap", *h)
    assert again.exit_code == 2 and "an admin already exists (alice)" in again.output
    assert _run("role", "grant", "carol", "dpo", "--by", "alice", *h).exit_code == 0
    assert _run("role", "grant", "bob", "dpo", "--by", "alice", *h).exit_code == 0
    listed = _run("role", "list", *h)
    assert listed.exit_code == 0 and "3 principals hold audit roles" in listed.output

    made = _run("export", "request", "--requested-by", "bob", "--purpose", "audit", "--type",
                "consent.granted", *h)
    request_id = made.output.split(":")[0].strip()
    own = _run("export", "approve", request_id, "--approver", "bob", *h)
    assert own.exit_code == 2 and "cannot also approve" in own.output
    stranger = _run("export", "approve", request_id, "--approver", "dave", *h)
    assert stranger.exit_code == 2 and "dave does not hold the dpo role" in stranger.output
    revoked = _run("role", "revoke", "carol", "dpo", "--by", "bob", *h)
    assert revoked.exit_code == 2 and "only an admin may revoke" in revoked.output
    assert _run("export", "approve", request_id, "--approver", "carol", *h).exit_code == 0
    assert _run("role", "revoke", "carol", "dpo", "--by", "alice", *h).exit_code == 0
    assert "2 principals" in _run("role", "list", *h).output
    assert "bootstrap" in _run("query", "--type", "admin.role_granted", "--format", "json",
                               *h).stdout


def test_retention_enforce_and_consent_expire_commands(home: Path) -> None:
    h = ("--home", str(home))
    with Ledger.open(home / "ledger.db") as ledger:
        registry = ConsentRegistry(ledger)
        registry.grant("OLD-1", "churn", channel="web", legal_basis="consent", notice_version="v1",
                       source="x", at=datetime(2019, 1, 15, tzinfo=UTC),
                       expires_at=datetime(2020, 1, 15, tzinfo=UTC))
        registry.grant("NEW-1", "churn", channel="web", legal_basis="consent", notice_version="v1",
                       source="x")
    dry = _run("retention", "enforce", "--dry-run", *h)
    assert dry.exit_code == 0, dry.output
    assert "dry run: 1 keys would be destroyed; nothing was changed" in dry.output
    db = home / "ledger.db"
    assert _rows(db, "SELECT count(*) FROM subject_keys WHERE wrapped IS NULL") == [(0,)]
    enforced = _run("retention", "enforce", *h)
    assert enforced.exit_code == 0, enforced.output
    assert "retention enforced" in enforced.output and "1 keys destroyed" in enforced.output
    assert _rows(db, "SELECT count(*) FROM subject_keys WHERE wrapped IS NULL") == [(1,)]
    assert _rows(db, "SELECT count(*) FROM ledger_events WHERE event_type = 'retention.enforced'") == [(1,)]

    expired = _run("consent", "expire", *h)
    assert expired.exit_code == 0, expired.output
    assert "1 consents expired" in expired.output and "churn" in expired.output
    shown = _run("consent", "show", "OLD-1", *h)
    assert "expired" in shown.output
    assert "nothing recorded" in _run("consent", "expire", *h).output
    bad = _run("consent", "expire", "--at", "tomorrow", *h)
    assert bad.exit_code == 2 and "is not an ISO-8601 time" in bad.output


def test_verify_indexes_reports_tampering_and_reindex_repairs_it(home: Path) -> None:
    h = ("--home", str(home))
    with Ledger.open(home / "ledger.db") as ledger:
        registry = ConsentRegistry(ledger)
        registry.grant("S-1", "churn", channel="web", legal_basis="consent", notice_version="v1",
                       source="x")
        registry.withdraw("S-1", "churn", channel="web", source="x")
    assert _run("verify", "--indexes", *h).exit_code == 0
    db = home / "ledger.db"
    tamper(db, "UPDATE consent_state SET status = 'granted'")
    tamper(db, "DELETE FROM event_index WHERE kind = 'dataset' AND seq = 7")
    checked = _run("verify", "--indexes", *h)
    assert checked.exit_code == 1, checked.output
    assert "derived tables differ from the chain" in checked.output
    assert "event_index: missing dataset=customers for event 7" in checked.output
    assert "stored status 'granted' (chain: 'withdrawn')" in checked.output
    as_json = json.loads(_run("verify", "--indexes", "--json", *h).stdout)
    assert as_json["ok"] and len(as_json["indexes"]["problems"]) == 2
    repaired = _run("reindex", *h)
    assert repaired.exit_code == 0 and "2 differences repaired" in repaired.output
    assert _run("verify", "--indexes", *h).exit_code == 0
    assert "withdrawn" in _run("consent", "show", "S-1", *h).output
    with Ledger.open(home / "ledger.db", read_only=True) as ledger:  # the repair is on the record
        rebuilt = ledger.events(event_type=EventType.INDEXES_REBUILT)
    assert [e.payload["differences_repaired"] for e in rebuilt] == [2]

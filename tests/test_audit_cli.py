"""`fedpact audit …` commands, run through typer's CliRunner against `audit_app`."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest
from typer.testing import CliRunner

from fedpact.audit import EventType, Ledger
from fedpact.audit.verifier import main as verifier_main
from fedpact.service.cli_audit import audit_app

runner = CliRunner()
ACCESS = {"node": "bank-a", "dataset": "customers", "rows": 5, "columns": ["age"], "purpose": "churn"}


def _run(*args: str):
    return runner.invoke(audit_app, list(args), env={"COLUMNS": "200"})


@pytest.fixture
def home(tmp_path: Path) -> Path:
    with Ledger.open(tmp_path / "ledger.db") as ledger:
        ledger.append(EventType.JOB_CREATED, {"task": "churn", "partners": ["bank-a"], "purpose": "churn"},
                      actor="coordinator", job_id="job-1")
        for rows in (5, 6, 7):
            ledger.append(EventType.DATA_ACCESSED, {**ACCESS, "rows": rows}, actor="node:bank-a",
                          job_id="job-1")
        ledger.append(EventType.JOB_FINISHED, {"metrics": {}, "epsilon": 1.0}, actor="coordinator",
                      job_id="job-1")
    return tmp_path


def test_verify_ok_and_broken_naming_the_event(home: Path) -> None:
    ok = _run("verify", "--home", str(home))
    assert ok.exit_code == 0 and "chain verified" in ok.output and "5 events" in ok.output
    db = sqlite3.connect(home / "ledger.db")
    for (name,) in db.execute("SELECT name FROM sqlite_master WHERE type='trigger'").fetchall():
        db.execute(f"DROP TRIGGER {name}")
    db.execute("UPDATE ledger_events SET payload = replace(payload, '\"rows\":6', '\"rows\":60')")
    db.commit()
    db.close()
    broken = _run("verify", "--home", str(home))
    assert broken.exit_code == 1 and "chain broken at event 3" in broken.output
    as_json = _run("verify", "--home", str(home), "--json")
    assert as_json.exit_code == 1 and json.loads(as_json.stdout)["first_bad_seq"] == 3


def test_events_keeps_its_options(home: Path) -> None:
    listed = _run("events", "--home", str(home), "--job", "job-1", "--type", "data.accessed",
                  "--limit", "2", "--json")
    assert listed.exit_code == 0
    assert [json.loads(line)["payload"]["rows"] for line in listed.stdout.splitlines()] == [6, 7]
    table = _run("events", "--home", str(home))
    assert "5 events shown" in table.output
    bad = _run("events", "--home", str(home), "--type", "data.acessed")
    assert bad.exit_code == 2 and "unknown event type 'data.acessed'" in bad.output
    missing = _run("events", "--home", str(home / "nope"))
    assert missing.exit_code == 2 and "no ledger at" in missing.output


def test_prove_gives_a_bundle_the_standalone_verifier_accepts(home: Path) -> None:
    out = home / "proof.json"
    result = _run("prove", "3", "--home", str(home), "--out", str(out))
    assert result.exit_code == 0, result.output
    assert json.loads(out.read_text())["event"]["seq"] == 3
    assert verifier_main([str(out), "--public-key", str(home / "ledger.db.pub")]) == 0
    unknown = _run("prove", "deadbeef", "--home", str(home))
    assert unknown.exit_code == 2 and "no ledger event 'deadbeef'" in unknown.output


def test_consent_dsar_query_and_record_commands(home: Path, tmp_path: Path) -> None:
    csv_path = tmp_path / "consents.csv"
    csv_path.write_text(
        "subject_id,purpose,status,channel,legal_basis,notice_version,timestamp,email\n"
        "C-1,churn,granted,web,consent,v1,2025-01-01T00:00:00Z,c1@example.org\n"
        "C-2,churn,granted,web,consent,v1,not-a-date,\n"
    )
    imported = _run("consent", "import", str(csv_path), "--home", str(home))
    assert imported.exit_code == 1  # one bad row: reported, good one kept
    assert "1 recorded" in imported.output and "line 3, timestamp" in imported.output
    granted = _run("consent", "grant", "C-9", "marketing", "--channel", "app", "--legal-basis",
                   "consent", "--notice-version", "v2", "--source", "app", "--home", str(home))
    assert granted.exit_code == 0, granted.output
    withdrawn = _run("consent", "withdraw", "C-1", "churn", "--channel", "email", "--source",
                     "support", "--home", str(home))
    assert withdrawn.exit_code == 0
    shown = _run("consent", "show", "C-1", "--home", str(home))
    assert "withdrawn" in shown.output

    access = _run("dsar", "access", "C-1", "--home", str(home))
    assert access.exit_code == 0 and json.loads(access.stdout)["personal_data"]["email"] == "c1@example.org"
    as_csv = _run("dsar", "access", "C-1", "--home", str(home), "--format", "csv")
    assert as_csv.stdout.startswith("seq,timestamp,event_type")
    report = home / "c1-access.json"  # a subject's personal data: readable by its owner only
    assert _run("dsar", "access", "C-1", "--home", str(home), "--out", str(report)).exit_code == 0
    assert json.loads(report.read_text())["personal_data"]["email"] == "c1@example.org"
    assert report.stat().st_mode & 0o777 == 0o600
    refused = _run("dsar", "erase", "C-1", "--home", str(home))
    assert refused.exit_code == 2 and "--yes" in refused.output
    erased = _run("dsar", "erase", "C-1", "--yes", "--home", str(home))
    assert erased.exit_code == 0 and "keys destroyed" in erased.output
    after = _run("dsar", "access", "C-1", "--home", str(home))
    assert json.loads(after.stdout)["personal_data"] == {}

    queried = _run("query", "--home", str(home), "--subject", "C-1", "--format", "json")
    kinds = [json.loads(line)["event_type"] for line in queried.stdout.splitlines()]
    assert kinds[:2] == ["consent.granted", "consent.withdrawn"] and "subject.erased" in kinds
    as_csv = _run("query", "--home", str(home), "--dataset", "customers", "--format", "csv",
                  "--limit", "2")
    assert len(as_csv.stdout.strip().splitlines()) == 3 and "--after" in as_csv.output

    md = _run("record", "job-1", "--home", str(home))
    assert md.exit_code == 0 and "# Record of processing (GDPR Art. 30) — job job-1" in md.stdout
    html_out = home / "pia.html"
    pia = _run("record", "job-1", "--pipl", "--format", "html", "--home", str(home), "--out", str(html_out))
    assert pia.exit_code == 0 and "PIPL Art. 55" in html_out.read_text()
    assert _run("verify", "--home", str(home)).exit_code == 0


def test_four_eyes_export_commands(home: Path) -> None:
    from fedpact.audit.consent import ConsentRegistry
    from fedpact.audit.exports import ExportApprovals

    with Ledger.open(home / "ledger.db") as ledger:
        registry = ConsentRegistry(ledger)
        for subject in ("A", "B"):
            registry.grant(subject, "churn", channel="web", legal_basis="consent",
                           notice_version="v1", source="x")
        ExportApprovals(ledger).grant_role("admin", "admin", granted_by="admin", bootstrap=True)
        ExportApprovals(ledger).grant_role("carol", "dpo", granted_by="admin")
    made = _run("export", "request", "--requested-by", "bob", "--purpose", "audit", "--type",
                "consent.granted", "--home", str(home))
    request_id = made.output.split(":")[0].strip()
    assert "pending (2 subjects)" in made.output
    early = _run("export", "download", request_id, "--by", "bob", "--home", str(home))
    assert early.exit_code == 2 and "needs approval" in early.output
    self_approval = _run("export", "approve", request_id, "--approver", "bob", "--home", str(home))
    assert self_approval.exit_code == 2
    assert _run("export", "approve", request_id, "--approver", "carol", "--home", str(home)).exit_code == 0
    done = _run("export", "download", request_id, "--by", "bob", "--home", str(home))
    assert done.exit_code == 0 and done.stdout.count("consent.granted") == 2

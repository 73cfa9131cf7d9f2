"""Issue #15, finding 10: subject ids and purposes are normalised the same way for grants,
withdrawals, checks and pseudonyms, and a withdrawal that names no known consent says so."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest
from files import write_csv
from ledger_tamper import write_legacy_ledger
from typer.testing import CliRunner

from fedpact.audit import EventType, Ledger, LedgerError
from fedpact.audit.consent import ConsentRegistry
from fedpact.audit.subjects import SubjectKeys

PURPOSE = "model_training"


@pytest.fixture
def registry(tmp_path: Path):
    with Ledger.open(tmp_path / "ledger.db") as ledger:
        yield ConsentRegistry(ledger)


def _grant(registry: ConsentRegistry, subject: str, purpose: str = PURPOSE):
    return registry.grant(subject, purpose, channel="web", legal_basis="consent",
                          notice_version="v1", source="crm")


def _withdraw(registry: ConsentRegistry, subject: str, purpose: str = PURPOSE):
    return registry.withdraw(subject, purpose, channel="web", source="crm")


@pytest.mark.parametrize(("granted", "withdrawn"), [
    ("11", "１１"),            # fullwidth digits
    ("9", "9\u200b"),          # a zero-width space
    ("9", "\ufeff 9 "),        # a byte-order mark and spaces
    ("C-7", "c-7"),            # case: ids are case-insensitive by default
    ("ab cd", "AB\u00a0 cd"),  # a no-break space and a run of spaces
])
def test_a_withdrawal_spelled_differently_applies(registry: ConsentRegistry, granted: str,
                                                  withdrawn: str) -> None:
    _grant(registry, granted)
    assert registry.allowed([granted], PURPOSE).tolist() == [True]
    result = _withdraw(registry, withdrawn)
    assert result.warnings == ()
    assert registry.allowed([granted, withdrawn], PURPOSE).tolist() == [False, False]
    assert registry.pseudonym(granted) == registry.pseudonym(withdrawn)


@pytest.mark.parametrize("spelling", ["Model_Training", "model-training", " MODEL  TRAINING ",
                                      "ｍｏｄｅｌ＿ｔｒａｉｎｉｎｇ", "model_train\u200bing"])
def test_a_purpose_spelled_differently_is_the_same_purpose(registry: ConsentRegistry,
                                                           spelling: str) -> None:
    _grant(registry, "S-1")
    result = _withdraw(registry, "S-1", spelling)
    assert result.warnings == ()
    assert result.payload["purpose"] == PURPOSE  # recorded under the purpose as it was granted
    assert registry.allowed(["S-1"], PURPOSE).tolist() == [False]
    assert registry.allowed(["S-1"], spelling).tolist() == [False]
    assert [r.status for r in registry.current("S-1", spelling)] == ["withdrawn"]


def test_a_withdrawal_naming_no_known_consent_warns(registry: ConsentRegistry) -> None:
    _grant(registry, "13")
    _grant(registry, "14", "marketing")
    unknown = _withdraw(registry, "013")  # leading zeros are part of a text id
    assert len(unknown.warnings) == 1 and "no consent" in unknown.warnings[0]
    assert registry.allowed(["13"], PURPOSE).tolist() == [True]
    other = _withdraw(registry, "14")
    assert other.warnings and "marketing" in other.warnings[0]  # names the purposes it has
    assert registry.ledger.count(None) == 4  # both withdrawals are recorded all the same


def test_cli_prints_the_warning(tmp_path: Path) -> None:
    from fedpact.service.cli import app

    runner = CliRunner()
    home = str(tmp_path)
    granted = runner.invoke(app, ["audit", "consent", "grant", "C-7", "Model_Training",
                                  "--channel", "web", "--legal-basis", "consent",
                                  "--notice-version", "v1", "--source", "crm", "--home", home])
    assert granted.exit_code == 0, granted.output
    same = runner.invoke(app, ["audit", "consent", "withdraw", "c-7", "model training",
                               "--channel", "web", "--source", "crm", "--home", home])
    assert same.exit_code == 0 and "warning" not in same.output.lower()
    unknown = runner.invoke(app, ["audit", "consent", "withdraw", "C-8", "model training",
                                  "--channel", "web", "--source", "crm", "--home", home])
    assert unknown.exit_code == 0 and "warning" in unknown.output.lower()
    assert "no consent" in unknown.output


def test_csv_withdrawals_naming_no_known_consent_are_listed(registry: ConsentRegistry,
                                                            tmp_path: Path) -> None:
    registry.grant("A-1", PURPOSE, channel="web", legal_basis="consent", notice_version="v1",
                   source="crm", at="2025-01-01T00:00:00+00:00")
    path = write_csv(tmp_path / "consent.csv",
                     ["subject_id", "purpose", "status", "channel", "timestamp"],
                     [["a-1", "Model Training", "withdrawn", "app", "2025-02-01T00:00:00+00:00"],
                      ["Z-9", "model_training", "withdrawn", "app", "2025-02-01T00:00:00+00:00"]])
    report = registry.import_csv(path)
    assert report.ok and report.withdrawn == 2
    assert [w.line for w in report.warnings] == [3] and "no consent" in report.warnings[0].message
    assert "no consent" in report.summary()
    assert registry.allowed(["A-1"], PURPOSE).tolist() == [False]


def test_the_id_rule_is_declared_in_the_registry(tmp_path: Path) -> None:
    with Ledger.open(tmp_path / "new.db") as ledger:
        keys = SubjectKeys.of(ledger)
        assert keys.id_rule == "nfkc-casefold/1"
        keys.declare_id_rule("nfkc/1")  # case-sensitive ids, declared before any subject
        registry = ConsentRegistry(ledger)
        assert registry.pseudonym("C-7") != registry.pseudonym("c-7")
        assert registry.pseudonym("Ｃ-７") == registry.pseudonym("C-7")
        _grant(registry, "C-7")
        with pytest.raises(LedgerError, match="already pseudonymised"):
            keys.declare_id_rule("nfkc-casefold/1")
    with Ledger.open(tmp_path / "new.db", read_only=True) as ledger:
        assert SubjectKeys.of(ledger).id_rule == "nfkc/1"


def test_a_ledger_upgraded_with_subjects_keeps_its_rule(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    write_legacy_ledger(path, [("consent.expired", "registry", None,
                                {"subject": "ps_" + "0" * 32, "purpose": "churn",
                                 "timestamp": "2024-01-01T00:00:00+00:00"})])
    with Ledger.open(path) as ledger:
        registry = ConsentRegistry(ledger)
        assert SubjectKeys.of(ledger).id_rule == "nfc/1"  # its pseudonyms are in the chain
        assert registry.pseudonym("C-7") != registry.pseudonym("c-7")
        ledger.append(EventType.JOB_FAILED, {"reason": "x"}, actor="server")
    with sqlite3.connect(path) as connection:
        assert connection.execute("SELECT value FROM ledger_meta WHERE key = "
                                  "'subject_id_rule'").fetchone() == ("nfc/1",)

"""Consent is enforced by default, and the coordinator's ledger holds no subject pseudonym it can
resolve: the subjects each job used stay in each partner's own registry, where erasure finds them.

One module-scoped pair of simulated IBM Telco jobs (1 round of DP-SGD, no membership audit, for
speed) in one run folder: the first with the default settings, the second with consent off.
"""

from __future__ import annotations

import sqlite3

import pytest
from typer.testing import CliRunner

from fedpact.audit import EventType, Ledger
from fedpact.audit.consent import ConsentRegistry
from fedpact.audit.dsar import SubjectRequests
from fedpact.audit.records import processing_record
from fedpact.audit.subjects import SubjectKeys
from fedpact.federation.job import JobConfig
from fedpact.federation.node_data import (
    CONSENT_ENFORCED,
    partner_registry_path,
    simulated_partner,
    simulated_registries,
)
from fedpact.federation.simulation import run_simulated_job
from fedpact.models.datasets import load_dataset
from fedpact.service.cli_audit import audit_app
from fedpact.service.demo import ensure_budgets, ensure_consents

pytestmark = pytest.mark.slow
PURPOSE = "churn_model_training"


def _job(home, **kw) -> JobConfig:
    return JobConfig(dataset="telco", partitioning="segment", rounds=1, batch_size=512,
                     learning_rate=0.3, membership_audit=False, home=str(home),
                     purpose=PURPOSE, **kw)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    home = tmp_path_factory.mktemp("subject-privacy")
    default = _job(home)  # no require_consent given
    ensure_budgets(str(home), default)
    imported = ensure_consents(default)  # each partner grants in its own registry
    assert imported.total == 7043 and len(imported.granted) == 3
    partner = simulated_partner(default, 0)
    withdrawn = str(partner.train.ids[0])  # a subject in partner 0's training rows
    with Ledger.open(partner_registry_path({}, default, partner.partner)) as registry:
        ConsentRegistry(registry).withdraw(withdrawn, PURPOSE, channel="web",
                                           source="preference centre")
    enforced = run_simulated_job(default)
    off = _job(home, require_consent=False)
    unchecked = run_simulated_job(off)
    return {"home": home, "default": default, "off": off, "enforced": enforced,
            "unchecked": unchecked, "withdrawn": withdrawn, "partner": partner.partner}


def _trained_rows(ledger: Ledger, job_id: str) -> dict[str, int]:
    return {e.payload["node"]: e.payload["rows"] for e in ledger.events(
        job_id=job_id, event_type=EventType.DATA_ACCESSED) if e.payload["phase"] == "train"}


def test_consent_is_enforced_by_default_and_a_withdrawal_drops_the_row(runs) -> None:
    job, off, partner = runs["default"], runs["off"], runs["partner"]
    assert JobConfig().require_consent is True and job.require_consent is True
    with Ledger.open(job.ledger_path) as ledger:
        excluded = {e.payload["dataset"]: (e.payload["excluded"], e.payload["total"])
                    for e in ledger.events(job_id=job.job_id, event_type=EventType.DATA_EXCLUDED)}
        assert sum(total for _, total in excluded.values()) == 7043
        assert {name: ex for name, (ex, _) in excluded.items() if ex} == {partner: 1}
        used = ledger.events(job_id=job.job_id, event_type=EventType.SUBJECTS_USED)
        assert [e.payload["consent"] for e in used] == [CONSENT_ENFORCED] * 3
        assert sum(e.payload["subjects"] for e in used) == 7042
        with_consent, without = _trained_rows(ledger, job.job_id), _trained_rows(ledger, off.job_id)
        record = processing_record(ledger, job.job_id)
    assert with_consent[partner] == without[partner] - 1
    assert sum(with_consent.values()) == sum(without.values()) - 1
    assert {p.name: p.train_rows for p in runs["enforced"].partners}[partner] == without[partner] - 1
    assert record.consent_checked


def test_a_job_with_consent_explicitly_off_says_so_in_its_events(runs) -> None:
    off = runs["off"]
    with Ledger.open(off.ledger_path) as ledger:
        [created] = ledger.events(job_id=off.job_id, event_type=EventType.JOB_CREATED)
        assert created.payload["config"]["require_consent"] is False
        assert not ledger.events(job_id=off.job_id, event_type=EventType.DATA_EXCLUDED)
        used = ledger.events(job_id=off.job_id, event_type=EventType.SUBJECTS_USED)
        assert len(used) == 3 and sum(e.payload["subjects"] for e in used) == 7043
        assert all(e.payload["consent"].startswith("off: the job set require_consent=false")
                   for e in used)
        record = processing_record(ledger, off.job_id)
    assert not record.consent_checked
    assert any("No consent check was applied" in line for line in record.safeguards)


def test_the_curious_coordinator_resolves_no_guessed_subject(runs) -> None:
    """With the coordinator's ledger and its keys only, guess the first 200 Telco ids and look for
    their pseudonyms anywhere in it: in data.subjects_used payloads, in job_subjects (which would
    name their partner), in any event or index. Nothing resolves."""
    home = runs["home"]
    guesses = [str(i) for i in load_dataset("telco").ids.tolist()[:200]]
    with Ledger.open(home / "ledger.db") as ledger:
        pseudonyms = set(SubjectKeys.of(ledger).pseudonyms(guesses))
        payloads = [e.payload for e in ledger.events(event_type=EventType.SUBJECTS_USED)]
        assert len(payloads) == 6  # 2 jobs x 3 partners: counts and commitments only
        assert not [p for p in payloads if pseudonyms & set(map(str, p.values()))]
    db = sqlite3.connect(home / "ledger.db")
    try:
        to_partner = db.execute("SELECT subject, dataset FROM job_subjects").fetchall()
        texts = [row[0] for row in db.execute("SELECT payload FROM ledger_events")]
        indexed = {row[0] for row in db.execute("SELECT value FROM event_index")}
        consents = {row[0] for row in db.execute("SELECT subject FROM consent_state")}
    finally:
        db.close()
    resolved = {p for p in pseudonyms
                if p in indexed or p in consents or any(p in text for text in texts)
                or any(p == subject for subject, _ in to_partner)}
    assert resolved == set() and to_partner == []
    raw = b"".join(path.read_bytes() for path in home.glob("ledger.db*"))
    assert not [p for p in pseudonyms if p.encode() in raw]
    # the pseudonyms are where they belong: in each partner's own registry, under its own key
    found = 0
    for path in simulated_registries(home):
        with Ledger.open(path) as registry:
            own = SubjectKeys.of(registry).pseudonyms(guesses)
            with registry.store.read() as connection:
                held = {r[0] for r in connection.exec_driver_sql("SELECT subject FROM job_subjects")}
            found += len(set(own) & held)
            assert not set(own) & pseudonyms  # another key: no common pseudonym
    assert found == 200


def test_erasure_finds_the_models_in_the_partner_registries(runs) -> None:
    job, off = runs["default"], runs["off"]
    home = runs["home"]
    subject = str(simulated_partner(job, 1).train.ids[3])
    result = CliRunner().invoke(audit_app, ["dsar", "erase", subject, "--yes", "--home", str(home)])
    assert result.exit_code == 0, result.output
    assert f"{job.job_id}/model" in result.output and f"{off.job_id}/model" in result.output
    assert "partner registries searched: 3" in result.output
    with Ledger.open(home / "ledger.db") as ledger:
        flagged = {e.job_id for e in ledger.events(event_type=EventType.MODEL_FLAGGED)}
        [erased] = ledger.events(event_type=EventType.SUBJECT_ERASED)
    assert flagged == {job.job_id, off.job_id}
    assert sorted(erased.payload["models_flagged"]) == sorted(
        [f"{job.job_id}/model", f"{off.job_id}/model"])
    assert "untraceable_models" not in erased.payload
    partner = simulated_partner(job, 1).partner
    with Ledger.open(partner_registry_path({}, job, partner)) as registry:
        consent = ConsentRegistry(registry)
        assert consent.allowed([subject], PURPOSE).tolist() == [False]  # withdrawn there
        assert consent.subjects.is_erased(consent.pseudonym(subject))


def test_erasure_without_the_partner_registries_reports_them_unsearched(runs) -> None:
    job, off, home = runs["default"], runs["off"], runs["home"]
    subject = str(simulated_partner(job, 2).train.ids[5])
    with Ledger.open(home / "ledger.db") as ledger:
        report = SubjectRequests(ledger).erase(subject)
    assert report.models_flagged == [] and report.registries == []
    assert sorted(report.untraceable_models) == sorted(
        [f"{job.job_id}/model", f"{off.job_id}/model"])
    assert "partner's own registry, which was not searched" in report.note

"""Consent is enforced in every job's data loader: withdraw it and the subject's rows are gone."""

from __future__ import annotations

import csv

import pytest

from fedpact.audit import EventType, Ledger
from fedpact.audit.consent import ConsentRegistry
from fedpact.errors import FedpactError
from fedpact.federation.coordinator import partner_datasets
from fedpact.federation.job import JobConfig
from fedpact.federation.node_data import load_node_data
from fedpact.federation.simulation import run_simulated_job
from fedpact.models.datasets import load_dataset
from fedpact.privacy.budget import PrivacyBudgets

pytestmark = pytest.mark.slow
PURPOSE = "churn_model_training"


@pytest.fixture(scope="module")
def consent_home(tmp_path_factory):
    """A ledger where every telco customer granted consent for churn modelling (CSV import)."""
    home = tmp_path_factory.mktemp("consent-home")
    ids = load_dataset("telco").ids.tolist()
    export = home / "cmp-export.csv"
    with export.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["subject_id", "purpose", "status", "channel", "timestamp", "legal_basis",
                    "notice_version"])
        for sid in ids:
            w.writerow([sid, PURPOSE, "granted", "web", "2026-01-15T10:00:00+00:00", "consent", "v3"])
    with Ledger.open(home / "ledger.db") as ledger:
        report = ConsentRegistry(ledger).import_csv(export)
        assert report.ok and report.granted == len(ids)
    return home, ids


def _job(home, **kw) -> JobConfig:
    return JobConfig(dataset="telco", partitioning="segment", rounds=2, batch_size=256,
                     learning_rate=0.3, home=str(home), purpose=PURPOSE, require_consent=True, **kw)


def test_withdrawn_subjects_are_excluded_and_the_ledger_shows_it(consent_home):
    """Withdraw 300 subjects, run a federated job: their rows are never loaded, counts recorded."""
    home, ids = consent_home
    withdrawn = set(ids[::23][:300])
    with Ledger.open(home / "ledger.db") as ledger:
        registry = ConsentRegistry(ledger)
        for sid in withdrawn:
            registry.withdraw(sid, PURPOSE, channel="web", source="preference centre")
        job = _job(home)
        for name in partner_datasets(job):
            PrivacyBudgets(ledger).set(name, 3.0, 1e-4, actor="partner_admin:test")
    result = run_simulated_job(job)
    assert 0 < result.epsilon <= 1.0

    used = set()
    for i in range(3):
        node = load_node_data({"partition-id": i}, job)
        used |= set(node.train.ids) | set(node.test.ids)
    assert not used & withdrawn
    assert len(used) == len(ids) - len(withdrawn)

    with Ledger.open(home / "ledger.db") as ledger:
        excluded = ledger.events(job_id=job.job_id, event_type=EventType.DATA_EXCLUDED.value)
        assert sorted(e.payload["dataset"] for e in excluded) == sorted(p.name for p in result.partners)
        assert sum(e.payload["excluded"] for e in excluded) == len(withdrawn)
        assert sum(e.payload["total"] for e in excluded) == len(ids)
        rows_read = {e.payload["node"]: e.payload["rows"] for e in ledger.events(
            job_id=job.job_id, event_type=EventType.DATA_ACCESSED.value) if e.payload["phase"] == "train"}
        assert sum(rows_read.values()) == sum(p.train_rows for p in result.partners)
        assert ledger.verify().ok


def test_consent_for_another_purpose_does_not_count(consent_home):
    """A grant for churn modelling does not allow audience matching (consent per purpose)."""
    home, _ = consent_home
    job = _job(home)
    job.purpose = "audience_matching"
    with pytest.raises(FedpactError, match="no row has a valid consent"):
        load_node_data({"partition-id": 0}, job)


def test_consent_needs_an_id_column(tmp_path, shared_data):
    """Bank marketing has no customer id: asking for consent enforcement says so clearly."""
    job = JobConfig(dataset="bank", home=str(tmp_path), require_consent=True)
    with pytest.raises(FedpactError, match="subject id column"):
        load_node_data({"partition-id": 0}, job)

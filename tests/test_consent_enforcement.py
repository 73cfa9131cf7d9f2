"""Consent is enforced by default in every job's data loader, against each partner's own registry:
withdraw it and the subject's rows are gone."""

from __future__ import annotations

import csv

import pytest

from fedpact.audit import EventType, Ledger
from fedpact.audit.consent import ConsentRegistry
from fedpact.audit.records import processing_record
from fedpact.errors import FedpactError
from fedpact.federation.coordinator import partner_datasets
from fedpact.federation.job import JobConfig
from fedpact.federation.node_data import (
    CONSENT_NOT_CHECKABLE,
    load_node_data,
    partner_registry_path,
    simulated_partner,
)
from fedpact.federation.simulation import run_simulated_job
from fedpact.models.datasets import load_dataset
from fedpact.privacy.budget import PrivacyBudgets

pytestmark = pytest.mark.slow
PURPOSE = "churn_model_training"


@pytest.fixture(scope="module")
def consent_home(tmp_path_factory):
    """Each simulated telco partner imported its customers' consent for churn modelling (a CMP
    CSV export) into its own registry (nodes/<partner>/ledger.db, not the coordinator's)."""
    home = tmp_path_factory.mktemp("consent-home")
    job = _job(home)
    ids, owner = [], {}
    for index in range(job.num_partitions):
        node = simulated_partner(job, index)
        mine = node.train.ids.tolist() + node.test.ids.tolist()
        export = home / f"cmp-export-{index}.csv"
        with export.open("w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(["subject_id", "purpose", "status", "channel", "timestamp", "legal_basis",
                        "notice_version"])
            for sid in mine:
                w.writerow([sid, PURPOSE, "granted", "web", "2026-01-15T10:00:00+00:00", "consent",
                            "v3"])
        with Ledger.open(partner_registry_path({}, job, node.partner)) as ledger:
            report = ConsentRegistry(ledger).import_csv(export)
            assert report.ok and report.granted == len(mine)
        ids += mine
        owner.update(dict.fromkeys(mine, node.partner))
    assert sorted(ids) == sorted(load_dataset("telco").ids.tolist())
    return home, ids, owner


def _job(home, **kw) -> JobConfig:
    return JobConfig(dataset="telco", partitioning="segment", rounds=2, batch_size=256,
                     learning_rate=0.3, home=str(home), purpose=PURPOSE, **kw)


def test_withdrawn_subjects_are_excluded_and_the_ledger_shows_it(consent_home):
    """Withdraw 300 subjects, run a federated job with the default settings (consent enforced):
    their rows are never loaded, counts recorded in the job's ledger and in each registry."""
    home, ids, owner = consent_home
    withdrawn = set(ids[::23][:300])
    job = _job(home)
    assert job.require_consent  # the default
    for partner in sorted(set(owner.values())):
        with Ledger.open(partner_registry_path({}, job, partner)) as ledger:
            registry = ConsentRegistry(ledger)
            for sid in withdrawn:
                if owner[sid] == partner:
                    registry.withdraw(sid, PURPOSE, channel="web", source="preference centre")
    with Ledger.open(home / "ledger.db") as ledger:
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
    for partner in sorted(set(owner.values())):
        with Ledger.open(partner_registry_path({}, job, partner)) as ledger:
            [mine] = ledger.events(job_id=job.job_id, event_type=EventType.DATA_EXCLUDED.value)
            assert mine.payload["excluded"] == sum(owner[s] == partner for s in withdrawn)
            assert ledger.verify().ok


def test_consent_for_another_purpose_does_not_count(consent_home):
    """A grant for churn modelling does not allow audience matching (consent per purpose)."""
    home, _, _ = consent_home
    job = _job(home)
    job.purpose = "audience_matching"
    with pytest.raises(FedpactError, match="no row has a valid consent.*fedpact audit consent import"):
        load_node_data({"partition-id": 0}, job)


def test_a_dataset_without_subject_ids_proceeds_and_says_consent_was_not_checkable(tmp_path):
    """Caravan has no customer id: with consent enforcement on (the default) its rows cannot be
    checked; the job proceeds and its events say so — never that consent was checked."""
    job = JobConfig(dataset="caravan", home=str(tmp_path), purpose=PURPOSE)
    assert job.require_consent
    with Ledger.open(job.ledger_path) as ledger:
        ledger.append(EventType.JOB_CREATED, {"task": "caravan", "partners": partner_datasets(job),
                                              "purpose": PURPOSE, "config": job.as_dict()},
                      actor="coordinator", job_id=job.job_id)
    for index in range(job.num_partitions):
        node = load_node_data({"partition-id": index}, job)
        assert len(node.train) > 0
    with Ledger.open(job.ledger_path) as ledger:
        used = ledger.events(job_id=job.job_id, event_type=EventType.SUBJECTS_USED)
        assert len(used) == job.num_partitions
        assert all(e.payload["traceable"] is False and e.payload["consent"] == CONSENT_NOT_CHECKABLE
                   for e in used)
        assert not ledger.events(job_id=job.job_id, event_type=EventType.DATA_EXCLUDED)
        assert not processing_record(ledger, job.job_id).consent_checked
    assert not list((tmp_path / "nodes").glob("*/ledger.db"))  # no registry made for nothing

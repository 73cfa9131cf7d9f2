"""Issue #13 item 5.1: secure aggregation is claimed only where it ran.

On Flower's deployment engine the job bundle holds fedpact's plain (Message-API) apps, so a job
asking for SecAgg+ there would have the coordinator see every partner's update. Such a job is
refused: at request time by a coordinator service that runs jobs on a SuperLink, and by the
deployment engine itself (a job queued before the service was restarted with --superlink, or one
submitted with `submit_job`) — before any app bundle is written, any node is contacted or any row
is read. The Art. 30 record states secure aggregation only when the job's events show it ran.
No SuperLink and no Flower run here: every refusal happens before one would be needed.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from fedpact.audit import EventType, Ledger
from fedpact.audit.records import processing_record
from fedpact.federation.coordinator import partner_datasets
from fedpact.federation.deployment import Connection, DeploymentError, DeploymentRun, submit_job
from fedpact.federation.job import JobConfig
from fedpact.privacy.budget import PrivacyBudgets
from fedpact.service.api.app import create_app
from fedpact.service.api.testing import seed_consortium

TELCO = partner_datasets(JobConfig(dataset="telco", partitioning="segment", num_partitions=3))
JOB = {"dataset": "telco", "purpose": "churn_model_training", "rounds": 2}
UNREACHABLE = "127.0.0.1:9"  # nothing listens there: a refusal must not need the SuperLink


def deployment_run(home: Path) -> DeploymentRun:
    return DeploymentRun(Connection(UNREACHABLE, None, Path(home) / "flwr"), timeout=5)


def kinds_of(home: Path, job_id: str) -> list[str]:
    with Ledger.open(Path(home) / "ledger.db") as ledger:
        return [e.event_type for e in ledger.events(job_id=job_id)]


def test_a_deployment_coordinator_refuses_secure_aggregation_at_request_time(tmp_path):
    app = create_app(tmp_path, run=deployment_run(tmp_path), start_worker=False)
    people = seed_consortium(app.state.service, TELCO)
    with TestClient(app) as client:
        r = client.post("/api/v1/jobs", json={**JOB, "secure_aggregation": True},
                        headers=people.scientist.headers)
        assert r.status_code == 422, r.text
        detail = r.json()["detail"]
        assert "secure aggregation" in detail and "deployment engine" in detail
        assert "coordinator would see each partner's update" in detail
        assert client.get("/api/v1/jobs", headers=people.scientist.headers).json() == []
        # without secure aggregation the same request is accepted
        r = client.post("/api/v1/jobs", json=JOB, headers=people.scientist.headers)
        assert r.status_code == 201, r.text
        assert r.json()["secure_aggregation"] is False
    ledger = app.state.service.ledger
    assert len(ledger.events(event_type=EventType.JOB_REQUESTED)) == 1


def test_a_simulation_coordinator_accepts_and_records_secure_aggregation(tmp_path):
    app = create_app(tmp_path, start_worker=False)
    people = seed_consortium(app.state.service, TELCO)
    with TestClient(app) as client:
        r = client.post("/api/v1/jobs", json={**JOB, "secure_aggregation": True},
                        headers=people.scientist.headers)
        assert r.status_code == 201, r.text
        job = r.json()
    assert job["secure_aggregation"] is True
    view = app.state.service.board.get(job["job_id"])
    assert view.config["secure_aggregation"] is True
    [requested] = app.state.service.ledger.events(job_id=job["job_id"],
                                                  event_type=EventType.JOB_REQUESTED)
    assert requested.payload["secure_aggregation"] is True


def test_a_queued_secure_aggregation_job_is_refused_by_the_deployment_engine(tmp_path):
    """Requested and approved on a simulation coordinator, then the service restarts with
    --superlink: the job is refused at admission — no bundle, no node, no row read."""
    sim = create_app(tmp_path, start_worker=False)
    service = sim.state.service
    people = seed_consortium(service, TELCO)
    with TestClient(sim) as client:
        for partner in TELCO:
            PrivacyBudgets(service.ledger).set(partner, 5.0, 1e-4, actor=f"admin:{partner}")
        r = client.post("/api/v1/jobs", json={**JOB, "secure_aggregation": True},
                        headers=people.scientist.headers)
        assert r.status_code == 201, r.text
        jid = r.json()["job_id"]
        for partner in TELCO:
            r = client.post(f"/api/v1/jobs/{jid}/approve", json={"partner": partner},
                            headers=people.admins[partner].headers)
            assert r.status_code == 200, r.text
        assert service.board.get(jid).status == "queued"
    service.close()

    deployed = create_app(tmp_path, run=deployment_run(tmp_path))
    with TestClient(deployed) as client:
        board = deployed.state.service.board
        deadline = time.monotonic() + 30
        while board.get(jid).status in ("queued", "running") and time.monotonic() < deadline:
            time.sleep(0.1)
        job = client.get(f"/api/v1/jobs/{jid}", headers=people.scientist.headers).json()
    assert job["status"] == "refused", job
    assert "secure aggregation" in job["reason"] and "deployment engine" in job["reason"]
    kinds = kinds_of(tmp_path, jid)
    assert kinds[-1] == "job.refused"  # refused at admission, before it was started
    for nothing_ran in ("job.started", "job.created", "data.accessed", "data.subjects_used", "round.aggregated",
                        "privacy.spent", "job.finished"):
        assert nothing_ran not in kinds
    with Ledger.open(tmp_path / "ledger.db") as ledger:
        [refused] = ledger.events(job_id=jid, event_type=EventType.JOB_REFUSED)
        assert "secure aggregation" in refused.payload["reason"]
        assert refused.payload["config"]["secure_aggregation"] is True
        assert ledger.verify().ok
        record = processing_record(ledger, jid).to_markdown()
    assert "the coordinator sees only the sum" not in record
    assert not (tmp_path / "jobs" / jid / "app").exists()  # no Flower app bundle was written


@pytest.mark.timeout(120)
def test_submit_job_refuses_secure_aggregation_before_writing_a_bundle(tmp_path):
    job = JobConfig(dataset="telco", rounds=1, secure_aggregation=True, home=str(tmp_path))
    connection = Connection(UNREACHABLE, None, tmp_path / "flwr")
    with pytest.raises(DeploymentError, match="secure aggregation.*deployment engine"):
        submit_job(connection, job)
    assert not (job.job_dir / "app").exists()
    with Ledger.open(job.ledger_path) as ledger:
        kinds = [e.event_type for e in ledger.events(job_id=job.job_id)]
    assert kinds == ["job.refused"]
    assert DeploymentRun.supports_secure_aggregation is False


# --------------------------------------------------------------------------- the record


def _ledger_with_run(path: Path, job_id: str, *, engine: str | None, config: dict,
                     finished: dict | None = None) -> Ledger:
    ledger = Ledger.open(path)
    if engine is not None:
        ledger.append(EventType.JOB_STARTED, {"purpose": "churn", "partners": ["a", "b"],
                                              "engine": engine}, actor="coordinator", job_id=job_id)
    ledger.append(EventType.JOB_CREATED, {"task": "telco", "partners": ["a", "b"], "purpose": "churn",
                                          "config": config}, actor="coordinator", job_id=job_id)
    ledger.append(EventType.ROUND_AGGREGATED, {"round": 1, "nodes": ["a", "b"], "strategy": "fedavg",
                                               "metrics": {}, "missing": {}},
                  actor="coordinator", job_id=job_id)
    ledger.append(EventType.JOB_FINISHED, {"metrics": {}, "epsilon": 0.5, **(finished or {})},
                  actor="coordinator", job_id=job_id)
    return ledger


SECAGG_CONFIG = {"dp": True, "target_epsilon": 1.0, "target_delta": 1e-5, "secure_aggregation": True,
                 "require_consent": False}
CLAIM = "the coordinator sees only the sum of the partners' updates"


def test_record_of_a_deployed_job_asking_for_secagg_does_not_claim_it(tmp_path):
    """What an older coordinator let through: the settings ask for SecAgg+, the deployment engine
    ran the plain apps. The record says so instead of stating secure aggregation."""
    with _ledger_with_run(tmp_path / "l.db", "job-d", engine="flower-deployment",
                          config=SECAGG_CONFIG) as ledger:
        record = processing_record(ledger, "job-d")
    text = record.to_markdown() + record.pipl_assessment().to_markdown()
    assert CLAIM not in text
    assert "secure aggregation was requested but did not run" in text
    assert "the coordinator received each partner's update" in text
    assert record.secure_aggregation is False


def test_record_states_secagg_when_the_events_show_it_ran(tmp_path):
    with _ledger_with_run(tmp_path / "l.db", "job-s", engine="flower-simulation",
                          config=SECAGG_CONFIG) as ledger:
        record = processing_record(ledger, "job-s")
    assert CLAIM in record.to_markdown() and record.secure_aggregation is True
    # an explicit statement of what ran wins over what the settings asked
    with _ledger_with_run(tmp_path / "m.db", "job-x", engine="flower-simulation",
                          config=SECAGG_CONFIG, finished={"secure_aggregation": False}) as ledger:
        record = processing_record(ledger, "job-x")
    assert CLAIM not in record.to_markdown() and record.secure_aggregation is False


def test_record_without_an_engine_record_does_not_claim_secagg(tmp_path):
    with _ledger_with_run(tmp_path / "l.db", "job-n", engine=None, config=SECAGG_CONFIG) as ledger:
        record = processing_record(ledger, "job-n")
    md = record.to_markdown()
    assert CLAIM not in md and record.secure_aggregation is None
    assert "no ledger event records that it ran" in md


def test_record_of_a_run_reporting_its_dp_undelivered_says_so(tmp_path):
    """job.finished `private` = false (e.g. a node in reproducible-noise mode): the record keeps
    the configured DP but states that the run did not deliver it."""
    with _ledger_with_run(tmp_path / "l.db", "job-r", engine="flower-simulation",
                          config={**SECAGG_CONFIG, "secure_aggregation": False},
                          finished={"private": False, "not_private_reasons": [
                              "node(s) a ran in reproducible mode"]}) as ledger:
        record = processing_record(ledger, "job-r")
    pia = record.pipl_assessment().to_markdown()
    assert "not delivered: node(s) a ran in reproducible mode" in pia
    assert "bounded by the ε spent" not in pia
    assert "not delivered" in record.to_markdown()

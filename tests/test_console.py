"""Web console through FastAPI's TestClient: sign-in with password + TOTP, idle sessions, CSRF,
role-checked pages, approval buttons, audit search and verification, budgets, model cards.

Browser (headless Chromium) tests are not part of this suite; see docs/service.md."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient

from fedpact.audit import EventType
from fedpact.federation.coordinator import JobResult, PartnerSummary, partner_datasets
from fedpact.federation.job import JobConfig
from fedpact.models.metrics import score_histogram
from fedpact.models.networks import build_model
from fedpact.service.api.app import create_app
from fedpact.service.api.auth import totp
from fedpact.service.api.testing import PASSWORD, Clock, seed_consortium

TELCO = partner_datasets(JobConfig(dataset="telco", partitioning="segment", num_partitions=3))


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    home = tmp_path_factory.mktemp("console-home")
    clock = Clock()
    app = create_app(home, clock=clock, start_worker=False)
    people = seed_consortium(app.state.service, TELCO)
    with TestClient(app):
        yield app, people, app.state.service, clock


def browser(app, people, clock, member) -> TestClient:
    """A fresh client (own cookie jar) signed in as `member`."""
    client = TestClient(app, follow_redirects=False)
    clock.advance(31)  # a TOTP code works once: move to the next 30-second step
    r = client.post("/console/login", data={"username": member.username, "password": PASSWORD,
                                            "code": totp(member.totp_secret, clock()),
                                            "next": "/console/jobs"})
    assert r.status_code == 303, r.text
    return client


def csrf(html: str) -> str:
    return re.search(r'name="csrf" value="([^"]+)"', html).group(1)


def new_job(service, people) -> str:
    from fedpact.service.api.schemas import JobRequestIn

    principal = service.accounts.authenticate_token(people.scientist.token)
    body = JobRequestIn(dataset="telco", purpose="churn_model_training", rounds=2)
    return service.board.submit(principal, body, home=str(service.home)).job_id


def test_pages_need_a_session_and_redirect_to_sign_in(env):
    app, *_ = env
    client = TestClient(app, follow_redirects=False)
    r = client.get("/console/jobs")
    assert r.status_code == 303 and r.headers["location"] == "/console/login?next=/console/jobs"
    page = client.get("/console/login")
    assert page.status_code == 200 and 'name="code"' in page.text
    assert "frame-ancestors 'none'" in page.headers["content-security-policy"]
    assert page.headers["x-frame-options"] == "DENY"


def test_sign_in_requires_the_totp_code_and_sets_a_strict_cookie(env):
    app, people, service, clock = env
    client = TestClient(app, follow_redirects=False)
    member = people.scientist
    clock.advance(31)
    r = client.post("/console/login", data={"username": member.username, "password": PASSWORD,
                                            "code": "000000"})
    assert r.status_code == 401 and "wrong user name, password or code" in r.text
    r = client.post("/console/login", data={"username": member.username, "password": PASSWORD,
                                            "code": totp(member.totp_secret, clock()),
                                            "next": "https://evil.example/"})
    assert r.status_code == 303 and r.headers["location"] == "/console/jobs"  # no open redirect
    cookie = r.headers["set-cookie"]
    assert "HttpOnly" in cookie and "SameSite=strict" in cookie and "Path=/console" in cookie
    assert client.get("/console/jobs").status_code == 200
    assert service.ledger.events(event_type=EventType.LOGIN)[-1].payload["outcome"] == "success"


def test_idle_session_ends_after_15_minutes(env):
    app, people, _service, clock = env
    client = browser(app, people, clock, people.compliance)
    assert client.get("/console/jobs").status_code == 200
    clock.advance(15 * 60 + 5)
    r = client.get("/console/jobs")
    assert r.status_code == 303 and "ended=1" in r.headers["location"]
    assert "15 minutes" in client.get(r.headers["location"]).text


def test_sign_out_ends_the_session(env):
    app, people, _service, clock = env
    client = browser(app, people, clock, people.compliance)
    page = client.get("/console/jobs")
    assert client.post("/console/logout", data={"csrf": "wrong"}).status_code == 403
    assert client.post("/console/logout", data={"csrf": csrf(page.text)}).status_code == 303
    assert client.get("/console/jobs").status_code == 303


def test_partner_admin_approves_with_the_button_for_its_own_dataset_only(env):
    app, people, service, clock = env
    jid = new_job(service, people)
    admin = people.admins[TELCO[0]]
    client = browser(app, people, clock, admin)
    page = client.get(f"/console/jobs/{jid}")
    assert page.status_code == 200
    assert page.text.count('value="approve"') == 1  # one button: its own partner's row
    token = csrf(page.text)
    r = client.post(f"/console/jobs/{jid}/decide", data={"partner": TELCO[0], "decision": "approve"})
    assert r.status_code == 403 and "security token" in r.text
    r = client.post(f"/console/jobs/{jid}/decide",
                    data={"partner": TELCO[1], "decision": "approve", "csrf": token})
    assert r.status_code == 403 and f"partner_admin for {TELCO[1]}" in r.text
    r = client.post(f"/console/jobs/{jid}/decide",
                    data={"partner": TELCO[0], "decision": "approve", "csrf": token})
    assert r.status_code == 303
    [ev] = service.ledger.events(job_id=jid, event_type=EventType.JOB_APPROVED)
    assert ev.actor == f"user:{admin.username}" and ev.payload["partner"] == TELCO[0]
    page = client.get(f"/console/jobs/{jid}")
    assert "Revoke approval" in page.text and 'value="approve"' not in page.text
    r = client.post(f"/console/jobs/{jid}/decide",
                    data={"partner": TELCO[0], "decision": "revoke", "reason": "", "csrf": token})
    assert r.status_code == 422 and "reason" in r.text
    r = client.post(f"/console/jobs/{jid}/decide",
                    data={"partner": TELCO[0], "decision": "revoke", "reason": "withdrawn", "csrf": token})
    assert r.status_code == 303
    assert service.board.get(jid).status == "revoked"


def test_data_scientist_requests_a_job_from_the_form(env):
    app, people, service, clock = env
    client = browser(app, people, clock, people.scientist)
    form = client.get("/console/jobs/new")
    token = csrf(form.text)
    fields = {"csrf": token, "dataset": "telco", "partitioning": "segment", "partners": "3",
              "rounds": "2", "target_epsilon": "1.0", "target_delta": "1e-5", "model": "logreg", "dp": "on"}
    r = client.post("/console/jobs", data={**fields, "purpose": "Churn!"})
    assert r.status_code == 422 and "purpose" in r.text
    r = client.post("/console/jobs", data={**fields, "purpose": "churn_model_training"})
    assert r.status_code == 303
    jid = r.headers["location"].rsplit("/", 1)[1]
    job = service.board.get(jid)
    assert job.submitted_by == "dana" and job.config["dp"] is True and job.config["rounds"] == 2
    page = client.get(r.headers["location"])
    assert "pending_approval" in page.text and TELCO[2] in page.text
    admin = browser(app, people, clock, people.admins[TELCO[0]])
    assert admin.get("/console/jobs/new").status_code == 403


def test_audit_search_and_chain_verification_for_compliance_officers(env):
    app, people, service, clock = env
    jid = new_job(service, people)
    client = browser(app, people, clock, people.compliance)
    page = client.get("/console/audit", params={"job_id": jid})
    assert page.status_code == 200 and "job.requested" in page.text
    page = client.get("/console/audit", params={"verify": 1})
    assert "chain verified" in page.text
    page = client.get("/console/audit", params={"since": "last tuesday"})
    assert page.status_code == 422 and "since" in page.text
    admin = browser(app, people, clock, people.admins[TELCO[1]])
    r = admin.get("/console/audit")
    assert r.status_code == 403 and "compliance_officer" in r.text


def test_budget_view_and_partner_admin_setting_its_budget(env):
    app, people, service, clock = env
    admin = people.admins[TELCO[2]]
    client = browser(app, people, clock, admin)
    page = client.get("/console/budgets")
    assert page.status_code == 200 and f'data-dataset="{TELCO[2]}"' in page.text
    assert f'data-dataset="{TELCO[0]}"' not in page.text  # only its own datasets
    token = csrf(page.text)
    r = client.post("/console/budgets", data={"csrf": token, "dataset": TELCO[2], "epsilon": "-2",
                                              "delta": "1e-4"})
    assert r.status_code == 422 and "epsilon" in r.text
    r = client.post("/console/budgets", data={"csrf": token, "dataset": TELCO[0], "epsilon": "2",
                                              "delta": "1e-4"})
    assert r.status_code == 403
    r = client.post("/console/budgets", data={"csrf": token, "dataset": TELCO[2], "epsilon": "6",
                                              "delta": "1e-4"})
    assert r.status_code == 303
    assert service.budgets_for(service.accounts.authenticate_token(admin.token))[0]["epsilon_max"] == 6.0
    compliance = browser(app, people, clock, people.compliance)
    assert TELCO[2] in compliance.get("/console/budgets").text


def test_model_page_shows_card_plots_and_records_exports(env, tmp_path):
    app, people, service, clock = env
    rng = np.random.default_rng(0)
    y = (rng.random(2000) < 0.3).astype(float)
    pos, neg, sq = score_histogram(y, np.clip(0.3 + 0.3 * (y - 0.3) + rng.normal(0, 0.15, 2000), 0, 1))
    job = JobConfig(dataset="telco", rounds=1, home=str(tmp_path), purpose="churn_model_training")
    job.job_dir.mkdir(parents=True)
    layout = {"categorical": {"Contract": ["Month-to-month", "One year", "Two year"]}, "numeric": ["tenure"],
              "bounds": {"tenure": [0.0, 72.0]}}
    torch.save({"state_dict": build_model("logreg", 4).state_dict(), "model": "logreg", "layout": layout},
               job.job_dir / "model.pt")
    from fedpact.models.metrics import metrics_from_histograms

    final = {"round": 1, **metrics_from_histograms(pos, neg, sq), "epsilon": 0.5}
    result = JobResult(job.job_id, job.as_dict(), [PartnerSummary(TELCO[0], 900, 200, 0.5)], [final], final,
                       0.5, 1e-5, 5, 1.0, str(job.job_dir / "model.pt"), layout, 0.5)
    result.histograms = {"pos": pos.tolist(), "neg": neg.tolist(), "sq_error": sq}
    version = service.registry.register(job, result, name="console-test", requested_by="dana",
                                        partners=[TELCO[0]])
    ref = f"console-test@{version}"
    client = browser(app, people, clock, people.scientist)
    page = client.get(f"/console/models/{ref}")
    assert page.status_code == 200 and "Model card: console-test@1" in page.text
    for kind in ("roc", "gains", "calibration"):
        assert f"/console/models/{ref}/plots/{kind}.png" in page.text
        img = client.get(f"/console/models/{ref}/plots/{kind}.png")
        assert img.status_code == 200 and img.content.startswith(b"\x89PNG")
    r = client.get(f"/console/models/{ref}/export")
    assert r.status_code == 200 and len(r.content) > 1000
    exported = service.ledger.events(event_type=EventType.MODEL_EXPORTED)[-1]
    assert exported.payload["model"] == ref and exported.payload["recipient"] == "dana"
    other = browser(app, people, clock, people.admins[TELCO[1]])  # not in this model's consortium
    assert other.get(f"/console/models/{ref}").status_code == 404
    assert other.get(f"/console/models/{ref}/plots/roc.png").status_code == 404
    assert ref in client.get("/console/models").text


@pytest.mark.parametrize("method,path,kwargs", [
    ("get", "/console/jobs/%2e%2e%2fetc", {}),
    ("get", "/console/jobs?status=%00", {}),
    ("get", "/console/models/@", {}),
    ("get", "/console/models/x@y/plots/roc.png", {}),
    ("get", "/console/models/x@1/plots/pie.png", {}),
    ("get", "/console/audit?after_seq=-5&type=nope", {}),
    ("get", "/console/audit?after_seq=abc", {}),
    ("get", "/console/login?next=//evil.example", {}),
    ("post", "/console/login", {"content": b"\xff\xfe", "headers": {"content-type": "application/x-www-form-urlencoded"}}),
    ("post", "/console/login", {"json": {"username": "x"}}),
    ("post", "/console/jobs/job-x/decide", {"data": {"decision": "maybe"}}),
    ("post", "/console/budgets", {"data": {"epsilon": "lots"}}),
    ("post", "/console/jobs", {"data": {"partners": "-1"}}),
])
def test_console_answers_odd_requests_without_a_server_error(env, method, path, kwargs):
    app, people, _service, clock = env
    client = browser(app, people, clock, people.everyone)
    r = getattr(client, method)(path, **kwargs)
    assert r.status_code < 500, (path, r.status_code, r.text[:300])

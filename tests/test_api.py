"""Coordinator API: every endpoint with the right role, the wrong role, no/expired/revoked token and
malformed input (4xx with a message naming the field, never 500). No Flower run here, except the
admission refusal, which stops before any node starts."""

from __future__ import annotations

import time

import pytest
from fastapi.testclient import TestClient

from fedpact.audit import EventType, Ledger
from fedpact.federation.coordinator import partner_datasets
from fedpact.federation.job import JobConfig
from fedpact.service.api.app import create_app
from fedpact.service.api.store import tokens
from fedpact.service.api.testing import Clock, seed_consortium

TELCO = partner_datasets(JobConfig(dataset="telco", partitioning="segment", num_partitions=3))
JOB = {"dataset": "telco", "purpose": "churn_model_training", "rounds": 2}


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    home = tmp_path_factory.mktemp("api-home")
    clock = Clock()
    app = create_app(home, clock=clock, start_worker=False)
    people = seed_consortium(app.state.service, TELCO)
    with TestClient(app) as client:
        yield client, people, app.state.service, clock


def submit(client, people, **overrides) -> dict:
    r = client.post("/api/v1/jobs", json={**JOB, **overrides}, headers=people.scientist.headers)
    assert r.status_code == 201, r.text
    return r.json()


def events(service, job_id: str, kind: EventType):
    return service.ledger.events(job_id=job_id, event_type=kind)


# --------------------------------------------------------------------------- authentication


def test_health_is_public_and_openapi_is_published(env):
    client, *_ = env
    assert client.get("/api/v1/health").json()["status"] == "ok"
    spec = client.get("/openapi.json").json()
    assert "/api/v1/jobs/{job_id}/approve" in spec["paths"]
    assert client.get("/docs").status_code == 200


@pytest.mark.parametrize("headers,fragment", [
    ({}, "missing API token"),
    ({"Authorization": "Basic abc"}, "missing API token"),
    ({"Authorization": "Bearer nonsense"}, "malformed API token"),
    ({"Authorization": "Bearer fpt_0000000000000000_secret"}, "invalid API token"),
])
def test_requests_without_a_valid_token_get_401(env, headers, fragment):
    client, *_ = env
    r = client.get("/api/v1/jobs", headers=headers)
    assert r.status_code == 401
    assert fragment in r.json()["detail"]
    assert r.headers["www-authenticate"] == "Bearer"


def test_expired_and_revoked_tokens_are_refused(env):
    client, people, service, clock = env
    short = service.accounts.issue_token("dana", days=1, issued_by="operator:test")
    headers = {"Authorization": f"Bearer {short.token}"}
    assert client.get("/api/v1/me", headers=headers).status_code == 200
    clock.advance(86400 + 1)
    try:
        r = client.get("/api/v1/me", headers=headers)
        assert r.status_code == 401 and "expired" in r.json()["detail"]
    finally:
        clock.advance(-(86400 + 1))
    service.accounts.revoke_token(short.token_id, revoked_by="operator:test")
    r = client.get("/api/v1/me", headers=headers)
    assert r.status_code == 401 and "revoked" in r.json()["detail"]
    kinds = [e.event_type for e in service.ledger.events()]
    assert "admin.token_issued" in kinds and "admin.token_revoked" in kinds


def test_tokens_are_stored_only_as_digests(env):
    _client, people, service, _ = env
    secret = people.scientist.token.split("_", 2)[2]
    with service.store.engine.connect() as conn:
        rows = conn.execute(tokens.select()).all()
    assert rows and all(secret not in " ".join(map(str, r)) for r in rows)
    raw = service.store.path.read_bytes()
    assert secret.encode() not in raw


def test_disabled_user_and_revoked_role_stop_at_once(env):
    client, people, service, _ = env
    service.accounts.create_user("temp", password="correct horse battery", created_by="operator:test")
    service.accounts.grant("temp", "data_scientist", granted_by="operator:test")
    headers = {"Authorization": "Bearer " + service.accounts.issue_token("temp", issued_by="t").token}
    assert client.get("/api/v1/jobs", headers=headers).status_code == 200
    service.accounts.revoke("temp", "data_scientist", revoked_by="operator:test")
    r = client.get("/api/v1/jobs", headers=headers)
    assert r.status_code == 403 and "temp holds no roles" in r.json()["detail"]
    service.accounts.set_disabled("temp", True)
    assert client.get("/api/v1/me", headers=headers).status_code == 401


def test_me_lists_roles_and_scopes(env):
    client, people, *_ = env
    me = client.get("/api/v1/me", headers=people.admins[TELCO[0]].headers).json()
    assert me == {"username": "admin-dsl", "kind": "person",
                  "roles": [{"role": "partner_admin", "scope": TELCO[0]}]}


# --------------------------------------------------------------------------- job requests


def test_submit_records_request_in_ledger_and_waits_for_every_partner(env):
    client, people, service, _ = env
    job = submit(client, people)
    assert job["status"] == "pending_approval"
    assert job["partners"] == TELCO and job["awaiting"] == TELCO
    assert job["request"]["features"][:2] == ["gender", "SeniorCitizen"]
    [ev] = events(service, job["job_id"], EventType.JOB_REQUESTED)
    assert ev.actor == "user:dana" and ev.payload["partners"] == TELCO
    assert ev.payload["purpose"] == "churn_model_training" and ev.payload["target_epsilon"] == 1.0
    assert all(b["ok"] is False and b["epsilon_max"] is None for b in job["budgets"])


@pytest.mark.parametrize("who", ["compliance", "admin", "node"])
def test_only_data_scientists_submit(env, who):
    client, people, *_ = env
    member = {"compliance": people.compliance, "admin": people.admins[TELCO[0]],
              "node": people.nodes[TELCO[0]]}[who]
    r = client.post("/api/v1/jobs", json=JOB, headers=member.headers)
    assert r.status_code == 403
    assert "role data_scientist required" in r.json()["detail"]


@pytest.mark.parametrize("body,field", [
    ({**JOB, "rounds": 0}, "rounds"),
    ({**JOB, "rounds": "many"}, "rounds"),
    ({**JOB, "dataset": "nope"}, "dataset"),
    ({**JOB, "purpose": "Churn Model!"}, "purpose"),
    ({**JOB, "target_epsilon": -1}, "target_epsilon"),
    ({**JOB, "target_delta": 1.5}, "target_delta"),
    ({**JOB, "surprise": 1}, "surprise"),
    ({"dataset": "telco"}, "purpose"),
    ([1, 2, 3], "body"),
])
def test_malformed_job_requests_get_422_naming_the_field(env, body, field):
    client, people, *_ = env
    r = client.post("/api/v1/jobs", json=body, headers=people.scientist.headers)
    assert r.status_code == 422
    assert field in r.json()["detail"]


def test_invalid_json_and_semantic_errors_are_422(env):
    client, people, *_ = env
    h = {**people.scientist.headers, "Content-Type": "application/json"}
    r = client.post("/api/v1/jobs", content=b"{not json", headers=h)
    assert r.status_code == 422 and "JSON" in r.json()["detail"]
    r = client.post("/api/v1/jobs", json={**JOB, "task": "propensity"}, headers=people.scientist.headers)
    assert r.status_code == 422 and "task" in r.json()["detail"]
    r = client.post("/api/v1/jobs", json={**JOB, "features": ["tenure", "shoe_size"]},
                    headers=people.scientist.headers)
    assert r.status_code == 422
    assert "unknown columns ['shoe_size']" in r.json()["detail"]
    r = client.post("/api/v1/jobs", json={**JOB, "partitioning": "iid", "partners": 20, "batch_size": 1},
                    headers=people.scientist.headers)
    assert r.status_code == 201  # valid settings are accepted; the data-dependent checks come at admission


def test_job_visibility_by_role_and_partner(env):
    client, people, service, _ = env
    job = submit(client, people)
    bank = submit(client, people, dataset="caravan", purpose="caravan_propensity")
    for member in (people.scientist, people.compliance, people.admins[TELCO[1]], people.nodes[TELCO[2]]):
        assert client.get(f"/api/v1/jobs/{job['job_id']}", headers=member.headers).status_code == 200
    # a telco partner's admin does not see (or learn of) the caravan consortium's job
    r = client.get(f"/api/v1/jobs/{bank['job_id']}", headers=people.admins[TELCO[0]].headers)
    assert r.status_code == 404
    listed = {j["job_id"] for j in client.get("/api/v1/jobs", headers=people.admins[TELCO[0]].headers).json()}
    assert job["job_id"] in listed and bank["job_id"] not in listed
    assert client.get("/api/v1/jobs/job-doesnotexist", headers=people.scientist.headers).status_code == 404
    assert client.get("/api/v1/jobs", params={"status": "pending_approval"},
                      headers=people.scientist.headers).status_code == 200


def test_rounds_logs_and_result_endpoints(env):
    client, people, *_ = env
    job = submit(client, people)
    jid = job["job_id"]
    assert client.get(f"/api/v1/jobs/{jid}/rounds", headers=people.scientist.headers).json() == []
    logs = client.get(f"/api/v1/jobs/{jid}/logs", headers=people.admins[TELCO[0]].headers).json()
    assert "waiting for the approval" in logs[0]["message"]
    after = client.get(f"/api/v1/jobs/{jid}/logs", params={"after_id": logs[-1]["id"]},
                       headers=people.scientist.headers).json()
    assert after == []
    r = client.get(f"/api/v1/jobs/{jid}/result", headers=people.scientist.headers)
    assert r.status_code == 404 and "no result" in r.json()["detail"]
    r = client.get(f"/api/v1/jobs/{jid}/result", headers=people.nodes[TELCO[0]].headers)
    assert r.status_code == 403
    r = client.get(f"/api/v1/jobs/{jid}/logs", params={"limit": 0}, headers=people.scientist.headers)
    assert r.status_code == 422 and "limit" in r.json()["detail"]


# --------------------------------------------------------------------------- governance


def approve(client, people, jid, partner):
    return client.post(f"/api/v1/jobs/{jid}/approve", json={"partner": partner},
                       headers=people.admins[partner].headers)


def test_job_is_queued_only_after_every_partner_approved(env):
    client, people, service, _ = env
    jid = submit(client, people)["job_id"]
    for i, partner in enumerate(TELCO):
        r = approve(client, people, jid, partner)
        assert r.status_code == 200, r.text
        expected = "queued" if i == len(TELCO) - 1 else "pending_approval"
        assert r.json()["status"] == expected
    approvals = events(service, jid, EventType.JOB_APPROVED)
    assert [e.payload["partner"] for e in approvals] == TELCO
    assert {e.actor for e in approvals} == {f"user:{people.admins[p].username}" for p in TELCO}
    node_view = client.get("/api/v1/node/jobs", headers=people.nodes[TELCO[0]].headers).json()
    assert jid in {j["job_id"] for j in node_view}
    assert node_view[0]["config"]["dataset"] == "telco"


def test_a_partner_admin_decides_only_for_its_own_dataset(env):
    client, people, service, _ = env
    jid = submit(client, people)["job_id"]
    r = client.post(f"/api/v1/jobs/{jid}/approve", json={"partner": TELCO[1]},
                    headers=people.admins[TELCO[0]].headers)
    assert r.status_code == 403
    assert f"partner_admin for {TELCO[1]} required" in r.json()["detail"]
    r = client.post(f"/api/v1/jobs/{jid}/approve", json={"partner": "bank-marketing/white-collar"},
                    headers=people.admins[TELCO[0]].headers)
    assert r.status_code == 422 and "is not part of job" in r.json()["detail"]
    r = client.post(f"/api/v1/jobs/{jid}/approve", json={"partner": TELCO[0]},
                    headers=people.scientist.headers)
    assert r.status_code == 403 and "role partner_admin required" in r.json()["detail"]
    r = client.post(f"/api/v1/jobs/{jid}/approve", json={}, headers=people.admins[TELCO[0]].headers)
    assert r.status_code == 422 and "partner" in r.json()["detail"]
    assert approve(client, people, jid, TELCO[0]).status_code == 200
    r = approve(client, people, jid, TELCO[0])
    assert r.status_code == 409 and "already approved" in r.json()["detail"]
    assert not events(service, jid, EventType.JOB_REJECTED)


def test_rejection_stops_the_job_and_needs_a_reason(env):
    client, people, service, _ = env
    jid = submit(client, people)["job_id"]
    h = people.admins[TELCO[2]].headers
    r = client.post(f"/api/v1/jobs/{jid}/reject", json={"partner": TELCO[2]}, headers=h)
    assert r.status_code == 422 and "reason" in r.json()["detail"]
    r = client.post(f"/api/v1/jobs/{jid}/reject", json={"partner": TELCO[2], "reason": "ask jane.doe@example.com"},
                    headers=h)
    assert r.status_code == 422 and "e-mail" in r.json()["detail"]
    r = client.post(f"/api/v1/jobs/{jid}/reject", json={"partner": TELCO[2], "reason": "purpose not covered"},
                    headers=h)
    assert r.status_code == 200 and r.json()["status"] == "rejected"
    [ev] = events(service, jid, EventType.JOB_REJECTED)
    assert ev.payload["reason"] == "purpose not covered"
    r = approve(client, people, jid, TELCO[0])
    assert r.status_code == 409 and "is rejected" in r.json()["detail"]


def test_revocation_before_start_wins_over_the_queue(env):
    client, people, service, _ = env
    jid = submit(client, people)["job_id"]
    r = client.post(f"/api/v1/jobs/{jid}/revoke", json={"partner": TELCO[0], "reason": "changed mind"},
                    headers=people.admins[TELCO[0]].headers)
    assert r.status_code == 409 and "nothing to revoke" in r.json()["detail"]
    for partner in TELCO:
        approve(client, people, jid, partner)
    assert service.board.get(jid).status == "queued"
    r = client.post(f"/api/v1/jobs/{jid}/revoke", json={"partner": TELCO[1], "reason": "board said no"},
                    headers=people.admins[TELCO[1]].headers)
    assert r.status_code == 200 and r.json()["status"] == "revoked"
    assert events(service, jid, EventType.JOB_REVOKED)[0].payload["partner"] == TELCO[1]
    # the worker must not start it: claiming a revoked job fails
    assert service.board.claim(jid) is False
    assert not events(service, jid, EventType.JOB_STARTED)


def test_worker_runs_admission_and_a_job_without_budgets_is_refused(tmp_path):
    """The real runner: all partners approve, admission finds no budgets -> refused, before Flower."""
    app = create_app(tmp_path)
    people = seed_consortium(app.state.service, TELCO)
    service = app.state.service
    with TestClient(app) as client:
        jid = submit(client, people)["job_id"]
        for partner in TELCO:
            approve(client, people, jid, partner)
        deadline = time.monotonic() + 60
        while service.board.get(jid).status in ("queued", "running") and time.monotonic() < deadline:
            time.sleep(0.2)
        job = client.get(f"/api/v1/jobs/{jid}", headers=people.scientist.headers).json()
    assert job["status"] == "refused"
    assert "has no privacy budget" in job["reason"]
    with Ledger.open(tmp_path / "ledger.db") as ledger:
        kinds = [e.event_type for e in ledger.events(job_id=jid)]
        assert kinds[0] == "job.requested" and kinds.count("job.approved") == 3
        assert kinds[-2:] == ["job.started", "job.refused"]
        assert "job.created" not in kinds  # no node was contacted
        assert ledger.verify().ok


# --------------------------------------------------------------------------- budgets


def test_partner_admins_set_their_own_budgets(env):
    client, people, service, _ = env
    h = people.admins[TELCO[0]].headers
    r = client.put(f"/api/v1/budgets/{TELCO[0]}", json={"epsilon": 4, "delta": 1e-4}, headers=h)
    assert r.status_code == 200 and r.json()["epsilon_max"] == 4.0
    r = client.put(f"/api/v1/budgets/{TELCO[1]}", json={"epsilon": 4, "delta": 1e-4}, headers=h)
    assert r.status_code == 403 and TELCO[1] in r.json()["detail"]
    r = client.put(f"/api/v1/budgets/{TELCO[0]}", json={"epsilon": 0, "delta": 1e-4}, headers=h)
    assert r.status_code == 422 and "epsilon" in r.json()["detail"]
    r = client.put(f"/api/v1/budgets/{TELCO[0]}", json={"epsilon": 1, "delta": 2}, headers=h)
    assert r.status_code == 422 and "delta" in r.json()["detail"]
    r = client.put(f"/api/v1/budgets/{TELCO[0]}", json={"epsilon": 1, "delta": 1e-4},
                   headers=people.scientist.headers)
    assert r.status_code == 403
    mine = client.get("/api/v1/budgets", headers=h).json()
    assert {b["dataset"] for b in mine} == {TELCO[0]}
    assert TELCO[0] in {b["dataset"] for b in client.get("/api/v1/budgets", headers=people.compliance.headers).json()}
    [ev] = [e for e in service.ledger.events(event_type=EventType.BUDGET_SET)
            if e.payload["dataset"] == TELCO[0] and e.payload["epsilon_max"] == 4.0]
    assert ev.actor == "user:admin-dsl"
    assert client.get("/api/v1/budgets", headers=people.nodes[TELCO[0]].headers).status_code == 403


# --------------------------------------------------------------------------- audit and models


def test_audit_search_and_verify_are_for_compliance_officers(env):
    client, people, service, _ = env
    jid = submit(client, people)["job_id"]
    h = people.compliance.headers
    page = client.get("/api/v1/audit/events", params={"job_id": jid}, headers=h).json()
    assert [e["event_type"] for e in page["events"]] == ["job.requested"]
    page = client.get("/api/v1/audit/events", params={"type": "job.requested", "partner": TELCO[0],
                                                      "limit": 1}, headers=h).json()
    assert len(page["events"]) == 1 and page["next_after_seq"] is not None
    nxt = client.get("/api/v1/audit/events", params={"type": "job.requested", "after_seq": page["next_after_seq"]},
                     headers=h).json()
    assert nxt["events"][0]["seq"] > page["events"][0]["seq"]
    assert client.get("/api/v1/audit/verify", headers=h).json()["ok"] is True
    for bad, field in [({"type": "job.nonsense"}, "unknown ledger event type"),
                       ({"since": "yesterday"}, "since"), ({"limit": 5000}, "limit")]:
        r = client.get("/api/v1/audit/events", params=bad, headers=h)
        assert r.status_code == 422 and field in r.json()["detail"]
    for member in (people.scientist, people.admins[TELCO[0]], people.nodes[TELCO[0]]):
        assert client.get("/api/v1/audit/events", headers=member.headers).status_code == 403
        assert client.get("/api/v1/audit/verify", headers=member.headers).status_code == 403


def test_reading_a_subjects_records_writes_a_data_access_event(env):
    client, people, service, _ = env
    before = len(service.ledger.events(event_type=EventType.DATA_ACCESSED))
    r = client.get("/api/v1/audit/events", params={"subject": "customer-0042"}, headers=people.compliance.headers)
    assert r.status_code == 200
    accesses = service.ledger.events(event_type=EventType.DATA_ACCESSED)
    assert len(accesses) == before + 1
    ev = accesses[-1]
    assert ev.actor == "user:carl" and ev.payload["purpose"] == "compliance_audit"
    assert ev.payload["subject"].startswith("ps_") and "customer-0042" not in str(ev.payload)
    client.get("/api/v1/audit/events", params={"type": "job.requested"}, headers=people.compliance.headers)
    assert len(service.ledger.events(event_type=EventType.DATA_ACCESSED)) == before + 1


def test_model_endpoints_check_role_and_answer_404_for_unknown_models(env):
    client, people, *_ = env
    assert client.get("/api/v1/models", headers=people.scientist.headers).json() == []
    assert client.get("/api/v1/models", headers=people.nodes[TELCO[0]].headers).status_code == 403
    for path in ("/api/v1/models/churn-telco", "/api/v1/models/churn-telco@3/plots/roc",
                 "/api/v1/models/churn-telco@1/export"):
        r = client.get(path, headers=people.scientist.headers)
        assert r.status_code == 404 and "no model" in r.json()["detail"]
    r = client.get("/api/v1/models/churn-telco@x", headers=people.scientist.headers)
    assert r.status_code == 422 and "version" in r.json()["detail"]
    r = client.get("/api/v1/models/churn-telco@1/plots/pie", headers=people.scientist.headers)
    assert r.status_code == 422 and "kind" in r.json()["detail"]
    r = client.get("/api/v1/models/churn-telco@1/export", params={"purpose": "Bad Purpose"},
                   headers=people.scientist.headers)
    assert r.status_code == 422 and "purpose" in r.json()["detail"]
    assert client.get("/api/v1/models/churn-telco@1/export", headers=people.compliance.headers).status_code == 403


def test_node_endpoint_is_for_machine_identities_only(env):
    client, people, *_ = env
    assert client.get("/api/v1/node/jobs", headers=people.scientist.headers).status_code == 403
    r = client.get("/api/v1/node/jobs", headers=people.nodes[TELCO[1]].headers)
    assert r.status_code == 200 and isinstance(r.json(), list)


def test_every_api_operation_requires_a_token(env):
    """Each operation in the OpenAPI document except /health answers 401 without a token."""
    client, *_ = env
    spec = client.get("/openapi.json").json()
    fill = {"{job_id}": "job-x", "{ref}": "m@1", "{kind}": "roc", "{dataset}": "a/b"}
    checked = 0
    for path, ops in spec["paths"].items():
        for method in ops:
            url = path
            for k, v in fill.items():
                url = url.replace(k, v)
            r = client.request(method.upper(), url, json={})
            if path == "/api/v1/health":
                assert r.status_code == 200
            else:
                assert r.status_code == 401, (method, path, r.status_code)
                checked += 1
    assert checked >= 17


def test_runner_faults_and_restarts_end_in_failed_with_a_ledger_event(tmp_path):
    """A run that dies (here: the engine raising) and a run cut off by a restart both end `failed`."""
    def engine_that_dies(job, on_round):
        on_round(1, {"round": 1, "roc_auc": 0.61, "epsilon": 0.2})
        raise RuntimeError("ray went away")

    app = create_app(tmp_path, run=engine_that_dies)
    service = app.state.service
    people = seed_consortium(service, TELCO)
    with TestClient(app) as client:
        jid = submit(client, people)["job_id"]
        for partner in TELCO:
            approve(client, people, jid, partner)
        deadline = time.monotonic() + 30
        while service.board.get(jid).status in ("queued", "running") and time.monotonic() < deadline:
            time.sleep(0.1)
        job = client.get(f"/api/v1/jobs/{jid}", headers=people.scientist.headers).json()
        assert job["status"] == "failed" and "ray went away" in job["reason"]
        assert [r["roc_auc"] for r in job["rounds"]] == [0.61]
        [failed] = events(service, jid, EventType.JOB_FAILED)
        assert "RuntimeError: ray went away" in failed.payload["reason"]
        # a second job is taken by a worker that then "crashes" mid-run (status left running) …
        other = submit(client, people)["job_id"]
    for partner in TELCO:
        principal = service.accounts.authenticate_token(people.admins[partner].token)
        service.board.decide(principal, other, partner, "approved")
    assert service.board.claim(other)
    service.close()
    # … and the next service process marks it failed instead of leaving it running forever.
    restarted = create_app(tmp_path, run=engine_that_dies)
    with TestClient(restarted):
        view = restarted.state.service.board.get(other)
        assert view.status == "failed" and "stopped while this job was running" in view.reason
        assert events(restarted.state.service, other, EventType.JOB_FAILED)

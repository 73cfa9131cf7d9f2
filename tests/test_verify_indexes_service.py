"""Issue #15, finding 4 (second half): the API's and the console's verify include the index check.

`fedpact audit verify --indexes` compares the derived tables (event_index, consent_state,
job_subjects, the stored Merkle nodes) with the chain. The API's `GET /api/v1/audit/verify` and
the console's audit "Verify" button run the same check and name what differs — e.g. a
consent_state row edited from withdrawn to granted straight in SQLite — and the verdict is not ok.
"""

from __future__ import annotations

import sqlite3

import pytest
from fastapi.testclient import TestClient
from ledger_tamper import tamper

from fedpact.audit.consent import ConsentRegistry
from fedpact.federation.coordinator import partner_datasets
from fedpact.federation.job import JobConfig
from fedpact.service.api.app import create_app
from fedpact.service.api.auth import totp
from fedpact.service.api.testing import PASSWORD, Clock, seed_consortium

TELCO = partner_datasets(JobConfig(dataset="telco", partitioning="segment", num_partitions=3))
PURPOSE = "churn_model_training"


@pytest.fixture
def env(tmp_path):
    home = tmp_path / "home"
    clock = Clock()
    app = create_app(home, clock=clock, start_worker=False)
    people = seed_consortium(app.state.service, TELCO)
    with TestClient(app, follow_redirects=False) as client:
        service = app.state.service
        registry = ConsentRegistry(service.ledger)
        for subject in ("C-1", "C-2"):
            registry.grant(subject, PURPOSE, channel="web", legal_basis="consent",
                           notice_version="v1", source="crm")
        registry.withdraw("C-1", PURPOSE, channel="web", source="crm")
        yield client, app, people, clock, home / "ledger.db", registry.pseudonym("C-1")


def _withdrawn_edited_to_granted(db, pseudonym: str) -> None:
    connection = sqlite3.connect(db)
    try:
        [(status,)] = connection.execute(
            "SELECT status FROM consent_state WHERE subject = ?", (pseudonym,)).fetchall()
    finally:
        connection.close()
    assert status == "withdrawn"
    tamper(db, "UPDATE consent_state SET status = 'granted' WHERE subject = ?", (pseudonym,))


def test_api_verify_names_a_consent_state_row_edited_to_granted(env):
    client, _app, people, _clock, db, pseudonym = env
    h = people.compliance.headers
    intact = client.get("/api/v1/audit/verify", headers=h).json()
    assert intact["ok"] is True and intact["indexes"]["ok"] is True
    assert intact["indexes"]["problems"] == []

    _withdrawn_edited_to_granted(db, pseudonym)
    r = client.get("/api/v1/audit/verify", headers=h)
    assert r.status_code == 200
    verdict = r.json()
    assert verdict["chain_ok"] is True  # the chain itself is untouched
    assert verdict["ok"] is False and verdict["indexes"]["ok"] is False
    [problem] = [p for p in verdict["indexes"]["problems"] if pseudonym in p]
    assert "consent_state" in problem and "granted" in problem and "withdrawn" in problem
    assert "fedpact audit reindex" in verdict["indexes"]["repair"]


def _signed_in(app, people, clock) -> TestClient:
    client = TestClient(app, follow_redirects=False)
    member = people.compliance
    clock.advance(31)
    r = client.post("/console/login", data={"username": member.username, "password": PASSWORD,
                                            "code": totp(member.totp_secret, clock()),
                                            "next": "/console/audit"})
    assert r.status_code == 303, r.text
    return client


def test_console_verify_names_a_consent_state_row_edited_to_granted(env):
    _client, app, people, clock, db, pseudonym = env
    browser = _signed_in(app, people, clock)
    page = browser.get("/console/audit", params={"verify": 1})
    assert page.status_code == 200 and "chain verified" in page.text
    assert 'id="indexes"' in page.text and "indexes match the chain" in page.text

    _withdrawn_edited_to_granted(db, pseudonym)
    page = browser.get("/console/audit", params={"verify": 1})
    assert page.status_code == 200 and "chain verified" in page.text
    assert "derived tables differ from the chain" in page.text
    assert pseudonym in page.text and "consent_state" in page.text
    assert "fedpact audit reindex" in page.text


def test_a_broken_chain_is_reported_and_the_indexes_are_not_checked(env):
    client, app, people, clock, db, _pseudonym = env
    connection = sqlite3.connect(db)
    [(actor,)] = connection.execute("SELECT actor FROM ledger_events WHERE seq = 2").fetchall()
    connection.close()
    tamper(db, "UPDATE ledger_events SET actor = 'mallory' WHERE seq = 2")
    verdict = client.get("/api/v1/audit/verify", headers=people.compliance.headers).json()
    assert verdict["ok"] is False and verdict["chain_ok"] is False
    assert verdict["first_bad_seq"] == 2 and verdict["indexes"] is None
    page = _signed_in(app, people, clock).get("/console/audit", params={"verify": 1})
    assert "chain broken at event 2" in page.text and "indexes not checked" in page.text
    tamper(db, "UPDATE ledger_events SET actor = ? WHERE seq = 2", (actor,))  # the service's
    # stop() signs a checkpoint, and refuses to over a broken chain

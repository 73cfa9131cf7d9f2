"""Issue #13 item 5.2: jobs requested through the service enforce consent unless the requester
explicitly turns it off, and the record says which.

The setting travels from the request (API, console form, `fedpact job submit`) into the JobConfig
that runs; turning it off is in `job.requested` and the Art. 30 record. The last test runs a real
governed job (Flower simulation, IBM Telco with its `customerID` subject ids) with one subject's
consent withdrawn: that subject's rows are excluded by default.
"""

from __future__ import annotations

import csv
import json
import re

import pytest
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from fedpact.audit import EventType, Ledger
from fedpact.audit.consent import ConsentRegistry
from fedpact.audit.records import processing_record
from fedpact.federation.coordinator import partner_datasets
from fedpact.federation.job import JobConfig
from fedpact.models.datasets import load_dataset
from fedpact.service import cli_jobs
from fedpact.service.api.app import create_app
from fedpact.service.api.auth import totp
from fedpact.service.api.testing import PASSWORD, Clock, approve_and_wait, seed_consortium

TELCO = partner_datasets(JobConfig(dataset="telco", partitioning="segment", num_partitions=3))
PURPOSE = "churn_model_training"
JOB = {"dataset": "telco", "purpose": PURPOSE, "rounds": 1}
runner = CliRunner()


def grant_consent(home, partners: list[str], purpose: str, ids: list, *,
                  withdrawn: list = ()) -> list:
    """Every subject in `ids` granted `purpose` (a consent-management CSV import), those in
    `withdrawn` then withdrew it; returns the registries written.

    Consent lives in each partner's own registry (`node_data.partner_registry_path`: the
    partner's folder under the run folder in the simulation); older node code read it from the
    job's ledger. Both are written, so tests of the service path hold either way."""
    from pathlib import Path

    from fedpact.federation import node_data

    home = Path(home)
    export = home / f"cmp-export-{purpose}.csv"
    with export.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["subject_id", "purpose", "status", "channel", "timestamp", "legal_basis",
                    "notice_version"])
        for sid in ids:
            w.writerow([sid, purpose, "granted", "web", "2026-01-15T10:00:00+00:00", "consent", "v3"])
    registries = [home / "ledger.db"]
    where = getattr(node_data, "partner_registry_path", None)
    if where is not None:
        probe = JobConfig(dataset="telco", home=str(home))
        registries += [where({}, probe, partner) for partner in partners]
    for path in registries:
        path.parent.mkdir(parents=True, exist_ok=True)
        with Ledger.open(path) as ledger:
            registry = ConsentRegistry(ledger)
            assert registry.import_csv(export).ok
            for sid in withdrawn:
                registry.withdraw(sid, purpose, channel="web", source="preference centre")
    return registries


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    home = tmp_path_factory.mktemp("consent-api-home")
    clock = Clock()
    app = create_app(home, clock=clock, start_worker=False)
    people = seed_consortium(app.state.service, TELCO)
    with TestClient(app) as client:
        yield app, client, people, app.state.service, clock


def submit(client, people, **overrides) -> dict:
    r = client.post("/api/v1/jobs", json={**JOB, **overrides}, headers=people.scientist.headers)
    assert r.status_code == 201, r.text
    return r.json()


def test_consent_enforcement_is_on_by_default_and_reaches_the_job_config(env):
    _app, client, people, service, _ = env
    job = submit(client, people)
    assert job["require_consent"] is True and job["request"]["require_consent"] is True
    assert service.board.get(job["job_id"]).config["require_consent"] is True
    assert JobConfig(**service.board.get(job["job_id"]).config).require_consent is True
    [ev] = service.ledger.events(job_id=job["job_id"], event_type=EventType.JOB_REQUESTED)
    assert ev.payload["require_consent"] is True
    node = client.get("/api/v1/node/jobs", headers=people.nodes[TELCO[0]].headers)
    assert node.status_code == 200


def test_turning_consent_off_is_explicit_and_recorded(env):
    _app, client, people, service, _ = env
    job = submit(client, people, require_consent=False)
    jid = job["job_id"]
    assert job["require_consent"] is False
    assert service.board.get(jid).config["require_consent"] is False
    [ev] = service.ledger.events(job_id=jid, event_type=EventType.JOB_REQUESTED)
    assert ev.payload["require_consent"] is False and ev.payload["requested_by"] == "dana"
    # what the run would write: job.created with the settings, a node reading rows
    config = service.board.get(jid).config
    service.ledger.append(EventType.JOB_CREATED, {"task": "telco", "partners": TELCO,
                                                  "purpose": PURPOSE, "config": config},
                          actor="coordinator", job_id=jid)
    service.ledger.append(EventType.DATA_ACCESSED, {"node": TELCO[0], "dataset": TELCO[0], "rows": 10,
                                                    "columns": ["tenure"], "purpose": PURPOSE,
                                                    "phase": "train"},
                          actor=f"node:{TELCO[0]}", job_id=jid)
    record = processing_record(service.ledger, jid)
    for text in (record.to_markdown(), record.pipl_assessment().to_markdown()):
        assert "No consent check was applied" in text
        assert "consent enforcement was turned off for this job by its requester dana" in text


def test_consent_on_a_data_set_without_subject_ids_says_it_cannot_be_checked(env):
    """Caravan has no subject id column: the request is accepted (partners' nodes record "not
    checkable"), and the job's page says so instead of claiming consent enforcement."""
    _app, client, people, service, _ = env
    job = submit(client, people, dataset="caravan", purpose="caravan_propensity")
    assert job["require_consent"] is True
    assert "cannot be checked" in job["consent"] and "no subject id column" in job["consent"]
    assert service.board.get(job["job_id"]).config["require_consent"] is True
    job = submit(client, people, dataset="caravan", purpose="caravan_propensity",
                 require_consent=False)
    assert job["require_consent"] is False and "turned off by the requester" in job["consent"]


def test_console_form_has_consent_on_by_default_and_unticking_turns_it_off(env):
    app, _client, people, service, clock = env
    browser = TestClient(app, follow_redirects=False)
    clock.advance(31)
    r = browser.post("/console/login", data={"username": "dana", "password": PASSWORD,
                                             "code": totp(people.scientist.totp_secret, clock())})
    assert r.status_code == 303
    form = browser.get("/console/jobs/new").text
    assert re.search(r'<input type="checkbox" name="require_consent"[^>]*checked', form)
    token = re.search(r'name="csrf" value="([^"]+)"', form).group(1)
    fields = {"csrf": token, "dataset": "telco", "partitioning": "segment", "partners": "3",
              "rounds": "2", "target_epsilon": "1.0", "target_delta": "1e-5", "model": "logreg",
              "dp": "on", "purpose": PURPOSE, "require_consent_shown": "1"}
    on = browser.post("/console/jobs", data={**fields, "require_consent": "on"})
    off = browser.post("/console/jobs", data=fields)  # the box unticked
    assert on.status_code == off.status_code == 303
    jid_on, jid_off = (x.headers["location"].rsplit("/", 1)[1] for x in (on, off))
    assert service.board.get(jid_on).config["require_consent"] is True
    assert service.board.get(jid_off).config["require_consent"] is False
    assert "consent enforced" in browser.get(on.headers["location"]).text
    assert "turned off by the requester" in browser.get(off.headers["location"]).text


def test_cli_submit_carries_the_setting(env, monkeypatch):
    app, _client, people, service, _ = env
    monkeypatch.setattr(cli_jobs, "client_factory",
                        lambda url, token: TestClient(app, headers={"Authorization": f"Bearer {token}"}))
    token = ["--token", people.scientist.token]
    r = runner.invoke(cli_jobs.job_app, ["submit", "--purpose", PURPOSE, "--json", *token])
    assert r.exit_code == 0, r.output
    assert service.board.get(json.loads(r.stdout)["job_id"]).config["require_consent"] is True
    r = runner.invoke(cli_jobs.job_app, ["submit", "--purpose", PURPOSE, "--no-consent", *token])
    assert r.exit_code == 0, r.output
    assert "consent enforcement turned off" in " ".join(r.stdout.split())
    jid = re.search(r"job (job-[0-9a-f]+)", r.stdout).group(1)
    assert service.board.get(jid).config["require_consent"] is False


@pytest.mark.slow
def test_a_governed_job_excludes_a_withdrawn_subject_by_default(tmp_path):
    """Every telco customer consented to churn modelling, one withdrew: a job requested through
    the API without any consent setting trains without that customer's row."""
    ids = load_dataset("telco").ids.tolist()
    withdrawn = ids[17]
    registries = grant_consent(tmp_path, TELCO, PURPOSE, ids, withdrawn=[withdrawn])
    app = create_app(tmp_path)
    service = app.state.service
    people = seed_consortium(service, TELCO)
    with TestClient(app) as client:
        for partner in TELCO:
            r = client.put(f"/api/v1/budgets/{partner}", json={"epsilon": 5, "delta": 1e-4},
                           headers=people.admins[partner].headers)
            assert r.status_code == 200
        job = submit(client, people)  # no consent setting in the request
        approve_and_wait(client, service, people, job["job_id"], TELCO)
        view = client.get(f"/api/v1/jobs/{job['job_id']}", headers=people.scientist.headers).json()
    jid = job["job_id"]
    assert view["status"] == "finished", view.get("reason")
    with Ledger.open(tmp_path / "ledger.db") as ledger:
        [created] = ledger.events(job_id=jid, event_type=EventType.JOB_CREATED)
        assert created.payload["config"]["require_consent"] is True
        excluded = ledger.events(job_id=jid, event_type=EventType.DATA_EXCLUDED)
        assert sorted(e.payload["dataset"] for e in excluded) == sorted(TELCO)
        assert sum(e.payload["excluded"] for e in excluded) == 1
        assert sum(e.payload["total"] for e in excluded) == len(ids)
        used = ledger.events(job_id=jid, event_type=EventType.SUBJECTS_USED)
        assert sum(e.payload["subjects"] for e in used) == len(ids) - 1
        record = processing_record(ledger, jid)
        assert ledger.verify().ok
    # the subjects the job used (for erasure), each registry under its own keys: never the
    # withdrawn customer
    from sqlalchemy import select

    from fedpact.audit.store import job_subjects

    kept_withdrawn, kept_other = False, False
    for path in registries[1:] or registries:
        with Ledger.open(path) as ledger:
            pseudonym = ConsentRegistry(ledger).pseudonym
            with ledger.store.read() as connection:
                kept = set(connection.execute(select(job_subjects.c.subject).where(
                    job_subjects.c.job_id == jid)).scalars())
            kept_withdrawn |= pseudonym(withdrawn) in kept
            kept_other |= pseudonym(ids[0]) in kept
    assert not kept_withdrawn and kept_other
    md = record.to_markdown()
    assert "No consent check" not in md and "rows excluded for lack of consent" in md
    assert record.consent_checked

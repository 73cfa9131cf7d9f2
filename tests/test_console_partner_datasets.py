"""The console's request form on the consortium's own data (issue #14's console gap, issue #17
item 2 "requests that can run"): it offers the registered partner datasets by group with their
task, label, purpose, partner, admin and budget; a request naming them goes through the same
admission check as the API's; a refused request comes back with the entries kept and each
reason in plain words next to its field; every API field is in the form with the schema's
defaults. Through FastAPI's TestClient; no Flower run."""

from __future__ import annotations

import re
from html import unescape

import pytest
from fastapi.testclient import TestClient
from test_console import browser, csrf

from fedpact.audit import EventType
from fedpact.models.datasets import BUILTIN_SPECS
from fedpact.models.examples import write_partner_files
from fedpact.service.api.app import create_app
from fedpact.service.api.schemas import JobRequestIn
from fedpact.service.api.testing import Clock, seed_consortium
from fedpact.service.cli_datasets import registration_payload

GROUP = "acme-churn"
PARTNERS = ["north", "south", "west"]  # each with a privacy budget
NOBUDGET = "east"  # registered, but its admin has set no budget
PURPOSE = "churn_model"


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """A coordinator where four partners registered their own files (written by
    `fedpact.models.examples` from the public Telco rows: own names, an id column, the label as
    text, one mapping each) through the API, as `fedpact dataset register` does; three set a
    budget."""
    files = write_partner_files("telco", [*PARTNERS, NOBUDGET], tmp_path_factory.mktemp("partners"))
    clock = Clock()
    app = create_app(tmp_path_factory.mktemp("console-home"), clock=clock, start_worker=False)
    service = app.state.service
    people = seed_consortium(service, [*PARTNERS, NOBUDGET])
    with TestClient(app) as api:
        for name, csv, mapping in files:
            body = registration_payload(csv, mapping, name=name, group=GROUP)
            r = api.post("/api/v1/datasets", json=body, headers=people.admins[name].headers)
            assert r.status_code == 201, r.text
        for name in PARTNERS:
            r = api.put(f"/api/v1/budgets/{name}", json={"epsilon": 5.0, "delta": 1e-4},
                        headers=people.admins[name].headers)
            assert r.status_code == 200, r.text
        yield app, api, people, service, clock


@pytest.fixture()
def scientist(env):
    app, _api, people, _service, clock = env
    return browser(app, people, clock, people.scientist)


def requested(service) -> int:
    return len(service.ledger.events(event_type=EventType.JOB_REQUESTED))


def form_fields(client: TestClient, **changes) -> dict:
    """A request for the three budgeted datasets, as the form sends it (every box it shows)."""
    token = csrf(client.get("/console/jobs/new").text)
    fields = {"csrf": token, "dataset": GROUP, "partner_datasets": list(PARTNERS),
              "partitioning": "segment", "partners": "3", "purpose": PURPOSE, "rounds": "2",
              "target_epsilon": "1.0", "target_delta": "1e-5", "model": "logreg", "dp": "on",
              "require_consent_shown": "1", "require_consent": "on"}
    fields.update(changes)
    return {k: v for k, v in fields.items() if v is not None}


def row(html: str, name: str) -> str:
    match = re.search(rf'<tr data-dataset="{re.escape(name)}"[^>]*>(.*?)</tr>', html, re.S)
    assert match, f"no row for {name}"
    return match.group(0)


def field_error(html: str, field: str) -> str:
    match = re.search(rf'<div class="error small" id="{field}-error"[^>]*>(.*?)</div>', html, re.S)
    assert match, f"no message next to {field}"
    return " ".join(unescape(re.sub(r"<[^>]+>", " ", match.group(1))).split())


def input_value(html: str, name: str) -> str:
    match = re.search(rf'<input id="f-{name}" name="{name}"[^>]*value="([^"]*)"', html)
    assert match, f"no input {name}"
    return unescape(match.group(1))


def ticked(html: str) -> list[str]:
    return re.findall(r'<input type="checkbox" name="partner_datasets" value="([^"]+)" checked>', html)


def no_schema_text(html: str) -> None:
    """Nothing of pydantic's or the schema's own wording reaches the page."""
    for raw in ("Input should", "String should match pattern", "^[", "Value error", "pydantic"):
        assert raw not in html, raw


def test_the_form_offers_the_registered_datasets_and_every_api_field(env, scientist):
    _app, api, people, _service, _clock = env
    html = scientist.get("/console/jobs/new").text
    registered = {d["name"]: d for d in api.get("/api/v1/datasets",
                                                 headers=people.scientist.headers).json()}
    assert set(registered) == {*PARTNERS, NOBUDGET}
    assert f'<table class="datasets" data-group="{GROUP}">' in html
    assert f'<option value="{GROUP}"' in html  # the group, next to the built-in data sets
    for name in BUILTIN_SPECS:
        assert f'<option value="{name}"' in html
    for name, entry in registered.items():
        cells = row(html, name)
        assert f'name="partner_datasets" value="{name}"' in cells
        for fact in (entry["task"], entry["label"], entry["purpose"], entry["registered_by"],
                     people.admins[name].username):
            assert f"{fact}" in cells, (name, fact)
        assert 'data-admin="yes"' in cells
    for name in PARTNERS:
        assert 'data-budget="yes"' in row(html, name) and "left of 5.00" in row(html, name)
    assert 'data-budget="no"' in row(html, NOBUDGET) and "no budget" in row(html, NOBUDGET)
    # every field the API accepts is in the form, with the API schema's default
    names = set(re.findall(r'name="([a-z_]+)"', html))
    assert set(JobRequestIn.model_fields) <= names, set(JobRequestIn.model_fields) - names
    for name in ("rounds", "batch_size", "learning_rate", "max_grad_norm", "target_epsilon",
                 "target_delta", "local_epochs", "seed", "partners"):
        assert input_value(html, name) == str(JobRequestIn.model_fields[name].default), name
    assert re.search(r'<input type="checkbox" name="dp" checked>', html)
    assert re.search(r'<input type="checkbox" name="require_consent" checked>', html)


def test_a_request_naming_the_registered_datasets_creates_the_job(env, scientist):
    _app, api, people, service, _clock = env
    r = scientist.post("/console/jobs", data=form_fields(
        scientist, batch_size="256", learning_rate="0.2", max_grad_norm="0.8", local_epochs="2",
        seed="7", model_name="churn-acme", target_epsilon="1.5", rounds="4"))
    assert r.status_code == 303, r.text
    job_id = r.headers["location"].rsplit("/", 1)[1]
    job = api.get(f"/api/v1/jobs/{job_id}", headers=people.scientist.headers).json()
    request = job["request"]
    assert request["dataset"] == GROUP and request["partner_datasets"] == PARTNERS
    assert request["dataset"] not in BUILTIN_SPECS and job["partners"] == PARTNERS
    assert not any(p.startswith(tuple(BUILTIN_SPECS)) for p in job["partners"])
    assert request["group"] == GROUP and request["partitioning"] == "own"
    assert request["layout_sha256"] == api.get(
        "/api/v1/datasets/north", headers=people.scientist.headers).json()["layout_sha256"]
    assert (request["batch_size"], request["learning_rate"], request["max_grad_norm"],
            request["local_epochs"], request["seed"], request["model_name"], request["rounds"],
            request["target_epsilon"]) == (256, 0.2, 0.8, 2, 7, "churn-acme", 4, 1.5)
    assert job["status"] == "pending_approval" and job["awaiting"] == PARTNERS
    event = service.ledger.events(job_id=job_id, event_type=EventType.JOB_REQUESTED)[0]
    assert event.payload["partners"] == PARTNERS and event.payload["dataset"] == GROUP
    # the data set left on "the group of the ticked datasets" is their group
    r = scientist.post("/console/jobs", data=form_fields(scientist, dataset=""))
    assert r.status_code == 303, r.text
    inferred = service.board.get(r.headers["location"].rsplit("/", 1)[1])
    assert inferred.request["dataset"] == GROUP and inferred.partners == PARTNERS


def test_an_unregistered_dataset_is_named_with_the_entries_kept(env, scientist):
    _app, _api, _people, service, _clock = env
    before = requested(service)
    r = scientist.post("/console/jobs", data=form_fields(
        scientist, partner_datasets=["north", "nowhere"], rounds="7", batch_size="256",
        model_name="churn-acme"))
    assert r.status_code == 422
    html = r.text
    message = field_error(html, "partner_datasets")
    assert "nowhere is not a registered dataset" in message and "north" not in message
    assert "The request was not sent" in html
    assert ticked(html) == ["north"]  # the choices kept: the ticked box, the typed name
    assert re.search(r'<input name="partner_datasets" value="nowhere"', html)
    assert input_value(html, "rounds") == "7" and input_value(html, "batch_size") == "256"
    assert input_value(html, "model_name") == "churn-acme" and input_value(html, "purpose") == PURPOSE
    no_schema_text(html)
    assert requested(service) == before


def test_a_dataset_without_budget_is_named_with_who_sets_one(env, scientist):
    _app, _api, _people, service, _clock = env
    before = requested(service)
    r = scientist.post("/console/jobs", data=form_fields(
        scientist, partner_datasets=["north", NOBUDGET], rounds="5"))
    assert r.status_code == 422
    html = r.text
    assert field_error(html, "partner_datasets") == (
        f"{NOBUDGET} has no budget — a partner admin of {NOBUDGET} can set one on the Privacy "
        "budgets page")
    assert 'class="error"' in row(html, NOBUDGET) and 'class="error"' not in row(html, "north")
    assert sorted(ticked(html)) == sorted(["north", NOBUDGET]) and input_value(html, "rounds") == "5"
    no_schema_text(html)
    assert requested(service) == before
    # without DP no budget is needed: the same datasets are accepted
    r = scientist.post("/console/jobs", data=form_fields(
        scientist, partner_datasets=["north", NOBUDGET], dp=None))
    assert r.status_code == 303, r.text


def test_out_of_range_values_get_a_message_next_to_their_field(env, scientist):
    _app, _api, _people, service, _clock = env
    before = requested(service)
    top = JobRequestIn.model_fields["batch_size"].metadata[-1].le
    r = scientist.post("/console/jobs", data=form_fields(
        scientist, batch_size=str(top + 1), learning_rate="0", purpose="Churn!"))
    assert r.status_code == 422
    html = r.text
    assert field_error(html, "batch_size") == f"Batch size must be at most {top} (you typed {top + 1})"
    assert field_error(html, "learning_rate") == "Learning rate must be more than 0 (you typed 0)"
    assert "lower-case letters, digits or underscores" in field_error(html, "purpose")
    assert 'aria-describedby="batch_size-error"' in html
    assert input_value(html, "batch_size") == str(top + 1)
    assert sorted(ticked(html)) == sorted(PARTNERS)
    no_schema_text(html)
    assert requested(service) == before


def test_a_builtin_data_set_with_ticked_partner_datasets_says_what_to_choose(env, scientist):
    r = scientist.post("/console/jobs", data=form_fields(scientist, dataset="telco"))
    assert r.status_code == 422
    assert field_error(r.text, "dataset") == (
        "telco is a built-in data set, but partner datasets are ticked: choose their group as the "
        "data set, or untick them")
    no_schema_text(r.text)


def test_the_form_post_needs_the_sessions_csrf_token(env, scientist):
    _app, _api, _people, service, _clock = env
    before = requested(service)
    fields = form_fields(scientist)
    for token in (None, "wrong"):
        r = scientist.post("/console/jobs", data={**fields, "csrf": token} if token else
                           {k: v for k, v in fields.items() if k != "csrf"})
        assert r.status_code == 403 and "security token" in r.text
    assert requested(service) == before
    r = scientist.post("/console/jobs", data=fields)
    assert r.status_code == 303, r.text
    job = service.board.get(r.headers["location"].rsplit("/", 1)[1])
    assert job.partners == PARTNERS and job.request["partner_datasets"] == PARTNERS

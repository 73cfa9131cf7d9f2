"""Datasets as named objects of the consortium (issue #14 item 1): partners register their own
CSVs' public layouts with `fedpact dataset register` (the file is read on the partner's machine,
only the layout, task, label and purpose are sent), the coordinator lists them (API, CLI, console),
and a job request naming partner datasets is checked before anyone is asked to approve it.
The CLI reaches the API through FastAPI's TestClient. No Flower run here."""

from __future__ import annotations

import json
import re

import numpy as np
import pandas as pd
import pytest
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from fedpact.audit import EventType
from fedpact.federation.job import JobConfig
from fedpact.models.datasets import TELCO_CHURN, load_dataset
from fedpact.models.features import FeaturePipeline, PreprocessingNotPublic
from fedpact.service import cli_jobs
from fedpact.service.api.app import create_app
from fedpact.service.api.auth import totp
from fedpact.service.api.datasets import OPEN_STATES, layout_digest
from fedpact.service.api.governance import OPEN
from fedpact.service.api.testing import (
    PASSWORD,
    Clock,
    register_builtin_datasets,
    seed_consortium,
    write_mapping,
)
from fedpact.service.cli_datasets import dataset_app, registration_payload

GROUP = "telco-consortium"
PARTNERS = ["north", "south", "west"]  # the consortium's own files, split by internet service
OTHERS = ["bank-like", "odd", "orphan", "nobudget"]  # for the refusals
runner = CliRunner()


def flat(text: str) -> str:
    return " ".join(text.split())


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Three partner CSVs with their own names and mappings (same categories and bounds), and a
    few more for the bad cases; each CSV is the public Telco rows of one internet service."""
    folder = tmp_path_factory.mktemp("partners")
    data = load_dataset("telco")
    frame = data.features.copy()
    frame.insert(0, "customerID", data.ids.to_numpy())
    frame["Churn"] = np.where(data.labels == 1, "Yes", "No")
    out = {}
    for name, service in zip(PARTNERS + OTHERS, ["DSL", "Fiber optic", "No", "DSL", "DSL", "No", "No"],
                             strict=True):
        part = frame[frame["InternetService"] == service]
        csv = folder / f"{name}.csv"
        part.to_csv(csv, index=False)
        categories = {"InternetService": ("DSL", "Fiber optic")} if name == "odd" else None
        out[name] = (csv, write_mapping(TELCO_CHURN, folder / f"{name}.toml", name=name,
                                        categories=categories))
    out["sample_id"] = str(frame["customerID"].iloc[0])
    return out


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    home = tmp_path_factory.mktemp("registry-home")
    clock = Clock()
    app = create_app(home, clock=clock, start_worker=False)
    people = seed_consortium(app.state.service, PARTNERS + OTHERS)
    with TestClient(app) as client:
        yield client, people, app.state.service, clock


def cli_against(app, monkeypatch):
    """`fedpact dataset ...` against `app`; every request body the CLI sends is kept."""
    sent: list[bytes] = []

    def factory(url, token):
        client = TestClient(app, headers={"Authorization": f"Bearer {token}"})
        client.event_hooks = {"request": [lambda request: sent.append(request.read())], "response": []}
        return client

    monkeypatch.setattr(cli_jobs, "client_factory", factory)

    def invoke(*args):
        return runner.invoke(dataset_app, [str(a) for a in args])

    return invoke, sent


@pytest.fixture()
def cli(env, monkeypatch):
    return cli_against(env[0].app, monkeypatch)


def register(invoke, files, people, name, group=GROUP):
    csv, mapping = files[name]
    r = invoke("register", csv, "--mapping", mapping, "--name", name, "--group", group,
               "--token", people.admins[name].token, "--json")
    assert r.exit_code == 0, r.output
    return json.loads(r.stdout)


def request(client, people, **overrides):
    body = {"dataset": GROUP, "partner_datasets": PARTNERS, "purpose": "churn_model_training",
            "rounds": 2, **overrides}
    return client.post("/api/v1/jobs", json=body, headers=people.scientist.headers)


def set_budget(client, people, name, epsilon=5.0):
    r = client.put(f"/api/v1/budgets/{name}", json={"epsilon": epsilon, "delta": 1e-4},
                   headers=people.admins[name].headers)
    assert r.status_code == 200, r.text


@pytest.fixture(scope="module")
def registered(env, files, tmp_path_factory):
    """north, south, west registered through the CLI by their own admins, with budgets; and the
    datasets of the bad cases: another group, another layout, no admin, no budget."""
    client, people, service, _ = env
    mp = pytest.MonkeyPatch()
    invoke, sent = cli_against(client.app, mp)
    entries = {name: register(invoke, files, people, name) for name in PARTNERS}
    register(invoke, files, people, "bank-like", group="bank-consortium")
    for name in ("odd", "orphan", "nobudget"):
        register(invoke, files, people, name)
    mp.undo()
    for name in PARTNERS + ["bank-like", "odd", "orphan"]:
        set_budget(client, people, name)
    for holder in (people.admins["orphan"].username, people.everyone.username):
        service.accounts.revoke(holder, "partner_admin", "orphan", revoked_by="operator:test")
    return entries, sent


# --------------------------------------------------------------------------- registering


def test_register_sends_only_the_public_layout(env, files, registered):
    client, people, service, _ = env
    entries, sent = registered
    csv, mapping = files["north"]
    north = entries["north"]
    assert north["group"] == GROUP and north["task"] == "churn" and north["label"] == "Churn"
    assert north["features"] == len(TELCO_CHURN.features)
    assert north["layout"] == FeaturePipeline.public(TELCO_CHURN).layout()
    assert north["layout_sha256"] == layout_digest(north["layout"]) == entries["south"]["layout_sha256"]
    assert north["registered_by"] == people.admins["north"].username

    bodies = [b.decode() for b in sent if b]
    assert len(bodies) == len(PARTNERS) + 4
    body = json.loads(bodies[0])
    assert set(body) == {"name", "group", "task", "label", "positive", "purpose", "layout"}
    event = next(e for e in service.ledger.events(event_type=EventType.DATASET_REGISTERED)
                 if e.payload["dataset"] == "north")
    assert event.event_id == north["event_id"] and event.actor == f"user:{people.admins['north'].username}"
    assert event.payload["layout_sha256"] == north["layout_sha256"]
    assert event.payload["features"] == north["features"]
    recorded = json.dumps(event.payload)
    for text in [*bodies, recorded]:
        for secret in (str(csv), str(csv.resolve()), str(mapping.resolve()), csv.parent.name,
                       files["sample_id"]):
            assert secret not in text
    # no row value either: no customer's charges, only the declared bounds
    frame = pd.read_csv(csv, dtype=str)
    assert not set(frame["customerID"].head(50)) & set(re.findall(r"[\w-]+", bodies[0]))


def test_payload_builder_and_a_mapping_without_bounds(env, files, tmp_path, cli):
    csv, mapping = files["north"]
    body = registration_payload(csv, mapping, name="north", group=GROUP, purpose="churn_model_training")
    assert body["purpose"] == "churn_model_training" and "path" not in json.dumps(body).lower()
    text = mapping.read_text()
    bare = tmp_path / "bare.toml"
    bare.write_text(text[:text.index("[bounds]")] + text[text.index("[missing]"):])
    with pytest.raises(PreprocessingNotPublic) as caught:
        registration_payload(csv, bare, name="north", group=GROUP)
    assert "numeric column 'tenure' has no declared bounds" in str(caught.value)
    invoke, sent = cli
    people = env[1]
    r = invoke("register", csv, "--mapping", bare, "--name", "north", "--group", GROUP,
               "--token", people.admins["north"].token)
    assert r.exit_code == 2
    out = flat(r.output)
    assert "a node will refuse this mapping in a federated job, so it is not registered" in out
    assert "dataset 'north': 3 problems found" in out
    assert "numeric column 'MonthlyCharges' has no declared bounds: set [bounds]" in out
    assert "fedpact data check" in out
    assert sent == []  # nothing was sent


def test_a_broken_csv_is_one_line_and_nothing_is_sent(env, files, tmp_path, cli):
    _, people, *_ = env
    invoke, sent = cli
    r = invoke("register", tmp_path / "nope.csv", "--mapping", files["north"][1], "--name", "north",
               "--group", GROUP, "--token", people.admins["north"].token)
    assert r.exit_code == 2 and "file not found" in r.output and sent == []


def test_registering_needs_partner_admin_for_that_name(env, files, registered):
    client, people, *_ = env
    body = registration_payload(*files["south"], name="south", group=GROUP)
    r = client.post("/api/v1/datasets", json=body, headers=people.admins["north"].headers)
    assert r.status_code == 403
    assert "role partner_admin for south required" in r.json()["detail"]
    r = client.post("/api/v1/datasets", json=body, headers=people.scientist.headers)
    assert r.status_code == 403 and "role partner_admin required" in r.json()["detail"]
    r = client.post("/api/v1/datasets", json=body)
    assert r.status_code == 401


@pytest.mark.parametrize("change,fragment", [
    (lambda b: b["layout"]["bounds"].pop("tenure"), "no [low, high] for numeric 'tenure'"),
    (lambda b: b["layout"]["bounds"].update(tenure=[5, 1]), "bounds.tenure: give two finite"),
    (lambda b: b["layout"]["categorical"].update(gender=["F", "F"]), "categorical.gender lists 'F' twice"),
    (lambda b: b["layout"].update(means={"tenure": 30}), "means"),
    (lambda b: b.update(path="/home/x/north.csv"), "path"),
    (lambda b: b.update(name="../north"), "name"),
    (lambda b: b.update(group="bank churn"), "group"),
    (lambda b: b.update(task="uplift"), "task"),
    (lambda b: b.update(purpose="Churn!"), "purpose"),
    (lambda b: b.update(layout={"categorical": {}, "numeric": []}), "no feature column"),
])
def test_malformed_registrations_get_422_naming_the_field(env, files, change, fragment):
    client, people, *_ = env
    body = registration_payload(*files["north"], name="north", group=GROUP)
    change(body)
    r = client.post("/api/v1/datasets", json=body, headers=people.admins["north"].headers)
    assert r.status_code == 422, r.text
    assert fragment in r.json()["detail"]


def test_a_builtin_name_is_not_a_group(env, files):
    client, people, *_ = env
    body = registration_payload(*files["north"], name="north", group="telco")
    r = client.post("/api/v1/datasets", json=body, headers=people.admins["north"].headers)
    assert r.status_code == 422 and "built-in data set" in r.json()["detail"]


# --------------------------------------------------------------------------- listing


def test_list_and_get_over_api_and_cli(env, registered, cli):
    client, people, *_ = env
    listed = client.get("/api/v1/datasets", params={"group": GROUP}, headers=people.scientist.headers)
    assert listed.status_code == 200
    assert [d["name"] for d in listed.json()] == sorted(PARTNERS + ["nobudget", "odd", "orphan"])
    everyone = client.get("/api/v1/datasets", headers=people.nodes["north"].headers).json()
    assert {d["name"] for d in everyone} >= {"bank-like", *PARTNERS}
    one = client.get("/api/v1/datasets/north", headers=people.compliance.headers).json()
    assert one["admins"] == sorted([people.admins["north"].username, "root-of-all"])
    assert client.get("/api/v1/datasets/east", headers=people.scientist.headers).status_code == 404
    assert client.get("/api/v1/datasets/bad%20name", headers=people.scientist.headers).status_code == 422
    invoke, _ = cli
    r = invoke("list", "--group", GROUP, "--token", people.scientist.token, "--json")
    assert r.exit_code == 0 and {d["name"] for d in json.loads(r.stdout)} >= set(PARTNERS)
    r = invoke("list", "--token", people.scientist.token)
    assert r.exit_code == 0 and "north" in r.stdout and "7 datasets" in r.stdout


def test_slash_names_and_builtin_splits_are_ordinary_datasets(tmp_path):
    app = create_app(tmp_path, start_worker=False)
    service = app.state.service
    names = register_builtin_datasets(service, "telco", "segment", 3)
    assert names[0] == "telco-churn/dsl"
    people = seed_consortium(service, names)
    with TestClient(app) as client:
        r = client.get("/api/v1/datasets/telco-churn/dsl", headers=people.scientist.headers)
        assert r.status_code == 200 and r.json()["group"] == "telco-churn"
        assert r.json()["registered_by"] == "seed"
    service.close()


def test_console_lists_the_datasets(env, registered):
    client, people, service, clock = env
    browser = TestClient(client.app, follow_redirects=False)
    assert browser.get("/console/datasets").status_code == 303
    clock.advance(31)
    member = people.scientist
    r = browser.post("/console/login", data={"username": member.username, "password": PASSWORD,
                                             "code": totp(member.totp_secret, clock()),
                                             "next": "/console/datasets"})
    assert r.status_code == 303
    page = browser.get("/console/datasets")
    assert page.status_code == 200
    assert 'data-dataset="north"' in page.text and GROUP in page.text
    assert people.admins["north"].username in page.text
    assert 'href="/console/datasets"' in browser.get("/console/jobs").text


# --------------------------------------------------------------------------- requesting jobs


def test_a_job_on_registered_partner_datasets(env, registered):
    client, people, service, _ = env
    r = request(client, people)
    assert r.status_code == 201, r.text
    job = r.json()
    assert job["partners"] == PARTNERS and job["status"] == "pending_approval"
    assert job["awaiting"] == PARTNERS and job["dataset"] == GROUP and job["task"] == "churn"
    assert "consent enforced where the partner's dataset has a subject id column" in job["consent"]
    assert [b["dataset"] for b in job["budgets"]] == PARTNERS and all(b["ok"] for b in job["budgets"])
    view = service.board.get(job["job_id"])
    config = JobConfig(**view.config)
    assert config.partners == "north,south,west" and config.partitioning == "own"
    assert config.num_partitions == 3 and config.dataset == GROUP
    assert view.model_name == "churn-telco-consortium"
    digest = registered[0]["north"]["layout_sha256"]
    assert view.request["group"] == GROUP and view.request["layout_sha256"] == digest
    assert view.request["features"] == list(TELCO_CHURN.features)
    requested = service.ledger.events(job_id=job["job_id"], event_type=EventType.JOB_REQUESTED)[0]
    assert requested.payload["partners"] == PARTNERS and requested.payload["dataset"] == GROUP
    assert requested.payload["group"] == GROUP and requested.payload["layout_sha256"] == digest
    assert requested.payload["partitioning"] == "own"
    # the partners' admins see it and decide on it as on any job
    mine = client.get("/api/v1/jobs", headers=people.admins["south"].headers).json()
    assert job["job_id"] in {j["job_id"] for j in mine}
    r = client.post(f"/api/v1/jobs/{job['job_id']}/approve", json={"partner": "south"},
                    headers=people.admins["south"].headers)
    assert r.status_code == 200 and r.json()["awaiting"] == ["north", "west"]
    r = client.get("/api/v1/node/jobs", headers=people.nodes["north"].headers)
    assert r.status_code == 200


def test_reregistering_while_a_job_is_open(env, files, registered):
    client, people, service, _ = env
    job_id = request(client, people).json()["job_id"]
    body = registration_payload(*files["west"], name="west", group=GROUP)
    r = client.post("/api/v1/datasets", json=body, headers=people.admins["west"].headers)
    assert r.status_code == 201  # the same layout: registered again, a new event
    assert r.json()["event_id"] != registered[0]["west"]["event_id"]
    replaced = service.ledger.events(event_type=EventType.DATASET_REGISTERED)[-1]
    assert replaced.payload["replaces"] == registered[0]["west"]["event_id"]
    changed = json.loads(json.dumps(body))
    changed["layout"]["bounds"]["tenure"] = [0, 80]
    r = client.post("/api/v1/datasets", json=changed, headers=people.admins["west"].headers)
    assert r.status_code == 409
    detail = r.json()["detail"]
    assert job_id in detail and "layout cannot change" in detail
    for open_job in service.datasets.open_jobs("west"):
        client.post(f"/api/v1/jobs/{open_job}/reject", json={"partner": "west", "reason": "layout change"},
                    headers=people.admins["west"].headers)
    r = client.post("/api/v1/datasets", json=changed, headers=people.admins["west"].headers)
    assert r.status_code == 201 and r.json()["layout"]["bounds"]["tenure"] == [0.0, 80.0]
    r = request(client, people)
    assert r.status_code == 422
    assert "column 'tenure': bounds differ: [0, 72] in north, south; [0, 80] in west" in r.json()["detail"]
    r = client.post("/api/v1/datasets", json=body, headers=people.admins["west"].headers)
    assert r.status_code == 201  # back to the consortium's layout


@pytest.mark.parametrize("overrides,fragments", [
    ({"partner_datasets": ["north", "east"]}, ["partner dataset(s) east not registered",
                                              "fedpact dataset register"]),
    ({"partner_datasets": ["north", "bank-like"]},
     ["partner dataset bank-like belongs to group 'bank-consortium', not 'telco-consortium'"]),
    ({"partner_datasets": ["north", "odd"]},
     ["layouts differ", "column 'InternetService': category 'No' is declared by north but not by odd"]),
    ({"partner_datasets": ["north", "orphan"]},
     ["partner dataset orphan has no partner admin",
      "fedpact admin role grant USER partner_admin --scope orphan"]),
    ({"partner_datasets": ["north", "nobudget"]},
     ["partner dataset nobudget has no privacy budget", "console (Privacy budgets, /console/budgets)",
      "PUT /api/v1/budgets/nobudget", "fedpact privacy set-budget nobudget"]),
    ({"task": "propensity"}, ["partner dataset north is a churn dataset, not propensity"]),
    ({"features": ["tenure"]}, ["features: columns left out", "the layout registered for north"]),
    ({"partitioning": "iid"}, ["leave partitioning out"]),
    ({"partners": 2}, ["partners = 2 but partner_datasets names 3"]),
    ({"partner_datasets": ["north", "north"]}, ["names north more than once"]),
    ({"partner_datasets": ["north", "../x"]}, ["partner_datasets"]),
    ({"partner_datasets": []}, ["partner_datasets"]),
    ({"dataset": "telco"}, ["'telco' is a built-in data set; with partner_datasets name their group"]),
    ({"dataset": "nope", "partner_datasets": None}, ["dataset 'nope' is not a built-in data set"]),
])
def test_bad_requests_are_refused_before_anyone_is_asked(env, registered, overrides, fragments):
    client, people, service, _ = env
    before = len(service.ledger.events(event_type=EventType.JOB_REQUESTED))
    r = request(client, people, **overrides)
    assert r.status_code == 422, r.text
    detail = r.json()["detail"]
    for fragment in fragments:
        assert fragment in detail, detail
    assert len(service.ledger.events(event_type=EventType.JOB_REQUESTED)) == before


def test_every_problem_is_named_at_once(env, registered):
    client, people, *_ = env
    r = request(client, people, partner_datasets=["north", "east", "bank-like", "nobudget"])
    detail = r.json()["detail"]
    assert r.status_code == 422
    assert "east not registered" in detail and "bank-like belongs to group" in detail
    assert "nobudget has no privacy budget" in detail


def test_a_job_without_dp_needs_no_budget(env, registered):
    client, people, *_ = env
    r = request(client, people, partner_datasets=["north", "nobudget"], dp=False)
    assert r.status_code == 201, r.text
    assert r.json()["partners"] == ["north", "nobudget"]


def test_builtin_requests_are_unchanged(env):
    client, people, service, _ = env
    r = client.post("/api/v1/jobs", json={"dataset": "telco", "purpose": "churn_model_training",
                                          "partners": 3, "partitioning": "segment"},
                    headers=people.scientist.headers)
    assert r.status_code == 201, r.text
    view = service.board.get(r.json()["job_id"])
    assert "partner_datasets" not in view.request and "group" not in view.request
    assert view.config["partners"] == "" and view.partners[0] == "telco-churn/dsl"


def test_open_states_agree_with_governance():
    assert tuple(OPEN_STATES) == tuple(OPEN)

"""`fedpact admin|job|model|serve` commands (Typer apps in service/cli_jobs.py), with the API
reached through FastAPI's TestClient instead of the network. No Flower run here."""

from __future__ import annotations

import json

import pytest
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from fedpact.audit import EventType, Ledger
from fedpact.federation.coordinator import partner_datasets
from fedpact.federation.job import JobConfig
from fedpact.service import cli_jobs
from fedpact.service.api.app import create_app

TELCO = partner_datasets(JobConfig(dataset="telco", partitioning="segment", num_partitions=3))
runner = CliRunner()


def flat(text: str) -> str:
    """Output with rich's line wrapping undone."""
    return " ".join(text.split())


def admin(home, *args, input=None):
    result = runner.invoke(cli_jobs.admin_app, [*args, "--home", str(home)], input=input)
    return result


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """A run folder with accounts made by `fedpact admin`, and the app serving it."""
    home = tmp_path_factory.mktemp("cli-home")
    assert admin(home, "user", "create", "dana", "--password-stdin", input="correct horse battery\n").exit_code == 0
    assert admin(home, "role", "grant", "dana", "data_scientist").exit_code == 0
    assert admin(home, "user", "create", "ada", "--password-stdin", input="correct horse battery\n").exit_code == 0
    assert admin(home, "role", "grant", "ada", "partner_admin", "--scope", TELCO[0]).exit_code == 0
    tokens = {}
    for user in ("dana", "ada"):
        r = admin(home, "token", "issue", user, "--days", "2", "--json")
        assert r.exit_code == 0, r.output
        tokens[user] = json.loads(r.stdout)["token"]
    app = create_app(home, start_worker=False)
    yield home, app, tokens
    app.state.service.close()


@pytest.fixture()
def api(site, monkeypatch):
    home, app, tokens = site
    monkeypatch.setattr(cli_jobs, "client_factory",
                        lambda url, token: TestClient(app, headers={"Authorization": f"Bearer {token}"}))
    return home, app, tokens


def test_user_creation_prints_the_totp_enrolment_once(tmp_path):
    r = admin(tmp_path, "user", "create", "erin", "--password-stdin", input="correct horse battery\n")
    assert r.exit_code == 0
    assert "secret:" in r.stdout and "otpauth://totp/fedpact:erin?secret=" in r.stdout
    r = admin(tmp_path, "user", "create", "node-dsl", "--machine")
    assert r.exit_code == 0 and "secret:" not in r.stdout
    r = admin(tmp_path, "role", "grant", "node-dsl", "node", "--scope", TELCO[0])
    assert r.exit_code == 0
    listed = json.loads(admin(tmp_path, "user", "list", "--json").stdout)
    assert {u["username"]: u["kind"] for u in listed} == {"erin": "person", "node-dsl": "machine"}
    assert listed[1]["roles"] == [{"role": "node", "scope": TELCO[0]}]


@pytest.mark.parametrize("args,message", [
    (["role", "grant", "erin", "partner_admin"], "needs a scope"),
    (["role", "grant", "ghost", "data_scientist"], "no user 'ghost'"),
    (["token", "issue", "erin", "--days", "0"], "must expire within"),
    (["token", "revoke", "0123456789abcdef"], "no token"),
])
def test_admin_errors_are_one_line_and_exit_2(tmp_path, args, message):
    admin(tmp_path, "user", "create", "erin", "--password-stdin", input="correct horse battery\n")
    r = admin(tmp_path, *args)
    assert r.exit_code == 2
    assert message in flat(r.output) and "Traceback" not in r.output


def test_short_password_is_refused(tmp_path):
    r = admin(tmp_path, "user", "create", "erin", "--password-stdin", input="short\n")
    assert r.exit_code == 2 and "at least 12 characters" in flat(r.output)


def test_tokens_list_and_revoke(tmp_path):
    admin(tmp_path, "user", "create", "erin", "--password-stdin", input="correct horse battery\n")
    token = json.loads(admin(tmp_path, "token", "issue", "erin", "--json").stdout)
    rows = json.loads(admin(tmp_path, "token", "list", "--json").stdout)
    assert rows[0]["token_id"] == token["token_id"] and rows[0]["state"] == "active"
    secret = token["token"].split("_", 2)[2]  # token_urlsafe may itself hold "_"
    assert secret and secret not in admin(tmp_path, "token", "list").stdout
    assert admin(tmp_path, "token", "revoke", token["token_id"]).exit_code == 0
    assert json.loads(admin(tmp_path, "token", "list", "--json").stdout)[0]["state"] == "revoked"
    with Ledger.open(tmp_path / "ledger.db") as ledger:
        kinds = [e.event_type for e in ledger.events()]
    assert kinds.count("admin.token_issued") == 1 and kinds.count("admin.token_revoked") == 1


def test_job_submit_approve_reject_and_status_through_the_api(api):
    home, app, tokens = api
    r = runner.invoke(cli_jobs.job_app, ["submit", "--purpose", "churn_model_training", "--rounds", "2",
                                         "--token", tokens["dana"], "--json"])
    assert r.exit_code == 0, r.output
    job = json.loads(r.stdout)
    jid = job["job_id"]
    assert job["awaiting"] == TELCO
    r = runner.invoke(cli_jobs.job_app, ["approve", jid, "--partner", TELCO[0], "--token", tokens["ada"]])
    assert r.exit_code == 0 and "approval recorded" in flat(r.stdout)
    assert "the job is now pending_approval" in flat(r.stdout)
    r = runner.invoke(cli_jobs.job_app, ["approve", jid, "--partner", TELCO[1], "--token", tokens["ada"]])
    assert r.exit_code == 2 and f"partner_admin for {TELCO[1]} required" in flat(r.output)
    r = runner.invoke(cli_jobs.job_app, ["reject", jid, "--partner", TELCO[0], "--reason", "x",
                                         "--token", tokens["ada"]])
    assert r.exit_code == 2 and "withdraw that with revoke" in flat(r.output)
    r = runner.invoke(cli_jobs.job_app, ["revoke", jid, "--partner", TELCO[0], "--reason", "budget review",
                                         "--token", tokens["ada"]])
    assert r.exit_code == 0 and "now revoked" in flat(r.stdout)
    r = runner.invoke(cli_jobs.job_app, ["status", jid, "--token", tokens["dana"]])
    assert r.exit_code == 0
    assert "revoked" in r.stdout and TELCO[0] in r.stdout and "budget review" in flat(r.stdout)
    r = runner.invoke(cli_jobs.job_app, ["status", "--token", tokens["dana"], "--json"])
    assert jid in {j["job_id"] for j in json.loads(r.stdout)}
    r = runner.invoke(cli_jobs.job_app, ["result", jid, "--token", tokens["dana"]])
    assert r.exit_code == 2 and "has no result" in flat(r.output)
    with Ledger.open(home / "ledger.db") as ledger:
        kinds = [e.event_type for e in ledger.events(job_id=jid)]
    assert kinds == ["job.requested", "job.approved", "job.revoked"]


def test_job_submit_with_bad_settings_names_the_field(api):
    _home, _app, tokens = api
    r = runner.invoke(cli_jobs.job_app, ["submit", "--purpose", "churn", "--rounds", "0",
                                         "--token", tokens["dana"]])
    assert r.exit_code == 2 and "rounds" in flat(r.output) and "Traceback" not in r.output


def test_commands_without_a_token_or_coordinator_fail_cleanly(monkeypatch):
    monkeypatch.delenv("FEDPACT_TOKEN", raising=False)
    r = runner.invoke(cli_jobs.job_app, ["status"])
    assert r.exit_code == 2 and "no API token" in flat(r.output)
    r = runner.invoke(cli_jobs.model_app, ["list", "--token", "fpt_x_y", "--url", "http://127.0.0.1:9"])
    assert r.exit_code == 3 and "cannot reach the coordinator" in flat(r.output)


def test_model_commands_report_unknown_models(api):
    _home, _app, tokens = api
    r = runner.invoke(cli_jobs.model_app, ["list", "--token", tokens["dana"], "--json"])
    assert r.exit_code == 0 and json.loads(r.stdout) == []
    r = runner.invoke(cli_jobs.model_app, ["card", "churn-telco@4", "--token", tokens["dana"]])
    assert r.exit_code == 2 and "no model 'churn-telco@4'" in flat(r.output)
    r = runner.invoke(cli_jobs.model_app, ["score", "missing.pt", "rows.csv", "--mapping", "m.toml"])
    assert r.exit_code == 2 and "model file missing.pt not found" in flat(r.output)


def test_serve_is_a_typer_command_with_loopback_default():
    import inspect

    import typer

    app = typer.Typer()
    app.command()(cli_jobs.serve)
    r = runner.invoke(app, ["--help"])
    assert r.exit_code == 0 and "127.0.0.1" in r.stdout and "--port" in r.stdout
    assert inspect.signature(cli_jobs.serve).parameters["host"].default == "127.0.0.1"


def test_scoring_is_recorded_as_a_data_access(tmp_path):
    """Scoring a partner's CSV with an exported model writes data.accessed to --home's ledger."""
    import numpy as np
    import torch

    from fedpact.models.datasets import TELCO_CHURN, load_dataset
    from fedpact.models.features import FeaturePipeline
    from fedpact.models.networks import build_model
    from fedpact.service.api.registry import export_torchscript

    data = load_dataset("telco")
    layout = FeaturePipeline.public(TELCO_CHURN).layout()
    width = sum(len(v) for v in layout["categorical"].values()) + len(layout["numeric"])
    torch.save({"state_dict": build_model("logreg", width, seed=1).state_dict(), "model": "logreg",
                "layout": layout}, tmp_path / "model.pt")
    export_torchscript(tmp_path / "model.pt", tmp_path / "export.pt", {"model": "churn-telco@7"})
    frame = data.features.head(150).copy()
    frame.insert(0, "customerID", data.ids.head(150))
    frame.to_csv(tmp_path / "rows.csv", index=False)
    from fedpact.service.api.testing import write_mapping

    mapping = write_mapping(TELCO_CHURN, tmp_path / "telco.toml")
    r = runner.invoke(cli_jobs.model_app, ["score", str(tmp_path / "export.pt"), str(tmp_path / "rows.csv"),
                                           "--mapping", str(mapping), "--home", str(tmp_path / "h"),
                                           "--out", str(tmp_path / "scores.csv")])
    assert r.exit_code == 0, r.output
    lines = (tmp_path / "scores.csv").read_text().splitlines()
    assert lines[0] == "customerID,score" and len(lines) == 151
    scores = np.array([float(x.split(",")[1]) for x in lines[1:]])
    assert ((scores > 0) & (scores < 1)).all()
    with Ledger.open(tmp_path / "h" / "ledger.db") as ledger:
        [ev] = ledger.events(event_type=EventType.DATA_ACCESSED)
    assert ev.payload["rows"] == 150 and ev.payload["purpose"] == "scoring"
    assert ev.payload["model"] == "churn-telco@7" and ev.actor == "node:acme-telco"

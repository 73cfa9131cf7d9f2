"""Everything a node sends is classified, and the ε it reports covers all of it (issue 13).

The curious coordinator's view: a simulated job runs with a tap on the coordinator's Grid that
keeps every reply a node sent (handshake, training, evaluation); every field of every reply must
be classified in `fedpact.privacy.releases` — an unclassified field fails the test — and nothing
carries the partner's file path or its training loss. The total ε is recomputed independently
with dp-accounting from the mechanisms the replies declare. Node policies refuse jobs.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

import fedpact.federation.server_app as server_app
from fedpact.audit import Ledger
from fedpact.errors import FedpactError
from fedpact.federation.coordinator import partner_datasets
from fedpact.federation.job import JobConfig
from fedpact.federation.rounds import DelegatingGrid
from fedpact.federation.simulation import run_simulated_job
from fedpact.models.datasets import DatasetSpec, validate_frame
from fedpact.models.features import FeaturePipeline, PreprocessingNotPublic
from fedpact.models.networks import build_model
from fedpact.privacy.budget import PrivacyBudgets
from fedpact.privacy.crosscheck import google_epsilons
from fedpact.privacy.node_policy import NodePolicy, PolicyRefusal
from fedpact.privacy.releases import (
    NON_PRIVATE_MODEL,
    ROW_COUNTS,
    Protection,
    ReleaseRefused,
    check_reply,
    classify,
    release_table,
)

PHASES = {"query": "query", "train": "train", "evaluate": "evaluate"}


class TapGrid(DelegatingGrid):
    """The coordinator's Grid, keeping a copy of every reply (what the coordinator learns)."""

    def __init__(self, grid, replies: list):
        super().__init__(grid)
        self.replies = replies

    def pull_messages(self, message_ids):
        got = list(self._grid.pull_messages(message_ids))
        self.replies.extend(got)
        return got

    def send_and_receive(self, messages, *, timeout=None):
        got = list(self._grid.send_and_receive(messages, timeout=timeout))
        self.replies.extend(got)
        return got


def _fields(msg) -> tuple[str, dict[str, list[str]]]:
    kind = str(msg.metadata.message_type).split(".")[-1].lower()
    fields = {name: list(record.keys()) for name, record in msg.content.items()}
    return kind, fields


@pytest.fixture(scope="module")
def tapped_job(tmp_path_factory):
    """A 2-round DP telco job in simulation, evaluated after rounds 1 and 2, tapped."""
    home = tmp_path_factory.mktemp("tapped")
    job = JobConfig(dataset="telco", partitioning="segment", rounds=2, eval_every=1,
                    home=str(home), require_consent=False, learning_rate=0.3)
    with Ledger.open(job.ledger_path) as ledger:
        for name in partner_datasets(job):
            PrivacyBudgets(ledger).set(name, 5.0, 1e-5, actor="admin")
    replies: list = []
    original = server_app.run_job
    patch = pytest.MonkeyPatch()
    patch.setattr(server_app, "run_job",
                  lambda grid, *a, **kw: original(TapGrid(grid, replies), *a, **kw))
    try:
        result = run_simulated_job(job)
    finally:
        patch.undo()
    return job, result, replies


@pytest.mark.slow
def test_every_field_a_node_sends_is_classified(tapped_job):
    job, result, replies = tapped_job
    kinds = {}
    for msg in replies:
        assert not msg.has_error(), msg.error.reason
        kind, fields = _fields(msg)
        kinds[kind] = kinds.get(kind, 0) + 1
        for record, keys in fields.items():
            for key in keys:
                release = classify(kind, record, key)
                assert release is not None, f"unclassified field {kind}:{record}.{key}"
        check_reply(kind, fields, NodePolicy().allow, dp=job.dp)
    assert kinds == {"query": 3, "train": 6, "evaluate": 6}
    text = json.dumps([{n: dict(r.items()) if hasattr(r, "items") else str(r)
                        for n, r in m.content.items() if n != "arrays"} for m in replies], default=str)
    assert str(Path(job.home).resolve()) not in text and "shared/data" not in text
    assert "train-loss" not in text and "sq-error" not in text and "roc-auc" not in text


@pytest.mark.slow
def test_the_reported_epsilon_covers_every_release_and_is_recomputed_independently(tapped_job):
    job, result, replies = tapped_job
    evals = [m for m in replies if _fields(m)[0] == "evaluate"]
    trains = [m for m in replies if _fields(m)[0] == "train"]
    for partner in result.partners:
        last_train = [m for m in trains if m.content["access"]["partner"] == partner.name][-1]
        last_eval = [m for m in evals if m.content["access"]["partner"] == partner.name][-1]
        t, e = last_train.content["metrics"], last_eval.content["metrics"]
        history = [(t["noise-multiplier"], t["sample-rate"], int(t["steps"])),
                   (e["eval-noise-multiplier"], 1.0, int(e["eval-releases"]))]
        assert int(e["eval-releases"]) == 2
        rdp, pld = google_epsilons(history, job.target_delta)
        assert partner.epsilon == pytest.approx(rdp, rel=0.01)
        assert pld <= partner.epsilon * 1.001
        # the evaluation is inside the account: the last release is the eval's, and ε ≤ target
        assert float(e["epsilon"]) == pytest.approx(partner.epsilon, rel=1e-9)
        assert float(t["epsilon"]) < partner.epsilon <= job.target_epsilon * 1.005
    # The test suite's nodes run in reproducible mode (conftest): the result must say not private.
    assert not result.private
    assert any("reproducible mode" in why for why in result.not_private_reasons)


def test_unclassified_field_and_disallowed_release_are_refused():
    with pytest.raises(ReleaseRefused, match="train-loss is not classified"):
        check_reply("train", {"metrics": ["epsilon", "train-loss"]}, {ROW_COUNTS})
    with pytest.raises(ReleaseRefused, match="row-counts"):
        check_reply("train", {"metrics": ["num-examples"]}, set())
    with pytest.raises(ReleaseRefused, match=NON_PRIVATE_MODEL):
        check_reply("train", {"arrays": ["linear.weight"]}, {ROW_COUNTS}, dp=False)
    check_reply("train", {"arrays": ["linear.weight"]}, {ROW_COUNTS, NON_PRIVATE_MODEL}, dp=False)
    assert classify("evaluate", "histogram", "pos").protection is Protection.DP
    assert "| evaluate | `histogram.pos` | dp |" in release_table()


def test_node_policy_file_is_strict_and_refuses_jobs_beyond_its_limits(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text('max_epsilon_per_jb = 1\nallow = ["row-counts", "everything"]\n')
    with pytest.raises(FedpactError) as err:
        NodePolicy.load(bad)
    assert "did you mean 'max_epsilon_per_job'" in str(err.value) and "'everything'" in str(err.value)
    good = tmp_path / "policy.toml"
    good.write_text("[policy]\nmax_epsilon_per_job = 0.5\nmax_epsilon_total = 2\nmin_rows = 1000\n")
    policy = NodePolicy.load(good)
    with pytest.raises(PolicyRefusal) as err:
        policy.check_job(dataset="bank/a", dp=True, planned_epsilon=1.0, rows=800, spent_elsewhere=1.6)
    message = str(err.value)
    assert "max_epsilon_per_job 0.5" in message and "min_rows 1000" in message
    assert "max_epsilon_total 2" in message and str(tmp_path) not in message
    policy.check_job(dataset="bank/a", dp=True, planned_epsilon=0.4, rows=1000, spent_elsewhere=1.5)


@pytest.mark.slow
def test_a_node_refuses_a_job_above_its_policy_before_any_row_is_used(tmp_path, monkeypatch):
    policy = tmp_path / "policy.toml"
    policy.write_text("max_epsilon_per_job = 0.5\n")
    monkeypatch.setenv("FEDPACT_NODE_POLICY", str(policy))
    job = JobConfig(dataset="telco", partitioning="segment", rounds=1, home=str(tmp_path / "h"),
                    require_consent=False, target_epsilon=1.0)
    Path(job.home).mkdir()
    with Ledger.open(job.ledger_path) as ledger:
        for name in partner_datasets(job):
            PrivacyBudgets(ledger).set(name, 5.0, 1e-5, actor="admin")
    with pytest.raises(FedpactError, match="max_epsilon_per_job 0.5"):
        run_simulated_job(job)
    with Ledger.open(job.ledger_path) as ledger:
        kinds = [e.event_type for e in ledger.events(job_id=job.job_id)]
    assert "data.accessed" not in kinds and "privacy.spent" not in kinds


# --------------------------------------------------------------------------- preprocessing attacks

SPEC = DatasetSpec(name="shop", task="churn", label="churned", positive=("1",), negative=("0",),
                   categorical=("city",), numeric=("spend", "visits"),
                   categories={"city": ("Lyon", "Paris")},
                   bounds={"spend": (0, 5000), "visits": (0, 100)})


def _rows(extra: dict | None = None):
    rng = np.random.default_rng(1)
    n = 400
    frame = pd.DataFrame({"city": rng.choice(["Lyon", "Paris"], n),
                          "spend": rng.gamma(2, 300, n).round(2).astype(str),
                          "visits": rng.integers(0, 60, n).astype(str),
                          "churned": rng.integers(0, 2, n).astype(str)})
    if extra:
        frame = pd.concat([frame, pd.DataFrame([extra])], ignore_index=True)
    return validate_frame(frame, SPEC, source="shop.csv")


def _clipped_gradients(X: np.ndarray, y: np.ndarray, clip: float = 1.0) -> np.ndarray:
    """Per-example gradients of the logistic loss at fixed weights, clipped to `clip` (L2)."""
    model = build_model("logreg", X.shape[1], seed=0)
    out = []
    for xi, yi in zip(torch.from_numpy(X), torch.from_numpy(y), strict=True):
        model.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(model(xi[None]).squeeze(), yi)
        loss.backward()
        g = torch.cat([p.grad.flatten() for p in model.parameters()])
        out.append((g * min(1.0, clip / float(g.norm()))).numpy())
    return np.stack(out)


@pytest.mark.parametrize("encoding", ["public", "fitted"])
def test_one_extreme_row_moves_no_other_rows_clipped_contribution(encoding):
    """The audit's attack: one row with spend = 1e6 moved the others' clipped-gradient sum by
    52–104 (sensitivity assumed 1). With the public encoding it moves it by 0."""
    base = _rows()
    attacked = _rows({"city": "Paris", "spend": "1000000", "visits": "3", "churned": "1"})
    if encoding == "public":
        pipe_a = pipe_b = FeaturePipeline.public(SPEC)
    else:  # today's node behaviour before the fix: statistics fitted on the rows
        pipe_a, pipe_b = FeaturePipeline.fit(base), FeaturePipeline.fit(attacked)
    others_before = _clipped_gradients(pipe_a.transform(base), base.labels).sum(axis=0)
    others_after = _clipped_gradients(pipe_b.transform(attacked)[:len(base)], base.labels).sum(axis=0)
    moved = float(np.linalg.norm(others_after - others_before))
    if encoding == "public":
        assert moved == 0.0
    else:
        assert moved > 1.0  # the fitted encoding breaks the sensitivity DP-SGD assumes


def test_a_one_row_category_never_leaves_the_node():
    """Declared categories fix the layout; an undeclared one stops the job with no value in it."""
    data = _rows({"city": "Zzyzx-Springs", "spend": "10", "visits": "1", "churned": "0"})
    layout = json.dumps(FeaturePipeline.public(SPEC).layout())
    assert "Zzyzx" not in layout
    X = FeaturePipeline.public(SPEC).transform(data)
    assert X[-1, :2].tolist() == [0.0, 0.0]  # outside the declared list: all indicators 0
    undeclared = DatasetSpec(**{**SPEC.__dict__, "categories": {}})
    with pytest.raises(PreprocessingNotPublic) as err:
        FeaturePipeline.public(undeclared, origin="dataset 'shop'")
    assert "no declared categories" in str(err.value) and "Zzyzx" not in str(err.value)
    unbounded = DatasetSpec(**{**SPEC.__dict__, "bounds": {"spend": (0, 5000)}})
    with pytest.raises(PreprocessingNotPublic, match="'visits' has no declared bounds"):
        FeaturePipeline.public(unbounded)

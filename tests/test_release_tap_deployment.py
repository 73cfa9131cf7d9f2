"""Every field a node sends on Flower's deployment engine is classified (issue 13).

The deployment half of tests/test_release_classification.py. A TLS SuperLink and two
`fedpact node start` processes on loopback run one short DP telco job (2 rounds, evaluated after
each, the membership audit after the last) whose ServerApp is fedpact's own with a tap on its
Grid (`fedpact.testing.reply_tap`): every reply the coordinator received over the wire is kept,
field by field, and checked here against the release classification and the nodes' policy —
independently of the nodes' own `_send` check. One of the two nodes runs with a broken `_send`
(a test-only fault hook, `fedpact.testing.node_fault`: an unclassified `train-loss` metric in
its evaluation replies, the node's own check skipped — in evaluation replies because Flower's
FedAvg itself refuses train replies whose metric keys differ between nodes, which would stop the
job before the coordinator took the leak): the healthy node's replies pass, the faulty node's
fail the same check, naming the field. The healthy node runs without the hook: fedpact's own
node, untouched. (One job for both halves keeps the file's runtime near 40 s: most of a
deployment job's time goes to starting its processes.)
"""

from __future__ import annotations

import json

import pytest
from test_deployment import _events, _job

from fedpact.audit import EventType, Ledger
from fedpact.federation.coordinator import partner_datasets
from fedpact.federation.deployment import wait_for_result
from fedpact.federation.loopback import LoopbackDeployment
from fedpact.privacy.budget import PrivacyBudgets
from fedpact.privacy.node_policy import NodePolicy
from fedpact.privacy.releases import MEMBERSHIP_AUDIT, NON_PRIVATE_MODEL, ROW_COUNTS
from fedpact.testing.reply_tap import (
    INJECTED_METRIC,
    UNCLASSIFIED_METRIC,
    fault_env,
    read_tap,
    release_problems,
    strings_at_every_depth,
    submit_tapped_job,
)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]
SMALL = dict(num_partitions=2, batch_size=512, round_timeout=60, membership_audit=True)


def _partner(reply: dict) -> str:
    records = reply["records"]
    source = records.get("access") or records.get("layout")
    return source["fields"]["partner"]


def assert_classified(replies, allowed=None, *, dp: bool = True) -> None:
    """The tap's verdict: every field of every reply classified and allowed by the node policy."""
    problems = release_problems(replies, NodePolicy().allow if allowed is None else allowed, dp=dp)
    assert not problems, "\n".join(problems)


@pytest.fixture(scope="module")
def tapped(tmp_path_factory):
    """SuperLink + 2 partner nodes (telco, 2 segments), the second (partition 1) with a broken
    `_send` in its evaluation replies; one tapped job. Returns (deployment, job, result, replies, healthy partner, faulty partner)."""
    root = tmp_path_factory.mktemp("tap")
    flag = root / "fault"
    d = LoopbackDeployment(root).start()
    try:
        job = _job(d, **SMALL, rounds=2, eval_every=1)
        healthy, faulty = partner_datasets(job)
        flag.write_text(f"{UNCLASSIFIED_METRIC} partner={faulty} phase=evaluate")
        hooks = {1: fault_env(root / "hooks", flag)}  # node 0: no hook at all
        d.home.mkdir(parents=True, exist_ok=True)
        with Ledger.open(d.home / "ledger.db") as ledger:
            for name in (healthy, faulty):
                PrivacyBudgets(ledger).set(name, 50.0, 1e-4, actor=f"admin:{name}")
        for i in range(2):
            d.register(f"p{i}")
            d.start_node(i, env=hooks.get(i))
        d.wait_connected(2)
        result = wait_for_result(d.connection, job, submit_tapped_job(d.connection, job),
                                 timeout=300)
        yield d, job, result, read_tap(job), healthy, faulty
    finally:
        d.stop()


def test_every_field_a_node_sent_over_the_wire_is_classified(tapped):
    d, job, result, replies, healthy, faulty = tapped
    assert [r["error"] for r in replies if r["error"]] == []
    phases = [r["phase"] for r in replies]
    assert {p: phases.count(p) for p in set(phases)} == {"query": 2, "train": 4, "evaluate": 4}
    assert len({r["src_node_id"] for r in replies}) == 2
    assert len({r["message_id"] for r in replies}) == len(replies)
    mine = [r for r in replies if _partner(r) == healthy]
    assert [r["phase"] for r in mine] == ["query", "train", "evaluate", "train", "evaluate"]

    # The check: every field of every record of the healthy node's replies, the final releases
    # (ε, the membership audit) included, classified and allowed by the node's policy.
    assert_classified(mine, dp=job.dp)

    # What the tap saw is the real job: DP updates of the model's shapes, the histograms, the
    # final ε the coordinator reported, the membership audit once, the partners the ledger names.
    trains = [r["records"] for r in replies if r["phase"] == "train"]
    evals = [r["records"] for r in replies if r["phase"] == "evaluate"]
    assert all(t["arrays"]["type"] == "ArrayRecord" and t["arrays"]["fields"] for t in trains)
    assert len({json.dumps(t["arrays"]["fields"], sort_keys=True) for t in trains}) == 1
    assert all(len(e["histogram"]["fields"]["pos"]) == len(e["histogram"]["fields"]["neg"]) > 1
               for e in evals)
    audits = [e["metrics"]["fields"]["membership-auc"] for e in evals]
    assert sum(a != -1 for a in audits) == 2  # measured once per partner, after the last round
    final = {e["access"]["fields"]["partner"]: e["metrics"]["fields"]["epsilon"] for e in evals}
    assert final == {p.name: pytest.approx(p.epsilon, rel=1e-9) for p in result.partners}
    accessed = {(ev.payload["node"], ev.payload["phase"]) for ev in
                _events(d, job.job_id, EventType.DATA_ACCESSED)}
    assert accessed == {(p, phase) for p in (healthy, faulty) for phase in ("train", "evaluate")}

    # No string at any depth (JSON layouts and column lists opened) names a path on a node.
    text = [s for r in replies for body in r["records"].values()
            for s in strings_at_every_depth(body["fields"])]
    assert text and not [s for s in text if str(d.root) in s or s.startswith("/")]
    assert not [s for s in text if "shared/data" in s]


def test_the_tap_catches_a_node_whose_release_check_is_broken(tapped):
    """The faulty node sent an unclassified metric its own check would have stopped; the
    coordinator took the replies as usual (the job finished) — the tap's check fails on them,
    naming the field in each of its evaluation replies, and on nothing else."""
    _, job, result, replies, healthy, faulty = tapped
    theirs = [r for r in replies if _partner(r) == faulty]
    assert result.rounds and [r["phase"] for r in theirs] == ["query", "train", "evaluate",
                                                              "train", "evaluate"]
    with pytest.raises(AssertionError,
                       match=f"evaluate:metrics.{INJECTED_METRIC} is not classified"):
        assert_classified(theirs, dp=job.dp)
    problems = release_problems(theirs, NodePolicy().allow, dp=job.dp)
    assert len(problems) == 2 and all(f"evaluate:metrics.{INJECTED_METRIC} is not classified" in p
                                      for p in problems)  # both of its evaluations, nothing else
    assert_classified([r for r in theirs if r["phase"] != "evaluate"], dp=job.dp)
    with pytest.raises(AssertionError, match="not classified"):
        assert_classified(replies, dp=job.dp)  # the whole job's replies fail too


def test_the_tap_flags_non_private_fields_a_stricter_policy_does_not_allow(tapped):
    """The healthy node's wire data against a node policy that allows nothing non-private: the
    row counts and the membership-audit AUC are named; without DP, the model update too."""
    _, job, _, replies, healthy, _ = tapped
    mine = [r for r in replies if _partner(r) == healthy]
    problems = "\n".join(release_problems(mine, set(), dp=job.dp))
    for field in ("query:layout.train-rows", "train:metrics.num-examples", "train:access.rows",
                  "evaluate:metrics.membership-auc"):
        assert field in problems
    assert f"({ROW_COUNTS})" in problems and f"({MEMBERSHIP_AUDIT})" in problems
    with pytest.raises(AssertionError, match="membership-auc is a non-private release"):
        assert_classified(mine, {ROW_COUNTS}, dp=job.dp)
    with pytest.raises(AssertionError, match=NON_PRIVATE_MODEL):
        assert_classified(mine, {ROW_COUNTS, MEMBERSHIP_AUDIT}, dp=False)

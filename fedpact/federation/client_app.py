"""Flower ClientApp run by each partner node: local DP-SGD training and local evaluation.

Thin glue: read the job settings and global weights from the message, check the job against this
node's own policy (`privacy.node_policy`), load this node's rows, call the plain functions in
`local_round`, reply. Every field of every reply is classified in `privacy.releases` and checked
before it is sent (`_send`): DP model updates and DP score histograms, public settings, and the
non-private releases the node's policy allows (row counts, the membership-audit AUC). Raw rows,
feature statistics, labels, the training loss and the file's path never leave the node.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from flwr.app import ArrayRecord, ConfigRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedpact.errors import FedpactError, node_safe_reason
from fedpact.privacy.node_policy import NodePolicy, simulated_policy_path, spent_by_dataset
from fedpact.privacy.releases import MEMBERSHIP_AUDIT, check_reply

from .job import JobConfig
from .local_round import (
    evaluate_round,
    job_limit,
    node_state_dir,
    pipeline_for,
    planned_history,
    reproducible_mode,
    train_round,
)
from .node_data import NodeData, load_node_data

ERROR_CODE_REFUSED = 4001  # the node refused the request (budget, layout, bad data)
ERROR_CODE_NOT_IN_JOB = 4002  # the job names other partner datasets than the one this node serves


def serves_other_dataset(job: JobConfig, node_config) -> str | None:
    """For a job on named partner datasets: why this deployed node is not one of them (None when
    it is, or when it cannot tell before reading its data)."""
    config = dict(node_config)
    if not job.own_data:
        if "data-csv" in config and "partner" in config:
            from fedpact.models.datasets import BUILTIN_SPECS

            from .partition import partition_names

            spec = BUILTIN_SPECS.get(job.dataset)
            names = partition_names(spec.name, job.partitioning, job.num_partitions) if spec else []
            if str(config["partner"]) not in names:
                return (f"this node serves {config['partner']!r}, not one of the partner datasets "
                        f"of job {job.job_id}")
        return None
    if "data-csv" in config:
        mine = str(config.get("partner") or Path(str(config["data-csv"])).stem)
        if mine not in job.partner_list:
            return f"this node serves {mine!r}, which job {job.job_id} does not name"
        return None
    if "state-dir" in config:  # a deployed node serving a public data set's partition
        return f"this node serves a public data set's partition; job {job.job_id} names partner datasets"
    return None

app = ClientApp()
logging.getLogger("opacus").setLevel(logging.ERROR)


def _access_record(node: NodeData, job: JobConfig, phase: str, rows: int) -> ConfigRecord:
    """What was read, for the coordinator's ledger: names and counts, never the file's path."""
    return ConfigRecord({
        "partner": node.partner,
        "dataset": node.train.spec.name,
        "rows": rows,
        "columns": json.dumps(node.columns),
        "purpose": job.purpose,
        "phase": phase,
    })


def _refuse(msg: Message, exc: Exception, context: Context | None = None) -> Message:
    """A refusal whose reason may leave the node: file paths replaced by the dataset's name, no
    line numbers, no cell values (`errors.node_safe_reason`); the full report stays local."""
    logging.getLogger(__name__).warning("this node refused a job message: %s", exc)  # local log
    config = dict(context.node_config) if context is not None else {}
    name = str(config.get("partner") or (Path(str(config["data-csv"])).stem if "data-csv" in config
                                         else "dataset"))
    reason = node_safe_reason(exc, name, path_label="<a path on the partner's node>")
    if reason.startswith(f"{name}: ") and not str(exc).startswith(name):
        reason = reason[len(name) + 2:]
    return Message(Error(code=ERROR_CODE_REFUSED, reason=reason), reply_to=msg)


def admit_on_node(node: NodeData, job: JobConfig, context: Context) -> NodePolicy:
    """This node's policy applied to the job: its planned ε, the dataset's ε over all jobs, its
    rows, and the non-private releases the job needs. Raises PolicyRefusal with the reason."""
    config = dict(context.node_config)
    simulated = not any(k in config for k in ("data-csv", "state-dir", "policy"))
    policy = NodePolicy.for_node(config, simulated_policy_path(job.home, job.job_id)
                                 if simulated else None)
    planned = 0.0
    if job.dp:
        from fedpact.privacy.accounting import epsilon_of

        planned = max(job_limit(job, len(node.train)),
                      epsilon_of(planned_history(job, len(node.train)), job.target_delta,
                                 job.accountant))
    state_dir = node_state_dir(context.node_config, job, node.partner)
    policy.check_job(dataset=node.partner, dp=job.dp, planned_epsilon=planned,
                     rows=len(node.train),
                     spent_elsewhere=spent_by_dataset(state_dir / "accountants", node.partner,
                                                      except_job=job.job_id))
    return policy


def _send(msg: Message, phase: str, content: RecordDict, policy: NodePolicy, job: JobConfig) -> Message:
    """Reply, after checking every field against the release classification and the policy."""
    fields = {name: list(record.keys()) for name, record in content.items()}
    check_reply(phase, fields, policy.allow, dp=job.dp)
    return Message(content=content, reply_to=msg)


def _chaos(partner: str, weights: dict) -> None:
    """Fault injection for robustness drills: FEDPACT_CHAOS="PARTNER:nan" or "PARTNER:scale100"
    makes that partner send a broken or poisoned update (never set in normal operation)."""
    spec = os.environ.get("FEDPACT_CHAOS", "")
    target, _, fault = spec.partition(":")
    if not spec or target != partner:
        return
    logging.getLogger("fedpact").warning("FEDPACT_CHAOS: %s sends a %s update", partner, fault)
    for value in weights.values():
        if fault == "nan":
            value.fill_(float("nan"))
        elif fault.startswith("scale"):
            value.mul_(float(fault[len("scale"):] or 100))


def _round(msg: Message) -> int:
    return int(msg.content["config"].get("server-round", 0))


@app.query()
def describe(msg: Message, context: Context) -> Message:
    """Share the feature layout (column order and categories, no statistics) and row counts."""
    try:
        job = JobConfig.from_config(msg.content["config"])
        other = serves_other_dataset(job, context.node_config)
        if other:
            return Message(Error(code=ERROR_CODE_NOT_IN_JOB, reason=other), reply_to=msg)
        node = load_node_data(context.node_config, job)
        layout = pipeline_for(node).layout()
        policy = admit_on_node(node, job, context)
        content = RecordDict({
            "layout": ConfigRecord({"layout": json.dumps(layout), "partner": node.partner,
                                    "train-rows": len(node.train), "test-rows": len(node.test),
                                    "reproducible": int(reproducible_mode())}),
        })
        return _send(msg, "query", content, policy, job)
    except FedpactError as exc:
        return _refuse(msg, exc, context)


@app.train()
def train(msg: Message, context: Context) -> Message:
    """One round of local training on this partner's rows, with DP-SGD when the job asks."""
    try:
        job = JobConfig.from_config(msg.content["config"])
        node = load_node_data(context.node_config, job)
        policy = admit_on_node(node, job, context)
        update = train_round(node, msg.content["arrays"].to_torch_state_dict(), job,
                             node_state_dir(context.node_config, job, node.partner), _round(msg))
        _chaos(node.partner, update.weights)
        content = RecordDict({
            "arrays": ArrayRecord(update.weights),
            "metrics": MetricRecord(update.metrics),
            "access": _access_record(node, job, "train", update.rows),
        })
        return _send(msg, "train", content, policy, job)
    except FedpactError as exc:
        return _refuse(msg, exc, context)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Score this partner's held-out rows with the global model; release DP score histograms."""
    try:
        job = JobConfig.from_config(msg.content["config"])
        node = load_node_data(context.node_config, job)
        policy = admit_on_node(node, job, context)
        final = _round(msg) == job.rounds
        audit = job.membership_audit and final and MEMBERSHIP_AUDIT in policy.allow
        result = evaluate_round(node, msg.content["arrays"].to_torch_state_dict(), job,
                                node_state_dir(context.node_config, job, node.partner), _round(msg),
                                membership_audit=audit)
        metrics = {"num-examples": result.rows, **result.metrics}
        if MEMBERSHIP_AUDIT not in policy.allow:  # the node's policy keeps the audit at home
            metrics.pop("membership-auc", None)
        content = RecordDict({
            "metrics": MetricRecord(metrics),
            "histogram": ConfigRecord({"pos": result.pos.tolist(), "neg": result.neg.tolist()}),
            "access": _access_record(node, job, "evaluate", result.rows),
        })
        return _send(msg, "evaluate", content, policy, job)
    except FedpactError as exc:
        return _refuse(msg, exc, context)

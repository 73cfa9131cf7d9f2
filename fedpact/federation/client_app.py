"""Flower ClientApp run by each partner node: local DP-SGD training and local evaluation.

Thin glue: read the job settings and global weights from the message, load this node's rows, call
the plain functions in `local_round`, reply with weights + metrics. Raw rows, feature statistics
and labels never leave the node; replies carry model weights, counts, ε, score histograms for
pooled metrics, and a record of what was read (for the coordinator's audit ledger).
"""

from __future__ import annotations

import json
import logging
import os

from flwr.app import ArrayRecord, ConfigRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedpact.errors import FedpactError

from .job import JobConfig
from .local_round import evaluate_round, node_state_dir, pipeline_for, train_round
from .node_data import NodeData, load_node_data

ERROR_CODE_REFUSED = 4001  # the node refused the request (budget, layout, bad data)

app = ClientApp()
logging.getLogger("opacus").setLevel(logging.ERROR)


def _access_record(node: NodeData, job: JobConfig, phase: str, rows: int) -> ConfigRecord:
    return ConfigRecord({
        "partner": node.partner,
        "dataset": node.train.spec.name,
        "source": node.train.source,
        "rows": rows,
        "columns": json.dumps(node.columns),
        "purpose": job.purpose,
        "phase": phase,
    })


def _refuse(msg: Message, exc: Exception) -> Message:
    return Message(Error(code=ERROR_CODE_REFUSED, reason=str(exc)), reply_to=msg)


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
        node = load_node_data(context.node_config, job)
        layout = pipeline_for(node).layout()
    except FedpactError as exc:
        return _refuse(msg, exc)
    content = RecordDict({
        "layout": ConfigRecord({"layout": json.dumps(layout), "partner": node.partner,
                                "train-rows": len(node.train), "test-rows": len(node.test)}),
    })
    return Message(content=content, reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    """One round of local training on this partner's rows, with DP-SGD when the job asks."""
    try:
        job = JobConfig.from_config(msg.content["config"])
        node = load_node_data(context.node_config, job)
        update = train_round(node, msg.content["arrays"].to_torch_state_dict(), job,
                             node_state_dir(context.node_config, job, node.partner), _round(msg))
    except FedpactError as exc:
        return _refuse(msg, exc)
    _chaos(node.partner, update.weights)
    content = RecordDict({
        "arrays": ArrayRecord(update.weights),
        "metrics": MetricRecord(update.metrics),
        "access": _access_record(node, job, "train", update.rows),
    })
    return Message(content=content, reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Score this partner's held-out rows with the global model; share metrics and a histogram."""
    try:
        job = JobConfig.from_config(msg.content["config"])
        node = load_node_data(context.node_config, job)
        final = _round(msg) == job.rounds
        result = evaluate_round(node, msg.content["arrays"].to_torch_state_dict(), job,
                                membership_audit=job.membership_audit and final)
    except FedpactError as exc:
        return _refuse(msg, exc)
    metrics = {"num-examples": result.rows, **result.metrics}
    metrics.setdefault("membership-auc", -1.0)  # same keys from every node (Flower checks)
    content = RecordDict({
        "metrics": MetricRecord(metrics),
        "histogram": ConfigRecord({"pos": result.pos.tolist(), "neg": result.neg.tolist(),
                                   "sq-error": result.sq_error}),
        "access": _access_record(node, job, "evaluate", result.rows),
    })
    return Message(content=content, reply_to=msg)

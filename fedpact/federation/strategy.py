"""FedAvg that writes every node's data access and every aggregation to the audit ledger.

It also sums the partners' score histograms into pooled test metrics (ROC-AUC, PR-AUC, lift),
so the coordinator reports figures over all partners' held-out rows without seeing any row.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable

import numpy as np
from flwr.app import Message, MetricRecord
from flwr.serverapp.strategy import FedAvg

from fedpact.audit import EventType, Ledger
from fedpact.models.metrics import HISTOGRAM_BINS, metrics_from_histograms
from fedpact.privacy.budget import PrivacyBudgets

from .job import JobConfig


class RoundFailed(RuntimeError):
    """No usable reply came back for a round; the message says which nodes refused and why."""


class AuditedFedAvg(FedAvg):
    """Weighted FedAvg over partners' DP-SGD updates, recorded in the ledger as it happens."""

    def __init__(self, job: JobConfig, ledger: Ledger, node_names: dict[int, str],
                 on_round: Callable[[int, dict], None] | None = None):
        n = job.num_partitions
        super().__init__(fraction_train=1.0, fraction_evaluate=1.0, min_train_nodes=n,
                         min_evaluate_nodes=n, min_available_nodes=n)
        self.job = job
        self.ledger = ledger
        self.node_names = node_names
        self.on_round = on_round
        self.round_log: list[dict] = []
        self.partner_epsilon: dict[str, float] = {}
        self.partner_sigma: dict[str, float] = {}
        self.partner_history: dict[str, tuple[float, float, int]] = {}
        self.partner_membership_auc: dict[str, float] = {}
        self.budgets = PrivacyBudgets(ledger)
        self._pending: dict = {}

    def _record_access(self, replies: list[Message], server_round: int) -> None:
        for msg in replies:
            access = msg.content["access"]
            self.ledger.append(
                EventType.DATA_ACCESSED,
                {
                    "node": access["partner"],
                    "dataset": access["dataset"],
                    "rows": int(access["rows"]),
                    "columns": json.loads(str(access["columns"])),
                    "purpose": access["purpose"],
                    "phase": access["phase"],
                    "round": server_round,
                },
                actor=f"node:{access['partner']}",
                job_id=self.job.job_id,
            )

    def _split(self, replies: Iterable[Message], phase: str, server_round: int) -> list[Message]:
        replies = list(replies)
        good = [m for m in replies if not m.has_error()]
        failed = [m for m in replies if m.has_error()]
        if failed:
            reasons = "; ".join(
                f"{self.node_names.get(m.metadata.src_node_id, m.metadata.src_node_id)}: {m.error.reason}"
                for m in failed)
            raise RoundFailed(f"round {server_round} ({phase}): {len(failed)} of {len(replies)} "
                              f"partners failed: {reasons}")
        return good

    def aggregate_train(self, server_round: int, replies: Iterable[Message]):
        good = self._split(replies, "train", server_round)
        self._record_access(good, server_round)
        for msg in good:
            name = str(msg.content["access"]["partner"])
            metrics = msg.content["metrics"]
            previous = self.partner_epsilon.get(name, 0.0)
            self.partner_epsilon[name] = float(metrics["epsilon"])
            self.partner_sigma[name] = float(metrics["noise-multiplier"])
            if self.job.dp:
                self.partner_history[name] = (float(metrics["noise-multiplier"]),
                                              float(metrics["sample-rate"]), int(metrics["steps"]))
                # Charge this round's share; the per-round charges add up to the composed ε.
                self.budgets.charge(name, self.partner_epsilon[name] - previous,
                                    self.job.target_delta if previous == 0.0 else 0.0,
                                    job_id=self.job.job_id, actor=f"node:{name}", round=server_round)
        arrays, metrics = super().aggregate_train(server_round, good)
        self._pending = {"train_loss": float(metrics["train-loss"]) if metrics else float("nan")}
        return arrays, metrics

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        good = self._split(replies, "evaluate", server_round)
        self._record_access(good, server_round)
        pos = np.zeros(HISTOGRAM_BINS, np.int64)
        neg = np.zeros(HISTOGRAM_BINS, np.int64)
        sq_error = 0.0
        for msg in good:
            hist = msg.content["histogram"]
            pos += np.asarray(hist["pos"], np.int64)
            neg += np.asarray(hist["neg"], np.int64)
            sq_error += float(hist["sq-error"])
        pooled = metrics_from_histograms(pos, neg, sq_error)
        for msg in good:
            auc = float(msg.content["metrics"].get("membership-auc", -1.0))
            if auc >= 0:
                self.partner_membership_auc[str(msg.content["access"]["partner"])] = auc
        epsilon = max(self.partner_epsilon.values(), default=0.0)
        entry = {"round": server_round, **self._pending, **pooled, "epsilon": epsilon}
        self.round_log.append(entry)
        self.ledger.append(
            EventType.ROUND_AGGREGATED,
            {"round": server_round, "nodes": sorted(str(m.content["access"]["partner"]) for m in good),
             "strategy": "FedAvg", "metrics": {k: v for k, v in entry.items() if k != "round"}},
            actor="coordinator",
            job_id=self.job.job_id,
        )
        if self.on_round:
            self.on_round(server_round, entry)
        return MetricRecord({"roc-auc": pooled["roc_auc"], "pr-auc": pooled["pr_auc"],
                             "lift-at-10": pooled["lift_at_10"], "brier": pooled["brier"]})

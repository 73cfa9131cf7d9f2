"""Aggregation strategies that write every node's data access and every aggregation to the ledger.

Flower's FedAvg, FedMedian, FedTrimmedAvg or Krum (`JobConfig.aggregation`) does the averaging;
the audit mixin checks each update first (same shapes as the global model, finite values, an
optional norm bound) and rejects a bad one with an `update.rejected` event naming the node. In the
job's evaluation rounds it sums the partners' DP score histograms into pooled test metrics
(ROC-AUC, PR-AUC, lift, Brier: DP estimates), so the coordinator reports figures over all
partners' held-out rows without seeing any row; other rounds report ε only.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable

import numpy as np
from flwr.app import ArrayRecord, Message, MetricRecord
from flwr.serverapp.strategy import FedAvg, FedMedian, FedTrimmedAvg, Krum

from fedpact.audit import EventType, Ledger
from fedpact.models.metrics import metrics_from_released, release_bin_edges
from fedpact.privacy.budget import PrivacyBudgets

from .job import JobConfig


class RoundFailed(RuntimeError):
    """No usable reply came back for a round; the message says which nodes refused and why."""


AGGREGATIONS = {"fedavg": FedAvg, "median": FedMedian, "trimmed-mean": FedTrimmedAvg, "krum": Krum}


def check_update(global_arrays: dict[str, np.ndarray], update: dict[str, np.ndarray],
                 norm_bound: float = 0.0) -> str | None:
    """Why a partner's weights must not be aggregated, or None when they are acceptable."""
    if set(update) != set(global_arrays):
        return f"parameters {sorted(update)} differ from the model's {sorted(global_arrays)}"
    for key, value in update.items():
        if np.shape(value) != np.shape(global_arrays[key]):
            return f"parameter {key} has shape {np.shape(value)}, the model has {np.shape(global_arrays[key])}"
        if not np.all(np.isfinite(value)):
            return f"parameter {key} holds {int((~np.isfinite(value)).sum())} non-finite values"
    if norm_bound > 0:
        norm = float(np.sqrt(sum(float(((np.asarray(update[k], np.float64) - global_arrays[k]) ** 2).sum())
                                 for k in update)))
        if norm > norm_bound:
            return f"update norm {norm:.3g} exceeds the job's bound {norm_bound:g}"
    return None


class AuditedStrategyMixin:
    """Ledger bookkeeping, update checks and pooled metrics around a Flower aggregation strategy."""

    secure_aggregation = False  # True only where the rounds ran under SecAgg+ (federation.secagg)

    def __init__(self, job: JobConfig, ledger: Ledger, node_names: dict[int, str],
                 on_round: Callable[[int, dict], None] | None = None, **strategy_kwargs):
        n = job.min_partners or job.num_partitions
        super().__init__(fraction_train=1.0, fraction_evaluate=1.0, min_train_nodes=n,
                         min_evaluate_nodes=n, min_available_nodes=n, **strategy_kwargs)
        self._global: dict[str, np.ndarray] | None = None
        self.last_histograms: dict = {}
        self.rejected: list[dict] = []
        self.job = job
        self.ledger = ledger
        self.node_names = node_names
        self.on_round = on_round
        self.round_log: list[dict] = []
        self.partner_epsilon: dict[str, float] = {}
        self.partner_sigma: dict[str, float] = {}
        self.partner_history: dict[str, tuple[float, float, int]] = {}
        self.partner_membership_auc: dict[str, float] = {}
        # Per partner: (σ_eval, evaluations released) — the Gaussian part of its history.
        self.partner_eval: dict[str, tuple[float, int]] = {}
        # Partners whose node ran in its own reproducible mode (batches and noise not private).
        self.reproducible: set[str] = set()
        self.budgets = PrivacyBudgets(ledger)
        self._pending: dict = {}
        # Partners missing from a round (dropped out, timed out, refused): round -> name -> why.
        self.missing: dict[int, dict[str, str]] = {}
        # What this job already wrote (a resumed job must not write it twice).
        self._recorded: set[tuple] = set()
        self._charged: dict[str, float] = {}
        for ev in ledger.events(job_id=job.job_id):
            if ev.event_type == EventType.DATA_ACCESSED.value:
                self._recorded.add((ev.payload.get("node"), ev.payload.get("phase"),
                                    ev.payload.get("round")))
            elif ev.event_type == EventType.ROUND_AGGREGATED.value:
                self._recorded.add(("round", ev.payload.get("round")))
            elif ev.event_type == EventType.UPDATE_REJECTED.value:
                self._recorded.add(("rejected", ev.payload.get("node"), ev.payload.get("round")))
            elif ev.event_type == EventType.PRIVACY_SPENT.value:
                name = ev.payload["dataset"]
                self._charged[name] = self._charged.get(name, 0.0) + float(ev.payload["epsilon"])

    STATE_FIELDS = ("round_log", "partner_epsilon", "partner_sigma", "partner_history",
                    "partner_membership_auc", "last_histograms", "rejected", "missing",
                    "partner_eval")

    def state_dict(self) -> dict:
        """Everything a resumed job needs to continue this strategy (JSON-safe)."""
        return json.loads(json.dumps({k: getattr(self, k) for k in self.STATE_FIELDS}))

    def load_state_dict(self, state: dict) -> None:
        for key in self.STATE_FIELDS:
            if key in state:
                setattr(self, key, state[key])
        self.partner_history = {k: tuple(v) for k, v in self.partner_history.items()}
        self.partner_eval = {k: tuple(v) for k, v in self.partner_eval.items()}
        self.missing = {int(k): v for k, v in self.missing.items()}

    def partner_full_history(self, name: str) -> list[tuple[float, float, int]]:
        """Everything the partner released, as accountant history: DP-SGD steps, evaluations."""
        history = []
        if name in self.partner_history:
            history.append(tuple(self.partner_history[name]))
        if name in self.partner_eval and self.partner_eval[name][1] > 0:
            sigma_e, releases = self.partner_eval[name]
            history.append((float(sigma_e), 1.0, int(releases)))
        return history

    def charge_spend(self, replies: Iterable[Message], server_round: int) -> None:
        """Record each partner's ε reported for this round (also for a round that then fails).

        Idempotent: the charge is the partner's cumulative ε minus what the ledger already holds
        for this job, so a retried or resumed round that gets the cached reply charges nothing.
        """
        for msg in replies:
            name = str(msg.content["access"]["partner"])
            metrics = msg.content["metrics"]
            cumulative = float(metrics["epsilon"])
            self.partner_epsilon[name] = max(cumulative, self.partner_epsilon.get(name, 0.0))
            if float(metrics.get("reproducible", 0.0)) > 0:
                self.reproducible.add(name)
            if "noise-multiplier" in metrics:  # a training reply
                self.partner_sigma[name] = float(metrics["noise-multiplier"])
            if not self.job.dp:
                continue
            if "noise-multiplier" in metrics:
                self.partner_history[name] = (float(metrics["noise-multiplier"]),
                                              float(metrics["sample-rate"]), int(metrics["steps"]))
            if "eval-noise-multiplier" in metrics:
                self.partner_eval[name] = (float(metrics["eval-noise-multiplier"]),
                                           int(metrics["eval-releases"]))
            charged = self._charged.get(name)
            amount = cumulative - (charged or 0.0)
            if charged is not None and amount <= 1e-9:
                continue
            self.budgets.charge(name, amount, self.job.target_delta if charged is None else 0.0,
                                job_id=self.job.job_id, actor=f"node:{name}", round=server_round)
            self._charged[name] = cumulative

    def record_access(self, replies: list[Message], server_round: int) -> None:
        """One `data.accessed` event per node, phase and round (never twice for a resumed job)."""
        for msg in replies:
            access = msg.content["access"]
            key = (str(access["partner"]), str(access["phase"]), server_round)
            if key in self._recorded:
                continue
            self._recorded.add(key)
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

    def configure_train(self, server_round: int, arrays: ArrayRecord, config, grid):
        """Remember the global weights each update is checked against."""
        self._global = {k: v.numpy() for k, v in arrays.to_torch_state_dict().items()}
        return super().configure_train(server_round, arrays, config, grid)

    def _reject_bad_updates(self, good: list[Message], server_round: int) -> list[Message]:
        if self._global is None:  # SecAgg+: only the masked sum exists; nothing per node to check
            return good
        kept = []
        for msg in good:
            name = str(msg.content["access"]["partner"])
            update = {k: v.numpy() for k, v in msg.content["arrays"].to_torch_state_dict().items()}
            reason = check_update(self._global, update, self.job.update_norm_bound)
            if reason is None:
                kept.append(msg)
                continue
            self.rejected.append({"round": server_round, "node": name, "reason": reason})
            if ("rejected", name, server_round) not in self._recorded:
                self._recorded.add(("rejected", name, server_round))
                self.ledger.append(EventType.UPDATE_REJECTED,
                                   {"node": name, "round": server_round, "reason": reason},
                                   actor="coordinator", job_id=self.job.job_id)
        minimum = self.job.min_partners or self.job.num_partitions
        if len(kept) < minimum:
            raise RoundFailed(f"round {server_round}: only {len(kept)} acceptable updates, the job "
                              f"needs {minimum}; rejected: "
                              + "; ".join(f"{r['node']}: {r['reason']}" for r in self.rejected
                                          if r["round"] == server_round))
        return kept

    def aggregate_train(self, server_round: int, replies: Iterable[Message]):
        good = self._split(replies, "train", server_round)
        self.record_access(good, server_round)
        # Charge this round's share; the per-round charges add up to the composed ε.
        self.charge_spend(good, server_round)
        good = self._reject_bad_updates(good, server_round)
        arrays, metrics = super().aggregate_train(server_round, good)
        self._pending = {"partners": len(good)}
        if server_round not in self.job.evaluation_rounds():
            self.complete_round(server_round, sorted(str(m.content["access"]["partner"]) for m in good), {})
        return arrays, metrics

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        """Sum the partners' released (DP) histograms into pooled metrics; charge their ε."""
        good = self._split(replies, "evaluate", server_round)
        self.record_access(good, server_round)
        self.charge_spend(good, server_round)
        bins = len(release_bin_edges()) - 1
        pos, neg = np.zeros(bins), np.zeros(bins)
        for msg in good:
            hist = msg.content["histogram"]
            pos += np.asarray(hist["pos"], float)
            neg += np.asarray(hist["neg"], float)
        pooled = metrics_from_released(pos, neg)
        self.last_histograms = {"pos": pos.tolist(), "neg": neg.tolist(),
                                "sq_error": pooled.pop("sq_error"),
                                "edges": release_bin_edges().tolist(), "dp": bool(self.job.dp),
                                "noise_sd": (float(self.job.eval_noise_multiplier) * np.sqrt(len(good))
                                             if self.job.dp else 0.0)}
        for msg in good:
            auc = float(msg.content["metrics"].get("membership-auc", -1.0))
            if auc >= 0:
                self.partner_membership_auc[str(msg.content["access"]["partner"])] = auc
        self.complete_round(server_round, sorted(str(m.content["access"]["partner"]) for m in good),
                            pooled)
        return MetricRecord({"roc-auc": pooled["roc_auc"], "pr-auc": pooled["pr_auc"],
                             "lift-at-10": pooled["lift_at_10"], "brier": pooled["brier"]})

    def complete_round(self, server_round: int, nodes: list[str], pooled: dict) -> None:
        """The round's log entry and `round.aggregated` event (once), then the progress callback.
        `pooled`: the DP evaluation's metrics in evaluation rounds, else empty (ε only)."""
        epsilon = max(self.partner_epsilon.values(), default=0.0)
        entry = {"round": server_round, **self._pending, **pooled, "epsilon": epsilon}
        if pooled:
            entry["evaluation"] = "dp" if self.job.dp else "exact"
        self.round_log = [r for r in self.round_log if r.get("round") != server_round] + [entry]
        if ("round", server_round) not in self._recorded:
            self._recorded.add(("round", server_round))
            self.ledger.append(
                EventType.ROUND_AGGREGATED,
                {"round": server_round, "nodes": nodes,
                 "strategy": self.job.aggregation, "metrics": {k: v for k, v in entry.items() if k != "round"},
                 "secure_aggregation": self.secure_aggregation,
                 "missing": self.missing.get(server_round, {})},
                actor="coordinator",
                job_id=self.job.job_id,
            )
        if self.on_round:
            self.on_round(server_round, entry)


class AuditedFedAvg(AuditedStrategyMixin, FedAvg):
    """Weighted FedAvg over partners' DP-SGD updates, recorded in the ledger as it happens."""


def make_strategy(job: JobConfig, ledger: Ledger, node_names: dict[int, str],
                  on_round: Callable[[int, dict], None] | None = None) -> AuditedStrategyMixin:
    """The job's aggregation (`fedavg`, `median`, `trimmed-mean`, `krum`) with the audit mixin."""
    if job.aggregation == "fedavg":
        return AuditedFedAvg(job, ledger, node_names, on_round)
    base = AGGREGATIONS[job.aggregation]
    cls = type(f"Audited{base.__name__}", (AuditedStrategyMixin, base), {"__doc__": base.__doc__})
    kwargs = {}
    if job.aggregation == "trimmed-mean":
        kwargs["beta"] = job.trim_fraction
    if job.aggregation == "krum":
        kwargs["num_malicious_nodes"] = max(0, (job.num_partitions - 3) // 2)
    return cls(job, ledger, node_names, on_round, **kwargs)

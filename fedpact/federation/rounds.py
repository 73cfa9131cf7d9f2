"""The round loop of a job: dropout-tolerant, checkpointed, resumable.

Flower's `Strategy.start` waits forever for its minimum number of nodes when one dies. fedpact
drives the strategy itself, phase by phase: each message goes to the job's nodes that are
connected, replies are awaited for `round_timeout`, and a phase proceeds with those that answered
if there are at least `min_partners`; the others are recorded as missing (with why). Below the
minimum the phase pauses `retry_pause` s and is retried `round_retries` times, then the job fails
with a reason. After every completed round the coordinator writes a checkpoint (global model,
round, strategy state); a job started again with the same id resumes after its last completed
round. Partners answer a repeated round from their own saved reply, so nothing is spent twice,
and the strategy never writes a ledger event twice (see `AuditedStrategyMixin`).
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Iterable
from pathlib import Path

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message
from flwr.serverapp import Grid

from fedpact.errors import FedpactError

from .client_app import ERROR_CODE_REFUSED
from .job import JobConfig
from .strategy import AuditedStrategyMixin, RoundFailed


class JobFailed(FedpactError):
    """The federated job stopped; the message says at which step and why."""

log = logging.getLogger("fedpact.rounds")
CHECKPOINT_NAME = "checkpoint.pt"
POLL_INTERVAL = 0.02  # seconds between pulls of replies (Flower's own Grid sleeps 3 s)


class DelegatingGrid(Grid):
    """A Grid that hands every call to another Grid; subclasses change one behaviour."""

    def __init__(self, grid: Grid) -> None:
        self._grid = grid

    def set_run(self, run) -> None:  # noqa: D102 - Grid interface
        self._grid.set_run(run)

    @property
    def run(self):  # noqa: D102
        return self._grid.run

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None) -> Message:  # noqa: D102
        return self._grid.create_message(content, message_type, dst_node_id, group_id, ttl)

    def get_node_ids(self) -> Iterable[int]:  # noqa: D102
        return self._grid.get_node_ids()

    def push_messages(self, messages):  # noqa: D102
        return self._grid.push_messages(messages)

    def pull_messages(self, message_ids):  # noqa: D102
        return self._grid.pull_messages(message_ids)

    def send_and_receive(self, messages, *, timeout=None):  # noqa: D102
        return self._grid.send_and_receive(messages, timeout=timeout)


class NodeSubsetGrid(DelegatingGrid):
    """The deployment's Grid restricted to this job's connected nodes (what strategies sample)."""

    def __init__(self, grid: Grid, node_ids: Iterable[int]) -> None:
        super().__init__(grid)
        self._nodes = list(node_ids)

    def get_node_ids(self) -> Iterable[int]:  # noqa: D102
        return list(self._nodes)


def checkpoint_path(job: JobConfig) -> Path:
    return job.job_dir / CHECKPOINT_NAME


def save_checkpoint(job: JobConfig, server_round: int, arrays: ArrayRecord,
                    strategy: AuditedStrategyMixin, names: dict[int, str]) -> None:
    """Atomically write the state after `server_round` completed."""
    path = checkpoint_path(job)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save({"round": server_round, "arrays": arrays.to_torch_state_dict(),
                "strategy": strategy.state_dict(), "partners": sorted(set(names.values())),
                "job_id": job.job_id}, tmp)
    os.replace(tmp, path)


def load_checkpoint(job: JobConfig) -> dict | None:
    path = checkpoint_path(job)
    if not path.exists():
        return None
    try:
        state = torch.load(path, weights_only=True)
    except Exception as exc:  # noqa: BLE001 - a truncated or foreign file
        raise JobFailed(f"job {job.job_id}: checkpoint {path} is unreadable ({exc}); move it "
                        "away to start the job from round 1") from None
    return state if state.get("job_id") == job.job_id else None


def exchange(grid: Grid, messages: list[Message], timeout: float,
             poll_interval: float = POLL_INTERVAL):
    """Push, then pull replies until all arrived or `timeout`; (replies, unanswered ids)."""
    try:
        pending = set(grid.push_messages(messages))
    except NotImplementedError:  # a Grid that only offers send_and_receive (in-process tests)
        return list(grid.send_and_receive(messages, timeout=timeout)), set()
    deadline = time.monotonic() + timeout
    replies: list[Message] = []
    while pending:
        got = list(grid.pull_messages(pending))
        replies.extend(got)
        pending.difference_update(m.metadata.reply_to_message_id for m in got)
        if not pending or time.monotonic() >= deadline:
            break
        time.sleep(poll_interval)
    return replies, pending


def collect_late_replies(grid: Grid, audited: AuditedStrategyMixin, late: dict[str, int]) -> None:
    """Train replies that arrived after their phase moved on: the partner trained, so its ε is
    charged and its data access recorded (idempotently) even though the update was not used."""
    if not late:
        return
    try:
        replies = list(grid.pull_messages(list(late)))
    except Exception as exc:  # noqa: BLE001 - best effort at the end of a job
        log.warning("could not collect late replies: %s", exc)
        return
    for reply in replies:
        server_round = late.pop(reply.metadata.reply_to_message_id, None)
        if server_round is not None and not reply.has_error():
            audited.charge_spend([reply], server_round)
            audited.record_access([reply], server_round)


def _log_timing(job: JobConfig, server_round: int, phase: str, exchange: float,
                aggregate: float) -> None:
    """jobs/JOB/timings.jsonl: per phase, the message round trip and the aggregation (with its
    ledger writes), for operators comparing engines and networks."""
    try:
        with (job.job_dir / "timings.jsonl").open("a") as handle:
            handle.write(json.dumps({"round": server_round, "phase": phase,
                                     "exchange_s": round(exchange, 4),
                                     "aggregate_s": round(aggregate, 4),
                                     "at": time.time()}) + "\n")
    except OSError as exc:
        log.warning("could not write phase timings: %s", exc)


def _run_phase(grid: Grid, job: JobConfig, strategy, audited: AuditedStrategyMixin,
               names: dict[int, str], server_round: int, phase: str, arrays: ArrayRecord,
               config: ConfigRecord, late: dict[str, int]):
    """Send one phase's messages, tolerate dropouts down to `min_partners`, aggregate."""
    collect_late_replies(grid, audited, late)
    minimum = job.min_partners or job.num_partitions
    configure = strategy.configure_train if phase == "train" else strategy.configure_evaluate
    missing: dict[str, str] = {}
    good: list[Message] = []
    for attempt in range(job.round_retries + 1):
        online = set(grid.get_node_ids())
        alive = [nid for nid in names if nid in online]
        missing = {names[nid]: "not connected" for nid in names if nid not in online}
        good, refused = [], {}
        if len(alive) >= minimum:
            began = time.perf_counter()
            messages = list(configure(server_round, arrays, config, NodeSubsetGrid(grid, alive)))
            replies, unanswered = exchange(grid, messages, job.round_timeout)
            exchanged = time.perf_counter() - began
            if phase == "train":
                late.update({mid: server_round for mid in unanswered})
            answered = {m.metadata.src_node_id for m in replies}
            for nid in alive:
                if nid not in answered:
                    missing[names[nid]] = f"no reply within {job.round_timeout:g} s"
            for reply in replies:
                name = names.get(reply.metadata.src_node_id, str(reply.metadata.src_node_id))
                if not reply.has_error():
                    good.append(reply)
                elif reply.error.code == ERROR_CODE_REFUSED:
                    refused[name] = "refused: " + reply.error.reason
                else:
                    missing[name] = "failed: " + reply.error.reason
        if len(good) >= minimum:
            audited.missing.setdefault(server_round, {}).update(
                {f"{name} ({phase})": why for name, why in {**missing, **refused}.items()})
            if missing or refused:
                log.warning("round %s (%s) proceeds with %d of %d partners; missing: %s",
                            server_round, phase, len(good), len(names), {**missing, **refused})
            began = time.perf_counter()
            result = (strategy.aggregate_train(server_round, good) if phase == "train"
                      else strategy.aggregate_evaluate(server_round, good))
            _log_timing(job, server_round, phase, exchanged, time.perf_counter() - began)
            return result
        if phase == "train" and good:  # they trained: their ε is spent and their rows were read
            audited.charge_spend(good, server_round)
            audited.record_access(good, server_round)
        missing.update(refused)
        if len(good) + len(missing) - len(refused) < minimum:
            break  # refusals are final: waiting cannot bring enough partners back
        if attempt < job.round_retries:
            log.warning("round %s (%s): %d of %d partners answered, the job needs %d; pausing "
                        "%.0f s before retry %d of %d", server_round, phase, len(good),
                        len(names), minimum, job.retry_pause, attempt + 1, job.round_retries)
            time.sleep(job.retry_pause)
    why = "; ".join(f"{name}: {reason}" for name, reason in sorted(missing.items()))
    raise RoundFailed(f"round {server_round} ({phase}): only {len(good)} of {len(names)} partners "
                      f"answered, the job needs {minimum} (min_partners) — {why}"
                      + (f" (after {job.round_retries} retries)" if job.round_retries else ""))


def run_rounds(grid: Grid, job: JobConfig, strategy, names: dict[int, str],
               arrays: ArrayRecord, *, first_round: int = 1) -> ArrayRecord:
    """Rounds `first_round`..`job.rounds`; a checkpoint after each. Returns the final weights."""
    config = ConfigRecord(job.to_config())
    audited = getattr(strategy, "strategy", strategy)  # central DP wraps the audited strategy
    late: dict[str, int] = {}  # train messages whose reply had not come when the phase moved on
    try:
        for server_round in range(first_round, job.rounds + 1):
            new_arrays, _ = _run_phase(grid, job, strategy, audited, names, server_round, "train",
                                       arrays, config, late)
            if new_arrays is not None:
                arrays = new_arrays
            if server_round in job.evaluation_rounds():  # each evaluation is a charged release
                _run_phase(grid, job, strategy, audited, names, server_round, "evaluate", arrays,
                           config, late)
            save_checkpoint(job, server_round, arrays, audited, names)
    finally:
        collect_late_replies(grid, audited, late)
    return arrays

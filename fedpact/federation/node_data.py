"""Which rows a partner node trains on: its own CSV (deployment) or a simulated partition."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from fedpact.errors import ConfigurationError
from fedpact.models.datasets import PartnerData, load_dataset, load_mapping, load_partner_csv
from fedpact.models.streaming import StreamedRows, build_stream, count_data_rows, stream_threshold

from .job import JobConfig
from .partition import partition

logger = logging.getLogger(__name__)


@dataclass
class NodeData:
    """A partner's name and its local train and test rows."""

    partner: str
    train: PartnerData | StreamedRows  # StreamedRows: a large CSV trained from disk
    test: PartnerData | StreamedRows

    @property
    def columns(self) -> list[str]:
        return list(self.train.spec.features)


@lru_cache(maxsize=2)
def _partitions(dataset: str, scheme: str, n: int, seed: int, data_dir: str | None):
    """Parse the public file and split it once per process: a simulation worker serves many nodes."""
    return partition(load_dataset(dataset, data_dir), scheme, n, seed=seed)


@lru_cache(maxsize=1024)
def _simulated(dataset: str, scheme: str, n: int, seed: int, test_fraction: float, index: int,
               data_dir: str | None) -> NodeData:
    part = _partitions(dataset, scheme, n, seed, data_dir)[index]
    train, test = part.data.split(test_fraction, seed)
    return NodeData(part.name, train, test)


@lru_cache(maxsize=8)
def _own_csv(csv: str, mapping: str, name: str, seed: int, test_fraction: float) -> NodeData:
    data = load_partner_csv(csv, mapping)
    train, test = data.split(test_fraction, seed)
    return NodeData(name or data.spec.name, train, test)


@lru_cache(maxsize=8)
def _streamed(csv: str, mapping: str, name: str, seed: int, test_fraction: float,
              cache_dir: str) -> NodeData:
    spec = load_mapping(mapping)
    table = build_stream(csv, spec, cache_dir, seed=seed, test_fraction=test_fraction)
    return NodeData(name or spec.name, table.train, table.test)


def _stream_dir(node_config: dict, job: JobConfig, name: str, mapping: str) -> str:
    """Node-config `stream-dir`, else `stream/` in the partner's state folder (its own disk)."""
    if node_config.get("stream-dir"):
        return str(node_config["stream-dir"])
    from .local_round import node_state_dir  # local_round imports this module

    return str(node_state_dir(node_config, job, name or load_mapping(mapping).name) / "stream")


def load_node_data(node_config, job: JobConfig) -> NodeData:
    """Rows for this node: `data-csv` + `mapping` from the node's own config, else its partition.

    With `job.require_consent`, rows whose subject has no valid consent for the job's purpose are
    removed here — before any feature statistic is computed — and the count is recorded. Either
    way the subjects the job uses are recorded (`data.subjects_used`), so erasure finds its models.

    A CSV with more data rows than node-config `stream-rows` (else $FEDPACT_STREAM_ROWS, else
    `streaming.DEFAULT_STREAM_ROWS`; 0 = never) is not loaded: its rows are encoded once to
    on-disk arrays (`fedpact.models.streaming`) and trained from there in bounded memory.
    """
    node_config = dict(node_config)
    if "data-csv" in node_config:
        csv, mapping = str(node_config["data-csv"]), str(node_config["mapping"])
        name = str(node_config.get("partner", ""))
        limit = stream_threshold(node_config.get("stream-rows"))
        if limit and Path(csv).is_file() and count_data_rows(csv) > limit:
            node = _streamed(csv, mapping, name, job.seed, job.test_fraction,
                             _stream_dir(node_config, job, name, mapping))
        else:
            node = _own_csv(csv, mapping, name, job.seed, job.test_fraction)
    else:
        index = int(node_config.get("partition-id", 0))
        data_dir = node_config.get("data-dir")
        node = _simulated(job.dataset, job.partitioning, job.num_partitions, job.seed,
                          job.test_fraction, index, str(data_dir) if data_dir else None)
    if job.require_consent:
        ledger_path = str(node_config.get("consent-ledger") or job.ledger_path)
        return _consented(node, job.job_id, job.purpose, ledger_path)
    _record_subjects_used(node, job, node_config)
    return node


_RECORDED: set[tuple[str, str]] = set()


def _record_subjects_used(node: NodeData, job: JobConfig, node_config: dict) -> None:
    """Without consent enforcement too, remember which subjects' rows this job trains on, so that
    erasing a subject flags every model trained on their rows (`data.subjects_used`, once per job
    and partner). A dataset without a subject id column is recorded as untraceable instead.

    Recorded in the node-config `consent-ledger` (the partner's own registry), else in the job's
    ledger if this node can reach it, there once the coordinator has created the job (so the job's
    events still start with `job.created`; the handshake before it trains on no row). A node that
    can reach neither logs a warning, and erasure reports such jobs as untraceable."""
    key = (job.job_id, node.partner)
    if key in _RECORDED:
        return
    from fedpact.audit import EventType, Ledger
    from fedpact.audit.consent import ConsentRegistry

    configured = node_config.get("consent-ledger")
    ledger_path = Path(str(configured)) if configured else Path(job.ledger_path)
    if not configured and not ledger_path.is_file():
        _RECORDED.add(key)
        logger.warning("%s: job ledger %s not reachable and no consent-ledger configured: the "
                       "subjects job %s uses are not recorded (erasure cannot trace them)",
                       node.partner, ledger_path, job.job_id)
        return
    with Ledger.open(ledger_path) as ledger:
        if not configured and not ledger.events(job_id=job.job_id,
                                                event_type=EventType.JOB_CREATED.value):
            return  # the handshake: recorded when training starts
        if any(e.payload.get("dataset") == node.partner for e in ledger.events(
                job_id=job.job_id, event_type=EventType.SUBJECTS_USED.value)):
            _RECORDED.add(key)
            return
        registry = ConsentRegistry(ledger)
        actor = f"node:{node.partner}"
        if node.train.ids is None or node.test.ids is None:
            why = ("a streamed CSV keeps no subject ids" if isinstance(node.train, StreamedRows)
                   else "the dataset has no subject id column (set `id` in the mapping)")
            registry.record_untraceable(job.job_id, node.partner, job.purpose, why, actor=actor)
        else:
            registry.record_subjects_used(job.job_id, node.partner, job.purpose,
                                          node.train.ids.tolist() + node.test.ids.tolist(),
                                          actor=actor)
    _RECORDED.add(key)


_CONSENTED: dict[tuple[str, str, str], NodeData] = {}


def _consented(node: NodeData, job_id: str, purpose: str, ledger_path: str) -> NodeData:
    """This node's rows whose subjects consented to `purpose`; exclusions recorded once per job."""
    key = (job_id, node.partner, purpose)
    if key in _CONSENTED:
        return _CONSENTED[key]
    from fedpact.audit import EventType, Ledger
    from fedpact.audit.consent import ConsentRegistry

    if isinstance(node.train, StreamedRows):
        raise ConfigurationError(
            f"{node.partner}: consent enforcement is not supported for a streamed CSV "
            f"({len(node.train) + len(node.test)} rows); raise the node's stream-rows to load it in memory")
    if node.train.ids is None:
        raise ConfigurationError(
            f"{node.partner}: consent cannot be enforced without a subject id column; set `id` in "
            "the mapping file")
    with Ledger.open(ledger_path) as ledger:
        registry = ConsentRegistry(ledger)
        done = any(e.payload.get("dataset") == node.partner
                   for e in ledger.events(job_id=job_id, event_type=EventType.DATA_EXCLUDED.value))
        parts = []
        for rows in (node.train, node.test):
            ids = rows.ids.tolist()
            mask = registry.allowed(ids, purpose)
            parts.append(rows.subset(mask))
        if not done:
            total = len(node.train) + len(node.test)
            kept = len(parts[0]) + len(parts[1])
            actor = f"node:{node.partner}"
            registry.record_exclusion(job_id, node.partner, purpose, total - kept, total, actor=actor)
            registry.record_subjects_used(job_id, node.partner, purpose,
                                          parts[0].ids.tolist() + parts[1].ids.tolist(), actor=actor)
    if len(parts[0]) == 0:
        raise ConfigurationError(
            f"{node.partner}: no row has a valid consent for purpose {purpose!r}; nothing to train on")
    result = NodeData(node.partner, parts[0], parts[1])
    _CONSENTED[key] = result
    return result

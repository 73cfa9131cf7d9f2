"""Which rows a partner node trains on: its own CSV (deployment) or a simulated partition."""

from __future__ import annotations

import json
import logging
import tomllib
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

    Consent is enforced by default (`job.require_consent`): when the dataset has a subject id
    column, rows whose subject has no valid consent for the job's purpose in the partner's own
    registry (`partner_registry_path`) are removed here — before any feature statistic is
    computed — and the count excluded is recorded. A dataset without a subject id column cannot
    be checked: it proceeds, and its records say "consent not checkable" (never "checked"). With
    `require_consent=False` (an explicit setting) nothing is filtered and the records say so.

    Either way the subjects the job uses are recorded for erasure: their pseudonyms (under the
    partner's key) in the partner's registry, only a count and a commitment in the job's ledger
    (`_record_subjects`).

    A CSV with more data rows than node-config `stream-rows` (else $FEDPACT_STREAM_ROWS, else
    `streaming.DEFAULT_STREAM_ROWS`; 0 = never) is not loaded: its rows are encoded once to
    on-disk arrays (`fedpact.models.streaming`) and trained from there in bounded memory.
    """
    node_config = dict(node_config)
    if "data-csv" not in node_config and job.own_data:
        node_config = {**simulated_own_config(job, int(node_config.get("partition-id", 0))),
                       **node_config}
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
        node = simulated_partner(job, int(node_config.get("partition-id", 0)),
                                 node_config.get("data-dir"))
    registry = partner_registry_path(node_config, job, node.partner)
    traceable = node.train.ids is not None and node.test.ids is not None
    if not traceable and job.require_consent and node.train.spec.id_column:
        raise ConfigurationError(
            f"{node.partner}: consent cannot be checked for a streamed CSV "
            f"({len(node.train) + len(node.test)} rows; streamed rows keep no subject ids): raise "
            "the node's stream-rows to load it in memory, or run the job with "
            "require_consent=false (the job's records then say consent was not checked)")
    if traceable and job.require_consent:
        node = _consented(node, job, registry)
        consent = CONSENT_ENFORCED
    elif job.require_consent:
        consent = CONSENT_NOT_CHECKABLE
    else:
        consent = CONSENT_OFF
    _record_subjects(node, job, node_config, registry, consent)
    return node


CONSENT_ENFORCED = "enforced: rows without a valid consent for this purpose were excluded"
CONSENT_OFF = "off: the job set require_consent=false, rows were used without a consent check"
CONSENT_NOT_CHECKABLE = ("not checkable: the dataset has no subject id column, rows were used "
                         "without a consent check")
"""What each node's `data.subjects_used` says about consent (field `consent`)."""


SIMULATED_NODE_FILE = "node.toml"


def simulated_node_path(home: str | Path, partner: str) -> Path:
    """A simulated partner's node settings on its own disk: `<home>/nodes/<partner>/node.toml`."""
    from .local_round import node_state_dir  # local_round imports this module

    return node_state_dir({}, JobConfig(home=str(home), job_id="-"), partner) / SIMULATED_NODE_FILE


def write_simulated_node(home: str | Path, partner: str, csv: str | Path, mapping: str | Path) -> Path:
    """Set up simulated partner `partner` to serve its own CSV (what `flower-supernode
    --node-config "data-csv=... mapping=..."` does for a real node): paths stay in this file."""
    path = simulated_node_path(home, partner)
    path.parent.mkdir(parents=True, exist_ok=True)
    doc = {"partner": partner, "data-csv": str(Path(csv).resolve()), "mapping": str(Path(mapping).resolve())}
    path.write_text("".join(f"{k} = {json.dumps(v)}\n" for k, v in doc.items()), encoding="utf-8")
    return path


def simulated_own_config(job: JobConfig, index: int) -> dict:
    """The node settings of simulated partner `index` of a job on the partners' own data."""
    names = job.partner_list
    if not 0 <= index < len(names):
        raise ConfigurationError(f"simulated node {index}: job {job.job_id} names {len(names)} "
                                 "partner datasets")
    path = simulated_node_path(job.home, names[index])
    if not path.is_file():
        raise ConfigurationError(f"{names[index]}: this simulated partner has no data set up; give "
                                 f"it with fedpact train --partner {names[index]}=FILE.csv:MAPPING.toml")
    try:
        doc = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ConfigurationError(f"{names[index]}: simulated node settings unreadable: {exc}") from None
    return {k: doc[k] for k in ("partner", "data-csv", "mapping") if k in doc}


def simulated_partner(job: JobConfig, index: int, data_dir=None) -> NodeData:
    """The rows of simulated partner `index` of `job` (its partition, split), before consent."""
    return _simulated(job.dataset, job.partitioning, job.num_partitions, job.seed,
                      job.test_fraction, index, str(data_dir) if data_dir else None)


def partner_registry_path(node_config, job: JobConfig, partner: str) -> Path:
    """The partner's own consent registry and record of the subjects each job used: node-config
    `consent-ledger` (deployment), else `ledger.db` in the partner's state folder (simulation:
    `<home>/nodes/<partner>/ledger.db`), with its own keys beside it — never the coordinator's."""
    configured = dict(node_config).get("consent-ledger")
    if configured:
        return Path(str(configured))
    from .local_round import node_state_dir  # local_round imports this module

    return node_state_dir(node_config, job, partner) / "ledger.db"


def registry_cli_options(path: Path) -> str:
    """The `fedpact audit` options that open the registry at `path` with its own keys."""
    path = Path(path).absolute()
    if path.name == "ledger.db":
        return f"--home {path.parent}"
    return f"--db sqlite:///{path} --home {path.parent}"


def simulated_registries(home: str | Path) -> list[Path]:
    """The partner registries of simulated partners under a run folder (`nodes/*/ledger.db`)."""
    return sorted(Path(home).glob("nodes/*/ledger.db"))


_RECORDED: set[tuple[str, str, str]] = set()


def _same_file(a: Path, b: Path) -> bool:
    try:
        return a.resolve() == b.resolve()
    except OSError:
        return False


def _record_subjects(node: NodeData, job: JobConfig, node_config: dict, registry: Path,
                     consent: str) -> None:
    """Remember which subjects' rows this job uses, so that erasing a subject flags every model
    trained on their rows, with or without consent enforcement (once per job and partner).

    - The partner's registry (`registry`) keeps the pseudonyms, under the partner's own key
      (`job_subjects`, and a `data.subjects_used` event committing to their manifest hash).
    - The job's ledger (the coordinator's), when this node can reach it and the coordinator has
      created the job (so the job's events still start with `job.created`; the handshake before
      it trains on no row), gets `data.excluded` (counts) when consent was enforced and a
      `data.subjects_used` with the count, the partner's manifest hash and what was done about
      consent — no pseudonym the coordinator could resolve by guessing ids.

    A dataset without subject ids is recorded as untraceable instead (in the configured
    `consent-ledger`, and in the job's ledger)."""
    from fedpact.audit import EventType, Ledger
    from fedpact.audit.consent import ConsentRegistry

    traceable = node.train.ids is not None and node.test.ids is not None
    actor = f"node:{node.partner}"
    manifest = None
    partner_key = (job.job_id, node.partner, "partner")
    if partner_key not in _RECORDED and (traceable or node_config.get("consent-ledger")):
        with Ledger.open(registry) as ledger:
            manifest = _partner_record(ledger, ConsentRegistry(ledger), node, job, consent, actor)
        _RECORDED.add(partner_key)
    job_key = (job.job_id, node.partner, "job")
    if job_key in _RECORDED:
        return
    job_ledger = Path(job.ledger_path)
    if _same_file(job_ledger, registry):  # the partner's registry is the job's ledger
        _RECORDED.add(job_key)
        return
    if not job_ledger.is_file():  # a deployment node: its own registry holds the record
        _RECORDED.add(job_key)
        if not traceable and not node_config.get("consent-ledger"):
            logger.warning("%s: job ledger %s not reachable and no consent-ledger configured: "
                           "job %s is recorded nowhere as untraceable (erasure cannot tell)",
                           node.partner, job_ledger, job.job_id)
        return
    with Ledger.open(job_ledger) as ledger:
        if not ledger.events(job_id=job.job_id, event_type=EventType.JOB_CREATED.value):
            return  # the handshake: recorded when training starts
        if any(e.payload.get("dataset") == node.partner for e in ledger.events(
                job_id=job.job_id, event_type=EventType.SUBJECTS_USED.value)):
            _RECORDED.add(job_key)
            return
        coordinator = ConsentRegistry(ledger)
        if not traceable:
            coordinator.record_untraceable(job.job_id, node.partner, job.purpose,
                                           _untraceable_why(node), actor=actor, consent=consent)
        else:
            if manifest is None:  # recorded by another process serving this partner
                with Ledger.open(registry, read_only=True) as own:
                    manifest = _partner_manifest(own, node, job)
            total, kept, digest = manifest
            if consent == CONSENT_ENFORCED:
                coordinator.record_exclusion(job.job_id, node.partner, job.purpose, total - kept,
                                             total, actor=actor)
            coordinator.record_subjects_held_by_partner(
                job.job_id, node.partner, job.purpose, kept, partner_manifest_sha256=digest,
                consent=consent, actor=actor)
    _RECORDED.add(job_key)


def _untraceable_why(node: NodeData) -> str:
    return ("a streamed CSV keeps no subject ids" if isinstance(node.train, StreamedRows)
            else "the dataset has no subject id column (set `id` in the mapping)")


def _partner_record(ledger, registry, node: NodeData, job: JobConfig, consent: str,
                    actor: str) -> tuple[int, int, str] | None:
    """Record, once, in the partner's registry: the exclusion count (when consent was enforced)
    and the subjects used. Returns (rows before consent, subjects kept, manifest hash)."""
    existing = _partner_manifest(ledger, node, job)
    if existing is not None:
        return existing
    if node.train.ids is None or node.test.ids is None:
        registry.record_untraceable(job.job_id, node.partner, job.purpose, _untraceable_why(node),
                                    actor=actor, consent=consent)
        return None
    ids = node.train.ids.tolist() + node.test.ids.tolist()
    total = _CONSENT_TOTALS.get((job.job_id, node.partner, job.purpose), len(ids))
    if consent == CONSENT_ENFORCED:
        registry.record_exclusion(job.job_id, node.partner, job.purpose, total - len(ids), total,
                                  actor=actor)
    event = registry.record_subjects_used(job.job_id, node.partner, job.purpose, ids, actor=actor)
    return total, int(event.payload["subjects"]), str(event.payload["manifest_sha256"])


def _partner_manifest(ledger, node: NodeData, job: JobConfig) -> tuple[int, int, str] | None:
    """(rows before consent, subjects, manifest hash) of this job's record in the partner's
    registry, or None if there is none yet."""
    from fedpact.audit import EventType

    used = [e for e in ledger.events(job_id=job.job_id, event_type=EventType.SUBJECTS_USED.value)
            if e.payload.get("dataset") == node.partner and e.payload.get("traceable", True)]
    if not used:
        return None
    excluded = [e for e in ledger.events(job_id=job.job_id,
                                         event_type=EventType.DATA_EXCLUDED.value)
                if e.payload.get("dataset") == node.partner]
    kept = int(used[-1].payload["subjects"])
    total = int(excluded[-1].payload["total"]) if excluded else kept
    return total, kept, str(used[-1].payload["manifest_sha256"])


def _misplaced(job: JobConfig, registry_path: Path) -> str:
    """A hint when consent for the purpose was recorded in the coordinator's ledger instead."""
    from sqlalchemy import func, select

    from fedpact.audit import Ledger
    from fedpact.audit.store import consent_state

    job_ledger = Path(job.ledger_path)
    if _same_file(job_ledger, registry_path) or not job_ledger.is_file():
        return ""
    try:
        with Ledger.open(job_ledger, read_only=True) as ledger, ledger.store.read() as connection:
            held = connection.execute(select(func.count()).select_from(consent_state).where(
                consent_state.c.purpose == job.purpose)).scalar()
    except Exception:  # only a hint: never hide the refusal behind another error
        return ""
    return (f" (the coordinator's ledger {job_ledger} holds {held} consent records for it, but "
            "each partner's consent is checked in its own registry)") if held else ""


_CONSENTED: dict[tuple[str, str, str], NodeData] = {}
_CONSENT_TOTALS: dict[tuple[str, str, str], int] = {}


def _consented(node: NodeData, job: JobConfig, registry_path: Path) -> NodeData:
    """This node's rows whose subjects consented to the job's purpose in the partner's registry."""
    key = (job.job_id, node.partner, job.purpose)
    if key in _CONSENTED:
        return _CONSENTED[key]
    from fedpact.audit import Ledger
    from fedpact.audit.consent import ConsentRegistry

    with Ledger.open(registry_path) as ledger:
        registry = ConsentRegistry(ledger)
        parts = [rows.subset(registry.allowed(rows.ids.tolist(), job.purpose))
                 for rows in (node.train, node.test)]
    if len(parts[0]) == 0:
        raise ConfigurationError(
            f"{node.partner}: no row has a valid consent for purpose {job.purpose!r} in the "
            f"partner's registry {registry_path}{_misplaced(job, registry_path)}; record consent "
            f"there (fedpact audit consent import FILE {registry_cli_options(registry_path)}) or "
            "run the job with require_consent=false")
    result = NodeData(node.partner, parts[0], parts[1])
    _CONSENTED[key] = result
    _CONSENT_TOTALS[key] = len(node.train) + len(node.test)
    return result

"""Append-only, hash-chained audit ledger with a Merkle tree and Ed25519-signed checkpoints.

Every event records who did what to which data and why; its hash covers the previous event's hash,
so any later edit is detectable with `Ledger.verify()`. Every `checkpoint_every` events or
`checkpoint_interval_s` seconds (and on close) the new events are integrated into a Merkle tree
(RFC 9162) and its root is signed as a checkpoint, so truncation or a rewritten history is caught
too, and `prove()` gives inclusion proofs a third party checks with only the public key.

Payloads describe data (dataset names, row counts, column names) and subjects only by pseudonym;
personal fields go in the per-subject encrypted `personal` envelope (see `subjects.py`).
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import gc
import hashlib
import json
import logging
import os
import random
import sqlite3
import threading
import time
import uuid
from collections.abc import Collection, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from json.encoder import encode_basestring as _quote
from pathlib import Path
from types import TracebackType
from typing import Any, Self

from sqlalchemy import (
    URL,
    Connection,
    Engine,
    Select,
    func,
    make_url,
    select,
)
from sqlalchemy.exc import ArgumentError, IntegrityError, OperationalError, SQLAlchemyError

from fedpact.audit.chain import (
    GENESIS_HASH,
    ChainVerification,
    canonical_text_and_value,
    check_row,
    event_hash_from_text,
    event_id_for,
    id_prefix,
    id_prefix_of,
    parse_stored_payload,
    stored_type_problem,
)
from fedpact.audit.checkpoint import (
    Checkpoint,
    CheckpointError,
    CheckpointSigner,
    VerifierKey,
    load_or_create_signer,
    open_checkpoint,
)
from fedpact.audit.events import EventType, LedgerError, validate_payload
from fedpact.audit.merkle import (
    MerkleFrontier,
    ProofError,
    consistency_proof,
    fold_right,
    inclusion_proof,
    leaf_hash,
    node_hash,
    perfect_subtrees,
    root_hash,
    verify_consistency,
)
from fedpact.audit.normalise import purpose_key
from fedpact.audit.store import (
    IDS_BOUND_FROM,
    INDEXES_PENDING,
    LedgerStore,
    check_schema,
    consent_state,
    event_index,
    is_lock_contention,
    job_subjects,
    ledger_checkpoints,
    ledger_events,
    ledger_keys,
    ledger_meta,
    migrate,
    open_store,
    writer_macs,
)
from fedpact.audit.writer import WriterKey, describe, read_writer_key

__all__ = ["APPEND_ATTEMPTS", "Ledger", "LedgerEvent", "ledger_events"]

log = logging.getLogger(__name__)

APPEND_ATTEMPTS = 5
"""How many times an append that lost a race to another appender is retried before giving up."""

GROUP_COMMIT_WAIT_S = 0.0005
"""How long the leader of a group commit waits for appenders that are about to queue events."""
CHECKPOINT_EVERY = 1000
CHECKPOINT_INTERVAL_S = 60.0
_VERIFY_BATCH_ROWS = 8192
PROOF_FORMAT = "fedpact-inclusion-proof/1"
CONSISTENCY_FORMAT = "fedpact-consistency-proof/1"


@dataclass(frozen=True)
class LedgerEvent:
    """One recorded event, exactly as stored and hashed in the ledger."""

    seq: int
    event_id: str
    timestamp: str
    event_type: str
    actor: str
    job_id: str | None
    payload: dict[str, Any]
    prev_hash: str
    hash: str

    def to_dict(self) -> dict[str, Any]:
        """Return the event as a plain JSON-ready dict (payload deep-copied)."""
        return dataclasses.asdict(self)


def _utc_timestamp() -> str:
    """Current time as UTC ISO-8601 with microseconds, e.g. 2025-01-31T09:15:02.123456+00:00."""
    return datetime.now(UTC).isoformat(timespec="microseconds")


def _row_to_event(row: Any) -> LedgerEvent:
    """Build a LedgerEvent from a `ledger_events` row, raising LedgerError on a corrupt payload
    or a column stored with the wrong type (naming the event and the column)."""
    for column in ("event_id", "timestamp", "event_type", "actor", "job_id", "payload",
                   "prev_hash", "hash"):
        problem = stored_type_problem(row.seq, column, getattr(row, column))
        if problem is not None:
            raise LedgerError(
                f"event {row.seq} is corrupt: {problem.split(': ', 1)[1]}; run verify() for details"
            )
    try:
        payload = parse_stored_payload(row.payload)
    except LedgerError as exc:
        raise LedgerError(f"event {row.seq} is corrupt: {exc}; run verify() for details") from None
    return LedgerEvent(
        seq=row.seq,
        event_id=row.event_id,
        timestamp=row.timestamp,
        event_type=row.event_type,
        actor=row.actor,
        job_id=row.job_id,
        payload=payload,
        prev_hash=row.prev_hash,
        hash=row.hash,
    )


_INDEXED_FIELDS = (
    ("subject", "subject"), ("node", "partner"), ("partners", "partner"), ("parties", "partner"),
    ("dataset", "dataset"), ("datasets", "dataset"), ("purpose", "purpose"),
    ("channel", "channel"), ("request_id", "request"), ("principal", "principal"),
    ("model", "model"),
)


_INDEX_OF_FIELD = dict(_INDEXED_FIELDS)


def index_keys(kind: str, payload: Mapping[str, Any], actor: str) -> list[tuple[str, str]]:
    """The (kind, value) query keys of an event: subject, partner, dataset, purpose, channel, …"""
    keys: set[tuple[str, str]] = set()
    for field_name in _INDEX_OF_FIELD.keys() & payload.keys():
        index = _INDEX_OF_FIELD[field_name]
        value = payload[field_name]
        if value is None:
            continue
        if isinstance(value, str):
            if value:
                keys.add((index, value))
        elif isinstance(value, list | tuple):
            keys.update((index, item) for item in value if isinstance(item, str) and item)
    if actor.startswith("node:") and len(actor) > 5:
        keys.add(("partner", actor[5:]))
    return sorted(keys)


CONSENT_STATUS = {
    EventType.CONSENT_GRANTED.value: "granted",
    EventType.CONSENT_WITHDRAWN.value: "withdrawn",
    EventType.CONSENT_EXPIRED.value: "expired",
}


def utc_iso(value: str) -> str:
    """Normalise an ISO-8601 timestamp with offset to UTC microsecond form (sorts as text)."""
    return datetime.fromisoformat(value).astimezone(UTC).isoformat(timespec="microseconds")


@dataclass(slots=True, eq=False)  # compared by identity (queue removal)
class _Pending:
    """One append waiting for a group commit."""

    kind: str
    payload_text: str
    payload: dict[str, Any]
    actor: str
    job_id: str | None
    result: LedgerEvent | None = None
    error: BaseException | None = None
    done: bool = False
    gate: Any = None
    lead: bool = False


@dataclass(slots=True)
class _WriterState:
    """What the SQLite writer knows of the log without asking the database.

    Valid while the database's `PRAGMA data_version` (seen inside the write transaction) is
    `version`: no other connection has committed since, so the chain head is `tip_seq`/`tip_hash`
    and `pending` (when not None) holds the hashes of events `pending_base + 1 .. tip_seq`, which
    the next checkpoint integrates without re-reading them.
    """

    version: int | None
    tip_seq: int
    tip_hash: str
    pending_base: int = 0
    pending: list[str] | None = None


@dataclass(slots=True)
class _Built:
    event_rows: list[tuple[Any, ...]]
    index_rows: list[tuple[str, str, int]]
    consent_rows: list[dict[str, Any]]
    hashes: list[str]
    results: list[LedgerEvent]
    last_seq: int
    last_hash: str
    mac_rows: list[tuple[int, bytes]]


_new_object = object.__new__
_allocate_lock = threading.Lock


def _make_event(
    seq: int, event_id: str, timestamp: str, event_type: str, actor: str, job_id: str | None,
    payload: dict[str, Any], prev_hash: str, digest: str,
) -> LedgerEvent:
    """LedgerEvent(...) without the frozen dataclass's per-field object.__setattr__ calls."""
    event = _new_object(LedgerEvent)
    event.__dict__.update(
        seq=seq, event_id=event_id, timestamp=timestamp, event_type=event_type, actor=actor,
        job_id=job_id, payload=payload, prev_hash=prev_hash, hash=digest,
    )
    return event


_EVENT_COLUMNS = (
    "seq", "event_id", "timestamp", "event_type", "actor", "job_id", "payload", "prev_hash", "hash",
)
_INSERT_EVENT = (
    "INSERT INTO ledger_events (seq, event_id, timestamp, event_type, actor, job_id, payload, "
    "prev_hash, hash) VALUES ({0}, {0}, {0}, {0}, {0}, {0}, {0}, {0}, {0})"
)
_INSERT_INDEX = "INSERT INTO event_index (kind, value, seq) VALUES ({0}, {0}, {0})"
# a tag left behind by an event removed outside fedpact (a truncated tail) is replaced when
# that seq is written again; the removal itself is caught by the signed checkpoints
_INSERT_MAC = "INSERT OR REPLACE INTO writer_macs (seq, mac) VALUES (?, ?)"
_INSERT_MAC_PG = "INSERT INTO writer_macs (seq, mac) VALUES (%s, %s) ON CONFLICT (seq) DO NOTHING"
_CONSENT_COLUMNS = (
    "subject", "purpose", "status", "channel", "legal_basis", "notice_version", "source",
    "effective_at", "expires_at", "seq",
)
_UPSERT_CONSENT = (
    f"INSERT INTO consent_state ({', '.join(_CONSENT_COLUMNS)}) VALUES "
    f"({', '.join(':' + c for c in _CONSENT_COLUMNS)}) ON CONFLICT (subject, purpose) DO UPDATE SET "
    + ", ".join(f"{c} = excluded.{c}" for c in _CONSENT_COLUMNS if c not in ("subject", "purpose"))
    + " WHERE excluded.effective_at >= consent_state.effective_at"
)
IDS_EXTENSION = "ids-bound-from"
"""Checkpoint note extension line: `ids-bound-from N`, the first seq whose event id is bound."""
_RECHECK_SQL = (
    "SELECT e.seq, e.timestamp, e.event_type, e.actor, e.job_id, e.payload, e.prev_hash, e.hash, "
    "e.event_id, m.mac FROM ledger_events e LEFT JOIN writer_macs m ON m.seq = e.seq "
    "WHERE e.seq > {lo} AND e.seq <= {hi} ORDER BY e.seq"
)
_LATEST_CHECKPOINT = (
    "SELECT tree_size, root_hash, timestamp, note FROM ledger_checkpoints "
    "ORDER BY tree_size DESC LIMIT 1"
)


def _build_rows(
    batch: Sequence[_Pending], seq: int, prev: str, writer: WriterKey | None = None
) -> _Built:
    """Chain `batch` after event `seq` (hash `prev`): the rows to insert and the events recorded.

    One timestamp for the whole transaction; each event's hashed record text is assembled from
    its payload's canonical text (encoded once, in `_prepare`) exactly as `chain.record_text` does.
    Each event's id is derived from its record (`chain.event_id_for`: the millisecond clock of
    the timestamp, then the first 80 bits of the hash), and with `writer` each event gets its tag.
    """
    now = datetime.now(UTC)
    stamp = now.isoformat(timespec="microseconds")
    prefix = id_prefix_of(now)
    quoted_stamp = _quote(stamp)
    sha256 = hashlib.sha256
    event_rows: list[tuple[Any, ...]] = []
    index_rows: list[tuple[str, str, int]] = []
    consent_rows: list[dict[str, Any]] = []
    hashes: list[str] = []
    results: list[LedgerEvent] = []
    for item in batch:
        seq += 1
        actor, job_id, kind = item.actor, item.job_id, item.kind
        digest = sha256(
            (
                f'{{"actor":{_quote(actor)},"event_type":{_quote(kind)},'
                f'"job_id":{"null" if job_id is None else _quote(job_id)},'
                f'"payload":{item.payload_text},"prev_hash":{_quote(prev)},"seq":{seq},'
                f'"timestamp":{quoted_stamp}}}'
            ).encode()
        ).hexdigest()
        event_id = prefix + digest[:20]
        event_rows.append(
            (seq, event_id, stamp, kind, actor, job_id, item.payload_text, prev, digest)
        )
        results.append(
            _make_event(seq, event_id, stamp, kind, actor, job_id, item.payload, prev, digest)
        )
        hashes.append(digest)
        for key, value in index_keys(kind, item.payload, actor):
            index_rows.append((key, value, seq))
        status = CONSENT_STATUS.get(kind)
        if status is not None:
            consent_rows.append(_consent_row(status, item.payload, seq))
        prev = digest
    macs = list(zip(range(seq - len(hashes) + 1, seq + 1), writer.macs(hashes), strict=True)) \
        if writer else []
    return _Built(event_rows, index_rows, consent_rows, hashes, results, seq, prev, macs)


class Ledger:
    """Append-only, hash-chained, Merkle-checkpointed audit log, stored via a `LedgerStore`.

    Safe for concurrent appenders in several threads (which share group commits) or processes
    (which serialise on the database's write lock). `Ledger.open(path)` is SQLite; `Ledger(url)`
    takes sqlite:/// or postgresql:// URLs. Keys live in `key_dir` (default: beside a SQLite file):
    `<name>.signing-key` (private, signs checkpoints), `<name>.pub` (verifier keys to publish),
    `<name>.writer-key` (private, tags every event: see `writer.py`) and `<name>.secret` (the
    deployment secret for pseudonyms and per-subject keys). None of them is kept in the database.

    `read_only=True` opens an existing ledger for reading and verification only: nothing is
    created (no database, no key files), no checkpoint is signed (not even on `close()`), and
    every connection refuses writes at the database level.
    """

    def __init__(
        self,
        url: str | URL,
        *,
        busy_timeout_s: float = 30.0,
        key_dir: str | os.PathLike[str] | None = None,
        checkpoint_every: int = CHECKPOINT_EVERY,
        checkpoint_interval_s: float = CHECKPOINT_INTERVAL_S,
        read_only: bool = False,
    ) -> None:
        try:
            self._url = make_url(url)
        except ArgumentError as exc:
            raise LedgerError(f"invalid ledger database URL {url!r}: {exc}") from None
        self._closed = False
        self._read_only = read_only
        self._wrote = False
        self._timer: tuple[threading.Thread, threading.Event] | None = None
        self.close_error: LedgerError | None = None
        """Why `close()` could not sign this instance's newest events (None if it did or had none)."""
        if read_only:
            check_readable(self._url)
        self._store: LedgerStore = open_store(
            self._url, busy_timeout_s=busy_timeout_s, read_only=read_only
        )
        self._is_sqlite = self._store.dialect == "sqlite"
        try:
            if read_only:
                check_schema(self._store)
            else:
                migrate(self._store)
            self._ledger_id = self._identity()
        except (SQLAlchemyError, LedgerError) as exc:
            self._store.close()
            if isinstance(exc, LedgerError):
                raise
            raise LedgerError(
                f"cannot open ledger database {self._display_url}: {getattr(exc, 'orig', exc)}"
            ) from exc
        if checkpoint_every < 1:
            raise LedgerError(f"checkpoint_every must be >= 1, got {checkpoint_every}")
        self.checkpoint_every = checkpoint_every
        self.checkpoint_interval_s = checkpoint_interval_s
        self._queue: list[_Pending] = []
        self._queue_lock = threading.Lock()
        self._leader = False
        self._appenders = 0
        self._checkpoint_lock = threading.Lock()
        # SQLite: one raw connection appends and checkpoints, with the chain head, the Merkle
        # frontier and the not-yet-checkpointed hashes cached (see _WriterState)
        self._write_lock = threading.RLock()
        self._raw_writer: sqlite3.Connection | None = None
        self._close_raw_writer: Any = None
        self._state: _WriterState | None = None
        self._frontier_cache: MerkleFrontier | None = None
        self._key_dir, self._key_base = self._locate_keys(key_dir)
        self._ephemeral_secret: bytes | None = None
        self._ids_from = self._meta_int(IDS_BOUND_FROM)
        self._writer_key = self._load_writer_key()
        self._signer = self._load_signer()
        self._last_checkpoint_size = self._latest_checkpoint_size()
        self._last_checkpoint_wall = time.time()
        # revisions before 0002 had no query index or consent state: `migrate` marks them
        # pending in the upgrade's transaction, and they are derived from the chain here
        self._rebuild_pending_indexes()

    def _rebuild_pending_indexes(self) -> None:
        """Derive the indexes an upgrade left empty (see `INDEXES_PENDING`); on failure close the
        ledger and say how to repair it, keeping the mark so the next open tries again. A
        read-only opening cannot derive them, and refuses rather than answer from empty ones."""
        with self._store.read() as connection:
            pending = connection.execute(
                select(ledger_meta.c.value).where(ledger_meta.c.key == INDEXES_PENDING)
            ).scalar()
        if pending is None:
            return
        schema = f"schema {pending}" if pending else "a schema older than 0001"
        if self._read_only:
            self.close()
            raise LedgerError(
                f"ledger {self._display_url} was upgraded from {schema} and its query indexes "
                "are not derived yet: queries would miss events. Open it once read-write (e.g. "
                "`fedpact audit reindex`) to derive them"
            )
        try:
            self.rebuild_indexes()
            with self._store.write() as connection:
                connection.execute(ledger_meta.delete().where(ledger_meta.c.key == INDEXES_PENDING))
        except (SQLAlchemyError, LedgerError) as exc:
            self.close()
            raise LedgerError(
                f"ledger {self._display_url} was upgraded from {schema}, but its query "
                f"indexes could not be derived from the chain ({getattr(exc, 'orig', exc)}); "
                "queries, DSAR reports and erasure would miss events until they are: run "
                "`fedpact audit verify`, then `fedpact audit reindex` (this is retried on every open)"
            ) from None

    @classmethod
    def open(cls, path: str | os.PathLike[str], **options: Any) -> Ledger:
        """Open (or create) a SQLite ledger file at `path`, creating missing parent directories.

        With `read_only=True` the file must exist; nothing is created.
        """
        db_path = Path(path).expanduser().absolute()
        if db_path.is_dir():
            raise LedgerError(f"cannot open ledger {db_path}: it is a directory, not a file")
        if options.get("read_only"):
            return cls(URL.create("sqlite", database=str(db_path)), **options)
        try:
            db_path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise LedgerError(
                f"cannot create the directory for ledger {db_path}: {exc.strerror or exc}"
            ) from None
        return cls(URL.create("sqlite", database=str(db_path)), **options)

    # --- identity, keys -----------------------------------------------------------------------

    @property
    def _engine(self) -> Engine:
        return self._store.engine

    @property
    def _display_url(self) -> str:
        return self._url.render_as_string(hide_password=True)

    @property
    def store(self) -> LedgerStore:
        return self._store

    @property
    def origin(self) -> str:
        """The log's name in its checkpoints, `fedpact-audit/<ledger id>`; also the key name."""
        return f"fedpact-audit/{self._ledger_id}"

    @property
    def read_only(self) -> bool:
        """True when opened with `read_only=True`: nothing is written or signed."""
        return self._read_only

    def _identity(self) -> str:
        with self._store.read() as connection:
            known = connection.execute(
                select(ledger_meta.c.value).where(ledger_meta.c.key == "ledger_id")
            ).scalar()
        if known:
            return str(known)
        if self._read_only:
            raise LedgerError(f"ledger {self._display_url} has no ledger id (ledger_meta is empty)")
        with self._store.write() as connection:
            self._store.insert_ignore(
                connection, ledger_meta, [{"key": "ledger_id", "value": uuid.uuid4().hex}]
            )
            return str(
                connection.execute(
                    select(ledger_meta.c.value).where(ledger_meta.c.key == "ledger_id")
                ).scalar_one()
            )

    def _locate_keys(self, key_dir: str | os.PathLike[str] | None) -> tuple[Path | None, str]:
        database = self._store.database_path
        if key_dir is not None:
            folder = Path(key_dir).expanduser().absolute()
            base = database.name if database is not None else "ledger"
        elif database is not None:
            folder, base = database.parent, database.name
        elif os.environ.get("FEDPACT_AUDIT_KEY_DIR"):
            folder, base = Path(os.environ["FEDPACT_AUDIT_KEY_DIR"]).absolute(), "ledger"
        elif self._is_sqlite:
            return None, "ledger"  # in-memory: keys live only as long as this object
        else:
            raise LedgerError(
                f"ledger {self._display_url} needs key_dir= (or FEDPACT_AUDIT_KEY_DIR) naming "
                "the folder for its checkpoint signing key and deployment secret"
            )
        if self._read_only:
            return folder, base  # read-only: create nothing
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise LedgerError(f"cannot create key folder {folder}: {exc.strerror or exc}") from None
        return folder, base

    def key_path(self, kind: str) -> Path | None:
        """Path of this ledger's `signing-key`, `pub` or `secret` file (None for in-memory ledgers)."""
        if self._key_dir is None:
            return None
        return self._key_dir / f"{self._key_base}.{kind}"

    def deployment_secret(self) -> bytes:
        """The 32-byte deployment secret (pseudonym HMAC key and key-wrapping root), created once."""
        path = self.key_path("secret")
        if path is None:
            if self._ephemeral_secret is None:
                self._ephemeral_secret = os.urandom(32)
            return self._ephemeral_secret
        if not path.exists():
            if self._read_only:
                raise LedgerError(
                    f"no deployment secret at {path}: subject ids cannot be pseudonymised "
                    "(pass a pseudonym, or point at the folder holding the ledger's keys)"
                )
            _create_file_once(path, base64.b64encode(os.urandom(32)) + b"\n")
        try:
            secret = base64.b64decode(path.read_bytes().strip(), validate=True)
        except (OSError, ValueError) as exc:
            raise LedgerError(f"cannot read the deployment secret {path}: {exc}") from None
        if len(secret) != 32:
            raise LedgerError(f"deployment secret {path} is not 32 bytes of base64")
        return secret

    def _meta_int(self, key: str) -> int | None:
        with self._store.read() as connection:
            value = connection.execute(
                select(ledger_meta.c.value).where(ledger_meta.c.key == key)
            ).scalar()
        try:
            return int(value) if value is not None else None
        except (TypeError, ValueError):
            return None  # verify() names the altered row

    def _load_writer_key(self) -> WriterKey | None:
        """The key that tags this ledger's events: read from `<name>.writer-key`, created on the
        first read-write opening of a ledger no key has tagged yet (from `ids_bound_from`).

        A ledger whose events carry tags but whose key file is gone gets no new key (that would
        vouch for whatever was appended meanwhile): events are then appended untagged, and
        `verify()` names them, until the key is restored; no checkpoint is signed meanwhile."""
        path = self.key_path("writer-key")
        if path is None:  # in-memory: the key lives as long as this object (and the database)
            return WriterKey.generate(self._ledger_id, self._ids_from or 1)
        key = read_writer_key(path)
        if key is None and not self._read_only:
            with self._store.write() as connection:  # no appender runs in between
                tagged = connection.execute(select(writer_macs.c.seq).limit(1)).first()
                if tagged is None:
                    start = self._ids_from
                    if start is None:
                        start = int(connection.exec_driver_sql(
                            "SELECT coalesce(max(seq), 0) FROM ledger_events").scalar()) + 1
                    _create_file_once(path, WriterKey.generate(self._ledger_id, start)
                                      .encode().encode("ascii"))
            key = read_writer_key(path)
            if key is None:
                log.warning(
                    "ledger %s: no writer key at %s, but its events carry writer tags: events "
                    "appended now are not authenticated (verify will name them) and no checkpoint "
                    "is signed until the key is restored", self._display_url, path,
                )
        if key is not None and key.ledger_id != self._ledger_id:
            raise LedgerError(
                f"writer key {path} belongs to ledger {key.ledger_id}, not to this one "
                f"({self._ledger_id}): a copied or mixed-up key folder"
            )
        return key

    @property
    def ids_bound_from(self) -> int:
        """The first seq whose event id is derived from its record (`chain.event_id_for`)."""
        if self._writer_key is not None:
            return self._writer_key.from_seq
        return self._ids_from if self._ids_from is not None else 1

    def _check_event_id(self, event: LedgerEvent) -> None:
        """Refuse an event whose id is not the one its record gives (renamed or swapped)."""
        if event.seq < self.ids_bound_from:
            return
        expected = event_id_for(event.timestamp, event.hash)
        if event.event_id != expected:
            raise LedgerError(
                f"event {event.seq}: its event_id {event.event_id!r} is not the id its record "
                f"gives ({expected}): event ids were renamed or swapped; run `fedpact audit verify`"
            )

    def _load_signer(self) -> CheckpointSigner | None:
        if self._read_only:
            return None  # never signs, never creates or registers a key
        path = self.key_path("signing-key")
        if path is None:
            signer = CheckpointSigner.generate(self.origin.replace("/", "-"))
        elif path.exists() or not self._registered_keys():
            signer = load_or_create_signer(path, self.origin.replace("/", "-"))
        else:
            log.warning(
                "ledger %s: no signing key at %s; events are appended but not checkpointed",
                self._display_url, path,
            )
            return None
        self._register_key(signer.verifier)
        return signer

    def _registered_keys(self) -> list[VerifierKey]:
        with self._store.read() as connection:
            texts = connection.execute(select(ledger_keys.c.vkey)).scalars().all()
        return [VerifierKey.parse(t) for t in texts]

    def _register_key(self, key: VerifierKey) -> None:
        with self._store.read() as connection:
            known = connection.execute(
                select(ledger_keys.c.key_id).where(ledger_keys.c.key_id == key.key_id.hex())
            ).scalar()
        if not known:
            self._insert_key(key)
        pub = self.key_path("pub")
        if pub is not None:
            known_keys = pub.read_text().split() if pub.exists() else []
            if key.encode() not in known_keys:
                with open(pub, "a", encoding="ascii") as handle:
                    handle.write(key.encode() + "\n")

    def _insert_key(self, key: VerifierKey) -> None:
        with self._store.write() as connection:
            self._store.insert_ignore(
                connection,
                ledger_keys,
                [{"key_id": key.key_id.hex(), "name": key.name, "vkey": key.encode(),
                  "added": _utc_timestamp()}],
            )

    @property
    def verifier_key(self) -> VerifierKey | None:
        """The public key that signs this ledger's new checkpoints (None without a signing key)."""
        return None if self._signer is None else self._signer.verifier

    def trusted_keys(self) -> list[VerifierKey]:
        """Keys `verify()` accepts by default: the `.pub` file beside the ledger and this
        instance's own signing key. Never the keys recorded in the database (`ledger_keys`):
        whoever can rewrite the database could put their own key there. Empty when there is
        neither (pass keys obtained independently, or a kept checkpoint, to `verify`)."""
        pub = self.key_path("pub")
        keys: list[VerifierKey] = []
        if pub is not None and pub.exists():
            keys = [VerifierKey.parse(line) for line in pub.read_text().split()]
        if self._signer is not None and self._signer.verifier not in keys:
            keys.append(self._signer.verifier)
        return keys

    def _verification_keys(
        self, public_keys: Sequence[VerifierKey] | None, kept_note: str | None
    ) -> list[VerifierKey]:
        """The keys to verify with: those given; else `trusted_keys()`; else, given a signed
        checkpoint kept elsewhere, the recorded key(s) that signed that very note (the note
        vouches for its key; the database alone vouches for nothing)."""
        if public_keys is not None:
            return list(public_keys)
        keys = self.trusted_keys()
        if keys or kept_note is None:
            return keys
        vouched = []
        for key in self._registered_keys():
            try:
                open_checkpoint(kept_note, key)
            except CheckpointError:
                continue
            vouched.append(key)
        return vouched

    def _no_key_verdict(self, signed: int) -> ChainVerification:
        pub = self.key_path("pub")
        where = f"{pub} is missing" if pub is not None else "this in-memory ledger has no .pub file"
        return ChainVerification(
            False, 0, None,
            f"no public key to check the {signed} signed checkpoint"
            f"{'s' if signed != 1 else ''} with: {where}. Verification never uses the keys "
            "recorded in the database it checks: pass the verifier key obtained independently "
            "(--public-key FILE) or a signed checkpoint kept from earlier (--checkpoint FILE)",
            GENESIS_HASH,
        )

    def rotate_signing_key(self, *, actor: str, reason: str) -> VerifierKey:
        """Sign future checkpoints with a fresh key; the old public key stays trusted for old ones."""
        path = self.key_path("signing-key")
        self.checkpoint()
        new = CheckpointSigner.generate(self.origin.replace("/", "-"))
        if path is not None:
            retired = path.with_name(f"{path.name}.retired-{int(time.time())}")
            if path.exists():
                path.rename(retired)
            _create_file_once(path, (new.encode_private() + "\n").encode())
        self._signer = new
        self._register_key(new.verifier)
        self.append(
            EventType.KEYS_ROTATED,
            {"key": "checkpoint-signing", "new_key_id": new.verifier.key_id.hex(),
             "reason": reason},
            actor=actor,
        )
        return new.verifier

    # --- lifecycle -----------------------------------------------------------------------------

    def __repr__(self) -> str:
        state = "closed" if self._closed else "open"
        return f"Ledger({self._display_url!r}, {state})"

    def close(self) -> None:
        """Sign a checkpoint over unsigned events, then release the database connections.

        Signs only when this instance holds the signing key and appended events itself; a
        read-only ledger (or one that only read) never signs, so opening a ledger to look at it
        cannot vouch for a log someone else has altered. If signing fails (e.g. a tampered
        database) the close still completes: the error is logged and kept in `close_error`.
        """
        if self._closed:
            return
        self.stop_checkpoint_timer()
        try:
            if self._signer is not None and self._wrote and not self._read_only:
                self.checkpoint()
        except LedgerError as exc:  # never lose the close; the next writer signs these events
            self.close_error = exc
            log.warning("ledger %s: closing without a final checkpoint: %s", self._display_url, exc)
        finally:
            self._closed = True
            with self._write_lock:
                if self._close_raw_writer is not None:
                    with contextlib.suppress(sqlite3.Error):
                        self._close_raw_writer()
                    self._raw_writer = self._close_raw_writer = None
            self._store.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    def start_checkpoint_timer(self, interval_s: float | None = None) -> None:
        """Sign unsigned events every `interval_s` seconds (default `checkpoint_interval_s`) from a
        daemon thread, even while no one appends: for long-running writers such as the API
        service (`CoordinatorService.start()` should call this; `close()` stops it).

        Appends sign a due checkpoint only when they happen, so without this an idle writer
        leaves its newest events protected by the chain alone.
        """
        if self._read_only or self._signer is None:
            raise LedgerError(
                f"ledger {self._display_url} cannot sign checkpoints "
                f"({'read-only' if self._read_only else 'no signing key'}): no timer to start"
            )
        period = self.checkpoint_interval_s if interval_s is None else interval_s
        if not period > 0:
            raise LedgerError(f"checkpoint timer interval must be > 0 seconds, got {period}")
        if self._timer is not None:
            return
        stop = threading.Event()

        def run() -> None:
            while not stop.wait(period):
                try:
                    self._sign_if_pending()
                except Exception as exc:  # noqa: BLE001 - keep ticking; the next tick retries
                    log.warning("ledger %s: timed checkpoint failed: %s", self._display_url, exc)

        thread = threading.Thread(target=run, name="fedpact-ledger-checkpoint", daemon=True)
        self._timer = (thread, stop)
        thread.start()

    def stop_checkpoint_timer(self) -> None:
        """Stop the thread started by `start_checkpoint_timer` (no-op without one)."""
        timer, self._timer = self._timer, None
        if timer is not None:
            thread, stop = timer
            stop.set()
            if thread is not threading.current_thread():
                thread.join(timeout=30)

    def _sign_if_pending(self) -> SignedCheckpointInfo | None:
        """Sign a checkpoint if the database holds events no checkpoint covers yet."""
        if self._closed:
            return None
        with self._connect() as connection:
            head = connection.exec_driver_sql(
                "SELECT coalesce(max(seq), 0) FROM ledger_events"
            ).scalar()
            size = connection.execute(select(func.max(ledger_checkpoints.c.tree_size))).scalar()
        if int(head or 0) <= int(size or 0):
            return None
        with self._checkpoint_lock:
            return self.checkpoint()

    @contextlib.contextmanager
    def _connect(self, *, write: bool = False, snapshot: bool = False) -> Iterator[Connection]:
        """Yield a connection in a transaction; a write transaction takes the write lock at BEGIN."""
        if self._closed:
            raise LedgerError("the ledger is closed")
        with (self._store.write() if write else self._store.read(snapshot=snapshot)) as connection:
            yield connection

    # --- appending -----------------------------------------------------------------------------

    @staticmethod
    def _chain_tip(connection: Connection | sqlite3.Connection) -> tuple[int, str]:
        """Return (seq, hash) of the newest event, or (0, GENESIS_HASH) for an empty ledger."""
        sql = "SELECT seq, hash FROM ledger_events ORDER BY seq DESC LIMIT 1"
        if isinstance(connection, Connection):
            row = connection.exec_driver_sql(sql).first()
        else:
            row = connection.execute(sql).fetchone()
        return (0, GENESIS_HASH) if row is None else (int(row[0]), row[1])

    @staticmethod
    def _prepare(
        event_type: EventType | str,
        payload: Mapping[str, Any],
        actor: str,
        job_id: str | None,
    ) -> _Pending:
        kind = EventType.parse(event_type)
        validate_payload(kind, payload)
        if not isinstance(actor, str) or not actor:
            raise LedgerError("actor must be a non-empty string naming who performed the action")
        if job_id is not None and (not isinstance(job_id, str) or not job_id):
            raise LedgerError("job_id must be a non-empty string or None")
        text, value = canonical_text_and_value(payload, label="payload")
        return _Pending(kind.value, text, value, actor, job_id)

    def append(
        self,
        event_type: EventType | str,
        payload: dict[str, Any],
        *,
        actor: str,
        job_id: str | None = None,
    ) -> LedgerEvent:
        """Validate, chain and durably record one event; return it as stored.

        Appends from several threads at once are committed together (group commit: one durable
        transaction, one fsync, for every append waiting at that moment).
        """
        self._appenders += 1  # (under the GIL; a hint for batching only)
        try:
            pending = self._prepare(event_type, payload, actor, job_id)
            self._group_commit(pending)
        finally:
            self._appenders -= 1
        if pending.error is not None:
            raise pending.error
        assert pending.result is not None
        self._maybe_checkpoint()
        return pending.result

    def append_many(
        self, events: Iterable[tuple[EventType | str, Mapping[str, Any], str, str | None]]
    ) -> list[LedgerEvent]:
        """Validate every (event_type, payload, actor, job_id) first, then record all or none.

        One transaction: either every event is chained and committed, or (on any invalid event,
        named by its position) nothing is written.
        """
        batch: list[_Pending] = []
        for position, (event_type, payload, actor, job_id) in enumerate(events):
            try:
                batch.append(self._prepare(event_type, payload, actor, job_id))
            except LedgerError as exc:
                raise LedgerError(f"event #{position + 1} of the batch: {exc}") from None
        if not batch:
            return []
        self._write_batch(batch)
        failed = next((p.error for p in batch if p.error is not None), None)
        if failed is not None:
            raise failed
        self._maybe_checkpoint()
        return [p.result for p in batch if p.result is not None]

    def _group_commit(self, pending: _Pending) -> None:
        """Queue `pending`; the first appender in line writes everything queued in one transaction.

        Each waiter sleeps on its own gate (a locked lock): the leader opens the gates of the
        events it committed and then hands the lead to the next queued appender, so no thread
        is woken just to find its event still queued.
        """
        gate = _allocate_lock()
        gate.acquire()
        pending.gate = gate
        with self._queue_lock:
            self._queue.append(pending)
            lead = not self._leader
            self._leader = True
        if not lead:
            try:
                gate.acquire()  # opened when our event is committed, or when we are to lead
            except BaseException:  # interrupted while queued: withdraw, pass on a lead given to us
                with self._queue_lock:
                    if not pending.done and pending in self._queue:
                        self._queue.remove(pending)
                        if pending.lead:
                            if self._queue:
                                self._queue[0].lead = True
                                self._queue[0].gate.release()
                            else:
                                self._leader = False
                raise
            if pending.done:
                return
        # Other threads are about to queue events (they are preparing them, or were just woken
        # by the previous commit): give them a moment to join this transaction and its fsync.
        deadline = 0.0
        while len(self._queue) < self._appenders:
            now = time.perf_counter()
            if not deadline:
                deadline = now + GROUP_COMMIT_WAIT_S
            elif now > deadline:
                break
            time.sleep(0)
        with self._queue_lock:
            batch, self._queue = self._queue, []
        try:
            self._write_batch(batch)
        except BaseException as exc:  # surfaced to every waiter of this batch
            for item in batch:
                if item.result is None and item.error is None:
                    item.error = exc
            raise
        finally:
            for item in batch:
                item.done = True
                if item is not pending:
                    item.gate.release()
            with self._queue_lock:
                if self._queue:
                    self._queue[0].lead = True
                    self._queue[0].gate.release()  # the next in line leads
                else:
                    self._leader = False

    def _write_batch(self, batch: list[_Pending]) -> None:
        """Chain and insert `batch` in one write transaction, retrying lost races."""
        last_error: BaseException | None = None
        for attempt in range(1, APPEND_ATTEMPTS + 1):
            try:
                self._write_once(batch)
                self._wrote = True
                return
            except (IntegrityError, sqlite3.IntegrityError) as exc:  # another appender won the seq
                last_error = exc
            except (OperationalError, sqlite3.OperationalError) as exc:
                if not is_lock_contention(exc):
                    error = LedgerError(
                        f"could not append {batch[0].kind} event: {getattr(exc, 'orig', exc)}"
                    )
                    for item in batch:
                        item.error = error
                    return
                last_error = exc
            time.sleep(random.uniform(0.0, 0.05 * attempt))
        error = LedgerError(
            f"could not append {batch[0].kind} event after {APPEND_ATTEMPTS} attempts: "
            f"concurrent appenders kept winning the race ({getattr(last_error, 'orig', last_error)})"
        )
        for item in batch:
            item.error = error

    def _write_once(self, batch: list[_Pending]) -> None:
        """Chain and insert `batch` in one durable write transaction (one fsync)."""
        if self._is_sqlite:
            self._write_once_sqlite(batch)
            return
        with self._connect(write=True) as connection:
            last_seq, last_hash = self._chain_tip(connection)
            built = _build_rows(batch, last_seq, last_hash, self._writer_key)
            self._store.bulk_insert(connection, "ledger_events", _EVENT_COLUMNS, built.event_rows)
            if built.mac_rows:
                connection.exec_driver_sql(
                    _INSERT_MAC_PG if self._store.dialect == "postgresql"
                    else _INSERT_MAC.replace("?", self._store.placeholder), built.mac_rows)
            self._store.bulk_insert(
                connection, "event_index", ("kind", "value", "seq"), built.index_rows
            )
            if built.consent_rows:
                connection.exec_driver_sql(
                    self._store.paramstyle_named(_UPSERT_CONSENT), built.consent_rows
                )
        for item, result in zip(batch, built.results, strict=True):
            item.result = result
        self._last_seq_hint = max(self._last_seq_hint, built.last_seq)

    # --- the SQLite writer ----------------------------------------------------------------------

    def _writer(self) -> sqlite3.Connection:
        if self._closed:
            raise LedgerError("the ledger is closed")
        if self._raw_writer is None:
            if self._read_only:
                raise LedgerError(
                    f"ledger {self._display_url} is open read-only: this command may not change it"
                )
            self._raw_writer, self._close_raw_writer = self._store.open_writer()
        return self._raw_writer

    @contextlib.contextmanager
    def _raw_write(self) -> Iterator[tuple[sqlite3.Connection, _WriterState]]:
        """BEGIN IMMEDIATE on the raw writer, with the cached state checked.

        The body COMMITs, then updates the cached state (still under the write lock); any
        exception rolls back and drops the cache.
        """
        with self._write_lock, self._store.guard:
            connection = self._writer()
            connection.execute("BEGIN IMMEDIATE")
            try:
                yield connection, self._sync_state(connection)
                if connection.in_transaction:
                    raise LedgerError("internal error: write transaction left open")
            except BaseException:
                self._state = None  # re-read everything next time
                if connection.in_transaction:
                    with contextlib.suppress(sqlite3.Error):
                        connection.execute("ROLLBACK")
                raise

    def _sync_state(self, connection: sqlite3.Connection) -> _WriterState:
        """The cached state, re-read from the database if another connection committed since."""
        version = connection.execute("PRAGMA data_version").fetchone()[0]
        state = self._state
        if state is not None and state.version == version:
            return state
        seq, digest = self._chain_tip(connection)
        # an in-memory database has a single connection: data_version cannot see other writers
        cacheable = not self._store.in_memory  # type: ignore[attr-defined]
        state = _WriterState(version if cacheable else None, seq, digest)
        self._state = state
        return state

    def _invalidate_state(self) -> None:
        """Forget the cached chain head (tests: simulate another writer's commit)."""
        with self._write_lock:
            self._state = None

    def _write_once_sqlite(self, batch: list[_Pending]) -> None:
        with self._raw_write() as (connection, state):
            built = _build_rows(batch, state.tip_seq, state.tip_hash, self._writer_key)
            connection.executemany(_INSERT_EVENT.format("?"), built.event_rows)
            if built.mac_rows:
                connection.executemany(_INSERT_MAC, built.mac_rows)
            if built.index_rows:
                connection.executemany(_INSERT_INDEX.format("?"), built.index_rows)
            if built.consent_rows:
                connection.executemany(_UPSERT_CONSENT, built.consent_rows)
            signed = self._sign_inline(connection, state, built)
            connection.execute("COMMIT")
            # committed: advance the cached head (our own commit leaves data_version unchanged)
            if signed is not None:
                self._frontier_cache, info = signed
                state.pending_base, state.pending = built.last_seq, []
                self._last_checkpoint_size = info.tree_size
                self._last_checkpoint_wall = time.time()
            elif (
                state.pending is not None
                and state.pending_base + len(state.pending) == state.tip_seq
            ):
                state.pending.extend(built.hashes)
            else:
                state.pending = None
            state.tip_seq, state.tip_hash = built.last_seq, built.last_hash
        for item, result in zip(batch, built.results, strict=True):
            item.result = result
        self._last_seq_hint = max(self._last_seq_hint, built.last_seq)

    # --- checkpoints ----------------------------------------------------------------------------

    def _latest_checkpoint_size(self) -> int:
        with self._connect() as connection:
            size = connection.execute(select(func.max(ledger_checkpoints.c.tree_size))).scalar()
        return int(size or 0)

    def _maybe_checkpoint(self) -> None:
        if self._signer is None or self._writer_key is None:
            return  # nothing can be signed (a missing writer key was logged when opening)
        head = self._tip_seq_hint()
        due = head - self._last_checkpoint_size >= self.checkpoint_every or (
            head > self._last_checkpoint_size
            and time.time() - self._last_checkpoint_wall >= self.checkpoint_interval_s
        )
        if due and self._checkpoint_lock.acquire(blocking=False):
            try:
                self.checkpoint()
            finally:
                self._checkpoint_lock.release()

    def _tip_seq_hint(self) -> int:
        """The newest seq this process has seen committed (no database round trip)."""
        return self._last_seq_hint

    _last_seq_hint = 0
    _subject_keys: Any = None  # the SubjectKeys shared by users of this object (subjects.py)
    _key_epoch_local = 0  # bumped when keys are destroyed through this object

    def checkpoint(self) -> SignedCheckpointInfo | None:
        """Integrate new events into the Merkle tree and sign a checkpoint over all of them.

        Returns the newest checkpoint (None for an empty, never-signed ledger). Before signing, the
        new events' chain is re-checked from the last signed event: the ledger never signs a
        broken chain.
        """
        if self._read_only:
            raise LedgerError(
                f"ledger {self._display_url} is open read-only: it signs no checkpoint"
            )
        if self._signer is None:
            raise LedgerError(
                f"cannot sign a checkpoint: no signing key at {self.key_path('signing-key')}"
            )
        if self._writer_key is None:
            raise LedgerError(
                f"cannot sign a checkpoint: no writer key at {self.key_path('writer-key')}, so "
                "whether this ledger's writer wrote the new events cannot be checked (restore the "
                "key file beside the ledger)"
            )
        for attempt in range(1, APPEND_ATTEMPTS + 1):
            try:
                return self._checkpoint_once()
            except (OperationalError, sqlite3.OperationalError) as exc:
                if not is_lock_contention(exc) or attempt == APPEND_ATTEMPTS:
                    raise LedgerError(
                        f"could not write a checkpoint: {getattr(exc, 'orig', exc)}"
                    ) from exc
                time.sleep(random.uniform(0.0, 0.05 * attempt))
            except (sqlite3.Error, SQLAlchemyError) as exc:
                # e.g. a Merkle node or checkpoint row that should not exist yet: rows were
                # inserted or deleted outside fedpact
                raise LedgerError(
                    f"could not write a checkpoint: {getattr(exc, 'orig', exc)}; the database "
                    "may have been altered outside fedpact: run `fedpact audit verify`"
                ) from exc
        return None  # pragma: no cover

    def _checkpoint_once(self) -> SignedCheckpointInfo | None:
        if self._is_sqlite:
            return self._checkpoint_once_sqlite()
        return self._checkpoint_once_generic()

    def _checkpoint_once_sqlite(self) -> SignedCheckpointInfo | None:
        """Integrate and sign on the raw writer: the frontier and new hashes come from memory
        when no other connection has committed since this process wrote them (then every new
        event is one this instance chained and tagged itself); otherwise the stored frontier is
        checked against the latest signed root, and the new events' chain, ids and writer tags
        are re-checked from the database, before anything is signed."""
        assert self._signer is not None
        sha256 = hashlib.sha256
        with self._raw_write() as (connection, state):
            latest = connection.execute(_LATEST_CHECKPOINT).fetchone()
            old_size = int(latest[0]) if latest is not None else 0
            tip_seq = state.tip_seq
            self._last_seq_hint = max(self._last_seq_hint, tip_seq)
            if tip_seq <= old_size:
                info = None if latest is None else SignedCheckpointInfo(int(latest[0]), *latest[1:])
                cached_frontier = None
            else:
                frontier = self._frontier_cache
                if frontier is None or frontier.size != old_size:
                    frontier = MerkleFrontier.at(old_size, self._node_source(connection))
                    self._check_frontier(connection, frontier, latest[3] if latest else None)
                pending = state.pending
                if not (
                    pending is not None
                    and state.pending_base == old_size
                    and len(pending) == tip_seq - old_size
                ):
                    pending = self._recheck_chain(connection, old_size, tip_seq)
                cached_frontier = MerkleFrontier(frontier.size, list(frontier.stack))
                nodes = cached_frontier.extend_level_by_level(
                    [sha256(b"\x00" + bytes.fromhex(h)).digest() for h in pending], collect=True
                )
                connection.executemany(
                    "INSERT INTO merkle_nodes (level, idx, hash) VALUES (?, ?, ?)", nodes
                )
                info = self._insert_checkpoint(connection, cached_frontier)
            connection.execute("COMMIT")
            if cached_frontier is not None:
                self._frontier_cache = cached_frontier
                state.pending_base, state.pending = tip_seq, []
        self._last_checkpoint_size = info.tree_size if info is not None else 0
        self._last_checkpoint_wall = time.time()
        return info

    def _check_frontier(
        self, connection: Connection | sqlite3.Connection, frontier: MerkleFrontier,
        note: Any,
    ) -> None:
        """Before building on the stored Merkle frontier, check it folds to the root of the
        latest signed checkpoint: a corrupted stored node must be named, not built on (the new
        checkpoint would sign a wrong root, and the untouched new events would get the blame)."""
        if not frontier.size:
            return
        try:
            signed = _open_with_any(note, self.trusted_keys()).root_hash
        except CheckpointError as exc:
            raise LedgerError(
                f"refusing to sign a checkpoint: the latest signed checkpoint (tree size "
                f"{frontier.size}) does not verify with this ledger's keys: {exc}"
            ) from None
        if frontier.root() == signed:
            return
        raise LedgerError(
            "refusing to sign a checkpoint: the stored Merkle tree does not match the signed "
            f"checkpoint at tree size {frontier.size}: "
            f"{_bad_frontier_node(self._store, connection, frontier)}; "
            "run `fedpact audit verify --indexes`"
        )

    def _sign_inline(
        self, connection: sqlite3.Connection, state: _WriterState, built: _Built
    ) -> tuple[MerkleFrontier, SignedCheckpointInfo] | None:
        """If this append makes a checkpoint due, and the cache holds every unsigned hash (no
        other connection has committed since our last checkpoint), integrate and sign it in the
        same transaction: one fsync for both. Otherwise leave it to `_maybe_checkpoint`."""
        frontier = self._frontier_cache
        pending = state.pending
        if (
            self._signer is None
            or self._writer_key is None
            or pending is None
            or frontier is None
            or frontier.size != state.pending_base
            or state.pending_base + len(pending) != state.tip_seq
            or built.last_seq - state.pending_base < self.checkpoint_every
        ):
            return None
        sha256 = hashlib.sha256
        extended = MerkleFrontier(frontier.size, list(frontier.stack))
        nodes = extended.extend_level_by_level(
            [sha256(b"\x00" + bytes.fromhex(h)).digest() for h in (*pending, *built.hashes)],
            collect=True,
        )
        connection.executemany("INSERT INTO merkle_nodes (level, idx, hash) VALUES (?, ?, ?)", nodes)
        return extended, self._insert_checkpoint(connection, extended)

    def _checkpoint_body(self, size: int, root: bytes) -> tuple[Checkpoint, str]:
        """The checkpoint to sign (its note states from which seq event ids are bound, so a third
        party holding only the public key checks them too) and its timestamp."""
        stamp = _utc_timestamp()
        extensions = (f"timestamp {stamp}", f"{IDS_EXTENSION} {self.ids_bound_from}")
        return Checkpoint(self.origin, size, root, extensions), stamp

    def _insert_checkpoint(
        self, connection: sqlite3.Connection, frontier: MerkleFrontier
    ) -> SignedCheckpointInfo:
        assert self._signer is not None
        checkpoint, stamp = self._checkpoint_body(frontier.size, frontier.root())
        note = self._signer.sign(checkpoint)
        info = SignedCheckpointInfo(frontier.size, checkpoint.root_hash.hex(), stamp, note)
        connection.execute(
            "INSERT INTO ledger_checkpoints (tree_size, root_hash, timestamp, key_name, note) "
            "VALUES (?, ?, ?, ?, ?)",
            (frontier.size, info.root_hash, stamp, self._signer.name, note),
        )
        return info

    def _recheck_rows(self, rows: Iterable[Sequence[Any]], after: int, start_hash: str,
                      upto: int) -> list[str]:
        """Hashes of the rows (`_RECHECK_COLUMNS`) of events after..upto, re-checked: links and
        hashes (never sign a broken chain), bound ids and writer tags (never sign an event that
        was renamed or that this ledger's writer key did not write)."""
        writer = self._writer_key
        assert writer is not None
        ids_from = self.ids_bound_from
        hashes: list[str] = []
        untagged: list[int] = []
        last_seq, last_hash = after, start_hash
        for row in rows:
            problem = _chain_problem(row[:8], last_seq, last_hash)
            if problem is not None:
                raise LedgerError(f"refusing to sign a checkpoint over a broken chain: {problem}")
            seq, timestamp, digest, event_id, mac = row[0], row[1], row[7], row[8], row[9]
            if seq >= ids_from and event_id != event_id_for(timestamp, digest):
                raise LedgerError(
                    f"refusing to sign a checkpoint: event {seq}: its event_id {event_id!r} is "
                    "not the id its record gives: event ids were renamed or swapped"
                )
            if seq >= writer.from_seq and (mac is None or bytes(mac) != writer.mac(digest)):
                untagged.append(seq)
            last_seq, last_hash = seq, digest
            hashes.append(digest)
        if last_seq != upto:
            raise LedgerError(
                f"refusing to sign a checkpoint over a broken chain: event {last_seq + 1} is missing"
            )
        if untagged:
            raise LedgerError(
                f"refusing to sign a checkpoint: {describe(untagged, len(untagged))}; run "
                "`fedpact audit verify`"
            )
        return hashes

    def _recheck_chain(self, connection: sqlite3.Connection, after: int, upto: int) -> list[str]:
        """Hashes of events after..upto, re-checked (see `_recheck_rows`)."""
        last_hash = GENESIS_HASH
        if after:
            row = connection.execute(
                "SELECT hash FROM ledger_events WHERE seq = ?", (after,)
            ).fetchone()
            last_hash = row[0] if row is not None else GENESIS_HASH
        cursor = connection.execute(_RECHECK_SQL.format(lo="?", hi="?"), (after, upto))
        return self._recheck_rows(cursor, after, last_hash, upto)

    def _checkpoint_once_generic(self) -> SignedCheckpointInfo | None:
        assert self._signer is not None
        with self._connect(write=True) as connection:
            latest = connection.execute(
                select(ledger_checkpoints).order_by(ledger_checkpoints.c.tree_size.desc()).limit(1)
            ).first()
            old_size = int(latest.tree_size) if latest is not None else 0
            tip_seq, _ = self._chain_tip(connection)
            self._last_seq_hint = max(self._last_seq_hint, tip_seq)
            if tip_seq <= old_size:
                self._last_checkpoint_size = old_size
                self._last_checkpoint_wall = time.time()
                return None if latest is None else _checkpoint_info(latest)
            new_nodes: list[tuple[int, int, bytes]] = []
            frontier = MerkleFrontier.at(
                old_size,
                self._node_source(connection),
                on_node=lambda level, index, digest: new_nodes.append((level, index, digest)),
            )
            self._check_frontier(connection, frontier, latest.note if latest else None)
            start_hash = GENESIS_HASH
            if old_size:
                start_hash = connection.execute(
                    select(ledger_events.c.hash).where(ledger_events.c.seq == old_size)
                ).scalar_one()
            rows = connection.exec_driver_sql(
                self._store.paramstyle_named(_RECHECK_SQL.format(lo=":lo", hi=":hi")),
                {"lo": old_size, "hi": tip_seq},
            ).all()
            for digest in self._recheck_rows(rows, old_size, start_hash, tip_seq):
                frontier.append(leaf_hash(bytes.fromhex(digest)))
            self._store.bulk_insert(connection, "merkle_nodes", ("level", "idx", "hash"), new_nodes)
            checkpoint, stamp = self._checkpoint_body(tip_seq, frontier.root())
            note = self._signer.sign(checkpoint)
            row = {
                "tree_size": tip_seq,
                "root_hash": checkpoint.root_hash.hex(),
                "timestamp": stamp,
                "key_name": self._signer.name,
                "note": note,
            }
            connection.execute(ledger_checkpoints.insert().values(**row))
        self._last_checkpoint_size = tip_seq
        self._last_checkpoint_wall = time.time()
        return SignedCheckpointInfo(tip_seq, checkpoint.root_hash.hex(), stamp, note)

    def checkpoints(self) -> list[SignedCheckpointInfo]:
        """Every signed checkpoint, oldest first."""
        with self._connect() as connection:
            rows = connection.execute(
                select(ledger_checkpoints).order_by(ledger_checkpoints.c.tree_size)
            ).all()
        return [_checkpoint_info(row) for row in rows]

    def latest_checkpoint(self) -> SignedCheckpointInfo | None:
        with self._connect() as connection:
            row = connection.execute(
                select(ledger_checkpoints).order_by(ledger_checkpoints.c.tree_size.desc()).limit(1)
            ).first()
        return None if row is None else _checkpoint_info(row)

    def _node_source(self, connection: Connection | sqlite3.Connection):
        return node_source(self._store, connection)

    # --- proofs ---------------------------------------------------------------------------------

    def prove(self, event: str | int, *, tree_size: int | None = None) -> dict[str, Any]:
        """An inclusion proof bundle: the event, its audit path and the signed checkpoint it is in.

        `event` is an event_id or a seq. If the event is newer than the last checkpoint and this
        ledger holds the signing key (and is not read-only), a checkpoint is signed first.
        `verifier.verify_inclusion_bundle` checks the bundle with only the public key.
        """
        for attempt in (1, 2):
            # one read transaction: the event, the checkpoint and the audit path from one snapshot
            with self._connect() as connection:
                column = (
                    ledger_events.c.seq if isinstance(event, int) else ledger_events.c.event_id
                )
                row = connection.execute(select(ledger_events).where(column == event)).first()
                if row is None:
                    raise LedgerError(f"no ledger event {event!r}")
                found = _row_to_event(row)
                self._check_event_id(found)
                if tree_size is None:
                    query = (
                        select(ledger_checkpoints)
                        .order_by(ledger_checkpoints.c.tree_size.desc())
                        .limit(1)
                    )
                else:
                    query = select(ledger_checkpoints).where(
                        ledger_checkpoints.c.tree_size == tree_size
                    )
                checkpoint_row = connection.execute(query).first()
                chosen = None if checkpoint_row is None else _checkpoint_info(checkpoint_row)
                if tree_size is not None:
                    if chosen is None:
                        raise LedgerError(f"no signed checkpoint at tree size {tree_size}")
                    if chosen.tree_size < found.seq:
                        raise LedgerError(
                            f"event {found.seq} is not in the checkpoint of tree size {tree_size}"
                        )
                if chosen is not None and chosen.tree_size >= found.seq:
                    try:
                        path = inclusion_proof(
                            found.seq - 1, chosen.tree_size, self._node_source(connection)
                        )
                    except ProofError as exc:
                        raise LedgerError(f"cannot prove event {found.seq}: {exc}") from None
                    break
            if attempt == 1 and self._signer is not None and not self._read_only:
                self.checkpoint()  # the event is newer than the last checkpoint: sign one
                continue
            raise LedgerError(
                f"event {found.seq} is not yet covered by a signed checkpoint "
                f"(latest covers {chosen.tree_size if chosen else 0} events): sign one with "
                "`fedpact audit checkpoint` first"
            )
        record = dict(found.__dict__)  # a private copy: no need for asdict's deep copy
        return {
            "format": PROOF_FORMAT,
            "event": record,
            "leaf_index": found.seq - 1,
            "tree_size": chosen.tree_size,
            "inclusion_proof": [base64.b64encode(h).decode() for h in path],
            "checkpoint": chosen.note,
        }

    def prove_consistency(self, old_size: int, new_size: int | None = None) -> dict[str, Any]:
        """A bundle proving the checkpoint at `old_size` is a prefix of the one at `new_size`."""
        with self._connect() as connection:
            rows = {
                int(r.tree_size): _checkpoint_info(r)
                for r in connection.execute(
                    select(ledger_checkpoints).where(
                        ledger_checkpoints.c.tree_size.in_(
                            [old_size] + ([new_size] if new_size is not None else [])
                        )
                    )
                )
            }
            if new_size is None:
                latest = connection.execute(
                    select(ledger_checkpoints)
                    .order_by(ledger_checkpoints.c.tree_size.desc())
                    .limit(1)
                ).first()
                if latest is None:
                    raise LedgerError("the ledger has no signed checkpoint yet")
                rows[int(latest.tree_size)] = _checkpoint_info(latest)
                new_size = int(latest.tree_size)
            for size in (old_size, new_size):
                if size not in rows:
                    raise LedgerError(f"no signed checkpoint at tree size {size}")
            try:
                path = consistency_proof(old_size, new_size, self._node_source(connection))
            except ProofError as exc:
                raise LedgerError(f"cannot prove consistency: {exc}") from None
        return {
            "format": CONSISTENCY_FORMAT,
            "old_checkpoint": rows[old_size].note,
            "new_checkpoint": rows[new_size].note,
            "consistency_proof": [base64.b64encode(h).decode() for h in path],
        }

    # --- reading --------------------------------------------------------------------------------

    def event(self, ref: str | int) -> LedgerEvent:
        """The event with this event_id (hex string) or seq (int); LedgerError if there is none."""
        column = ledger_events.c.seq if isinstance(ref, int) else ledger_events.c.event_id
        with self._connect() as connection:
            row = connection.execute(select(ledger_events).where(column == ref)).first()
        if row is None:
            raise LedgerError(f"no ledger event {ref!r}")
        found = _row_to_event(row)
        self._check_event_id(found)
        return found

    def events(
        self,
        *,
        job_id: str | None = None,
        event_type: EventType | str | None = None,
        since_seq: int | None = None,
        limit: int | None = None,
    ) -> list[LedgerEvent]:
        """Return events in seq order, optionally only one job's, one type's, or those after `since_seq`."""
        query: Select[Any] = select(ledger_events).order_by(ledger_events.c.seq)
        if job_id is not None:
            query = query.where(ledger_events.c.job_id == job_id)
        if event_type is not None:
            query = query.where(ledger_events.c.event_type == EventType.parse(event_type).value)
        if since_seq is not None:
            query = query.where(ledger_events.c.seq > since_seq)
        if limit is not None:
            if limit < 0:
                raise LedgerError(f"limit must be >= 0, got {limit}")
            query = query.limit(limit)
        with self._connect() as connection:
            return [_row_to_event(row) for row in connection.execute(query)]

    def select_events(self, query: Select[Any]) -> list[LedgerEvent]:
        """Run a SELECT over `ledger_events` (built by `query.py`) and return its events."""
        with self._connect() as connection:
            return [_row_to_event(row) for row in connection.execute(query)]

    def count(self, job_id: str | None = None) -> int:
        """Return how many events the ledger holds, or how many belong to `job_id`."""
        query = select(func.count()).select_from(ledger_events)
        if job_id is not None:
            query = query.where(ledger_events.c.job_id == job_id)
        with self._connect() as connection:
            return int(connection.execute(query).scalar_one())

    def head(self) -> LedgerEvent | None:
        """Return the newest event, or None if the ledger is empty."""
        query = select(ledger_events).order_by(ledger_events.c.seq.desc()).limit(1)
        with self._connect() as connection:
            row = connection.execute(query).first()
        return None if row is None else _row_to_event(row)

    # --- verification ---------------------------------------------------------------------------

    def verify(
        self, public_keys: Sequence[VerifierKey] | None = None, *, kept_note: str | None = None
    ) -> ChainVerification:
        """Re-check the chain, the Merkle tree and every signed checkpoint from one snapshot.

        Detects altered, removed, inserted or reordered events (the chain), a truncated tail or a
        rewritten history (the Merkle root no longer matches a signed checkpoint), forged or
        replaced checkpoint signatures, renamed or swapped event ids, events the writer key did
        not tag (with the writer key beside the ledger), values stored with the wrong type, and a
        stored Merkle frontier that does not match the latest signed root.

        `public_keys` defaults to `trusted_keys()` (the `.pub` file, this instance's signing
        key), else to the recorded key that signed `kept_note`; never to keys the database
        alone records. Pass keys obtained independently for a check that does not trust this
        machine. Without any key, a ledger holding signed checkpoints does not verify.
        """
        keys = self._verification_keys(public_keys, kept_note)
        with self._connect() as connection:
            checkpoints = connection.execute(
                select(ledger_checkpoints.c.tree_size, ledger_checkpoints.c.note).order_by(
                    ledger_checkpoints.c.tree_size
                )
            ).all()
            if checkpoints and not keys:
                return self._no_key_verdict(len(checkpoints))
            return verify_log(
                self._store,
                connection,
                [(int(size), note) for size, note in checkpoints],
                keys,
                origin=self.origin,
                writer=self._writer_key,
                ids_from=self._ids_from,
            )

    def verify_against_checkpoint(
        self,
        kept_note: str,
        public_keys: Sequence[VerifierKey] | None = None,
        *,
        verdict: ChainVerification | None = None,
    ) -> ChainVerification:
        """`verify()`, then check the log against a signed checkpoint a third party kept earlier.

        A log truncated together with its checkpoint rows, or rewritten and re-signed, passes
        `verify()` (nothing left in it contradicts itself); the kept note catches it: same log
        and key, the log holds at least the kept tree size, and a consistency proof from the
        kept size to the newest signed one (or, without one, the recomputed root) matches.
        `verdict`: the result of a `verify()` already run with the same keys.
        """
        keys = self._verification_keys(public_keys, kept_note)
        if verdict is None:
            verdict = self.verify(keys, kept_note=kept_note)
        if not verdict.ok:
            return verdict
        if not keys:
            return ChainVerification(
                False, verdict.events_checked, None,
                "the kept checkpoint does not verify with any key: pass the ledger's verifier "
                "key obtained independently (--public-key FILE)", verdict.head_hash,
                verdict.checkpoints_checked, verdict.signed_tree_size,
            )
        with self._connect() as connection:
            return check_kept_checkpoint(
                self._store, connection, kept_note, keys, verdict, origin=self.origin
            )

    def proven_consent_events(
        self, subjects: Collection[str] | None = None, *, plain: bool = True
    ) -> list[tuple[Any, ...]]:
        """(seq, event type, payload) of every consent event (of `subjects`, if given), in seq
        order, read only from a log verified in the same snapshot: links and hashes, bound ids,
        every event's writer tag (with the writer key), and the signed checkpoints (with this
        ledger's public key; without one, at least that no event a checkpoint covers is gone).
        What consent enforcement decides from, instead of the derived `consent_state` table,
        which anyone with write access could edit. Raises LedgerError naming the first event
        that fails.

        Incremental: the first call verifies the whole log and remembers what it proved (see
        `_ConsentProof`); a later call on this `Ledger` verifies only the events appended since
        (fully, as above, their checkpoints' roots included) and re-checks the rest: every
        checkpoint signature, the stored Merkle frontier, every proven event's seq and stored
        hash (a deletion — even of the newest unsigned events —, insertion, reordering or
        re-hashed rewrite), and the stored record of every consent event it returns. Any
        doubt runs the full verification, which names the event. What a later call does not
        re-hash is the record of a proven event it does not return (e.g. another subject's, or a
        data.accessed event, altered in place with its stored hash left as it was): the
        decision is made from the proven payloads, never from such a row, and `verify` names
        it; a full verification also runs when the proof is older than
        `CONSENT_FULL_RECHECK_S`. The proof is shared by this process's `Ledger`s on the same
        database and keys. With `plain=False` each event also carries its hash and its
        `consent_state` row (or why it gives none), derived once per proof."""
        keys = self.trusted_keys()
        key_texts = tuple(k.encode() for k in keys)
        identity = self._proof_identity(key_texts)
        with _proof_lock(identity), self._connect(snapshot=True) as connection:
            checkpoints = [(int(size), note) for size, note in connection.execute(
                select(ledger_checkpoints.c.tree_size, ledger_checkpoints.c.note)
                .order_by(ledger_checkpoints.c.tree_size))]
            used = checkpoints if keys else []
            proof = _CONSENT_PROOFS.get(identity)
            if proof is not None and time.monotonic() - proof.made_at > CONSENT_FULL_RECHECK_S:
                proof = None
            _CONSENT_PROOFS.pop(identity, None)  # put back only once this call succeeds
            if proof is not None:
                found = self._extend_consent_proof(connection, proof, used, keys, checkpoints,
                                                   subjects)
                if found is not None:
                    _keep_proof(identity, proof)
                    return [event[:3] for event in found] if plain else found
            # the full verification: the first time, and on any doubt (it names the event)
            collected: dict[str, Any] = {}
            verdict = verify_log(self._store, connection, used, keys,
                                 origin=self.origin, writer=self._writer_key,
                                 ids_from=self._ids_from, parallel=False, collect=collected)
            verdict = _no_key_truncation(verdict, checkpoints, keys)
            if not verdict.ok:
                raise _refuse_consent(verdict)
            if proof is not None:
                problem = proof.prefix_problem(self._store, connection)
                if problem is None and verdict.events_checked < proof.size:
                    problem = (f"the log holds {verdict.events_checked} events but this ledger "
                               f"verified {proof.size} earlier: events were removed")
                if problem is not None:
                    _keep_proof(identity, proof)  # it stays: every later call refuses too
                    raise LedgerError(f"consent cannot be decided: {problem}; run `fedpact "
                                      "audit verify`")
            proof = self._new_consent_proof(connection, used, keys, key_texts, verdict,
                                            collected)
            _keep_proof(identity, proof)
            found = proof.events(subjects)
            return [event[:3] for event in found] if plain else found

    def _extend_consent_proof(
        self,
        connection: Connection,
        proof: _ConsentProof,
        used: Sequence[tuple[int, Any]],
        keys: Sequence[VerifierKey],
        checkpoints: Sequence[tuple[int, Any]],
        subjects: Collection[str] | None,
    ) -> list[tuple[int, str, dict[str, Any]]] | None:
        """The consent events for `subjects` from `proof` extended by the events appended since,
        or None at the first doubt (the caller runs the full verification)."""
        store = self._store
        failures, signed, boundary, boundary_problem = _open_checkpoints(
            used, keys, origin=self.origin,
            writer=self._writer_key, ids_from=self._ids_from)
        if failures or boundary_problem is not None or boundary != proof.boundary:
            return None
        if not proof.advance_signed(signed):
            return None  # a checkpoint over proven events replaced, removed, or wrong
        if proof.prefix_problem(store, connection) is not None:
            return None
        extended = _verify_suffix(store, connection, proof, signed, _SoftChecks(boundary,
                                                                                self._writer_key))
        if extended is None:
            return None
        frontier, hashes = extended
        size = proof.size + len(hashes)
        if checkpoints and not used and checkpoints[-1][0] > size:
            return None
        if _frontier_problem(store, connection, signed) is not None:
            return None
        wanted = proof.events(subjects)
        if proof.content_problem(store, connection, wanted) is not None:
            return None
        consent = []
        if hashes:
            consent = self._consent_rows(connection, proof.size)
        proof.add(hashes, consent)
        proof.frontier = frontier
        proof.settle(signed)
        new = [event for event in proof.events(subjects) if event[0] > size - len(hashes)]
        return wanted + new

    def _proof_identity(self, key_texts: tuple[str, ...]) -> tuple[Any, ...]:
        """Which remembered proof (`_CONSENT_PROOFS`) a consent check of this ledger may use:
        the same database (for a file, the same file: a replaced one is proven afresh), log,
        verifier keys, writer key and id boundary."""
        url = self._url
        where: Any = url.render_as_string(hide_password=True)
        database = url.database if url.get_backend_name() == "sqlite" else None
        if database and database != ":memory:" and not database.startswith("file:"):
            path = Path(database).expanduser().absolute()
            try:
                info = path.stat()
                where = (str(path.resolve()), info.st_dev, info.st_ino)
            except OSError:
                where = str(path)
        elif database in (None, "", ":memory:") and url.get_backend_name() == "sqlite":
            where = ("memory", id(self))  # an in-memory ledger is its own database
        writer = self._writer_key
        wid = None if writer is None else (writer.from_seq,
                                           hashlib.sha256(writer.secret).hexdigest())
        return (where, self.origin, key_texts, wid, self._ids_from)

    def _consent_rows(self, connection: Connection, after: int) -> list[tuple[int, str, str, str]]:
        """(seq, type, payload text, hash) of the consent events after seq `after`."""
        return [(int(seq), str(kind), text, digest) for seq, kind, text, digest in connection.execute(
            select(ledger_events.c.seq, ledger_events.c.event_type, ledger_events.c.payload,
                   ledger_events.c.hash)
            .where(ledger_events.c.seq > after,
                   ledger_events.c.event_type.in_(sorted(CONSENT_STATUS)))
            .order_by(ledger_events.c.seq))]

    def _new_consent_proof(self, connection: Connection, used: Sequence[tuple[int, Any]],
                           keys: Sequence[VerifierKey], key_texts: tuple[str, ...],
                           verdict: ChainVerification, collected: dict[str, Any]) -> _ConsentProof:
        """Remember what a full verification (`verdict`, in this snapshot; `collected` by it:
        the hashes and frontiers it computed) proved."""
        _, signed, boundary, _ = _open_checkpoints(
            used, keys, origin=self.origin, writer=self._writer_key, ids_from=self._ids_from)
        hashes = collected.get("hashes", [])
        newest = signed[-1][0] if signed else 0
        frontier = collected.get("frontier") or MerkleFrontier()
        signed_frontier = collected.get("signed_frontier") or MerkleFrontier()
        if (len(hashes) != verdict.events_checked or frontier.size != len(hashes)
                or signed_frontier.size != newest):
            raise LedgerError("consent cannot be decided: the verification did not cover the "
                              "whole log; run `fedpact audit verify`")
        proof = _ConsentProof(0, GENESIS_HASH, [], [], frontier, list(signed), boundary,
                              key_texts, {}, time.monotonic(), signed_frontier, [])
        proof.add(hashes, self._consent_rows(connection, 0))
        del proof.unsigned[:newest]
        return proof

    def check_indexes(self) -> IndexCheck:
        """Compare the derived tables with a recomputation from the chain (read-only).

        `event_index` and `consent_state` are recomputed from the events; `job_subjects` (not in
        the chain: only each `data.subjects_used` event's manifest hash is) is checked against
        those manifest hashes, and cannot be rebuilt.
        """
        with self._connect() as connection:
            return _check_indexes(self._store, connection)

    def rebuild_indexes(self, *, actor: str | None = None) -> IndexCheck:
        """Recompute `event_index` and `consent_state` from the chain, in one write transaction.

        The chain is re-checked link by link while it is read: indexes are never derived from a
        broken chain (LedgerError naming the first bad event). Returns what differed before.
        `job_subjects` cannot be rebuilt (only its manifest hashes are in the chain); its
        differences are reported, not repaired. With `actor`, the rebuild is recorded as an
        `admin.indexes_rebuilt` event (counts only) once it is committed.
        """
        report = self._rebuild_indexes()
        if actor is not None:
            left = sum(1 for p in report.problems if p.startswith(UNREPAIRABLE))
            self.append(EventType.INDEXES_REBUILT, {
                "events": report.events, "index_rows": report.index_rows,
                "consent_rows": report.consent_rows,
                "differences_repaired": len(report.problems) - left, "differences_left": left,
            }, actor=actor)
        return report

    def _rebuild_indexes(self) -> IndexCheck:
        with self._connect(write=True) as connection:
            expected_index, expected_consent = _recompute_indexes(self._store, connection)
            report = _compare_indexes(self._store, connection, expected_index, expected_consent)
            connection.execute(event_index.delete())
            connection.execute(consent_state.delete())
            self._store.bulk_insert(
                connection, "event_index", ("kind", "value", "seq"), sorted(expected_index)
            )
            if expected_consent:
                connection.execute(consent_state.insert(), list(expected_consent.values()))
        return dataclasses.replace(report, rebuilt=True)


UNREPAIRABLE = ("job_subjects", "merkle_nodes")
"""Derived tables `rebuild_indexes` checks but cannot rebuild (reported, never repaired)."""


@dataclass(frozen=True)
class IndexCheck:
    """Differences between the derived tables and what the chain says they should hold."""

    events: int
    index_rows: int
    consent_rows: int
    problems: tuple[str, ...]
    rebuilt: bool = False

    @property
    def ok(self) -> bool:
        return not self.problems

    def summary(self, limit: int = 20) -> str:
        head = (
            f"{self.events} events: {self.index_rows} event_index rows, "
            f"{self.consent_rows} consent_state rows expected"
        )
        if self.ok:
            return f"{head}; derived tables match the chain"
        lines = [f"{head}; {len(self.problems)} differences:"]
        lines += [f"  - {p}" for p in self.problems[:limit]]
        if len(self.problems) > limit:
            lines.append(f"  … and {len(self.problems) - limit} more")
        return "\n".join(lines)

    def report(self, limit: int = 100) -> dict[str, Any]:
        """The check as JSON data (the API's and the console's verify): at most `limit`
        problems listed, `problem_count` says how many there are."""
        return {"ok": self.ok, "events": self.events, "problem_count": len(self.problems),
                "problems": list(self.problems[:limit]), "summary": self.summary(),
                "repair": None if self.ok else INDEX_REPAIR}


INDEX_REPAIR = ("repair event_index and consent_state with `fedpact audit reindex`; job_subjects "
                "and merkle_nodes cannot be rebuilt from the chain: restore them from a backup")


@dataclass(frozen=True)
class SignedCheckpointInfo:
    """A stored checkpoint: tree size, root (hex), when it was signed and the signed note."""

    tree_size: int
    root_hash: str
    timestamp: str
    note: str


def _checkpoint_info(row: Any) -> SignedCheckpointInfo:
    return SignedCheckpointInfo(int(row.tree_size), row.root_hash, row.timestamp, row.note)


def _consent_row(status: str, payload: Mapping[str, Any], seq: int) -> dict[str, Any]:
    """The `consent_state` row an event gives; its purpose is the purpose's key
    (`normalise.purpose_key`), so spellings of one purpose share one row."""
    expires = payload.get("expires_at") if status == "granted" else None
    return {
        "subject": payload["subject"],
        "purpose": purpose_key(payload["purpose"]),
        "status": status,
        "channel": payload.get("channel"),
        "legal_basis": payload.get("legal_basis"),
        "notice_version": payload.get("notice_version"),
        "source": payload.get("source"),
        "effective_at": utc_iso(payload["timestamp"]),
        "expires_at": utc_iso(expires) if expires else None,
        "seq": seq,
    }


def _create_file_once(path: Path, content: bytes) -> None:
    """Write `content` to `path` atomically if it does not exist yet (mode 0600; first writer wins)."""
    temporary = path.with_name(f".{path.name}.{uuid.uuid4().hex}")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(content)
            handle.flush()
            os.fsync(handle.fileno())
        with contextlib.suppress(FileExistsError):
            os.link(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


class _Broken(Exception):
    def __init__(self, seq: int, reason: str) -> None:
        self.seq, self.reason = seq, reason


class _Stop(Exception):
    """Verification stops: a signed root did not match (the failure is already recorded)."""


class _SoftChecks:
    """Event ids bound to their records and writer tags, checked on chain-verified rows.

    Their failures are reported only when the chain, the Merkle roots and the signatures hold
    (a broken chain is the more basic diagnosis), each naming the first event concerned."""

    def __init__(self, ids_from: int, writer: WriterKey | None) -> None:
        self.ids_from = ids_from
        self.writer = writer
        self.mac_from = writer.from_seq if writer is not None else None
        self.id_problem: tuple[int, str, str] | None = None  # seq, reason, hash before it
        self.untagged: list[int] = []
        self.untagged_count = 0
        self.untagged_head = GENESIS_HASH

    def check(self, seqs: Sequence[int], prevs: Sequence[str], digests: Sequence[str],
              eids: Sequence[Any], stamps: Sequence[Any], macs: Sequence[Any]) -> None:
        if not seqs:
            return
        last = seqs[-1]
        if self.id_problem is None and last >= self.ids_from:
            lo = max(0, self.ids_from - seqs[0])
            try:  # the hash part of each id, then its clock part once per distinct timestamp
                good = [e[12:] for e in eids[lo:]] == [d[:20] for d in digests[lo:]] and all(
                    prefix == id_prefix(stamp) and len(prefix) == 12
                    for prefix, stamp in {(e[:12], t) for e, t in zip(eids[lo:], stamps[lo:],
                                                                       strict=True)})
            except TypeError:  # a value of the wrong type: named below
                good = False
            if not good:
                expected = [event_id_for(t, d) for t, d in zip(stamps[lo:], digests[lo:],
                                                                strict=True)]
                for i in range(lo, len(seqs)):
                    if eids[i] != expected[i - lo]:
                        self.id_problem = (
                            seqs[i],
                            f"event {seqs[i]}: its event_id {eids[i]!r} is not the id its record "
                            f"gives ({expected[i - lo]}): event ids were renamed or swapped "
                            "(a proof or reference by id would name another event)",
                            prevs[i],
                        )
                        break
        writer = self.writer
        if writer is not None and last >= writer.from_seq:
            lo = max(0, writer.from_seq - seqs[0])
            expected = writer.macs(digests[lo:])
            got = list(macs[lo:])
            if got != expected:
                got = [None if m is None else bytes(m) for m in got]
            if got != expected:
                for i in range(lo, len(seqs)):
                    if got[i - lo] != expected[i - lo]:
                        if not self.untagged:
                            self.untagged_head = prevs[i]
                        self.untagged_count += 1
                        if len(self.untagged) < 6:
                            self.untagged.append(seqs[i])

    def verdict(self, checked: int, checkpoints_ok: int, signed_size: int) -> ChainVerification | None:
        if self.id_problem is not None:
            seq, reason, head = self.id_problem
            return ChainVerification(False, checked, seq, reason, head, checkpoints_ok, signed_size)
        if self.untagged:
            reason = (f"{describe(self.untagged, self.untagged_count)}: it carries no valid writer "
                      "tag (appended or altered by someone without the writer key)")
            return ChainVerification(False, checked, self.untagged[0], reason, self.untagged_head,
                                     checkpoints_ok, signed_size)
        return None


def _open_checkpoints(
    checkpoints: Sequence[tuple[int, Any]],
    keys: Sequence[VerifierKey],
    *,
    origin: str | None,
    writer: WriterKey | None,
    ids_from: int | None,
) -> tuple[list[tuple[int, str]], list[tuple[int, bytes]], int, str | None]:
    """Open every stored checkpoint with `keys`: (failures, [(tree size, signed root)] of those
    that verify, up to the first that does not; the seq from which event ids are bound; what is
    wrong with that boundary, or None)."""
    failures: list[tuple[int, str]] = []
    signed: list[tuple[int, bytes]] = []
    stated: set[int] = set()
    previous = 0
    for size, note in checkpoints:
        problem = None
        if not isinstance(note, str):
            kind = _STORED_KIND.get(type(note), "a non-text value")
            problem = f"checkpoint at tree size {size} is stored as {kind}, not text (altered outside fedpact)"
        else:
            try:
                opened = _open_with_any(note, keys)
                if opened.tree_size != size:
                    problem = (
                        f"checkpoint stored at tree size {size} signs tree size {opened.tree_size}"
                    )
                elif origin is not None and opened.origin != origin:
                    problem = f"checkpoint at tree size {size} is for another log ({opened.origin})"
            except CheckpointError as exc:
                problem = str(exc)
        if problem is not None:
            failures.append((previous + 1, problem))
            break
        signed.append((size, opened.root_hash))
        bound = opened.ids_bound_from
        if bound is not None:
            stated.add(bound)
        previous = size

    # from which seq event ids are bound: signed notes, else the writer key, else ledger_meta
    boundary_problem = None
    if stated:
        boundary, source = min(stated), "the signed checkpoints state"
        if len(stated) > 1:
            boundary_problem = ("the signed checkpoints disagree on the seq from which event ids "
                                f"are bound ({', '.join(map(str, sorted(stated)))})")
    elif writer is not None:
        boundary, source = writer.from_seq, "the writer key says"
    else:
        boundary, source = (ids_from if ids_from is not None else 1), ""
    if boundary_problem is None:
        if ids_from is None:
            boundary_problem = (f"ledger_meta lacks {IDS_BOUND_FROM} (removed outside fedpact): "
                                f"event ids are checked from seq {boundary}")
        elif ids_from != boundary:
            boundary_problem = (f"ledger_meta {IDS_BOUND_FROM} says {ids_from}, but {source} "
                                f"{boundary}: ledger_meta was altered (it would exempt events "
                                "from the id check)")
        elif writer is not None and stated and writer.from_seq != boundary:
            boundary_problem = (f"the writer key tags events from seq {writer.from_seq}, but the "
                                f"signed checkpoints bind ids from seq {boundary}: a replaced "
                                "writer key?")
    return failures, signed, boundary, boundary_problem


def verify_log(
    store: LedgerStore,
    connection: Connection,
    checkpoints: Sequence[tuple[int, Any]],
    keys: Sequence[VerifierKey],
    *,
    origin: str | None = None,
    writer: WriterKey | None = None,
    ids_from: int | None = None,
    parallel: bool = True,
    collect: dict[str, Any] | None = None,
) -> ChainVerification:
    """Verify the chain, the Merkle roots of every checkpoint and their signatures, then event ids
    (from the seq signed checkpoints state, else the writer key's, else `ids_from` read from
    ledger_meta), writer tags (with `writer`) and the stored Merkle frontier (see Ledger.verify)."""
    failures, signed, boundary, boundary_problem = _open_checkpoints(
        checkpoints, keys, origin=origin, writer=writer, ids_from=ids_from)
    soft = _SoftChecks(boundary, writer)

    verdict = None
    workers = None
    notes: list[str] = []
    if parallel and not failures:
        try:
            workers = _start_parallel_check(store, connection, [size for size, _ in signed], soft)
        except Exception as exc:  # noqa: BLE001 - no workers: the sequential check decides
            notes.append(f"the parallel verification could not start ({type(exc).__name__}: "
                         f"{exc}); verified sequentially")
    try:
        if workers is not None:
            verdict = workers.finish(signed)
            if workers.failure is not None:
                notes.append(f"{workers.failure}; verified sequentially")
    finally:
        if workers is not None:
            workers.close()
    for note in notes:
        log.warning("ledger verification: %s", note)
    if verdict is None:  # the sequential check: also the exact diagnosis of any anomaly
        verdict = _verify_sequential(store, connection, signed, failures, soft, collect)
    verdict = _verify_tail(store, connection, signed, verdict, boundary, boundary_problem, writer)
    return dataclasses.replace(verdict, notes=tuple(notes)) if notes else verdict


def _verify_tail(
    store: LedgerStore,
    connection: Connection,
    signed: Sequence[tuple[int, bytes]],
    verdict: ChainVerification,
    boundary: int,
    boundary_problem: str | None,
    writer: WriterKey | None,
) -> ChainVerification:
    """After the chain check: the id boundary, the stored frontier, the summary's writer note."""
    if not verdict.ok:
        return verdict
    problem = boundary_problem or _frontier_problem(store, connection, signed)
    if problem is not None:
        return ChainVerification(False, verdict.events_checked, None, problem, verdict.head_hash,
                                 verdict.checkpoints_checked, verdict.signed_tree_size)
    if verdict.events_checked:
        reason = verdict.reason
        if writer is not None and verdict.events_checked >= writer.from_seq:
            reason += f"; every event from seq {writer.from_seq} on carries this ledger's writer tag"
        elif writer is None and verdict.events_checked >= boundary:
            reason += "; writer tags not checked (no writer key here: only its holder can)"
        verdict = dataclasses.replace(verdict, reason=reason)
    return verdict


_STORED_KIND = {bytes: "a BLOB", memoryview: "a BLOB", int: "an INTEGER", float: "a REAL",
                type(None): "NULL"}


def _verify_sequential(
    store: LedgerStore,
    connection: Connection,
    signed: Sequence[tuple[int, bytes]],
    failures: list[tuple[int, str]],
    soft: _SoftChecks,
    collect: dict[str, Any] | None = None,
) -> ChainVerification:
    """With `collect` (a dict), also leave there what a consent proof remembers: "hashes" (of
    every event accepted), "frontier" (at the end) and "signed_frontier" (at the newest signed
    size reached)."""
    sha256 = hashlib.sha256
    collected: list[str] | None = None if collect is None else collect.setdefault("hashes", [])
    state = {"seq": 0, "hash": GENESIS_HASH, "checked": 0}
    boundary_hashes: dict[int, str] = {0: GENESIS_HASH}
    frontier = MerkleFrontier()
    next_index = 0
    checkpoints_ok = 0
    fast_sql = store.verify_rows_sql()
    slow_sql = store.paramstyle_named(
        "SELECT e.seq, e.event_id, e.timestamp, e.event_type, e.actor, e.job_id, e.payload, "
        "e.prev_hash, e.hash, m.mac FROM ledger_events e LEFT JOIN writer_macs m "
        "ON m.seq = e.seq WHERE e.seq > :after ORDER BY e.seq LIMIT 1"
    )

    def accept(seqs: Sequence[int], hashes: Sequence[str]) -> None:
        """Take verified events (contiguous seqs) into the tree, checking the root at every
        signed size reached; the count and head advance only up to where the check stops."""
        nonlocal next_index, checkpoints_ok
        position, count = 0, len(hashes)
        while position < count:
            take = count - position
            if next_index < len(signed):
                take = min(take, signed[next_index][0] - frontier.size)
            part = hashes[position:position + take]
            frontier.extend_level_by_level(
                [sha256(b"\x00" + bytes.fromhex(digest)).digest() for digest in part]
            )
            position += take
            state["checked"] += take
            state["seq"], state["hash"] = seqs[position - 1], part[-1]
            if collected is not None:
                collected.extend(part)
            if next_index < len(signed) and signed[next_index][0] == frontier.size:
                size = frontier.size
                boundary_hashes[size] = part[-1]
                if collect is not None:
                    collect["signed_frontier"] = MerkleFrontier(size, list(frontier.stack))
                if frontier.root() != signed[next_index][1]:
                    start = signed[next_index - 1][0] if next_index else 0
                    failures.append(
                        (
                            _first_changed_leaf(store, connection, start, size) or start + 1,
                            f"events {start + 1}..{size} differ from those signed in the "
                            f"checkpoint at tree size {size}: its Merkle root does not match "
                            "(history rewritten after it was signed)",
                        )
                    )
                    raise _Stop
                next_index += 1
                checkpoints_ok += 1

    try:
        while True:
            # Fast path: whole chunks checked at once (contiguous seqs, links, hashes of the
            # record text the database rebuilds), then the Merkle tree level by level.
            mismatch = False
            cursor = store.raw_cursor(connection)
            try:
                cursor.arraysize = _VERIFY_BATCH_ROWS
                cursor.execute(fast_sql, (state["seq"],))
                while not mismatch:
                    rows = cursor.fetchmany(_VERIFY_BATCH_ROWS)
                    if not rows:
                        break
                    seqs, prevs, digests, records, eids, stamps, macs = zip(*rows, strict=True)
                    after, last = state["seq"], state["hash"]
                    good = (
                        seqs[0] == after + 1
                        and seqs[-1] == after + len(seqs)
                        and prevs[0] == last
                        and prevs[1:] == digests[:-1]
                    )
                    if good:
                        try:
                            good = tuple(
                                [sha256(record.encode("utf-8")).hexdigest() for record in records]
                            ) == digests
                        except AttributeError:  # a NULL record: a column of the wrong type
                            good = False
                    if good:
                        accept(seqs, digests)
                        soft.check(seqs, prevs, digests, eids, stamps, macs)
                        continue
                    # find the first row that fails; accept those before it
                    n = 0
                    for seq, prev, digest, record, *_ in rows:
                        if not (
                            seq == after + 1
                            and prev == last
                            and record is not None
                            and sha256(record.encode("utf-8")).hexdigest() == digest
                        ):
                            break
                        after, last, n = seq, digest, n + 1
                    accept(seqs[:n], digests[:n])
                    soft.check(seqs[:n], prevs[:n], digests[:n], eids[:n], stamps[:n], macs[:n])
                    mismatch = True
            finally:
                cursor.close()
            if not mismatch:
                break
            # Slow path for one row: exact diagnosis, or acceptance if only the SQL rendering differed.
            row = connection.exec_driver_sql(slow_sql, {"after": state["seq"]}).first()
            if row is None:
                break
            problem = check_row(row, state["seq"], state["hash"])
            if problem is not None:
                state["checked"] += 1
                raise _Broken(*problem)
            accept((row.seq,), (row.hash,))
            soft.check((row.seq,), (row.prev_hash,), (row.hash,), (row.event_id,),
                       (row.timestamp,), (row.mac,))
    except _Broken as broken:
        failures.append((broken.seq, broken.reason))
    except _Stop:
        pass
    size = frontier.size
    if collect is not None:
        collect["frontier"] = frontier

    if not failures and next_index < len(signed):
        claimed = signed[next_index][0]
        failures.append(
            (
                size + 1,
                f"truncated: the signed checkpoint at tree size {claimed} covers {claimed} events "
                f"but the ledger holds only {size}; events {size + 1}..{claimed} were removed",
            )
        )
    signed_size = signed[checkpoints_ok - 1][0] if checkpoints_ok else 0
    if failures:
        first_bad, reason = min(failures, key=lambda f: f[0])
        head = boundary_hashes.get(first_bad - 1, state["hash"])
        return ChainVerification(
            False, state["checked"], first_bad, reason, head, checkpoints_ok, signed_size,
        )
    soft_verdict = soft.verdict(state["checked"], checkpoints_ok, signed_size)
    if soft_verdict is not None:
        return soft_verdict
    return _intact(state["checked"], state["hash"], signed)


def _intact(checked: int, head: str, signed: Sequence[tuple[int, bytes]]) -> ChainVerification:
    """The verdict for an intact log of `checked` events whose newest hash is `head`."""
    if not checked:
        return ChainVerification(True, 0, None, "ledger is empty; nothing to verify", GENESIS_HASH)
    noun = "event" if checked == 1 else "events"
    signed_size = signed[-1][0] if signed else 0
    summary = f"{checked} {noun} verified; chain intact"
    if signed:
        summary += (
            f"; Merkle root matches {len(signed)} signed checkpoint"
            f"{'s' if len(signed) != 1 else ''} (latest: tree size {signed_size})"
        )
    if checked > signed_size:
        summary += f"; {checked - signed_size} newest not yet in a signed checkpoint"
    return ChainVerification(True, checked, None, summary, head, len(signed), signed_size)


def _event_hashes(store: LedgerStore, connection: Connection | sqlite3.Connection,
                  lo: int, hi: int) -> list[str]:
    """Hashes of events lo+1..hi in seq order, on a raw or SQLAlchemy connection."""
    if isinstance(connection, sqlite3.Connection):
        return [h for (h,) in connection.execute(
            "SELECT hash FROM ledger_events WHERE seq > ? AND seq <= ? ORDER BY seq", (lo, hi))]
    return list(connection.exec_driver_sql(store.paramstyle_named(
        "SELECT hash FROM ledger_events WHERE seq > :lo AND seq <= :hi ORDER BY seq"),
        {"lo": lo, "hi": hi}).scalars())


def _bad_frontier_node(store: LedgerStore, connection: Connection | sqlite3.Connection,
                       frontier: MerkleFrontier) -> str:
    """Which stored node of `frontier` differs from the tree the events themselves give."""
    for (level, index), stored in zip(perfect_subtrees(0, frontier.size), frontier.stack,
                                      strict=True):
        lo, hi = index << level, (index + 1) << level
        hashes = _event_hashes(store, connection, lo, hi)
        try:
            expected = root_hash([leaf_hash(bytes.fromhex(h)) for h in hashes])
        except (TypeError, ValueError):
            return f"events {lo + 1}..{hi} hold a malformed hash: run `fedpact audit verify`"
        if len(hashes) != hi - lo or expected != stored:
            return (f"merkle_nodes (level {level}, index {index}) differs from the hash of events "
                    f"{lo + 1}..{hi} it stands for (altered outside fedpact)")
    return "the stored frontier's root differs from the signed root"


def _frontier_problem(store: LedgerStore, connection: Connection,
                      signed: Sequence[tuple[int, bytes]]) -> str | None:
    """None if the stored frontier at the latest signed size folds to its signed root (what the
    next writer extends); else what is wrong, naming the stored node. Interior nodes only serve
    proofs, which are checked against signed roots on use; `check_indexes` checks them all."""
    if not signed or not signed[-1][0]:
        return None
    size, root = signed[-1]
    try:
        frontier = MerkleFrontier.at(size, node_source(store, connection))
    except LedgerError as exc:
        return f"merkle_nodes: {exc}"
    if frontier.root() == root:
        return None
    return (f"the stored Merkle tree does not match the signed checkpoint at tree size {size}: "
            f"{_bad_frontier_node(store, connection, frontier)}; a checkpoint built on it would "
            "sign a wrong root")


# --- consent decided from proven events, incrementally -----------------------------------------

_PROOF_BLOCK = 1024
"""The remembered hashes of proven events are kept as one SHA-256 per block of this many events."""


def _block_digest(hashes: Sequence[str]) -> bytes:
    return hashlib.sha256("".join(hashes).encode("ascii", "replace")).digest()


def _refuse_consent(verdict: ChainVerification) -> LedgerError:
    where = f" at event {verdict.first_bad_seq}" if verdict.first_bad_seq else ""
    return LedgerError(f"consent cannot be decided: the chain does not verify{where}: "
                       f"{verdict.reason}; run `fedpact audit verify`")


@dataclass
class _ConsentProof:
    """What one `Ledger` proved about its log (see `Ledger.proven_consent_events`): the first
    `size` events verified, fingerprinted by their stored hashes (a digest per block of
    `_PROOF_BLOCK`), the chain head and Merkle frontier at `size`, the checkpoints that vouched
    for them, and every consent event among them (seq, type, payload, hash) by subject."""

    size: int
    head: str
    blocks: list[bytes]
    tail: list[str]  # hashes of the events after the last whole block
    frontier: MerkleFrontier
    signed: list[tuple[int, bytes]]
    boundary: int
    keys: tuple[str, ...]
    by_subject: dict[Any, list[list[Any]]]  # [seq, type, payload, hash, row or None]
    made_at: float  # time.monotonic() of the full verification it started from
    signed_frontier: MerkleFrontier  # at the newest signed size
    unsigned: list[str]  # hashes of the proven events after it

    def events(self, subjects: Collection[str] | None) -> list[tuple[Any, ...]]:
        """(seq, type, payload, hash, its consent_state row or why it has none), in seq order."""
        if subjects is None:
            found = [e for events in self.by_subject.values() for e in events]
        else:
            found = [e for s in subjects if isinstance(s, str) for e in self.by_subject.get(s, ())]
        found.sort(key=lambda e: e[0])
        for entry in found:
            if entry[4] is None:  # its consent_state row, derived on first use
                try:
                    entry[4] = _consent_row(CONSENT_STATUS[entry[1]], entry[2], entry[0])
                except (KeyError, TypeError, ValueError) as exc:
                    entry[4] = str(exc)  # named by whoever decides from it
        return found

    def advance_signed(self, signed: Sequence[tuple[int, bytes]]) -> bool:
        """Check checkpoints signed since over events already proven (their roots, from the
        remembered unsigned hashes); False if one does not match or an earlier one changed."""
        last = self.signed[-1][0] if self.signed else 0
        if [s for s in signed if s[0] <= last] != self.signed:
            return False
        frontier = MerkleFrontier(self.signed_frontier.size, list(self.signed_frontier.stack))
        for size, root in signed:
            if last < size <= self.size:
                frontier.extend_level_by_level([leaf_hash(bytes.fromhex(h)) for h in
                                                self.unsigned[frontier.size - last:size - last]])
                if frontier.root() != root:
                    return False
        return True

    def settle(self, signed: Sequence[tuple[int, bytes]]) -> None:
        """After `add`: remember `signed` (all verified) and the frontier at the newest."""
        last = self.signed[-1][0] if self.signed else 0
        newest = signed[-1][0] if signed else 0
        if newest > last:
            self.signed_frontier.extend_level_by_level(
                [leaf_hash(bytes.fromhex(h)) for h in self.unsigned[:newest - last]])
            del self.unsigned[:newest - last]
        self.signed = list(signed)

    def add(self, hashes: Sequence[str], consent: Iterable[tuple[int, str, str, str]]) -> None:
        """Take newly verified events: their hashes (in seq order), and their consent events
        as (seq, type, payload text, hash)."""
        self.tail.extend(hashes)
        self.unsigned.extend(hashes)
        whole = len(self.tail) - len(self.tail) % _PROOF_BLOCK
        for start in range(0, whole, _PROOF_BLOCK):
            self.blocks.append(_block_digest(self.tail[start:start + _PROOF_BLOCK]))
        del self.tail[:whole]
        self.size += len(hashes)
        if hashes:
            self.head = hashes[-1]
        for seq, kind, text, digest in consent:
            payload = json.loads(text)
            self.by_subject.setdefault(payload.get("subject"), []).append(
                [int(seq), str(kind), payload, digest, None])

    def prefix_problem(self, store: LedgerStore, connection: Connection) -> str | None:
        """None if events 1..size are still those proven (same seqs, same stored hashes); else
        which proven events are gone or changed. A re-hashed rewrite, a deletion (also of the
        newest unsigned events), an insertion or a reordering changes them."""
        size = self.size
        if not size:
            return None
        count, low, high = connection.exec_driver_sql(
            store.paramstyle_named("SELECT count(*), min(seq), max(seq) FROM ledger_events "
                                   "WHERE seq <= :size"), {"size": size}).one()
        if (int(count), low, high) != (size, 1, size):
            return (f"the log no longer holds the {size} events verified earlier (it holds "
                    f"{int(count)} events with seq ≤ {size}): events were removed or inserted")
        cursor = store.raw_cursor(connection)
        try:
            cursor.execute(f"SELECT hash FROM ledger_events WHERE seq <= {store.placeholder} "
                           "ORDER BY seq", (size,))
            hashes = [h for (h,) in cursor.fetchall()]
        finally:
            cursor.close()
        try:
            blocks = [_block_digest(hashes[s:s + _PROOF_BLOCK])
                      for s in range(0, len(hashes) - len(self.tail), _PROOF_BLOCK)]
            tail = hashes[len(hashes) - len(self.tail):] if self.tail else []
        except TypeError:  # a hash of the wrong type
            blocks, tail = [], []
        if blocks == self.blocks and tail == self.tail:
            return None
        first = next((i for i, (a, b) in enumerate(zip(blocks, self.blocks, strict=False))
                      if a != b), len(self.blocks))
        lo = first * _PROOF_BLOCK + 1
        hi = min(size, lo + _PROOF_BLOCK - 1)
        return (f"the stored hashes of events {lo}..{hi} differ from those verified earlier: "
                "events verified before were rewritten")

    def content_problem(self, store: LedgerStore, connection: Connection,
                        events: Sequence[tuple[Any, ...]]) -> int | None:
        """The seq of the first of `events` (proven consent events) whose stored record no longer
        hashes to its proven hash, else None."""
        if not events:
            return None
        base = store.verify_rows_sql(bounded=True)
        base = base[:base.index("WHERE e.seq >")]
        want = {event[0]: event[3] for event in events}
        seqs = sorted(want)
        sha256 = hashlib.sha256
        seen = 0
        for start in range(0, len(seqs), 500):
            part = seqs[start:start + 500]
            marks = ", ".join([store.placeholder] * len(part))
            cursor = store.raw_cursor(connection)
            try:
                cursor.execute(f"{base}WHERE e.seq IN ({marks}) ORDER BY e.seq", tuple(part))
                rows = cursor.fetchall()
            finally:
                cursor.close()
            for row in rows:
                seq, digest, record = row[0], row[2], row[3]
                if (digest != want.get(seq) or record is None
                        or sha256(record.encode("utf-8")).hexdigest() != digest):
                    return int(seq)
            seen += len(rows)
            if seen != start + len(part):
                found = {row[0] for row in rows}
                return next(seq for seq in part if seq not in found)
        return None


def _verify_suffix(
    store: LedgerStore,
    connection: Connection,
    proof: _ConsentProof,
    signed: Sequence[tuple[int, bytes]],
    soft: _SoftChecks,
) -> tuple[MerkleFrontier, list[str]] | None:
    """Check the events after those `proof` vouches for: contiguous seqs, links from its head,
    record hashes, bound ids and writer tags, and the Merkle root at every signed size past it.
    Returns (the frontier after them, their hashes), or None at the first doubt (the caller
    then runs the full verification, which names the event)."""
    frontier = MerkleFrontier(proof.frontier.size, list(proof.frontier.stack))
    pending = [(size, root) for size, root in signed if size > proof.size]
    sha256 = hashlib.sha256
    after, last = proof.size, proof.head
    hashes: list[str] = []
    cursor = store.raw_cursor(connection)
    try:
        cursor.arraysize = _VERIFY_BATCH_ROWS
        cursor.execute(store.verify_rows_sql(), (after,))
        while True:
            rows = cursor.fetchmany(_VERIFY_BATCH_ROWS)
            if not rows:
                break
            seqs, prevs, digests, records, eids, stamps, macs = zip(*rows, strict=True)
            try:
                good = (
                    seqs[0] == after + 1
                    and seqs[-1] == after + len(seqs)
                    and prevs[0] == last
                    and prevs[1:] == digests[:-1]
                    and tuple(
                        [sha256(record.encode("utf-8")).hexdigest() for record in records]
                    ) == digests
                )
            except AttributeError:  # NULL record: a column of the wrong type
                good = False
            if good:
                soft.check(seqs, prevs, digests, eids, stamps, macs)
                good = soft.id_problem is None and not soft.untagged
            if not good:
                return None
            leaves = [sha256(b"\x00" + bytes.fromhex(digest)).digest() for digest in digests]
            position = 0
            while position < len(leaves):
                take = len(leaves) - position
                if pending:
                    take = min(take, pending[0][0] - frontier.size)
                frontier.extend_level_by_level(leaves[position:position + take])
                position += take
                if (pending and frontier.size == pending[0][0]
                        and frontier.root() != pending.pop(0)[1]):
                    return None
            hashes.extend(digests)
            after, last = seqs[-1], digests[-1]
    finally:
        cursor.close()
    if pending:  # a signed checkpoint covers events that are not there
        return None
    return frontier, hashes


CONSENT_FULL_RECHECK_S = 600.0
"""Consent checks verify the whole log again when their proof is older than this."""

_CONSENT_PROOFS: dict[tuple[Any, ...], _ConsentProof] = {}
"""What consent checks proved, per database and keys (`Ledger._proof_identity`), shared by the
`Ledger`s of this process (a data loader opens one per job)."""
_PROOF_LOCKS: dict[tuple[Any, ...], threading.Lock] = {}
_PROOF_LOCKS_LOCK = threading.Lock()


def _proof_lock(identity: tuple[Any, ...]) -> threading.Lock:
    with _PROOF_LOCKS_LOCK:
        return _PROOF_LOCKS.setdefault(identity, threading.Lock())


def _keep_proof(identity: tuple[Any, ...], proof: _ConsentProof) -> None:
    _CONSENT_PROOFS[identity] = proof
    while len(_CONSENT_PROOFS) > 16:  # the oldest first
        _CONSENT_PROOFS.pop(next(iter(_CONSENT_PROOFS)))


def forget_consent_proofs() -> None:
    """Drop every remembered consent proof: the next consent check verifies its whole log."""
    _CONSENT_PROOFS.clear()


def _no_key_truncation(verdict: ChainVerification, checkpoints: Sequence[tuple[int, Any]],
                       keys: Sequence[VerifierKey]) -> ChainVerification:
    """Without a public key the checkpoints cannot be checked, but none may cover more events
    than the log holds."""
    if verdict.ok and not keys and checkpoints and checkpoints[-1][0] > verdict.events_checked:
        size = checkpoints[-1][0]
        return ChainVerification(
            False, verdict.events_checked, verdict.events_checked + 1,
            f"truncated: a checkpoint covers {size} events but the ledger holds only "
            f"{verdict.events_checked}", verdict.head_hash)
    return verdict


PARALLEL_VERIFY_MIN_EVENTS = 200_000
"""Below this many events verification runs in this process only."""


def _verify_range(job: tuple[Any, ...]) -> tuple[Any, ...]:
    """Worker: check events lo+1..hi of a SQLite ledger file; roots are local to the range.

    Returns (ok, prev_hash of event lo+1, hash of event hi, [(tree size, local root)] at each
    signed size in (lo, hi], local root of the whole range). `ok` is False at the first anomaly
    (including an unbound id or a missing writer tag): the caller then re-runs the sequential
    check, which names the first bad event.
    """
    path, sql, lo, hi, sizes, ids_from, writer = job
    sha256 = hashlib.sha256
    soft = _SoftChecks(ids_from, writer)
    connection = sqlite3.connect(path)
    try:
        cursor = connection.execute(sql, (lo, hi))
        frontier = MerkleFrontier()
        roots: list[tuple[int, bytes]] = []
        boundaries = [size - lo for size in sizes]
        first_prev: str | None = None
        last = ""
        after = lo
        next_boundary = 0
        while True:
            rows = cursor.fetchmany(_VERIFY_BATCH_ROWS)
            if not rows:
                break
            seqs, prevs, digests, records, eids, stamps, macs = zip(*rows, strict=True)
            if first_prev is None:
                first_prev, last = prevs[0], prevs[0]
            try:
                good = (
                    seqs[0] == after + 1
                    and seqs[-1] == after + len(seqs)
                    and prevs[0] == last
                    and prevs[1:] == digests[:-1]
                    and tuple(
                        [sha256(record.encode("utf-8")).hexdigest() for record in records]
                    ) == digests
                )
            except AttributeError:  # NULL record
                good = False
            if good:
                soft.check(seqs, prevs, digests, eids, stamps, macs)
                good = soft.id_problem is None and not soft.untagged
            if not good:
                return (False,)
            leaves = [sha256(b"\x00" + bytes.fromhex(digest)).digest() for digest in digests]
            position = 0
            while position < len(leaves):
                take = len(leaves) - position
                if next_boundary < len(boundaries):
                    take = min(take, boundaries[next_boundary] - frontier.size)
                frontier.extend_level_by_level(leaves[position:position + take])
                position += take
                if next_boundary < len(boundaries) and frontier.size == boundaries[next_boundary]:
                    roots.append((sizes[next_boundary], frontier.root()))
                    next_boundary += 1
            after, last = seqs[-1], digests[-1]
        if after != hi:
            return (False,)
        return True, first_prev, last, roots, frontier.root()
    finally:
        connection.close()


PARALLEL_VERIFY_TIMEOUT_BASE_S = 60.0
PARALLEL_VERIFY_TIMEOUT_PER_EVENT_S = 100e-6
"""How long the parent waits for the verification workers: a base plus this per event (≈ 10,000
events/s, some 20-40× slower than a worker runs on a loaded core); past it the sequential check
decides (and the result says so)."""


def parallel_verify_timeout(events: int) -> float:
    """Seconds the parent waits for the workers checking `events` events before it gives up."""
    return PARALLEL_VERIFY_TIMEOUT_BASE_S + events * PARALLEL_VERIFY_TIMEOUT_PER_EVENT_S


def _range_worker(jobs: Sequence[tuple[int, tuple[Any, ...]]], out: Any) -> None:
    """Worker process: check each (index, range job), sending (index, result) after each; stops
    at the first anomaly (the parent then runs the sequential check)."""
    gc.disable()  # never finalise (close) the SQLite connections inherited from the parent
    try:
        for index, job in jobs:
            result = _verify_range(job)
            out.send((index, result))
            if not result[0]:
                break
    finally:
        out.close()


class _ParallelCheck:
    """The intact-log check of a large SQLite ledger split over worker processes.

    The events are cut into ranges of 2^L leaves, so each range's tree is a perfect subtree of
    the whole: the root at a signed size k inside range j is fold_right(frontier of the ranges
    before j ++ [range j's root up to k]). Only an intact verdict is produced here; on any
    anomaly `finish` returns None and the caller runs the sequential check for the diagnosis.
    The wait is bounded (`parallel_verify_timeout`); a worker that dies or does not answer in
    time also gives None, with `failure` saying what happened (the caller reports it).
    """

    def __init__(self, processes: list[Any], connections: list[Any], jobs: int, size: int) -> None:
        self.processes, self.connections, self.jobs, self.size = processes, connections, jobs, size
        self.failure: str | None = None

    def close(self) -> None:
        for process in self.processes:
            if process.exitcode is None:
                process.kill()
        for process in self.processes:
            process.join(1.0)
        for connection in self.connections:
            connection.close()

    def _collect(self) -> dict[int, tuple[Any, ...]] | None:
        """Every range's result, or None (an anomaly, or `failure` set) as soon as that is known."""
        from multiprocessing.connection import wait

        timeout = parallel_verify_timeout(self.size)
        deadline = time.monotonic() + timeout
        results: dict[int, tuple[Any, ...]] = {}
        open_ = list(self.connections)
        while open_:
            left = deadline - time.monotonic()
            ready = wait(open_, timeout=max(0.0, left)) if left > 0 else []
            if not ready:
                self.failure = (f"the verification workers did not answer within {timeout:.0f} s "
                                f"({len(results)} of {self.jobs} ranges done)")
                return None
            for connection in ready:
                try:
                    index, result = connection.recv()
                except EOFError:  # the worker closed its end: finished, or died
                    open_.remove(connection)
                    continue
                if not result[0]:
                    return None  # an anomaly: the sequential check names it
                results[index] = result
        if len(results) != self.jobs:
            codes = sorted({p.exitcode for p in self.processes if p.exitcode not in (None, 0)})
            how = f" (exit code {', '.join(map(str, codes))})" if codes else ""
            self.failure = (f"a verification worker died{how} ({len(results)} of {self.jobs} "
                            "ranges done)")
            return None
        return results

    def finish(self, signed: Sequence[tuple[int, bytes]] | None) -> ChainVerification | None:
        if signed is None or (signed and signed[-1][0] > self.size):
            return None
        try:
            collected = self._collect()
            if collected is None:
                return None
            expected = dict(signed)
            ranges = MerkleFrontier()  # the tree over whole ranges' roots
            head = GENESIS_HASH
            matched = 0
            for index in range(self.jobs):
                result = collected[index]
                ok, first_prev, last, roots, range_root = (*result, None, None, None, None)[:5]
                if not ok or first_prev != head:
                    return None
                for size, local_root in roots:
                    if fold_right([*ranges.stack, local_root]) != expected.get(size):
                        return None
                    matched += 1
                ranges.append(range_root)
                head = last
            if matched != len(signed):
                return None
            return _intact(self.size, head, signed)
        except Exception as exc:  # noqa: BLE001 - a worker failed: the sequential check decides
            self.failure = f"the parallel verification failed ({type(exc).__name__}: {exc})"
            return None


def _start_parallel_check(
    store: LedgerStore, connection: Connection, sizes: Sequence[int], soft: _SoftChecks
) -> _ParallelCheck | None:
    """Start the parallel check for a big SQLite file ledger on a multi-core machine, else None.

    Worker processes are forked, so only from a single-threaded process (forking while other
    threads hold locks is unsafe); they read the same file through their own connections, and
    only events up to this snapshot's newest. Raises if they cannot be started (the caller
    then verifies sequentially and says so).
    """
    import multiprocessing

    cores = os.cpu_count() or 1
    path = store.database_path
    if (
        cores < 2
        or path is None
        or store.dialect != "sqlite"
        or threading.active_count() != 1
        or "fork" not in multiprocessing.get_all_start_methods()
        or os.environ.get("FEDPACT_AUDIT_VERIFY_PROCESSES") == "1"
    ):
        return None
    size = int(connection.exec_driver_sql("SELECT coalesce(max(seq), 0) FROM ledger_events").scalar())
    if size < PARALLEL_VERIFY_MIN_EVENTS:
        return None
    level = max(12, (size // 8).bit_length())
    span = 1 << level
    sql = store.verify_rows_sql(bounded=True)
    sizes = sorted(sizes)
    jobs = []
    for lo in range(0, size, span):
        hi = min(lo + span, size)
        jobs.append((str(path), sql, lo, hi, tuple(s for s in sizes if lo < s <= hi),
                     soft.ids_from, soft.writer))
    workers = min(cores, 2, len(jobs))
    context = multiprocessing.get_context("fork")
    check = _ParallelCheck([], [], len(jobs), size)
    # nothing the parent holds is even a candidate for collection in the workers (they also
    # turn gc off: they must never finalise the SQLite connections they inherited)
    gc.freeze()
    try:
        for number in range(workers):
            receive, send = context.Pipe(duplex=False)
            check.connections.append(receive)
            share = [(index, jobs[index]) for index in range(number, len(jobs), workers)]
            process = context.Process(target=_range_worker, args=(share, send), daemon=True,
                                      name=f"fedpact-verify-{number}")
            try:
                process.start()
            finally:
                send.close()  # the worker holds the only write end: EOF when it ends or dies
            check.processes.append(process)
    except BaseException:
        check.close()
        raise
    finally:
        gc.unfreeze()
    return check


def _open_with_any(note: str, keys: Sequence[VerifierKey]) -> Checkpoint:
    if not keys:
        raise CheckpointError("no public key to check checkpoint signatures with")
    errors = []
    for key in keys:
        try:
            return open_checkpoint(note, key)
        except CheckpointError as exc:
            errors.append(str(exc))
    forged = [e for e in errors if "does not verify" in e]
    raise CheckpointError(forged[0] if forged else errors[0])


def _first_changed_leaf(store: LedgerStore, connection: Connection, start: int, end: int) -> int | None:
    """The seq of the first event in (start, end] whose hash differs from the leaf stored at signing."""
    stored = dict(
        connection.exec_driver_sql(
            store.paramstyle_named(
                "SELECT idx, hash FROM merkle_nodes WHERE level = 0 AND idx >= :lo AND idx < :hi"
            ),
            {"lo": start, "hi": end},
        ).all()
    )
    rows = connection.execute(
        select(ledger_events.c.seq, ledger_events.c.hash)
        .where(ledger_events.c.seq > start, ledger_events.c.seq <= end)
        .order_by(ledger_events.c.seq)
    ).all()
    for seq, digest in rows:
        leaf = stored.get(seq - 1)
        if leaf is None or bytes(leaf) != leaf_hash(bytes.fromhex(digest)):
            return int(seq)
    return None


def node_source(store: LedgerStore, connection: Connection | sqlite3.Connection) -> Any:
    """Stored Merkle subtree hashes, looked up on `connection` (a NodeSource for proofs)."""
    if isinstance(connection, sqlite3.Connection) or store.dialect == "sqlite":
        # SQLite: one indexed point lookup per node on the raw connection (an OR of pairs is
        # not served by the WITHOUT ROWID primary key and degrades to a scan)
        raw = (
            connection
            if isinstance(connection, sqlite3.Connection)
            else connection.connection.driver_connection
        )

        def fetch_sqlite(keys: Sequence[tuple[int, int]]) -> dict[tuple[int, int], bytes]:
            found: dict[tuple[int, int], bytes] = {}
            for key in keys:
                row = raw.execute(
                    "SELECT hash FROM merkle_nodes WHERE level = ? AND idx = ?", key
                ).fetchone()
                if row is not None:
                    found[(int(key[0]), int(key[1]))] = _node_bytes(key[0], key[1], row[0])
            return found

        return fetch_sqlite

    def fetch(keys: Sequence[tuple[int, int]]) -> dict[tuple[int, int], bytes]:
        found: dict[tuple[int, int], bytes] = {}
        keys = list(keys)
        for start in range(0, len(keys), 200):
            chunk = keys[start:start + 200]
            condition = " OR ".join(f"(level = :l{n} AND idx = :i{n})" for n in range(len(chunk)))
            params: dict[str, Any] = {}
            for n, (level, index) in enumerate(chunk):
                params[f"l{n}"], params[f"i{n}"] = level, index
            sql = store.paramstyle_named(
                f"SELECT level, idx, hash FROM merkle_nodes WHERE {condition}"
            )
            for level, index, digest in connection.exec_driver_sql(sql, params):
                found[(int(level), int(index))] = _node_bytes(level, index, digest)
        return found

    return fetch


def _node_bytes(level: int, index: int, value: Any) -> bytes:
    """A stored Merkle node's 32 bytes; ProofError naming the node if it holds anything else."""
    if isinstance(value, bytes | memoryview | bytearray) and len(value) == 32:
        return bytes(value)
    kind = _STORED_KIND.get(type(value), f"a {type(value).__name__}")
    if isinstance(value, str):
        kind = "TEXT"
    elif isinstance(value, bytes | memoryview | bytearray):
        kind = f"{len(value)} bytes"
    raise ProofError(f"merkle_nodes (level {level}, index {index}) is stored as {kind}, not a "
                     "32-byte hash (altered outside fedpact)")


def check_readable(url: URL) -> None:
    """Refuse to open read-only a SQLite ledger file that does not exist (opening would create it)."""
    if url.get_backend_name() != "sqlite":
        return
    database = url.database
    if database in (None, "", ":memory:"):
        raise LedgerError("an in-memory ledger cannot be opened read-only: it would be empty")
    if database.startswith("file:"):
        return
    path = Path(database).expanduser().absolute()
    if path.is_dir():
        raise LedgerError(f"cannot open ledger {path}: it is a directory, not a file")
    if not path.is_file():
        raise LedgerError(f"no ledger database at {path}")


# --- a checkpoint kept elsewhere -------------------------------------------------------------


def check_kept_checkpoint(
    store: LedgerStore,
    connection: Connection,
    kept_note: str,
    keys: Sequence[VerifierKey],
    verdict: ChainVerification,
    *,
    origin: str | None,
) -> ChainVerification:
    """Check a verified log (`verdict` from `verify_log`) against a signed note kept elsewhere."""

    def failed(first_bad: int | None, reason: str) -> ChainVerification:
        return ChainVerification(
            False, verdict.events_checked, first_bad, reason, verdict.head_hash,
            verdict.checkpoints_checked, verdict.signed_tree_size, verdict.notes,
        )

    try:
        kept = _open_with_any(kept_note, keys)
    except CheckpointError as exc:
        return failed(None, f"the kept checkpoint does not verify with the given key(s): {exc}")
    if origin is not None and kept.origin != origin:
        return failed(
            None,
            f"the kept checkpoint is for log {kept.origin} but this ledger is {origin}: "
            "a different or re-created ledger",
        )
    size, kept_size = verdict.events_checked, kept.tree_size
    when = f" (signed {kept.timestamp})" if kept.timestamp else ""
    if kept_size > size:
        return failed(
            size + 1,
            f"truncated: the kept checkpoint{when} covers {kept_size} events but the ledger "
            f"holds only {size}; events {size + 1}..{kept_size} were removed, with the "
            "checkpoints that covered them",
        )
    latest = connection.execute(
        select(ledger_checkpoints.c.tree_size, ledger_checkpoints.c.note)
        .order_by(ledger_checkpoints.c.tree_size.desc())
        .limit(1)
    ).first()
    how = None
    try:
        if kept_size == 0:
            how = "the empty tree"
        elif latest is not None and int(latest.tree_size) >= kept_size:
            newest = int(latest.tree_size)
            try:
                proof = consistency_proof(kept_size, newest, node_source(store, connection))
            except ProofError:
                proof = None  # the stored tree lacks a node: recompute below instead
            if proof is not None:
                newest_root = _open_with_any(latest.note, keys).root_hash  # verified above
                verify_consistency(kept_size, newest, kept.root_hash, newest_root, proof)
                how = f"consistency proof to the ledger's signed tree size {newest}"
        if how is None:
            if _root_at(store, connection, kept_size) != kept.root_hash:
                raise ProofError(f"the Merkle root of the first {kept_size} events differs")
            how = f"Merkle root of its first {kept_size} events recomputed"
    except (ProofError, CheckpointError) as exc:
        return failed(
            None,
            f"rewritten: the ledger's first {kept_size} events are not those signed in the kept "
            f"checkpoint{when}: {exc}",
        )
    return dataclasses.replace(
        verdict,
        reason=f"{verdict.reason}; consistent with the kept checkpoint at tree size {kept_size}"
        f"{when} ({how})",
    )


def _root_at(store: LedgerStore, connection: Connection, size: int) -> bytes:
    """The Merkle root over the first `size` event hashes, recomputed from the events."""
    frontier = MerkleFrontier()
    cursor = store.raw_cursor(connection)
    try:
        cursor.execute(
            f"SELECT hash FROM ledger_events WHERE seq <= {store.placeholder} ORDER BY seq",
            (size,),
        )
        sha256 = hashlib.sha256
        while rows := cursor.fetchmany(_VERIFY_BATCH_ROWS):
            frontier.extend_level_by_level(
                [sha256(b"\x00" + bytes.fromhex(row[0])).digest() for row in rows]
            )
    finally:
        cursor.close()
    if frontier.size != size:
        raise ProofError(f"the ledger holds {frontier.size} of the first {size} events")
    return frontier.root()


# --- derived tables ----------------------------------------------------------------------------

_INDEX_READ_SQL = (
    "SELECT seq, timestamp, event_type, actor, job_id, payload, prev_hash, hash "
    "FROM ledger_events ORDER BY seq"
)
_CHAIN_COLUMNS = ("seq", "timestamp", "event_type", "actor", "job_id", "payload", "prev_hash", "hash")


def _chain_problem(row: Sequence[Any], last_seq: int, last_hash: str) -> str | None:
    """None if `row` (the `_CHAIN_COLUMNS`) is the event after (last_seq, last_hash) and hashes
    to its stored hash; else what is wrong with it, naming the event."""
    seq, timestamp, kind, actor, job_id, text, prev_hash, digest = row
    if (
        seq == last_seq + 1
        and prev_hash == last_hash
        and type(text) is str
        and type(timestamp) is str
        and type(kind) is str
        and type(actor) is str
        and (job_id is None or type(job_id) is str)
        and event_hash_from_text(last_hash, seq, timestamp, kind, actor, job_id, text) == digest
    ):
        return None
    problem = check_row(dict(zip(_CHAIN_COLUMNS, row, strict=True)), last_seq, last_hash)
    return problem[1] if problem is not None else f"event {seq} is altered"


def _recompute_indexes(
    store: LedgerStore, connection: Connection
) -> tuple[set[tuple[str, str, int]], dict[tuple[str, str], dict[str, Any]]]:
    """event_index rows and consent_state rows as the chain defines them; the chain is re-checked."""
    index_rows: set[tuple[str, str, int]] = set()
    consents: dict[tuple[str, str], dict[str, Any]] = {}
    last_seq, last_hash = 0, GENESIS_HASH
    cursor = store.raw_cursor(connection)
    try:
        cursor.execute(_INDEX_READ_SQL)
        while rows := cursor.fetchmany(_VERIFY_BATCH_ROWS):
            for row in rows:
                seq, _timestamp, kind, actor, _job_id, text, _prev_hash, digest = row
                problem = _chain_problem(row, last_seq, last_hash)
                if problem is not None:
                    raise LedgerError(
                        f"cannot derive the indexes from a broken chain: {problem}; "
                        "run `fedpact audit verify`"
                    )
                last_seq, last_hash = seq, digest
                payload = json.loads(text)
                if not isinstance(payload, dict):
                    continue
                for key, value in index_keys(kind, payload, actor):
                    index_rows.add((key, value, seq))
                status = CONSENT_STATUS.get(kind)
                if status is None:
                    continue
                try:
                    row_value = _consent_row(status, payload, seq)
                except (KeyError, TypeError, ValueError) as exc:
                    raise LedgerError(
                        f"event {seq} ({kind}) lacks a valid consent field: {exc}"
                    ) from None
                key = (row_value["subject"], row_value["purpose"])
                held = consents.get(key)
                if held is None or row_value["effective_at"] >= held["effective_at"]:
                    consents[key] = row_value
    finally:
        cursor.close()
    return index_rows, consents


def _compare_indexes(
    store: LedgerStore,
    connection: Connection,
    expected_index: set[tuple[str, str, int]],
    expected_consent: dict[tuple[str, str], dict[str, Any]],
) -> IndexCheck:
    problems: list[str] = []
    stored_index = {
        (str(k), str(v), int(q))
        for k, v, q in connection.execute(
            select(event_index.c.kind, event_index.c.value, event_index.c.seq)
        )
    }
    for kind, value, seq in sorted(expected_index - stored_index, key=lambda r: (r[2], r[0], r[1])):
        problems.append(f"event_index: missing {kind}={value} for event {seq}")
    for kind, value, seq in sorted(stored_index - expected_index, key=lambda r: (r[2], r[0], r[1])):
        problems.append(f"event_index: extra {kind}={value} pointing at event {seq} "
                        "(the event does not carry it)")
    stored_consent = {
        (row.subject, row.purpose): dict(row._mapping)
        for row in connection.execute(select(consent_state))
    }
    for key in sorted(expected_consent.keys() | stored_consent.keys()):
        subject, purpose = key
        want, have = expected_consent.get(key), stored_consent.get(key)
        if have is None:
            problems.append(f"consent_state: {subject} / {purpose} is missing (the chain gives "
                            f"{want['status']}, event {want['seq']})")  # type: ignore[index]
        elif want is None:
            problems.append(f"consent_state: {subject} / {purpose} is not in the chain "
                            f"(stored {have['status']}, event {have['seq']})")
        else:
            differ = [c for c in _CONSENT_COLUMNS if have.get(c) != want.get(c)]
            if differ:
                shown = ", ".join(f"{c} {have.get(c)!r} (chain: {want.get(c)!r})" for c in differ)
                problems.append(f"consent_state: {subject} / {purpose}: stored {shown}")
    problems.extend(_check_job_subjects(connection))
    problems.extend(_check_merkle_nodes(store, connection))
    last = connection.exec_driver_sql("SELECT coalesce(max(seq), 0) FROM ledger_events").scalar()
    return IndexCheck(int(last or 0), len(expected_index), len(expected_consent), tuple(problems))


def _check_job_subjects(connection: Connection) -> list[str]:
    """job_subjects against the manifest hashes of the data.subjects_used events."""
    stored: dict[tuple[str, str], list[str]] = {}
    for subject, job_id, dataset in connection.execute(
        select(job_subjects.c.subject, job_subjects.c.job_id, job_subjects.c.dataset)
    ):
        stored.setdefault((job_id, dataset), []).append(subject)
    claims: dict[tuple[str, str], list[tuple[int, str, int]]] = {}
    for seq, job_id, text in connection.execute(
        select(ledger_events.c.seq, ledger_events.c.job_id, ledger_events.c.payload).where(
            ledger_events.c.event_type == EventType.SUBJECTS_USED.value
        )
    ):
        try:
            payload = json.loads(text)
            claims.setdefault((job_id, payload["dataset"]), []).append(
                (int(seq), str(payload["manifest_sha256"]), int(payload["subjects"]))
            )
        except (ValueError, KeyError, TypeError):
            continue  # verify() reports an altered event
    problems = []
    for key in sorted(stored.keys() | claims.keys(), key=lambda k: (str(k[0]), str(k[1]))):
        job_id, dataset = key
        subjects = sorted(stored.get(key, ()))
        events = claims.get(key)
        if not events:
            problems.append(f"job_subjects: job {job_id} dataset {dataset} has {len(subjects)} "
                            "rows but no data.subjects_used event commits to them")
            continue
        manifest = hashlib.sha256("\n".join(subjects).encode()).hexdigest()
        if any(m == manifest for _, m, _ in events):
            continue
        counts = [n for _, _, n in events]
        if len(events) > 1 and max(counts) <= len(subjects) <= sum(counts):
            continue  # several manifests: the stored union cannot be checked exactly
        seq, _, count = events[-1]
        problems.append(f"job_subjects: job {job_id} dataset {dataset} holds {len(subjects)} "
                        f"subjects that do not match the manifest of event {seq} ({count} "
                        "subjects); job_subjects cannot be rebuilt from the chain")
    return problems


def _stream(store: LedgerStore, connection: Connection, sql: str,
            params: tuple[Any, ...] = ()) -> Iterator[tuple[Any, ...]]:
    cursor = store.raw_cursor(connection)
    try:
        cursor.execute(sql.replace("?", store.placeholder), params)
        while rows := cursor.fetchmany(_VERIFY_BATCH_ROWS):
            yield from rows
    finally:
        cursor.close()


def _check_merkle_nodes(store: LedgerStore, connection: Connection,
                        limit: int = 20) -> list[str]:
    """Every stored Merkle node against what it stands for: a leaf node against its event's
    hash, an interior node against its two stored children (so, by induction, against the
    events). Streams the tree level by level; memory does not grow with the ledger."""
    problems: list[str] = []

    def bad(level: int, index: int, why: str) -> bool:
        problems.append(f"merkle_nodes (level {level}, index {index}) {why}")
        return len(problems) >= limit

    def node(level: int, index: int, value: Any) -> bytes | None:
        try:
            return _node_bytes(level, index, value)
        except ProofError as exc:
            problems.append(str(exc).replace(" (altered outside fedpact)", ""))
            return None

    levels = [int(v) for (v,) in _stream(
        store, connection, "SELECT DISTINCT level FROM merkle_nodes ORDER BY level")]
    if 0 in levels:
        events = _stream(store, connection, "SELECT seq, hash FROM ledger_events ORDER BY seq")
        current = next(events, None)
        for index, value in _stream(store, connection,
                                    "SELECT idx, hash FROM merkle_nodes WHERE level = 0 "
                                    "ORDER BY idx"):
            while current is not None and current[0] < index + 1:
                current = next(events, None)
            stored = node(0, index, value)
            if stored is None:
                if len(problems) >= limit:
                    return problems
                continue
            if current is None or current[0] != index + 1:
                if bad(0, index, f"stands for event {index + 1}, which the ledger does not hold"):
                    return problems
                continue
            try:
                expected = leaf_hash(bytes.fromhex(current[1]))
            except (TypeError, ValueError):
                expected = None
            if stored != expected and bad(
                    0, index, f"differs from the leaf hash of event {index + 1} (altered)"):
                return problems
    for level in levels:
        if level == 0:
            continue
        children = _stream(store, connection, "SELECT idx, hash FROM merkle_nodes WHERE "
                           "level = ? ORDER BY idx", (level - 1,))
        child = next(children, None)
        for index, value in _stream(store, connection, "SELECT idx, hash FROM merkle_nodes "
                                    "WHERE level = ? ORDER BY idx", (level,)):
            pair: dict[int, Any] = {}
            while child is not None and child[0] <= 2 * index + 1:
                if child[0] >= 2 * index:
                    pair[int(child[0])] = child[1]
                child = next(children, None)
            stored = node(level, index, value)
            if stored is None:
                if len(problems) >= limit:
                    return problems
                continue
            left, right = pair.get(2 * index), pair.get(2 * index + 1)
            if left is None or right is None:
                if bad(level, index, f"has no children stored at level {level - 1}"):
                    return problems
                continue
            try:
                expected = node_hash(_node_bytes(level - 1, 2 * index, left),
                                     _node_bytes(level - 1, 2 * index + 1, right))
            except ProofError:
                continue  # the child itself is reported on its own level
            if stored != expected and bad(
                    level, index, f"differs from the hash of its children (altered); it stands "
                    f"for events {(index << level) + 1}..{(index + 1) << level}"):
                return problems
    return problems


def _check_indexes(store: LedgerStore, connection: Connection) -> IndexCheck:
    expected_index, expected_consent = _recompute_indexes(store, connection)
    return _compare_indexes(store, connection, expected_index, expected_consent)

"""Append-only, hash-chained audit ledger stored in one SQL table (SQLite by default).

Every event records who did what to which data and why; its hash covers the previous event's hash,
so any later edit is detectable with `Ledger.verify()`. Payloads should describe data (dataset
names, row counts, column names), never contain personal data, since events are never deleted.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import random
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType
from typing import Any, Self

from sqlalchemy import (
    URL,
    Column,
    Connection,
    Engine,
    Integer,
    MetaData,
    Select,
    Table,
    Text,
    create_engine,
    event,
    func,
    insert,
    make_url,
    select,
)
from sqlalchemy.exc import ArgumentError, IntegrityError, OperationalError, SQLAlchemyError
from sqlalchemy.pool import StaticPool
from sqlalchemy.schema import DDL, CreateIndex, CreateTable

from fedpact.audit.chain import (
    GENESIS_HASH,
    ChainVerification,
    canonical_json,
    event_hash,
    parse_stored_payload,
    verify_chain,
)
from fedpact.audit.events import EventType, LedgerError, validate_payload

APPEND_ATTEMPTS = 5
"""How many times an append that lost a race to another appender is retried before giving up."""

_BEGIN_MODE_OPTION = "fedpact_ledger_begin"
_VERIFY_BATCH_ROWS = 1000

metadata = MetaData()

ledger_events = Table(
    "ledger_events",
    metadata,
    Column("seq", Integer, primary_key=True, autoincrement=False),
    Column("event_id", Text, nullable=False, unique=True),
    Column("timestamp", Text, nullable=False),
    Column("event_type", Text, nullable=False),
    Column("actor", Text, nullable=False),
    Column("job_id", Text, nullable=True, index=True),
    Column("payload", Text, nullable=False),
    Column("prev_hash", Text, nullable=False),
    Column("hash", Text, nullable=False),
)

_SQLITE_APPEND_ONLY_TRIGGERS = tuple(
    DDL(
        f"CREATE TRIGGER IF NOT EXISTS ledger_events_no_{action.lower()} "
        f"BEFORE {action} ON ledger_events "
        f"BEGIN SELECT RAISE(ABORT, 'ledger_events is append-only: {action} refused'); END"
    )
    for action in ("UPDATE", "DELETE")
)


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


def _is_lock_contention(exc: OperationalError) -> bool:
    """True when the database refused the write only because another writer held the lock."""
    message = str(exc.orig).lower()
    return "locked" in message or "busy" in message


def _install_sqlite_transaction_control(engine: Engine, *, wal: bool) -> None:
    """Make SQLAlchemy, not pysqlite, emit BEGIN, so appends can start with BEGIN IMMEDIATE."""

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _connection_record: Any) -> None:
        dbapi_connection.isolation_level = None  # stop pysqlite's own implicit BEGIN
        cursor = dbapi_connection.cursor()
        try:
            if wal:
                cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA synchronous=FULL")
        finally:
            cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(connection: Connection) -> None:
        mode = connection.get_execution_options().get(_BEGIN_MODE_OPTION, "DEFERRED")
        connection.exec_driver_sql(f"BEGIN {mode}")


def _row_to_event(row: Any) -> LedgerEvent:
    """Build a LedgerEvent from a `ledger_events` row, raising LedgerError on a corrupt payload."""
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


class Ledger:
    """Append-only, hash-chained audit log of a federated-learning service, stored via SQLAlchemy.

    Safe for concurrent appenders in several threads or processes sharing one SQLite file.
    """

    def __init__(self, url: str | URL, *, busy_timeout_s: float = 30.0) -> None:
        try:
            self._url = make_url(url)
        except ArgumentError as exc:
            raise LedgerError(f"invalid ledger database URL {url!r}: {exc}") from None
        self._closed = False
        is_sqlite = self._url.get_backend_name() == "sqlite"
        in_memory = is_sqlite and self._url.database in (None, "", ":memory:")
        engine_options: dict[str, Any] = {}
        if is_sqlite:
            connect_args: dict[str, Any] = {"timeout": busy_timeout_s}
            if in_memory:  # one shared connection, so every thread sees the same database
                connect_args["check_same_thread"] = False
                engine_options["poolclass"] = StaticPool
            engine_options["connect_args"] = connect_args
        try:
            self._engine = create_engine(self._url, **engine_options)
        except (ArgumentError, ImportError) as exc:
            raise LedgerError(f"cannot use ledger database {self._display_url}: {exc}") from None
        if is_sqlite:
            _install_sqlite_transaction_control(self._engine, wal=not in_memory)
        self._is_sqlite = is_sqlite
        # A single shared in-memory connection cannot hold two transactions: serialise its users.
        self._connection_guard: contextlib.AbstractContextManager[Any] = (
            threading.RLock() if in_memory else contextlib.nullcontext()
        )
        try:
            self._create_schema()
        except SQLAlchemyError as exc:
            self._engine.dispose()
            raise LedgerError(
                f"cannot open ledger database {self._display_url}: {getattr(exc, 'orig', exc)}"
            ) from exc

    @classmethod
    def open(cls, path: str | os.PathLike[str]) -> Ledger:
        """Open (or create) a SQLite ledger file at `path`, creating missing parent directories."""
        db_path = Path(path).expanduser().absolute()
        if db_path.is_dir():
            raise LedgerError(f"cannot open ledger {db_path}: it is a directory, not a file")
        try:
            db_path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise LedgerError(
                f"cannot create the directory for ledger {db_path}: {exc.strerror or exc}"
            ) from None
        return cls(URL.create("sqlite", database=str(db_path)))

    @property
    def _display_url(self) -> str:
        return self._url.render_as_string(hide_password=True)

    def __repr__(self) -> str:
        state = "closed" if self._closed else "open"
        return f"Ledger({self._display_url!r}, {state})"

    def close(self) -> None:
        """Release the database connections; the ledger cannot be used afterwards."""
        if not self._closed:
            self._closed = True
            self._engine.dispose()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    @contextlib.contextmanager
    def _connect(self, *, write: bool = False) -> Iterator[Connection]:
        """Yield a connection in a transaction; a write transaction takes the write lock at BEGIN."""
        if self._closed:
            raise LedgerError("the ledger is closed")
        with self._connection_guard, self._engine.connect() as connection:
            if write:
                connection.execution_options(**{_BEGIN_MODE_OPTION: "IMMEDIATE"})
            with connection.begin():
                yield connection

    def _create_schema(self) -> None:
        """Create the table, its indexes and (on SQLite) append-only triggers if they are missing."""
        with self._connect(write=True) as connection:
            connection.execute(CreateTable(ledger_events, if_not_exists=True))
            for index in ledger_events.indexes:
                connection.execute(CreateIndex(index, if_not_exists=True))
            if self._is_sqlite:
                for trigger in _SQLITE_APPEND_ONLY_TRIGGERS:
                    connection.execute(trigger)

    @staticmethod
    def _chain_tip(connection: Connection) -> tuple[int, str]:
        """Return (seq, hash) of the newest event, or (0, GENESIS_HASH) for an empty ledger."""
        row = connection.execute(
            select(ledger_events.c.seq, ledger_events.c.hash)
            .order_by(ledger_events.c.seq.desc())
            .limit(1)
        ).first()
        return (0, GENESIS_HASH) if row is None else (row.seq, row.hash)

    def append(
        self,
        event_type: EventType | str,
        payload: dict[str, Any],
        *,
        actor: str,
        job_id: str | None = None,
    ) -> LedgerEvent:
        """Validate, chain and durably record one event; return it as stored."""
        kind = EventType.parse(event_type)
        validate_payload(kind, payload)
        if not isinstance(actor, str) or not actor:
            raise LedgerError("actor must be a non-empty string naming who performed the action")
        if job_id is not None and (not isinstance(job_id, str) or not job_id):
            raise LedgerError("job_id must be a non-empty string or None")
        payload_text = canonical_json(payload, label="payload").decode("utf-8")

        last_error: SQLAlchemyError | None = None
        for attempt in range(1, APPEND_ATTEMPTS + 1):
            try:
                return self._append_once(kind, payload_text, actor=actor, job_id=job_id)
            except IntegrityError as exc:  # another appender took this seq first
                last_error = exc
            except OperationalError as exc:
                if not _is_lock_contention(exc):
                    raise LedgerError(f"could not append {kind.value} event: {exc.orig}") from exc
                last_error = exc
            time.sleep(random.uniform(0.0, 0.05 * attempt))
        raise LedgerError(
            f"could not append {kind.value} event after {APPEND_ATTEMPTS} attempts: "
            f"concurrent appenders kept winning the race ({getattr(last_error, 'orig', last_error)})"
        )

    def _append_once(
        self, kind: EventType, payload_text: str, *, actor: str, job_id: str | None
    ) -> LedgerEvent:
        """Read the chain tip and insert the next event in one write transaction."""
        with self._connect(write=True) as connection:
            last_seq, last_hash = self._chain_tip(connection)
            seq, timestamp, payload = last_seq + 1, _utc_timestamp(), json.loads(payload_text)
            new_event = LedgerEvent(
                seq=seq,
                event_id=uuid.uuid4().hex,
                timestamp=timestamp,
                event_type=kind.value,
                actor=actor,
                job_id=job_id,
                payload=payload,
                prev_hash=last_hash,
                hash=event_hash(last_hash, seq, timestamp, kind.value, actor, job_id, payload),
            )
            row = dataclasses.asdict(new_event) | {"payload": payload_text}
            connection.execute(insert(ledger_events).values(**row))
        return new_event

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

    def verify(self) -> ChainVerification:
        """Re-check the whole hash chain from a consistent snapshot, streaming rows in seq order."""
        query = select(
            ledger_events.c.seq,
            ledger_events.c.timestamp,
            ledger_events.c.event_type,
            ledger_events.c.actor,
            ledger_events.c.job_id,
            ledger_events.c.payload,
            ledger_events.c.prev_hash,
            ledger_events.c.hash,
        ).order_by(ledger_events.c.seq)
        with self._connect() as connection:
            rows = connection.execution_options(yield_per=_VERIFY_BATCH_ROWS).execute(query)
            try:
                return verify_chain(rows)
            finally:
                rows.close()

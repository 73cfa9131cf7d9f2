"""Where the ledger keeps its rows: one storage interface, with SQLite and PostgreSQL drivers.

The tables (created and upgraded by the alembic migrations in `audit/migrations/`):

- `ledger_events` — the hash chain, append-only (triggers refuse UPDATE and DELETE);
- `merkle_nodes` — perfect subtree hashes (level, index) of the Merkle tree over event hashes,
  written when events are integrated into a checkpoint; append-only;
- `ledger_checkpoints` — signed tree heads (C2SP signed notes); append-only;
- `ledger_keys` — verifier keys that have signed checkpoints; `ledger_meta` — the log's identity;
- `event_index`, `consent_state` — indexes derived from events in the same transaction that
  appends them (queries by subject, partner, dataset, purpose, channel; current consent);
- `writer_macs` — one HMAC-SHA-256 tag per event (by seq) under the writer key kept beside the
  ledger (never in the database): who wrote each event; append-only (a tag left behind by an
  event removed outside fedpact is replaced when that seq is written again);
- `subject_keys`, `job_subjects` — wrapped per-subject data keys (crypto-shredding) and which
  subjects' rows each job used. These two are not part of the chain: erasure destroys keys here.

`ledger_meta` also records from which seq event ids are bound to their records
(`ids_bound_from`, revision 0003; earlier events keep the random ids they were written with) and
how subject ids are normalised before pseudonymisation (`subject_id_rule`).

Drivers differ only in how a writer takes the log's write lock, how append-only is enforced and
the SQL that rebuilds an event's hashed bytes for fast verification.
"""

from __future__ import annotations

import contextlib
import mmap
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import (
    URL,
    Column,
    Connection,
    Engine,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    PrimaryKeyConstraint,
    Table,
    Text,
    create_engine,
    event,
    inspect,
    text,
)
from sqlalchemy.exc import ArgumentError, SQLAlchemyError
from sqlalchemy.pool import StaticPool

from fedpact.audit.events import LedgerError
from fedpact.audit.normalise import DEFAULT_ID_RULE, LEGACY_ID_RULE

__all__ = ["DEFAULT_ID_RULE", "LEGACY_ID_RULE"]  # re-exported for the migrations

SCHEMA_HEAD = "0003"
"""The alembic revision this code expects; older databases are upgraded on open."""

_BEGIN_MODE_OPTION = "fedpact_ledger_begin"
_PG_WRITE_LOCK = 0x66656470  # "fedp": the advisory lock every PostgreSQL appender takes

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
    Index("ix_ledger_events_type_seq", "event_type", "seq"),
    Index("ix_ledger_events_timestamp", "timestamp"),
)

ledger_meta = Table(
    "ledger_meta", metadata, Column("key", Text, primary_key=True), Column("value", Text)
)

merkle_nodes = Table(
    "merkle_nodes",
    metadata,
    Column("level", Integer, nullable=False),
    Column("idx", Integer, nullable=False),
    Column("hash", LargeBinary, nullable=False),
    PrimaryKeyConstraint("level", "idx"),
    sqlite_with_rowid=False,
)

ledger_checkpoints = Table(
    "ledger_checkpoints",
    metadata,
    Column("tree_size", Integer, primary_key=True, autoincrement=False),
    Column("root_hash", Text, nullable=False),
    Column("timestamp", Text, nullable=False),
    Column("key_name", Text, nullable=False),
    Column("note", Text, nullable=False),
)

ledger_keys = Table(
    "ledger_keys",
    metadata,
    Column("key_id", Text, primary_key=True),
    Column("name", Text, nullable=False),
    Column("vkey", Text, nullable=False),
    Column("added", Text, nullable=False),
)

event_index = Table(
    "event_index",
    metadata,
    Column("kind", Text, nullable=False),
    Column("value", Text, nullable=False),
    Column("seq", Integer, nullable=False),
    PrimaryKeyConstraint("kind", "value", "seq"),
    sqlite_with_rowid=False,
)

consent_state = Table(
    "consent_state",
    metadata,
    Column("subject", Text, nullable=False),
    Column("purpose", Text, nullable=False),
    Column("status", Text, nullable=False),
    Column("channel", Text),
    Column("legal_basis", Text),
    Column("notice_version", Text),
    Column("source", Text),
    Column("effective_at", Text, nullable=False),
    Column("expires_at", Text),
    Column("seq", Integer, nullable=False),
    PrimaryKeyConstraint("subject", "purpose"),
    Index("ix_consent_state_purpose_status", "purpose", "status"),
)

subject_keys = Table(
    "subject_keys",
    metadata,
    Column("subject", Text, nullable=False),
    Column("key_id", Text, nullable=False),
    Column("retention_class", Text, nullable=False),
    Column("period", Text, nullable=False),
    Column("wrapped", LargeBinary, nullable=True),
    Column("created", Text, nullable=False),
    Column("destroyed_at", Text, nullable=True),
    Column("destroyed_why", Text, nullable=True),
    PrimaryKeyConstraint("subject", "key_id"),
    Index("ix_subject_keys_class_period", "retention_class", "period"),
)

job_subjects = Table(
    "job_subjects",
    metadata,
    Column("subject", Text, nullable=False),
    Column("job_id", Text, nullable=False),
    Column("dataset", Text, nullable=False),
    PrimaryKeyConstraint("subject", "job_id", "dataset"),
    sqlite_with_rowid=False,
)

writer_macs = Table(
    "writer_macs",
    metadata,
    Column("seq", Integer, primary_key=True, autoincrement=False),
    Column("mac", LargeBinary, nullable=False),
)

APPEND_ONLY_TABLES = ("ledger_events", "merkle_nodes", "ledger_checkpoints", "writer_macs")

IDS_BOUND_FROM = "ids_bound_from"
"""ledger_meta key: the first seq whose event id is derived from its record (revision 0003)."""
SUBJECT_ID_RULE = "subject_id_rule"
"""ledger_meta key: how subject ids are normalised before they are pseudonymised."""

_TYPES_OK_SQLITE = (
    "typeof(e.actor) = 'text' AND typeof(e.event_type) = 'text' AND typeof(e.timestamp) = 'text' "
    "AND typeof(e.payload) = 'text' AND typeof(e.prev_hash) = 'text' AND typeof(e.hash) = 'text' "
    "AND typeof(e.event_id) = 'text' AND typeof(e.job_id) IN ('text', 'null')"
)


@dataclass(frozen=True)
class Purge:
    """Whether destroyed key bytes are gone from the database files, and if not, why."""

    complete: bool
    detail: str = ""


PURGE_SCAN_LIMIT = 64
"""At most this many destroyed wrapped keys are searched for, byte for byte, in the files."""


def is_lock_contention(exc: BaseException) -> bool:
    """True when the database refused the write only because another writer held the lock."""
    message = str(getattr(exc, "orig", exc)).lower()
    return "locked" in message or "busy" in message


class LedgerStore:
    """The storage interface the ledger uses; `SQLiteStore` and `PostgresStore` implement it.

    A store hands out connections inside transactions (`write()` takes the log's single write
    lock at BEGIN, so appenders in any process serialise), and knows its dialect's SQL for the
    few things that differ. Everything else is portable SQLAlchemy Core in the ledger.
    """

    placeholder = "%s"  # the DBAPI paramstyle marker of bulk_insert

    dialect = "generic"

    def __init__(self, url: URL, engine: Engine, *, read_only: bool = False) -> None:
        self.url = url
        self.engine = engine
        self.closed = False
        self.read_only = read_only
        self._guard: contextlib.AbstractContextManager[Any] = contextlib.nullcontext()

    @property
    def display_url(self) -> str:
        return self.url.render_as_string(hide_password=True)

    @property
    def database_path(self) -> Path | None:
        """The file holding the database, when there is one (SQLite on disk)."""
        return None

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.engine.dispose()

    @contextlib.contextmanager
    def read(self, *, snapshot: bool = False) -> Iterator[Connection]:
        """A connection in a read transaction. SQLite (WAL) reads one snapshot per transaction;
        PostgreSQL does so with `snapshot=True` (REPEATABLE READ), for several statements that
        must see the same database (a proof and the rows it proves)."""
        if self.closed:
            raise LedgerError("the ledger is closed")
        with self._guard, self.engine.connect() as connection:
            if snapshot and self.dialect == "postgresql":
                connection.execution_options(isolation_level="REPEATABLE READ")
            with connection.begin():
                yield connection

    @contextlib.contextmanager
    def write(self) -> Iterator[Connection]:
        """A connection in a write transaction holding the log's write lock from its first statement."""
        if self.closed:
            raise LedgerError("the ledger is closed")
        if self.read_only:
            raise LedgerError(
                f"ledger {self.display_url} is open read-only: this command may not change it"
            )
        with self._guard, self.engine.connect() as connection:
            self._prepare_write(connection)
            with connection.begin():
                self._lock_for_write(connection)
                yield connection

    def _prepare_write(self, connection: Connection) -> None:
        """Hook run before BEGIN (SQLite picks BEGIN IMMEDIATE here)."""

    def _lock_for_write(self, connection: Connection) -> None:
        """Hook run as the first statement of a write transaction."""

    def record_bytes_sql(self) -> str:
        """SQL selecting seq, prev_hash, hash and the event's canonical record text, from `:after`."""
        raise NotImplementedError

    def verify_rows_sql(self, *, bounded: bool = False) -> str:
        """SQL selecting, from `seq > ?` (and `<= ?` when `bounded`) in seq order: seq, prev_hash,
        hash, the canonical record text (NULL when a column holds a value of the wrong type),
        event_id, timestamp and the event's writer MAC (NULL without one)."""
        raise NotImplementedError

    def install_append_only_guards(
        self, connection: Connection, tables: Sequence[str] = APPEND_ONLY_TABLES
    ) -> None:
        raise NotImplementedError

    def insert_ignore(self, connection: Connection, table: Table, rows: Sequence[dict]) -> None:
        """Insert rows, skipping any whose primary key already exists."""
        raise NotImplementedError

    def raw_cursor(self, connection: Connection) -> Any:
        """A DBAPI cursor on this connection that streams a large result (verification)."""
        return connection.connection.driver_connection.cursor()

    def bulk_insert(
        self, connection: Connection, table: str, columns: Sequence[str], rows: Sequence[tuple]
    ) -> None:
        """Insert many rows in the current transaction (executemany; PostgreSQL uses COPY)."""
        if rows:
            marks = ", ".join([self.placeholder] * len(columns))
            connection.exec_driver_sql(
                f"INSERT INTO {table} ({', '.join(columns)}) VALUES ({marks})", list(rows)
            )

    def paramstyle_named(self, sql: str) -> str:
        """Turn `:name` parameters into this driver's DBAPI paramstyle."""
        return sql

    def after_erasure(self, residue: Sequence[bytes] = (), *, timeout_s: float = 30.0) -> Purge:
        """Make destroyed key bytes (`residue`: the wrapped keys just destroyed) unrecoverable
        from the database files, retrying for up to `timeout_s`; say whether that succeeded."""
        return Purge(True)


def _json_quote_sqlite(column: str) -> str:
    return f"json_quote({column})"


class SQLiteStore(LedgerStore):
    """The embedded default: one file in WAL mode, synchronous=FULL, secure_delete on."""

    placeholder = "?"

    dialect = "sqlite"

    def __init__(self, url: URL, *, busy_timeout_s: float, read_only: bool = False) -> None:
        in_memory = url.database in (None, "", ":memory:")
        connect_args: dict[str, Any] = {"timeout": busy_timeout_s}
        options: dict[str, Any] = {}
        if in_memory:  # one shared connection, so every thread sees the same database
            connect_args["check_same_thread"] = False
            options["poolclass"] = StaticPool
        try:
            engine = create_engine(url, connect_args=connect_args, **options)
        except (ArgumentError, ImportError) as exc:
            raise LedgerError(f"cannot use ledger database {url}: {exc}") from None
        super().__init__(url, engine, read_only=read_only)
        self.in_memory = in_memory
        self.busy_timeout_s = busy_timeout_s
        # read-only: no journal-mode change (a write) and PRAGMA query_only, so that nothing that
        # reaches the file through this store, even by a path that skips the checks, can write
        _install_sqlite_transaction_control(
            engine, wal=not in_memory and not read_only, query_only=read_only
        )
        # A single shared in-memory connection cannot hold two transactions: serialise its users.
        if in_memory:
            self._guard = threading.RLock()

    @property
    def database_path(self) -> Path | None:
        return None if self.in_memory else Path(str(self.url.database))

    def _prepare_write(self, connection: Connection) -> None:
        connection.execution_options(**{_BEGIN_MODE_OPTION: "IMMEDIATE"})

    @property
    def guard(self) -> contextlib.AbstractContextManager[Any]:
        """Held around any use of the raw writer (serialises the shared in-memory connection)."""
        return self._guard

    def open_writer(self) -> tuple[sqlite3.Connection, Callable[[], None]]:
        """A raw sqlite3 connection for the ledger's appends and checkpoints, and how to close it.

        The append path bypasses SQLAlchemy: it runs BEGIN IMMEDIATE ... COMMIT itself, in WAL
        mode with synchronous=FULL like every other connection. Any thread may use it (the ledger
        serialises them). An in-memory database has one connection, which this borrows.
        """
        if self.in_memory:
            fairy = self.engine.raw_connection()
            return fairy.driver_connection, fairy.close
        connection = sqlite3.connect(
            str(self.url.database), timeout=self.busy_timeout_s, isolation_level=None,
            check_same_thread=False, cached_statements=64,
        )
        for pragma in ("journal_mode=WAL", "synchronous=FULL", "secure_delete=ON",
                       "foreign_keys=ON", "cache_size=-65536"):
            connection.execute(f"PRAGMA {pragma}")
        return connection, connection.close

    def record_bytes_sql(self) -> str:
        q = _json_quote_sqlite
        return (
            "SELECT seq, prev_hash, hash, "
            f"""'{{"actor":' || {q('actor')} || ',"event_type":' || {q('event_type')} || """
            f"""',"job_id":' || {q('job_id')} || ',"payload":' || payload || """
            f"""',"prev_hash":' || {q('prev_hash')} || ',"seq":' || seq || """
            f"""',"timestamp":' || {q('timestamp')} || '}}' """
            "FROM ledger_events WHERE seq > ? ORDER BY seq"
        )

    def verify_rows_sql(self, *, bounded: bool = False) -> str:
        def q(column: str) -> str:
            return f"json_quote(e.{column})"

        upper = " AND e.seq <= ?" if bounded else ""
        return (
            "SELECT e.seq, e.prev_hash, e.hash, "
            f"CASE WHEN {_TYPES_OK_SQLITE} THEN "
            f"""'{{"actor":' || {q('actor')} || ',"event_type":' || {q('event_type')} || """
            f"""',"job_id":' || {q('job_id')} || ',"payload":' || e.payload || """
            f"""',"prev_hash":' || {q('prev_hash')} || ',"seq":' || e.seq || """
            f"""',"timestamp":' || {q('timestamp')} || '}}' END, """
            "e.event_id, e.timestamp, m.mac "
            "FROM ledger_events e LEFT JOIN writer_macs m ON m.seq = e.seq "
            f"WHERE e.seq > ?{upper} ORDER BY e.seq"
        )

    def install_append_only_guards(
        self, connection: Connection, tables: Sequence[str] = APPEND_ONLY_TABLES
    ) -> None:
        for table in tables:
            for action in ("UPDATE", "DELETE"):
                connection.exec_driver_sql(
                    f"CREATE TRIGGER IF NOT EXISTS {table}_no_{action.lower()} "
                    f"BEFORE {action} ON {table} "
                    f"BEGIN SELECT RAISE(ABORT, '{table} is append-only: {action} refused'); END"
                )

    def insert_ignore(self, connection: Connection, table: Table, rows: Sequence[dict]) -> None:
        if rows:
            connection.execute(table.insert().prefix_with("OR IGNORE"), list(rows))

    def paramstyle_named(self, sql: str) -> str:
        return sql  # pysqlite accepts :name

    def after_erasure(self, residue: Sequence[bytes] = (), *, timeout_s: float = 30.0) -> Purge:
        """Checkpoint the WAL into the file and truncate it (secure_delete has zeroed the old row
        in the pages written), retrying while another connection's read transaction pins the
        WAL, then search the file and the WAL for the destroyed wrapped keys themselves.

        The busy result of `wal_checkpoint(TRUNCATE)` is never ignored: if a reader outlives
        `timeout_s`, the result says the bytes may remain, and why."""
        if self.in_memory:
            return Purge(True)
        path = Path(str(self.url.database))
        deadline = time.monotonic() + max(0.0, timeout_s)
        connection = sqlite3.connect(str(path), timeout=max(0.01, min(1.0, timeout_s)),
                                     isolation_level=None)
        try:
            while True:
                try:
                    busy, frames, done = connection.execute(
                        "PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
                except sqlite3.OperationalError as exc:  # locked by a writer: retry
                    busy, frames, done = 1, 0, 0
                    reason = str(exc)
                else:
                    reason = "another connection holds a read transaction on the file"
                if not busy and frames == done:
                    break
                if time.monotonic() >= deadline:
                    return Purge(False, (
                        f"{reason} ({path.name}-wal: {frames} frames, {done} checkpointed): the "
                        f"WAL could not be checkpointed and truncated within {timeout_s:g} s, so "
                        f"the destroyed wrapped key bytes may remain in {path.name} or "
                        f"{path.name}-wal; end long-running readers, then run `fedpact audit "
                        "dsar purge`"))
                time.sleep(0.05)
        finally:
            connection.close()
        found = _find_bytes([path, path.with_name(path.name + "-wal")], residue[:PURGE_SCAN_LIMIT])
        if found:
            return Purge(False, (
                f"{len(found)} destroyed wrapped key(s) are still in {', '.join(sorted(found))} "
                "after the WAL was checkpointed (a connection without secure_delete?): run "
                "`VACUUM` on the file, then `fedpact audit dsar purge`"))
        return Purge(True)


def _find_bytes(paths: Sequence[Path], blobs: Sequence[bytes]) -> set[str]:
    """Names of the files among `paths` holding any of `blobs`."""
    found: set[str] = set()
    for path in paths:
        if not blobs or not path.exists() or path.stat().st_size == 0:
            continue
        with open(path, "rb") as handle, mmap.mmap(handle.fileno(), 0,
                                                   access=mmap.ACCESS_READ) as mapped:
            if any(mapped.find(blob) >= 0 for blob in blobs):
                found.add(path.name)
    return found


def _install_sqlite_transaction_control(
    engine: Engine, *, wal: bool, query_only: bool = False
) -> None:
    """Make SQLAlchemy, not pysqlite, emit BEGIN, so appends can start with BEGIN IMMEDIATE."""

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _connection_record: Any) -> None:
        dbapi_connection.isolation_level = None  # stop pysqlite's own implicit BEGIN
        cursor = dbapi_connection.cursor()
        try:
            if wal:
                cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA synchronous=FULL")
            cursor.execute("PRAGMA secure_delete=ON")
            cursor.execute("PRAGMA foreign_keys=ON")
            if query_only:
                cursor.execute("PRAGMA query_only=ON")
        finally:
            cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(connection: Connection) -> None:
        mode = connection.get_execution_options().get(_BEGIN_MODE_OPTION, "DEFERRED")
        connection.exec_driver_sql(f"BEGIN {mode}")


class PostgresStore(LedgerStore):
    """PostgreSQL (psycopg 3): appenders serialise on a transaction-scoped advisory lock."""

    dialect = "postgresql"

    def __init__(self, url: URL, *, read_only: bool = False) -> None:
        if url.drivername in ("postgresql", "postgres"):
            url = url.set(drivername="postgresql+psycopg")
        connect_args = {"options": "-c default_transaction_read_only=on"} if read_only else {}
        try:
            engine = create_engine(url, pool_pre_ping=True, connect_args=connect_args)
        except (ArgumentError, ImportError) as exc:
            raise LedgerError(
                f"cannot use ledger database {url.render_as_string(hide_password=True)}: {exc} "
                "(PostgreSQL needs the psycopg package: pip install 'psycopg[binary]')"
            ) from None
        super().__init__(url, engine, read_only=read_only)

    def _lock_for_write(self, connection: Connection) -> None:
        connection.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": _PG_WRITE_LOCK})

    def record_bytes_sql(self) -> str:
        def q(column: str) -> str:
            return f"coalesce(to_json({column})::text, 'null')"

        return (
            "SELECT seq, prev_hash, hash, "
            f"""'{{"actor":' || {q('actor')} || ',"event_type":' || {q('event_type')} || """
            f"""',"job_id":' || {q('job_id')} || ',"payload":' || payload || """
            f"""',"prev_hash":' || {q('prev_hash')} || ',"seq":' || seq::text || """
            f"""',"timestamp":' || {q('timestamp')} || '}}' """
            "FROM ledger_events WHERE seq > %s ORDER BY seq"
        )

    def verify_rows_sql(self, *, bounded: bool = False) -> str:
        def q(column: str) -> str:
            return f"coalesce(to_json(e.{column})::text, 'null')"

        upper = " AND e.seq <= %s" if bounded else ""
        return (
            "SELECT e.seq, e.prev_hash, e.hash, "
            f"""'{{"actor":' || {q('actor')} || ',"event_type":' || {q('event_type')} || """
            f"""',"job_id":' || {q('job_id')} || ',"payload":' || e.payload || """
            f"""',"prev_hash":' || {q('prev_hash')} || ',"seq":' || e.seq::text || """
            f"""',"timestamp":' || {q('timestamp')} || '}}', """
            "e.event_id, e.timestamp, m.mac "
            "FROM ledger_events e LEFT JOIN writer_macs m ON m.seq = e.seq "
            f"WHERE e.seq > %s{upper} ORDER BY e.seq"
        )

    def raw_cursor(self, connection: Connection) -> Any:
        import uuid

        return connection.connection.driver_connection.cursor(name=f"verify_{uuid.uuid4().hex}")

    def bulk_insert(
        self, connection: Connection, table: str, columns: Sequence[str], rows: Sequence[tuple]
    ) -> None:
        if not rows:
            return
        cursor = connection.connection.driver_connection.cursor()
        try:
            with cursor.copy(f"COPY {table} ({', '.join(columns)}) FROM STDIN") as copy:
                for row in rows:
                    copy.write_row(row)
        finally:
            cursor.close()

    def install_append_only_guards(
        self, connection: Connection, tables: Sequence[str] = APPEND_ONLY_TABLES
    ) -> None:
        connection.exec_driver_sql(
            "CREATE OR REPLACE FUNCTION fedpact_append_only() RETURNS trigger AS $$ BEGIN "
            "RAISE EXCEPTION '%% is append-only: %% refused', TG_TABLE_NAME, TG_OP; END; "
            "$$ LANGUAGE plpgsql"
        )
        for table in tables:
            connection.exec_driver_sql(f"DROP TRIGGER IF EXISTS {table}_append_only ON {table}")
            connection.exec_driver_sql(
                f"CREATE TRIGGER {table}_append_only BEFORE UPDATE OR DELETE OR TRUNCATE "
                f"ON {table} FOR EACH STATEMENT EXECUTE FUNCTION fedpact_append_only()"
            )

    def insert_ignore(self, connection: Connection, table: Table, rows: Sequence[dict]) -> None:
        if rows:
            from sqlalchemy.dialects.postgresql import insert as pg_insert

            connection.execute(pg_insert(table).on_conflict_do_nothing(), list(rows))

    def paramstyle_named(self, sql: str) -> str:
        import re

        return re.sub(r":(\w+)", r"%(\1)s", sql)

    def after_erasure(self, residue: Sequence[bytes] = (), *, timeout_s: float = 30.0) -> Purge:
        """Rewrite `subject_keys` (VACUUM FULL) so the old row versions holding the destroyed
        wrapped keys leave the table's data files; PostgreSQL keeps them there until then."""
        try:
            with self.engine.connect() as connection:
                connection.execution_options(isolation_level="AUTOCOMMIT")
                connection.exec_driver_sql(f"SET lock_timeout = {max(1, int(timeout_s * 1000))}")
                connection.exec_driver_sql("VACUUM FULL subject_keys")
        except SQLAlchemyError as exc:
            reason = str(getattr(exc, "orig", exc)).splitlines()[0]
            return Purge(False, (
                f"VACUUM FULL subject_keys did not run ({reason}): PostgreSQL keeps the old row "
                "versions, with the destroyed wrapped key bytes, in the table's data files until "
                "it is rewritten; run `fedpact audit dsar purge` when no transaction holds it"))
        return Purge(True)


def open_store(url: URL, *, busy_timeout_s: float = 30.0, read_only: bool = False) -> LedgerStore:
    """Pick the driver for `url`: sqlite:///path (default) or postgresql://user@host/db.

    `read_only`: every connection refuses writes (SQLite `PRAGMA query_only`, PostgreSQL
    `default_transaction_read_only`) and `write()` raises LedgerError.
    """
    backend = url.get_backend_name()
    if backend == "sqlite":
        return SQLiteStore(url, busy_timeout_s=busy_timeout_s, read_only=read_only)
    if backend in ("postgresql", "postgres"):
        return PostgresStore(url, read_only=read_only)
    raise LedgerError(
        f"unsupported ledger database {url.render_as_string(hide_password=True)}: "
        "use sqlite:///path/to/ledger.db or postgresql://user@host/dbname"
    )


INDEXES_PENDING = "indexes_pending"
"""ledger_meta key present from an upgrade until the Ledger has derived the query indexes."""


def migrate(store: LedgerStore) -> str | None:
    """Bring the schema to SCHEMA_HEAD with alembic, under the write lock (safe with many openers).

    Returns the revision the database was at before an upgrade ("" for a pre-alembic ledger,
    None when nothing was upgraded: already at head, or just created).
    """
    if _schema_version(store) == SCHEMA_HEAD:
        return None
    with store.write() as connection:
        if not inspect(connection).has_table("ledger_events"):
            # A new database: create the head schema directly and stamp it (alembic's documented
            # create_all + stamp), instead of replaying each revision.
            metadata.create_all(connection)
            store.install_append_only_guards(connection)
            connection.exec_driver_sql(
                "CREATE TABLE alembic_version (version_num VARCHAR(32) NOT NULL "
                "CONSTRAINT alembic_version_pkc PRIMARY KEY)"
            )
            connection.exec_driver_sql(
                f"INSERT INTO alembic_version (version_num) VALUES ('{SCHEMA_HEAD}')"
            )
            connection.execute(ledger_meta.insert(), [
                {"key": "ledger_id", "value": uuid.uuid4().hex},
                {"key": IDS_BOUND_FROM, "value": "1"},
                {"key": SUBJECT_ID_RULE, "value": DEFAULT_ID_RULE},
            ])
            return None
        before = _schema_version_in(connection)
        if before == SCHEMA_HEAD:  # another opener upgraded it meanwhile
            return None
        upgrade_with_alembic(store, connection)
        # In the upgrade's own transaction: the indexes that revisions before 0002 lacked are
        # derived from the chain by the Ledger, retried on every open until it succeeds.
        store.insert_ignore(connection, ledger_meta,
                            [{"key": INDEXES_PENDING, "value": before or ""}])
        return before or ""


def check_schema(store: LedgerStore) -> None:
    """Raise LedgerError unless the database is a ledger at SCHEMA_HEAD (read-only opening)."""
    version = _schema_version(store)
    if version == SCHEMA_HEAD:
        return
    with store.read() as connection:
        has_events = inspect(connection).has_table("ledger_events")
    if not has_events:
        raise LedgerError(f"{store.display_url} is not a fedpact audit ledger (no ledger_events table)")
    raise LedgerError(
        f"ledger {store.display_url} has schema revision {version or 'older than 0001'}; this "
        f"fedpact reads {SCHEMA_HEAD}: open it once read-write (e.g. `fedpact audit checkpoint`) "
        "to upgrade it"
    )


def upgrade_with_alembic(store: LedgerStore, connection: Connection) -> None:
    """Run `alembic upgrade head` on `connection` (inside the caller's write transaction)."""
    from alembic import command
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(Path(__file__).parent / "migrations"))
    config.attributes["connection"] = connection
    config.attributes["store"] = store
    command.upgrade(config, "head")


def _schema_version(store: LedgerStore) -> str | None:
    try:
        with store.read() as connection:
            return connection.exec_driver_sql("SELECT version_num FROM alembic_version").scalar()
    except SQLAlchemyError:
        return None


def _schema_version_in(connection: Connection) -> str | None:
    if not inspect(connection).has_table("alembic_version"):
        return None
    return connection.exec_driver_sql("SELECT version_num FROM alembic_version").scalar()

"""Test helper: edit a SQLite ledger file the way an attacker with database access would."""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any


def tamper(db: Path, sql: str, params: tuple[Any, ...] = ()) -> None:
    """Drop every append-only guard trigger, then run `sql` on the file and commit."""
    connection = sqlite3.connect(db)
    try:
        for (name,) in connection.execute(
            "SELECT name FROM sqlite_master WHERE type='trigger'"
        ).fetchall():
            connection.execute(f"DROP TRIGGER {name}")
        connection.execute(sql, params)
        connection.commit()
    finally:
        connection.close()


def write_legacy_ledger(
    path: Path,
    events: list[tuple[str, str, str | None, dict[str, Any]]],
    *,
    rewrite_payload_of: int | None = None,
) -> None:
    """A ledger file as fedpact wrote it before migration 0001: one `ledger_events` table, no
    alembic. `events` are (event_type, actor, job_id, payload); with `rewrite_payload_of=SEQ`
    that event's payload is altered after hashing (a broken chain)."""
    from fedpact.audit.chain import canonical_json, event_hash

    connection = sqlite3.connect(path)
    try:
        connection.execute(
            "CREATE TABLE ledger_events (seq INTEGER NOT NULL PRIMARY KEY, event_id TEXT NOT NULL "
            "UNIQUE, timestamp TEXT NOT NULL, event_type TEXT NOT NULL, actor TEXT NOT NULL, "
            "job_id TEXT, payload TEXT NOT NULL, prev_hash TEXT NOT NULL, hash TEXT NOT NULL)"
        )
        prev = "0" * 64
        for seq, (kind, actor, job_id, payload) in enumerate(events, start=1):
            stamp = f"2024-01-{seq:02d}T00:00:00.000000+00:00"
            digest = event_hash(prev, seq, stamp, kind, actor, job_id, payload)
            stored = {**payload, "altered": True} if seq == rewrite_payload_of else payload
            connection.execute(
                "INSERT INTO ledger_events VALUES (?,?,?,?,?,?,?,?,?)",
                (seq, f"e{seq}", stamp, kind, actor, job_id, canonical_json(stored).decode(),
                 prev, digest),
            )
            prev = digest
        connection.commit()
    finally:
        connection.close()


def pg_tamper(url: str, sql: str, params: tuple[Any, ...] = ()) -> None:
    """Run `sql` on a PostgreSQL ledger as a superuser with the append-only triggers off."""
    import psycopg

    with psycopg.connect(url, autocommit=True) as connection:
        connection.execute("SET session_replication_role = replica")
        connection.execute(sql, params)

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

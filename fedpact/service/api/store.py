"""The service's own state, in `HOME/service.db` (SQLite via SQLAlchemy), never in the ledger.

People and machine identities, their role grants, API tokens (only a digest is stored), console
sessions, job requests with each partner's decision, per-round metrics and logs, the model
registry's index, and the consortium's registered partner datasets (their public layouts). Everything a regulator needs to see about these is *also* written to the audit
ledger (requests, decisions, runs, deliveries, accounts, tokens, sign-ins); this database is the
working copy the service reads and updates.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sqlalchemy import (
    Boolean,
    Column,
    Float,
    ForeignKey,
    Integer,
    MetaData,
    PrimaryKeyConstraint,
    String,
    Table,
    Text,
    UniqueConstraint,
    create_engine,
    event,
)
from sqlalchemy.engine import Engine

metadata = MetaData()

users = Table(
    "users", metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("username", String(64), unique=True, nullable=False),
    Column("kind", String(16), nullable=False),  # person | machine
    Column("password_hash", Text, nullable=True),
    Column("totp_secret", Text, nullable=True),  # AES-GCM sealed with HOME/service.key
    Column("totp_last_step", Integer, nullable=False, default=0),
    Column("failed_logins", Integer, nullable=False, default=0),
    Column("locked_until", Float, nullable=True),
    Column("disabled", Boolean, nullable=False, default=False),
    Column("created_at", Float, nullable=False),
)

grants = Table(
    "role_grants", metadata,
    Column("user_id", Integer, ForeignKey("users.id"), nullable=False),
    Column("role", String(32), nullable=False),
    Column("scope", String(200), nullable=False, default=""),
    Column("granted_by", String(64), nullable=False),
    Column("granted_at", Float, nullable=False),
    UniqueConstraint("user_id", "role", "scope"),
)

tokens = Table(
    "api_tokens", metadata,
    Column("token_id", String(32), primary_key=True),
    Column("user_id", Integer, ForeignKey("users.id"), nullable=False),
    Column("secret_sha256", String(64), nullable=False),
    Column("label", String(100), nullable=False, default=""),
    Column("created_at", Float, nullable=False),
    Column("expires_at", Float, nullable=False),
    Column("revoked_at", Float, nullable=True),
    Column("last_used_at", Float, nullable=True),
)

sessions = Table(
    "web_sessions", metadata,
    Column("session_sha256", String(64), primary_key=True),
    Column("user_id", Integer, ForeignKey("users.id"), nullable=False),
    Column("csrf", String(64), nullable=False),
    Column("created_at", Float, nullable=False),
    Column("last_seen", Float, nullable=False),
    Column("ended_at", Float, nullable=True),
)

job_requests = Table(
    "job_requests", metadata,
    Column("job_id", String(64), primary_key=True),
    Column("status", String(32), nullable=False),
    Column("config", Text, nullable=False),  # JobConfig.as_dict()
    Column("request", Text, nullable=False),  # what the data team asked for (JobRequestIn)
    Column("partners", Text, nullable=False),  # JSON list of partner dataset names
    Column("submitted_by", String(64), nullable=False),
    Column("model_name", String(64), nullable=False),
    Column("created_at", Float, nullable=False),
    Column("updated_at", Float, nullable=False),
    Column("started_at", Float, nullable=True),
    Column("finished_at", Float, nullable=True),
    Column("reason", Text, nullable=True),
    Column("result", Text, nullable=True),  # JobResult.to_dict()
    Column("model_version", Integer, nullable=True),
    Column("request_event_id", String(64), nullable=True),
)

decisions = Table(
    "job_decisions", metadata,
    Column("job_id", String(64), ForeignKey("job_requests.job_id"), nullable=False),
    Column("partner", String(200), nullable=False),
    Column("decision", String(16), nullable=False),  # approved | rejected | revoked
    Column("decided_by", String(64), nullable=False),
    Column("reason", Text, nullable=True),
    Column("decided_at", Float, nullable=False),
    Column("event_id", String(64), nullable=False),
    PrimaryKeyConstraint("job_id", "partner"),
)

job_rounds = Table(
    "job_rounds", metadata,
    Column("job_id", String(64), nullable=False),
    Column("round", Integer, nullable=False),
    Column("metrics", Text, nullable=False),
    PrimaryKeyConstraint("job_id", "round"),
)

job_logs = Table(
    "job_logs", metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("job_id", String(64), nullable=False, index=True),
    Column("at", Float, nullable=False),
    Column("level", String(8), nullable=False),
    Column("message", Text, nullable=False),
)

models = Table(
    "models", metadata,
    Column("name", String(64), nullable=False),
    Column("version", Integer, nullable=False),
    Column("job_id", String(64), nullable=False),
    Column("folder", Text, nullable=False),
    Column("card", Text, nullable=False),
    Column("card_sha256", String(64), nullable=False),
    Column("created_at", Float, nullable=False),
    Column("delivery_event_id", String(64), nullable=True),
    PrimaryKeyConstraint("name", "version"),
)

datasets = Table(
    "datasets", metadata,
    Column("name", String(100), primary_key=True),  # the partner dataset, e.g. north or telco-churn/dsl
    Column("dataset_group", String(64), nullable=False, index=True),  # the consortium's dataset
    Column("task", String(16), nullable=False),
    Column("label", String(200), nullable=False),
    Column("positive", Text, nullable=True),  # JSON list of the label values marking a positive row
    Column("purpose", String(64), nullable=False),
    Column("layout", Text, nullable=False),  # JSON: FeaturePipeline.public(spec).layout()
    Column("layout_sha256", String(64), nullable=False),
    Column("features", Integer, nullable=False),  # feature columns in the layout
    Column("registered_by", String(64), nullable=False),
    Column("registered_at", Float, nullable=False),
    Column("event_id", String(64), nullable=False),
)


def dumps(value: Any) -> str:
    """JSON for storage: NaN/inf become null so every stored document is valid JSON."""
    return json.dumps(_finite(value), default=str)


def _finite(value: Any) -> Any:
    if isinstance(value, float):
        return value if value == value and abs(value) != float("inf") else None
    if isinstance(value, dict):
        return {str(k): _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


class ServiceStore:
    """The engine over `HOME/service.db`, the clock the service uses, and one write lock."""

    def __init__(self, home: str | Path, *, clock: Callable[[], float] = time.time):
        self.home = Path(home)
        self.home.mkdir(parents=True, exist_ok=True)
        self.path = self.home / "service.db"
        self.clock = clock
        self.engine: Engine = create_engine(
            f"sqlite:///{self.path.resolve()}",
            connect_args={"check_same_thread": False, "timeout": 30},
            pool_size=20, max_overflow=40,
        )

        @event.listens_for(self.engine, "connect")
        def _pragmas(dbapi_connection, _record):  # pragma: no cover - trivial
            cur = dbapi_connection.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.execute("PRAGMA busy_timeout=30000")
            cur.close()

        metadata.create_all(self.engine)
        # SQLite has one writer at a time; serialising this process's writers avoids busy retries.
        self.write_lock = threading.RLock()

    def now(self) -> float:
        return float(self.clock())

    def close(self) -> None:
        self.engine.dispose()

"""Merkle tree, signed checkpoints, query indexes, consent state and per-subject keys.

Revision ID: 0002
Revises: 0001
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import context, op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index(
        "ix_ledger_events_type_seq", "ledger_events", ["event_type", "seq"], if_not_exists=True
    )
    op.create_index(
        "ix_ledger_events_timestamp", "ledger_events", ["timestamp"], if_not_exists=True
    )
    op.create_table(
        "ledger_meta",
        sa.Column("key", sa.Text, primary_key=True),
        sa.Column("value", sa.Text),
    )
    op.create_table(
        "merkle_nodes",
        sa.Column("level", sa.Integer, nullable=False),
        sa.Column("idx", sa.Integer, nullable=False),
        sa.Column("hash", sa.LargeBinary, nullable=False),
        sa.PrimaryKeyConstraint("level", "idx"),
        sqlite_with_rowid=False,
    )
    op.create_table(
        "ledger_checkpoints",
        sa.Column("tree_size", sa.Integer, primary_key=True, autoincrement=False),
        sa.Column("root_hash", sa.Text, nullable=False),
        sa.Column("timestamp", sa.Text, nullable=False),
        sa.Column("key_name", sa.Text, nullable=False),
        sa.Column("note", sa.Text, nullable=False),
    )
    op.create_table(
        "ledger_keys",
        sa.Column("key_id", sa.Text, primary_key=True),
        sa.Column("name", sa.Text, nullable=False),
        sa.Column("vkey", sa.Text, nullable=False),
        sa.Column("added", sa.Text, nullable=False),
    )
    op.create_table(
        "event_index",
        sa.Column("kind", sa.Text, nullable=False),
        sa.Column("value", sa.Text, nullable=False),
        sa.Column("seq", sa.Integer, nullable=False),
        sa.PrimaryKeyConstraint("kind", "value", "seq"),
        sqlite_with_rowid=False,
    )
    op.create_table(
        "consent_state",
        sa.Column("subject", sa.Text, nullable=False),
        sa.Column("purpose", sa.Text, nullable=False),
        sa.Column("status", sa.Text, nullable=False),
        sa.Column("channel", sa.Text),
        sa.Column("legal_basis", sa.Text),
        sa.Column("notice_version", sa.Text),
        sa.Column("source", sa.Text),
        sa.Column("effective_at", sa.Text, nullable=False),
        sa.Column("expires_at", sa.Text),
        sa.Column("seq", sa.Integer, nullable=False),
        sa.PrimaryKeyConstraint("subject", "purpose"),
    )
    op.create_index("ix_consent_state_purpose_status", "consent_state", ["purpose", "status"])
    op.create_table(
        "subject_keys",
        sa.Column("subject", sa.Text, nullable=False),
        sa.Column("key_id", sa.Text, nullable=False),
        sa.Column("retention_class", sa.Text, nullable=False),
        sa.Column("period", sa.Text, nullable=False),
        sa.Column("wrapped", sa.LargeBinary, nullable=True),
        sa.Column("created", sa.Text, nullable=False),
        sa.Column("destroyed_at", sa.Text, nullable=True),
        sa.Column("destroyed_why", sa.Text, nullable=True),
        sa.PrimaryKeyConstraint("subject", "key_id"),
    )
    op.create_index(
        "ix_subject_keys_class_period", "subject_keys", ["retention_class", "period"]
    )
    op.create_table(
        "job_subjects",
        sa.Column("subject", sa.Text, nullable=False),
        sa.Column("job_id", sa.Text, nullable=False),
        sa.Column("dataset", sa.Text, nullable=False),
        sa.PrimaryKeyConstraint("subject", "job_id", "dataset"),
        sqlite_with_rowid=False,
    )
    store = context.config.attributes.get("store")
    if store is not None:  # append-only triggers, in the dialect's own SQL
        store.install_append_only_guards(
            op.get_bind(), ("ledger_events", "merkle_nodes", "ledger_checkpoints"))


def downgrade() -> None:
    raise RuntimeError("the audit ledger is append-only: its schema is never downgraded")

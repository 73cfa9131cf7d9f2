"""Writer authentication and bound event ids (issue #15).

- `writer_macs`: one HMAC-SHA-256 tag (128 bits) per event (by seq), under the writer key kept beside the
  ledger (`<ledger>.writer-key`, never in the database); append-only.
- `ledger_meta.ids_bound_from`: events from this seq on carry an id derived from their record
  (`chain.event_id_for`), so an id cannot be renamed or swapped without it showing. Events already
  in the ledger keep their random ids and verify under the old rule.
- `ledger_meta.subject_id_rule`: a ledger that already pseudonymised subjects keeps the rule its
  pseudonyms were made with (they are in the chain); one that did not gets the new default.

Revision ID: 0003
Revises: 0002
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import context, op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    from fedpact.audit.store import (
        DEFAULT_ID_RULE,
        IDS_BOUND_FROM,
        LEGACY_ID_RULE,
        SUBJECT_ID_RULE,
    )

    op.create_table(
        "writer_macs",
        sa.Column("seq", sa.Integer, primary_key=True, autoincrement=False),
        sa.Column("mac", sa.LargeBinary, nullable=False),
    )
    bind = op.get_bind()
    tip = int(bind.exec_driver_sql("SELECT coalesce(max(seq), 0) FROM ledger_events").scalar())
    pseudonymised = bind.exec_driver_sql(
        "SELECT 1 FROM ledger_events WHERE payload LIKE '%\"subject\":\"ps\\_%' ESCAPE '\\' "
        "UNION ALL SELECT 1 FROM subject_keys LIMIT 1"
    ).first() is not None
    meta = sa.table("ledger_meta", sa.column("key", sa.Text), sa.column("value", sa.Text))
    present = set(bind.execute(sa.select(meta.c.key)).scalars())
    rows = [{"key": IDS_BOUND_FROM, "value": str(tip + 1)},
            {"key": SUBJECT_ID_RULE, "value": LEGACY_ID_RULE if pseudonymised else DEFAULT_ID_RULE}]
    op.bulk_insert(meta, [row for row in rows if row["key"] not in present])
    store = context.config.attributes.get("store")
    if store is not None:  # append-only triggers for the new table, in the dialect's own SQL
        store.install_append_only_guards(bind, ("writer_macs",))


def downgrade() -> None:
    raise RuntimeError("the audit ledger is append-only: its schema is never downgraded")

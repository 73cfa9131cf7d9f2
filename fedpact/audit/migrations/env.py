"""Alembic environment of the audit ledger: runs on the connection the ledger hands over.

The ledger calls `alembic upgrade head` itself when it opens a database (see `store.migrate`),
inside its write transaction, so concurrent openers upgrade once. To run by hand:
`alembic -x url=sqlite:///path/ledger.db -c /dev/null upgrade head` is not needed; open the ledger.
"""

from __future__ import annotations

from alembic import context

connection = context.config.attributes.get("connection")
if connection is None:  # pragma: no cover - only reached when alembic is run from its own CLI
    from sqlalchemy import create_engine

    url = context.get_x_argument(as_dictionary=True).get("url")
    if not url:
        raise SystemExit("pass the ledger database as: alembic -x url=sqlite:///ledger.db upgrade head")
    with create_engine(url).begin() as own_connection:
        context.configure(connection=own_connection, transactional_ddl=True)
        with context.begin_transaction():
            context.run_migrations()
else:
    context.configure(connection=connection, transactional_ddl=True)
    with context.begin_transaction():
        context.run_migrations()

"""Alembic's environment: the connection ``service.database.engine.upgrade`` passes, in its
transaction (batch mode: SQLite alters a table by copying it)."""

from alembic import context

connection = context.config.attributes["connection"]
context.configure(connection=connection, render_as_batch=True)
with context.begin_transaction():
    context.run_migrations()

"""Alembic's environment: the connection ``infra.schema`` passes in (holding the migration
lock), or offline (``--sql``) the configured database's dialect."""

from __future__ import annotations

from alembic import context

from infra.schema import VERSION_TABLE

config = context.config
if context.is_offline_mode():
    context.configure(url=config.get_main_option("sqlalchemy.url"), literal_binds=True,
                      version_table=VERSION_TABLE)
else:
    connection = config.attributes["connection"]
    context.configure(connection=connection, version_table=VERSION_TABLE,
                      render_as_batch=connection.dialect.name == "sqlite")
with context.begin_transaction():
    context.run_migrations()

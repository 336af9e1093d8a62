"""Alembic schema migrations of the tables that cannot be rebuilt from the event log
(``infra/schema.py`` runs them)."""

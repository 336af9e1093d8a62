"""The tables that cannot be rebuilt from the log, as create_all made them before migrations.

Revision ID: 0001
Revises:
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import context, op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

TZ = sa.DateTime(timezone=True)


def _create(existing: set[str], name: str, *columns: sa.Column) -> bool:
    """Create the table unless a create_all era database already has it (adoption)."""
    if name in existing:
        return False
    op.create_table(name, *columns)
    return True


def upgrade() -> None:
    existing = set() if context.is_offline_mode() else set(
        sa.inspect(op.get_bind()).get_table_names())
    _create(
        existing, "accounts",
        sa.Column("id", sa.Uuid, primary_key=True),
        sa.Column("username", sa.String(100), nullable=False, unique=True),
        sa.Column("kind", sa.String(10), nullable=False),
        sa.Column("roles", sa.JSON, nullable=False),
        sa.Column("password_hash", sa.String(200)),
        sa.Column("created_at", TZ, nullable=False),
        sa.Column("created_by", sa.String(120), nullable=False),
        sa.Column("disabled_at", TZ),
        sa.Column("disabled_by", sa.String(120)),
        sa.Column("tokens_valid_after", TZ))
    _create(
        existing, "service_tokens",
        sa.Column("id", sa.String(40), primary_key=True),
        sa.Column("account_id", sa.Uuid, nullable=False, index=True),
        sa.Column("name", sa.String(100), nullable=False),
        sa.Column("created_at", TZ, nullable=False),
        sa.Column("created_by", sa.String(120), nullable=False),
        sa.Column("expires_at", TZ),
        sa.Column("revoked_at", TZ),
        sa.Column("revoked_by", sa.String(120)))
    _create(
        existing, "audit_chain",
        sa.Column("position", sa.BigInteger, primary_key=True, autoincrement=False),
        sa.Column("event_hash", sa.String(64), nullable=False),
        sa.Column("link", sa.String(64), nullable=False),
        sa.Column("chained_at", TZ, nullable=False))
    _create(
        existing, "kafka_relay_positions",
        sa.Column("name", sa.String(200), primary_key=True),
        sa.Column("position", sa.BigInteger, nullable=False),
        sa.Column("updated_at", TZ, nullable=False))

    _create(
        existing, "kafka_relay_watermarks",
        sa.Column("name", sa.String(200), primary_key=True),
        sa.Column("position", sa.BigInteger, primary_key=True, autoincrement=False),
        sa.Column("partition_ends", sa.Text, nullable=False),
        sa.Column("recorded_at", TZ, nullable=False))
    _create(
        existing, "kafka_relay_verification",
        sa.Column("name", sa.String(200), primary_key=True),
        sa.Column("partition_tails", sa.Text, nullable=False),
        sa.Column("verified_position", sa.BigInteger, nullable=False),
        sa.Column("verified_at", TZ),
        sa.Column("data_losses", sa.BigInteger, nullable=False),
        sa.Column("last_loss", sa.Text))
    _create(
        existing, "kafka_consumer_offsets",
        sa.Column("group_id", sa.String(200), primary_key=True),
        sa.Column("topic", sa.String(255), primary_key=True),
        sa.Column("partition", sa.Integer, primary_key=True, autoincrement=False),
        sa.Column("next_offset", sa.BigInteger, nullable=False),
        sa.Column("member", sa.String(255), nullable=False),
        sa.Column("updated_at", TZ, nullable=False))
    _create(
        existing, "projection_positions",
        sa.Column("name", sa.String(100), primary_key=True),
        sa.Column("position", sa.BigInteger, nullable=False),
        sa.Column("generation", sa.String(40), nullable=False),
        sa.Column("updated_at", TZ, nullable=False))
    if not _create(
        existing, "request_audit",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer, "sqlite"), primary_key=True,
                  autoincrement=True),
        sa.Column("at", TZ, nullable=False),
        sa.Column("principal", sa.String(120)),
        sa.Column("method", sa.String(10), nullable=False),
        sa.Column("route", sa.String(300), nullable=False),
        sa.Column("path", sa.String(1000), nullable=False),
        sa.Column("resource_id", sa.String(200)),
        sa.Column("client", sa.String(100)),
        sa.Column("status", sa.Integer, nullable=False),
        sa.Column("duration_ms", sa.Float, nullable=False),
        sa.Column("command_id", sa.String(200))):
        return
    op.create_index("ix_request_audit_at", "request_audit", ["at"])
    op.create_index("ix_request_audit_principal", "request_audit", ["principal", "at"])
    op.create_index("ix_request_audit_command", "request_audit", ["command_id"])


def downgrade() -> None:
    for name in ("request_audit", "projection_positions", "kafka_consumer_offsets",
                 "kafka_relay_verification", "kafka_relay_watermarks",
                 "kafka_relay_positions", "audit_chain", "service_tokens", "accounts"):
        op.drop_table(name)

"""A user's e-mail address, given at registration (nullable: accounts made before have none).

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
    if not context.is_offline_mode() and "email" in {
            c["name"] for c in sa.inspect(op.get_bind()).get_columns("accounts")}:
        return  # made by this release's create_all before the database was adopted
    with op.batch_alter_table("accounts") as batch:
        batch.add_column(sa.Column("email", sa.String(320), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("accounts") as batch:
        batch.drop_column("email")

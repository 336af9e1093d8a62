"""Where the Kafka relay records what it sent (positions, watermarks) and what it proved is
still in Kafka (verification); the Kafka projectors read the watermarks."""

from __future__ import annotations

from sqlalchemy import BigInteger, Column, DateTime, MetaData, String, Table, Text


def build_relay_positions(md: MetaData | None = None) -> Table:
    """The last log position each relay has published (and flushed, acks=all)."""
    return Table(
        "kafka_relay_positions", md or MetaData(),
        Column("name", String(200), primary_key=True),
        Column("position", BigInteger, nullable=False),
        Column("updated_at", DateTime(timezone=True), nullable=False),
    )


def build_relay_watermarks(md: MetaData | None = None) -> Table:
    """After each flushed batch: the batch's last log position and, for every partition the
    relay has written to, the offset after its last acknowledged record (JSON
    ``{"<topic>:<partition>": next_offset}``). A consumer that has consumed up to those offsets
    has seen every event at or below the position: Kafka projectors derive the position up to
    which the read models are complete from it."""
    return Table(
        "kafka_relay_watermarks", md or MetaData(),
        Column("name", String(200), primary_key=True),
        Column("position", BigInteger, primary_key=True),
        Column("partition_ends", Text, nullable=False),
        Column("recorded_at", DateTime(timezone=True), nullable=False),
    )


def build_relay_verification(md: MetaData | None = None) -> Table:
    """What the relay has proven about Kafka: per partition, the log position of the record
    just below its recorded end (the record it reads back), the position last verified, and
    the broker data losses it has detected."""
    return Table(
        "kafka_relay_verification", md or MetaData(),
        Column("name", String(200), primary_key=True),
        Column("partition_tails", Text, nullable=False),  # {"<topic>:<partition>": position}
        Column("verified_position", BigInteger, nullable=False),
        Column("verified_at", DateTime(timezone=True)),
        Column("data_losses", BigInteger, nullable=False),
        Column("last_loss", Text),  # JSON: when, what was found, where the relay went back to
    )


#: Watermarks the relay keeps when no Kafka projector prunes them (one per flushed batch).
WATERMARKS_KEPT = 10_000

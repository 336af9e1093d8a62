"""Pure domain model of observatory operations: aggregates, events and their rules.

Nothing here performs I/O; the only framework import is the ``eventsourcing`` aggregate base.
"""

"""Adapters: the event store, the local command journal, the read-model database, settings."""

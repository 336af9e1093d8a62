"""Smart queries: read models merged with commands that are accepted but not yet projected."""

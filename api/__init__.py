"""Entry points: the HTTP API (FastAPI) and the ``obsledger`` command line."""

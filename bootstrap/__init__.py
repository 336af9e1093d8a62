"""The composition root: builds the journal, the event store, the dispatcher, the projector,
the queries and the workers from the settings (``bootstrap.ledger.Ledger``), and their
coordination across API processes (``bootstrap.scaleout``). The HTTP API and the CLI only
call it."""

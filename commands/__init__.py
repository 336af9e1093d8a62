"""Critical commands: validation, pre-generated ids, the journal and the dispatcher."""

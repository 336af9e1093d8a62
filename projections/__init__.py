"""Read models built from the event log, exactly once, rebuildable at any time."""

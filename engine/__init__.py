"""thermosweep: engine."""

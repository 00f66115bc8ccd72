"""thermosweep: analysis."""

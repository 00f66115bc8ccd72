"""thermosweep: trainables."""

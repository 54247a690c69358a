"""shoal.adapt (being written)."""

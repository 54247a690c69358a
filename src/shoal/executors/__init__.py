"""shoal.executors (being written)."""

"""shoal.tasks (being written)."""

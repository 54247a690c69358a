"""shoal.ops (being written)."""

"""shoal.merge (being written)."""

"""shoal.search (being written)."""

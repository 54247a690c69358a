"""shoal.checkpoint (being written)."""

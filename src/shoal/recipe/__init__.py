"""shoal.recipe (being written)."""

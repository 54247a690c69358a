"""shoal.report (being written)."""

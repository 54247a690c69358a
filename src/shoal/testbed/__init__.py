"""shoal.testbed (being written)."""

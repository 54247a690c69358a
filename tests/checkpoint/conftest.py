"""Shared fixtures for the checkpoint tests."""

from __future__ import annotations

import os

# never reach a model hub from these tests
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

"""Test-wide settings: offline, no analytics, 2 threads, and shared fixtures."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def shipped():
    """The shipped tiny DiT pipeline (loaded once per test session; read-only)."""
    from ditlab import api

    return api.load("shipped")

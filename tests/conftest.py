"""Fixtures every test directory shares: a real Redis server (``tests/redisd.py``), and the
schema audit of every rules document a test loads (``tests/schema_audit.py``)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from redisd import RedisServer
from schema_audit import audit_loader


@pytest.fixture(autouse=True, scope="session")
def _rules_validate_against_schema() -> Iterator[None]:
    """Every rules document the suite loads without problems validates against the JSON
    Schema generated from the loader's model (see tests/schema_audit.py)."""
    with audit_loader():
        yield


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    """A fresh ``redis-server`` on 127.0.0.1, stopped after the test."""
    server = RedisServer(tmp_path / "redis").start()
    yield server
    server.stop()

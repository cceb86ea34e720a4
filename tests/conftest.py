"""Fixtures every test directory shares: a real Redis server (``tests/redisd.py``)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from redisd import RedisServer


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    """A fresh ``redis-server`` on 127.0.0.1, stopped after the test."""
    server = RedisServer(tmp_path / "redis").start()
    yield server
    server.stop()

"""Fixtures for end-to-end tests; the pieces themselves are in ``harness.py``."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import trustme

from fleetgate.cli import ca_init
from fleetgate.policy.loader import PolicyError, load_policy
from harness import Gateway, Upstream, write_rules


@pytest.fixture(scope="session")
def upstream_ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture(scope="session")
def upstream_ca_file(upstream_ca: trustme.CA, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("upstream-ca") / "ca.pem"
    upstream_ca.cert_pem.write_to_path(str(path))
    return path


@pytest.fixture(scope="session")
def confdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One gateway CA for the whole session (generating RSA keys is slow)."""
    path = tmp_path_factory.mktemp("confdir")
    ca_init(path, quiet=True)
    return path


@pytest.fixture
def upstream(upstream_ca: trustme.CA) -> Iterator[Upstream]:
    up = Upstream(upstream_ca)
    yield up
    up.stop()


@pytest.fixture
def plain_upstream() -> Iterator[Upstream]:
    up = Upstream(None)
    yield up
    up.stop()


GatewayFactory = Callable[..., Gateway]


@pytest.fixture
def make_gateway(tmp_path: Path, confdir: Path, upstream_ca_file: Path) -> Iterator[GatewayFactory]:
    started: list[Gateway] = []

    def make(rules: Path, start: bool = True, tool: str = "mitmdump", **options: str) -> Gateway:
        workdir = tmp_path / f"gw{len(started)}"
        workdir.mkdir()
        gw = Gateway(rules=rules, workdir=workdir, confdir=confdir,
                     upstream_ca=upstream_ca_file, options=options, tool=tool)
        started.append(gw)
        with contextlib.suppress(PolicyError):  # in-process: the schema audit sees them
            load_policy(rules)
        return gw.start() if start else gw

    yield make
    for gw in started:
        gw.stop()


@pytest.fixture
def rules_file(tmp_path: Path, upstream: Upstream) -> Path:
    return write_rules(tmp_path / "rules.yaml", [upstream.port])


@pytest.fixture
def gateway(make_gateway: GatewayFactory, rules_file: Path) -> Gateway:
    return make_gateway(rules_file)

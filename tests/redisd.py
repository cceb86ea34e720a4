"""A real ``redis-server`` for tests: started on 127.0.0.1 on a free port, stopped by the test.

The suite needs the OS package (``scripts/need-redis.sh`` installs it; ``make test`` runs it).
:class:`RedisServer` can be stopped, paused (SIGSTOP: a Redis that hangs) and started again on
the same port with the same data (append-only file, fsync always), which is how the fault
tests take the shared state away and give it back.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import ssl
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

__all__ = ["RedisServer", "Tls", "redis_binary"]


def redis_binary() -> str:
    exe = shutil.which("redis-server") or shutil.which("valkey-server")
    if exe is None:
        pytest.fail("redis-server is not installed: run scripts/need-redis.sh (make test does), "
                    "or apt-get install redis-server")
    return exe


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass(frozen=True)
class Tls:
    """The server's certificate and key (PEM files) and the CA clients verify it with."""

    cert: Path
    key: Path
    ca: Path


class RedisServer:
    def __init__(self, workdir: Path, password: str | None = None, tls: Tls | None = None) -> None:
        self.workdir = workdir
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = _free_port()
        self.password = password
        self.tls = tls  # TLS only (no plain port): rediss://
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        if self.tls is not None:
            return f"rediss://{auth}localhost:{self.port}/0?ssl_ca_certs={self.tls.ca}"
        return f"redis://{auth}127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 10.0) -> RedisServer:
        ports = ["--port", str(self.port)] if self.tls is None else [
            "--port", "0", "--tls-port", str(self.port), "--tls-cert-file", str(self.tls.cert),
            "--tls-key-file", str(self.tls.key), "--tls-ca-cert-file", str(self.tls.ca),
            "--tls-auth-clients", "no"]
        argv = [redis_binary(), *ports, "--bind", "127.0.0.1",
                "--dir", str(self.workdir), "--save", "", "--appendonly", "yes",
                "--appendfsync", "always", "--daemonize", "no", "--loglevel", "warning",
                "--logfile", str(self.workdir / "redis.log")]
        if self.password:
            argv += ["--requirepass", self.password]
        self.proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                     start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                log = (self.workdir / "redis.log").read_text(errors="replace")
                raise RuntimeError(f"redis-server exited {self.proc.returncode}:\n{log}")
            if self._pong():
                return self
            time.sleep(0.02)
        self.stop()
        raise RuntimeError("redis-server did not answer PING")

    def _pong(self) -> bool:
        try:
            with self._connect() as s:
                if self.password:
                    s.sendall(f"AUTH {self.password}\r\n".encode())
                    s.recv(64)
                s.sendall(b"PING\r\n")
                return s.recv(64).startswith(b"+PONG")
        except OSError:
            return False

    def _connect(self) -> socket.socket:
        raw = socket.create_connection(("127.0.0.1", self.port), timeout=0.5)
        if self.tls is None:
            return raw
        ctx = ssl.create_default_context(cafile=str(self.tls.ca))
        return ctx.wrap_socket(raw, server_hostname="localhost")

    def pause(self) -> None:
        """SIGSTOP: Redis accepts connections in the kernel but never answers (a hang)."""
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGSTOP)

    def resume(self) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGCONT)

    def stop(self) -> None:
        """Stop it (refused connections until :meth:`start`); the data stays on disk."""
        if self.proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.proc.pid, signal.SIGCONT)
            self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
        self.proc = None

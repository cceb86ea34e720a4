"""Where the secrets of ``credentials:`` routes are read from: files and the environment.

:class:`SecretSource` reads a route's secret: a file is re-read only when its inode, mtime or
size changes (a Kubernetes Secret's atomic symlink swap changes the inode), an environment
variable each time. It is the I/O half of :mod:`fleetgate.policy.credentials` (which stays
pure): a secret that is missing, empty, too large or not one line raises
:class:`~fleetgate.policy.credentials.CredentialUnavailable`.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Mapping
from typing import Protocol

from fleetgate.policy.credentials import (
    CONTROL,
    MAX_SECRET_BYTES,
    CredentialRoute,
    CredentialUnavailable,
    Secret,
)

__all__ = ["SecretSource", "SecretStore"]


class SecretStore(Protocol):
    def read(self, route: CredentialRoute) -> Secret: ...


class SecretSource:
    """Reads the secrets of credential routes. Files are cached by path and re-read when
    ``(inode, mtime_ns, size)`` changes, so a rotated Secret is used from the next request;
    a file that disappears stops working at once (its cached value is dropped). Environment
    variables (``environ``, default ``os.environ``) are read on every call.
    """

    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        self._environ: Mapping[str, str] = os.environ if environ is None else environ
        self._files: dict[str, tuple[tuple[int, int, int], Secret]] = {}

    def __repr__(self) -> str:
        return f"SecretSource(files={sorted(self._files)!r})"

    def read(self, route: CredentialRoute) -> Secret:
        """The route's secret, stripped of surrounding whitespace, or
        :class:`CredentialUnavailable` saying what is wrong."""
        if route.secret_env is not None:
            value = self._environ.get(route.secret_env)
            if value is None:
                raise CredentialUnavailable(route.id, f"{route.origin} is not set in the "
                                            "gateway's environment; set it and restart the gateway")
            return _checked(route, value)
        if route.secret_file is None:
            raise CredentialUnavailable(route.id, "the route names no secret")
        return self._file(route, route.secret_file)

    def _file(self, route: CredentialRoute, path: str) -> Secret:
        try:
            st = os.stat(path)  # follows symlinks: a ConfigMap/Secret swap changes the inode
            if not stat.S_ISREG(st.st_mode):
                raise CredentialUnavailable(route.id, f"{route.origin} is not a regular file; "
                                            "point secretFile at the file holding the secret")
            key = (st.st_ino, st.st_mtime_ns, st.st_size)
            cached = self._files.get(path)
            if cached is not None and cached[0] == key:
                return cached[1]
            if st.st_size > MAX_SECRET_BYTES:
                raise CredentialUnavailable(route.id, f"{route.origin} is larger than "
                                            f"{MAX_SECRET_BYTES} bytes; is secretFile the right file?")
            with open(path, "rb") as f:
                st = os.fstat(f.fileno())
                data = f.read(MAX_SECRET_BYTES + 1)
            if len(data) > MAX_SECRET_BYTES:
                raise CredentialUnavailable(route.id, f"{route.origin} is larger than "
                                            f"{MAX_SECRET_BYTES} bytes; is secretFile the right file?")
            try:
                text = data.decode("utf-8")
            except UnicodeDecodeError:
                raise CredentialUnavailable(route.id, f"{route.origin} is not UTF-8 text") from None
            secret = _checked(route, text)
        except FileNotFoundError:
            self._files.pop(path, None)
            raise CredentialUnavailable(route.id, f"{route.origin} does not exist; create it "
                                        "(or mount the Secret there) or fix secretFile") from None
        except OSError as exc:
            self._files.pop(path, None)
            raise CredentialUnavailable(route.id, f"{route.origin} cannot be read "
                                        f"({exc.strerror or exc}); check its permissions") from None
        except CredentialUnavailable:
            self._files.pop(path, None)
            raise
        self._files[path] = ((st.st_ino, st.st_mtime_ns, st.st_size), secret)
        return secret


def _checked(route: CredentialRoute, value: str) -> Secret:
    text = value.strip()
    if not text:
        raise CredentialUnavailable(route.id, f"{route.origin} is empty; put the secret in it")
    if CONTROL.search(text):
        raise CredentialUnavailable(route.id, f"{route.origin} holds more than one line or a "
                                    "control character; it must hold the secret alone")
    return Secret(text)

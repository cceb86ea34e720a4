"""One exception tree: every exception class fleetgate defines derives from ``FleetgateError``,
and ``fleetgate/errors.py`` documents each one in its tree.

The classes are found by importing every module of the installed package and collecting the
exception classes each defines, so a new ``class X(Exception)`` anywhere fails here until it
takes its place in the tree (and in the docstring that draws it).
"""

from __future__ import annotations

import functools
import importlib
import pkgutil
import re

import pytest

import fleetgate
from fleetgate import errors
from fleetgate.errors import ConfigError, FleetgateError, RequestError, StateError


def _modules() -> list[str]:
    # fleetgate/script/ is no package: it is the file mitmproxy runs (``addons = pipeline()``)
    return sorted(m.name for m in pkgutil.walk_packages(fleetgate.__path__, "fleetgate."))


@functools.cache
def _defined_exceptions() -> dict[str, type[BaseException]]:
    """Every exception class defined (not merely imported) in a fleetgate module, by qualified name.

    A module that cannot be imported fails the test that asked: its classes cannot be checked.
    """
    found: dict[str, type[BaseException]] = {}
    for name in _modules():
        module = importlib.import_module(name)
        for value in vars(module).values():
            if isinstance(value, type) and issubclass(value, BaseException) and value.__module__ == name:
                found[f"{name}.{value.__qualname__}"] = value
    return found


def _documented() -> dict[str, str | None]:
    """The tree drawn in errors.py's docstring: class name -> its parent's name (None: the root)."""
    doc = errors.__doc__ or ""
    parents: dict[str, str | None] = {}
    stack: list[tuple[int, str]] = []
    for line in doc.splitlines():
        m = re.match(r"^\s*(?:[│ ]*[├└]── )?([A-Z]\w+)(?:\s|$)", line)
        if not m or not ("──" in line or m.group(1) == "FleetgateError"):
            continue
        depth = len(line) - len(line.lstrip(" │├└─"))
        name = m.group(1)
        while stack and stack[-1][0] >= depth:
            stack.pop()
        parents[name] = stack[-1][1] if stack else None
        stack.append((depth, name))
    return parents


def test_the_walk_finds_the_exceptions_it_must() -> None:
    """Guards the walk itself: a walk that imported nothing would pass every check below."""
    names = {cls.__name__ for cls in _defined_exceptions().values()}
    assert {"FleetgateError", "PolicyError", "BodyError", "PathError", "IdentityError",
            "PersistError", "GraphError", "McpError", "SseError", "CelError"} <= names


def test_every_exception_derives_from_the_root() -> None:
    outside = {q: [b.__name__ for b in cls.__mro__[1:]] for q, cls in _defined_exceptions().items()
               if not issubclass(cls, FleetgateError)}
    assert outside == {}, ("these do not derive from FleetgateError: give each its place in the tree "
                           "of fleetgate/errors.py")


def test_every_exception_is_drawn_in_the_tree_under_its_parent() -> None:
    tree = _documented()
    wrong: dict[str, str] = {}
    for qualname, cls in _defined_exceptions().items():
        if cls.__name__ not in tree:
            wrong[qualname] = "missing from the tree in fleetgate/errors.py's docstring"
            continue
        # the drawn parent is the nearest fleetgate base (builtins beside it are not drawn)
        drawn = tree[cls.__name__]
        bases = [b.__name__ for b in cls.__bases__ if issubclass(b, FleetgateError)]
        if bases != ([drawn] if drawn else []):
            wrong[qualname] = f"drawn under {drawn}, derives from {bases}"
    assert wrong == {}


def test_the_tree_names_no_class_that_does_not_exist() -> None:
    names = {cls.__name__ for cls in _defined_exceptions().values()}
    assert set(_documented()) - names == set()


def test_builtin_bases_callers_catch_are_kept() -> None:
    """Joining the tree takes no base away: code that catches ValueError/RuntimeError still does."""
    by_name = {cls.__name__: cls for cls in _defined_exceptions().values()}
    assert issubclass(by_name["PathError"], ValueError) and issubclass(by_name["PathError"], RequestError)
    assert issubclass(by_name["GraphError"], ValueError)
    assert issubclass(by_name["PersistError"], RuntimeError)
    assert issubclass(by_name["PersistError"], StateError)
    assert issubclass(by_name["PolicyError"], ConfigError)
    for branch in ("BodyError", "McpError", "SseError"):
        assert issubclass(by_name[branch], RequestError)


def test_one_except_catches_a_raised_leaf() -> None:
    from fleetgate.bodies import BodyError
    from fleetgate.identity.tokens import IdentityError

    for exc in (BodyError(413, "too large"), IdentityError("token.expired", "expired")):
        with pytest.raises(FleetgateError) as caught:
            raise exc
        assert caught.value is exc

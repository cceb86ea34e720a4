"""fleetgate: the egress gateway that puts a fleet of AI agents on a leash.

Pure logic lives in :mod:`fleetgate.policy`, :mod:`fleetgate.identity` and
:mod:`fleetgate.celexpr` (no mitmproxy import); the mitmproxy addons are in
:mod:`fleetgate.addons`, assembled in order by :func:`fleetgate.addons.pipeline.pipeline`.
The script mitmproxy loads ships inside the package: :func:`script_path`.
"""

from __future__ import annotations

from importlib import metadata
from pathlib import Path

__all__ = ["__version__", "script_path"]


def _version() -> str:
    # pyproject.toml is the one place the version is written; an installed (or editable)
    # distribution carries it in its metadata. Imported from a bare source tree, nothing does.
    try:
        return metadata.version("fleetgate")
    except metadata.PackageNotFoundError:
        return "0+unknown"


__version__ = _version()


def script_path() -> Path:
    """The mitmproxy script of this installation: ``mitmdump -s "$(fleetgate script-path)"``.

    It is package data (``fleetgate/script/gateway.py``), so it is wherever the package is: a
    wheel in any virtualenv, the container image's venv, or this checkout. Its directory holds
    nothing else, because mitmproxy puts a script's directory first on ``sys.path``.
    """
    path = Path(__file__).resolve().parent / "script" / "gateway.py"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: the fleetgate package was installed without its mitmproxy "
                                "script (package data fleetgate/script/gateway.py)")
    return path

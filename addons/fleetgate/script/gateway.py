"""The file mitmproxy loads from an installed fleetgate: ``mitmdump -s "$(fleetgate script-path)"``.

It sits alone in a directory that is no import path anyone uses, because mitmproxy's script
loader puts the script's directory first on ``sys.path``, for good (12.3.1 "restores" the very
list it changed). In ``fleetgate/`` it would make ``fleetgate/mcp`` and ``fleetgate/limits``
importable as ``mcp`` and ``limits`` and shadow the libraries; here the only name it adds is
``gateway``. The loader runs it as ``__mitmproxy_script__.gateway`` without keeping it in
``sys.modules``, so another script called ``gateway.py`` (``addons/gateway.py``, an operator's
own) loads as a module of its own beside it.

One import and ``addons = pipeline()``, like ``addons/gateway.py`` in the repository: mitmproxy
re-runs only this file on change, and the chain and its order live in
:mod:`fleetgate.addons.pipeline`.
"""

from fleetgate.addons.pipeline import pipeline

addons = pipeline()

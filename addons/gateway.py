"""The file mitmproxy loads in a source checkout: ``mitmdump -s addons/gateway.py``.

The twin of ``fleetgate/script/gateway.py``, the copy an installed fleetgate ships
(``fleetgate script-path`` prints its path; ``fleetgate run`` and the container load that one).
Both are one import and ``addons = pipeline()``, nothing else: mitmproxy re-runs only this
file on change and breaks relative imports. The chain and its order live in
:mod:`fleetgate.addons.pipeline`. Loaded from here, ``addons/`` is first on ``sys.path``, so
this checkout's ``fleetgate`` is the one that runs.
"""

from fleetgate.addons.pipeline import pipeline

addons = pipeline()

"""The file mitmproxy loads: ``mitmdump -s addons/gateway.py`` (or ``mitmweb -s ...``).

Nothing else belongs here: mitmproxy re-runs only this file on change and breaks relative
imports. The chain and its order live in :mod:`fleetgate.addons.pipeline`.
"""

from fleetgate.addons.pipeline import pipeline

addons = pipeline()

"""fleetgate: the egress gateway that puts a fleet of AI agents on a leash.

Pure logic lives in :mod:`fleetgate.policy`, :mod:`fleetgate.identity` and
:mod:`fleetgate.celexpr` (no mitmproxy import); the mitmproxy addons are in
:mod:`fleetgate.addons`, assembled in order by :func:`fleetgate.addons.pipeline.pipeline`.
"""

__version__ = "0.1.0"

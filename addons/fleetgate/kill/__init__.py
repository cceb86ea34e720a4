"""The kill switch's pure core: who may act on whom (scopes), what they do (stop, pause,
throttle), the session graph that makes "kill the parent" reach the children, automatic
triggers, and the interface of the durable store (implemented in :mod:`fleetgate.stores.kill`).
No mitmproxy, no sqlite3 and no wall-clock read anywhere in this package: the clock is injected."""

"""Rate limits (token buckets) and budgets: pure arithmetic. No mitmproxy, no SQLite (spend is
kept by :mod:`fleetgate.stores.spend`), no clock (every time is passed in)."""

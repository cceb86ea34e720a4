"""Stores: where state that outlives a request is kept, each behind a small Protocol.

Services depend on the Protocol; the SQLite (and file) implementations live beside it, so a
shared engine (Redis) can be added behind the same interfaces.
"""

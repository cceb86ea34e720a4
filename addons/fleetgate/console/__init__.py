"""The operator console: HTML pages on the admin listener (``/console``) where an on-call
human signs in with their admin token, approves or denies held actions, and stops, pauses or
resumes agents and session families. Server-rendered, no JavaScript; every button is an
admin API action run as the signed-in operator."""

from fleetgate.console.app import Console

__all__ = ["Console"]

"""Runtime services: what the addons share, built once in ``pipeline()`` and handed to them.

Between the thin mitmproxy addons (``fleetgate.addons``) and the pure core (``fleetgate.policy``
and the domain packages): each service owns one job's state (kill decisions and live flows,
reservations, identities, HTTP listeners) so that no addon reads another addon's attributes.
"""

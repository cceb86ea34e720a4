"""Human approval of agent actions (seed 004's tiers): pure logic, no mitmproxy, no I/O.

``model``: tiers as the rules declare them and the life of one approval (pending, approved,
denied, consumed); ``operators``: who the humans are; ``action``: what an action is (its
digest, for matching a retry, and the summary a human reads before approving).
"""

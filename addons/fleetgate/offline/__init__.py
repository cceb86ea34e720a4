"""Offline policy evaluation: the gateway's decisions without the gateway.

``fleetgate rules test`` (test cases beside the policy) and ``fleetgate replay`` (recorded
flows against a new policy) both ask one question: what would the gateway decide for this
identity and this request? :mod:`fleetgate.offline.evaluate` answers it with the same pure
functions the addons call, in the chain's order; :mod:`fleetgate.offline.cases` reads and
runs test files; :mod:`fleetgate.offline.replay` compares verdicts. No mitmproxy here:
reading flow files belongs to the command line.
"""

"""The exception tree: every exception fleetgate defines derives from :class:`FleetgateError`.

One root, as httpx has one (``httpx.HTTPError``): a caller that must not let a gateway failure
escape catches ``FleetgateError``; one that handles a kind of failure catches its branch. The
classes that carry data (a stable ``code``, an HTTP ``status``, the loader's ``problems``) are
defined beside the code that raises them and hang from the branches here::

    FleetgateError
    ├── ConfigError                  the configuration cannot be used as it is
    │   ├── PolicyError              policy/loader.py: the rules cannot be loaded (``problems``)
    │   ├── CostError                celcost.py: a CEL expression's worst-case cost is over a limit
    │   ├── WorkersError             workers.py: ``--workers`` cannot run as asked (also a ValueError)
    │   ├── OperatorsError           approvals/operators.py: the operators file cannot be used
    │   ├── RequestSpecError         offline/evaluate.py: no request to judge (also a ValueError)
    │   └── CaseError                offline/cases.py: a test case cannot be run (also a ValueError)
    ├── RequestError                 a message in transit cannot be judged: answered, never relayed
    │   ├── BodyError                bodies.py: the body cannot be inspected (``status`` 400/413)
    │   ├── PathError                normalize.py: the path does not settle (also a ValueError)
    │   ├── McpError                 mcp/messages.py: an MCP body (JSON-RPC ``code``)
    │   ├── A2aError                 a2a/messages.py: an A2A JSON-RPC body (JSON-RPC ``code``)
    │   └── SseError                 mcp/sse.py: an event stream that cannot be re-framed
    ├── IdentityError                identity/tokens.py: credentials missing or invalid (``code``)
    ├── CredentialUnavailable        policy/credentials.py: a route's secret cannot be used now
    ├── CelError                     celexpr.py: a CEL expression failed to compile or evaluate
    │   ├── MissingField             celexpr.py: evaluation read a key that is not there
    │   └── TooSlow                  celexpr.py: an evaluation overran the runtime budget
    ├── DelegationError              kill/delegation.py: a delegation the kill switch refuses
    ├── ApprovalConflict             approvals/model.py: not in a state for this decision (also a ValueError)
    │   └── NotAllowed               approvals/model.py: this operator may not decide it
    ├── GraphError                   kill/graph.py: an edge the lineage graph refuses (also a ValueError)
    ├── StateError                   durable state cannot be read or written
    │   ├── PersistError             kill/core.py: in force, but not written (also a RuntimeError)
    │   ├── AuditUnavailable         runtime/audit.py: a decision line could not be written
    │   └── OwnerUnknown             runtime/mcp.py: an MCP session's owner cannot be read in Redis
    ├── StepFailed                   demo.py: an outcome ``fleetgate demo --check`` asserts did not happen
    └── NotFound                     what an admin view was asked about is not known here (404)

Where a class also derives from a builtin (``ValueError``, ``RuntimeError``) it is because callers
already catch it by that name; the tree adds a base, it takes none away. Whatever the branch, a
hook that meets one of these fails closed (``flowtools.fail_closed``): the tree is for callers
that handle errors, never a way to let a flow through.

This module is a base module: it imports nothing from fleetgate, so every layer can use it.
"""

from __future__ import annotations


class FleetgateError(Exception):
    """The root: every exception fleetgate defines derives from it."""


class ConfigError(FleetgateError):
    """The configuration (rules, options, files they name) cannot be used as it is."""


class RequestError(FleetgateError):
    """A request or response in transit cannot be judged; the gateway answers it, never relays it."""


class StateError(FleetgateError):
    """Durable state (the kill switch's store, spend, pins) cannot be read or written."""


class NotFound(FleetgateError, LookupError):
    """What an admin view was asked about (a session, a record) is not known here: the admin
    listener answers 404 with this message, which should say where else to look."""

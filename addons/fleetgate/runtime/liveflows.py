"""The live-flow registry: the flows being forwarded right now, and whose they are.

KillWatch registers a flow once every check let it through and forgets it when it finished
(answered, failed, websocket closed); a sweep cuts what is still in here. Each entry keeps
the subject the flow was registered for, so the kill service judges a flow without reading
its metadata. The flow object is opaque here (mitmproxy's ``HTTPFlow`` in the gateway).
"""

from __future__ import annotations

from dataclasses import dataclass

from fleetgate.kill.model import Subject

__all__ = ["LiveFlow", "LiveFlows"]


@dataclass(frozen=True, slots=True)
class LiveFlow[F]:
    id: str
    flow: F
    subject: Subject


class LiveFlows[F]:
    def __init__(self) -> None:
        self._flows: dict[str, LiveFlow[F]] = {}

    def add(self, flow_id: str, flow: F, subject: Subject) -> None:
        self._flows[flow_id] = LiveFlow(flow_id, flow, subject)

    def discard(self, flow_id: str) -> bool:
        """Forget a flow; whether it was registered (finished while live, not cut)."""
        return self._flows.pop(flow_id, None) is not None

    def snapshot(self) -> list[LiveFlow[F]]:
        """Every live flow, as a list a sweep can cut from while it walks."""
        return list(self._flows.values())

    def __contains__(self, flow_id: object) -> bool:
        return flow_id in self._flows

    def __len__(self) -> int:
        return len(self._flows)

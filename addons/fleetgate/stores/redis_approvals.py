"""The approval queue in Redis (``fleetgate_state=redis://…``): every replica sees one queue.

Keys (one hash tag): ``approval:<id>`` the record (JSON), ``approvals:digest`` a hash from
an action digest to the id of its open record, ``approvals:index`` a sorted set of ids by
creation time. Changes are optimistic transactions (``WATCH``/``MULTI``): two replicas that
try to consume one approval at once see exactly one succeed.
"""

from __future__ import annotations

import json
from typing import Any

import redis

from fleetgate.approvals.model import Approval, Status
from fleetgate.errors import NotFound
from fleetgate.stores.approvals import OPEN, Transition
from fleetgate.stores.redis_conn import RedisSettings

__all__ = ["RedisApprovalStore"]


class RedisApprovalStore:
    def __init__(self, settings: RedisSettings, client: redis.Redis | None = None) -> None:
        self.r = client or settings.sync_client(decode_responses=True)
        self._rec = settings.key("approval")
        self._digest = settings.key("approvals", "digest")
        self._index = settings.key("approvals", "index")

    def _key(self, approval_id: str) -> str:
        return f"{self._rec}:{approval_id}"

    @staticmethod
    def _load(raw: Any) -> Approval | None:
        return Approval.from_dict(json.loads(raw)) if raw else None

    def create_or_get(self, approval: Approval) -> tuple[Approval, bool]:
        with self.r.pipeline() as p:
            while True:
                try:
                    p.watch(self._digest)  # type: ignore[no-untyped-call]
                    existing = p.hget(self._digest, approval.digest)
                    if existing:
                        found = self._load(p.get(self._key(str(existing))))
                        if found is not None and found.status.value in OPEN:
                            p.unwatch()
                            return found, False
                    p.multi()
                    p.set(self._key(approval.id), json.dumps(approval.as_dict()))
                    p.hset(self._digest, approval.digest, approval.id)
                    p.zadd(self._index, {approval.id: approval.created})
                    p.execute()
                    return approval, True
                except redis.WatchError:
                    continue

    def get(self, approval_id: str) -> Approval | None:
        return self._load(self.r.get(self._key(approval_id)))

    def find(self, digest: str) -> Approval | None:
        existing = self.r.hget(self._digest, digest)
        if not existing:
            return None
        found = self.get(str(existing))
        return found if found is not None and found.status.value in OPEN else None

    def transition(self, approval_id: str, change: Transition) -> Approval:
        key = self._key(approval_id)
        with self.r.pipeline() as p:
            while True:
                try:
                    p.watch(key, self._digest)  # type: ignore[no-untyped-call]
                    old = self._load(p.get(key))
                    if old is None:
                        p.unwatch()
                        raise NotFound(f"no approval {approval_id!r} (list them: fleetgate "
                                       "approvals list)")
                    new = change(old)
                    owner = p.hget(self._digest, new.digest)
                    p.multi()
                    p.set(key, json.dumps(new.as_dict()))
                    if new.status is Status.CONSUMED and owner == new.id:
                        p.hdel(self._digest, new.digest)  # the next identical action asks again
                    p.execute()
                    return new
                except redis.WatchError:
                    continue

    def entries(self, status: str | None = None, limit: int = 200) -> list[Approval]:
        out: list[Approval] = []
        start, page = 0, max(limit, 100)
        while len(out) < limit:
            ids: list[Any] = list(self.r.zrevrange(self._index, start, start + page - 1))  # type: ignore[arg-type]
            if not ids:
                break
            start += page
            raws: list[Any] = list(self.r.mget([self._key(str(i)) for i in ids]))  # type: ignore[arg-type]
            for raw in raws:
                a = self._load(raw)
                if a is not None and (not status or a.status.value == status):
                    out.append(a)
                    if len(out) >= limit:
                        break
        return out

    def due(self, now: float) -> list[Approval]:
        return [a for a in self.entries(Status.PENDING.value, limit=10_000) if a.deadline <= now]

    def close(self) -> None:
        self.r.close()

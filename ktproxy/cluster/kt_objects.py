"""The objects ktproxy made (label control-by=kt): listing them, their idle time, deleting one.

No local state: an object is stale when its kt-last-heart-beat (cluster time) is older than the
threshold; an object without one (created by an older tool, or a crash before the first stamp) counts
from its creationTimestamp. The sweep that uses this is ktproxy/cleanup/sweep.py.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from ktproxy.cluster import meta
from ktproxy.cluster.client import KubeClient
from ktproxy.cluster.errors import Access, KubeError
from ktproxy.cluster.kinds import KINDS, kind_api

log = logging.getLogger("ktproxy.cluster.kt_objects")

DEFAULT_THRESHOLD = 300.0  # seconds; kt-connect's clean threshold, 5 heartbeats of margin


@dataclass
class KtObject:
    kind: str
    namespace: str
    name: str
    role: str | None = None
    user: str | None = None
    created: datetime | None = None
    heartbeat: int | None = None  # epoch seconds, cluster time

    @property
    def ref(self) -> str:
        return f"{self.kind}/{self.name}"

    def age(self, now: datetime) -> float | None:
        return (now - self.created).total_seconds() if self.created else None

    def heartbeat_age(self, now: datetime) -> float | None:
        return now.timestamp() - self.heartbeat if self.heartbeat is not None else None

    def idle(self, now: datetime) -> float | None:
        """Seconds since the last sign of life: the heartbeat, else the creation."""
        hb = self.heartbeat_age(now)
        return hb if hb is not None else self.age(now)


def _parse_heartbeat(value: str | None) -> int | None:
    try:
        return int(str(value).strip()) if value else None
    except ValueError:
        return None


def kt_object(kind: str, item: Any) -> KtObject:
    """The kt facts of a Kubernetes object (role, user, creation, heartbeat) in one place."""
    md = item.metadata
    ann = md.annotations or {}
    labels = md.labels or {}
    return KtObject(
        kind=kind,
        namespace=md.namespace,
        name=md.name,
        role=labels.get(meta.KT_ROLE),
        user=ann.get(meta.KT_USER),
        created=md.creation_timestamp,
        heartbeat=_parse_heartbeat(ann.get(meta.KT_LAST_HEART_BEAT)),
    )


async def list_objects(
    kube: KubeClient, namespace: str | None, kinds: tuple[str, ...] = KINDS
) -> list[KtObject]:
    """Every control-by=kt object of `kinds` in `namespace` (None: all namespaces)."""

    async def one(kind: str) -> list[KtObject]:
        api = kind_api(kube, kind)
        if namespace is None:
            resp = await kube.call(api.list_everywhere, label_selector=meta.SELECTOR,
                                   access=Access("list", api.plural))
        else:
            resp = await kube.call(api.namespaced("list"), namespace, label_selector=meta.SELECTOR,
                                   access=Access("list", api.plural, namespace))
        return [kt_object(kind, item) for item in resp.items or []]

    results = await asyncio.gather(*(one(k) for k in kinds))
    objs = [o for group in results for o in group]
    order = {k: i for i, k in enumerate(KINDS)}
    objs.sort(key=lambda o: (o.namespace, order.get(o.kind, 99), o.name))
    return objs


def stale(objs: list[KtObject], now: datetime, threshold: float = DEFAULT_THRESHOLD) -> list[KtObject]:
    """Objects idle for longer than `threshold` seconds."""
    return [o for o in objs if (o.idle(now) or 0) > threshold]


async def delete_object(kube: KubeClient, obj: KtObject) -> bool:
    """Delete one object; False if it was already gone."""
    api = kind_api(kube, obj.kind)
    try:
        await kube.call(api.namespaced("delete"), obj.name, obj.namespace, grace_period_seconds=0,
                        access=Access("delete", api.plural, obj.namespace))
        return True
    except KubeError as exc:
        if exc.status == 404:
            return False
        raise


def fmt_age(seconds: float | None) -> str:
    """kubectl-style short age: 45s, 7m, 2h13m, 3d4h."""
    if seconds is None:
        return "-"
    s = max(0, int(seconds))
    if s < 120:
        return f"{s}s"
    m = s // 60
    if m < 60:
        return f"{m}m"
    h, m = divmod(m, 60)
    if h < 24:
        return f"{h}h{m}m" if m else f"{h}h"
    d, h = divmod(h, 24)
    return f"{d}d{h}h" if h else f"{d}d"

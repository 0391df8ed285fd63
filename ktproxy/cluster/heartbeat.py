"""Heartbeats: the kt-last-heart-beat annotation (epoch seconds, cluster time) on every object we keep.

`clean` deletes objects whose heartbeat is older than its threshold, so a killed ktctl is swept up while
a live one never is. Cluster time (an API response's Date header) makes this immune to laptop clock skew.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable

from ktproxy.cluster import meta
from ktproxy.cluster.client import KubeClient
from ktproxy.cluster.errors import Access, KubeError
from ktproxy.cluster.kinds import kind_api

log = logging.getLogger("ktproxy.cluster.heartbeat")

INTERVAL = 60.0  # clean's default threshold is 5 minutes: several missed beats before a sweep

# (kind, namespace, name); kind is one of kinds.KINDS
ObjectRef = tuple[str, str, str]


def heartbeat_patch(epoch: int) -> dict:
    return {"metadata": {"annotations": {meta.KT_LAST_HEART_BEAT: str(epoch)}}}


async def beat_once(kube: KubeClient, objects: Iterable[ObjectRef]) -> int:
    """Stamp every object with the current cluster time; returns how many were stamped.

    Failures are logged, not raised: a missed beat is harmless, killing connect over one is not.
    A 404 means the object is gone (the session's reconnect logic deals with that).
    """
    objects = list(objects)
    if not objects:
        return 0
    now = int((await kube.cluster_time()).timestamp())
    body = heartbeat_patch(now)
    done = 0
    for kind, ns, name in objects:
        api = kind_api(kube, kind)
        try:
            await kube.call(api.namespaced("patch"), name, ns, body, access=Access("patch", api.plural, ns))
            done += 1
        except KubeError as exc:
            if exc.status == 404:
                log.debug("heartbeat: %s %s/%s is gone", kind, ns, name)
            else:
                log.warning("heartbeat for %s %s/%s failed: %s", kind, ns, name, exc)
    return done


async def heartbeat_loop(
    kube: KubeClient, objects: Callable[[], Iterable[ObjectRef]], interval: float = INTERVAL
) -> None:
    """Beat every `interval` seconds until cancelled; `objects()` is re-read each time (pods get replaced)."""
    while True:
        await asyncio.sleep(interval)
        try:
            n = await beat_once(kube, objects())
            log.debug("heartbeat: %d object(s) stamped", n)
        except Exception as exc:
            # Whatever went wrong (API server unreachable, an odd response), the next round may work,
            # and a loop that ended would let another user's sweep delete this live session's pod.
            log.warning("heartbeat failed: %s", exc or type(exc).__name__)

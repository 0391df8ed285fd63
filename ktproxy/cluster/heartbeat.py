"""Heartbeats: the kt-last-heart-beat annotation (epoch seconds, cluster time) on every object we keep.

`clean` deletes objects whose heartbeat is older than its threshold, so a killed ktctl is swept up while
a live one never is. Cluster time (an API response's Date header) makes this immune to laptop clock skew.

After a sleep or an API outage the loop tells its owner (`on_lost`) what may be gone: the objects whose
beat met a 404 (swept, or deleted by hand) and the gap, in cluster seconds, since the last beat that
went through when it is longer than `gap_after` (the clean threshold: a sweep may have run meanwhile,
also on objects the loop does not beat, such as a Deployment scale mode set to 0). The owner re-creates
what is its own or ends its command with one line (lifecycle.end); see each command's module.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field

from ktproxy.cluster import meta
from ktproxy.cluster.client import KubeClient
from ktproxy.cluster.errors import Access, KubeError
from ktproxy.cluster.kinds import kind_api
from ktproxy.cluster.kt_objects import DEFAULT_THRESHOLD

log = logging.getLogger("ktproxy.cluster.heartbeat")

INTERVAL = 60.0  # clean's default threshold is 5 minutes: several missed beats before a sweep

# (kind, namespace, name); kind is one of kinds.KINDS
ObjectRef = tuple[str, str, str]


@dataclass
class Lost:
    """What one beat found: the objects that are gone (404) and the gap since the last good beat."""

    gone: list[ObjectRef] = field(default_factory=list)
    gap: float | None = None  # cluster seconds since the last beat that went through, when > gap_after


OnLost = Callable[[Lost], Awaitable[None]]


def heartbeat_patch(epoch: int) -> dict:
    return {"metadata": {"annotations": {meta.KT_LAST_HEART_BEAT: str(epoch)}}}


async def beat_once(kube: KubeClient, objects: Iterable[ObjectRef], gone: list[ObjectRef] | None = None) -> int:
    """Stamp every object with the current cluster time; returns how many were stamped.

    Failures are logged, not raised: a missed beat is harmless, killing connect over one is not.
    A 404 means the object is gone: it is added to `gone` for the owner (heartbeat_loop's on_lost).
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
                log.info("heartbeat: %s %s/%s is gone", kind, ns, name)
                if gone is not None:
                    gone.append((kind, ns, name))
            else:
                log.warning("heartbeat for %s %s/%s failed: %s", kind, ns, name, exc)
    return done


async def heartbeat_loop(
    kube: KubeClient, objects: Callable[[], Iterable[ObjectRef]], interval: float = INTERVAL,
    on_lost: OnLost | None = None, gap_after: float = DEFAULT_THRESHOLD,
) -> None:
    """Beat every `interval` seconds until cancelled; `objects()` is re-read each time (pods get replaced).
    After a beat that found objects gone, or came more than `gap_after` cluster seconds after the last
    one that went through, `on_lost` is awaited (its failure is logged; the loop goes on)."""
    last: float | None = None
    while True:
        await asyncio.sleep(interval)
        try:
            gone: list[ObjectRef] = []
            now = (await kube.cluster_time()).timestamp()
            n = await beat_once(kube, objects(), gone)
            log.debug("heartbeat: %d object(s) stamped", n)
            gap = now - last if last is not None and now - last > gap_after else None
            last = now
            if on_lost is not None and (gone or gap is not None):
                if gap is not None:
                    log.warning("no heartbeat went through for %.0f s (a sleep or an unreachable API server); "
                                "checking what this session holds", gap)
                await on_lost(Lost(gone, gap))
        except Exception as exc:
            # Whatever went wrong (API server unreachable, an odd response), the next round may work,
            # and a loop that ended would let another user's sweep delete this live session's pod.
            log.warning("heartbeat failed: %s", exc or type(exc).__name__)

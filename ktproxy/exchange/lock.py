"""The kt-lock annotation on a Service: serialises the set-up of an exchange (or mesh), as kt-connect does.

The value is unix seconds in cluster time. A lock older than STALE_AFTER belongs to a set-up that died
and is taken over silently. The lock covers set-up only; who holds the Service afterwards is recorded
by kt-selector (takeover.py).

A set-up that outlives STALE_AFTER is overtaken while it runs; its release then drops only the value it
wrote (compared and removed under the resourceVersion read), never the new holder's lock.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from typing import Any

from ktproxy.cluster import meta
from ktproxy.cluster.client import KubeClient
from ktproxy.cluster.errors import KubeError
from ktproxy.errors import KtError
from ktproxy.exchange.takeover import annotations_of, patch, read

log = logging.getLogger("ktproxy.exchange.lock")

STALE_AFTER = 180  # seconds
RETRY_INTERVAL = 3.0
TRIES = 10
RELEASE_TRIES = 10  # a heartbeat or selector write between our read and our write costs one more


def lock_age(service: Any, now: float) -> float | None:
    """Seconds since the lock was taken; None when there is no (readable) lock."""
    value = annotations_of(service).get(meta.KT_LOCK)
    try:
        return now - int(str(value).strip()) if value else None
    except ValueError:
        return None


async def acquire(kube: KubeClient, namespace: str, name: str, *, tries: int = TRIES,
                  retry_interval: float = RETRY_INTERVAL, stale_after: float = STALE_AFTER) -> str:
    """Take the Service's lock, waiting while a fresh one is held; raise after `tries` attempts.
    Returns the value written, for release(held=...)."""
    for _ in range(tries):
        service = await read(kube, namespace, name)
        now = (await kube.cluster_time()).timestamp()
        age = lock_age(service, now)
        if age is not None and age < stale_after:
            log.info("Another user is occupying service %s, waiting for lock ...", name)
            await asyncio.sleep(retry_interval)
            continue
        value = str(int(now))
        body = {"metadata": {"annotations": {meta.KT_LOCK: value},
                             "resourceVersion": service.metadata.resource_version}}
        try:
            await patch(kube, namespace, name, body)
        except KubeError as exc:
            if exc.status != 409:  # someone else wrote first: look again
                raise
            continue
        log.info("Service %s locked", name)
        return value
    raise KtError(f"failed to obtain kt lock of service {name}, please try again later")


async def release(kube: KubeClient, namespace: str, name: str, held: str | None = None) -> bool:
    """Drop the lock; True when this call removed one. With `held` (acquire's value) only that value
    goes: a lock another set-up took over meanwhile stays. Without it (recover, clean) any lock goes.
    A Service deleted meanwhile has no lock to drop."""
    for _ in range(RELEASE_TRIES):
        try:
            service = await read(kube, namespace, name)
        except KubeError as exc:
            if exc.status != 404:
                raise
            return False
        current = annotations_of(service).get(meta.KT_LOCK)
        if current is None:
            return False
        if held is not None and current != held:
            log.warning("the kt-lock of service %s is no longer ours (taken over as stale); leaving it", name)
            return False
        body = {"metadata": {"annotations": {meta.KT_LOCK: None},
                             "resourceVersion": service.metadata.resource_version}}
        try:
            await patch(kube, namespace, name, body)
        except KubeError as exc:
            if exc.status == 404:
                return False
            if exc.status != 409:  # 409: the Service changed since we read it, look again
                raise
            continue
        log.info("Service %s unlocked", name)
        return True
    raise KtError(f"failed to release the kt lock of service {name}: it keeps changing")


@contextlib.asynccontextmanager
async def service_lock(kube: KubeClient, namespace: str, name: str, **kw: Any) -> AsyncIterator[None]:
    """`async with service_lock(...)`: the lock is released even when set-up fails or is cancelled."""
    value = await acquire(kube, namespace, name, **kw)
    try:
        yield
    finally:
        try:
            await asyncio.shield(release(kube, namespace, name, held=value))
        except KtError as exc:  # a stale lock is harmless (180 s), the set-up's own error matters more
            log.warning("could not unlock service %s: %s", name, exc)

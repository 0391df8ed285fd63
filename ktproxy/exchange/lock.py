"""The kt-lock annotation on a Service: serialises the set-up of an exchange (or mesh), as kt-connect does.

The value is unix seconds in cluster time. A lock older than STALE_AFTER belongs to a set-up that died
and is taken over silently. The lock covers set-up only; who holds the Service afterwards is recorded
by kt-selector (takeover.py).

A set-up that outlives STALE_AFTER is overtaken while it runs; its release then drops only the value it
wrote (compared and removed under the resourceVersion read), never the new holder's lock.

Next to kt-lock goes kt-lock-owner, a random token of this acquire (kt-connect ignores it): a write whose
answer was lost (a 409 or no answer, then a read) is recognised as ours by value and token, rather than
waited on as another user's lock for STALE_AFTER.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
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
KT_LOCK_OWNER = "kt-lock-owner"


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
    Returns the value written, for release(held=...).

    Cancellable while it waits; a cancel that comes while our write is in flight (a worker thread that
    cannot be stopped) waits for it and drops the lock if it landed, so a cancelled acquire leaves none."""
    token = meta.random_suffix(12)
    for _ in range(tries):
        service = await read(kube, namespace, name)
        now = (await kube.cluster_time()).timestamp()
        age = lock_age(service, now)
        if age is not None and age < stale_after:
            log.info("Another user is occupying service %s, waiting for lock ...", name)
            await asyncio.sleep(retry_interval)
            continue
        value = str(int(now))
        body = {"metadata": {"annotations": {meta.KT_LOCK: value, KT_LOCK_OWNER: token},
                             "resourceVersion": service.metadata.resource_version}}
        write = asyncio.ensure_future(patch(kube, namespace, name, body))
        try:
            await asyncio.shield(write)
        except asyncio.CancelledError:
            await asyncio.wait([write])
            if not write.cancelled() and write.exception() is None:
                await asyncio.shield(release(kube, namespace, name, held=value))
            raise
        except KubeError as exc:
            if exc.status not in (409, None):
                raise
            # 409: someone else wrote first, or our own write landed and a resend of it (or a lost
            # answer) made it look refused: a read tells which.
            if await _holds(kube, namespace, name, value, token):
                log.info("Service %s locked", name)
                return value
            continue
        log.info("Service %s locked", name)
        return value
    raise KtError(f"failed to obtain kt lock of service {name}, please try again later")


async def _holds(kube: KubeClient, namespace: str, name: str, value: str, token: str) -> bool:
    ann = annotations_of(await read(kube, namespace, name))
    return ann.get(meta.KT_LOCK) == value and ann.get(KT_LOCK_OWNER) == token


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
        body = {"metadata": {"annotations": {meta.KT_LOCK: None, KT_LOCK_OWNER: None},
                             "resourceVersion": service.metadata.resource_version}}
        try:
            await patch(kube, namespace, name, body)
        except KubeError as exc:
            if exc.status == 404:
                return False
            if exc.status not in (409, None):  # 409: the Service changed since we read it; None: no
                raise  # answer (it may have landed): look again
            continue
        log.info("Service %s unlocked", name)
        return True
    raise KtError(f"failed to release the kt lock of service {name}: it keeps changing")


@contextlib.asynccontextmanager
async def service_lock(kube: KubeClient, namespace: str, name: str,
                       until: Callable[[Awaitable[str]], Awaitable[str]] | None = None,
                       **kw: Any) -> AsyncIterator[None]:
    """`async with service_lock(...)`: the lock is released even when set-up fails or is cancelled.
    `until` wraps the wait for the lock (a command passes `life.until_stopped`, so Ctrl-C ends the wait
    for another user's lock at once instead of after tries x retry_interval)."""
    waiting = acquire(kube, namespace, name, **kw)
    value = await (until(waiting) if until is not None else waiting)
    try:
        yield
    finally:
        try:
            await asyncio.shield(release(kube, namespace, name, held=value))
        except KtError as exc:  # a stale lock is harmless (180 s), the set-up's own error matters more
            log.warning("could not unlock service %s: %s", name, exc)

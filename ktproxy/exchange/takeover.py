"""Pointing a Service at our shadow and back (exchange selector mode; mesh later).

State lives on the Service, as kt-connect keeps it, so either tool can recover the other's leftovers:
the original selector as JSON in the kt-selector annotation, the holder in kt-user. Every write carries
the resourceVersion it was computed from; a 409 means someone wrote in between, so read again and retry.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Callable
from typing import Any

from ktproxy.cluster import meta
from ktproxy.cluster.client import KubeClient
from ktproxy.cluster.errors import Access, KubeError
from ktproxy.errors import KtError

log = logging.getLogger("ktproxy.exchange.takeover")

CONFLICT_RETRIES = 10
GUARD_INTERVAL = 2.0


def target_labels(role: str) -> dict[str, str]:
    """A fresh selector for a shadow: its role plus a random kt-target nobody else has."""
    return {meta.KT_ROLE: role, meta.KT_TARGET: meta.random_suffix(20)}


def annotations_of(obj: Any) -> dict[str, str]:
    return dict((obj.metadata.annotations or {}) if obj.metadata else {})


def original_selector(service: Any) -> dict[str, str]:
    """The selector the Service had before any kt tool took it over (kt-selector), else its selector."""
    saved = annotations_of(service).get(meta.KT_SELECTOR)
    if saved:
        with contextlib.suppress(ValueError):
            parsed = json.loads(saved)
            if isinstance(parsed, dict):
                return {str(k): str(v) for k, v in parsed.items()}
    return dict(service.spec.selector or {})


def encode_selector(selector: dict[str, str]) -> str:
    """JSON as Go's json.Marshal writes a map (sorted keys, no spaces): kt-connect reads it back."""
    return json.dumps(selector, sort_keys=True, separators=(",", ":"))


def selector_patch(current: dict[str, str], wanted: dict[str, str]) -> dict[str, str | None]:
    """A strategic-merge map that turns `current` into `wanted` (None deletes a key)."""
    patch: dict[str, str | None] = {k: None for k in current if k not in wanted}
    patch.update(wanted)
    return patch


async def read(kube: KubeClient, namespace: str, name: str) -> Any:
    return await kube.call(kube.core.read_namespaced_service, name, namespace,
                           access=Access("get", "services", namespace))


async def patch(kube: KubeClient, namespace: str, name: str, body: dict[str, Any]) -> Any:
    return await kube.call(kube.core.patch_namespaced_service, name, namespace, body,
                           access=Access("patch", "services", namespace))


async def update_with_retry(
    kube: KubeClient,
    namespace: str,
    name: str,
    change: Callable[[Any], dict[str, Any] | None],
    retries: int = CONFLICT_RETRIES,
) -> Any:
    """Read the Service, let `change` compute a patch (None: nothing to do), write it guarded by the
    resourceVersion just read; on 409 read again. Returns the Service as last read or written.

    A 409 (or a write that got no answer) may also mean our own write landed and its answer was lost:
    `change` then sees the Service as it wrote it, so it must recognise its own result and return None
    rather than treat it as someone else's (switch_selector does)."""
    unanswered = 0
    for _ in range(retries):
        service = await read(kube, namespace, name)
        body = change(service)
        if body is None:
            return service
        body.setdefault("metadata", {})["resourceVersion"] = service.metadata.resource_version
        try:
            return await patch(kube, namespace, name, body)
        except KubeError as exc:
            if exc.status is None and unanswered == 0:  # no answer: it may have landed; look once
                unanswered += 1
                log.debug("no answer to our write of service %s/%s; reading it again", namespace, name)
                continue
            if exc.status != 409:
                raise
            log.debug("service %s/%s changed while we wrote it; retrying", namespace, name)
    raise KtError(f"service '{name}' keeps changing under us; gave up after {retries} tries, try again later")


async def holder_of(kube: KubeClient, namespace: str, service: Any) -> str:
    """Who holds a taken-over Service: its kt-user, else the kt-user of a pod its selector picks."""
    user = annotations_of(service).get(meta.KT_USER)
    if user:
        return user
    selector = service.spec.selector or {}
    if selector:
        with contextlib.suppress(KubeError):
            resp = await kube.call(kube.core.list_namespaced_pod, namespace,
                                   label_selector=",".join(f"{k}={v}" for k, v in sorted(selector.items())))
            for pod in resp.items or []:
                if annotations_of(pod).get(meta.KT_USER):
                    return annotations_of(pod)[meta.KT_USER]
    return "another user"


async def mesh_users(kube: KubeClient, namespace: str, service: str) -> list[str]:
    """The users meshing `service` (the kt-user of shadows whose kt-config names it): a meshed Service is
    held by every developer on it, not by whoever switched its selector first."""
    try:
        resp = await kube.call(kube.core.list_namespaced_pod, namespace,
                               label_selector=f"{meta.SELECTOR},{meta.KT_ROLE}={meta.ROLE_MESH_SHADOW}")
    except KubeError:
        return []
    users = set()
    for pod in resp.items or []:
        ann = annotations_of(pod)
        with contextlib.suppress(KtError):  # a malformed kt-config names nobody
            if meta.parse_kv_list(ann.get(meta.KT_CONFIG)).get("service") == service and ann.get(meta.KT_USER):
                users.add(ann[meta.KT_USER])
    return sorted(users)


async def refuse_if_switched(kube: KubeClient, namespace: str, service: Any) -> None:
    """One line naming the holder when another selector exchange or mesh switched the Service's selector.
    A scale-mode exchange leaves the Service alone: holder.refuse_if_taken checks both."""
    name = service.metadata.name
    selector = service.spec.selector or {}
    if meta.KT_SELECTOR in annotations_of(service):
        if selector.get(meta.KT_ROLE) == meta.ROLE_ROUTER:
            users = await mesh_users(kube, namespace, name)
            who = ", ".join(users) if users else await holder_of(kube, namespace, service)
            verb = "meshed"
        else:
            who = await holder_of(kube, namespace, service)
            verb = "exchanged"
        raise KtError(f"service '{name}' is already {verb} by {who} (if that session is dead: ktctl recover {name})")
    if meta.KT_ROLE in selector:
        raise KtError(f"service '{name}' selects ktctl's own pods ({meta.KT_ROLE}={selector[meta.KT_ROLE]}); "
                      "it cannot be exchanged")


def is_ours(service: Any, labels: dict[str, str], user: str) -> bool:
    """Exactly as switch_selector leaves it: our labels as the selector, kt-user us, kt-selector saved."""
    ann = annotations_of(service)
    return (dict(service.spec.selector or {}) == labels and ann.get(meta.KT_USER) == user
            and meta.KT_SELECTOR in ann)


def other_holder(service: Any, labels: dict[str, str], saved: str, user: str) -> str | None:
    """Who holds the Service now when it is no longer this exchange's; None while it is still ours
    (even with its selector overwritten: that is what the guard puts back).

    Someone else holds it when any of these is true (in this order, the first names the holder):
    - kt-selector is gone: `ktctl recover` (or a clean-up sweep, or anyone restoring it) put the original
      back; a kt tool always writes kt-selector with its selector, so without it nothing is ours;
    - kt-user names another user: that developer's exchange or mesh switched it after us;
    - the selector points at other kt pods (a kt-role or kt-target that is not our kt-target): another
      exchange, a mesh router or a preview, possibly our own user's second session;
    - kt-selector holds another original than the one we saved: someone took over a Service whose
      selector had changed meanwhile.
    What stays ours: kt-selector as we saved it, kt-user us (or absent) and a selector without foreign
    kt labels, e.g. a `kubectl apply` that put the original selector back over our exchange."""
    ann = annotations_of(service)
    if meta.KT_SELECTOR not in ann:
        return "ktctl recover"
    holder = ann.get(meta.KT_USER)
    if holder and holder != user:
        return holder
    selector = dict(service.spec.selector or {})
    if (meta.KT_ROLE in selector or meta.KT_TARGET in selector) and \
            selector.get(meta.KT_TARGET) != labels.get(meta.KT_TARGET):
        who = holder or "another user"
        role = selector.get(meta.KT_ROLE)
        return f"{who} ({'a mesh router' if role == meta.ROLE_ROUTER else 'another session'}, " \
               f"{meta.KT_TARGET}={selector.get(meta.KT_TARGET, '?')})"
    if ann[meta.KT_SELECTOR] != saved:
        return holder or "another user"
    return None


async def switch_selector(
    kube: KubeClient, namespace: str, name: str, labels: dict[str, str], user: str
) -> dict[str, str]:
    """Point the Service at pods labelled `labels`, saving the original selector; returns the original."""
    taken: list[Any] = []
    original: dict[str, str] = {}

    def change(service: Any) -> dict[str, Any] | None:
        taken.clear()
        if is_ours(service, labels, user):
            # Our own write, landed although its answer was lost (a 409 or no answer, then this read).
            original.clear()
            original.update(original_selector(service))
            return None
        if meta.KT_SELECTOR in annotations_of(service) or meta.KT_ROLE in (service.spec.selector or {}):
            taken.append(service)
            return None
        current = dict(service.spec.selector or {})
        if not current:
            raise KtError(f"service '{name}' has no selector (its endpoints are managed by hand); "
                          "it cannot be exchanged in selector mode")
        original.clear()
        original.update(current)
        return {
            "metadata": {"annotations": {meta.KT_SELECTOR: encode_selector(current), meta.KT_USER: user}},
            "spec": {"selector": selector_patch(current, labels)},
        }

    await update_with_retry(kube, namespace, name, change)
    if taken:
        await refuse_if_switched(kube, namespace, taken[-1])
    log.info("Service %s now selects %s", name, encode_selector(labels))
    return original


async def restore_selector(kube: KubeClient, namespace: str, name: str,
                           owner: tuple[dict[str, str], str, str] | None = None) -> bool:
    """Put the selector saved in kt-selector back and drop our annotations; False if nothing was saved.

    With `owner` (our labels, our encoded original, our user: an exchange ending) nothing is written once
    someone else holds the Service (other_holder): putting it back would end their exchange. Without it
    (recover, clean) whatever kt-selector holds goes back."""
    restored: list[bool] = []

    def change(service: Any) -> dict[str, Any] | None:
        restored.clear()
        ann = annotations_of(service)
        if meta.KT_SELECTOR not in ann:
            return None
        if owner is not None:
            holder = other_holder(service, *owner)
            if holder is not None:
                log.info("Service %s is held by %s now; leaving its selector as it is", name, holder)
                return None
        original = original_selector(service)
        restored.append(True)
        return {
            "metadata": {"annotations": {meta.KT_SELECTOR: None, meta.KT_USER: None}},
            "spec": {"selector": selector_patch(dict(service.spec.selector or {}), original)},
        }

    try:
        await update_with_retry(kube, namespace, name, change)
    except KubeError as exc:
        if exc.status == 404:
            log.warning("service %s/%s is gone; nothing to restore", namespace, name)
            return False
        raise
    if restored:
        log.info("Original service %s recovered", name)
    return bool(restored)


async def _shadow_alive(kube: KubeClient, namespace: str, labels: dict[str, str]) -> bool:
    resp = await kube.call(kube.core.list_namespaced_pod, namespace,
                           label_selector=",".join(f"{k}={v}" for k, v in sorted(labels.items())))
    return any(not (p.metadata and p.metadata.deletion_timestamp) for p in resp.items or [])


async def guard_selector(
    kube: KubeClient,
    namespace: str,
    name: str,
    labels: dict[str, str],
    original: dict[str, str],
    user: str,
    interval: float = GUARD_INTERVAL,
) -> str:
    """Until cancelled: when someone rewrites the Service's selector (or drops kt-selector), put ours
    back. Polling (not a watch): a cancelled poll leaves no thread blocked in a watch behind.

    Like kt-connect, nothing is re-applied while no live pod carries our labels: then the shadow is
    being replaced (we re-apply once it is back) or `ktctl recover` is putting the Service back.

    The guard stands down for good, with one WARNING, once someone else holds the Service (other_holder:
    kt-selector removed by recover or a sweep, another kt-user, a selector pointing at other kt pods, or
    another saved original); it then returns that holder, and the exchange must not restore the selector
    at exit (restore_selector(owner=...) checks the same); the exchange then ends (exchange/session.py,
    G3: after a sleep the sweep's recover hook is such a holder, so the exchange does not run on half-alive).
    Checked again in the write itself, under the resourceVersion read, so a takeover between our read
    and our write is never overwritten.
    Cancel this before restoring the original selector."""
    saved = encode_selector(original)
    gone_logged = False
    holder: list[str] = []

    def change(service: Any) -> dict[str, Any] | None:
        other = other_holder(service, labels, saved, user)
        if other is not None:
            holder[:] = [other]
            return None
        if dict(service.spec.selector or {}) == labels and annotations_of(service).get(meta.KT_USER) == user:
            return None
        return {
            "metadata": {"annotations": {meta.KT_SELECTOR: saved, meta.KT_USER: user}},
            "spec": {"selector": selector_patch(dict(service.spec.selector or {}), labels)},
        }

    def stand_down() -> str:
        who = holder[0]
        if who == "ktctl recover":
            log.warning("Service %s was put back (ktctl recover, or a clean-up sweep after a sleep or an "
                        "outage); this exchange stands down, leaves it as it is and has ended", name)
        else:
            log.warning("Service %s is now held by %s; this exchange stands down, leaves it to them and has "
                        "ended", name, who)
        return who

    while True:
        await asyncio.sleep(interval)
        try:
            service = await read(kube, namespace, name)
            gone_logged = False
            if change(service) is None:
                if holder:
                    return stand_down()
                continue
            if not await _shadow_alive(kube, namespace, labels):
                continue
            log.warning("Selector of service %s was changed by someone else; putting ours back", name)
            # The PATCH runs in a worker thread that cancelling cannot stop: let it land before this
            # task ends, or it could land after the restore and point the Service at a deleted shadow.
            write = asyncio.ensure_future(update_with_retry(kube, namespace, name, change))
            try:
                await asyncio.shield(write)
            except asyncio.CancelledError:
                await asyncio.wait([write])
                raise
            if holder:
                return stand_down()
            log.info("Service %s recovered", name)
        except KubeError as exc:
            if exc.status == 404:
                if not gone_logged:
                    log.warning("service %s/%s was deleted while exchanged", namespace, name)
                    gone_logged = True
                continue
            log.warning("checking the selector of service %s failed: %s", name, exc)
        except Exception as exc:  # the guard must outlive any one bad answer
            log.warning("checking the selector of service %s failed: %s", name, exc)

"""The whole clean-up of what killed ktctl runs left: the stale sweep plus every hook that puts back what
ktproxy changed but does not own (a service whose selector exchange rewrote, a deployment scale mode
set to 0, a mesh's routes and shared objects). `ktctl clean` and connect's start-up sweep both run this one, so a
killed exchange's Service gets its selector back whichever comes first (the sweep alone deleted the
shadow and left the Service selecting nothing)."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import datetime

from ktproxy.cluster import meta
from ktproxy.cluster.client import KubeClient
from ktproxy.cluster.errors import KubeError
from ktproxy.cluster.kt_objects import DEFAULT_THRESHOLD, KtObject, delete_object, list_objects, stale

log = logging.getLogger("ktproxy.shadow.session")  # where connect's start-up sweep logged before



def is_mesh_shared(obj: KtObject) -> bool:
    """A mesh's router pod or stuntman Service. The sweep leaves them to the mesh hook, which puts the
    Service back before deleting them (a router deleted first leaves the Service pointing at nothing)
    and never deletes them while a participant lives."""
    return ((obj.kind == "pod" and obj.role == meta.ROLE_ROUTER)
            or (obj.kind == "service" and obj.name.endswith("-kt-stuntman")))


# A recover hook undoes a change to an object ktproxy does not own (exchange's selector rewrite,
# scale mode's replicas=0). It gets (kube, namespace or None, now, threshold, dry_run) and returns one
# human-readable line per action it took (or would take).
RecoverHook = Callable[[KubeClient, str | None, datetime, float, bool], Awaitable[list[str]]]


@dataclass
class CleanResult:
    now: datetime
    removed: list[KtObject]
    kept: list[KtObject]
    recovered: list[str]
    failed: list[tuple[KtObject, str]]


async def clean(
    kube: KubeClient,
    namespace: str | None,
    threshold: float = DEFAULT_THRESHOLD,
    dry_run: bool = False,
    hooks: Sequence[RecoverHook] = (),
    before: Sequence[RecoverHook] = (),
) -> CleanResult:
    """Run the `before` hooks (mesh: routes of the dead out first), delete (or, with dry_run, only
    list) stale kt objects except a mesh's shared ones, then run the recover hooks."""
    now = await kube.cluster_time()
    recovered: list[str] = []
    for hook in before:
        recovered += await hook(kube, namespace, now, threshold, dry_run)
    objs = await list_objects(kube, namespace)
    doomed = [o for o in stale(objs, now, threshold) if not is_mesh_shared(o)]
    kept = [o for o in objs if o not in doomed]
    removed: list[KtObject] = []
    failed: list[tuple[KtObject, str]] = []
    for obj in doomed:
        if dry_run:
            removed.append(obj)
            continue
        try:
            await delete_object(kube, obj)
            removed.append(obj)
        except KubeError as exc:
            failed.append((obj, str(exc)))
    for hook in hooks:
        recovered += await hook(kube, namespace, now, threshold, dry_run)
    return CleanResult(now, removed, kept, recovered, failed)

def recover_hooks() -> list[RecoverHook]:
    """After the sweep: exchange's switched selectors, deployments scaled to 0, stale kt-locks."""
    from ktproxy.cleanup import recover

    return [recover.clean_hook]


def first_hooks() -> list[RecoverHook]:
    """Before the sweep: a mesh's dead participants lose their routes, and a mesh with none left gives
    the Service its selector back before its router and stuntman go."""
    from ktproxy.mesh import clean as mesh_clean

    return [mesh_clean.clean_hook]


async def sweep(kube: KubeClient, namespace: str | None, threshold: float = DEFAULT_THRESHOLD,
                dry_run: bool = False) -> CleanResult:
    return await clean(kube, namespace, threshold=threshold, dry_run=dry_run,
                       hooks=recover_hooks(), before=first_hooks())


async def start_up_sweep(kube: KubeClient, namespace: str) -> None:
    """connect's start: remove what crashed sessions left in this namespace (stale heartbeat), as
    kt-connect does."""
    try:
        result = await sweep(kube, namespace)
    except KubeError as exc:  # a user who may not list everything can still connect
        log.debug("sweep of stale objects skipped: %s", exc)
        return
    for obj in result.removed:
        log.info("Removed stale %s (left by an earlier session)", obj.ref)

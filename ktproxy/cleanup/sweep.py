"""The whole clean-up of what killed ktctl runs left: the stale sweep plus every hook that puts back what
ktproxy changed but does not own. `ktctl clean` and connect's start-up sweep both run this one, so a
killed exchange's Service gets its selector back whichever comes first (the sweep alone deleted the
shadow and left the Service selecting nothing)."""

from __future__ import annotations

import logging

from ktproxy.cluster.client import KubeClient
from ktproxy.cluster.errors import KubeError
from ktproxy.cluster.kt_objects import DEFAULT_THRESHOLD, CleanResult, RecoverHook, clean

log = logging.getLogger("ktproxy.shadow.session")  # where connect's start-up sweep logged before


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

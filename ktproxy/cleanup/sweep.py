"""The whole clean-up of what killed ktctl runs left: the stale sweep plus every hook that puts back what
ktproxy changed but does not own. `ktctl clean` and connect's start-up sweep both run this one, so a
killed exchange's Service gets its selector back whichever comes first (the sweep alone deleted the
shadow and left the Service selecting nothing)."""

from __future__ import annotations

from ktproxy.cluster.client import KubeClient
from ktproxy.cluster.kt_objects import DEFAULT_THRESHOLD, CleanResult, RecoverHook, clean


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

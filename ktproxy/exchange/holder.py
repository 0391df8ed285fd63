"""Who holds a Service, whichever way it is held: a selector exchange or a mesh (its selector switched,
takeover.py) or a scale-mode exchange (the Service untouched, its Deployment at 0 and a shadow wearing its
labels, scale.py). Every set-up asks before it starts and again under the kt-lock."""

from __future__ import annotations

from typing import Any

from ktproxy.cluster.client import KubeClient
from ktproxy.errors import KtError
from ktproxy.exchange import scale, takeover


async def refuse_if_taken(kube: KubeClient, namespace: str, service: Any) -> None:
    """One line naming the holder when another exchange (either mode) or a mesh has the Service."""
    await takeover.refuse_if_switched(kube, namespace, service)
    who = await scale.scale_holder(kube, namespace, service)
    if who:
        name = service.metadata.name
        raise KtError(f"service '{name}' is already exchanged (scale mode) by {who} "
                      f"(if that session is dead: ktctl recover {name})")

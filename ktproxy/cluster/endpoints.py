"""Waiting until a Service's endpoints are what a selector change asked for.

A selector switch takes effect only once the endpoint controller rewrites the Service's EndpointSlices
(and kube-proxy follows); exchange says "all requests will be redirected" only after that, so a request
made right after the banner does not still reach the old pods.
"""

from __future__ import annotations

import asyncio
import logging
import time

from kubernetes import client as k8s

from ktproxy.cluster.client import KubeClient
from ktproxy.cluster.errors import Access, KubeError

log = logging.getLogger("ktproxy.cluster.endpoints")

SERVICE_NAME_LABEL = "kubernetes.io/service-name"
POLL_INTERVAL = 0.25


async def ready_addresses(kube: KubeClient, namespace: str, service: str) -> set[str]:
    """The addresses of every ready endpoint of the Service, over all its EndpointSlices."""
    api = k8s.DiscoveryV1Api(kube.api)
    resp = await kube.call(api.list_namespaced_endpoint_slice, namespace,
                           label_selector=f"{SERVICE_NAME_LABEL}={service}",
                           access=Access("list", "endpointslices.discovery.k8s.io", namespace))
    out: set[str] = set()
    for eps in resp.items or []:
        for ep in eps.endpoints or []:
            if ep.conditions is None or ep.conditions.ready is not False:
                out.update(ep.addresses or [])
    return out


async def wait_for_addresses(kube: KubeClient, namespace: str, service: str, wanted: set[str],
                             limit: float = 30.0) -> bool:
    """Until the Service has ready endpoints and all of them are in `wanted` (a pod's addresses, one per
    IP family); False (logged) on timeout or when the user may not read EndpointSlices (the switch is
    still made, only not confirmed)."""
    deadline = time.monotonic() + limit
    have: set[str] = set()
    while time.monotonic() < deadline:
        try:
            have = await ready_addresses(kube, namespace, service)
        except KubeError as exc:
            log.info("cannot confirm the endpoints of service %s (%s)", service, exc)
            return False
        if have and have <= wanted:
            return True
        await asyncio.sleep(POLL_INTERVAL)
    log.warning("service %s still has endpoints %s after %.0f s (wanted %s)", service,
                ", ".join(sorted(have)) or "none", limit, ", ".join(sorted(wanted)))
    return False

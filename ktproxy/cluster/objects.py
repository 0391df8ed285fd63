"""Named objects as users type them (`KIND/NAME`), read with a one-line not-found error, and label
selectors matched against labels."""

from __future__ import annotations

from typing import Any

from ktproxy.cluster.client import KubeClient
from ktproxy.cluster.errors import Access, KubeError
from ktproxy.errors import UsageError

SERVICE_KINDS = {"svc": "svc", "service": "service", "services": "service"}


def split_target(text: str) -> tuple[str | None, str]:
    """'svc/tomcat' -> ('svc', 'tomcat'); 'tomcat' -> (None, 'tomcat')."""
    text = (text or "").strip()
    if not text:
        raise UsageError("a service name or target address must be specified")
    if "/" in text:
        kind, _, name = text.partition("/")
        if not kind or not name or "/" in name:
            raise UsageError(f"target {text!r} is not KIND/NAME")
        return kind.lower(), name
    return None, text


async def _read(kube: KubeClient, namespace: str, kind: str, name: str, fn: Any, plural: str) -> Any:
    """The object, or 'KIND 'X' is not found in namespace Y' (or 'namespace Y not found')."""
    try:
        return await kube.call(fn, name, namespace, access=Access("get", plural, namespace))
    except KubeError as exc:
        if exc.status != 404:
            raise
    await kube.check_namespace(namespace)
    raise KubeError(f"{kind} '{name}' is not found in namespace {namespace}", 404, "NotFound")


async def read_service(kube: KubeClient, namespace: str, name: str) -> Any:
    return await _read(kube, namespace, "service", name, kube.core.read_namespaced_service, "services")


async def read_deployment(kube: KubeClient, namespace: str, name: str) -> Any:
    return await _read(kube, namespace, "deployment", name, kube.apps.read_namespaced_deployment,
                       "deployments.apps")


async def read_pod(kube: KubeClient, namespace: str, name: str) -> Any:
    return await _read(kube, namespace, "pod", name, kube.core.read_namespaced_pod, "pods")


def is_subset(small: dict[str, str], big: dict[str, str]) -> bool:
    return bool(small) and all(big.get(k) == v for k, v in small.items())

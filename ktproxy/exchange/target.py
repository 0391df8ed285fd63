"""Which Service an exchange TARGET means: `SVC | svc/NAME | service/NAME | deployment/NAME | deploy/NAME`
-> the Service (and the Deployment when one was named)."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from ktproxy.cluster.client import KubeClient
from ktproxy.cluster.errors import Access
from ktproxy.cluster.objects import SERVICE_KINDS, is_subset, read_deployment, read_service, split_target
from ktproxy.errors import KtError, UsageError
from ktproxy.exchange.takeover import original_selector

log = logging.getLogger("ktproxy.exchange.target")

STUNTMAN_SUFFIX = "-kt-stuntman"  # kt-connect's mesh copy of a Service; exchange means the original
_DEPLOY_KINDS = {"deploy": "deploy", "deployment": "deployment", "deployments": "deployment"}


@dataclass
class ExchangeTarget:
    kind: str  # as typed, for the banner: service, svc, deployment, deploy
    name: str  # as typed
    service: Any  # V1Service
    deployment: Any | None = None  # V1Deployment when the user named one

    @property
    def service_name(self) -> str:
        return self.service.metadata.name


def services_selecting(services: list[Any], labels: dict[str, str]) -> list[Any]:
    """Services whose (original, if taken over) selector is a non-empty subset of `labels`, by name."""
    return sorted((s for s in services if is_subset(original_selector(s), labels)), key=lambda s: s.metadata.name)


async def resolve_exchange_target(kube: KubeClient, namespace: str, text: str) -> ExchangeTarget:
    kind, name = split_target(text)
    if kind is None or kind in SERVICE_KINDS:
        service = await read_service(kube, namespace, name)
        return ExchangeTarget(SERVICE_KINDS.get(kind or "service", "service"), name, service)
    if kind in _DEPLOY_KINDS:
        deployment = await read_deployment(kube, namespace, name)
        labels = dict((deployment.spec.selector.match_labels or {}) if deployment.spec.selector else {})
        resp = await kube.call(kube.core.list_namespaced_service, namespace,
                               access=Access("list", "services", namespace))
        matches = services_selecting(list(resp.items or []), labels)
        if not matches:
            raise KtError(f"no service in namespace {namespace} selects the pods of deployment '{name}'")
        if len(matches) > 1:
            log.warning("Several services select deployment '%s' (%s); using '%s'", name,
                        ", ".join(s.metadata.name for s in matches), matches[0].metadata.name)
        service = matches[0]
        if service.metadata.name.endswith(STUNTMAN_SUFFIX):
            service = await read_service(kube, namespace, service.metadata.name.removesuffix(STUNTMAN_SUFFIX))
        return ExchangeTarget(_DEPLOY_KINDS[kind], name, service, deployment)
    raise UsageError(f"cannot exchange {text!r}: give a service (NAME, svc/NAME) or deployment/NAME")

"""The kinds of object ktproxy creates or changes, and the client calls for each (one table for the
heartbeat, clean and status)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ktproxy.cluster.client import KubeClient

# Deletion order: what routes traffic first, then pods, then what pods mount.
KINDS = ("service", "configmap", "pod", "deployment", "secret")

# kind: (API group attribute of KubeClient, plural as RBAC names it, the client's method-name stem)
_TABLE = {
    "pod": ("core", "pods", "pod"),
    "secret": ("core", "secrets", "secret"),
    "service": ("core", "services", "service"),
    "configmap": ("core", "configmaps", "config_map"),
    "deployment": ("apps", "deployments.apps", "deployment"),
}


@dataclass(frozen=True)
class KindApi:
    api: Any
    plural: str  # for "no permission to ..." lines
    stem: str

    def namespaced(self, verb: str) -> Callable[..., Any]:
        """The client's <verb>_namespaced_<kind> call: patch, delete, list, read."""
        return getattr(self.api, f"{verb}_namespaced_{self.stem}")

    @property
    def list_everywhere(self) -> Callable[..., Any]:
        return getattr(self.api, f"list_{self.stem}_for_all_namespaces")


def kind_api(kube: KubeClient, kind: str) -> KindApi:
    group, plural, stem = _TABLE[kind]
    return KindApi(getattr(kube, group), plural, stem)

"""Typed options built from the parsed command line: the kube and tunnel layers never see argparse."""

from __future__ import annotations

import argparse

from ktproxy.cluster import meta
from ktproxy.cluster.client import KubeClient
from ktproxy.shadow.pod import DEFAULT_IMAGE, ShadowOptions
from ktproxy.shadow.reverse import ReverseOptions


def kube_client(args: argparse.Namespace) -> KubeClient:
    """The client for the global flags --kubeconfig, --context and -n."""
    return KubeClient.load(
        kubeconfig=getattr(args, "kubeconfig", None),
        context=getattr(args, "context", None),
        namespace=getattr(args, "namespace", None),
    )


def reverse_options(args: argparse.Namespace, namespace: str) -> ReverseOptions:
    """The shadow of exchange, mesh and preview: global flags plus --timeout and --skip-port-checking."""
    return ReverseOptions(shadow_options(args, namespace), args.timeout, args.skip_port_checking)


def shadow_options(args: argparse.Namespace, namespace: str) -> ShadowOptions:
    """The global flags that shape every shadow pod (-i, --image-pull-secret, --with-label, ...)."""
    return ShadowOptions(
        namespace=namespace,
        image=getattr(args, "image", None) or DEFAULT_IMAGE,
        image_pull_secrets=tuple(s.strip() for s in (getattr(args, "image_pull_secret", None) or "").split(",")
                                 if s.strip()),
        service_account=getattr(args, "service_account", None),
        node_selector=meta.parse_kv_list(getattr(args, "node_selector", None), "--node-selector"),
        labels=meta.parse_kv_list(getattr(args, "with_label", None), "--with-label"),
        annotations=meta.parse_kv_list(getattr(args, "with_annotation", None), "--with-annotation"),
        quota=meta.parse_pod_quota(getattr(args, "pod_quota", None)),
    )

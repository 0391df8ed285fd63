"""One module per `ktctl` sub-command; each defines register(subparsers, common) and run(args) -> int."""

from __future__ import annotations

import argparse
from typing import Any


def add_all_namespaces(p: argparse.ArgumentParser) -> None:
    p.add_argument("-A", "--all-namespaces", dest="all_namespaces", action="store_true",
                   help="look in every namespace (default: the current one)")


async def scope(kube: Any, args: argparse.Namespace) -> str | None:
    """The namespace a listing command looks in (None: all), checked to exist."""
    namespace = None if args.all_namespaces else kube.namespace
    if namespace:
        await kube.check_namespace(namespace)
    return namespace


def where(namespace: str | None) -> str:
    return "in all namespaces" if namespace is None else f"in namespace {namespace}"

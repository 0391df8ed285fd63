"""One module per `ktctl` sub-command; each defines register(subparsers, common) and run(args) -> int."""

from __future__ import annotations

import argparse
import logging
import os
from typing import Any

from ktproxy import lifecycle
from ktproxy.errors import UsageError

log = logging.getLogger("ktproxy")

RULE = "-" * 63


def add_reverse_flags(p: argparse.ArgumentParser, what: str) -> None:
    """The flags of every command that serves laptop ports in the cluster (exchange, mesh, preview)."""
    p.add_argument("--expose", required=True, metavar="LOCAL[:REMOTE][,...]",
                   help=f"local ports to serve {what}; REMOTE defaults to LOCAL")
    p.add_argument("--skip-port-checking", "--skipPortChecking", dest="skip_port_checking", action="store_true",
                   help="do not check that something listens on the local ports (start it later)")
    p.add_argument("--timeout", type=float, default=120, help="seconds to wait for the shadow pod")


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


def check_timeout(args: argparse.Namespace) -> None:
    if args.timeout <= 0:
        raise UsageError(f"--timeout: {args.timeout:g} is not a positive number of seconds")


def open_kube(args: argparse.Namespace, life: lifecycle.Lifecycle) -> Any:
    """kt-connect's first line, and the Kubernetes client, closed last at clean-up."""
    from ktproxy.commands import options

    log.info("KtConnect start at %d", os.getpid())
    kube = options.kube_client(args)
    life.on_cleanup("Kubernetes client", kube.close)
    return kube


def print_banner(text: str) -> None:
    """kt-connect's three lines (63 dashes) around what the command now offers."""
    log.info(RULE)
    log.info(text)
    log.info(RULE)

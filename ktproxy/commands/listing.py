"""What `clean` and `status` share: the -A flag, a client from the global flags, the namespace scope."""

from __future__ import annotations

import argparse
import asyncio
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from ktproxy.cluster.client import KubeClient
from ktproxy.commands import add_all_namespaces, scope

T = TypeVar("T")


def add_listing_parser(sub: Any, common: argparse.ArgumentParser, name: str, run: Callable[..., int], *,
                       summary: str, description: str) -> argparse.ArgumentParser:
    p = sub.add_parser(name, parents=[common], help=summary, description=description)
    add_all_namespaces(p)
    p.set_defaults(func=run)
    return p


def in_scope(args: argparse.Namespace, work: Callable[[KubeClient, str | None], Awaitable[T]]) -> T:
    """Run work(kube, namespace or None for all) with a client that is closed afterwards."""

    async def main() -> T:
        from ktproxy.commands import options

        kube = options.kube_client(args)
        try:
            return await work(kube, await scope(kube, args))
        finally:
            kube.close()

    return asyncio.run(main())

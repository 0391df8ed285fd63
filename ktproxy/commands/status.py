"""`ktctl status`: what the current user has running in the cluster, with age and heartbeat age."""

from __future__ import annotations

import argparse
import asyncio
from typing import Any

from ktproxy.commands import add_all_namespaces, scope, where
from ktproxy.kube import meta
from ktproxy.kube.cleanup import DEFAULT_THRESHOLD, KtObject, fmt_age, list_objects


def register(sub: Any, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser(
        "status",
        parents=[common],
        help="list the kt objects you have in the cluster",
        description="List the objects ktproxy created (label control-by=kt) for the current user "
        "(annotation kt-user), with their age and the age of their last heartbeat.",
    )
    add_all_namespaces(p)
    p.add_argument("--all-users", dest="all_users", action="store_true", help="show every user's objects")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    return asyncio.run(_main(args))


def render(objs: list[KtObject], now, show_user: bool) -> list[str]:
    """A kubectl-like table; STATE says whether `clean` would consider the object left behind."""
    header = [
        "NAMESPACE",
        "KIND",
        "NAME",
        "ROLE",
        *(["USER"] if show_user else []),
        "AGE",
        "HEARTBEAT",
        "STATE",
    ]
    rows = [header]
    for o in objs:
        hb = o.heartbeat_age(now)
        state = "stale" if (o.idle(now) or 0) > DEFAULT_THRESHOLD else "active"
        rows.append([
            o.namespace, o.kind, o.name, o.role or "-", *([o.user or "unknown"] if show_user else []),
            fmt_age(o.age(now)), f"{fmt_age(hb)} ago" if hb is not None else "never", state,
        ])  # fmt: skip
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    return ["   ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]


async def _main(args: argparse.Namespace) -> int:
    from ktproxy.kube.client import KubeClient

    kube = KubeClient.from_args(args)
    try:
        namespace = await scope(kube, args)
        now = await kube.cluster_time()
        objs = await list_objects(kube, namespace)
    finally:
        kube.close()
    user = meta.local_user()
    if not args.all_users:
        objs = [o for o in objs if o.user == user]
    place = where(namespace)
    if not objs:
        who = "" if args.all_users else f" of user {user}"
        print(f"No ktproxy objects{who} {place}")
        return 0
    for line in render(objs, now, show_user=args.all_users):
        print(line)
    return 0

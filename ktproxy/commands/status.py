"""`ktctl status`: what the current user has running in the cluster, with age and heartbeat age."""

from __future__ import annotations

import argparse
from datetime import datetime
from typing import Any

from ktproxy.cluster import meta
from ktproxy.cluster.client import KubeClient
from ktproxy.cluster.kt_objects import KtObject, fmt_age, list_objects, stale
from ktproxy.commands import where
from ktproxy.commands.listing import add_listing_parser, in_scope


def register(sub: Any, common: argparse.ArgumentParser) -> None:
    p = add_listing_parser(
        sub, common, "status", run, summary="list the kt objects you have in the cluster",
        description="List the objects ktproxy created (label control-by=kt) for the current user "
        "(annotation kt-user), with their age and the age of their last heartbeat.")
    p.add_argument("--all-users", dest="all_users", action="store_true", help="show every user's objects")


def render(objs: list[KtObject], now: datetime, show_user: bool) -> list[str]:
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
    left_behind = {id(o) for o in stale(objs, now)}
    for o in objs:
        hb = o.heartbeat_age(now)
        rows.append([
            o.namespace, o.kind, o.name, o.role or "-", *([o.user or "unknown"] if show_user else []),
            fmt_age(o.age(now)), f"{fmt_age(hb)} ago" if hb is not None else "never",
            "stale" if id(o) in left_behind else "active",
        ])
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    return ["   ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]


def run(args: argparse.Namespace) -> int:
    async def work(kube: KubeClient, namespace: str | None
                   ) -> tuple[str | None, datetime, list[KtObject], list[str], list[str]]:
        from ktproxy.cleanup.recover import changes
        from ktproxy.mesh.clean import participants

        return (namespace, await kube.cluster_time(), await list_objects(kube, namespace),
                await changes(kube, namespace), await participants(kube, namespace))

    namespace, now, objs, changed, meshes = in_scope(args, work)
    user = meta.local_user()
    if not args.all_users:
        objs = [o for o in objs if o.user == user]
    place = where(namespace)
    if not objs:
        who = "" if args.all_users else f" of user {user}"
        print(f"No ktproxy objects{who} {place}")
    else:
        for line in render(objs, now, show_user=args.all_users):
            print(line)
    if meshes:  # every user's: developers sharing a meshed service see each other
        print("Mesh participants:")
        for line in meshes:
            print(f"  {line}")
    if changed:  # every user's: someone else's exchange of a shared service matters to you too
        print("Changed by ktproxy (`ktctl recover SVC` puts a service back):")
        for line in changed:
            print(f"  {line}")
    return 0

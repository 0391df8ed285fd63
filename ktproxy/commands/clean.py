"""`ktctl clean`: remove what a killed or crashed ktctl left in the cluster (stale heartbeat)."""

from __future__ import annotations

import argparse
from typing import Any

from ktproxy.cleanup.sweep import CleanResult, sweep
from ktproxy.cluster.client import KubeClient
from ktproxy.cluster.kt_objects import DEFAULT_THRESHOLD, fmt_age
from ktproxy.commands import where
from ktproxy.commands.listing import add_listing_parser, in_scope


def register(sub: Any, common: argparse.ArgumentParser) -> None:
    p = add_listing_parser(
        sub, common, "clean", run, summary="delete kt objects whose heartbeat is stale",
        description="Delete the pods, secrets, services and configmaps (label control-by=kt) that no "
        "running ktctl keeps alive, i.e. whose kt-last-heart-beat is older than the threshold.")
    p.add_argument("--dry-run", "--dryRun", dest="dry_run", action="store_true",
                   help="only print what would be deleted")
    p.add_argument("--threshold-in-minutes", "--thresholdInMinus", dest="threshold", type=float,
                   default=DEFAULT_THRESHOLD / 60,
                   help="minutes without heartbeat before an object counts as left behind (default 5)")


def run(args: argparse.Namespace) -> int:
    async def work(kube: KubeClient, namespace: str | None) -> tuple[str | None, CleanResult]:
        return namespace, await sweep(kube, namespace, threshold=args.threshold * 60, dry_run=args.dry_run)

    namespace, result = in_scope(args, work)
    verb = "Would delete" if args.dry_run else "Deleted"
    for obj in result.removed:
        idle = obj.heartbeat_age(result.now)
        why = (
            f"last heartbeat {fmt_age(idle)} ago"
            if idle is not None
            else f"no heartbeat, age {fmt_age(obj.age(result.now))}"
        )
        print(f"{verb} {obj.kind} {obj.namespace}/{obj.name} (user {obj.user or 'unknown'}, {why})")
    for line in result.recovered:
        print(line)
    for obj, err in result.failed:
        print(f"Could not delete {obj.kind} {obj.namespace}/{obj.name}: {err}")
    place = where(namespace)
    if not result.removed and not result.recovered and not result.failed:
        active = f" ({len(result.kept)} kt object(s) still active)" if result.kept else ""
        print(f"Nothing to clean {place}{active}")
    elif args.dry_run:
        print(
            f"{len(result.removed)} object(s) would be deleted {place}; run without --dry-run to delete them"
        )
    return 1 if result.failed else 0

"""Cluster cases: the same measurements through `ktctl connect` against `kubectl port-forward` to the same
pod and against kt-connect's own ktctl (`connect --disableTunDevice`, SOCKS mode); the DNS stub; start-up
time; memory. They need the local cluster (make cluster-up) and skip with the reason when it is not there.

Each is one function; when the cluster and connect-on-Kubernetes land, fill in the body after
`ctx.require_cluster()` reusing benchmarks.cases.loopback.measure_all with an env whose yardsticks are
`ktctl connect`, `kubectl port-forward` and `kt-connect`.
"""

from __future__ import annotations

from benchmarks.harness import Context, Skip, case

PENDING = ("not measured yet: the cluster cases arrive with connect-on-Kubernetes "
           "(yardsticks: kubectl port-forward, kt-connect connect --disableTunDevice)")


@case("cluster-dataplane", "Cluster data plane: ktctl connect vs kubectl port-forward vs kt-connect",
      group="cluster")
def cluster_dataplane(ctx: Context) -> None:
    ctx.require_cluster()
    raise Skip(PENDING)


@case("cluster-dns", "DNS stub: queries/s and p99 vs asking the cluster DNS directly", group="cluster")
def cluster_dns(ctx: Context) -> None:
    ctx.require_cluster()
    raise Skip(PENDING)


@case("cluster-startup", "ktctl connect start-up time to the banner (image present)", group="cluster")
def cluster_startup(ctx: Context) -> None:
    ctx.require_cluster()
    raise Skip(PENDING)

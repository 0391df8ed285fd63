"""Every module here registers its cases with @case on import; the order here is the run order."""

from benchmarks.cases import cluster, loopback, memory, mesh, mesh_cluster, reverse, tuning  # noqa: F401

"""What the cluster's address plan looks like: service and pod CIDRs, DNS domain and IP, namespaces.

Every source here is best effort and read-only: an ordinary developer often may not list nodes or
namespaces, so each question has a fallback and a 403 never fails connect. The answers feed the routing
rules and the PAC file (which destinations go through the shadow pod).
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import re
from collections.abc import Iterable
from dataclasses import dataclass, field

from kubernetes import client as k8s

from ktproxy.kube.client import KubeClient, KubeError

log = logging.getLogger("ktproxy.kube.discovery")

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
DEFAULT_DOMAIN = "cluster.local"
# A documentation address (TEST-NET-3): only ever written into a dry-run request, never contacted.
_PROBE_CLUSTER_IP = "203.0.113.254"
_RANGE_RE = re.compile(r"valid IPs is ([0-9a-fA-F.:/]+(?:\s*,\s*[0-9a-fA-F.:/]+)*)")


@dataclass
class ClusterInfo:
    service_cidrs: list[IPNetwork] = field(default_factory=list)
    pod_cidrs: list[IPNetwork] = field(default_factory=list)
    domain: str = DEFAULT_DOMAIN
    dns: str | None = None  # cluster DNS service IP (kube-system/kube-dns)
    namespaces: list[str] = field(default_factory=list)
    sources: dict[str, str] = field(default_factory=dict)  # how each answer was found (for --debug)

    @property
    def cidrs(self) -> list[IPNetwork]:
        """Service and pod ranges together, without duplicates or ranges inside another."""
        return collapse([*self.service_cidrs, *self.pod_cidrs])


def collapse(nets: Iterable[IPNetwork]) -> list[IPNetwork]:
    v4 = [n for n in nets if n.version == 4]
    v6 = [n for n in nets if n.version == 6]
    return [*ipaddress.collapse_addresses(v4), *ipaddress.collapse_addresses(v6)]


def covering(ips: Iterable[str], v4_prefix: int = 16, v6_prefix: int = 64) -> list[IPNetwork]:
    """The /16 (IPv4) or /64 (IPv6) around each address: a guess at the range when no API says it."""
    nets: list[IPNetwork] = []
    for ip in ips:
        try:
            addr = ipaddress.ip_address(ip)
        except ValueError:
            continue
        if addr.is_loopback or addr.is_unspecified:
            continue
        prefix = v4_prefix if addr.version == 4 else v6_prefix
        nets.append(ipaddress.ip_network(f"{addr}/{prefix}", strict=False))
    return collapse(nets)


def parse_service_range_error(message: str) -> list[IPNetwork]:
    """'... The range of valid IPs is 10.96.0.0/16' (apiserver's allocation error) -> [10.96.0.0/16]."""
    m = _RANGE_RE.search(message or "")
    if not m:
        return []
    out: list[IPNetwork] = []
    for part in m.group(1).split(","):
        try:
            out.append(ipaddress.ip_network(part.strip(), strict=False))
        except ValueError:
            continue
    return out


def _net(text: str | None) -> IPNetwork | None:
    try:
        return ipaddress.ip_network(text, strict=False) if text else None
    except ValueError:
        return None


# ------------------------------------------------------------------------------------- services
async def _service_cidrs_from_api(kube: KubeClient) -> list[IPNetwork]:
    """networking.k8s.io/v1 ServiceCIDR objects (GA in Kubernetes 1.33): the authoritative answer."""
    api = k8s.NetworkingV1Api(kube.api)
    if not hasattr(api, "list_service_cidr"):
        return []
    try:
        items = (await kube.call(api.list_service_cidr)).items or []
    except KubeError as exc:
        log.debug("ServiceCIDR list unavailable: %s", exc)
        return []
    nets = [_net(c) for item in items for c in ((item.spec.cidrs if item.spec else None) or [])]
    return [n for n in nets if n]


async def _service_cidrs_from_dry_run(kube: KubeClient, namespace: str) -> list[IPNetwork]:
    """Ask the apiserver to allocate an impossible clusterIP in a dry run; its refusal names the range.

    kt-connect's trick; dry run means nothing is created. Needs only `create services` in the namespace.
    """
    body = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"generateName": "kt-cidr-probe-", "namespace": namespace},
        "spec": {"clusterIP": _PROBE_CLUSTER_IP, "ports": [{"port": 80}]},
    }
    try:
        await kube.call(kube.core.create_namespaced_service, namespace, body, dry_run="All")
    except KubeError as exc:
        nets = parse_service_range_error(str(exc))
        if not nets:
            log.debug("service range probe said: %s", exc)
        return nets
    return []  # accepted?! the probe address is in range; learn nothing


async def _service_ips(kube: KubeClient, namespace: str) -> list[str]:
    ips: list[str] = []
    for ns, name in (("default", "kubernetes"), ("kube-system", "kube-dns")):
        try:
            svc = await kube.call(kube.core.read_namespaced_service, name, ns)
            ips += [ip for ip in (svc.spec.cluster_i_ps or [svc.spec.cluster_ip]) if ip and ip != "None"]
        except KubeError:
            pass
    try:
        svcs = (await kube.call(kube.core.list_namespaced_service, namespace)).items or []
        for svc in svcs:
            ips += [ip for ip in (svc.spec.cluster_i_ps or [svc.spec.cluster_ip]) if ip and ip != "None"]
    except KubeError:
        pass
    return ips


async def service_cidrs(kube: KubeClient, namespace: str) -> tuple[list[IPNetwork], str]:
    nets = await _service_cidrs_from_api(kube)
    if nets:
        return collapse(nets), "ServiceCIDR objects"
    nets = await _service_cidrs_from_dry_run(kube, namespace)
    if nets:
        return collapse(nets), "apiserver clusterIP range (dry run)"
    nets = covering(await _service_ips(kube, namespace))
    return nets, "guessed /16 around known ClusterIPs" if nets else "unknown"


# ------------------------------------------------------------------------------------- pods
async def pod_cidrs(kube: KubeClient, namespace: str) -> tuple[list[IPNetwork], str]:
    try:
        nodes = (await kube.call(kube.core.list_node)).items or []
        nets = []
        for node in nodes:
            spec = node.spec
            for c in (spec.pod_cidrs if spec else None) or (
                [spec.pod_cidr] if spec and spec.pod_cidr else []
            ):
                if n := _net(c):
                    nets.append(n)
        if nets:
            return collapse(nets), "node.spec.podCIDRs"
    except KubeError as exc:
        log.debug("cannot list nodes: %s", exc)
    ips: list[str] = []
    for ns in dict.fromkeys([namespace, "kube-system"]):
        try:
            pods = (await kube.call(kube.core.list_namespaced_pod, ns)).items or []
        except KubeError:
            continue
        for p in pods:
            if p.spec and p.spec.host_network:
                continue  # host-network pods carry node IPs, not pod IPs
            st = p.status
            if st is None:
                continue
            ips += [x.ip for x in (st.pod_i_ps or []) if x.ip] or ([st.pod_ip] if st.pod_ip else [])
    nets = covering(ips)
    return nets, "guessed /16 around pod IPs" if nets else "unknown"


# ------------------------------------------------------------------------------------- dns, namespaces
async def cluster_dns(kube: KubeClient, svc_nets: list[IPNetwork]) -> tuple[str | None, str]:
    for name in ("kube-dns", "coredns", "rke2-coredns-rke2-coredns"):
        try:
            svc = await kube.call(kube.core.read_namespaced_service, name, "kube-system")
        except KubeError:
            continue
        if svc.spec and svc.spec.cluster_ip and svc.spec.cluster_ip != "None":
            return svc.spec.cluster_ip, f"kube-system/{name} service"
    # kubeadm and most installers put DNS at the 10th address of the service range.
    for net in svc_nets:
        if net.version == 4 and net.num_addresses > 16:
            return str(net.network_address + 10), "guessed: 10th address of the service range"
    return None, "unknown"


async def namespaces(kube: KubeClient, namespace: str) -> list[str]:
    try:
        items = (await kube.call(kube.core.list_namespace)).items or []
        names = [n.metadata.name for n in items if n.metadata and n.metadata.name]
    except KubeError as exc:
        log.debug("cannot list namespaces: %s", exc)
        names = []
    return sorted(set(names) | {namespace, "default", "kube-system"})


async def discover(kube: KubeClient, namespace: str | None = None, domain: str | None = None) -> ClusterInfo:
    """All of the above, concurrently; `domain` overrides the cluster domain (default cluster.local).

    The domain cannot be read without exec into a pod (resolv.conf) or node-proxy rights (kubelet
    configz), so it is cluster.local unless the user says otherwise (--cluster-domain).
    """
    ns = namespace or kube.namespace
    (svc, svc_src), (pods, pod_src), names = await asyncio.gather(
        service_cidrs(kube, ns), pod_cidrs(kube, ns), namespaces(kube, ns)
    )
    dns, dns_src = await cluster_dns(kube, svc)
    info = ClusterInfo(
        service_cidrs=svc,
        pod_cidrs=pods,
        domain=(domain or DEFAULT_DOMAIN).strip(".").lower(),
        dns=dns,
        namespaces=names,
        sources={
            "services": svc_src,
            "pods": pod_src,
            "dns": dns_src,
            "domain": "--cluster-domain" if domain else "default",
        },
    )
    log.debug(
        "cluster: services %s (%s), pods %s (%s), dns %s (%s), domain %s, %d namespaces",
        [str(n) for n in info.service_cidrs], svc_src, [str(n) for n in info.pod_cidrs], pod_src,
        dns, dns_src, info.domain, len(names),
    )  # fmt: skip
    if not info.service_cidrs and not info.pod_cidrs:
        log.warning("could not find the cluster's address ranges; only names will go through the cluster")
    return info

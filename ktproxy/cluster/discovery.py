"""What the cluster's address plan looks like: service and pod CIDRs, DNS domain and IP, namespaces.

Every source here is best effort and read-only: an ordinary developer often may not list nodes or
namespaces, so each question has a fallback and a 403 never fails connect. The answers feed the routing
rules and the PAC file (which destinations go through the shadow pod).
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import re
import socket
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from kubernetes import client as k8s

from ktproxy.cluster.errors import KubeError

if TYPE_CHECKING:
    from ktproxy.cluster.client import KubeClient

log = logging.getLogger("ktproxy.cluster.discovery")

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
# The network assumed around each of the laptop's own addresses: interface masks cannot be read
# portably, and a /24 (/64) is the smallest network a LAN commonly has.
_LOCAL_V4_PREFIX, _LOCAL_V6_PREFIX = 24, 64
# A guess is narrowed down to at most this prefix to stay clear of the laptop's networks, then dropped.
_NARROWEST_V4, _NARROWEST_V6 = 24, 64
DEFAULT_DOMAIN = "cluster.local"
# A documentation address (TEST-NET-3): only ever written into a dry-run request, never contacted.
_PROBE_CLUSTER_IP = "203.0.113.254"
GUESSED = "guessed"  # how a `sources` entry starts when the range is a guess
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


def _ip(text: str) -> IPAddress | None:
    try:
        return ipaddress.ip_address(text.split("%", 1)[0])
    except ValueError:
        return None


def local_addresses(towards: Iterable[str] = ()) -> list[IPAddress]:
    """This machine's own addresses, portably (no interface listing, which needs Linux-only calls):
    those its host name resolves to, and the source address the routing table picks towards each of
    `towards` (a UDP socket connect() sends nothing). The `towards` addresses themselves are included,
    so a guessed range never swallows the API server either."""
    found: list[str] = []
    with contextlib.suppress(OSError, UnicodeError):
        found += [str(info[4][0]) for info in socket.getaddrinfo(socket.gethostname(), None)]
    for host in towards:
        try:
            infos = socket.getaddrinfo(host, 443, type=socket.SOCK_DGRAM)
        except (OSError, UnicodeError):
            continue
        for family, _, _, _, sockaddr in infos:
            found.append(str(sockaddr[0]))
            with contextlib.suppress(OSError), socket.socket(family, socket.SOCK_DGRAM) as s:
                s.connect(sockaddr)
                found.append(str(s.getsockname()[0]))
    addrs = [a for a in map(_ip, found) if a is not None and not a.is_unspecified]
    return list(dict.fromkeys(addrs))


def _local_net(addr: IPAddress) -> IPNetwork:
    prefix = _LOCAL_V4_PREFIX if addr.version == 4 else _LOCAL_V6_PREFIX
    return ipaddress.ip_network(f"{addr}/{prefix}", strict=False)


def _guess(addr: IPAddress, prefix: int, avoid: list[IPNetwork]) -> IPNetwork | None:
    """The widest network around `addr`, from `prefix` down to the narrowest allowed, that overlaps
    none of `avoid`; None when even that would (the address sits on one of the laptop's networks)."""
    narrowest = _NARROWEST_V4 if addr.version == 4 else _NARROWEST_V6
    for p in range(prefix, max(prefix, narrowest) + 1):
        net = ipaddress.ip_network(f"{addr}/{p}", strict=False)
        if not any(net.overlaps(a) for a in avoid if a.version == net.version):
            return net
    return None


def covering(ips: Iterable[str], v4_prefix: int = 16, v6_prefix: int = 64,
             avoid: Iterable[IPAddress] = ()) -> list[IPNetwork]:
    """The /16 (IPv4) or /64 (IPv6) around each address: a guess at the range when no API says it.

    A guess must never send the laptop's own networks into the cluster: it is narrowed (down to a
    /24) until it stays clear of the network around each `avoid` address, or dropped."""
    local = [_local_net(a) for a in avoid if not a.is_loopback]
    nets: list[IPNetwork] = []
    for ip in ips:
        addr = _ip(ip)
        if addr is None or addr.is_loopback or addr.is_unspecified:
            continue
        wanted = v4_prefix if addr.version == 4 else v6_prefix
        net = _guess(addr, wanted, local)
        if net is None:
            log.warning("not guessing a cluster range around %s: it is on this machine's network", addr)
        elif net.prefixlen != wanted:
            log.warning("guessed cluster range around %s narrowed to %s to keep this machine's network direct",
                        addr, net)
        if net is not None:
            nets.append(net)
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


def _cluster_ips(svc: k8s.V1Service) -> list[str]:
    spec = svc.spec
    if spec is None:
        return []
    return [ip for ip in (spec.cluster_ips or [spec.cluster_ip]) if ip and ip != "None"]


async def _service_ips(kube: KubeClient, namespace: str) -> list[str]:
    ips: list[str] = []
    for ns, name in (("default", "kubernetes"), ("kube-system", "kube-dns")):
        try:
            ips += _cluster_ips(await kube.call(kube.core.read_namespaced_service, name, ns))
        except KubeError as exc:
            log.debug("cannot read service %s/%s: %s", ns, name, exc)
    try:
        for svc in (await kube.call(kube.core.list_namespaced_service, namespace)).items or []:
            ips += _cluster_ips(svc)
    except KubeError as exc:
        log.debug("cannot list services in %s: %s", namespace, exc)
    return ips


async def service_cidrs(kube: KubeClient, namespace: str,
                        avoid: Iterable[IPAddress] = ()) -> tuple[list[IPNetwork], str]:
    nets = await _service_cidrs_from_api(kube)
    if nets:
        return collapse(nets), "ServiceCIDR objects"
    nets = await _service_cidrs_from_dry_run(kube, namespace)
    if nets:
        return collapse(nets), "apiserver clusterIP range (dry run)"
    nets = covering(await _service_ips(kube, namespace), avoid=avoid)
    return nets, GUESSED + " around known ClusterIPs" if nets else "unknown"


# ------------------------------------------------------------------------------------- pods
def _pod_ips(pod: k8s.V1Pod) -> list[str]:
    if pod.spec and pod.spec.host_network:
        return []  # host-network pods carry node IPs, not pod IPs
    st = pod.status
    if st is None:
        return []
    return [x.ip for x in (st.pod_ips or []) if x.ip] or ([st.pod_ip] if st.pod_ip else [])


async def pod_cidrs(kube: KubeClient, namespace: str,
                    avoid: Iterable[IPAddress] = ()) -> tuple[list[IPNetwork], str]:
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
        except KubeError as exc:
            log.debug("cannot list pods in %s: %s", ns, exc)
            continue
        for p in pods:
            ips += _pod_ips(p)
    nets = covering(ips, avoid=avoid)
    return nets, GUESSED + " around pod IPs" if nets else "unknown"


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


async def discover(kube: KubeClient, namespace: str | None = None, domain: str | None = None,
                   local: Iterable[IPAddress] | None = None) -> ClusterInfo:
    """All of the above, concurrently; `domain` overrides the cluster domain (default cluster.local).

    The domain cannot be read without exec into a pod (resolv.conf) or node-proxy rights (kubelet
    configz), so it is cluster.local unless the user says otherwise (--cluster-domain). `local` are
    this machine's addresses, which a guessed range must leave alone (default: `local_addresses`
    towards the API server).
    """
    ns = namespace or kube.namespace
    if local is None:
        local = await asyncio.to_thread(local_addresses, [kube.server_host])
    avoid = list(local)
    (svc, svc_src), (pods, pod_src), names = await asyncio.gather(
        service_cidrs(kube, ns, avoid), pod_cidrs(kube, ns, avoid), namespaces(kube, ns)
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
    for what, nets, src in (("service", svc, svc_src), ("pod", pods, pod_src)):
        if src.startswith(GUESSED):
            # A guess can be wrong both ways; the user should know which addresses now go to the cluster.
            log.warning("the cluster's %s range is a guess (%s): %s goes through the cluster; "
                        "add missing ranges with --include-ips", what, src, ", ".join(map(str, nets)))
    if not info.service_cidrs and not info.pod_cidrs:
        log.warning("could not find the cluster's address ranges; only names will go through the cluster")
    return info

"""DNS stub tests with real sockets on 127.0.0.1 only.

A dnslib-based "cluster DNS" (asyncio, DNS over TCP, many queries per connection like CoreDNS) stands
behind a tunnel that is plain asyncio.open_connection here; a dnslib DNSServer (threads, UDP+TCP) plays
the upstream resolver. Nothing here ever reads /etc/resolv.conf's servers or leaves loopback.
"""

from __future__ import annotations

import asyncio
import collections
import ipaddress
import shutil
import struct
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from dnslib import EDNS0, QTYPE, RCODE, RR, DNSHeader, DNSLabel, DNSQuestion, DNSRecord, EDNSOption
from dnslib.server import BaseResolver, DNSHandler, DNSServer
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ktproxy.dns import (
    DNSStub,
    candidate_names,
    label_text,
    parse_resolv_conf,
    reverse_name_to_ip,
    rewrite_owner,
    split_service_labels,
)
from ktproxy.routing import ClusterRules

LOOP = "127.0.0.1"

CLUSTER_ZONE = """
tomcat.default.svc.cluster.local. 30 IN A 10.96.0.20
tomcat.default.svc.cluster.local. 30 IN AAAA fd00:96::20
_http._tcp.tomcat.default.svc.cluster.local. 30 IN SRV 0 100 8080 tomcat.default.svc.cluster.local.
kubernetes.default.svc.cluster.local. 30 IN A 10.96.0.1
web.other.svc.cluster.local. 30 IN A 10.96.0.30
legacy.cluster.local. 30 IN A 10.96.0.40
alias.default.svc.cluster.local. 30 IN CNAME tomcat.default.svc.cluster.local.
tomcat.default.svc.cluster.local. 30 IN A 10.96.0.20
20.0.96.10.in-addr.arpa. 30 IN PTR tomcat.default.svc.cluster.local.
""" + (ipaddress.ip_address("fd00:96::20").reverse_pointer + ". 30 IN PTR tomcat.default.svc.cluster.local.\n")
CLUSTER_SOA = "cluster.local. 30 IN SOA ns.dns.cluster.local. hostmaster.cluster.local. 1 7200 1800 86400 30"
REVERSE_SOA = "in-addr.arpa. 30 IN SOA ns.dns.cluster.local. hostmaster.cluster.local. 1 7200 1800 86400 30"

UPSTREAM_ZONE = """
www.example.com. 60 IN A 192.0.2.10
www.example.com. 60 IN AAAA 2001:db8::10
jira. 60 IN A 192.0.2.20
docs.other. 60 IN A 192.0.2.21
""" + "".join(f'big.example.com. 60 IN TXT "{"x" * 200}{i}"\n' for i in range(6))
UPSTREAM_SOA = "example.com. 60 IN SOA ns.example.com. root.example.com. 1 7200 1800 86400 15"


def _zone(text: str) -> dict[tuple[str, int], list[RR]]:
    out: dict[tuple[str, int], list[RR]] = collections.defaultdict(list)
    for rr in RR.fromZone(text):
        key = (str(rr.rname).lower(), rr.rtype)
        if rr not in out[key]:
            out[key].append(rr)
    return out


def _answer(request: DNSRecord, zone: dict[tuple[str, int], list[RR]], soa: list[RR]) -> DNSRecord:
    """A tiny authoritative server: answers, CNAME chasing, NXDOMAIN/NODATA with SOA."""
    reply = request.reply()
    name, qtype = str(request.q.qname).lower(), request.q.qtype
    for _ in range(8):
        if (name, qtype) in zone:
            reply.rr.extend(zone[(name, qtype)])
            break
        if (name, QTYPE.CNAME) in zone and qtype != QTYPE.CNAME:
            cname = zone[(name, QTYPE.CNAME)][0]
            reply.rr.append(cname)
            name = str(cname.rdata.label).lower()
            continue
        if not any(k[0] == name for k in zone):
            reply.header.rcode = RCODE.NXDOMAIN
        reply.auth.extend(soa)
        break
    return reply


# --------------------------------------------------------------------------------------------------
# The fake cluster DNS (behind the "tunnel")
# --------------------------------------------------------------------------------------------------
@dataclass
class ClusterDNS:
    zone: dict[tuple[str, int], list[RR]] = field(default_factory=lambda: _zone(CLUSTER_ZONE))
    queries: collections.Counter[tuple[str, int]] = field(default_factory=collections.Counter)
    connections: int = 0
    close_after_answer: bool = False
    hang_up_on_next_query: bool = False  # read one query, then close unanswered (an idle close racing it)
    ids: list[int] = field(default_factory=list)
    silent: bool = False  # read queries, never answer: a wedged tunnel
    writers: list[asyncio.StreamWriter] = field(default_factory=list)
    tasks: set[asyncio.Task[Any]] = field(default_factory=set)
    server: asyncio.Server | None = None
    port: int = 0

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._serve, LOOP, 0)
        self.port = self.server.sockets[0].getsockname()[1]

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self.writers.append(writer)
        me = asyncio.current_task()
        assert me is not None
        self.tasks.add(me)
        me.add_done_callback(self.tasks.discard)
        try:
            while True:
                (length,) = struct.unpack("!H", await reader.readexactly(2))
                request = DNSRecord.parse(await reader.readexactly(length))
                self.queries[(str(request.q.qname).lower(), request.q.qtype)] += 1
                self.ids.append(request.header.id)
                if self.hang_up_on_next_query:
                    self.hang_up_on_next_query = False
                    break
                if self.silent:
                    continue
                name = str(request.q.qname).lower()
                soa = _zone(REVERSE_SOA if name.endswith("arpa.") else CLUSTER_SOA)
                reply = _answer(request, self.zone, next(iter(soa.values()))).pack()
                writer.write(struct.pack("!H", len(reply)) + reply)
                await writer.drain()
                if self.close_after_answer:
                    break
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    def drop_connections(self) -> None:
        for w in self.writers:
            w.close()
        self.writers.clear()

    def total(self) -> int:
        return sum(self.queries.values())

    async def stop(self) -> None:
        self.drop_connections()
        if self.server is not None:
            self.server.close()
        # Let handlers see their closed sockets and finish, rather than be cancelled at loop teardown.
        await asyncio.wait(self.tasks, timeout=2) if self.tasks else None


@dataclass
class Tunnel:
    """Stands in for the SSH tunnel's open_connection; can be made to fail like a dead session."""

    fail: bool = False
    opens: int = 0
    targets: list[tuple[str, int]] = field(default_factory=list)

    async def open_connection(self, host: str, port: int) -> tuple[Any, Any]:
        self.targets.append((host, port))
        if self.fail:
            raise ConnectionRefusedError("tunnel down")
        self.opens += 1
        return await asyncio.open_connection(host, port)


# --------------------------------------------------------------------------------------------------
# The fake upstream resolver (dnslib's own threaded server)
# --------------------------------------------------------------------------------------------------
class UpstreamResolver(BaseResolver):
    def __init__(self) -> None:
        self.zone = _zone(UPSTREAM_ZONE)
        self.soa = next(iter(_zone(UPSTREAM_SOA).values()))
        self.queries: collections.Counter[tuple[str, int]] = collections.Counter()
        self.ids: list[int] = []

    def resolve(self, request: DNSRecord, handler: Any) -> DNSRecord:
        self.queries[(str(request.q.qname).lower(), request.q.qtype)] += 1
        self.ids.append(request.header.id)
        return _answer(request, self.zone, self.soa)


class TruncatingHandler(DNSHandler):
    udplen = 512  # so big answers come back with TC over UDP, as a real resolver's would


@pytest.fixture(scope="module")
def upstream() -> Iterator[tuple[UpstreamResolver, tuple[str, int]]]:
    resolver = UpstreamResolver()
    # UDP and TCP must share a port; the kernel may already use the UDP port's number for a TCP
    # connection (a busy machine in CI did), so try a few.
    for _ in range(50):
        udp = DNSServer(resolver, address=LOOP, port=0, handler=TruncatingHandler, logger=_QuietLogger())
        port = udp.server.server_address[1]
        try:
            tcp = DNSServer(resolver, address=LOOP, port=port, tcp=True, logger=_QuietLogger())
            break
        except OSError:
            udp.server.server_close()
    else:
        raise RuntimeError("no port free for both UDP and TCP on loopback")
    udp.start_thread()
    tcp.start_thread()
    yield resolver, (LOOP, port)
    for server in (udp, tcp):
        server.stop()
        server.server.server_close()


class _QuietLogger:
    def __getattr__(self, name: str) -> Any:
        return lambda *a, **k: None


@dataclass
class Env:
    stub: DNSStub
    cluster: ClusterDNS
    tunnel: Tunnel
    upstream: UpstreamResolver
    now: list[float]

    @property
    def port(self) -> int:
        return self.stub.bound_port


def make_rules(**kw: Any) -> ClusterRules:
    return ClusterRules(namespace="default", cidrs=["10.96.0.0/16", "fd00:96::/64"], namespaces={"other"}, **kw)


@pytest.fixture
async def env(upstream: tuple[UpstreamResolver, tuple[str, int]]) -> AsyncIterator[Env]:
    resolver, addr = upstream
    resolver.queries.clear()
    resolver.ids.clear()
    cluster = ClusterDNS()
    await cluster.start()
    tunnel = Tunnel()
    now = [1000.0]
    stub = DNSStub(
        make_rules(),
        tunnel.open_connection,
        (LOOP, cluster.port),
        upstream=[addr],
        timeout=1.0,
        clock=lambda: now[0],
    )
    await stub.start(LOOP, 0)
    try:
        yield Env(stub, cluster, tunnel, resolver, now)
    finally:
        await stub.close()
        await cluster.stop()


# --------------------------------------------------------------------------------------------------
# Clients
# --------------------------------------------------------------------------------------------------
class _Catch(asyncio.DatagramProtocol):
    def __init__(self) -> None:
        self.got: asyncio.Queue[bytes] = asyncio.Queue()

    def datagram_received(self, data: bytes, addr: Any) -> None:
        self.got.put_nowait(data)


async def udp_raw(port: int, data: bytes, wait: float = 2.0) -> bytes | None:
    loop = asyncio.get_running_loop()
    transport, proto = await loop.create_datagram_endpoint(_Catch, remote_addr=(LOOP, port))
    try:
        transport.sendto(data)
        return await asyncio.wait_for(proto.got.get(), wait)
    except TimeoutError:
        return None
    finally:
        transport.close()


async def udp_query(port: int, name: str, qtype: str = "A", edns: bool = False) -> DNSRecord:
    q = DNSRecord.question(name, qtype)
    if edns:
        q.add_ar(EDNS0(udp_len=4096))
    raw = await udp_raw(port, q.pack(), wait=5.0)
    assert raw is not None, f"no UDP answer for {name} {qtype}"
    reply = DNSRecord.parse(raw)
    assert reply.header.id == q.header.id
    return reply


async def tcp_exchange(port: int, *packets: bytes) -> list[DNSRecord]:
    reader, writer = await asyncio.open_connection(LOOP, port)
    try:
        for p in packets:
            writer.write(struct.pack("!H", len(p)) + p)
        await writer.drain()
        out = []
        for _ in packets:
            (n,) = struct.unpack("!H", await asyncio.wait_for(reader.readexactly(2), 5))
            out.append(DNSRecord.parse(await reader.readexactly(n)))
        return out
    finally:
        writer.close()


async def tcp_query(port: int, name: str, qtype: str = "A") -> DNSRecord:
    q = DNSRecord.question(name, qtype)
    (reply,) = await tcp_exchange(port, q.pack())
    assert reply.header.id == q.header.id
    return reply


def addrs(reply: DNSRecord, qtype: int = QTYPE.A) -> list[str]:
    return [str(rr.rdata) for rr in reply.rr if rr.rtype == qtype]


# --------------------------------------------------------------------------------------------------
# Cluster names
# --------------------------------------------------------------------------------------------------
async def test_short_name_uses_search_list_and_keeps_question(env: Env) -> None:
    reply = await udp_query(env.port, "tomcat.")
    assert reply.header.rcode == RCODE.NOERROR
    assert str(reply.q.qname) == "tomcat."
    assert addrs(reply) == ["10.96.0.20"]
    # The owner is the name the client asked, or resolvers would discard the answer.
    assert [str(rr.rname) for rr in reply.rr] == ["tomcat."]
    assert env.cluster.queries[("tomcat.default.svc.cluster.local.", QTYPE.A)] == 1
    assert env.upstream.queries == {}


@pytest.mark.parametrize(
    "name",
    ["tomcat.default", "tomcat.default.svc", "tomcat.default.svc.cluster.local", "TomCat.Default."],
)
async def test_namespace_forms_and_fqdn(env: Env, name: str) -> None:
    for query in (udp_query, tcp_query):
        reply = await query(env.port, name)
        assert addrs(reply) == ["10.96.0.20"], name
        assert reply.rr[0].rname == DNSLabel(name)
        assert str(reply.rr[0].rname).rstrip(".") == name.rstrip(".")  # the client's own spelling


async def test_other_namespace_and_search_fallback(env: Env) -> None:
    assert addrs(await udp_query(env.port, "web.other")) == ["10.96.0.30"]
    # Not in the connect namespace: found further down the search list, like in a pod.
    reply = await udp_query(env.port, "legacy")
    assert addrs(reply) == ["10.96.0.40"]
    assert str(reply.rr[0].rname) == "legacy."


async def test_aaaa_and_srv(env: Env) -> None:
    reply = await udp_query(env.port, "tomcat", "AAAA")
    assert addrs(reply, QTYPE.AAAA) == ["fd00:96::20"]
    reply = await tcp_query(env.port, "_http._tcp.tomcat.default.svc.cluster.local", "SRV")
    (srv,) = reply.rr
    assert srv.rtype == QTYPE.SRV and srv.rdata.port == 8080
    assert str(srv.rdata.target) == "tomcat.default.svc.cluster.local."


@pytest.mark.parametrize("name", ["_http._tcp.tomcat", "_http._tcp.tomcat.default", "_http._tcp.tomcat.default.svc"])
async def test_short_srv_names_use_the_search_list(env: Env, name: str) -> None:
    """SRV questions for short service names are cluster questions, expanded like a pod would."""
    reply = await udp_query(env.port, name, "SRV")
    (srv,) = reply.rr
    assert srv.rtype == QTYPE.SRV and srv.rdata.port == 8080
    assert str(srv.rname).rstrip(".") == name
    assert env.cluster.queries[("_http._tcp.tomcat.default.svc.cluster.local.", QTYPE.SRV)] == 1
    assert env.upstream.queries == {}


def test_split_service_labels() -> None:
    assert split_service_labels("_http._tcp.tomcat") == ("_http._tcp.", "tomcat")
    assert split_service_labels("_sip._udp.example.com") == ("_sip._udp.", "example.com")
    assert split_service_labels("tomcat.default") == ("", "tomcat.default")
    assert split_service_labels("_only") == ("", "_only")
    assert split_service_labels("_a._b") == ("_a.", "_b")


async def test_non_cluster_srv_names_go_upstream(env: Env) -> None:
    await udp_query(env.port, "_xmpp._tcp.example.com", "SRV")
    assert env.cluster.total() == 0


async def test_cname_chain_is_kept(env: Env) -> None:
    reply = await udp_query(env.port, "alias")
    assert [(str(rr.rname), QTYPE.get(rr.rtype)) for rr in reply.rr] == [
        ("alias.", "CNAME"),
        ("tomcat.default.svc.cluster.local.", "A"),
    ]
    assert str(reply.rr[0].rdata.label) == "tomcat.default.svc.cluster.local."


async def test_nxdomain_carries_cluster_soa(env: Env) -> None:
    reply = await udp_query(env.port, "nosuchsvc")
    assert reply.header.rcode == RCODE.NXDOMAIN
    assert str(reply.q.qname) == "nosuchsvc."
    assert not reply.rr
    assert [QTYPE.get(rr.rtype) for rr in reply.auth] == ["SOA"]
    assert str(reply.auth[0].rname) == "cluster.local."
    # The whole search list was tried; then (B1: a short name may be a LAN name) the upstream once,
    # which denies it too, so the cluster's answer stands.
    assert env.cluster.total() == 3
    assert env.upstream.queries == {("nosuchsvc.", QTYPE.A): 1}


async def test_nodata_is_noerror_with_soa(env: Env) -> None:
    reply = await udp_query(env.port, "kubernetes", "AAAA")
    assert reply.header.rcode == RCODE.NOERROR and not reply.rr and reply.auth


async def test_ptr_for_cluster_cidrs(env: Env) -> None:
    reply = await udp_query(env.port, "20.0.96.10.in-addr.arpa", "PTR")
    assert [str(rr.rdata) for rr in reply.rr] == ["tomcat.default.svc.cluster.local."]
    v6 = ipaddress.ip_address("fd00:96::20").reverse_pointer
    reply = await tcp_query(env.port, v6, "PTR")
    assert [str(rr.rdata) for rr in reply.rr] == ["tomcat.default.svc.cluster.local."]
    assert env.upstream.queries == {}


async def test_ptr_outside_cidrs_goes_upstream(env: Env) -> None:
    reply = await udp_query(env.port, "10.2.0.192.in-addr.arpa", "PTR")
    assert reply.header.rcode == RCODE.NXDOMAIN
    assert env.upstream.queries[("10.2.0.192.in-addr.arpa.", QTYPE.PTR)] == 1
    assert env.cluster.total() == 0


async def test_other_types_pass_through(env: Env) -> None:
    reply = await udp_query(env.port, "tomcat", "TXT")
    assert reply.header.rcode == RCODE.NOERROR
    assert env.cluster.queries[("tomcat.default.svc.cluster.local.", QTYPE.TXT)] == 1


@pytest.mark.parametrize(("name", "ip"), [("jira", "192.0.2.20"), ("docs.other", "192.0.2.21")])
async def test_short_name_the_cluster_does_not_know_falls_back_upstream(env: Env, name: str, ip: str) -> None:
    # B1: `jira` (one label) and `docs.other` (svc.ns) are cluster names only by the short-name rules;
    # after the whole search list says NXDOMAIN, the system's resolver answers.
    for query in (udp_query, tcp_query):
        env.stub.clear_cache()
        reply = await query(env.port, name)
        assert reply.header.rcode == RCODE.NOERROR and addrs(reply) == [ip]
        assert str(reply.rr[0].rname).rstrip(".") == name
    assert env.upstream.queries[(name + ".", QTYPE.A)] == 2
    assert env.cluster.total() == 6  # the cluster was asked first, every name of the search list


@pytest.mark.parametrize("name", ["nosuchsvc.default.svc.cluster.local", "nosuchsvc.default.svc", "x.default.pod"])
async def test_names_only_the_cluster_has_never_go_upstream(env: Env, name: str) -> None:
    assert (await udp_query(env.port, name)).header.rcode == RCODE.NXDOMAIN
    assert env.upstream.queries == {}


async def test_fallback_needs_an_nxdomain_not_an_outage(env: Env) -> None:
    env.tunnel.fail = True
    assert (await udp_query(env.port, "jira")).header.rcode == RCODE.SERVFAIL
    assert env.upstream.queries == {}


# --------------------------------------------------------------------------------------------------
# Upstream
# --------------------------------------------------------------------------------------------------
async def test_query_ids_come_from_secrets(env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    # S3/S311: the id of every query the stub sends (upstream and cluster) is drawn from `secrets`.
    import secrets

    monkeypatch.setattr(secrets, "randbelow", lambda n: 0x5EC7 % n)
    await udp_query(env.port, "www.example.com")
    await udp_query(env.port, "tomcat")
    assert env.upstream.ids == [0x5EC7]
    assert env.cluster.ids == [0x5EC7]


async def test_non_cluster_names_go_upstream(env: Env) -> None:
    reply = await udp_query(env.port, "www.example.com")
    assert addrs(reply) == ["192.0.2.10"]
    reply = await tcp_query(env.port, "www.example.com", "AAAA")
    assert addrs(reply, QTYPE.AAAA) == ["2001:db8::10"]
    reply = await udp_query(env.port, "nope.example.com")
    assert reply.header.rcode == RCODE.NXDOMAIN
    assert str(reply.auth[0].rname) == "example.com."
    assert env.cluster.total() == 0
    assert env.tunnel.opens == 0


async def test_route_all_does_not_change_dns(upstream: tuple[UpstreamResolver, tuple[str, int]]) -> None:
    _, addr = upstream
    cluster = ClusterDNS()
    await cluster.start()
    tunnel = Tunnel()
    stub = DNSStub(make_rules(route_all=True), tunnel.open_connection, (LOOP, cluster.port), upstream=[addr])
    await stub.start(LOOP, 0)
    try:
        assert addrs(await udp_query(stub.bound_port, "www.example.com")) == ["192.0.2.10"]
        assert addrs(await udp_query(stub.bound_port, "tomcat")) == ["10.96.0.20"]
        assert cluster.queries[("www.example.com.", QTYPE.A)] == 0
    finally:
        await stub.close()
        await cluster.stop()


async def test_big_upstream_answer_truncates_then_tcp(env: Env) -> None:
    # Upstream truncates at 512 over UDP; the stub retries it over TCP, then itself truncates
    # for a plain (non-EDNS) UDP client, which gets the whole answer over TCP.
    reply = await udp_query(env.port, "big.example.com", "TXT")
    assert reply.header.tc == 1 and not reply.rr
    reply = await tcp_query(env.port, "big.example.com", "TXT")
    assert len(reply.rr) == 6
    # An EDNS client with a big buffer gets it all over UDP.
    reply = await udp_query(env.port, "big.example.com", "TXT", edns=True)
    assert len(reply.rr) == 6 and reply.header.tc == 0
    assert any(rr.rtype == QTYPE.OPT for rr in reply.ar)


async def test_dead_upstream_gives_servfail_quickly() -> None:
    # A loopback UDP port with nothing on it: ICMP port-unreachable or silence, either way SERVFAIL.
    stub = DNSStub(make_rules(), Tunnel().open_connection, (LOOP, 9), upstream=[(LOOP, 9)], timeout=0.5)
    await stub.start(LOOP, 0)
    try:
        t0 = time.monotonic()
        reply = await udp_query(stub.bound_port, "www.example.com")
        assert reply.header.rcode == RCODE.SERVFAIL
        assert time.monotonic() - t0 < 2
    finally:
        await stub.close()


async def test_no_upstream_means_servfail_not_a_guess() -> None:
    stub = DNSStub(make_rules(), Tunnel().open_connection, (LOOP, 9), upstream=[])
    await stub.start(LOOP, 0)
    try:
        assert (await udp_query(stub.bound_port, "www.example.com")).header.rcode == RCODE.SERVFAIL
    finally:
        await stub.close()


# --------------------------------------------------------------------------------------------------
# Cache
# --------------------------------------------------------------------------------------------------
async def test_cache_hits_skip_the_cluster_and_ttls_decrement(env: Env) -> None:
    first = await udp_query(env.port, "tomcat")
    assert first.rr[0].ttl == 30
    env.now[0] += 10
    second = await tcp_query(env.port, "TOMCAT")
    assert second.rr[0].ttl == 20
    assert str(second.rr[0].rname) == "TOMCAT."
    assert env.cluster.queries[("tomcat.default.svc.cluster.local.", QTYPE.A)] == 1
    env.now[0] += 21  # past the 30 s TTL
    third = await udp_query(env.port, "tomcat")
    assert third.rr[0].ttl == 30
    assert env.cluster.queries[("tomcat.default.svc.cluster.local.", QTYPE.A)] == 2


async def test_cache_key_includes_type(env: Env) -> None:
    await udp_query(env.port, "tomcat", "A")
    await udp_query(env.port, "tomcat", "AAAA")
    await udp_query(env.port, "tomcat", "A")
    assert env.cluster.total() == 2


async def test_negative_cache_uses_soa_minimum(env: Env) -> None:
    await udp_query(env.port, "nosuchsvc")
    assert env.cluster.total() == 3
    env.now[0] += 29
    assert (await udp_query(env.port, "nosuchsvc")).header.rcode == RCODE.NXDOMAIN
    assert env.cluster.total() == 3
    env.now[0] += 2
    await udp_query(env.port, "nosuchsvc")
    assert env.cluster.total() == 6


async def test_cache_key_includes_do_and_cd(env: Env) -> None:
    # A DNSSEC-aware client (DO) or one that disabled checking (CD) gets its own answer, not one
    # cached for a plain client (without RRSIGs, or validated).
    plain = DNSRecord.question("www.example.com")
    do = DNSRecord.question("www.example.com")
    do.add_ar(EDNS0(udp_len=4096, flags="do"))
    cd = DNSRecord.question("www.example.com")
    cd.header.cd = 1
    for q in (plain, do, cd, plain, do, cd):
        assert addrs(DNSRecord.parse(await udp_raw(env.port, q.pack()) or b"")) == ["192.0.2.10"]
    assert env.upstream.queries[("www.example.com.", QTYPE.A)] == 3


async def test_upstream_answers_are_cached_too(env: Env) -> None:
    await udp_query(env.port, "www.example.com")
    env.now[0] += 59
    reply = await udp_query(env.port, "www.example.com")
    assert reply.rr[0].ttl == 1
    assert env.upstream.queries[("www.example.com.", QTYPE.A)] == 1


async def test_servfail_is_not_cached(env: Env) -> None:
    env.tunnel.fail = True
    assert (await udp_query(env.port, "tomcat")).header.rcode == RCODE.SERVFAIL
    env.tunnel.fail = False
    assert addrs(await udp_query(env.port, "tomcat")) == ["10.96.0.20"]


# --------------------------------------------------------------------------------------------------
# Tunnel behaviour
# --------------------------------------------------------------------------------------------------
async def test_tunnel_streams_are_reused(env: Env) -> None:
    for name in ["tomcat", "kubernetes", "web.other", "alias", "tomcat.default.svc"] * 2:
        env.stub.clear_cache()
        assert (await udp_query(env.port, name)).header.rcode == RCODE.NOERROR
    assert env.tunnel.opens == 1
    assert env.cluster.connections == 1
    assert env.tunnel.targets == [(LOOP, env.cluster.port)]


async def test_concurrent_queries_pipeline_on_few_streams(env: Env) -> None:
    names = ["tomcat", "kubernetes", "web.other", "legacy", "alias"]
    replies = await asyncio.gather(*(udp_query(env.port, n, t) for n in names for t in ("A", "AAAA", "TXT", "SRV")))
    assert all(r.header.rcode in (RCODE.NOERROR,) for r in replies)
    assert addrs(replies[0]) == ["10.96.0.20"]
    assert env.tunnel.opens <= 2


async def test_cluster_closing_idle_streams_is_transparent(env: Env) -> None:
    env.cluster.close_after_answer = True
    for name in ["tomcat", "kubernetes", "web.other"]:
        assert (await udp_query(env.port, name)).header.rcode == RCODE.NOERROR
        await asyncio.sleep(0.05)
    assert env.tunnel.opens == 3


async def test_stream_dropped_under_a_query_is_retried(env: Env) -> None:
    assert addrs(await udp_query(env.port, "tomcat")) == ["10.96.0.20"]
    # The cluster DNS closes the stream the moment the next query arrives on it (an idle close that
    # crossed the query): deterministically the case the pool's one retry on a fresh stream is for.
    env.cluster.hang_up_on_next_query = True
    assert addrs(await udp_query(env.port, "kubernetes")) == ["10.96.0.1"]
    assert env.cluster.queries[("kubernetes.default.svc.cluster.local.", QTYPE.A)] == 2
    assert env.tunnel.opens == 2 and env.cluster.connections == 2


async def test_tunnel_failure_servfail_then_recovery(env: Env) -> None:
    assert addrs(await udp_query(env.port, "tomcat")) == ["10.96.0.20"]
    env.tunnel.fail = True
    env.cluster.drop_connections()
    await asyncio.sleep(0.05)
    t0 = time.monotonic()
    reply = await udp_query(env.port, "kubernetes")
    assert reply.header.rcode == RCODE.SERVFAIL
    assert time.monotonic() - t0 < 0.9  # a refused tunnel fails at once, not at the timeout
    # Cached names keep working while the tunnel is down; upstream names are unaffected.
    assert addrs(await udp_query(env.port, "tomcat")) == ["10.96.0.20"]
    assert addrs(await udp_query(env.port, "www.example.com")) == ["192.0.2.10"]
    env.tunnel.fail = False
    assert addrs(await udp_query(env.port, "kubernetes")) == ["10.96.0.1"]


async def test_wedged_tunnel_times_out_then_recovers(env: Env) -> None:
    env.cluster.silent = True
    t0 = time.monotonic()
    reply = await udp_query(env.port, "tomcat")
    elapsed = time.monotonic() - t0
    assert reply.header.rcode == RCODE.SERVFAIL
    assert 0.8 < elapsed < 2.0  # timeout=1.0
    env.cluster.silent = False
    assert addrs(await udp_query(env.port, "tomcat")) == ["10.96.0.20"]
    assert env.tunnel.opens == 2  # the silent stream was abandoned, not waited on again


# --------------------------------------------------------------------------------------------------
# Malformed input and transports
# --------------------------------------------------------------------------------------------------
async def test_garbage_udp_is_dropped_and_service_continues(env: Env) -> None:
    assert await udp_raw(env.port, b"\x01\x02\x03", wait=0.3) is None
    assert await udp_raw(env.port, b"", wait=0.3) is None
    assert addrs(await udp_query(env.port, "tomcat")) == ["10.96.0.20"]


async def test_bad_question_gets_formerr(env: Env) -> None:
    # A header claiming one question, followed by a truncated name.
    data = struct.pack("!6H", 0xBEEF, 0x0100, 1, 0, 0, 0) + b"\x07tomc"
    raw = await udp_raw(env.port, data)
    assert raw is not None
    reply = DNSRecord.parse(raw)
    assert reply.header.id == 0xBEEF and reply.header.rcode == RCODE.FORMERR and reply.header.qr == 1
    # Two questions is also a format error for us.
    two = DNSRecord(DNSHeader(id=7), questions=[DNSQuestion("a"), DNSQuestion("b")])
    reply = DNSRecord.parse(await udp_raw(env.port, two.pack()) or b"")
    assert reply.header.id == 7 and reply.header.rcode == RCODE.FORMERR
    assert addrs(await udp_query(env.port, "tomcat")) == ["10.96.0.20"]


async def test_responses_are_not_answered_and_other_opcodes_notimp(env: Env) -> None:
    resp = DNSRecord.question("tomcat")
    resp.header.qr = 1
    assert await udp_raw(env.port, resp.pack(), wait=0.3) is None
    status = DNSRecord.question("tomcat")
    status.header.opcode = 2
    reply = DNSRecord.parse(await udp_raw(env.port, status.pack()) or b"")
    assert reply.header.rcode == RCODE.NOTIMP and reply.header.opcode == 2


async def test_tcp_many_queries_per_connection(env: Env) -> None:
    qs = [DNSRecord.question(n, t) for n, t in [("tomcat", "A"), ("www.example.com", "A"), ("nosuchsvc", "A")]]
    replies = await tcp_exchange(env.port, *(q.pack() for q in qs))
    by_id = {r.header.id: r for r in replies}
    assert set(by_id) == {q.header.id for q in qs}
    assert addrs(by_id[qs[0].header.id]) == ["10.96.0.20"]
    assert addrs(by_id[qs[1].header.id]) == ["192.0.2.10"]
    assert by_id[qs[2].header.id].header.rcode == RCODE.NXDOMAIN


async def test_tcp_garbage_closes_connection(env: Env) -> None:
    reader, writer = await asyncio.open_connection(LOOP, env.port)
    writer.write(b"\x00\x03abc")
    await writer.drain()
    assert await asyncio.wait_for(reader.read(), 2) == b""
    writer.close()
    # Malformed but with a header: FORMERR, then the stub closes.
    reader, writer = await asyncio.open_connection(LOOP, env.port)
    data = struct.pack("!6H", 0xABCD, 0x0100, 1, 0, 0, 0) + b"\x3f"
    writer.write(struct.pack("!H", len(data)) + data)
    await writer.drain()
    (n,) = struct.unpack("!H", await asyncio.wait_for(reader.readexactly(2), 2))
    reply = DNSRecord.parse(await reader.readexactly(n))
    assert reply.header.id == 0xABCD and reply.header.rcode == RCODE.FORMERR
    assert await asyncio.wait_for(reader.read(), 2) == b""
    writer.close()
    assert addrs(await tcp_query(env.port, "tomcat")) == ["10.96.0.20"]


async def test_tcp_client_vanishing_mid_message(env: Env) -> None:
    _, writer = await asyncio.open_connection(LOOP, env.port)
    writer.write(b"\x00\x40\x12")  # promises 64 bytes, sends one
    await writer.drain()
    writer.close()
    await asyncio.sleep(0.05)
    assert addrs(await tcp_query(env.port, "tomcat")) == ["10.96.0.20"]


async def test_udp_and_tcp_share_the_port_and_close_frees_it(upstream: Any) -> None:
    _, addr = upstream
    stub = DNSStub(make_rules(), Tunnel().open_connection, (LOOP, 9), upstream=[addr])
    with pytest.raises(RuntimeError):
        _ = stub.bound_port
    await stub.start(LOOP, 0)
    port = stub.bound_port
    assert addrs(await udp_query(port, "www.example.com")) == ["192.0.2.10"]
    assert addrs(await tcp_query(port, "www.example.com")) == ["192.0.2.10"]
    # The port is taken while running...
    other = DNSStub(make_rules(), Tunnel().open_connection, (LOOP, 9), upstream=[addr])
    with pytest.raises(OSError):
        await other.start(LOOP, port)
    await stub.close()
    # ...and free again after close.
    await other.start(LOOP, port)
    await other.close()


# --------------------------------------------------------------------------------------------------
# Real dig
# --------------------------------------------------------------------------------------------------
needs_dig = pytest.mark.skipif(shutil.which("dig") is None, reason="dig not installed")


async def dig(port: int, *args: str) -> str:
    proc = await asyncio.create_subprocess_exec(
        "dig", f"@{LOOP}", "-p", str(port), "+time=3", "+tries=1", *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(proc.communicate(), 15)
    assert proc.returncode == 0, err.decode()
    return out.decode()


@needs_dig
@pytest.mark.parametrize("tcp", [False, True])
async def test_dig(env: Env, tcp: bool) -> None:
    flags = ["+tcp"] if tcp else []
    assert (await dig(env.port, *flags, "+short", "tomcat")).split() == ["10.96.0.20"]
    assert (await dig(env.port, *flags, "+short", "tomcat.default.svc.cluster.local", "AAAA")).split() == [
        "fd00:96::20"
    ]
    srv = await dig(env.port, *flags, "+short", "_http._tcp.tomcat.default.svc", "SRV")
    assert srv.split() == ["0", "100", "8080", "tomcat.default.svc.cluster.local."]
    assert (await dig(env.port, *flags, "+short", "-x", "10.96.0.20")).split() == ["tomcat.default.svc.cluster.local."]
    full = await dig(env.port, *flags, "nosuchsvc.default")
    assert "status: NXDOMAIN" in full and "cluster.local." in full.split("AUTHORITY SECTION:")[1]
    assert (await dig(env.port, *flags, "+short", "www.example.com")).split() == ["192.0.2.10"]


@needs_dig
async def test_dig_big_answer_falls_back_to_tcp(env: Env) -> None:
    out = await dig(env.port, "+noedns", "big.example.com", "TXT")
    assert "Truncated, retrying in TCP mode" in out
    assert out.count("\tTXT\t") == 6


# --------------------------------------------------------------------------------------------------
# Properties of the pure helpers
# --------------------------------------------------------------------------------------------------
LDH = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789-_", min_size=1, max_size=20)
RULES = make_rules()


@given(st.ip_addresses())
def test_reverse_name_roundtrip(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> None:
    name = DNSLabel(ip.reverse_pointer)
    assert reverse_name_to_ip(name) == ip
    assert reverse_name_to_ip(DNSLabel(ip.reverse_pointer.upper())) == ip


@given(st.lists(st.binary(min_size=1, max_size=8), max_size=40))
def test_reverse_name_never_raises(labels: list[bytes]) -> None:
    result = reverse_name_to_ip(DNSLabel(labels))
    if result is not None:
        assert DNSLabel(result.reverse_pointer) == DNSLabel(labels)


@given(st.lists(st.sampled_from(["10", "010", "256", "-1", "1a", "0", "255"]), min_size=4, max_size=4))
def test_reverse_name_rejects_non_canonical_octets(octets: list[str]) -> None:
    result = reverse_name_to_ip(DNSLabel(".".join(octets) + ".in-addr.arpa"))
    canonical = all(o.isdigit() and str(int(o)) == o and int(o) <= 255 for o in octets)
    assert (result is not None) == canonical


@given(st.lists(st.binary(min_size=1, max_size=10), max_size=6))
def test_label_text_is_lossless_or_refuses(labels: list[bytes]) -> None:
    text = label_text(DNSLabel(labels))
    if text is not None:
        assert text.split(".") == [raw.decode() for raw in labels] or (not labels and text == "")
        assert all(b"." not in raw for raw in labels)


@given(st.lists(LDH, min_size=1, max_size=4), st.booleans())
def test_candidate_names_follow_the_rules(labels: list[str], trailing_dot: bool) -> None:
    name = ".".join(labels) + ("." if trailing_dot else "")
    if not RULES.is_cluster_name(name):
        return
    cands = candidate_names(name, RULES)
    assert cands[0] == RULES.qualify(name)
    assert len(cands) == len(set(cands))
    for c in cands:
        assert c == "cluster.local" or c.endswith(".cluster.local")
        assert RULES.is_cluster_name(c)
        assert c.startswith(name.rstrip(".").lower())


@given(st.sampled_from(["tomcat", "tomcat.default", "tomcat.other", "a.b.svc", "x.svc.cluster.local"]))
def test_candidate_names_examples(name: str) -> None:
    expected_first = {
        "tomcat": "tomcat.default.svc.cluster.local",
        "tomcat.default": "tomcat.default.svc.cluster.local",
        "tomcat.other": "tomcat.other.svc.cluster.local",
        "a.b.svc": "a.b.svc.cluster.local",
        "x.svc.cluster.local": "x.svc.cluster.local",
    }[name]
    assert candidate_names(name, RULES)[0] == expected_first
    if name == "x.svc.cluster.local":
        assert candidate_names(name, RULES) == [name]  # already qualified: no search


NAMES = st.lists(LDH, min_size=1, max_size=4).map(lambda ls: DNSLabel(".".join(ls)))


@given(st.lists(st.tuples(NAMES, st.integers(0, 2**31 - 1)), max_size=6), NAMES, NAMES)
def test_rewrite_owner_renames_only_the_asked_name(
    rrs: list[tuple[DNSLabel, int]], asked: DNSLabel, original: DNSLabel
) -> None:
    from dnslib import A

    records = [RR(name, QTYPE.A, ttl=ttl, rdata=A("10.0.0.1")) for name, ttl in rrs]
    records.append(RR(DNSLabel(tuple(raw.upper() for raw in asked.label)), QTYPE.A, ttl=5, rdata=A("10.0.0.2")))
    owners_before = [rr.rname.label for rr in records]
    out = rewrite_owner(records, asked, original)
    assert len(out) == len(records)
    for before, after in zip(records, out, strict=True):
        assert after.rdata is before.rdata and after.ttl == before.ttl and after.rtype == before.rtype
        if before.rname == asked:
            assert after.rname.label == original.label
        else:
            assert after.rname.label == before.rname.label
    assert [rr.rname.label for rr in records] == owners_before  # copies, the input is untouched


@given(st.lists(st.ip_addresses(), max_size=5), st.lists(st.text(max_size=30), max_size=5))
def test_parse_resolv_conf(servers: list[Any], noise: list[str]) -> None:
    lines = [f"nameserver {ip}  # comment" for ip in servers]
    lines += [f"search {n}" for n in noise] + [f"; nameserver {n}" for n in noise] + noise
    parsed = parse_resolv_conf("\n".join(lines))
    expected = list(dict.fromkeys((str(ip), 53) for ip in servers))
    assert parsed[: len(expected)] == expected
    for host, port in parsed:
        ipaddress.ip_address(host.split("%")[0])
        assert port == 53


def test_parse_resolv_conf_examples() -> None:
    text = "# generated\nnameserver 127.0.0.53\nnameserver fe80::1%eth0\noptions edns0\nnameserver bogus\n"
    assert parse_resolv_conf(text) == [("127.0.0.53", 53), ("fe80::1%eth0", 53)]
    assert parse_resolv_conf("") == []


@given(st.text())
def test_parse_resolv_conf_never_raises(text: str) -> None:
    parse_resolv_conf(text)


# --------------------------------------------------------------------------------------------------
# Fuzzing the wire parser: never raise, never answer with a wrong id
# --------------------------------------------------------------------------------------------------
async def _refuse(host: str, port: int) -> tuple[Any, Any]:
    raise ConnectionRefusedError("no tunnel in this test")


def _valid_query_bytes() -> st.SearchStrategy[bytes]:
    return st.builds(
        lambda name, t, qid: DNSRecord(DNSHeader(id=qid), q=DNSQuestion(name, t)).pack(),
        NAMES,
        st.sampled_from([QTYPE.A, QTYPE.AAAA, QTYPE.SRV, QTYPE.PTR, QTYPE.TXT]),
        st.integers(0, 65535),
    )


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(
    st.one_of(
        st.binary(max_size=80),
        st.tuples(_valid_query_bytes(), st.integers(0, 200), st.integers(0, 255)).map(
            lambda t: t[0][: t[1] % (len(t[0]) + 1)] + bytes([t[2]]) + t[0][t[1] % (len(t[0]) + 1) + 1 :]
        ),
    )
)
def test_handle_never_raises(data: bytes) -> None:
    async def run() -> bytes | None:
        # No upstream and a refusing tunnel: whatever parses is answered SERVFAIL without any traffic.
        stub = DNSStub(make_rules(), _refuse, (LOOP, 9), upstream=[], timeout=0.2)
        return await stub.handle(data)

    reply = asyncio.run(run())
    if reply is None:
        return
    assert len(data) >= 12
    assert reply[:2] == data[:2]
    parsed = DNSRecord.parse(reply)
    assert parsed.header.qr == 1


# --------------------------------------------------------------------------------------------------
# Over a real asyncssh channel (in-process server on loopback), as connect uses it
# --------------------------------------------------------------------------------------------------
async def test_over_real_ssh_direct_tcpip(upstream: Any) -> None:
    asyncssh = pytest.importorskip("asyncssh")
    _, addr = upstream
    cluster = ClusterDNS()
    await cluster.start()
    host_key = asyncssh.generate_private_key("ssh-ed25519")
    client_key = asyncssh.generate_private_key("ssh-ed25519")

    class Server(asyncssh.SSHServer):
        def begin_auth(self, username: str) -> bool:
            return True

        def public_key_auth_supported(self) -> bool:
            return True

        def validate_public_key(self, username: str, key: Any) -> bool:
            return key == client_key.convert_to_public()

        def connection_requested(self, dest_host: str, dest_port: int, orig_host: str, orig_port: int) -> bool:
            return True

    acceptor = await asyncssh.listen(
        LOOP, 0, server_host_keys=[host_key], authorized_client_keys=None, server_factory=Server
    )
    ssh_port = acceptor.sockets[0].getsockname()[1]
    conn = await asyncssh.connect(LOOP, ssh_port, client_keys=[client_key], known_hosts=None, username="kt")
    stub = DNSStub(make_rules(), conn.open_connection, (LOOP, cluster.port), upstream=[addr])
    await stub.start(LOOP, 0)
    try:
        replies = await asyncio.gather(*(udp_query(stub.bound_port, n) for n in ["tomcat", "kubernetes", "alias"]))
        assert addrs(replies[0]) == ["10.96.0.20"] and addrs(replies[1]) == ["10.96.0.1"]
        assert stub.tunnel_streams_opened <= 2
        # The cluster DNS hangs up (idle timeout): the next query reopens a channel transparently.
        cluster.drop_connections()
        await asyncio.sleep(0.1)
        assert addrs(await tcp_query(stub.bound_port, "web.other")) == ["10.96.0.30"]
        # The whole SSH session dies: SERVFAIL, not a hang.
        conn.close()
        await conn.wait_closed()
        stub.clear_cache()
        assert (await udp_query(stub.bound_port, "tomcat")).header.rcode == RCODE.SERVFAIL
    finally:
        await stub.close()
        acceptor.close()
        await cluster.stop()


async def test_outage_is_logged_once_not_per_query(env: Env, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level("INFO", logger="ktproxy.dns")
    env.tunnel.fail = True
    for name in ["a1", "a2", "a3"]:
        assert (await udp_query(env.port, name)).header.rcode == RCODE.SERVFAIL
    env.tunnel.fail = False
    assert addrs(await udp_query(env.port, "tomcat")) == ["10.96.0.20"]
    lines = [r.getMessage() for r in caplog.records if r.name == "ktproxy.dns"]
    assert sum("unreachable" in line for line in lines) == 1
    assert sum("reachable again" in line for line in lines) == 1


# --------------------------------------------------------------------------------------------------
# The cached-answer fast path: the same bytes as the general path, without dnslib, a Task or the tunnel
# --------------------------------------------------------------------------------------------------
def _query_bytes(name: str, qtype: str, *, qid: int, edns: str | None = None) -> bytes:
    """A query; edns None (no OPT), "plain", "do", "small" (512 bytes) or "cookie" (an option)."""
    q = DNSRecord(DNSHeader(id=qid), q=DNSQuestion(name, getattr(QTYPE, qtype)))
    if edns is not None:
        opt = EDNS0(udp_len=4096 if edns != "small" else 512, flags="do" if edns == "do" else "")
        if edns == "cookie":  # as dig sends by default: options never change the answer
            opt.rdata.append(EDNSOption(10, bytes(range(8))))
        q.add_ar(opt)
    return q.pack()


# (name as first asked, the other spelling asked later, type, EDNS): A, AAAA, SRV, PTR (v4, v6),
# CNAME chain, NXDOMAIN and NODATA (negative caching), upstream names, truncation.
FAST_CASES = [
    ("tomcat", "TomCat", "A", None),
    ("tomcat.default", "TOMCAT.DEFAULT", "AAAA", None),
    ("_http._tcp.tomcat", "_HTTP._Tcp.Tomcat", "SRV", None),
    ("20.0.96.10.in-addr.arpa", "20.0.96.10.IN-ADDR.ARPA", "PTR", None),
    (ipaddress.ip_address("fd00:96::20").reverse_pointer, ipaddress.ip_address("fd00:96::20").reverse_pointer.upper(),
     "PTR", "plain"),
    ("alias", "aLiAs", "A", None),
    ("alias.default.svc.cluster.local.", "ALIAS.Default.svc.CLUSTER.local.", "A", "do"),
    ("nosuchsvc", "NoSuchSvc", "A", None),
    ("tomcat", "TOMCAT", "TXT", None),  # NODATA
    ("www.example.com", "WwW.ExAmPlE.CoM", "A", "cookie"),
    ("nope.example.com", "NOPE.example.com", "A", None),  # upstream NXDOMAIN
    ("big.example.com", "BIG.example.com", "TXT", None),  # truncated over UDP, whole over TCP
    ("big.example.com", "Big.Example.Com", "TXT", "small"),
    ("web.other", "Web.Other", "A", "plain"),
]


@pytest.fixture
async def twin(upstream: tuple[UpstreamResolver, tuple[str, int]]) -> AsyncIterator[tuple[DNSStub, DNSStub, Any]]:
    """Two stubs on one clock, one cluster and one upstream: with and without the fast path."""
    _, addr = upstream
    cluster = ClusterDNS()
    await cluster.start()
    tunnel = Tunnel()
    now = [1000.0]
    stubs = [DNSStub(make_rules(), tunnel.open_connection, (LOOP, cluster.port), upstream=[addr], timeout=1.0,
                     clock=lambda: now[0], fast_path=fast) for fast in (True, False)]
    try:
        yield stubs[0], stubs[1], (now, cluster)
    finally:
        for stub in stubs:
            await stub.close()
        await cluster.stop()


@pytest.mark.parametrize("tcp", [False, True])
async def test_fast_path_answers_the_general_paths_bytes(
    twin: tuple[DNSStub, DNSStub, Any], tcp: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    fast, slow, (now, cluster) = twin
    qid = 100

    def ask(name: str, qtype: str, edns: str | None) -> bytes:
        nonlocal qid
        qid += 1
        return _query_bytes(name, qtype, qid=qid, edns=edns)

    for first, _, qtype, edns in FAST_CASES:
        data = ask(first, qtype, edns)
        assert await fast.handle(data, tcp=tcp) == await slow.handle(data, tcp=tcp), first
    asked = cluster.total()
    assert len(fast._cache.fast) == len(FAST_CASES)

    # From here on the fast stub must answer without dnslib: parse and pack raise.
    def forbidden(*a: Any, **k: Any) -> Any:
        raise AssertionError("dnslib used on a cache hit")

    for step in (0, 7, 0.5, 3):  # seconds: the TTLs age by whole seconds, the second changes or not
        now[0] += step
        for first, other, qtype, edns in FAST_CASES:
            for name in (first, other):
                data = ask(name, qtype, edns)
                expected = await slow.handle(data, tcp=tcp)
                with monkeypatch.context() as m:
                    m.setattr(DNSRecord, "parse", forbidden)
                    m.setattr(DNSRecord, "pack", forbidden)
                    got = await fast.handle(data, tcp=tcp)
                assert got == expected, (name, qtype, edns, step)
                reply = DNSRecord.parse(got)
                assert reply.header.id == qid and str(reply.q.qname).rstrip(".") == name.rstrip(".")
                # The answers owned by the name asked read in the spelling asked.
                assert all(str(rr.rname).rstrip(".") == name.rstrip(".") for rr in reply.rr[:1]
                           if rr.rname == reply.q.qname)
    assert cluster.total() == asked  # no hit went through the tunnel
    ttl = DNSRecord.parse(await fast.handle(ask("TOMCAT", "A", None), tcp=tcp)).rr[0].ttl
    assert ttl == 30 - 10  # 10.5 s after it was cached
    # Past the TTL neither path serves the entry: both ask again, and the fresh answer has full TTLs.
    now[0] += 20
    data = ask("tomcat", "A", None)
    got = await fast.handle(data, tcp=tcp)
    assert got == await slow.handle(data, tcp=tcp)
    assert DNSRecord.parse(got).rr[0].ttl == 30
    assert cluster.total() == asked + 2


async def test_fast_hit_makes_no_task_no_dnslib_call_and_no_tunnel_query(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Over real UDP and TCP sockets: a repeated question is answered in datagram_received (UDP) or the
    connection's read loop (TCP): the general path (_on_datagram, which spawns the Task; _resolve) and
    dnslib are not called. Without the fast path this fails: every query takes them."""
    assert addrs(await udp_query(env.port, "tomcat")) == ["10.96.0.20"]
    assert addrs(await tcp_query(env.port, "Tomcat")) == ["10.96.0.20"]  # the TCP form, from the cache
    queries = [bytes(_query_bytes(name, "A", qid=7 + i))
               for i, name in enumerate(["tomcat", "TOMCAT", "tomCAT", "tomcat", "TOMCAT"])]
    calls: collections.Counter[str] = collections.Counter()

    def counting(name: str, fn: Any) -> Any:
        def wrapper(*a: Any, **k: Any) -> Any:
            calls[name] += 1
            return fn(*a, **k)
        return wrapper

    stub = env.stub
    monkeypatch.setattr(stub, "_on_datagram", counting("_on_datagram", stub._on_datagram))
    monkeypatch.setattr(stub, "_resolve", counting("_resolve", stub._resolve))
    monkeypatch.setattr(DNSRecord, "parse", counting("parse", DNSRecord.parse.__func__).__get__(DNSRecord))
    monkeypatch.setattr(DNSRecord, "pack", counting("pack", DNSRecord.pack))
    replies = [await udp_raw(env.port, q) for q in queries]
    reader, writer = await asyncio.open_connection(LOOP, env.port)
    try:
        for q in queries:
            writer.write(struct.pack("!H", len(q)) + q)
        for _ in queries:
            (n,) = struct.unpack("!H", await asyncio.wait_for(reader.readexactly(2), 5))
            replies.append(await reader.readexactly(n))
    finally:
        writer.close()
    assert calls == {}, calls
    monkeypatch.undo()
    for raw, q in zip(replies, queries * 2, strict=True):
        assert raw is not None and raw[:2] == q[:2] and raw[12:12 + len(q) - 12] == q[12:]
        reply = DNSRecord.parse(raw)
        assert addrs(reply) == ["10.96.0.20"] and str(reply.rr[0].rname) == str(reply.q.qname)
    assert env.cluster.total() == 1


async def test_fast_path_keeps_lru_order_and_dies_with_its_entry(upstream: Any) -> None:
    _, addr = upstream
    cluster = ClusterDNS()
    await cluster.start()
    tunnel = Tunnel()
    stub = DNSStub(make_rules(), tunnel.open_connection, (LOOP, cluster.port), upstream=[addr], cache_size=2)
    try:
        q = {n: _query_bytes(n, "A", qid=1) for n in ("tomcat", "kubernetes", "web.other")}
        await stub.handle(q["tomcat"])
        await stub.handle(q["kubernetes"])
        await stub.handle(q["tomcat"])  # a fast hit: tomcat is now the most recently used
        assert cluster.total() == 2
        await stub.handle(q["web.other"])  # evicts kubernetes, not tomcat
        await stub.handle(q["tomcat"])
        assert cluster.total() == 3
        await stub.handle(q["kubernetes"])
        assert cluster.total() == 4
        assert len(stub._cache.fast) == 2  # the evicted entries' packed replies went with them
        assert list(stub._cache.exact) == [q["tomcat"][2:]]  # the repeated UDP query, byte for byte
        stub.clear_cache()
        assert stub._cache.fast == {} and stub._cache.exact == {}
        await stub.handle(q["tomcat"])
        assert cluster.total() == 5
    finally:
        await stub.close()
        await cluster.stop()


def _edns_query_bytes() -> st.SearchStrategy[bytes]:
    return st.builds(
        lambda data, do, size, options: _with_opt(data, do, size, options),
        _valid_query_bytes(), st.booleans(), st.integers(0, 65535),
        st.lists(st.tuples(st.integers(0, 65535), st.binary(max_size=8)), max_size=3),
    )


def _with_opt(data: bytes, do: bool, size: int, options: list[tuple[int, bytes]]) -> bytes:
    rdata = b"".join(struct.pack("!HH", code, len(v)) + v for code, v in options)
    opt = b"\0" + struct.pack("!HHIH", QTYPE.OPT, size, 0x8000 if do else 0, len(rdata)) + rdata
    return data[:10] + b"\0\1" + data[12:] + opt


@settings(max_examples=500, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(
    st.one_of(
        st.binary(max_size=80),
        _valid_query_bytes(),
        _edns_query_bytes(),
        st.tuples(st.one_of(_valid_query_bytes(), _edns_query_bytes()), st.integers(0, 200), st.integers(0, 255)).map(
            lambda t: t[0][: t[1] % (len(t[0]) + 1)] + bytes([t[2]]) + t[0][t[1] % (len(t[0]) + 1) + 1 :]
        ),
    ),
    st.booleans(),
)
def test_fast_key_accepts_only_what_the_general_path_parses_alike(data: bytes, tcp: bool) -> None:
    """fast_key never raises; a query it accepts parses (dnslib) to the question it keys, so equal keys
    mean equal cache keys and equal replies up to id and the name's case."""
    from ktproxy.dns.cache import cache_key
    from ktproxy.dns.wire import Malformed, fast_key, parse_query

    found = fast_key(data, tcp)
    if found is None:
        return
    key, end = found
    try:
        record = parse_query(data)
    except Malformed:
        raise AssertionError(f"fast_key accepted what the general path refuses: {data!r}") from None
    labels, qtype, qclass, do, cd = cache_key(record)
    name = b"".join(bytes((len(raw),)) + raw for raw in labels) + b"\0"
    assert key.startswith(bytes(data[2:12]) + name + struct.pack("!HH", qtype, qclass))
    assert end == 12 + len(name) + 4
    assert bool(key[1] & 0x10) == cd and record.header.rd == (key[0] & 1)
    opt = [rr for rr in record.ar if rr.rtype == QTYPE.OPT]
    assert len(key) == 10 + len(name) + 4 + (6 if opt else 0) + 1
    if opt:
        assert key[-7:-1] == struct.pack("!HI", opt[0].rclass, opt[0].ttl) and do == bool(opt[0].ttl & 0x8000)

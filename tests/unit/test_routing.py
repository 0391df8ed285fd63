"""ClusterRules: which destinations go through the shadow pod, and the names they resolve as."""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from ktproxy.routing import ClusterRules, is_loopback_host, normalise_name
from ktproxy.tlds import IANA_TLDS


def rules(**kw) -> ClusterRules:
    kw.setdefault("namespace", "default")
    kw.setdefault("cidrs", ["10.96.0.0/12", "10.244.0.0/16", "fd00:10:96::/112"])
    kw.setdefault("namespaces", {"kube-system", "team-a"})
    return ClusterRules(**kw)


R = rules()


@pytest.mark.parametrize("host", [
    "tomcat", "TOMCAT", "tomcat.", "svc",                                      # single label
    "tomcat.default", "tomcat.kube-system", "tomcat.team-a", "Tomcat.Team-A.",  # svc.ns, known ns
    "pod-0.tomcat.default",                                                     # hostname.svc.ns
    "tomcat.svc", "tomcat.default.svc", "pod-0.tomcat.default.svc",             # *.svc
    "10-244-0-5.default.pod",                                                   # *.pod
    "tomcat.default.svc.cluster.local", "TOMCAT.DEFAULT.SVC.CLUSTER.LOCAL.",
    "a.b.c.d.e.cluster.local",
    "10.96.0.1", "10.111.255.254", "10.244.3.4", "fd00:10:96::a", "[fd00:10:96::a]",
])
def test_cluster_destinations(host):
    assert R.is_cluster(host)
    assert R.via_tunnel(host)


@pytest.mark.parametrize("host", [
    "example.com", "www.example.com", "github.com", "pypi.org", "a.b.c.d.example.com",
    "tomcat.unknown-ns",              # two labels, not a namespace we know
    "tomcat.default.com",             # three labels ending in a public TLD
    "a.b.c.default",                  # four labels: not svc.ns nor hostname.svc.ns
    "cluster.local", "svc.cluster.localhost", "cluster.local.example.com",
    "10.95.255.255", "10.112.0.0", "192.168.1.1", "8.8.8.8", "fd00:10:97::1", "2001:db8::1",
    "localhost", "LOCALHOST.", "127.0.0.1", "::1", "[::1]", "localhost.localdomain", "",
])
def test_direct_destinations(host):
    assert not R.is_cluster(host)
    assert not R.via_tunnel(host)


def test_svc_ns_only_for_known_namespaces():
    r = rules(namespaces=set())
    assert not r.is_cluster("tomcat.team-a")
    r.add_namespaces(["Team-A"])
    assert r.is_cluster("tomcat.team-a")
    assert r.qualify("tomcat.team-a") == "tomcat.team-a.svc.cluster.local"


@pytest.mark.parametrize("host", ["web.dev", "pkg.go.dev", "www.example.dev", "foo.app", "github.io",
                                  "x.y.cloud", "Docs.Tools.", "my.team"])
def test_namespaces_named_like_a_tld_do_not_take_public_names(host):
    # B1: discovery lists every namespace; one called dev/app/io must not capture *.dev etc.
    r = rules(namespaces={"dev", "app", "io", "cloud", "tools", "team", "team-a"})
    assert not r.is_cluster(host) and not r.via_tunnel(host)
    assert r.qualify(host) == normalise_name(host)
    assert {"dev", "app", "io", "cloud", "tools", "team"}.isdisjoint(r.namespaces)
    assert r.is_cluster("tomcat.team-a")
    r.add_namespaces(["dev", "services"])
    assert not r.is_cluster("web.dev") and not r.is_cluster("api.services")


def test_tld_named_namespace_the_user_chose_is_kept():
    assert ClusterRules(namespace="dev").is_cluster("web.dev")  # the connect namespace
    r = rules(namespaces={"dev", "io"}, user_namespaces={"Dev"})
    assert r.is_cluster("web.dev") and r.qualify("web.dev") == "web.dev.svc.cluster.local"
    assert not r.is_cluster("github.io")


@pytest.mark.parametrize(("host", "expected"), [
    ("tomcat", True), ("tomcat.team-a", True), ("pod-0.tomcat.team-a", True), ("web.dev", True),
    ("tomcat.default.svc", False), ("x.svc", False), ("a.default.pod", False),
    ("tomcat.default.svc.cluster.local", False), ("example.com", False), ("10.96.0.1", False), ("localhost", False),
])
def test_may_be_public_name(host, expected):
    assert rules(user_namespaces={"dev"}).may_be_public_name(host) == expected


def test_connect_namespace_is_always_known():
    r = ClusterRules(namespace="dev")
    assert r.is_cluster("tomcat.dev") and r.qualify("tomcat") == "tomcat.dev.svc.cluster.local"


def test_custom_domain():
    r = rules(domain="Corp.Internal.")
    assert r.domain == "corp.internal"
    assert r.is_cluster("tomcat.default.svc.corp.internal")
    assert not r.is_cluster("tomcat.default.svc.cluster.local.example.com")
    assert r.qualify("tomcat") == "tomcat.default.svc.corp.internal"
    assert r.qualify("tomcat.team-a") == "tomcat.team-a.svc.corp.internal"
    assert r.qualify("tomcat.default.svc") == "tomcat.default.svc.corp.internal"
    assert r.search_list() == ["default.svc.corp.internal", "svc.corp.internal", "corp.internal"]


def test_cidrs_accept_host_bits_and_strings():
    r = ClusterRules(cidrs=["10.96.0.1/12", ipaddress.ip_network("fd00::/8")])
    assert r.is_cluster("10.100.0.1") and r.is_cluster("fd12::1")
    assert not r.is_cluster("10.128.0.1")


def test_no_cidrs_means_no_cluster_ips():
    r = ClusterRules()
    assert not r.is_cluster("10.96.0.1")
    assert not r.is_cluster("fd00::1")


def test_v4_mapped_v6_is_not_a_v4_cluster_ip():
    assert not R.is_cluster_ip("::ffff:10.96.0.1")


def test_names_are_never_cluster_ips():
    assert not R.is_cluster_ip("tomcat")
    assert not R.is_cluster_ip("10.96.0.1.nip.io")


@pytest.mark.parametrize("host", ["example.com", "8.8.8.8", "2001:db8::1", "tomcat", "10.96.0.1"])
def test_route_all_tunnels_everything_but_loopback(host):
    r = rules(route_all=True)
    assert r.via_tunnel(host)


@pytest.mark.parametrize("host", ["localhost", "LocalHost.", "localhost.localdomain", "127.0.0.1",
                                  "127.5.6.7", "::1", "[::1]", "::ffff:127.0.0.1"])
def test_loopback_is_never_tunnelled(host):
    assert not rules(route_all=True).via_tunnel(host)
    assert not R.via_tunnel(host)
    # not even when a CIDR covers it
    assert not rules(cidrs=["127.0.0.0/8", "::1/128"]).via_tunnel(host)


def loopback(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    """The oracle, independent of the Python version (ipaddress's own answer for ::ffff:127.x changed in
    3.13): 127/8, ::1, or an IPv4-mapped 127/8."""
    if ip.version == 6:
        ip = ip.ipv4_mapped or ip
    return ip in ipaddress.ip_network("127.0.0.0/8") or ip == ipaddress.ip_address("::1")


@pytest.mark.parametrize("host", [
    "localhost", "LocalHost.", "localhost.localdomain", "127.0.0.1", "127.255.255.255", "127.0.0.1.",
    "::1", "[::1]", "0:0:0:0:0:0:0:1", "::1%lo", "::ffff:127.0.0.1", "[::ffff:127.9.8.7]", "::ffff:7f00:1",
])
def test_is_loopback_host_true(host):
    assert is_loopback_host(host)


@pytest.mark.parametrize("host", [
    "127.lan.example.com", "127.0.0.1.nip.io", "127", "127.0.0", "localhost.example.com", "mylocalhost",
    "128.0.0.1", "126.255.255.255", "0.0.0.0", "::", "::2", "::ffff:128.0.0.1", "::127.0.0.1",
    "::1:0:0:1", "[::1", "", "10.0.0.1",
])
def test_is_loopback_host_false(host):
    assert not is_loopback_host(host)


@given(st.ip_addresses())
def test_is_loopback_host_same_on_every_python(ip):
    assert is_loopback_host(str(ip)) == loopback(ip)
    assert is_loopback_host(ip.exploded) == loopback(ip)


@given(st.integers(0, 2**32 - 1))
def test_v4_mapped_loopback_follows_the_v4_address(n):
    v4 = ipaddress.IPv4Address(n)
    assert is_loopback_host(f"::ffff:{v4}") == is_loopback_host(str(v4)) == (v4.packed[0] == 127)


@pytest.mark.parametrize("host,expected", [
    ("tomcat", "tomcat.default.svc.cluster.local"),
    ("Tomcat.", "tomcat.default.svc.cluster.local"),
    ("tomcat.team-a", "tomcat.team-a.svc.cluster.local"),
    ("pod-0.tomcat.team-a", "pod-0.tomcat.team-a.svc.cluster.local"),
    ("tomcat.team-a.svc", "tomcat.team-a.svc.cluster.local"),
    ("tomcat.svc", "tomcat.svc.cluster.local"),
    ("10-244-0-5.default.pod", "10-244-0-5.default.pod.cluster.local"),
    ("tomcat.default.svc.cluster.local", "tomcat.default.svc.cluster.local"),
    ("TOMCAT.DEFAULT.SVC.CLUSTER.LOCAL.", "tomcat.default.svc.cluster.local"),
    ("example.com", "example.com"),
    ("10.96.0.1", "10.96.0.1"),
])
def test_qualify(host, expected):
    assert R.qualify(host) == expected


# -- properties ---------------------------------------------------------------------------------
label = st.from_regex(r"[a-z]([a-z0-9-]{0,14}[a-z0-9])?", fullmatch=True)
names = st.lists(label, min_size=1, max_size=6).map(".".join)
namespaces = st.sets(label, max_size=4)


def cased(s: str, flips: list[bool]) -> str:
    return "".join(c.upper() if f else c for c, f in zip(s, flips + [False] * len(s), strict=False))


@given(names, namespaces, st.lists(st.booleans(), max_size=80), st.booleans())
def test_case_and_trailing_dot_do_not_matter(name, nss, flips, dot):
    r = rules(namespaces=nss)
    variant = cased(name, flips) + ("." if dot else "")
    assert r.is_cluster(variant) == r.is_cluster(name)
    assert r.via_tunnel(variant) == r.via_tunnel(name)
    assert r.qualify(variant) == r.qualify(name)


@given(names, namespaces, label)
def test_qualified_cluster_names_end_with_the_domain(name, nss, ns):
    r = rules(namespace=ns, namespaces=nss)
    assume(name not in ("localhost",))
    if r.is_cluster_name(name):
        q = r.qualify(name)
        assert q.endswith("." + r.domain)
        assert r.is_cluster_name(q)
        assert r.qualify(q) == q  # idempotent


@given(label, label)
def test_single_labels_and_svc_ns(svc, ns):
    assume(svc != "localhost" and ns not in IANA_TLDS)
    r = rules(namespace="default", namespaces={ns})
    assert r.qualify(svc) == f"{svc}.default.svc.cluster.local"
    assert r.qualify(f"{svc}.{ns}") == f"{svc}.{ns}.svc.cluster.local"
    assert r.is_cluster(f"{svc}.{ns}.svc")


public_tlds = st.sampled_from(["com", "org", "net", "io", "dev", "de", "cn", "uk", "app", "example"])


@given(st.lists(label, min_size=1, max_size=4), public_tlds, namespaces)
def test_public_names_are_never_cluster(labels, tld, nss):
    name = ".".join([*labels, tld])
    assume(not name.endswith(".svc") and not name.endswith(".pod"))
    # B1: a discovered namespace named like the TLD changes nothing
    r = rules(namespaces=nss | {tld} if tld in IANA_TLDS else nss - {tld})
    assert not r.is_cluster(name)
    assert not r.via_tunnel(name)
    assert r.qualify(name) == name


@given(st.ip_addresses())
def test_ip_literals_follow_the_cidrs(ip):
    nets = [ipaddress.ip_network(c) for c in ("10.96.0.0/12", "10.244.0.0/16", "fd00:10:96::/112")]
    inside = any(ip in n for n in nets if n.version == ip.version)
    host = str(ip)
    assert R.is_cluster(host) == inside
    assert R.via_tunnel(host) == (inside and not loopback(ip))
    if ip.version == 6:
        assert R.is_cluster(f"[{host}]") == inside
    assert R.qualify(host) == host


@given(st.ip_addresses())
def test_route_all_ip_literals(ip):
    assert rules(route_all=True).via_tunnel(str(ip)) == (not loopback(ip))


def test_one_spelling_for_ip_literals():
    # Same canonical form as the PAC: brackets only as a matched pair, trailing dots ignored.
    assert R.is_cluster("10.96.0.1.") and R.is_cluster("[FD00:10:96::A]")
    assert not R.is_cluster_ip("[fd00:10:96::1") and not R.is_cluster_ip("fd00:10:96::1]")
    assert not R.is_cluster_name("10.96.0.1.")
    assert not rules(route_all=True).via_tunnel("127.0.0.1.")

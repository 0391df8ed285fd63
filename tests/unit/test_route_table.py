"""The router's route table: what the annotation says, and which upstream a request's headers pick."""

from __future__ import annotations

import pytest

from ktwire.routes import ROUTES_ANNOTATION, format_routes, is_route, parse_routes
from shadow_image.router.table import RepeatedRouteHeader, RouteTable, parse_annotations_file


def table(*routes: tuple[str, str]) -> RouteTable:
    t = RouteTable("tomcat", {8080: 80, 9090: 9090})
    t.set_routes(routes)
    return t


def test_routes_round_trip_and_skip_malformed_pairs():
    text = format_routes([("version", "abcde"), ("x-dev", "bob")])
    assert text == "version:abcde,x-dev:bob"
    assert parse_routes(text) == [("version", "abcde"), ("x-dev", "bob")]
    assert parse_routes("") == []
    # no colon, a value that cannot be part of a Service name, a header name with a space, a duplicate
    assert parse_routes("nocolon, version:Ab_C ,bad key:v,version:abcde,version:abcde , VERSION:z1") == [
        ("version", "abcde"), ("version", "z1")]


def test_route_values_must_fit_in_a_service_name():
    assert is_route("version", "a")
    assert is_route("version", "a-1")
    assert not is_route("version", "-a")
    assert not is_route("version", "a-")
    assert not is_route("version", "A")
    assert not is_route("version", "x" * 41)
    assert not is_route("", "a")


def test_downward_api_file_is_unquoted_as_go_quotes_it():
    text = ('kt-config="service=tomcat"\n'
            f'{ROUTES_ANNOTATION}="version:abcde,version:fghij"\n'
            'odd="a\\"b\\\\c\\nd\\u00e9"\n'
            'not a line\n')
    got = parse_annotations_file(text)
    assert got["kt-config"] == "service=tomcat"
    assert parse_routes(got[ROUTES_ANNOTATION]) == [("version", "abcde"), ("version", "fghij")]
    assert got["odd"] == 'a"b\\c\nd\u00e9'
    assert "not a line" not in got


def test_matching_header_picks_its_route_on_the_service_port_of_the_listening_port():
    t = table(("version", "abcde"))
    up = t.pick(8080, [(b"Host", b"tomcat"), (b"VERSION", b"abcde")])
    assert (up.host, up.port, up.route) == ("tomcat-kt-mesh-abcde", 80, ("version", "abcde"))
    assert "VERSION: abcde" in up.label and "tomcat-kt-mesh-abcde:80" in up.label
    assert t.pick(9090, [(b"version", b" abcde ")]).port == 9090


def test_everything_else_goes_to_the_stuntman():
    t = table(("version", "abcde"))
    for headers in ([], [(b"version", b"ABCDE")], [(b"version", b"other")], [(b"x-version", b"abcde")]):
        up = t.pick(8080, headers)
        assert (up.host, up.port, up.route) == ("tomcat-kt-stuntman", 80, None)


def test_several_routes_and_keys_and_replacement():
    t = table(("version", "abcde"), ("x-dev", "bob"))
    assert t.keys == {b"version", b"x-dev"}
    assert t.pick(8080, [(b"X-Dev", b"bob")]).host == "tomcat-kt-mesh-bob"
    t.set_routes([("version", "fghij")])
    assert t.pick(8080, [(b"X-Dev", b"bob")]).route is None
    assert t.pick(8080, [(b"version", b"fghij")]).host == "tomcat-kt-mesh-fghij"
    assert t.routes == [("version", "fghij")]


@pytest.mark.parametrize("headers", [
    [(b"version", b"other"), (b"VERSION", b"abcde")],  # used to pick abcde: the first *matching* field won
    [(b"Version", b"abcde"), (b"version", b"abcde")],
    [(b"version", b"abcde"), (b"x-dev", b"bob"), (b"x-dev", b"nobody")],
])
def test_a_repeated_route_header_is_ambiguous_whatever_its_values(headers):
    t = table(("version", "abcde"), ("x-dev", "bob"))
    with pytest.raises(RepeatedRouteHeader, match="more than once"):
        t.pick(8080, headers)


def test_other_repeated_headers_and_one_of_each_route_key_are_fine():
    t = table(("version", "abcde"), ("x-dev", "bob"))
    up = t.pick(8080, [(b"accept", b"a"), (b"Accept", b"b"), (b"version", b"abcde"), (b"x-dev", b"zz")])
    assert up.route == ("version", "abcde")
    assert RouteTable("svc", {1: 2}).pick(1, [(b"version", b"a"), (b"version", b"b")]).route is None  # no routes


def test_overridden_hosts_for_tests_and_loopback():
    t = RouteTable("svc", {1: 2}, default_host="127.0.0.1", route_host="127.0.0.{value}")
    t.set_routes([("version", "9")])
    assert t.pick(1, [(b"version", b"9")]).host == "127.0.0.9"
    assert t.default(1).host == "127.0.0.1"


def test_the_router_loads_no_ssh_code():
    # The router shares the shadow's image and its probe endpoint but not its SSH server: importing
    # asyncssh (and cryptography) through health.py doubled the router pod's memory (27 -> 61 MB RSS).
    import subprocess
    import sys

    code = "import sys, shadow_image.router.server; print('asyncssh' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"

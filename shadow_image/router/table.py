"""Which upstream a request goes to: the route table, and where it comes from.

Routes live in the router pod's annotation ROUTES_ANNOTATION as `key:value` pairs joined by commas
(key: a header name, lower-case; value: what that header must equal, exactly, case-sensitive; the
grammar is ktwire/routes.py, shared with ktctl). Each
participant adds its own pair (ktproxy/mesh/shared.py); the pod sees its annotations as a downward API
file the kubelet keeps current, one `name="go-quoted value"` line per annotation.

Route upstreams are Services the participants create: `<svc>-kt-mesh-<value>`; everything else goes to
`<svc>-kt-stuntman`, which selects the original pods. Both on the Service port that belongs to the
target port the router listens on.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from ktwire.routes import Route, is_route

_LINE = re.compile(r'^([^=]+)="(.*)"$')
_ESCAPE = re.compile(r'\\(x[0-9a-fA-F]{2}|u[0-9a-fA-F]{4}|U[0-9a-fA-F]{8}|[abfnrtv\\"])')
_SIMPLE = {"a": "\a", "b": "\b", "f": "\f", "n": "\n", "r": "\r", "t": "\t", "v": "\v", "\\": "\\", '"': '"'}


def _unquote(text: str) -> str:
    def one(m: re.Match[str]) -> str:
        s = m.group(1)
        return _SIMPLE[s] if len(s) == 1 else chr(int(s[1:], 16))

    return _ESCAPE.sub(one, text)


def parse_annotations_file(text: str) -> dict[str, str]:
    """The kubelet's downward API rendering of metadata.annotations: `name="value"` per line, the value
    quoted as Go's strconv.Quote does."""
    out: dict[str, str] = {}
    for line in text.splitlines():
        m = _LINE.match(line)
        if m:
            out[m.group(1)] = _unquote(m.group(2))
    return out


class RepeatedRouteHeader(ValueError):
    """A request carries a route key's header more than once (its argument: the key)."""

    def __str__(self) -> str:
        return f"the route header {self.args[0].upper()} more than once"


@dataclass(frozen=True)
class Upstream:
    """Where one request goes. `label` names it in logs and in the 502 body when it cannot be reached."""

    host: str
    port: int
    label: str
    route: Route | None = None  # None: the default (original pods)


class RouteTable:
    """Maps a listening (target) port plus request headers to an Upstream. Replaced wholesale by
    set_routes(): requests already dispatched keep the Upstream they were given."""

    def __init__(self, service: str, ports: Mapping[int, int], *,
                 default_host: str | None = None, route_host: str | None = None) -> None:
        """ports: target port the router listens on -> the Service port upstreams serve it on.
        default_host / route_host (a format string with {value}) override the Service names: tests
        point them at loopback."""
        self.service = service
        self.ports = dict(ports)
        self._default_host = default_host or f"{service}-kt-stuntman"
        self._route_host = route_host or f"{service}-kt-mesh-{{value}}"
        self._routes: dict[bytes, dict[bytes, str]] = {}
        # Field name as received -> (its lower-case form, that key's values or None): saves pick() a
        # lower() per field; bounded, emptied with every new route set.
        self._by_name: dict[bytes, tuple[bytes, dict[bytes, str] | None]] = {}
        self.routes: list[Route] = []
        # Upstreams depend only on the hosts and the port, so each is built once: pick() runs per request.
        self._made: dict[tuple[str, str, int], Upstream] = {}

    def set_routes(self, routes: Iterable[Route]) -> None:
        by_key: dict[bytes, dict[bytes, str]] = {}
        kept: list[Route] = []
        for key, value in routes:
            if is_route(key, value):
                by_key.setdefault(key.encode(), {})[value.encode()] = value
                kept.append((key, value))
        self._routes = by_key
        self._by_name = {}
        self.routes = kept

    @property
    def keys(self) -> frozenset[bytes]:
        """Header names (lower-case bytes) that can select a route."""
        return frozenset(self._routes)

    def default(self, listen_port: int) -> Upstream:
        port = self.ports[listen_port]
        up = self._made.get(("", "", port))
        if up is None:
            up = self._made[("", "", port)] = Upstream(self._default_host, port, f"{self._default_host}:{port}")
        return up

    def for_route(self, key: str, value: str, listen_port: int) -> Upstream:
        port = self.ports[listen_port]
        up = self._made.get((key, value, port))
        if up is None:
            host = self._route_host.format(value=value)
            up = self._made[(key, value, port)] = Upstream(
                host, port, f"route '{key.upper()}: {value}' ({host}:{port})", (key, value))
        return up

    def pick(self, listen_port: int, headers: Iterable[tuple[bytes, bytes]]) -> Upstream:
        """The route whose key is a header name (any case) and whose value that header's value equals
        (with several route keys present, the first such header); anything else (no such header, an
        unknown value) goes to the original pods. A route key may appear once: a request that repeats one
        (whatever the values) is ambiguous and raises RepeatedRouteHeader, which HTTP/1 answers with 400
        and HTTP/2 with a 400 on that stream; it is never forwarded."""
        routes = self._routes
        if routes:
            by_name = self._by_name
            found: list[tuple[bytes, dict[bytes, str], bytes]] | None = None
            for name, value in headers:
                known = by_name.get(name)
                if known is None:
                    key = name.lower()
                    known = (key, routes.get(key))
                    if len(by_name) < 4096:
                        by_name[name] = known
                key, values = known
                if values is not None:
                    if found is None:
                        found = [(key, values, value)]
                    elif any(k == key for k, _, _ in found):
                        raise RepeatedRouteHeader(key.decode("latin-1"))
                    else:
                        found.append((key, values, value))
            if found is not None:
                for key, values, value in found:
                    hit = values.get(value.strip())
                    if hit is not None:
                        return self.for_route(key.decode(), hit, listen_port)
        return self.default(listen_port)

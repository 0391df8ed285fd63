"""HTTP/1 decisions that need no socket: is a request head acceptable, what head goes upstream, what head
goes back to the client and how its body is framed.

The router never forwards framing it did not produce itself: request bodies are re-framed (Content-Length
kept, chunked re-chunked), so whatever ambiguity a client's bytes had cannot reach an upstream. llhttp
(httptools) already rejects most smuggling shapes; request_problem() checks the rest and repeats the
essential ones so a parser upgrade that turns on a leniency cannot open a hole.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

Headers = Sequence[tuple[bytes, bytes]]

# Request body framing.
NO_BODY, LENGTH, CHUNKED = 0, 1, 2
# Response body modes towards the client: none, as it comes, re-chunked, as it comes until the upstream
# closes (a response without length).
RESP_NONE, RESP_RAW, RESP_CHUNKED, RESP_EOF = 0, 1, 2, 3

MAX_HEAD = 64 * 1024
MAX_HEADERS = 200

# Connection-specific fields (RFC 9110 7.6.1): they describe one hop, so never cross the router.
HOP_BY_HOP = frozenset({b"connection", b"keep-alive", b"proxy-connection", b"transfer-encoding", b"te",
                        b"upgrade", b"http2-settings"})
_CONNECTION_STANDARD = frozenset({b"close", b"keep-alive", b"upgrade"})
_COMMON_CONNECTION = frozenset({b"close", b"keep-alive", b"Keep-Alive", b"Close", b"upgrade", b"Upgrade"})
# Methods whose repetition has no further effect: a request of these may go again on a fresh connection
# when a pooled one turns out dead before answering.
IDEMPOTENT = frozenset({b"GET", b"HEAD", b"OPTIONS", b"TRACE", b"PUT", b"DELETE"})
# Request fields prepare_request looks at (the rest are copied as they are).
_NOTED = HOP_BY_HOP | {b"host", b"content-length", b"x-forwarded-for"}
# Request field names that are not forwarded: with an underscore (nginx drops them too,
# underscores_in_headers off; servers behind CGI-style or WSGI environs fold `_` and `-` together, so
# `Transfer_Encoding` would become framing there), or with a doubled, leading or trailing hyphen
# (`Transfer--Encoding`, look-alikes of the same kind).
_LOOKALIKE = re.compile(rb"_|--|^-|-$").search
# Field name as received -> its lower-case form, or b"" for a look-alike: clients repeat the same few names,
# so a dict lookup replaces both name.lower() and the search on the per-request path. Bounded: past the
# bound new names are classified each time.
_NAMES: dict[bytes, bytes] = {}
_NAMES_MAX = 4096


def _field_name(name: bytes) -> bytes:
    ln = b"" if _LOOKALIKE(name) is not None else name.lower()
    if len(_NAMES) < _NAMES_MAX:
        _NAMES[name] = ln
    return ln

_TOKEN = re.compile(rb"[!#$%&'*+.^_`|~0-9a-z-]+")
_FRAMING_TRAILERS = frozenset({b"content-length", b"transfer-encoding", b"host", b"trailer"}) | HOP_BY_HOP


class UnexpectedSwitch(Exception):
    """An upstream answered 101 to a request that asked for no protocol switch."""


class BadRequest(Exception):
    """The request must get a 400 (or `status`) and the connection closed; the message is the body's
    reason."""

    def __init__(self, reason: str, status: int = 400) -> None:
        super().__init__(reason)
        self.status = status


def client_address(peer: object) -> bytes:
    """The address X-Forwarded-For names: IPv4-mapped IPv6 (dual-stack socket) shown as IPv4."""
    host = peer[0] if isinstance(peer, tuple) and peer else "unknown"
    if host.startswith("::ffff:") and "." in host:
        host = host[7:]
    return host.encode()


def _tokens(values: list[bytes]) -> set[bytes]:
    return {t.strip().lower() for v in values for t in v.split(b",") if t.strip()}


def prepare_request(method: bytes, url: bytes, version: str, headers: Headers, client: bytes,
                    upgrade: bool, host: bytes = b"") -> tuple[bytes, int, bool]:
    """(head for the upstream, body framing, is a real upgrade). Raises BadRequest.

    The head is HTTP/1.1 whatever the client spoke (so upstream connections can be pooled), keeps Host and
    every end-to-end field, drops hop-by-hop ones and look-alike names (_LOOKALIKE), appends the client to
    X-Forwarded-For, and states the framing the router will produce. `upgrade` (llhttp's flag) is honoured
    only for a plain WebSocket handshake (_websocket); any other Upgrade is dropped and the request served
    as plain HTTP/1.1. An HTTP/1.0 request without Host gets `host` (HTTP/1.1 requires one).
    """
    if version == "1.1":
        http11 = True
    elif version == "1.0":
        http11 = False
    else:
        raise BadRequest(f"HTTP/{version} is not supported")
    # One pass over the fields (this runs for every request): ordinary ones are copied as they come, the
    # few that matter are noted.
    out = [method, b" ", url, b" HTTP/1.1\r\n"]
    hosts = 0
    te: list[bytes] = []
    cls: list[bytes] = []
    connection: list[bytes] = []
    xff: list[bytes] = []
    protocols: list[bytes] = []
    names = _NAMES
    for name, value in headers:
        ln = names.get(name) or _field_name(name)
        if ln not in _NOTED:
            if ln:  # b"": a look-alike name, dropped
                out += (name, b": ", value, b"\r\n")
        elif ln == b"host":
            hosts += 1
            out += (name, b": ", value, b"\r\n")
        elif ln == b"content-length":
            cls.append(value)  # written below, as a plain number whatever the client's spelling (05, ...)
        elif ln == b"transfer-encoding":
            te.append(value)
        elif ln == b"x-forwarded-for":
            xff.append(value.strip())
        elif ln == b"connection":
            connection.append(value)
        elif ln == b"upgrade":
            protocols.append(value)
        # any other hop-by-hop field stays behind
    if hosts > 1 or (http11 and hosts == 0):
        raise BadRequest("a request needs exactly one Host header")
    if len(cls) > 1:
        raise BadRequest("more than one Content-Length")
    if te and cls:
        raise BadRequest("both Transfer-Encoding and Content-Length")
    if te:
        if not http11:
            raise BadRequest("Transfer-Encoding in an HTTP/1.0 request")
        if len(te) > 1 or te[0].strip().lower() != b"chunked":
            # Any coding besides chunked would have to travel on, and a proxy that re-frames must not. Codings
            # that end in chunked are valid HTTP the router does not implement: 501 (RFC 9112 6.1, as nginx);
            # anything else is malformed framing: 400 (RFC 9112 6.3).
            codings = [c.strip().lower() for v in te for c in v.split(b",")]
            if codings[-1] == b"chunked" and b"chunked" not in codings[:-1] and all(
                    c and _TOKEN.fullmatch(c) for c in codings):
                raise BadRequest("Transfer-Encoding other than chunked", 501)
            raise BadRequest("Transfer-Encoding other than chunked")
        framing = CHUNKED
    elif cls:
        value = cls[0].strip()
        if not value.isdigit() or len(value) > 18:
            raise BadRequest("invalid Content-Length")
        length = int(value)
        framing = LENGTH if length else NO_BODY
        out.append(b"Content-Length: %d\r\n" % length)
    else:
        framing = NO_BODY
    if connection and not _COMMON_CONNECTION.issuperset(connection):
        named = _tokens(connection) - _CONNECTION_STANDARD
        if named:  # fields the client declared hop-by-hop: copied above, so the rare second pass
            out = out[:4] + [line for n, v in headers if (n.lower() not in _NOTED and n.lower() not in named
                                                          and _LOOKALIKE(n) is None)
                             or n.lower() == b"host" for line in (n, b": ", v, b"\r\n")]
            if cls:
                out.append(b"Content-Length: %d\r\n" % length)
    if not hosts and host:
        out += (b"Host: ", host, b"\r\n")
    if upgrade and framing != NO_BODY:
        # llhttp ends a protocol switch request at its head, so a body would be parsed as the next request
        # (h2c, declined: smuggling) or held while the upstream waits for it (WebSocket): neither can go on.
        raise BadRequest("Upgrade: h2c with a body" if _tokens(protocols) <= {b"h2c"}
                         else "an Upgrade request with a body")
    if upgrade:
        upgrade = _websocket(method, http11, protocols, headers)
    if xff:
        xff.append(client)
        out += (b"X-Forwarded-For: ", b", ".join(v for v in xff if v), b"\r\n")
    else:  # the usual case: no proxy before the router
        out += (b"X-Forwarded-For: ", client, b"\r\n")
    if framing == CHUNKED:
        out.append(b"Transfer-Encoding: chunked\r\n")
    if upgrade:
        out.append(b"Upgrade: websocket\r\nConnection: upgrade\r\n")
    out.append(b"\r\n")
    return b"".join(out), framing, upgrade


def _websocket(method: bytes, http11: bool, protocols: list[bytes], headers: Headers) -> bool:
    """Whether an Upgrade request llhttp flagged is a plain WebSocket opening handshake (RFC 6455 4.1: GET,
    HTTP/1.1, one Upgrade field that is just `websocket`, Sec-WebSocket-Key and -Version): the only protocol
    switch the router forwards and, on 101, splices. Anything else (h2c, a list such as `h2c, websocket`)
    is served as plain HTTP/1.1, its Upgrade, HTTP2-Settings and Connection fields dropped like every
    hop-by-hop field, so that each later request on the connection is still routed on its own."""
    if method != b"GET" or not http11 or len(protocols) != 1 or protocols[0].strip().lower() != b"websocket":
        return False
    names = {n.lower() for n, _ in headers}
    return b"sec-websocket-key" in names and b"sec-websocket-version" in names


def format_trailers(trailers: Headers) -> bytes:
    """The end of a chunked body with the trailer fields that may travel on."""
    out = [b"0\r\n"]
    for name, value in trailers:
        if name.lower() not in _FRAMING_TRAILERS:
            out += (name, b": ", value, b"\r\n")
    out.append(b"\r\n")
    return b"".join(out)


# Response field name as received -> what prepare_response does with it (a dict lookup instead of a lower()
# and set tests per field; bounded like _NAMES): copied, copied and noted as a Content-Length, noted as
# Transfer-Encoding, noted as Connection, dropped (another hop-by-hop field).
_R_COPY, _R_LENGTH, _R_TE, _R_CONNECTION, _R_DROP = range(5)
_RESP_KINDS: dict[bytes, int] = {}
# (status, reason) -> the response's status line: upstreams repeat the same few.
_STATUS_LINES: dict[tuple[int, bytes], bytes] = {}


def _resp_kind(name: bytes) -> int:
    ln = name.lower()
    if ln == b"transfer-encoding":
        kind = _R_TE
    elif ln == b"connection":
        kind = _R_CONNECTION
    elif ln in HOP_BY_HOP:
        kind = _R_DROP
    elif ln == b"content-length":
        kind = _R_LENGTH
    else:
        kind = _R_COPY
    if len(_RESP_KINDS) < _NAMES_MAX:
        _RESP_KINDS[name] = kind
    return kind


def _status_line(status: int, reason: bytes) -> bytes:
    line = b"HTTP/1.1 %d %s\r\n" % (status, reason)
    if len(_STATUS_LINES) < 256:
        _STATUS_LINES[(status, reason)] = line
    return line


def prepare_response(status: int, reason: bytes, headers: Headers, client_http11: bool, head_request: bool,
                     client_keep_alive: bool) -> tuple[bytes, int, bool]:
    """(head for the client, body mode, close the client connection after this response).

    A HEAD answer, 1xx, 204 and 304 have no body whatever their headers say. A chunked body is re-chunked
    for an HTTP/1.1 client and sent plain, delimited by close, to an HTTP/1.0 one; a body without length
    is delimited by close. (Positional parameters: the per-response call passes them so, which is cheaper
    than keywords.)"""
    if 100 <= status < 200:
        return _verbatim(status, reason, headers), RESP_NONE, False
    line = _STATUS_LINES.get((status, reason))
    if line is None:
        line = _status_line(status, reason)
    out = [line]
    te: list[bytes] = []
    connection: list[bytes] = []
    has_length = False
    kinds = _RESP_KINDS
    for name, value in headers:
        kind = kinds.get(name)
        if kind is None:
            kind = _resp_kind(name)
        if kind <= _R_LENGTH:
            if kind:
                has_length = True
            out += (name, b": ", value, b"\r\n")
        elif kind == _R_TE:
            te.append(value)
        elif kind == _R_CONNECTION:
            connection.append(value)
        # any other hop-by-hop field stays behind
    if connection and (len(connection) > 1 or connection[0] not in _COMMON_CONNECTION) \
            and not _COMMON_CONNECTION.issuperset(connection):
        named = _tokens(connection) - _CONNECTION_STANDARD
        if named:  # fields the upstream declared hop-by-hop: the rare second pass
            out = out[:1] + [line for n, v in headers if n.lower() not in HOP_BY_HOP and n.lower() not in named
                             for line in (n, b": ", v, b"\r\n")]
    close = not client_keep_alive
    if head_request or status in (204, 304):
        mode = RESP_NONE
        # A HEAD answer may describe the framing a GET would have had.
        out += [b"Transfer-Encoding: " + v + b"\r\n" for v in te]
    elif te and te[-1].strip().lower().endswith(b"chunked"):
        if client_http11:
            mode = RESP_CHUNKED  # re-chunked; any coding under chunked (gzip, ...) still applies
            out += [b"Transfer-Encoding: " + v + b"\r\n" for v in te]
        else:
            mode, close = RESP_RAW, True  # the chunks' contents, ended by our close
    elif has_length and not te:
        mode = RESP_RAW
    else:
        mode, close = RESP_EOF, True  # delimited by the upstream's close, so by ours
        out += [b"Transfer-Encoding: " + v + b"\r\n" for v in te]
    if close:
        out.append(b"Connection: close\r\n")
    elif not client_http11:
        out.append(b"Connection: keep-alive\r\n")
    out.append(b"\r\n")
    return b"".join(out), mode, close


def _verbatim(status: int, reason: bytes, headers: Headers) -> bytes:
    out = [b"HTTP/1.1 %d %s\r\n" % (status, reason)]
    for name, value in headers:
        out += (name, b": ", value, b"\r\n")
    out.append(b"\r\n")
    return b"".join(out)


def error_response(status: int, text: str, *, close: bool) -> bytes:
    """A plain-text answer of the router's own (400, 501, 502, 504)."""
    reasons = {400: b"Bad Request", 502: b"Bad Gateway", 504: b"Gateway Timeout", 405: b"Method Not Allowed",
               501: b"Not Implemented"}
    body = text.encode("utf-8", "replace") + b"\n"
    return b"".join([b"HTTP/1.1 %d %s\r\n" % (status, reasons.get(status, b"Error")),
                     b"Content-Type: text/plain; charset=utf-8\r\nContent-Length: %d\r\n" % len(body),
                     b"Connection: close\r\n" if close else b"", b"\r\n", body])


def keep_alive(version: str, headers: Headers) -> bool:
    """Whether an upstream's response leaves its connection reusable (for the HEAD path, where the parser
    is abandoned after the head)."""
    tokens = _tokens([v for n, v in headers if n.lower() == b"connection"])
    if version == "1.1":
        return b"close" not in tokens
    return b"keep-alive" in tokens


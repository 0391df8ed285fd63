"""HTTP proxy parsing and framing: heads, authorities, body lengths, verbatim body copies, forwarding."""

from __future__ import annotations

import asyncio
import base64
import itertools
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ktproxy.proxy import http
from ktwire import http1


def reader_of(data: bytes, eof: bool = True, limit: int = 2**16) -> asyncio.StreamReader:
    r = asyncio.StreamReader(limit=limit)
    r.feed_data(data)
    if eof:
        r.feed_eof()
    return r


class Sink:
    """The writer side of copy_body: what went out, and how often it was drained."""

    def __init__(self) -> None:
        self.data = bytearray()
        self.drains = 0

    def write(self, data: bytes) -> None:
        self.data += data

    async def drain(self) -> None:
        self.drains += 1


async def request(raw: bytes) -> http1.Request:
    req = await http1.read_request(reader_of(raw))
    assert req is not None
    return req


async def response(raw: bytes) -> http1.Response:
    return await http1.read_response(reader_of(raw))


def parse_head(raw: bytes) -> tuple[str, list[str]]:
    head = raw.split(b"\r\n\r\n", 1)[0].decode("latin-1")
    start, *lines = head.split("\r\n")
    return start, lines


def test_http1_framing_is_stdlib_only():
    # An in-cluster router imports ktwire.http1 from an image that has neither ktproxy nor its dependencies.
    code = ("import sys, ktwire.http1; "
            "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('ktproxy', 'asyncssh', 'kubernetes')); "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[2])


# -- request heads ------------------------------------------------------------------------------
async def test_request_head():
    req = await request(b"GET http://tomcat:8080/a?b=1 HTTP/1.1\r\nHost: tomcat:8080\r\nX-A:  v  \r\n\r\n")
    assert (req.method, req.target, req.version) == ("GET", "http://tomcat:8080/a?b=1", "HTTP/1.1")
    assert req.get("host") == "tomcat:8080"
    assert req.get("x-a") == "v"
    assert req.get("missing") is None


async def test_request_first_byte_already_read():
    # The server sniffs the first byte, then hands it back.
    req = await http1.read_request(reader_of(b"ET / HTTP/1.1\r\n\r\n"), b"G")
    assert req is not None and req.method == "GET"


async def test_clean_eof_between_requests_is_none():
    assert await http1.read_request(reader_of(b"")) is None
    assert await http1.read_request(reader_of(b"\r\n")) is None


@pytest.mark.parametrize("prefix", [b"\r\n", b"\r\n\r\n", b"\r\n\r\n\r\n\r\n\r\n"])
async def test_empty_lines_before_a_request_are_ignored(prefix):
    # RFC 9112 2.2; e.g. a keep-alive client that sends CRLF after a POST body
    req = await request(prefix + b"GET http://x/ HTTP/1.1\r\n\r\n")
    assert req.target == "http://x/"


async def test_only_empty_lines_then_eof():
    assert await http1.read_request(reader_of(b"\r\n\r\n\r\n")) is None


async def test_header_bytes_pass_through_unchanged():
    raw = "HTTP/1.1 200 OK\r\nX-Name: Jürgen ✓\r\nContent-Length: 0\r\n\r\n".encode()
    resp = await response(raw)
    assert "X-Name: Jürgen ✓".encode() in http1.response_head(resp, keep_alive=True)


async def test_eof_mid_head():
    with pytest.raises(http1.HTTPError) as ei:
        await http1.read_request(reader_of(b"GET / HTTP/1.1\r\nHost: x\r\n"))
    assert ei.value.status == 400


async def test_eof_after_first_byte():
    with pytest.raises(http1.HTTPError) as ei:
        await http1.read_request(reader_of(b""), b"G")
    assert ei.value.status == 400


async def test_head_too_large():
    big = b"GET / HTTP/1.1\r\nX: " + b"a" * 70000 + b"\r\n\r\n"
    with pytest.raises(http1.HTTPError) as ei:
        await http1.read_request(reader_of(big, limit=128 * 1024))
    assert ei.value.status == 431
    with pytest.raises(http1.HTTPError) as ei:
        await http1.read_request(reader_of(big, limit=1024))
    assert ei.value.status == 431


async def test_repeated_headers_and_tokens():
    req = await request(b"GET / HTTP/1.1\r\nConnection: keep-alive, X-Foo\r\nconnection: Upgrade\r\n\r\n")
    assert req.get_all("Connection") == ["keep-alive, X-Foo", "Upgrade"]
    assert req.tokens("connection") == {"keep-alive", "x-foo", "upgrade"}


@pytest.mark.parametrize("line", [
    b"GET /",                   # two parts
    b"GET",                     # one part
    b" GET / HTTP/1.1",         # empty method
    b"GET  / HTTP/1.1",         # empty target
    b"GET / HTTP/2.0",          # unsupported version
    b"GET / http/1.1",
    b"GET / HTTP/1.1 extra",
    b"G\xc9T / HTTP/1.1",        # latin-1 letters are alphabetic and upper case, but not tchar
    b"GE(T / HTTP/1.1",         # a delimiter
    b"GE\x7fT / HTTP/1.1",
])
async def test_malformed_start_line(line):
    with pytest.raises(http1.HTTPError) as ei:
        await http1.read_request(reader_of(line + b"\r\nHost: x\r\n\r\n"))
    assert ei.value.status == 400


@pytest.mark.parametrize("method", ["VERSION-CONTROL", "BASELINE-CONTROL", "M-SEARCH", "get", "Patch", "G3T",
                                    "PROPFIND", "X_EXT.1!#$%&'*+^`|~"])
async def test_every_method_token_is_accepted(method):
    # B4: RFC 9110 9.1 makes a method any token; WebDAV, UPnP and extension methods are real.
    req = await request(f"{method} http://x/ HTTP/1.1\r\n\r\n".encode())
    assert req.method == method


@given(st.text(alphabet="!#$%&'*+-.^_`|~0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz",
               min_size=1, max_size=20))
async def test_any_token_method_roundtrips(method):
    req = await request(f"{method} http://x/ HTTP/1.1\r\n\r\n".encode())
    assert req.method == method


@pytest.mark.parametrize("line", [
    b" folded: value",          # obsolete line folding
    b"\tfolded",
    b"NoColon",
    b": no name",
    b"Bad Name: v",
    b"Bad\tName: v",
    b"Name : v",                # space before the colon (RFC 9112 5.1: MUST reject)
    b"X-A: a\nTransfer-Encoding: chunked",  # bare LF: a smuggled header for a lenient origin
    b"X-A: a\rb",               # bare CR
    b"X-A: a\x00b",             # NUL
    b"X\nA: b",
])
async def test_malformed_header_line(line):
    with pytest.raises(http1.HTTPError) as ei:
        await http1.read_request(reader_of(b"GET / HTTP/1.1\r\n" + line + b"\r\n\r\n"))
    assert ei.value.status == 400


async def test_bare_lf_in_start_line():
    with pytest.raises(http1.HTTPError) as ei:
        await http1.read_request(reader_of(b"GET /\nX HTTP/1.1\r\n\r\n"))
    assert ei.value.status == 400


@pytest.mark.parametrize("version,headers,keep", [
    ("HTTP/1.1", "", True),
    ("HTTP/1.1", "Connection: close\r\n", False),
    ("HTTP/1.1", "Proxy-Connection: close\r\n", False),
    ("HTTP/1.1", "Connection: Keep-Alive, CLOSE\r\n", False),
    ("HTTP/1.0", "", False),
    ("HTTP/1.0", "Connection: keep-alive\r\n", True),
    ("HTTP/1.0", "Proxy-Connection: Keep-Alive\r\n", True),
])
async def test_keep_alive(version, headers, keep):
    req = await request(f"GET http://x/ {version}\r\n{headers}\r\n".encode())
    assert req.keep_alive() is keep


# -- response heads -----------------------------------------------------------------------------
async def test_response_head():
    resp = await response(b"HTTP/1.1 404 Not Found Here\r\nContent-Length: 0\r\n\r\n")
    assert resp.status == 404
    assert resp.start == ("HTTP/1.1", "404", "Not Found Here")


async def test_response_without_reason_phrase():
    # "HTTP/1.1 200" (no SP, no reason) is sent by real servers; clients accept it.
    resp = await response(b"HTTP/1.1 200\r\nContent-Length: 0\r\n\r\n")
    assert resp.status == 200


async def test_response_empty_reason_phrase():
    resp = await response(b"HTTP/1.1 204 \r\n\r\n")
    assert resp.status == 204


@pytest.mark.parametrize("line", [b"HTTP/1.1 2000 OK", b"HTTP/1.1 abc OK", b"ICY 200 OK", b"HTTP/1.1",
                                  b"HTTP/1.1 \xb200 OK", b"garbage", b"HTTP/1.1  200 OK"])
async def test_malformed_status_line_is_502(line):
    with pytest.raises(http1.HTTPError) as ei:
        await response(line + b"\r\n\r\n")
    assert ei.value.status == 502


async def test_malformed_upstream_header_is_502():
    with pytest.raises(http1.HTTPError) as ei:
        await response(b"HTTP/1.1 200 OK\r\nBad Header: x\r\n\r\n")
    assert ei.value.status == 502


async def test_upstream_closed_without_response():
    with pytest.raises(http1.EmptyResponse) as ei:
        await response(b"")
    assert ei.value.status == 502


async def test_upstream_head_too_large_is_502():
    # B4: the upstream's fault, not a 431 "request head too large" for the client.
    big = b"HTTP/1.1 200 OK\r\nX: " + b"a" * 70000 + b"\r\n\r\n"
    for limit in (128 * 1024, 1024):
        with pytest.raises(http1.HTTPError) as ei:
            await http1.read_response(reader_of(big, limit=limit))
        assert ei.value.status == 502


async def test_upstream_closed_mid_head_is_502():
    # B4: not a 400 "connection closed mid-request"; and not EmptyResponse, which may be retried.
    with pytest.raises(http1.HTTPError) as ei:
        await response(b"HTTP/1.1 200 OK\r\nContent-Le")
    assert ei.value.status == 502 and not isinstance(ei.value, http1.EmptyResponse)


@given(st.binary(max_size=300))
async def test_garbage_heads_raise_only_http_errors(data):
    for parse in (lambda: http1.read_request(reader_of(data + b"\r\n\r\n")),
                  lambda: http1.read_response(reader_of(data + b"\r\n\r\n"))):
        try:
            msg = await parse()
        except http1.HTTPError as exc:
            assert exc.status in (400, 431, 502)
        else:
            if isinstance(msg, http1.Response):
                assert 100 <= msg.status <= 999


# -- authorities and absolute targets ----------------------------------------------------------
@pytest.mark.parametrize("authority,default,expected", [
    ("tomcat", 80, ("tomcat", 80)),
    ("tomcat:8080", 80, ("tomcat", 8080)),
    ("tomcat:", 443, ("tomcat", 443)),
    ("10.0.0.1:65535", 80, ("10.0.0.1", 65535)),
    ("[::1]", 443, ("::1", 443)),
    ("[::1]:8443", 443, ("::1", 8443)),
    ("[fd00::a]:", 80, ("fd00::a", 80)),
    ("fd00::a", 80, ("fd00::a", 80)),       # unbracketed v6: no port can be told apart
])
def test_split_authority(authority, default, expected):
    assert http1.split_authority(authority, default) == expected


@pytest.mark.parametrize("authority", [
    "", ":80", "[]:80", "[::1", "[::1]x", "[::1]80", "host:0", "host:65536", "host:-1", "host:+80",
    "host:8o", "host:\xb2", "host:1\xb3", "[::1]:\xb9", "host: 80", "host:99999999999999999999",
])
def test_split_authority_bad(authority):
    with pytest.raises(http1.HTTPError) as ei:
        http1.split_authority(authority, 80)
    assert ei.value.status == 400


@given(st.from_regex(r"[a-z0-9]([a-z0-9.-]{0,30}[a-z0-9])?", fullmatch=True), st.integers(1, 65535))
def test_split_authority_roundtrip_name(host, port):
    assert http1.split_authority(f"{host}:{port}", 1) == (host, port)
    assert http1.split_authority(host, 7) == (host, 7)


@given(st.ip_addresses(v=6), st.integers(1, 65535))
def test_split_authority_roundtrip_v6(ip, port):
    assert http1.split_authority(f"[{ip}]:{port}", 1) == (str(ip), port)


@given(st.text(max_size=30))
def test_split_authority_never_crashes(text):
    try:
        host, port = http1.split_authority(text, 80)
    except http1.HTTPError as exc:
        assert exc.status == 400
    else:
        assert host and 0 < port < 65536


@pytest.mark.parametrize("target,expected", [
    ("http://tomcat:8080/a/b?c=d#frag", ("tomcat", 8080, "/a/b?c=d")),
    ("http://tomcat", ("tomcat", 80, "/")),
    ("http://tomcat?x=1", ("tomcat", 80, "/?x=1")),
    ("HTTP://Tomcat.Default/", ("Tomcat.Default", 80, "/")),
    ("http://user:pw@tomcat:81/", ("tomcat", 81, "/")),
    ("http://[fd00::1]:8080/x", ("fd00::1", 8080, "/x")),
])
async def test_absolute_target(target, expected):
    req = await request(f"GET {target} HTTP/1.1\r\n\r\n".encode())
    assert http.absolute_target(req) == expected


@pytest.mark.parametrize("target", ["https://tomcat/", "ftp://x/", "http:///path", "http://[::1/",
                                    "http://host:0/", "http://host:x/", "/just/a/path"])
async def test_absolute_target_bad(target):
    req = await request(f"GET {target} HTTP/1.1\r\n\r\n".encode())
    with pytest.raises(http1.HTTPError) as ei:
        http.absolute_target(req)
    assert ei.value.status == 400


# -- body length --------------------------------------------------------------------------------
async def test_request_body_lengths():
    assert http1.body_length(await request(b"GET / HTTP/1.1\r\n\r\n"), is_response=False) == 0
    req = await request(b"POST / HTTP/1.1\r\nContent-Length: 12\r\n\r\n")
    assert http1.body_length(req, is_response=False) == 12
    req = await request(b"POST / HTTP/1.1\r\nContent-Length: 5\r\nContent-Length: 5\r\n\r\n")
    assert http1.body_length(req, is_response=False) == 5
    req = await request(b"POST / HTTP/1.1\r\nTransfer-Encoding: Chunked\r\n\r\n")
    assert http1.body_length(req, is_response=False) == -1
    req = await request(b"POST / HTTP/1.1\r\nTransfer-Encoding: gzip, chunked\r\n\r\n")
    assert http1.body_length(req, is_response=False) == -1


@pytest.mark.parametrize("headers", [
    b"Content-Length: 5\r\nContent-Length: 6\r\n",
    b"Content-Length: -1\r\n",
    b"Content-Length: +5\r\n",
    b"Content-Length: 0x10\r\n",
    b"Content-Length: \xb2\r\n",          # a latin-1 "digit" int() refuses
    b"Content-Length: 1\xb3\r\n",
    b"Content-Length:\r\n",
    b"Transfer-Encoding: gzip\r\n",       # chunked must be the final coding of a request
    b"Transfer-Encoding: chunked, gzip\r\n",
    b"Transfer-Encoding: chunked\r\nContent-Length: 5\r\n",  # RFC 9112 6.3: smuggling; reject
])
async def test_request_body_length_rejected(headers):
    req = await request(b"POST / HTTP/1.1\r\n" + headers + b"\r\n")
    with pytest.raises(http1.HTTPError) as ei:
        http1.body_length(req, is_response=False)
    assert ei.value.status == 400


@pytest.mark.parametrize("status,method,headers,expected", [
    ("200", "GET", "Content-Length: 7\r\n", 7),
    ("200", "HEAD", "Content-Length: 7\r\n", 0),
    ("200", "HEAD", "Transfer-Encoding: chunked\r\n", 0),
    ("100", "POST", "", 0),
    ("101", "GET", "", 0),
    ("204", "GET", "Content-Length: 7\r\n", 0),
    ("304", "GET", "Content-Length: 7\r\n", 0),
    ("200", "GET", "", None),
    ("200", "GET", "Transfer-Encoding: chunked\r\n", -1),
    ("200", "GET", "Transfer-Encoding: chunked\r\nContent-Length: 7\r\n", -1),
    ("200", "GET", "Transfer-Encoding: gzip\r\n", None),
    ("200", "GET", "Transfer-Encoding: chunked, gzip\r\n", None),   # not chunked last: until close
    ("200", "GET", "Transfer-Encoding: gzip, chunked\r\n", -1),
    ("404", "GET", "Content-Length: 0\r\n", 0),
])
async def test_response_body_length(status, method, headers, expected):
    resp = await response(f"HTTP/1.1 {status} X\r\n{headers}\r\n".encode())
    assert http1.body_length(resp, is_response=True, request_method=method) == expected


@pytest.mark.parametrize("headers", [b"Content-Length: 1\r\nContent-Length: 2\r\n", b"Content-Length: x\r\n",
                                     b"Content-Length: \xb9\r\n"])
async def test_response_bad_content_length_is_502(headers):
    resp = await response(b"HTTP/1.1 200 OK\r\n" + headers + b"\r\n")
    with pytest.raises(http1.HTTPError) as ei:
        http1.body_length(resp, is_response=True, request_method="GET")
    assert ei.value.status == 502


# -- copy_body ----------------------------------------------------------------------------------
async def test_copy_fixed_length_leaves_the_rest():
    r, w = reader_of(b"hello worldNEXT"), Sink()
    await http1.copy_body(r, w, 11, chunk=4)
    assert bytes(w.data) == b"hello world"
    assert w.drains >= 3  # drained after every write: back-pressure reaches the reader
    assert await r.read() == b"NEXT"


@pytest.mark.parametrize("status", [400, 502])
async def test_copy_fixed_length_short(status):
    # EOF mid-body is the sender's fault: 400 for a client's request body, 502 for an upstream's.
    with pytest.raises(http1.HTTPError) as ei:
        await http1.copy_body(reader_of(b"abc"), Sink(), 10, status=status)
    assert ei.value.status == status


async def test_copy_until_close():
    w = Sink()
    await http1.copy_body(reader_of(b"x" * 1000), w, None, chunk=64)
    assert bytes(w.data) == b"x" * 1000


async def test_copy_zero():
    r, w = reader_of(b"NEXT"), Sink()
    await http1.copy_body(r, w, 0)
    assert w.data == b"" and await r.read() == b"NEXT"


CHUNKED = (b"5;name=value;q=\"a;b\"\r\nhello\r\n"
           b"A\r\n0123456789\r\n"
           b"0;last\r\nExpires: never\r\nX-Trailer: 1\r\n\r\n")


async def test_copy_chunked_with_extensions_and_trailers():
    r, w = reader_of(CHUNKED + b"GET /next HTTP/1.1\r\n\r\n"), Sink()
    await http1.copy_body(r, w, -1)
    assert bytes(w.data) == CHUNKED
    assert (await http1.read_request(r)).target == "/next"


@pytest.mark.parametrize("body", [
    b"0x5\r\nhello\r\n0\r\n\r\n",      # int(.., 16) would accept the 0x prefix
    b"-2\r\n0\r\n\r\n",                # a negative size
    b"+5\r\nhello\r\n0\r\n\r\n",
    b"1_0\r\n0123456789abcdef\r\n0\r\n\r\n",
    b"\r\nhello\r\n0\r\n\r\n",
    b"zz\r\n",
    b"5\r\nhelloXY0\r\n\r\n",          # chunk data not followed by CRLF
])
async def test_copy_chunked_bad_framing(body):
    with pytest.raises(http1.HTTPError) as ei:
        await http1.copy_body(reader_of(body), Sink(), -1)
    assert ei.value.status in (400, 502)


async def test_copy_chunked_truncated():
    for cut in range(len(CHUNKED)):
        with pytest.raises(http1.HTTPError) as ei:
            await http1.copy_body(reader_of(CHUNKED[:cut]), Sink(), -1, status=502)
        assert ei.value.status == 502


async def test_copy_chunked_trailers_are_drained():
    # An upstream streaming trailer lines for ever must meet back-pressure, not grow a buffer.
    trailers = b"".join(b"X-T%d: v\r\n" % i for i in range(50))
    w = Sink()
    await http1.copy_body(reader_of(b"0\r\n" + trailers + b"\r\n"), w, -1)
    assert w.drains >= 50


async def test_copy_chunked_huge_size_line():
    with pytest.raises(http1.HTTPError):
        await http1.copy_body(reader_of(b"5;" + b"x" * 5000 + b"\r\n", limit=1024), Sink(), -1)


def encode_chunked(pieces: list[bytes], exts: list[str], trailers: list[tuple[str, str]],
                   upper: bool) -> bytes:
    out = bytearray()
    for i, p in enumerate(pieces):
        size = format(len(p), "X" if upper else "x")
        ext = exts[i % len(exts)] if exts else ""
        out += f"{size}{ext}\r\n".encode() + p + b"\r\n"
    out += b"0\r\n" + b"".join(f"{k}: {v}\r\n".encode() for k, v in trailers) + b"\r\n"
    return bytes(out)


token = st.from_regex(r"[A-Za-z0-9!#$%&'*+.^_`|~-]{1,10}", fullmatch=True)


@given(data=st.binary(max_size=5000), cuts=st.lists(st.integers(0, 5000), max_size=20),
       exts=st.lists(st.builds(lambda k, v: f";{k}={v}", token, token), max_size=3),
       trailers=st.lists(st.tuples(token, token), max_size=3), upper=st.booleans(),
       copy_chunk=st.integers(1, 300))
async def test_copy_chunked_roundtrip(data, cuts, exts, trailers, upper, copy_chunk):
    points = sorted({0, len(data), *(c % (len(data) + 1) for c in cuts)})
    pieces = [data[a:b] for a, b in itertools.pairwise(points) if b > a]
    wire = encode_chunked(pieces, exts, trailers, upper)
    r, w = reader_of(wire + b"TAIL"), Sink()
    await http1.copy_body(r, w, -1, chunk=copy_chunk)
    assert bytes(w.data) == wire
    assert await r.read() == b"TAIL"


@given(st.binary(max_size=200))
async def test_copy_chunked_garbage_raises_only_protocol_errors(data):
    try:
        await http1.copy_body(reader_of(data), Sink(), -1)
    except (http1.HTTPError, asyncio.IncompleteReadError):
        pass


# -- what the origin server sees ----------------------------------------------------------------
async def test_upstream_head_strips_hop_by_hop():
    req = await request(
        b"GET http://tomcat:8080/p HTTP/1.1\r\nHost: tomcat:8080\r\nProxy-Connection: keep-alive\r\n"
        b"Proxy-Authorization: Basic dTpw\r\nKeep-Alive: timeout=5\r\nTE: trailers\r\n"
        b"Connection: keep-alive, X-Secret\r\nX-Secret: 1\r\nX-Kept: 2\r\nAccept: */*\r\n\r\n")
    start, lines = parse_head(http.upstream_head(req, "/p", "tomcat", 8080))
    assert start == "GET /p HTTP/1.1"
    names = [ln.split(":", 1)[0].lower() for ln in lines]
    for hop in ("proxy-connection", "proxy-authorization", "keep-alive", "te", "connection", "x-secret"):
        assert hop not in names
    assert "X-Kept: 2" in lines and "Accept: */*" in lines
    assert names.count("host") == 1


async def test_upstream_head_close():
    req = await request(b"GET http://x/ HTTP/1.1\r\nConnection: close\r\n\r\n")
    _, lines = parse_head(http.upstream_head(req, "/", "x", 80))
    assert "Connection: close" in lines


async def test_upstream_head_http10_keep_alive_is_forwarded():
    # HTTP/1.0 without "Connection: keep-alive" means close: the origin would hang up after one
    # response while the proxy still believes the upstream connection is reusable.
    req = await request(b"GET http://x/ HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
    start, lines = parse_head(http.upstream_head(req, "/", "x", 80))
    assert start == "GET / HTTP/1.0"
    assert "Connection: keep-alive" in lines


async def test_upstream_head_websocket_keeps_upgrade():
    req = await request(b"GET http://ws:8080/chat HTTP/1.1\r\nHost: ws:8080\r\nConnection: Upgrade\r\n"
                        b"Upgrade: websocket\r\nSec-WebSocket-Key: abc\r\nSec-WebSocket-Version: 13\r\n\r\n")
    _, lines = parse_head(http.upstream_head(req, "/chat", "ws", 8080))
    assert "Connection: Upgrade" in lines and "Upgrade: websocket" in lines
    assert "Sec-WebSocket-Key: abc" in lines


async def test_upstream_head_upgrade_not_listed_in_connection_is_dropped():
    req = await request(b"GET http://ws/ HTTP/1.1\r\nUpgrade: websocket\r\n\r\n")
    _, lines = parse_head(http.upstream_head(req, "/", "ws", 80))
    assert not any(ln.lower().startswith(("upgrade", "connection: upgrade")) for ln in lines)


@pytest.mark.parametrize("host,port,expected", [
    ("tomcat", 80, "Host: tomcat"), ("tomcat", 8080, "Host: tomcat:8080"),
    ("fd00::1", 80, "Host: [fd00::1]"), ("fd00::1", 8080, "Host: [fd00::1]:8080"),
])
async def test_upstream_head_adds_host(host, port, expected):
    req = await request(b"GET http://whatever/ HTTP/1.1\r\n\r\n")
    _, lines = parse_head(http.upstream_head(req, "/", host, port))
    assert expected in lines


async def test_upstream_head_host_comes_from_the_absolute_uri():
    # RFC 9112 3.2.2: a proxy MUST replace Host with the absolute-form target's authority.
    req = await request(b"GET http://tomcat:8080/ HTTP/1.1\r\nHost: evil.example\r\n\r\n")
    _, lines = parse_head(http.upstream_head(req, "/", "tomcat", 8080))
    assert [ln for ln in lines if ln.lower().startswith("host:")] == ["Host: tomcat:8080"]


async def test_upstream_head_keeps_body_framing():
    req = await request(b"POST http://x/ HTTP/1.1\r\nTransfer-Encoding: chunked\r\nTrailer: X-T\r\n\r\n")
    _, lines = parse_head(http.upstream_head(req, "/", "x", 80))
    assert "Transfer-Encoding: chunked" in lines and "Trailer: X-T" in lines


# -- what the client sees -----------------------------------------------------------------------
async def test_response_head_strips_hop_by_hop():
    resp = await response(b"HTTP/1.1 200 OK\r\nConnection: X-Hop\r\nX-Hop: 1\r\nKeep-Alive: timeout=1\r\n"
                          b"Proxy-Authenticate: Basic\r\nContent-Length: 2\r\n\r\n")
    start, lines = parse_head(http1.response_head(resp, keep_alive=True))
    assert start == "HTTP/1.1 200 OK"
    assert lines == ["Content-Length: 2", "Connection: keep-alive"]
    _, lines = parse_head(http1.response_head(resp, keep_alive=False))
    assert lines[-1] == "Connection: close"


async def test_response_head_101_keeps_upgrade():
    resp = await response(b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
                          b"Sec-WebSocket-Accept: x\r\n\r\n")
    _, lines = parse_head(http1.response_head(resp, keep_alive=True))
    assert "Upgrade: websocket" in lines and "Connection: Upgrade" in lines


async def test_response_head_100_continue_has_no_connection_header():
    resp = await response(b"HTTP/1.1 100 Continue\r\n\r\n")
    assert http1.response_head(resp, keep_alive=True) == b"HTTP/1.1 100 Continue\r\n\r\n"


# -- proxy authentication and local responses ---------------------------------------------------
def auth_req(value: str | None) -> http1.Request:
    headers = [("Proxy-Authorization", value)] if value is not None else []
    return http1.Request(("GET", "http://x/", "HTTP/1.1"), headers)


def b64(s: str) -> str:
    return base64.b64encode(s.encode()).decode()


def test_check_proxy_auth():
    creds = ("alice", "pa:ss")
    assert http.check_proxy_auth(auth_req(None), None)
    assert http.check_proxy_auth(auth_req("garbage"), None)
    assert http.check_proxy_auth(auth_req("Basic " + b64("alice:pa:ss")), creds)
    assert http.check_proxy_auth(auth_req("basic  " + b64("alice:pa:ss")), creds)
    assert not http.check_proxy_auth(auth_req(None), creds)
    assert not http.check_proxy_auth(auth_req("Basic " + b64("alice:wrong")), creds)
    assert not http.check_proxy_auth(auth_req("Basic " + b64("alice")), creds)
    assert not http.check_proxy_auth(auth_req("Bearer " + b64("alice:pa:ss")), creds)
    assert not http.check_proxy_auth(auth_req("Basic !!!notbase64"), creds)
    assert not http.check_proxy_auth(auth_req("Basic " + base64.b64encode(b"\xff:\xfe").decode()), creds)


@given(st.text(max_size=20).filter(lambda s: ":" not in s), st.text(max_size=20))
def test_check_proxy_auth_roundtrip(user, password):
    req = auth_req("Basic " + b64(f"{user}:{password}"))
    assert http.check_proxy_auth(req, (user, password))
    assert not http.check_proxy_auth(req, (user, password + "x"))


def test_credentials_compared_in_constant_time(monkeypatch):
    # S3: every credential check goes through hmac.compare_digest, user and password both (no `==`
    # that returns at the first wrong character, no short-circuit after a wrong user name).
    calls = []
    real = http.hmac.compare_digest

    def spy(a, b):
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(http.hmac, "compare_digest", spy)
    assert not http.check_proxy_auth(auth_req("Basic " + b64("mallory:pa:ss")), ("alice", "pa:ss"))
    assert (b"mallory", b"alice") in calls and (b"pa:ss", b"pa:ss") in calls
    calls.clear()
    assert http.credentials_match(("alice", "pa:ss"), ("alice", "pa:ss"))
    assert len(calls) == 2


def pac_req(host: str | None, **headers: str) -> http1.Request:
    fields = [("Host", host)] if host is not None else []
    return http1.Request(("GET", "/proxy.pac", "HTTP/1.1"), fields + [(k.replace("_", "-"), v)
                                                                   for k, v in headers.items()])


@pytest.mark.parametrize("peer", ["127.0.0.1", "127.9.9.9", "::1", "::ffff:127.0.0.1"])
@pytest.mark.parametrize("host", ["127.0.0.1:2223", "localhost:2223", "[::1]:2223", "LOCALHOST", "127.0.0.1"])
def test_pac_for_loopback_peers(peer, host):
    # S3: ::ffff:127.0.0.1 is loopback on every Python (3.11/3.12's ipaddress says it is not).
    assert http.pac_access(pac_req(host), peer, {"127.0.0.1"}, None) is None
    assert http.pac_access(pac_req(host), peer, {"127.0.0.1"}, ("u", "p")) is None


@pytest.mark.parametrize("host", ["evil.example.com", "evil.example.com:2223", "127.lan.example.com:2223",
                                  "10.0.0.9:2223", "", None, "[::1"])
def test_pac_refused_for_a_foreign_host_header(host):
    # S3: a page whose name was re-bound to 127.0.0.1 (DNS rebinding) sends its own name as Host.
    assert http.pac_access(pac_req(host), "127.0.0.1", {"127.0.0.1", "10.0.0.5"}, None) == 403


@pytest.mark.parametrize("host", ["10.0.0.5:2223", "[fd00:0::5]:2223", "proxy.lan:2223", "PROXY.LAN."])
def test_pac_host_may_name_the_bound_address(host):
    local = {"10.0.0.5", "fd00::5", "proxy.lan"}
    assert http.pac_access(pac_req(host), "127.0.0.1", local, None) is None


def test_pac_for_other_peers_needs_credentials():
    local, creds = {"10.0.0.5"}, ("alice", "s3cret")
    host = "10.0.0.5:2223"
    assert http.pac_access(pac_req(host), "10.0.0.7", local, None) == 403
    assert http.pac_access(pac_req(host), "::ffff:10.0.0.7", local, None) == 403
    assert http.pac_access(pac_req(host), "10.0.0.7", local, creds) == 401
    wrong = "Basic " + b64("alice:guess")
    assert http.pac_access(pac_req(host, Authorization=wrong), "10.0.0.7", local, creds) == 401
    right = "Basic " + b64("alice:s3cret")
    assert http.pac_access(pac_req(host, Authorization=right), "10.0.0.7", local, creds) is None
    assert http.pac_access(pac_req(host, Proxy_Authorization=right), "10.0.0.7", local, creds) is None


def test_basic_credentials():
    assert http.basic_credentials(None) is None
    assert http.basic_credentials("u:p:q") == ("u", "p:q")
    with pytest.raises(ValueError):
        http.basic_credentials("nopassword")


async def test_simple_response_parses_back():
    raw = http1.simple_response(407, "ünïcode body\n", headers=[("Proxy-Authenticate", 'Basic realm="k"')])
    r = reader_of(raw)
    resp = await http1.read_response(r)
    assert resp.status == 407 and resp.start[2] == "Proxy Authentication Required"
    assert resp.get("proxy-authenticate") == 'Basic realm="k"'
    assert resp.get("connection") == "close"
    n = http1.body_length(resp, is_response=True, request_method="GET")
    assert n == len("ünïcode body\n".encode())
    assert await r.read() == "ünïcode body\n".encode()


def test_simple_response_keep_alive_and_type():
    raw = http1.simple_response(200, "x", content_type="application/x-ns-proxy-autoconfig", close=False)
    assert raw.startswith(b"HTTP/1.1 200 OK\r\n")
    assert b"\r\nContent-Type: application/x-ns-proxy-autoconfig\r\n" in raw
    assert b"\r\nConnection: keep-alive\r\n" in raw
    assert raw.endswith(b"\r\n\r\nx")

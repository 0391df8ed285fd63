"""HTTP/1.1 message framing (RFC 9112) for anything that forwards HTTP: heads, bodies, hop-by-hop fields.

Stdlib only, no ktproxy imports: the local proxy uses it, and an in-cluster router can too. Bodies are
copied verbatim (chunked framing included) by Content-Length or chunk by chunk, never buffered whole,
so large uploads and downloads stay flat in memory.
"""

from __future__ import annotations

import asyncio
import re
from dataclasses import dataclass, field

from ktwire.addr import split_host_port

MAX_HEAD = 64 * 1024
HOP_BY_HOP = frozenset({"connection", "keep-alive", "proxy-connection", "proxy-authorization",
                        "proxy-authenticate", "te", "upgrade"})
REASONS = {200: "OK", 400: "Bad Request", 401: "Unauthorized", 403: "Forbidden", 404: "Not Found",
           405: "Method Not Allowed", 407: "Proxy Authentication Required",
           431: "Request Header Fields Too Large", 501: "Not Implemented", 502: "Bad Gateway",
           504: "Gateway Timeout"}

# RFC 9110 5.6.2: a token (a field name, a method) is one or more tchar
TCHAR = frozenset(b"!#$%&'*+-.^_`|~0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz")
_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
_HEX = re.compile(rb"[0-9A-Fa-f]{1,16}")
# Bare CR/LF or NUL inside a line: a lenient origin would see a line break we did not (smuggling).
_BAD_IN_LINE = re.compile(r"[\r\n\x00]")


def _is_digits(s: str) -> bool:
    """ASCII decimal digits only: str.isdigit() also accepts latin-1 superscripts int() refuses."""
    return s.isascii() and s.isdigit()


class HTTPError(Exception):
    """A message that cannot be forwarded; `status` is the answer to give (if a head can still be sent)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class EmptyResponse(HTTPError):
    """The peer closed before sending a single byte of a response (a kept-alive connection it had closed)."""

    def __init__(self) -> None:
        super().__init__(502, "upstream closed without a response")


@dataclass
class Message:
    """A request or response head."""

    start: tuple[str, str, str]
    headers: list[tuple[str, str]] = field(default_factory=list)

    def get(self, name: str) -> str | None:
        name = name.lower()
        for k, v in self.headers:
            if k.lower() == name:
                return v
        return None

    def get_all(self, name: str) -> list[str]:
        name = name.lower()
        return [v for k, v in self.headers if k.lower() == name]

    def tokens(self, name: str) -> set[str]:
        return {t.strip().lower() for v in self.get_all(name) for t in v.split(",") if t.strip()}

    def end_to_end(self, keep: frozenset[str] = frozenset()) -> list[tuple[str, str]]:
        """The fields a forwarder passes on (RFC 9110 7.6.1): hop-by-hop ones, and any the Connection
        field lists, are dropped; `keep` names hop-by-hop fields to pass all the same."""
        listed = self.tokens("connection") - {"upgrade", "keep-alive", "close"}
        return [(k, v) for k, v in self.headers
                if not ((k.lower() in HOP_BY_HOP and k.lower() not in keep) or k.lower() in listed)]


@dataclass
class Request(Message):
    @property
    def method(self) -> str:
        return self.start[0]

    @property
    def target(self) -> str:
        return self.start[1]

    @property
    def version(self) -> str:
        return self.start[2]

    def keep_alive(self) -> bool:
        conn = self.tokens("connection") | self.tokens("proxy-connection")
        if self.version == "HTTP/1.0":
            return "keep-alive" in conn
        return "close" not in conn


@dataclass
class Response(Message):
    @property
    def status(self) -> int:
        return int(self.start[1])

    def keep_alive(self) -> bool:
        """Whether the sender keeps the connection open after this response."""
        conn = self.tokens("connection")
        if self.start[0] == "HTTP/1.0":
            return "keep-alive" in conn
        return "close" not in conn


def _parse_head(data: bytes, status: int) -> tuple[str, list[tuple[str, str]]]:
    """The start line and the header fields of a head; malformed input raises HTTPError(status)."""
    text = data.decode("latin-1")  # decodes any byte string
    lines = text.split("\r\n")
    if _BAD_IN_LINE.search(lines[0]):
        raise HTTPError(status, f"malformed start line {lines[0][:80]!r}")
    headers: list[tuple[str, str]] = []
    for line in lines[1:]:
        if not line:
            continue
        if line[0] in " \t":
            raise HTTPError(status, "obsolete header folding")
        name, sep, value = line.partition(":")
        if not sep or not _TOKEN.fullmatch(name) or _BAD_IN_LINE.search(value):
            raise HTTPError(status, f"malformed header line {line[:80]!r}")
        headers.append((name, value.strip(" \t")))
    return lines[0], headers


async def _read_head(reader: asyncio.StreamReader, closed_status: int, large_status: int) -> bytes | None:
    """One head without its final CRLFCRLF, or None at EOF before any byte of it."""
    try:
        data = await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError as exc:
        if not exc.partial.strip():
            return None
        raise HTTPError(closed_status, "connection closed mid-head") from exc
    except asyncio.LimitOverrunError as exc:
        raise HTTPError(large_status, "head too large") from exc
    if len(data) > MAX_HEAD:
        raise HTTPError(large_status, "head too large")
    return data[:-4]


async def read_request(reader: asyncio.StreamReader, first: bytes = b"") -> Request | None:
    """The next request head on a connection, or None at a clean EOF between requests."""
    head = await _read_head(reader, 400, 431)
    # RFC 9112 2.2: empty lines before a request line (some clients send a CRLF after a body) are
    # ignored; a head of nothing but CRLFs means the request is still to come.
    while head is not None and not first and (head := head.lstrip(b"\r\n")) == b"":
        head = await _read_head(reader, 400, 431)
    if head is None:
        if first:
            raise HTTPError(400, "connection closed mid-head")
        return None
    line, headers = _parse_head(first + head, 400)
    parts = line.split(" ")
    if len(parts) != 3 or not all(parts):
        raise HTTPError(400, f"malformed start line {line[:80]!r}")
    method, target, version = parts
    if version not in ("HTTP/1.1", "HTTP/1.0"):
        raise HTTPError(400, f"unsupported version {version[:20]!r}")
    if not _TOKEN.fullmatch(method):  # RFC 9110 9.1: any token (M-SEARCH, VERSION-CONTROL, lower case)
        raise HTTPError(400, f"bad method {method[:20]!r}")
    return Request((method, target, version), headers)


async def read_response(reader: asyncio.StreamReader) -> Response:
    """The next response head. Everything wrong with it is the upstream's fault: HTTPError(502)."""
    head = await _read_head(reader, 502, 502)
    if head is None:
        raise EmptyResponse
    line, headers = _parse_head(head, 502)
    # status-line = HTTP-version SP 3DIGIT SP [reason]; "HTTP/1.1 200" without the SP is common
    parts = line.split(" ", 2)
    if (len(parts) < 2 or parts[0] not in ("HTTP/1.1", "HTTP/1.0") or not _is_digits(parts[1])
            or len(parts[1]) != 3):
        raise HTTPError(502, f"malformed upstream status line {line[:80]!r}")
    return Response((parts[0], parts[1], parts[2] if len(parts) == 3 else ""), headers)


def split_authority(authority: str, default_port: int) -> tuple[str, int]:
    """host[:port] or [v6][:port] -> (host, port); an unbracketed IPv6 literal has no port."""
    if authority.count(":") > 1 and not authority.startswith("["):
        return authority, default_port
    try:
        host, port = split_host_port(authority, default_port)
    except ValueError as exc:
        raise HTTPError(400, f"bad authority {authority[:80]!r}") from exc
    if not host or port == 0:
        raise HTTPError(400, f"bad authority {authority[:80]!r}")
    return host, port


def host_header(host: str, port: int, default_port: int = 80) -> str:
    """The Host value for host:port (IPv6 literals in brackets, the default port left out)."""
    h = f"[{host}]" if ":" in host else host
    return h if port == default_port else f"{h}:{port}"


def simple_response(status: int, body: str = "", headers: list[tuple[str, str]] | None = None,
                    content_type: str = "text/plain; charset=utf-8", close: bool = True) -> bytes:
    payload = body.encode()
    lines = [f"HTTP/1.1 {status} {REASONS.get(status, 'Error')}",
             f"Content-Type: {content_type}", f"Content-Length: {len(payload)}"]
    lines += [f"{k}: {v}" for k, v in headers or []]
    lines.append("Connection: close" if close else "Connection: keep-alive")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + payload


def response_head(resp: Response, keep_alive: bool) -> bytes:
    """The response head as forwarded: end-to-end fields, and this hop's own connection decision."""
    upgrading = resp.status == 101
    lines = [" ".join(resp.start)]
    lines += [f"{k}: {v}" for k, v in resp.end_to_end(frozenset({"upgrade"}) if upgrading else frozenset())]
    if upgrading:
        lines.append("Connection: Upgrade")
    elif not (100 <= resp.status < 200):
        lines.append("Connection: keep-alive" if keep_alive else "Connection: close")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def body_length(msg: Message, *, is_response: bool, request_method: str = "") -> int | None:
    """Bytes of body to copy: a number, -1 for chunked, None for until-close (responses only)."""
    if is_response:
        status = msg.start[1]
        if request_method == "HEAD" or status.startswith("1") or status in ("204", "304"):
            return 0
    codings = [t.strip().lower() for v in msg.get_all("transfer-encoding") for t in v.split(",") if t.strip()]
    cl = msg.get_all("content-length")
    if codings:
        if is_response:  # chunked only counts as the final coding; otherwise the body ends at close
            return -1 if codings[-1] == "chunked" else None
        if codings[-1] != "chunked":
            raise HTTPError(400, "unsupported transfer-encoding (chunked must come last)")
        if cl:  # RFC 9112 6.3: both framings at once is how requests are smuggled
            raise HTTPError(400, "both Transfer-Encoding and Content-Length")
        return -1
    if cl:
        values = {v.strip() for v in cl}
        if len(values) != 1 or not _is_digits(next(iter(values))):
            raise HTTPError(400 if not is_response else 502, "bad Content-Length")
        return int(next(iter(values)))
    return None if is_response else 0


async def copy_body(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, length: int | None,
                    chunk: int = 256 * 1024, status: int = 400) -> None:
    """Copy one body verbatim (chunked framing included) with drain after every write.

    Bad framing, or EOF before the body's end, raises HTTPError(status): 400 for a request body (the
    client's fault), 502 for a response body (the upstream's).
    """
    try:
        await _copy_body(reader, writer, length, chunk, status)
    except asyncio.IncompleteReadError as exc:
        raise HTTPError(status, "body ended early") from exc


async def _copy_body(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, length: int | None,
                     chunk: int, status: int) -> None:
    if length is None:
        while data := await reader.read(chunk):
            writer.write(data)
            await writer.drain()
        return
    if length >= 0:
        remaining = length
        while remaining:
            data = await reader.read(min(chunk, remaining))
            if not data:
                raise HTTPError(status, "body ended early")
            remaining -= len(data)
            writer.write(data)
            await writer.drain()
        return
    while True:
        line = await _read_line(reader, status)
        writer.write(line)
        size_s = line[:-2].split(b";", 1)[0].strip(b" \t")
        if not _HEX.fullmatch(size_s):
            raise HTTPError(status, f"bad chunk size {size_s[:20]!r}")
        size = int(size_s, 16)
        if size == 0:
            while True:  # trailers, then the empty line; drained each, so endless trailers push back
                trailer = await _read_line(reader, status)
                writer.write(trailer)
                await writer.drain()
                if trailer == b"\r\n":
                    return
        await _copy_body(reader, writer, size, chunk, status)
        end = await reader.readexactly(2)
        if end != b"\r\n":
            raise HTTPError(status, "chunk data not followed by CRLF")
        writer.write(end)


async def _read_line(reader: asyncio.StreamReader, status: int) -> bytes:
    """One CRLF-terminated line of chunked framing, without bare CR/LF inside it."""
    try:
        line = await reader.readuntil(b"\r\n")
    except asyncio.LimitOverrunError as exc:
        raise HTTPError(status, "chunk line too long") from exc
    if b"\n" in line[:-2] or b"\r" in line[:-2]:
        raise HTTPError(status, "bare CR or LF in chunked framing")
    return line

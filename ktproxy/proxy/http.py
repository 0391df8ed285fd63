"""HTTP proxying: CONNECT tunnels and absolute-URI requests with keep-alive.

Message framing follows RFC 9112: bodies are copied by Content-Length or chunk by chunk (verbatim),
never buffered whole, so large uploads and downloads stay flat in memory. Upgrades (WebSocket)
switch to a raw relay after the 101.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import re
from dataclasses import dataclass, field
from urllib.parse import urlsplit

MAX_HEAD = 64 * 1024
HOP_BY_HOP = {"connection", "keep-alive", "proxy-connection", "proxy-authorization", "proxy-authenticate",
              "te", "upgrade"}
REASONS = {200: "OK", 400: "Bad Request", 403: "Forbidden", 404: "Not Found", 405: "Method Not Allowed",
           407: "Proxy Authentication Required", 431: "Request Header Fields Too Large",
           502: "Bad Gateway", 504: "Gateway Timeout", 501: "Not Implemented"}


# RFC 9110 5.1: a field name is a token
_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
_HEX = re.compile(rb"[0-9A-Fa-f]{1,16}")
# Bare CR/LF or NUL inside a line: a lenient origin would see a line break we did not (smuggling).
_BAD_IN_LINE = re.compile(r"[\r\n\x00]")


def _is_digits(s: str) -> bool:
    """ASCII decimal digits only: str.isdigit() also accepts latin-1 superscripts int() refuses."""
    return s.isascii() and s.isdigit()


class HTTPError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


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


def _parse_head(data: bytes, status: int = 400) -> tuple[str, list[tuple[str, str]]]:
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


async def _read_head(reader: asyncio.StreamReader) -> bytes | None:
    try:
        data = await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError as exc:
        if not exc.partial.strip():
            return None
        raise HTTPError(400, "connection closed mid-request") from exc
    except asyncio.LimitOverrunError as exc:
        raise HTTPError(431, "request head too large") from exc
    if len(data) > MAX_HEAD:
        raise HTTPError(431, "request head too large")
    return data[:-4]


async def read_request(reader: asyncio.StreamReader, first: bytes = b"") -> Request | None:
    """The next request head on a connection, or None at a clean EOF between requests."""
    head = await _read_head(reader)
    # RFC 9112 2.2: empty lines before a request line (some clients send a CRLF after a body) are
    # ignored; a head of nothing but CRLFs means the request is still to come.
    while head is not None and not first and (head := head.lstrip(b"\r\n")) == b"":
        head = await _read_head(reader)
    if head is None:
        if first:
            raise HTTPError(400, "connection closed mid-request")
        return None
    line, headers = _parse_head(first + head, 400)
    parts = line.split(" ")
    if len(parts) != 3 or not all(parts):
        raise HTTPError(400, f"malformed start line {line[:80]!r}")
    method, target, version = parts
    if version not in ("HTTP/1.1", "HTTP/1.0"):
        raise HTTPError(400, f"unsupported version {version[:20]!r}")
    if not (method.isascii() and method.isalpha() and method.isupper()):
        raise HTTPError(400, f"bad method {method[:20]!r}")
    return Request((method, target, version), headers)


async def read_response(reader: asyncio.StreamReader) -> Response:
    head = await _read_head(reader)
    if head is None:
        raise HTTPError(502, "upstream closed without a response")
    line, headers = _parse_head(head, 502)
    # status-line = HTTP-version SP 3DIGIT SP [reason]; "HTTP/1.1 200" without the SP is common
    parts = line.split(" ", 2)
    if (len(parts) < 2 or parts[0] not in ("HTTP/1.1", "HTTP/1.0") or not _is_digits(parts[1])
            or len(parts[1]) != 3):
        raise HTTPError(502, f"malformed upstream status line {line[:80]!r}")
    return Response((parts[0], parts[1], parts[2] if len(parts) == 3 else ""), headers)


def split_authority(authority: str, default_port: int) -> tuple[str, int]:
    """host[:port] or [v6][:port] -> (host, port)."""
    if authority.startswith("["):
        host, sep, rest = authority[1:].partition("]")
        if not sep:
            raise HTTPError(400, f"bad authority {authority!r}")
        port_s = rest[1:] if rest.startswith(":") else ""
        if rest and not rest.startswith(":"):
            raise HTTPError(400, f"bad authority {authority!r}")
    else:
        host, _, port_s = authority.rpartition(":") if authority.count(":") == 1 else (authority, "", "")
    if not host:
        raise HTTPError(400, f"bad authority {authority!r}")
    if not port_s:
        return host, default_port
    if not _is_digits(port_s) or len(port_s) > 5 or not 0 < int(port_s) < 65536:
        raise HTTPError(400, f"bad port in {authority!r}")
    return host, int(port_s)


def absolute_target(req: Request) -> tuple[str, int, str]:
    """host, port and origin-form path of an absolute-URI request."""
    try:
        url = urlsplit(req.target)
    except ValueError as exc:
        raise HTTPError(400, f"bad URI {req.target[:80]!r}") from exc
    if url.scheme.lower() != "http":
        raise HTTPError(400, f"only http:// URIs can be proxied without CONNECT, not {url.scheme!r}")
    host, port = split_authority(url.netloc.rpartition("@")[2], 80)
    path = url.path or "/"
    if url.query:
        path += "?" + url.query
    return host, port, path


def check_proxy_auth(req: Request, credentials: tuple[str, str] | None) -> bool:
    if credentials is None:
        return True
    value = req.get("proxy-authorization") or ""
    scheme, _, token = value.partition(" ")
    if scheme.lower() != "basic":
        return False
    try:
        user, _, password = base64.b64decode(token.strip(), validate=True).decode().partition(":")
    except (binascii.Error, UnicodeDecodeError):
        return False
    return (user, password) == credentials


def simple_response(status: int, body: str = "", headers: list[tuple[str, str]] | None = None,
                    content_type: str = "text/plain; charset=utf-8", close: bool = True) -> bytes:
    payload = body.encode()
    lines = [f"HTTP/1.1 {status} {REASONS.get(status, 'Error')}",
             f"Content-Type: {content_type}", f"Content-Length: {len(payload)}"]
    lines += [f"{k}: {v}" for k, v in headers or []]
    lines.append("Connection: close" if close else "Connection: keep-alive")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + payload


def host_header(host: str, port: int) -> str:
    """The Host value for host:port (IPv6 literals in brackets, the default port left out)."""
    h = f"[{host}]" if ":" in host else host
    return h if port == 80 else f"{h}:{port}"


def upstream_head(req: Request, path: str, host: str, port: int) -> bytes:
    """The request as the origin server sees it: origin-form, no proxy hop-by-hop headers.

    Host is rebuilt from the absolute-form target (RFC 9112 3.2.2: a proxy MUST ignore a received
    Host and use the target's authority), so the origin never sees a Host the proxy did not route.
    """
    upgrade = req.get("upgrade") if "upgrade" in req.tokens("connection") else None
    listed = req.tokens("connection") - {"upgrade", "keep-alive", "close"}
    lines = [f"{req.method} {path} {req.version}", f"Host: {host_header(host, port)}"]
    for k, v in req.headers:
        lk = k.lower()
        if lk in HOP_BY_HOP or lk in listed or lk == "host":
            continue
        lines.append(f"{k}: {v}")
    if upgrade:
        lines += ["Connection: Upgrade", f"Upgrade: {upgrade}"]
    elif not req.keep_alive():
        lines.append("Connection: close")
    elif req.version == "HTTP/1.0":
        lines.append("Connection: keep-alive")  # HTTP/1.0 closes unless asked not to
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def response_head(resp: Response, keep_alive: bool) -> bytes:
    listed = resp.tokens("connection") - {"upgrade", "keep-alive", "close"}
    lines = [" ".join(resp.start)]
    upgrading = resp.status == 101
    for k, v in resp.headers:
        lk = k.lower()
        if (lk in HOP_BY_HOP and not (upgrading and lk == "upgrade")) or lk in listed:
            continue
        lines.append(f"{k}: {v}")
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
                    chunk: int = 256 * 1024) -> None:
    """Copy one body verbatim (chunked framing included) with drain after every write."""
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
                raise HTTPError(502, "body ended early")
            remaining -= len(data)
            writer.write(data)
            await writer.drain()
        return
    while True:
        line = await _read_line(reader)
        writer.write(line)
        size_s = line[:-2].split(b";", 1)[0].strip(b" \t")
        if not _HEX.fullmatch(size_s):
            raise HTTPError(400, f"bad chunk size {size_s[:20]!r}")
        size = int(size_s, 16)
        if size == 0:
            while True:  # trailers, then the empty line
                trailer = await _read_line(reader)
                writer.write(trailer)
                if trailer == b"\r\n":
                    await writer.drain()
                    return
        await copy_body(reader, writer, size, chunk)
        end = await reader.readexactly(2)
        if end != b"\r\n":
            raise HTTPError(400, "chunk data not followed by CRLF")
        writer.write(end)


async def _read_line(reader: asyncio.StreamReader) -> bytes:
    """One CRLF-terminated line of chunked framing, without bare CR/LF inside it."""
    try:
        line = await reader.readuntil(b"\r\n")
    except asyncio.LimitOverrunError as exc:
        raise HTTPError(400, "chunk line too long") from exc
    if b"\n" in line[:-2] or b"\r" in line[:-2]:
        raise HTTPError(400, "bare CR or LF in chunked framing")
    return line


def basic_credentials(value: str | None) -> tuple[str, str] | None:
    if not value:
        return None
    user, sep, password = value.partition(":")
    if not sep:
        raise ValueError("proxy credentials must be user:password")
    return user, password


async def close_quietly(writer: asyncio.StreamWriter | None) -> None:
    if writer is None:
        return
    with contextlib.suppress(Exception):
        writer.close()

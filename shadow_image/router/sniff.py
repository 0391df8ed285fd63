"""What a new connection speaks, from its first bytes: HTTP/2 with prior knowledge, HTTP/1 the router
parses, an HTTP-shaped request line it refuses (400, or 501 for a method llhttp does not know), or
anything else (passed to the original pods untouched)."""

from __future__ import annotations

H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
H1, H2, RAW = "h1", "h2", "raw"
# An HTTP-shaped request line (`METHOD SP TARGET SP HTTP/d.d`, METHOD starting with a letter) the router
# cannot parse: BAD (400) when the method is no token or something else in the line is invalid,
# NOT_IMPLEMENTED (501, RFC 9110 9.1) for a well-formed method llhttp does not know.
BAD, NOT_IMPLEMENTED = "bad", "501"
# How long a silent client may take before the router decides it speaks a protocol where the server
# talks first (SMTP, MySQL, ...) and connects it to the original pods.
WAIT = 1.0

# The methods llhttp parses (HTTP and WebDAV families); another one in an HTTP-shaped request line gets a
# 501 (it cannot be routed by its header, so passing it raw to the original pods would bypass routing).
METHODS = frozenset({
    b"DELETE", b"GET", b"HEAD", b"POST", b"PUT", b"OPTIONS", b"TRACE", b"PATCH",
    b"COPY", b"LOCK", b"MKCOL", b"MOVE", b"PROPFIND", b"PROPPATCH", b"SEARCH", b"UNLOCK", b"BIND", b"REBIND",
    b"UNBIND", b"ACL", b"REPORT", b"MKACTIVITY", b"CHECKOUT", b"MERGE", b"M-SEARCH", b"NOTIFY", b"SUBSCRIBE",
    b"UNSUBSCRIBE", b"PURGE", b"MKCALENDAR", b"LINK", b"UNLINK", b"SOURCE", b"QUERY",
})
_LONGEST = max(len(m) for m in METHODS)


_MAX_METHOD = 32
_MAX_LINE = 16 * 1024  # an HTTP-shaped line still unfinished past this is taken for something else
_VERSION = b"HTTP/0.0"
_TCHAR = frozenset(b"!#$%&'*+-.^_`|~0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz")


def classify(data: bytes) -> str | None:
    """H1, H2, RAW, BAD or NOT_IMPLEMENTED, or None while the bytes so far do not decide. One empty line
    before the request line is ignored (RFC 9112 2.2; llhttp skips it too)."""
    if data[:24] == H2_PREFACE[: min(len(data), 24)]:
        return H2 if len(data) >= 24 else None
    start = 0
    first = data[:1]
    if first == b"\r":
        if len(data) == 1:
            return None
        if data[1:2] == b"\n":
            start = 2
    elif first == b"\n":
        start = 1
    space = data.find(b" ", start, start + _LONGEST + 1)
    if space > start and data[start:space] in METHODS:
        return H1
    return _shaped(data, start)


def _shaped(data: bytes, start: int) -> str | None:
    """Whether the first line is an HTTP request line the router cannot parse (BAD, NOT_IMPLEMENTED), could
    still become one (None), or is something else (RAW)."""
    end = data.find(b"\n", start)
    line = data[start:] if end < 0 else data[start:end]
    if not line:
        return None if end < 0 else RAW
    if not (65 <= line[0] <= 90 or 97 <= line[0] <= 122):
        return RAW
    sp1 = line.find(b" ")
    if sp1 < 0:
        return None if end < 0 and len(line) <= _MAX_METHOD and b"\r" not in line else RAW
    method = line[:sp1]
    if sp1 > _MAX_METHOD or b"\r" in method:
        return RAW
    sp2 = line.find(b" ", sp1 + 1)
    if sp2 < 0:
        if end >= 0 or b"\r" in line or len(line) > _MAX_LINE:
            return RAW
        return None
    if sp2 == sp1 + 1 or b"\r" in line[sp1 + 1:sp2]:
        return RAW
    version = line[sp2 + 1:]
    cr = version.endswith(b"\r")
    if cr:
        version = version[:-1]
    if len(version) > len(_VERSION) or (end < 0 and cr and len(version) < len(_VERSION)):
        return RAW
    for i, c in enumerate(version):
        if not 48 <= c <= 57 if i in (5, 7) else c != _VERSION[i]:
            return RAW
    if end < 0:
        return None
    if len(version) < len(_VERSION):
        return RAW
    if all(c in _TCHAR for c in method) and b"\r" in line[-1:] and method not in METHODS:
        return NOT_IMPLEMENTED
    return BAD

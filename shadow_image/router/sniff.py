"""What a new connection speaks, from its first bytes: HTTP/2 with prior knowledge, HTTP/1, or anything
else (passed to the original pods untouched)."""

from __future__ import annotations

H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
H1, H2, RAW = "h1", "h2", "raw"
# How long a silent client may take before the router decides it speaks a protocol where the server
# talks first (SMTP, MySQL, ...) and connects it to the original pods.
WAIT = 1.0

# The methods llhttp parses (HTTP and WebDAV families). A client using another one is not sent a 400 but
# passed through like any non-HTTP bytes: the original pods may know what it means.
METHODS = frozenset({
    b"DELETE", b"GET", b"HEAD", b"POST", b"PUT", b"OPTIONS", b"TRACE", b"PATCH",
    b"COPY", b"LOCK", b"MKCOL", b"MOVE", b"PROPFIND", b"PROPPATCH", b"SEARCH", b"UNLOCK", b"BIND", b"REBIND",
    b"UNBIND", b"ACL", b"REPORT", b"MKACTIVITY", b"CHECKOUT", b"MERGE", b"M-SEARCH", b"NOTIFY", b"SUBSCRIBE",
    b"UNSUBSCRIBE", b"PURGE", b"MKCALENDAR", b"LINK", b"UNLINK", b"SOURCE", b"QUERY",
})
_LONGEST = max(len(m) for m in METHODS)


def classify(data: bytes) -> str | None:
    """H1, H2 or RAW, or None while the bytes so far do not decide."""
    if data[:24] == H2_PREFACE[: min(len(data), 24)]:
        return H2 if len(data) >= 24 else None
    space = data.find(b" ", 0, _LONGEST + 1)
    if space > 0:
        return H1 if data[:space] in METHODS else RAW
    if len(data) > _LONGEST:
        return RAW
    head = bytes(data)
    return None if any(m.startswith(head) for m in METHODS) else RAW

"""The HTTP proxy's own rules on top of ktwire.http1's framing: absolute-URI targets, the head an
origin server sees, proxy credentials and who may fetch the PAC file."""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import hmac
import ipaddress
from urllib.parse import urlsplit

from ktproxy.routing import is_loopback_host
from ktwire.http1 import HTTPError, Request, host_header, split_authority


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


def upstream_head(req: Request, path: str, host: str, port: int, add: tuple[str, str] | None = None) -> bytes:
    """The request as the origin server sees it: origin-form, no proxy hop-by-hop headers, plus the
    field `add` (the mesh header of `ktctl mesh --auto-header`; the caller checked the request has none).

    Host is rebuilt from the absolute-form target (RFC 9112 3.2.2: a proxy MUST ignore a received
    Host and use the target's authority), so the origin never sees a Host the proxy did not route.
    """
    upgrade = req.get("upgrade") if "upgrade" in req.tokens("connection") else None
    lines = [f"{req.method} {path} {req.version}", f"Host: {host_header(host, port)}"]
    lines += [f"{k}: {v}" for k, v in req.end_to_end() if k.lower() != "host"]
    if add is not None:
        lines.append(f"{add[0]}: {add[1]}")
    if upgrade:
        lines += ["Connection: Upgrade", f"Upgrade: {upgrade}"]
    elif not req.keep_alive():
        lines.append("Connection: close")
    elif req.version == "HTTP/1.0":
        lines.append("Connection: keep-alive")  # HTTP/1.0 closes unless asked not to
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def credentials_match(given: tuple[str, str], expected: tuple[str, str]) -> bool:
    """Constant-time: how long the compare takes says nothing about how much of a guess was right."""
    user_ok = hmac.compare_digest(given[0].encode(), expected[0].encode())
    password_ok = hmac.compare_digest(given[1].encode(), expected[1].encode())
    return user_ok & password_ok


def basic_auth_ok(value: str | None, credentials: tuple[str, str]) -> bool:
    """Whether an Authorization-style value ("Basic base64(user:password)") carries `credentials`."""
    scheme, _, token = (value or "").partition(" ")
    if scheme.lower() != "basic":
        return False
    try:
        user, _, password = base64.b64decode(token.strip(), validate=True).decode().partition(":")
    except (binascii.Error, UnicodeDecodeError):
        return False
    return credentials_match((user, password), credentials)


def check_proxy_auth(req: Request, credentials: tuple[str, str] | None) -> bool:
    return credentials is None or basic_auth_ok(req.get("proxy-authorization"), credentials)


def pac_access(req: Request, peer_host: str, local_hosts: set[str],
               credentials: tuple[str, str] | None) -> int | None:
    """None when `req` may read the PAC file, else the status to answer (403, or 401 to ask for auth).

    The PAC names the cluster's namespaces and networks. A Host that is neither loopback nor an address
    this server is bound to means a page re-bound its own name to us (DNS rebinding): refused. Loopback
    peers read it freely; anyone else needs the proxy credentials (browsers fetch a PAC URL with
    Authorization, a proxy client may send Proxy-Authorization), and without credentials nobody else may.
    """
    try:
        host = split_authority(req.get("host") or "", 80)[0]
    except HTTPError:
        return 403
    if not (is_loopback_host(host) or canonical_host(host) in {canonical_host(h) for h in local_hosts}):
        return 403
    if is_loopback_host(peer_host):
        return None
    if credentials is None:
        return 403
    if basic_auth_ok(req.get("authorization"), credentials) or check_proxy_auth(req, credentials):
        return None
    return 401


def canonical_host(host: str) -> str:
    """One spelling per address ('FD00:0::1' and 'fd00::1' are the same host) and per name."""
    host = host.strip("[]").lower().rstrip(".")
    try:
        return str(ipaddress.ip_address(host))
    except ValueError:
        return host


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

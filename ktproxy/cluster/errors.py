"""Kubernetes failures as one line a user can act on: the error type and the mapping from client errors.

Kept apart from client.py so the REST client and the port-forward share one phrasing without importing
each other.
"""

from __future__ import annotations

import json
import re
import socket
import ssl
from dataclasses import dataclass

import urllib3
from kubernetes.client.exceptions import ApiException

from ktproxy.errors import KtError

# A dead or black-holed API server must fail in seconds, not after urllib3's default retries of an
# OS-level connect timeout (minutes). Reads stay generous: list calls on big clusters can be slow.
CONNECT_TIMEOUT = 5.0
READ_TIMEOUT = 60.0


class KubeError(KtError):
    """A Kubernetes failure already phrased as one line for the user."""

    def __init__(self, message: str, status: int | None = None, reason: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.reason = reason


@dataclass(frozen=True)
class Access:
    """What a call needs, so a 403 can say which permission is missing."""

    verb: str
    resource: str
    namespace: str | None = None

    def describe(self) -> str:
        where = f" in namespace {self.namespace}" if self.namespace else " (cluster scope)"
        return f"{self.verb} {self.resource}{where}"


_FORBIDDEN_RE = re.compile(
    r'cannot (?P<verb>[\w-]+) resource "(?P<resource>[^"]+)"'
    r'(?: in API group "(?P<group>[^"]*)")?(?: in the namespace "(?P<ns>[^"]+)")?'
)


def status_message(body: str | None) -> str:
    """The apiserver's Status.message if the body is a Status object, else the body's first line."""
    if not body:
        return ""
    try:
        data = json.loads(body)
        if isinstance(data, dict) and data.get("message"):
            return str(data["message"])
    except ValueError:
        pass
    return body.strip().splitlines()[0] if body.strip() else ""


def forbidden_message(body: str | None, access: Access | None) -> str:
    """'no permission to VERB RESOURCE in namespace NS', taken from the apiserver's message if it says."""
    m = _FORBIDDEN_RE.search(status_message(body))
    if m:
        resource = m.group("resource")
        if m.group("group"):
            resource = f"{resource}.{m.group('group')}"
        return "no permission to " + Access(m.group("verb"), resource, m.group("ns")).describe()
    if access:
        return "no permission to " + access.describe()
    return "forbidden: " + (status_message(body) or "the API server refused the request")


def unauthorized(server: str) -> KubeError:
    return KubeError(f"the API server {server} rejected the credentials (401 Unauthorized)", 401)


def unreachable(server: str, exc: BaseException) -> KubeError:
    return KubeError(f"cannot reach the Kubernetes API server at {server}: {short(exc)}")


def api_error(exc: BaseException, server: str, access: Access | None = None) -> KubeError:
    """Map an exception from the kubernetes client or urllib3 to one clear line."""
    if isinstance(exc, KubeError):
        return exc
    if isinstance(exc, ApiException):
        status = exc.status or 0
        msg = status_message(exc.body)
        reason = None
        try:
            reason = json.loads(exc.body or "{}").get("reason")
        except (ValueError, AttributeError):
            pass
        if status == 401:
            return KubeError(unauthorized(server).args[0], 401, reason)
        if status == 403:
            return KubeError(forbidden_message(exc.body, access), 403, reason)
        if status == 404 and access and access.namespace and re.search(r'namespaces? "', msg):
            return KubeError(f"namespace {access.namespace} not found", 404, "NotFound")
        return KubeError(msg or f"API server error {status} {exc.reason or ''}".strip(), status, reason)
    if isinstance(exc, urllib3.exceptions.MaxRetryError) and exc.reason is not None:
        exc = exc.reason
    if isinstance(exc, urllib3.exceptions.SSLError | ssl.SSLError):
        return KubeError(f"TLS error talking to the API server {server}: {short(exc)}")
    if isinstance(exc, urllib3.exceptions.ProxyError):
        return KubeError(f"cannot reach the API server {server} through the configured proxy: {short(exc)}")
    if isinstance(
        exc,
        urllib3.exceptions.NewConnectionError
        | urllib3.exceptions.ConnectTimeoutError
        | urllib3.exceptions.ProtocolError
        | urllib3.exceptions.ReadTimeoutError
        | ConnectionError
        | TimeoutError
        | socket.gaierror
        | OSError,
    ):
        return unreachable(server, exc)
    return KubeError(f"Kubernetes API call failed: {short(exc)}")


def local_file_error(exc: BaseException) -> PermissionError | FileNotFoundError | None:
    """The local file error inside a urllib3 failure ('Connection aborted.', PermissionError(13, ...)).

    Loading a client key or certificate the user cannot read fails at the first request, inside the
    TLS set-up, and urllib3 reports it like a network failure.
    """
    seen: set[int] = set()
    todo: list[BaseException] = [exc]
    while todo:
        e = todo.pop()
        if id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, PermissionError | FileNotFoundError):
            return e
        nested = [a for a in e.args if isinstance(a, BaseException)]
        for more in (getattr(e, "reason", None), e.__cause__, e.__context__):
            if isinstance(more, BaseException):
                nested.append(more)
        todo.extend(nested)
    return None


def short(exc: BaseException) -> str:
    """The most telling part of a urllib3/OS error, without the nested reprs."""
    text = str(exc)
    m = re.search(r"\[Errno -?\d+\] ([^'\")]+)", text)
    if m:
        return m.group(1).strip()
    if "timed out" in text.lower():
        return f"connection timed out after {CONNECT_TIMEOUT:g}s"
    return text.splitlines()[0] if text else type(exc).__name__

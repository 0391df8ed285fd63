"""One place for Kubernetes access: kubeconfig loading, API objects, cluster time, one-line errors.

The kubernetes package's client is synchronous; async code calls it through `KubeClient.call`, which runs
it in a worker thread (asyncio.to_thread) and turns every failure into a KtError with one line a user can
act on. Nothing else in ktproxy should import kubernetes.config.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import ssl
from collections.abc import Callable
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import Any, TypeVar
from urllib.parse import urlparse

import urllib3
from kubernetes import client as k8s
from kubernetes import config as k8s_config
from kubernetes.client.exceptions import ApiException
from kubernetes.config.config_exception import ConfigException

from ktproxy.cluster.errors import (
    CONNECT_TIMEOUT,
    READ_TIMEOUT,
    Access,
    KubeError,
    api_error,
    local_file_error,
    short,
)

log = logging.getLogger("ktproxy.kube")

T = TypeVar("T")

# What urllib3 may send again after a read error, when the request may already have been applied:
# reads, and DELETE (a second one answers 404, which every caller takes as "already gone"). Never POST
# (a duplicate create fails with AlreadyExists), PATCH or PUT: our writes carry the resourceVersion they
# were computed from, so a resent write that had landed answers 409 and turns our own success into
# "someone else wrote first". Those callers re-read after a failed write and recognise their own value
# (exchange/takeover.py switch_selector, exchange/lock.py acquire).
RETRIED_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "DELETE"})


class _TimeoutApiClient(k8s.ApiClient):
    """ApiClient whose calls get a short connect timeout unless the caller gives one (watches do)."""

    def call_api(self, method, url, header_params=None, body=None, post_params=None, _request_timeout=None):
        if _request_timeout is None:
            _request_timeout = (CONNECT_TIMEOUT, READ_TIMEOUT)
        return super().call_api(method, url, header_params, body, post_params, _request_timeout)


def _kubeconfig_paths(explicit: str | None) -> str:
    """The kubeconfig search string the loader takes (KUBECONFIG may list several files)."""
    if explicit:
        return os.path.expanduser(explicit)
    return os.environ.get("KUBECONFIG") or os.path.expanduser("~/.kube/config")


def unreadable_file(cfg: k8s.Configuration) -> str | None:
    """'cannot read the client key file PATH: Permission denied' for the first file the loader named
    (client key, certificate, CA) that this user cannot open; None when all are readable.

    The loader only checks that the files exist; without this, the first request fails inside the
    TLS set-up and urllib3 reports it like a network failure.
    """
    for what, path in (("client key", cfg.key_file), ("client certificate", cfg.cert_file),
                       ("CA certificate", cfg.ssl_ca_cert)):
        if not path:
            continue
        try:
            with open(path, "rb"):
                pass
        except OSError as exc:
            return f"cannot read the {what} file {path}: {exc.strerror or exc}"
    return None


class KubeClient:
    """A loaded kubeconfig plus the API objects built from it.

    `configuration` is the kubernetes Configuration exactly as the loader built it (certs, CA, token with
    its refresh hook for exec plugins); the port-forward reuses it for its WebSocket.
    """

    def __init__(
        self,
        configuration: k8s.Configuration,
        namespace: str,
        context: str | None = None,
        in_cluster: bool = False,
    ) -> None:
        self.configuration = configuration
        self.namespace = namespace
        self.context = context
        self.in_cluster = in_cluster
        # urllib3's default is 3 retries of a full OS connect timeout; one retry of a 5 s connect hides
        # a transient reset without making an unreachable server take long (at most ~10 s).
        if configuration.retries is None:
            # A pooled keep-alive connection the server dropped surfaces as a read error ("Connection
            # aborted"): one retry, for the methods a lost answer makes safe to send again. A connect
            # error (nothing was sent) is retried for every method.
            configuration.retries = urllib3.util.Retry(
                total=2, connect=1, read=1, redirect=3, status=0, allowed_methods=RETRIED_METHODS)
        self.api = _TimeoutApiClient(configuration)
        self.core = k8s.CoreV1Api(self.api)
        self.apps = k8s.AppsV1Api(self.api)
        self.version_api = k8s.VersionApi(self.api)

    # ---------------------------------------------------------------- loading
    @classmethod
    def load(
        cls,
        kubeconfig: str | None = None,
        context: str | None = None,
        namespace: str | None = None,
    ) -> KubeClient:
        """Load kubeconfig (explicit path, else $KUBECONFIG, else ~/.kube/config; in-cluster as fallback)."""
        paths = _kubeconfig_paths(kubeconfig)
        existing = [p for p in paths.split(os.pathsep) if p and os.path.exists(os.path.expanduser(p))]
        if not existing:
            if not kubeconfig and not context and os.environ.get("KUBERNETES_SERVICE_HOST"):
                return cls._load_in_cluster(namespace)
            raise KubeError(f"kubeconfig {paths} not found (use --kubeconfig or set KUBECONFIG)")
        try:
            contexts, active = k8s_config.list_kube_config_contexts(config_file=paths)
        except ConfigException as exc:
            raise KubeError(f"cannot read kubeconfig {paths}: {exc}") from None
        except Exception as exc:  # yaml errors, permission errors
            raise KubeError(f"cannot read kubeconfig {paths}: {short(exc)}") from None
        if context:
            chosen = next((c for c in contexts or [] if c.get("name") == context), None)
            if chosen is None:
                names = ", ".join(sorted(c.get("name", "?") for c in contexts or [])) or "none"
                raise KubeError(f"context {context} not found in kubeconfig {paths} (available: {names})")
        else:
            chosen = active
            if not chosen:
                raise KubeError(f"kubeconfig {paths} has no current-context; pass --context")
        cfg = k8s.Configuration()
        try:
            k8s_config.load_kube_config(
                config_file=paths, context=chosen["name"], client_configuration=cfg, persist_config=False
            )
        except ConfigException as exc:
            raise KubeError(f"kubeconfig context {chosen['name']}: {exc}") from None
        except Exception as exc:  # exec plugin failures surface as plain exceptions
            raise KubeError(f"kubeconfig context {chosen['name']}: {short(exc)}") from None
        problem = unreadable_file(cfg)
        if problem:
            raise KubeError(f"kubeconfig context {chosen['name']}: {problem}")
        ns = namespace or (chosen.get("context") or {}).get("namespace") or "default"
        return cls(cfg, ns, context=chosen["name"])

    @classmethod
    def _load_in_cluster(cls, namespace: str | None) -> KubeClient:
        cfg = k8s.Configuration()
        try:
            k8s_config.load_incluster_config(client_configuration=cfg)
        except ConfigException as exc:
            raise KubeError(f"no kubeconfig and in-cluster config failed: {exc}") from None
        ns = namespace
        if not ns:
            try:
                with open("/var/run/secrets/kubernetes.io/serviceaccount/namespace") as f:
                    ns = f.read().strip()
            except OSError:
                ns = None
        return cls(cfg, ns or "default", context=None, in_cluster=True)

    # ---------------------------------------------------------------- calls
    @property
    def server(self) -> str:
        return self.configuration.host

    @property
    def server_host(self) -> str:
        """The API server's host name or IP, without scheme, port or IPv6 brackets."""
        return urlparse(self.configuration.host).hostname or ""

    def error(self, exc: BaseException, access: Access | None = None) -> KubeError:
        if local_file_error(exc) is not None:
            problem = unreadable_file(self.configuration)
            if problem:
                return KubeError(problem)
        return api_error(exc, self.server, access)

    async def call(self, fn: Callable[..., T], *args: Any, access: Access | None = None, **kwargs: Any) -> T:
        """Run a sync client call in a thread; failures become KubeError (one line)."""
        try:
            return await asyncio.to_thread(fn, *args, **kwargs)
        except (ApiException, urllib3.exceptions.HTTPError, OSError, ssl.SSLError) as exc:
            raise self.error(exc, access) from None

    async def cluster_time(self) -> datetime:
        """The API server's clock, from a response's Date header (no pod needed; laptop clocks drift)."""
        # Raw response: only the header matters, and strict model validation of /version must not be
        # able to break heartbeats on a cluster whose build leaves version fields empty.
        resp = await self.call(self.version_api.get_code, _preload_content=False)
        headers = getattr(resp, "headers", None) or {}
        # The body must be read before the keep-alive connection goes back to the pool: an unread
        # response left on it makes the next request there fail with ResponseNotReady, and a create
        # (POST) is never retried.
        with contextlib.suppress(Exception):
            await asyncio.to_thread(resp.drain_conn)
        with contextlib.suppress(Exception):
            resp.release_conn()
        date = headers.get("Date")
        try:
            return parsedate_to_datetime(date).astimezone(UTC)
        except (TypeError, ValueError):  # absent or odd Date header: a heartbeat must still go out
            log.debug("API response has no usable Date header (%r); using local time", date)
            return datetime.now(UTC)

    async def check_namespace(self, namespace: str | None = None) -> None:
        """Fail with 'namespace X not found' before creating anything in it.

        A user who may not `get namespaces` still passes: we then learn about the namespace when we
        create the first object in it.
        """
        ns = namespace or self.namespace
        try:
            await self.call(self.core.read_namespace, ns, access=Access("get", "namespaces", None))
        except KubeError as exc:
            if exc.status == 404:
                raise KubeError(f"namespace {ns} not found", 404, "NotFound") from None
            if exc.status != 403:
                raise

    async def can_i(self, verb: str, resource: str, namespace: str | None = None) -> bool:
        """SelfSubjectAccessReview: lets connect fail early, before creating a pod it could not reach."""
        group = ""
        sub = None
        if "/" in resource:
            resource, sub = resource.split("/", 1)
        if "." in resource:
            resource, group = resource.split(".", 1)
        body = {
            "apiVersion": "authorization.k8s.io/v1",
            "kind": "SelfSubjectAccessReview",
            "spec": {
                "resourceAttributes": {
                    "verb": verb,
                    "resource": resource,
                    "group": group,
                    **({"subresource": sub} if sub else {}),
                    **({"namespace": namespace} if namespace else {}),
                }
            },
        }
        authz = k8s.AuthorizationV1Api(self.api)
        try:
            review = await self.call(authz.create_self_subject_access_review, body)
        except KubeError as exc:
            if exc.status == 403:  # cannot even ask: assume yes, the real call will say
                return True
            raise
        return bool(review.status and review.status.allowed)

    async def require(self, accesses: list[Access]) -> None:
        """Raise 'no permission to ...' for the first access the user lacks."""
        for a in accesses:
            if not await self.can_i(a.verb, a.resource, a.namespace):
                raise KubeError("no permission to " + a.describe(), 403, "Forbidden")

    def close(self) -> None:
        try:
            self.api.close()
        except Exception:  # closing a pool that never opened must not mask the real error
            pass

    def __repr__(self) -> str:
        host = urlparse(self.server).netloc or self.server
        return f"KubeClient(context={self.context!r}, server={host!r}, namespace={self.namespace!r})"

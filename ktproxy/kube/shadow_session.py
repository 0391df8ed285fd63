"""connect's view of the cluster: checks, discovery, the shadow pod's life, and SSH over port-forward.

`connect(options)` is the SSHTunnel's connector: every (re)connect checks the pod first and creates a
new one when the old one is gone, so deleting the shadow pod mid-session costs one reconnect.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

import asyncssh

from ktproxy.keys import SessionKeys
from ktproxy.kube.client import Access, KubeClient, KubeError
from ktproxy.kube.shadow import ShadowOptions, ShadowPod, create_shadow, delete_shadow, pod_state
from ktproxy.tunnel.session import SSHOptions

log = logging.getLogger("ktproxy")

SSH_CONNECT_TIMEOUT = 30.0


class ShadowSession:
    def __init__(self, kube: KubeClient, namespace: str, args: Any, keys: SessionKeys) -> None:
        self.kube = kube
        self.namespace = namespace
        self.keys = keys
        self.options = ShadowOptions.from_args(args, namespace)
        self.pod: ShadowPod | None = None
        self._heartbeat: asyncio.Task[None] | None = None
        self._replace_lock = asyncio.Lock()

    async def preflight(self) -> None:
        """Read-only checks, so a missing namespace or permission fails before we create anything."""
        ns = self.namespace
        await self.kube.check_namespace(ns)
        await self.kube.require([
            Access("create", "pods", ns), Access("get", "pods", ns), Access("delete", "pods", ns),
            Access("create", "secrets", ns), Access("delete", "secrets", ns),
        ])
        # WebSocket port-forwards are authorised as `get` up to 1.34 and `create` after: either will do.
        if not (await self.kube.can_i("get", "pods/portforward", ns)
                or await self.kube.can_i("create", "pods/portforward", ns)):
            raise KubeError(f"no permission to create pods/portforward in namespace {ns}", 403, "Forbidden")

    async def sweep(self) -> None:
        """Remove what crashed sessions left in this namespace (stale heartbeat), as kt-connect does."""
        from ktproxy.kube.cleanup import clean

        try:
            result = await clean(self.kube, self.namespace)
        except KubeError as exc:  # a user who may not list everything can still connect
            log.debug("sweep of stale objects skipped: %s", exc)
            return
        for obj in result.removed:
            log.info("Removed stale %s (left by an earlier session)", obj.ref())

    async def discover(self, domain_override: str | None = None) -> Any:
        from ktproxy.kube.discovery import discover

        return await discover(self.kube, self.namespace, domain_override)

    async def start(self, timeout: float) -> None:
        self.options.ready_timeout = timeout
        self.pod = await create_shadow(self.kube, self.options, self.keys.authorized_keys,
                                       self.keys.host_key_private)
        self._heartbeat = asyncio.create_task(self._beat())

    async def _beat(self) -> None:
        from ktproxy.kube.heartbeat import heartbeat_loop

        await heartbeat_loop(self.kube, self._objects)

    def _objects(self) -> list[tuple[str, str, str]]:
        """(kind, namespace, name) of every object this session keeps alive."""
        if self.pod is None:
            return []
        return [("pod", self.pod.namespace, self.pod.name), ("secret", self.pod.namespace, self.pod.secret)]

    async def _pod_usable(self) -> bool:
        assert self.pod is not None
        try:
            pod = await self.kube.call(self.kube.core.read_namespaced_pod, self.pod.name, self.namespace)
        except KubeError as exc:
            if exc.status == 404:
                return False
            raise
        if pod.metadata and pod.metadata.deletion_timestamp:
            return False
        return pod_state(pod).ready

    async def _replace_pod(self) -> None:
        async with self._replace_lock:
            if self.pod is not None and await self._pod_usable():
                return
            old = self.pod
            log.warning("shadow pod %s is gone; creating a new one", old.name if old else "?")
            if old is not None:
                with contextlib.suppress(KubeError):
                    await delete_shadow(self.kube, old, quiet=True)
            self.pod = await create_shadow(self.kube, self.options, self.keys.authorized_keys,
                                           self.keys.host_key_private)

    async def connect(self, options: SSHOptions) -> asyncssh.SSHClientConnection:
        """SSH to the shadow over a fresh port-forward, replacing the pod first when it is gone."""
        if self.pod is None:
            raise ConnectionError("the shadow pod has not been created")
        if not await self._pod_usable():
            await self._replace_pod()
        assert self.pod is not None
        return await asyncio.wait_for(
            asyncssh.connect("kt-shadow", self.pod.port, tunnel=self.pod.tunnel(self.kube),
                             **options.connect_kwargs()),
            SSH_CONNECT_TIMEOUT)

    async def close(self) -> None:
        if self._heartbeat:
            self._heartbeat.cancel()
            with contextlib.suppress(BaseException):
                await self._heartbeat
        if self.pod is not None:
            pod, self.pod = self.pod, None
            # Shielded: a second signal during clean-up must not leave the pod behind half-deleted.
            await asyncio.shield(delete_shadow(self.kube, pod, quiet=False))

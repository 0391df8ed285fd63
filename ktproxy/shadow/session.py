"""A command's view of its shadow pod: checks, the pod's life (create, heartbeat, replace, delete) and SSH
over the port-forward.

`connect(options)` is the SSHTunnel's connector: every (re)connect checks the pod first and creates a
new one when the old one is gone, so deleting the shadow pod mid-session costs one reconnect.

After a sleep or an API outage longer than the clean threshold the sweep has deleted the pod and its
Secret: the tunnel's next reconnect creates them again (connect and forward own nothing else, so that
is all they re-assert). Commands that hold more (exchange's scale, ...) register `on_lost`: it runs
when the heartbeat finds the pod gone or a gap (heartbeat.Lost), and after a pod was replaced.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from typing import Any

import asyncssh

from ktproxy.cluster.client import KubeClient
from ktproxy.cluster.discovery import discover
from ktproxy.cluster.errors import Access, KubeError
from ktproxy.cluster.heartbeat import Lost, ObjectRef, OnLost, heartbeat_loop
from ktproxy.shadow.pod import (
    CONNECT,
    ShadowOptions,
    ShadowPod,
    ShadowRole,
    create_shadow,
    delete_shadow,
    pod_state,
)
from ktproxy.tunnel.keys import SessionKeys
from ktproxy.tunnel.session import SSHOptions

log = logging.getLogger("ktproxy.shadow.session")

SSH_CONNECT_TIMEOUT = 30.0
CLEAN_HINT = "`ktctl clean` removes what is left once its heartbeat is stale"


class ShadowSession:
    def __init__(
        self,
        kube: KubeClient,
        namespace: str,
        options: ShadowOptions,
        keys: SessionKeys,
        role: ShadowRole = CONNECT,
    ) -> None:
        self.kube = kube
        self.namespace = namespace
        self.keys = keys
        self.options = dataclasses.replace(options, namespace=namespace)
        self.role = role
        self.pod: ShadowPod | None = None
        self._heartbeat: asyncio.Task[None] | None = None
        # The pod being created, shared by every caller: a caller's deadline or cancellation must
        # neither abort the creation (and so delete a pod about to be ready) nor start a second one.
        self._creating: asyncio.Task[ShadowPod] | None = None
        self._replace_lock = asyncio.Lock()
        self.on_lost: list[OnLost] = []  # what else the command re-asserts once the pod was lost
        self._lost_tasks: set[asyncio.Task[None]] = set()

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

    async def discover(self, domain_override: str | None = None) -> Any:
        return await discover(self.kube, self.namespace, domain_override)

    async def start(self, timeout: float) -> None:  # noqa: ASYNC109 - the pod's readiness budget (see wait_ready)
        self.options = dataclasses.replace(self.options, ready_timeout=timeout)
        await self._create()
        self._heartbeat = asyncio.create_task(heartbeat_loop(self.kube, self._objects, on_lost=self._lost))

    async def _lost(self, lost: Lost) -> None:
        for callback in list(self.on_lost):
            try:
                await callback(lost)
            except Exception as exc:  # one owner's failure must not keep the others from re-asserting
                log.warning("re-asserting after a lost object failed: %s", exc)

    def _objects(self) -> list[ObjectRef]:
        """(kind, namespace, name) of every object this session keeps alive."""
        if self.pod is None:
            return []
        return [("pod", self.pod.namespace, self.pod.name), ("secret", self.pod.namespace, self.pod.secret)]

    async def _create(self) -> None:
        """Create a pod (or join the creation under way) and make it the session's pod."""
        if self._creating is None or self._creating.done():
            self._creating = asyncio.ensure_future(self._create_and_adopt())
        await asyncio.shield(self._creating)

    async def _create_and_adopt(self) -> ShadowPod:
        # Adopted here, not by the caller: a caller that gave up must not orphan a pod that got ready.
        pod = await create_shadow(self.kube, self.options, self.keys.authorized_keys,
                                  self.keys.host_key_private, role=self.role)
        self.pod = pod
        return pod

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
        state = pod_state(pod)
        # A pod whose readiness needs the laptop is not Ready while the laptop reconnects: started will do.
        return state.ready or (self.role.ready_needs_laptop and state.started)

    async def _replace_pod(self) -> None:
        async with self._replace_lock:
            if self.pod is not None and await self._pod_usable():
                return
            old = self.pod
            log.warning("shadow pod %s is gone; creating a new one", old.name if old else "?")
            if old is not None:
                await delete_shadow(self.kube, old, quiet=True)
            await self._create()
            if self.on_lost and old is not None:
                # Not awaited here: the reconnect must not wait for what the command re-asserts.
                task = asyncio.create_task(self._lost(Lost(gone=[("pod", old.namespace, old.name)])))
                self._lost_tasks.add(task)
                task.add_done_callback(self._lost_tasks.discard)

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

    async def close(self) -> bool:
        """Stop the heartbeat, abandon a creation in progress (it removes what it made) and delete the pod
        and its Secret. Every step runs whatever the one before did; a delete that fails is logged with
        the way out. True when nothing is known to be left behind."""
        clean_exit = True
        for task in (self._heartbeat, self._creating, *self._lost_tasks):
            if task is not None and not task.done():
                task.cancel()
                # asyncio.wait never raises: a task's own failure must not skip the deletes.
                await asyncio.wait([task])
        pod, self.pod = self.pod, None
        if pod is not None:
            try:
                # Shielded: a second signal during clean-up must not leave the pod half-deleted.
                failed = await asyncio.shield(delete_shadow(self.kube, pod))
            except Exception as exc:
                failed = [f"could not delete shadow pod {pod.namespace}/{pod.name}: {exc}"]
            for line in failed:
                log.warning("%s; %s", line, CLEAN_HINT)
            clean_exit = not failed
        return clean_exit

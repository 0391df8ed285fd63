"""One developer's part in a mesh: manual mode's shadow, and auto mode's own shadow, Service and route in the
shared router, kept while the command runs and given back when it leaves (see commands/mesh.py for what a
user sees).

After a sleep or an API outage longer than the clean threshold (issue 18, G3) the sweep has deleted this
developer's shadow and `<svc>-kt-mesh-<value>` Service and taken its route out of the router (and, with
nobody else meshing, put the Service back and removed router and stuntman). Auto mode's keeper then:
- RE-ASSERTS while the Service still points at a mesh router (other developers kept it meshed): own
  Service first (its name is this developer's alone unless another developer has taken the value
  meanwhile), then the route; the session brings the shadow pod back on its next reconnect. A route
  re-added in front of a missing Service would send header requests to nothing (502s).
- EXITS with one line when the Service no longer points at a mesh router (a sweep or `ktctl recover`
  put it back: like an exchange's guard (G1), a mesh never takes a Service back), or when another
  developer now owns the value's Service.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from ktproxy import lifecycle
from ktproxy.cluster import meta
from ktproxy.errors import KtError
from ktproxy.shadow import reverse
from ktproxy.shadow.reverse import ReverseOptions

log = logging.getLogger("ktproxy")

KEEP_INTERVAL = 2.0  # how often a participant checks that the router and its route are still there
# Without a tunnel to probe with, how long a leaving developer lets the router reload its routes (the
# kubelet rewrites the annotations file within about a second).
RELOAD_GRACE = 3.0


def probe_request(service: str, mark: Any) -> bytes:
    """What proves a route: a request the router must send to this developer, answered by nobody."""
    return (f"OPTIONS * HTTP/1.1\r\nHost: {service}\r\n{mark.key.upper()}: {mark.value}\r\n"
            "Connection: close\r\n\r\n").encode()


async def join_manual(life: lifecycle.Lifecycle, kube: Any, options: ReverseOptions, service: Any,
                      ports: list[Any], mark: Any) -> None:
    """A shadow the unchanged Service selects (its selector labels) that a mesh can tell apart (KEY)."""
    from ktproxy.exchange.takeover import original_selector
    from ktproxy.mesh.shared import check_value_free
    from ktproxy.mesh.spec import mesh_name

    ns, name = kube.namespace, service.metadata.name
    selector = original_selector(service)
    if not selector:
        raise KtError(f"service '{name}' has no selector (its endpoints are managed by hand); it cannot be "
                      "meshed in manual mode")
    shadow_name = mesh_name(name, mark.value)
    spec = reverse.ReverseSpec(role=meta.ROLE_MESH_SHADOW, name_prefix=shadow_name, name=shadow_name,
                               ports=ports, labels={**selector, mark.key: mark.value},
                               annotations={meta.KT_CONFIG: f"mode=manual,service={name},"
                                                            f"route={mark.key}:{mark.value}"})
    shadow = reverse.ReverseShadow(life, kube, options, spec)
    await shadow.preflight()
    await life.until_stopped(check_value_free(kube, ns, name, mark.value))
    await shadow.start()
    cluster_ip = await shadow.cluster_ip(name)
    if cluster_ip:  # round robin: some connection to the Service lands here once it counts the shadow
        await life.until_stopped(reverse.all_or_none(
            reverse.prove_service(shadow.tunnel, name, cluster_ip, p) for p in ports))


@contextlib.asynccontextmanager
async def stoppable_lock(kube: Any, namespace: str, name: str,
                         wait: Callable[[Awaitable[Any]], Awaitable[Any]]) -> AsyncIterator[None]:
    """The Service's kt-lock (exchange/lock.py service_lock), waited for through `wait` (the lifecycle's
    until_stopped or interruptible) so that Ctrl-C ends a wait for another developer's lock at once.
    Only the pause between tries goes through `wait`: a read or write of the lock is never cut off
    half-way (a write that lands after its cancellation would leave a lock nobody releases)."""
    from ktproxy.exchange import lock
    from ktproxy.mesh.shared import LOCK_TRIES

    held = None
    for attempt in range(LOCK_TRIES):
        try:
            held = await lock.acquire(kube, namespace, name, tries=1, retry_interval=0)
            break
        except KtError:  # held by someone else (or a write lost a race): look again after a pause
            if attempt == LOCK_TRIES - 1:
                raise
        await wait(asyncio.sleep(lock.RETRY_INTERVAL))
    try:
        yield
    finally:
        try:
            await asyncio.shield(lock.release(kube, namespace, name, held=held))
        except KtError as exc:  # a stale lock is harmless (180 s), the set-up's own error matters more
            log.warning("could not unlock service %s: %s", name, exc)


class AutoMesh:
    """One developer's share of an auto-mode mesh: own shadow and Service, a route in the shared router."""

    def __init__(self, life: lifecycle.Lifecycle, kube: Any, options: ReverseOptions, service: Any,
                 ports: list[Any], mark: Any, *, auto_header: bool = False) -> None:
        from ktproxy.exchange.takeover import target_labels
        from ktproxy.mesh.spec import mesh_config, mesh_name

        self.life = life
        self.kube = kube
        self.timeout = options.timeout
        self.auto_header = auto_header
        self.ns = kube.namespace
        self.name = service.metadata.name
        self.service = service
        self.ports = ports
        self.mark = mark
        self.own = mesh_name(self.name, mark.value)
        self.labels = target_labels(meta.ROLE_MESH_SHADOW)
        spec = reverse.ReverseSpec(role=meta.ROLE_MESH_SHADOW, name_prefix=self.own, name=self.own, ports=ports,
                                   labels=self.labels,
                                   annotations={meta.KT_CONFIG: mesh_config(self.name, mark.route)})
        self.shadow = reverse.ReverseShadow(life, kube, options, spec)
        self.full: list[Any] = []  # every TCP port of the service (the router serves them all)
        self.joined = False  # from here on, leaving has shared state to put right
        self.beat_shared = False  # the heartbeat stamps router and stuntman too (joined, not leaving)
        self.probe = probe_request(self.name, mark)

    @property
    def router(self) -> str:
        from ktproxy.mesh.spec import router_name

        return router_name(self.name)

    @property
    def options(self) -> Any:
        return self.shadow.shadow.options

    # -------------------------------------------------------------------------------------- start
    async def start(self) -> None:
        from ktproxy.cluster.client import Access
        from ktproxy.cluster.heartbeat import heartbeat_loop
        from ktproxy.exchange.takeover import original_selector
        from ktproxy.mesh.shared import check_value_free
        from ktproxy.mesh.spec import resolve_port_map, stuntman_name

        life, kube, ns = self.life, self.kube, self.ns
        if not original_selector(self.service):
            raise KtError(f"service '{self.name}' has no selector (its endpoints are managed by hand); it cannot "
                          "be meshed in auto mode")
        self.full = await life.until_stopped(resolve_port_map(kube, self.service, original_selector(self.service)))
        await self.shadow.preflight()
        await life.until_stopped(kube.require([
            Access("patch", "services", ns), Access("create", "services", ns), Access("delete", "services", ns),
            Access("patch", "pods", ns), Access("list", "pods", ns)]))
        await life.until_stopped(check_value_free(kube, ns, self.name, self.mark.value))
        # Own objects first, outside the lock (their name is ours alone): the lock is held only while
        # the shared ones change. Each is labelled and beats from here on (the shadow's session beats
        # pod and Secret), so a ktctl killed while it waits for the lock leaves only what clean sweeps.
        await self._own_service()
        beat = asyncio.create_task(heartbeat_loop(kube, lambda: [("service", ns, self.own)] + (
            [("pod", ns, self.router), ("service", ns, stuntman_name(self.name))] if self.beat_shared else [])))
        life.on_cleanup("mesh heartbeat", reverse.cancel_task, beat)
        await self.shadow.start()
        life.on_cleanup(f"mesh route of service {self.name}", self.leave)
        async with stoppable_lock(kube, ns, self.name, life.until_stopped):
            await self._join()
        self.beat_shared = True
        await self._prove_cluster_ip()
        keeper = asyncio.create_task(self.keep())
        life.on_cleanup("mesh router keeper", reverse.cancel_task, keeper)
        if self.auto_header:
            await self._publish_mark()

    async def _own_service(self) -> None:
        from ktproxy.cluster.errors import KubeError
        from ktproxy.mesh import shared as mesh
        from ktproxy.mesh.spec import mesh_service

        now = int((await self.kube.cluster_time()).timestamp())
        body = mesh_service(self.name, self.ns, self.mark.route, self.full, self.labels, self.options.user, now)
        try:
            await mesh.create_service(self.kube, self.ns, body)
        except KubeError as exc:
            if exc.status == 409:  # another developer took this value a moment ago
                await mesh.check_value_free(self.kube, self.ns, self.name, self.mark.value)
            raise
        self.life.on_cleanup(f"service {self.own}", mesh.delete_service, self.kube, self.ns, self.own)

    async def _join(self) -> None:
        """Under the lock: stuntman, router, own route proven through the router, selector switched."""
        from ktproxy.exchange import takeover
        from ktproxy.mesh import shared as mesh
        from ktproxy.mesh.routes import add_route
        from ktproxy.mesh.spec import stuntman_name

        life, kube, ns, name = self.life, self.kube, self.ns, self.name
        service = await takeover.read(kube, ns, name)  # again under the lock: an exchange may have begun
        await life.until_stopped(mesh.refuse_if_exchanged(kube, ns, service))
        await mesh.refuse_foreign_router(kube, ns, name)
        self.joined = True
        await mesh.ensure_stuntman(kube, ns, name, self.full, takeover.original_selector(service))
        await life.until_stopped(mesh.wait_endpoints(kube, ns, stuntman_name(name), name))
        router, created = await life.until_stopped(
            mesh.ensure_router(kube, ns, service, self.full, self.mark.route, self.options, self.timeout))
        if not created:
            if await add_route(kube, ns, self.router, self.mark.route) is None:
                raise KtError(f"router pod {self.router} went away while joining; try again")
        log.info("Route '%s' added to router pod %s", self.mark.header, self.router)
        await life.until_stopped(self._prove_router(mesh.pod_ip(router)))
        if await mesh.switch_to_router(kube, ns, name, router, self.options.user):
            log.info("Service %s now sends its traffic to router pod %s", name, self.router)

    async def _prove_router(self, router_ip: str | None) -> None:
        """A request with this developer's header, sent from the cluster to the router, reached this
        machine: the router is Ready, has loaded the route, and the mesh Service leads to the shadow."""
        if not router_ip:
            raise KtError(f"router pod {self.router} has no IP address")
        results = await reverse.all_or_none(
            reverse.prove_service(self.shadow.tunnel, self.router, router_ip, p, payload=self.probe,
                                  connect_port=p.target_port) for p in self.ports)
        if not all(results):
            raise KtError(f"a request with header '{self.mark.header}' sent to router pod {self.router} did not "
                          "reach this machine; the service was left as it was")

    async def _prove_cluster_ip(self) -> None:
        cluster_ip = await self.shadow.cluster_ip(self.name)
        if cluster_ip:
            await self.life.until_stopped(reverse.all_or_none(
                reverse.prove_service(self.shadow.tunnel, self.name, cluster_ip, p, payload=self.probe)
                for p in self.ports))

    async def _publish_mark(self) -> None:
        try:
            from ktproxy.mesh import marks as mesh_marks
        except ImportError:
            log.warning("--auto-header is not available in this build; add the header yourself")
            return
        cluster_ip = await self.shadow.cluster_ip(self.name)
        try:
            path = mesh_marks.publish(self.ns, self.name, cluster_ip, [p.service_port for p in self.ports],
                                      self.mark.key, self.mark.value)
        except (OSError, ValueError) as exc:
            log.warning("--auto-header: cannot publish the header for connect's proxy: %s", exc)
            return
        self.life.on_cleanup("auto-header mark", mesh_marks.withdraw, path)
        log.info("Requests through `ktctl connect`'s HTTP proxy to service %s now carry '%s'", self.name,
                 self.mark.header)

    # -------------------------------------------------------------------------------------- keep
    async def keep(self, interval: float = KEEP_INTERVAL) -> None:
        """While meshing: the router and this developer's route stay (kt-connect did nothing when its
        router vanished, fault c): a lost router is created again (others re-add their routes the same
        way), a lost route re-added (a `clean` that judged this session dead), after this developer's own
        Service (G3: the module's docstring); a Service no longer meshed ends the command."""
        from ktproxy.exchange import takeover
        from ktproxy.mesh import shared as mesh
        from ktproxy.mesh.routes import add_route, read_router, routes_of

        while True:
            await asyncio.sleep(interval)
            try:
                service = await takeover.read(self.kube, self.ns, self.name)
                if not mesh.is_meshed(service):
                    # G3/G1: a sweep (after a sleep) or `ktctl recover` put it back; never taken back.
                    self.life.end(f"service {self.name} was put back while this mesh ran (ktctl clean after a "
                                  f"sleep, or ktctl recover): requests with '{self.mark.header}' reach its pods; "
                                  "the mesh has ended")
                    return
                if not await self._keep_own_service():
                    return
                router = await read_router(self.kube, self.ns, self.router)
                if router is None or router.metadata.deletion_timestamp:
                    await self._recreate_router()
                elif self.mark.value not in [v for _, v in routes_of(router)]:
                    log.warning("route '%s' was missing from router pod %s; adding it again", self.mark.header,
                                self.router)
                    await add_route(self.kube, self.ns, self.router, self.mark.route)
            except Exception as exc:  # the keeper must outlive any one bad answer
                log.warning("checking the mesh of service %s failed: %s", self.name, exc)

    async def _keep_own_service(self) -> bool:
        """This developer's `<svc>-kt-mesh-<value>` Service is there (created again when a sweep deleted
        it); False when another developer has taken the value meanwhile (the mesh has then ended)."""
        from ktproxy.cluster.errors import KubeError
        from ktproxy.exchange.takeover import annotations_of

        try:
            found = await self.kube.call(self.kube.core.read_namespaced_service, self.own, self.ns)
        except KubeError as exc:
            if exc.status != 404:
                raise
            found = None
        if found is not None:
            selector = dict((found.spec.selector or {}) if found.spec else {})
            if selector.get(meta.KT_TARGET) == self.labels[meta.KT_TARGET]:
                return True
            who = annotations_of(found).get(meta.KT_USER) or "another developer"
            self.life.end(f"service {self.own} is now {who}'s (this mesh's was swept while it was away): "
                          f"requests with '{self.mark.header}' go to them; the mesh has ended")
            return False
        from ktproxy.mesh import shared as mesh
        from ktproxy.mesh.spec import mesh_service

        log.warning("service %s was deleted while this mesh was away (ktctl clean); creating it again",
                    self.own)
        now = int((await self.kube.cluster_time()).timestamp())

        body = mesh_service(self.name, self.ns, self.mark.route, self.full, self.labels, self.options.user, now)
        try:
            await mesh.create_service(self.kube, self.ns, body)
        except KubeError as exc:
            if exc.status != 409:
                raise
            return True  # created meanwhile: looked at again next round
        return True

    async def _recreate_router(self) -> None:
        from ktproxy.exchange import takeover
        from ktproxy.exchange.lock import service_lock
        from ktproxy.mesh import shared as mesh
        from ktproxy.mesh.routes import add_route

        log.warning("router pod %s is gone; creating it again with route '%s'", self.router, self.mark.header)
        async with service_lock(self.kube, self.ns, self.name, tries=mesh.LOCK_TRIES):
            service = await takeover.read(self.kube, self.ns, self.name)
            if not mesh.is_meshed(service):
                return
            await mesh.ensure_stuntman(self.kube, self.ns, self.name, self.full, takeover.original_selector(service))
            _, created = await mesh.ensure_router(self.kube, self.ns, service, self.full, self.mark.route,
                                                  self.options, self.timeout)
            if not created:
                await add_route(self.kube, self.ns, self.router, self.mark.route)
        log.info("Router pod %s is back", self.router)

    # -------------------------------------------------------------------------------------- leave
    async def leave(self) -> None:
        """Own route out; the last one out (decided under the lock, on the annotation) puts the Service
        back and removes router and stuntman. Own shadow and Service go after this step, once the
        router no longer sends this developer anything."""
        from ktproxy.mesh import shared as mesh
        from ktproxy.mesh.routes import read_router, remove_route, routes_of

        self.beat_shared = False
        if not self.joined:
            return
        kube, ns, name = self.kube, self.ns, self.name
        async with stoppable_lock(kube, ns, name, self._interruptible_wait):
            # Before deciding: a developer leaving after us, while our shadow still exists, must not
            # count us as staying (two leavers would each leave the undoing to the other).
            await mesh.mark_leaving(kube, ns, self.own)
            router = await read_router(kube, ns, self.router)
            alive = router is not None and not router.metadata.deletion_timestamp
            routes = routes_of(router) if alive else []
            router_ip = mesh.pod_ip(router) if alive else None
            last = not [r for r in routes if r[1] != self.mark.value]
            if not alive and await mesh.other_participants(kube, ns, name, self.own):
                # No router to judge by, but others stay: their keepers re-create it. Not ours to undo.
                return
            if not last:
                remaining = await remove_route(kube, ns, self.router, self.mark.value)
                last = not remaining
                log.info("Route '%s' removed from router pod %s", self.mark.header, self.router)
            if last:
                await self._last_out(router_ip, own_route=self.mark.route in routes)
                return
        await self._wait_reloaded(router_ip)

    async def _interruptible_wait(self, aw: Any) -> None:
        """During clean-up (leave): a further Ctrl-C ends only the wait for the lock, and the rest of the
        clean-up still runs (the route left in the router is swept by `clean` once the shadow is gone)."""
        if not await self.life.interruptible(aw):
            raise KtError(f"stopped waiting for the kt-lock of service {self.name}; route '{self.mark.header}' "
                          "stays in the router until `ktctl clean`")

    async def _last_out(self, router_ip: str | None, own_route: bool) -> None:
        from ktproxy.mesh import shared as mesh

        log.info("Last developer meshing service %s: putting it back", self.name)
        if await mesh.restore_service(self.kube, self.ns, self.name):
            cluster_ip = await self.shadow.cluster_ip(self.name)
            if own_route and cluster_ip and self.shadow.tunnel.is_up:
                # The route is still in the router: while requests with it reach this machine, the
                # cluster IP still leads to the router.
                await self.life.interruptible(reverse.all_or_none(
                    reverse.prove_service(self.shadow.tunnel, self.name, cluster_ip, p, reaches=False,
                                          payload=self.probe) for p in self.ports))
            else:
                await mesh.wait_router_released(self.kube, self.ns, self.name, router_ip)
        await asyncio.shield(mesh.remove_shared(self.kube, self.ns, self.name))

    async def _wait_reloaded(self, router_ip: str | None) -> None:
        """Until the router no longer sends this developer's header here (it read the new routes), so
        the shadow is deleted only once nothing new is on its way to it."""
        if router_ip and self.shadow.tunnel.is_up:
            await self.life.interruptible(reverse.all_or_none(
                reverse.prove_service(self.shadow.tunnel, self.router, router_ip, p, reaches=False,
                                      payload=self.probe, connect_port=p.target_port) for p in self.ports))
        elif router_ip:
            await asyncio.sleep(RELOAD_GRACE)

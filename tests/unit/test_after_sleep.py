"""After a sleep or an API outage longer than the clean threshold (review 2026-12-04 G3, issue 18 item 2):
every running command re-asserts what it owns within one heartbeat (keeper round) of the API coming back,
or ends with one line saying what was lost. The sweep is simulated on the in-memory API (objects deleted,
the recover hook run), then the heartbeat or keeper runs once more.

- heartbeat: a 404 and a gap longer than the threshold reach the owner (on_lost);
- scale mode: the Deployment the sweep scaled back goes to 0 again, unless someone else holds the Service;
- mesh (auto): own Service created again before the route; a Service put back ends the mesh;
- preview: the Service created again while the name is free, else the preview ends naming the new owner;
- selector mode: the guard stands down (G1) and the exchange ends.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import logging
from typing import Any

import pytest
from fake_kube import FakeKube, deployment, pod, service

from ktproxy import lifecycle, preview
from ktproxy.cleanup import recover
from ktproxy.cluster import heartbeat
from ktproxy.cluster.heartbeat import Lost
from ktproxy.commands.options import reverse_options
from ktproxy.errors import KtError
from ktproxy.exchange import session, takeover
from ktproxy.exchange.target import ExchangeTarget
from ktproxy.expose import ExposedPort
from ktproxy.mesh.participant import AutoMesh
from ktproxy.mesh.spec import parse_version_mark
from ktproxy.shadow import reverse

PORTS = [{"name": "http", "port": 8080, "targetPort": 8080}]
ORIGINAL = {"app": "tomcat"}
ROUTER_LABELS = {"kt-role": "router", "kt-target": "r" * 20}
BOB = {"kt-role": "shadow-exchange", "kt-target": "bob1"}
BEAT = 0.01  # one heartbeat (keeper round) in these tests


def dep(kube: FakeKube) -> dict[str, Any]:
    return kube.store.get("deployment", "default", "tomcat")


def svc(kube: FakeKube, name: str = "tomcat") -> dict[str, Any]:
    return kube.store.get("service", "default", name)


def warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    records = {id(r): r for r in caplog.records}.values()
    return [r.getMessage() for r in records if r.levelno == logging.WARNING]


async def ended(life: lifecycle.Lifecycle) -> None:
    await asyncio.wait_for(life.stopping.wait(), 2)
    assert life.exit_code == lifecycle.EXIT_ENDED


async def stop(task: asyncio.Task[Any]) -> None:
    await reverse.cancel_task(task)


@pytest.fixture
def kube() -> FakeKube:
    k = FakeKube()
    k.store.put("service", service("tomcat", dict(ORIGINAL), PORTS))
    k.store.put("deployment", deployment("tomcat", dict(ORIGINAL), replicas=2))

    async def require(_accesses: Any) -> None:
        return None

    k.require = require  # type: ignore[attr-defined]
    return k


# --------------------------------------------------------------------------------------------- heartbeat
async def test_heartbeat_tells_its_owner_of_a_gone_object_and_of_a_gap(kube: FakeKube) -> None:
    seen: list[Lost] = []

    async def on_lost(lost: Lost) -> None:
        seen.append(lost)

    task = asyncio.create_task(heartbeat.heartbeat_loop(
        kube, lambda: [("service", "default", "tomcat"), ("service", "default", "swept")], interval=BEAT,
        on_lost=on_lost, gap_after=300))
    try:
        await kube.store.until(lambda: bool(seen))
        assert seen[0].gone == [("service", "default", "swept")] and seen[0].gap is None
        kube.store.put("service", service("swept", {"a": "b"}, PORTS))
        await asyncio.sleep(5 * BEAT)
        seen.clear()
        await asyncio.sleep(5 * BEAT)
        assert seen == []  # nothing lost, no gap: the owner is left alone
        kube.now = kube.now.replace(minute=kube.now.minute + 6)  # the laptop slept 6 minutes
        await kube.store.until(lambda: bool(seen))
        assert seen[0].gone == [] and seen[0].gap == 360
    finally:
        await stop(task)


# --------------------------------------------------------------------------------------------- scale mode
class FakeShadow:
    """ReverseShadow without SSH: start() puts a pod with the spec's labels; `shadow.on_lost` as the
    real ShadowSession has, run by the heartbeat below."""

    def __init__(self, life: Any, kube: FakeKube, options: Any, spec: reverse.ReverseSpec) -> None:
        self.kube, self.spec, self.pod_name = kube, spec, ""
        self.shadow = argparse.Namespace(options=argparse.Namespace(user=options), on_lost=[])
        SHADOWS.append(self)

    async def preflight(self) -> None:
        return None

    async def start(self) -> None:
        self.pod_name = f"{self.spec.name_prefix}{len(SHADOWS)}"
        self.kube.store.put("pod", pod(self.pod_name, dict(self.spec.labels),
                                       annotations={**self.spec.annotations, "kt-user": self.shadow.options.user}))

    async def wait_serving(self, service: str) -> None:
        return None

    async def wait_released(self, service: str) -> None:
        return None

    async def beat(self, lost: Lost) -> None:
        for callback in self.shadow.on_lost:
            await callback(lost)


SHADOWS: list[FakeShadow] = []


@pytest.fixture
def shadows(monkeypatch: pytest.MonkeyPatch) -> list[FakeShadow]:
    SHADOWS.clear()
    monkeypatch.setattr(reverse, "ReverseShadow", FakeShadow)
    monkeypatch.setattr(takeover, "guard_selector", functools.partial(takeover.guard_selector, interval=BEAT))
    return SHADOWS


def target(kube: FakeKube) -> ExchangeTarget:
    return ExchangeTarget("service", "tomcat", kube.store.read("service", "tomcat", "default"),
                          kube.store.read("deployment", "tomcat", "default"))


async def sweep(kube: FakeKube, shadow: FakeShadow) -> None:
    """What `ktctl clean` does to an exchange whose heartbeat went stale: shadow deleted, then the
    recover hook puts back what the exchange changed."""
    kube.store.delete("pod", shadow.pod_name, "default")
    await recover.clean_hook(kube, "default", kube.now, 300, False)


def beating(kube: FakeKube, shadow: FakeShadow) -> asyncio.Task[None]:
    """The shadow session's heartbeat on the pod it had before the sweep."""
    name = shadow.pod_name
    return asyncio.create_task(heartbeat.heartbeat_loop(kube, lambda: [("pod", "default", name)], interval=BEAT,
                                                        on_lost=shadow.beat))


async def test_scale_mode_scales_down_again_after_the_sweep(kube: FakeKube, shadows: list[FakeShadow],
                                                            kt_log: pytest.LogCaptureFixture) -> None:
    life = lifecycle.Lifecycle()
    await session.take_by_scale(life, kube, "alice", target(kube), [], 1.0)  # type: ignore[arg-type]
    assert dep(kube)["spec"]["replicas"] == 0
    await sweep(kube, shadows[0])
    assert dep(kube)["spec"]["replicas"] == 2  # traffic would split between the pods and the laptop
    beat = beating(kube, shadows[0])
    try:
        await kube.store.until(lambda: dep(kube)["spec"]["replicas"] == 0)
    finally:
        await stop(beat)
    assert dep(kube)["metadata"]["annotations"]["kt-config"] == "replicas=2"  # exit scales back to 2
    assert dep(kube)["metadata"]["annotations"]["kt-user"] == "alice"
    assert not life.stopping.is_set()
    assert any("scaling it to 0 again" in w for w in warnings(kt_log))
    assert "kt-lock" not in (svc(kube)["metadata"].get("annotations") or {})  # done under the lock, released


async def test_scale_mode_ends_when_someone_else_holds_the_service(kube: FakeKube, shadows: list[FakeShadow],
                                                                   kt_log: pytest.LogCaptureFixture) -> None:
    life = lifecycle.Lifecycle()
    await session.take_by_scale(life, kube, "alice", target(kube), [], 1.0)  # type: ignore[arg-type]
    await sweep(kube, shadows[0])
    await takeover.switch_selector(kube, "default", "tomcat", BOB, "bob")  # bob exchanged it meanwhile
    beat = beating(kube, shadows[0])
    try:
        await ended(life)
    finally:
        await stop(beat)
    assert dep(kube)["spec"]["replicas"] == 2 and svc(kube)["spec"]["selector"] == BOB  # never taken back
    lines = [w for w in warnings(kt_log) if "has ended" in w]
    assert len(lines) == 1 and "bob" in lines[0] and "deployment tomcat" in lines[0], lines


# --------------------------------------------------------------------------------------------- selector
async def test_selector_exchange_ends_once_the_sweep_put_the_service_back(
        kube: FakeKube, shadows: list[FakeShadow], kt_log: pytest.LogCaptureFixture) -> None:
    life = lifecycle.Lifecycle()
    await session.take_selector(life, kube, "alice", target(kube), [])  # type: ignore[arg-type]
    assert svc(kube)["spec"]["selector"] != ORIGINAL
    await sweep(kube, shadows[0])
    assert svc(kube)["spec"]["selector"] == ORIGINAL
    await ended(life)
    lines = [w for w in warnings(kt_log) if "stands down" in w]
    assert len(lines) == 1 and "has ended" in lines[0], lines
    assert svc(kube)["spec"]["selector"] == ORIGINAL


# --------------------------------------------------------------------------------------------- mesh
def meshed(kube: FakeKube, *, route: bool = False) -> None:
    """tomcat switched to a router that another developer (bob) keeps alive."""
    s = kube.store
    s.put("service", service("tomcat", ROUTER_LABELS, PORTS, annotations={
        "kt-selector": '{"app":"tomcat"}', "kt-user": "bob"}))
    routes = "version:bob,version:alice" if route else "version:bob"
    s.put("pod", pod("tomcat-kt-router", {"control-by": "kt", **ROUTER_LABELS},
                     annotations={"kt-mesh-routes": routes}))


def participant(kube: FakeKube, life: lifecycle.Lifecycle) -> AutoMesh:
    args = argparse.Namespace(timeout=5.0, skip_port_checking=True, auto_header=False)
    one = AutoMesh(life, kube, reverse_options(args, kube.namespace), kube.store.read("service", "tomcat", "default"),
                   [ExposedPort(18080, 8080, 8080)], parse_version_mark("version:alice"))
    one.full = []
    one.joined = True
    return one


async def test_mesh_creates_its_own_service_again_before_its_route(kube: FakeKube) -> None:
    meshed(kube)  # the sweep took alice's route out and deleted her Service
    life = lifecycle.Lifecycle()
    alice = participant(kube, life)
    order: list[str] = []
    create, patch = kube.store.create, kube.store.patch

    def creating(kind: str, ns: str, body: dict[str, Any], **kw: Any) -> Any:
        order.append(f"create {kind} {body['metadata']['name']}")
        return create(kind, ns, body, **kw)

    def patching(kind: str, name: str, ns: str, body: dict[str, Any], **kw: Any) -> Any:
        order.append(f"patch {kind} {name}")
        return patch(kind, name, ns, body, **kw)

    kube.store.create, kube.store.patch = creating, patching  # type: ignore[method-assign]
    keeper = asyncio.create_task(alice.keep(interval=BEAT))
    try:
        await kube.store.until(lambda: "alice" in (
            kube.store.get("pod", "default", "tomcat-kt-router")["metadata"]["annotations"]["kt-mesh-routes"]))
    finally:
        await stop(keeper)
    own = svc(kube, "tomcat-kt-mesh-alice")
    assert own["spec"]["selector"] == alice.labels and own["metadata"]["labels"]["control-by"] == "kt"
    assert order.index("create service tomcat-kt-mesh-alice") < order.index("patch pod tomcat-kt-router")
    assert not life.stopping.is_set()


async def test_mesh_ends_when_its_value_is_someone_elses_now(kube: FakeKube, kt_log: pytest.LogCaptureFixture) -> None:
    meshed(kube)
    kube.store.put("service", service("tomcat-kt-mesh-alice", {"kt-role": "shadow-mesh", "kt-target": "x"}, PORTS,
                                      labels={"control-by": "kt"}, annotations={"kt-user": "carol"}))
    life = lifecycle.Lifecycle()
    keeper = asyncio.create_task(participant(kube, life).keep(interval=BEAT))
    try:
        await ended(life)
    finally:
        await stop(keeper)
    lines = [w for w in warnings(kt_log) if "has ended" in w]
    assert len(lines) == 1 and "carol" in lines[0], lines
    assert "alice" not in kube.store.get("pod", "default", "tomcat-kt-router")["metadata"]["annotations"][
        "kt-mesh-routes"]


async def test_mesh_ends_when_the_sweep_put_the_service_back(kube: FakeKube, kt_log: pytest.LogCaptureFixture) -> None:
    life = lifecycle.Lifecycle()  # tomcat selects its pods again: nobody else meshed it
    keeper = asyncio.create_task(participant(kube, life).keep(interval=BEAT))
    try:
        await ended(life)
    finally:
        await stop(keeper)
    lines = [w for w in warnings(kt_log) if "has ended" in w]
    assert len(lines) == 1 and "service tomcat was put back" in lines[0], lines
    assert svc(kube)["spec"]["selector"] == ORIGINAL


# --------------------------------------------------------------------------------------------- preview
def preview_keeper(kube: FakeKube, life: lifecycle.Lifecycle, uid: dict[str, Any]) -> asyncio.Task[None]:
    """commands/preview.py's heartbeat and on_lost, on the in-memory API."""
    ports = [ExposedPort(18080, 8080, 8080)]

    async def on_lost(_lost: Lost) -> None:
        try:
            uid["now"] = await preview.reassert_service(kube, "default", "web", ports, {"kt-target": "t"}, "alice",
                                                        uid["now"])
        except KtError as exc:
            life.end(f"{exc}; the preview has ended")

    return asyncio.create_task(heartbeat.heartbeat_loop(kube, lambda: [("service", "default", "web")],
                                                        interval=BEAT, on_lost=on_lost))


async def test_preview_creates_its_service_again_after_the_sweep(kube: FakeKube) -> None:
    created = await preview.create_service(kube, "default", "web", [ExposedPort(18080, 8080, 8080)],
                                           {"kt-target": "t"}, "alice")
    uid = {"now": created.metadata.uid}
    kube.store.delete("service", "web", "default")  # swept
    life = lifecycle.Lifecycle()
    beat = preview_keeper(kube, life, uid)
    try:
        await kube.store.until(lambda: ("service", "default", "web") in kube.store.objects)
        await kube.store.until(lambda: uid["now"] != created.metadata.uid)
    finally:
        await stop(beat)
    again = svc(kube, "web")
    assert again["spec"]["selector"] == {"kt-target": "t"} and again["metadata"]["uid"] == uid["now"]
    assert not life.stopping.is_set()


async def test_preview_ends_naming_who_has_the_name_now(kube: FakeKube, kt_log: pytest.LogCaptureFixture) -> None:
    created = await preview.create_service(kube, "default", "web", [ExposedPort(18080, 8080, 8080)],
                                           {"kt-target": "t"}, "alice")
    kube.store.delete("service", "web", "default")  # swept, and bob previewed "web" meanwhile
    await preview.create_service(kube, "default", "web", [ExposedPort(18081, 8080, 8080)], {"kt-target": "b"}, "bob")
    life = lifecycle.Lifecycle()
    kube.now = kube.now.replace(minute=kube.now.minute + 1)
    beat = preview_keeper(kube, life, {"now": created.metadata.uid})
    try:
        # bob's Service answers the beat (no 404): the gap after a sleep is what makes alice look
        kube.now = kube.now.replace(minute=kube.now.minute + 6)
        await asyncio.sleep(3 * BEAT)
        kube.now = kube.now.replace(minute=kube.now.minute + 6)
        await ended(life)
    finally:
        await stop(beat)
    lines = [w for w in warnings(kt_log) if "has ended" in w]
    assert len(lines) == 1 and "bob's preview" in lines[0], lines
    assert svc(kube, "web")["spec"]["selector"] == {"kt-target": "b"}

"""Leaving an auto-mode mesh whose router pod is gone: the last developer out puts the Service back,
even when several leave at once (each counts only the participants that are not leaving themselves),
and nobody undoes it while a developer who stays is still there (its keeper re-creates the router)."""

from __future__ import annotations

import argparse

import pytest
from fake_kube import FakeKube, pod, service

from ktproxy import lifecycle
from ktproxy.commands.options import reverse_options
from ktproxy.exchange import takeover
from ktproxy.expose import ExposedPort
from ktproxy.mesh import participant as mesh_participant
from ktproxy.mesh import shared as mesh
from ktproxy.mesh.participant import AutoMesh
from ktproxy.mesh.spec import parse_version_mark

ROUTER_LABELS = {"kt-role": "router", "kt-target": "r" * 20}
PORTS = [{"name": "http", "port": 8080, "targetPort": 8080, "protocol": "TCP"}]


@pytest.fixture(autouse=True)
def no_endpoint_wait(monkeypatch: pytest.MonkeyPatch) -> None:
    async def released(*_a: object, **_k: object) -> None:
        return None

    monkeypatch.setattr(mesh, "wait_router_released", released)
    monkeypatch.setattr(mesh_participant, "RELOAD_GRACE", 0)


def _meshed_without_router(kube: FakeKube, values: list[str]) -> None:
    """tomcat switched to a router that has since been deleted; one shadow and Service per value."""
    s = kube.store
    s.put("service", service("tomcat", ROUTER_LABELS, PORTS, annotations={
        "kt-selector": '{"app":"tomcat"}', "kt-user": "alice"}))
    s.put("service", service("tomcat-kt-stuntman", {"app": "tomcat"}, PORTS, labels={"control-by": "kt"}))
    for value in values:
        name = f"tomcat-kt-mesh-{value}"
        ann = {"kt-config": f"service=tomcat,route=version:{value}", "kt-user": value}
        s.put("pod", pod(name, {"control-by": "kt", "kt-role": "shadow-mesh", "kt-target": value * 4},
                         annotations=ann))
        s.put("service", service(name, {"kt-role": "shadow-mesh", "kt-target": value * 4}, PORTS,
                                 labels={"control-by": "kt", "kt-role": "shadow-mesh"}, annotations=ann))


def _participant(kube: FakeKube, value: str) -> AutoMesh:
    args = argparse.Namespace(timeout=5.0, skip_port_checking=True, auto_header=False)
    svc = kube.store.read("service", "tomcat", "default")
    one = AutoMesh(lifecycle.Lifecycle(), kube, reverse_options(args, kube.namespace), svc,
                   [ExposedPort(18080, 8080, 8080)], parse_version_mark(f"version:{value}"))
    one.joined = True
    return one


def _selector(kube: FakeKube) -> dict[str, str]:
    return kube.store.get("service", "default", "tomcat")["spec"]["selector"]


async def test_two_leaving_after_the_router_went_the_second_puts_the_service_back() -> None:
    kube = FakeKube()
    _meshed_without_router(kube, ["alpha", "bravo"])
    a, b = _participant(kube, "alpha"), _participant(kube, "bravo")
    # a decides while b's shadow is still up, b while a's shadow is still up (neither deleted yet):
    # both are leaving, so the second one out is the last.
    await a.leave()
    assert _selector(kube) == ROUTER_LABELS  # b was still meshing when a decided
    await b.leave()
    assert _selector(kube) == {"app": "tomcat"}
    assert ("service", "default", "tomcat-kt-stuntman") not in kube.store.objects
    assert "kt-selector" not in takeover.annotations_of(kube.store.read("service", "tomcat", "default"))


async def test_leaving_after_the_router_went_keeps_the_mesh_of_one_who_stays() -> None:
    kube = FakeKube()
    _meshed_without_router(kube, ["alpha", "bravo", "carol"])
    await _participant(kube, "alpha").leave()
    await _participant(kube, "bravo").leave()
    # carol stays: her keeper re-creates the router; the Service still points at one.
    assert _selector(kube) == ROUTER_LABELS
    assert ("service", "default", "tomcat-kt-stuntman") in kube.store.objects
    assert await mesh.other_participants(kube, "default", "tomcat", "tomcat-kt-mesh-alpha") == [
        "tomcat-kt-mesh-carol"]


async def test_one_left_through_the_router_then_it_went_the_next_one_out_puts_the_service_back() -> None:
    kube = FakeKube()
    _meshed_without_router(kube, ["alpha", "bravo"])
    kube.store.put("pod", pod("tomcat-kt-router", {"control-by": "kt", **ROUTER_LABELS}, annotations={
        "kt-config": "service=tomcat", "kt-mesh-routes": "version:alpha,version:bravo", "kt-ref-count": "2"}))
    await _participant(kube, "alpha").leave()  # not last: only its route goes; its shadow lingers a while
    assert kube.store.get("pod", "default", "tomcat-kt-router")["metadata"]["annotations"]["kt-mesh-routes"] == (
        "version:bravo")
    kube.store.delete("pod", "tomcat-kt-router", "default")
    await _participant(kube, "bravo").leave()
    assert _selector(kube) == {"app": "tomcat"}

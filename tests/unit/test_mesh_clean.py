"""clean, recover and the refusals know mesh objects: a dead participant loses only its own route and
objects, the mesh of the last one is put back Service first, a live participant's router and stuntman are
never swept (kt-connect's clean deleted them once their creator left: its fault a)."""

from __future__ import annotations

import pytest
from fake_kube import NOW, _Api, pod, service
from fake_kube import FakeKube as _FakeKube

from ktproxy.cleanup.sweep import clean, first_hooks, recover_hooks
from ktproxy.errors import KtError
from ktproxy.exchange import takeover
from ktproxy.mesh import clean as mesh_clean
from ktproxy.mesh import shared as mesh
from ktproxy.mesh.routes import routes_of

FRESH = str(int(NOW.timestamp()) - 10)
STALE = str(int(NOW.timestamp()) - 3600)
ROUTER_LABELS = {"kt-role": "router", "kt-target": "r" * 20}
PORTS = [{"name": "http", "port": 8080, "targetPort": 8080, "protocol": "TCP"}]


class FakeKube(_FakeKube):
    """The shared fake, plus the (empty) ConfigMap listing clean's sweep makes."""

    def __init__(self) -> None:
        super().__init__()
        self.core = _Api(self.store, {"service": "service", "pod": "pod", "secret": "secret",
                                      "config_map": "configmap"})


@pytest.fixture(autouse=True)
def no_endpoint_wait(monkeypatch: pytest.MonkeyPatch) -> None:
    async def released(*_a: object, **_k: object) -> None:
        return None

    monkeypatch.setattr(mesh_clean, "wait_router_released", released)


def _mesh(kube: FakeKube, participants: dict[str, str], router_beat: str = FRESH, stuntman_beat: str = FRESH) -> None:
    """tomcat meshed: router with a route per participant (value -> heartbeat of its objects)."""
    s = kube.store
    s.put("service", service("tomcat", ROUTER_LABELS, PORTS, annotations={
        "kt-selector": '{"app":"tomcat"}', "kt-user": "alice"}))
    s.put("pod", pod("tomcat", {"app": "tomcat"}, ip="10.244.0.5"))
    s.put("service", service("tomcat-kt-stuntman", {"app": "tomcat"}, PORTS, labels={"control-by": "kt"},
                             annotations={"kt-last-heart-beat": stuntman_beat, "kt-config": "service=tomcat"}))
    s.put("pod", pod("tomcat-kt-router", {"control-by": "kt", **ROUTER_LABELS}, annotations={
        "kt-config": "service=tomcat", "kt-last-heart-beat": router_beat,
        "kt-mesh-routes": ",".join(f"version:{v}" for v in participants), "kt-ref-count": str(len(participants))}))
    for value, beat in participants.items():
        name = f"tomcat-kt-mesh-{value}"
        ann = {"kt-config": f"service=tomcat,route=version:{value}", "kt-user": value, "kt-last-heart-beat": beat}
        s.put("pod", pod(name, {"control-by": "kt", "kt-role": "shadow-mesh", "kt-target": value * 4},
                         annotations=ann))
        s.put("secret", {"metadata": {"name": name, "labels": {"control-by": "kt", "kt-role": "shadow-mesh"},
                                      "annotations": {"kt-last-heart-beat": beat}}})
        s.put("service", service(name, {"kt-role": "shadow-mesh", "kt-target": value * 4}, PORTS,
                                 labels={"control-by": "kt", "kt-role": "shadow-mesh"}, annotations=ann))


def _names(kube: FakeKube) -> set[str]:
    return {f"{kind}/{name}" for kind, _, name in kube.store.objects}


async def _clean(kube: FakeKube, dry_run: bool = False):
    return await clean(kube, "default", threshold=300, dry_run=dry_run, hooks=recover_hooks(), before=first_hooks())


async def test_a_dead_participant_loses_only_its_route_and_objects() -> None:
    kube = FakeKube()
    _mesh(kube, {"alice": STALE, "bob": FRESH})
    result = await _clean(kube)
    names = _names(kube)
    assert not {n for n in names if "alice" in n}, names
    assert {"pod/tomcat-kt-mesh-bob", "service/tomcat-kt-mesh-bob", "secret/tomcat-kt-mesh-bob",
            "pod/tomcat-kt-router", "service/tomcat-kt-stuntman"} <= names
    router = kube.store.read("pod", "tomcat-kt-router", "default")
    assert routes_of(router) == [("version", "bob")]
    assert router.metadata.annotations["kt-ref-count"] == "1"
    assert kube.store.read("service", "tomcat", "default").spec.selector == ROUTER_LABELS
    assert any("remove route 'VERSION: alice'" in line for line in result.recovered), result.recovered


async def test_the_creators_death_does_not_sweep_the_shared_objects_of_the_living() -> None:
    """The router and stuntman went stale (say kt-connect made them and only beat them from the creator)
    while bob still meshes: neither the mesh hook nor the generic sweep nor exchange's hook touches them."""
    kube = FakeKube()
    _mesh(kube, {"alice": STALE, "bob": FRESH}, router_beat=STALE, stuntman_beat=STALE)
    await _clean(kube)
    names = _names(kube)
    assert {"pod/tomcat-kt-router", "service/tomcat-kt-stuntman", "pod/tomcat-kt-mesh-bob"} <= names, names
    assert kube.store.read("service", "tomcat", "default").spec.selector == ROUTER_LABELS


async def test_when_nobody_is_left_the_service_comes_back_first_then_router_and_stuntman_go() -> None:
    kube = FakeKube()
    _mesh(kube, {"alice": STALE, "bob": STALE}, router_beat=STALE, stuntman_beat=STALE)
    order: list[str] = []
    real_restore = mesh_clean.restore_service

    async def restore(*args: object) -> bool:
        order.append("restore")
        return await real_restore(*args)

    real_delete = kube.core.delete_namespaced_pod

    def delete_pod(name: str, ns: str, **kw: object) -> None:
        order.append(f"delete {name}")
        real_delete(name, ns, **kw)

    mesh_clean.restore_service = restore  # type: ignore[assignment]
    kube.core.__dict__["delete_namespaced_pod"] = delete_pod
    try:
        result = await _clean(kube)
    finally:
        mesh_clean.restore_service = real_restore  # type: ignore[assignment]
    svc = kube.store.read("service", "tomcat", "default")
    assert svc.spec.selector == {"app": "tomcat"}
    assert "kt-selector" not in (svc.metadata.annotations or {})
    assert _names(kube) == {"service/tomcat", "pod/tomcat"}, _names(kube)
    assert order.index("restore") < order.index("delete tomcat-kt-router"), order
    assert not result.failed


async def test_dry_run_changes_nothing() -> None:
    kube = FakeKube()
    _mesh(kube, {"alice": STALE}, router_beat=STALE, stuntman_beat=STALE)
    before = _names(kube)
    result = await _clean(kube, dry_run=True)
    assert _names(kube) == before
    assert kube.store.read("service", "tomcat", "default").spec.selector == ROUTER_LABELS
    assert any("restore selector of service default/tomcat" in line for line in result.recovered)


async def test_connects_sweep_never_deletes_a_router() -> None:
    """`connect` sweeps stale objects on start without any hook: a router must not go that way (the
    Service would point at nothing)."""
    kube = FakeKube()
    _mesh(kube, {"alice": STALE}, router_beat=STALE, stuntman_beat=STALE)
    await clean(kube, "default", threshold=300)
    assert {"pod/tomcat-kt-router", "service/tomcat-kt-stuntman"} <= _names(kube)


async def test_a_service_pointing_at_a_vanished_router_is_restored_when_nobody_meshes() -> None:
    kube = FakeKube()
    _mesh(kube, {"alice": STALE}, stuntman_beat=STALE)
    kube.store.delete("pod", "tomcat-kt-router", "default")
    await _clean(kube)
    assert kube.store.read("service", "tomcat", "default").spec.selector == {"app": "tomcat"}
    assert "service/tomcat-kt-stuntman" not in _names(kube)


async def test_recover_puts_a_meshed_service_back_at_once() -> None:
    from ktproxy.cleanup.recover import recover

    kube = FakeKube()
    _mesh(kube, {"alice": FRESH, "bob": FRESH})
    kube.store.put("pod", pod("tomcat-kt-mesh-man", {"control-by": "kt", "kt-role": "shadow-mesh", "app": "tomcat"},
                              annotations={"kt-config": "mode=manual,service=tomcat,route=version:man"}))
    lines = await recover(kube, "default", "tomcat")
    assert _names(kube) == {"service/tomcat", "pod/tomcat"}, _names(kube)
    assert kube.store.read("service", "tomcat", "default").spec.selector == {"app": "tomcat"}
    assert any("Restored the original selector" in line for line in lines), lines


async def test_exchange_refuses_a_meshed_service_naming_every_developer() -> None:
    kube = FakeKube()
    _mesh(kube, {"alice": FRESH, "bob": FRESH})
    with pytest.raises(KtError, match="already meshed by alice, bob"):
        await takeover.refuse_if_switched(kube, "default", kube.store.read("service", "tomcat", "default"))
    await mesh.refuse_if_exchanged(kube, "default", kube.store.read("service", "tomcat", "default"))  # joins


async def test_mesh_refuses_an_exchanged_service_naming_the_holder() -> None:
    kube = FakeKube()
    kube.store.put("service", service("tomcat", {"kt-role": "shadow-exchange", "kt-target": "x"}, PORTS,
                                      annotations={"kt-selector": '{"app":"tomcat"}', "kt-user": "carol"}))
    with pytest.raises(KtError, match="already exchanged by carol"):
        await mesh.refuse_if_exchanged(kube, "default", kube.store.read("service", "tomcat", "default"))


async def test_status_lists_participants() -> None:
    kube = FakeKube()
    _mesh(kube, {"alice": FRESH})
    kube.store.put("pod", pod("tomcat-kt-mesh-man", {"control-by": "kt", "kt-role": "shadow-mesh", "app": "tomcat"},
                              annotations={"kt-config": "mode=manual,service=tomcat,route=version:man",
                                           "kt-user": "bob"}))
    lines = await mesh_clean.participants(kube, "default")
    assert lines == [
        "service default/tomcat: meshed by alice via header 'VERSION: alice' (auto, shadow tomcat-kt-mesh-alice)",
        "service default/tomcat: meshed by bob via label version=man (manual, shadow tomcat-kt-mesh-man)"]


async def test_a_kt_connect_router_is_not_joined() -> None:
    """kt-connect's router has no kt-mesh-routes: a route there does nothing, and leaving would take
    the empty list for 'last one out' and undo kt-connect's mesh under its users."""
    kube = FakeKube()
    kube.store.put("pod", pod("tomcat-kt-router", {"control-by": "kt", **ROUTER_LABELS},
                              annotations={"kt-ref-count": "1", "kt-config": "service=tomcat"}))
    with pytest.raises(KtError, match="another tool"):
        await mesh.refuse_foreign_router(kube, "default", "tomcat")
    _mesh(kube, {"alice": FRESH})
    await mesh.refuse_foreign_router(kube, "default", "tomcat")  # ours: joined


def _kt_connect_mesh(kube: FakeKube, beat: str = FRESH) -> None:
    """tomcat meshed by kt-connect: its nginx router keeps the routes in a file (no kt-mesh-routes), one
    participant; every heartbeat `beat`."""
    s = kube.store
    s.put("service", service("tomcat", ROUTER_LABELS, PORTS, annotations={
        "kt-selector": '{"app":"tomcat"}', "kt-user": "alice"}))
    s.put("pod", pod("tomcat", {"app": "tomcat"}, ip="10.244.0.5"))
    s.put("service", service("tomcat-kt-stuntman", {"app": "tomcat"}, PORTS, labels={"control-by": "kt"},
                             annotations={"kt-last-heart-beat": beat, "kt-config": "service=tomcat"}))
    s.put("pod", pod("tomcat-kt-router", {"control-by": "kt", **ROUTER_LABELS}, annotations={
        "kt-config": "service=tomcat", "kt-ref-count": "1", "kt-last-heart-beat": beat}))
    s.put("pod", pod("tomcat-kt-mesh-abcde", {"control-by": "kt", "kt-role": "shadow-mesh", "kt-target": "a" * 8},
                     annotations={"kt-config": "service=tomcat-kt-mesh-abcde", "kt-last-heart-beat": beat}))


async def test_clean_leaves_a_live_kt_connect_mesh_alone() -> None:
    """G2: kt-connect's router has no kt-mesh-routes; read as 'no live route' it was undone (selector
    restored, router and stuntman deleted) under developers whose every heartbeat was fresh."""
    kube = FakeKube()
    _kt_connect_mesh(kube)
    before = _names(kube)
    result = await _clean(kube)
    assert _names(kube) == before
    assert kube.store.read("service", "tomcat", "default").spec.selector == ROUTER_LABELS
    assert not result.recovered and not result.removed, (result.recovered, result.removed)
    await clean(kube, "default", threshold=300, before=first_hooks())  # connect's start-up sweep
    assert _names(kube) == before


async def test_clean_never_undoes_a_kt_connect_mesh_even_when_it_looks_dead() -> None:
    """Not ours: nothing here can tell its users apart; it is named, and `recover` is the way back."""
    kube = FakeKube()
    _kt_connect_mesh(kube, beat=STALE)
    result = await _clean(kube)
    assert kube.store.read("service", "tomcat", "default").spec.selector == ROUTER_LABELS
    assert {"pod/tomcat-kt-router", "service/tomcat-kt-stuntman"} <= _names(kube)
    assert any("not ktctl's" in line for line in result.recovered), result.recovered


async def test_clean_keeps_our_mesh_while_a_participant_lives_without_a_route() -> None:
    """A participant whose route went missing (its keeper adds it back) but whose Service still beats:
    the mesh is not the dead's last one out."""
    kube = FakeKube()
    _mesh(kube, {"alice": STALE}, router_beat=STALE, stuntman_beat=STALE)
    kube.store.put("service", service("tomcat-kt-mesh-bob", {"kt-role": "shadow-mesh", "kt-target": "b" * 4}, PORTS,
                                      labels={"control-by": "kt", "kt-role": "shadow-mesh"},
                                      annotations={"kt-config": "service=tomcat,route=version:bob",
                                                   "kt-last-heart-beat": FRESH}))
    await _clean(kube)
    assert kube.store.read("service", "tomcat", "default").spec.selector == ROUTER_LABELS
    assert {"pod/tomcat-kt-router", "service/tomcat-kt-stuntman", "service/tomcat-kt-mesh-bob"} <= _names(kube)
    assert not {n for n in _names(kube) if "alice" in n}


async def test_clean_keeps_our_mesh_while_its_router_still_beats() -> None:
    """Router heartbeats come from live participants' processes: a fresh one means someone is there."""
    kube = FakeKube()
    _mesh(kube, {"alice": STALE}, router_beat=FRESH, stuntman_beat=STALE)
    await _clean(kube)
    assert kube.store.read("service", "tomcat", "default").spec.selector == ROUTER_LABELS
    assert "pod/tomcat-kt-router" in _names(kube)
